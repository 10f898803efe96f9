"""One thread count for every compute pool of the process: torch's intra-op pool and the BLAS and
OpenMP pools that numpy, scipy and torch load (OpenBLAS, MKL, BLIS, libgomp...).

The trainer's products are small (a few 64-wide layers): a second thread costs more to wake than it
saves, and on a machine shared with other busy processes extra threads contend for the same cores.
torch's :func:`torch.set_num_threads` does not reach numpy's BLAS, so both are pinned here, through
`threadpoolctl <https://github.com/joblib/threadpoolctl>`_ for the native libraries already loaded
and through the variables those libraries read when they load (``OMP_NUM_THREADS``,
``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS``...) for the ones loaded later and for child
processes.

This is the ``threads`` setting of ``run`` and ``evaluate`` (``--threads``,
``STREAM_TRAINER_THREADS``, ``threads`` in the TOML file).
"""

from __future__ import annotations

import os

from stream_trainer.errors import ConfigError

__all__ = ["DEFAULT_THREADS", "THREAD_ENV", "pin_threads", "validate_threads"]

DEFAULT_THREADS = 1
# Read by the native pools when they load: OpenMP, OpenBLAS, MKL, BLIS, Accelerate, numexpr.
THREAD_ENV = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


def validate_threads(threads: object) -> int:
    """``threads`` as an int >= 1, or a :class:`ConfigError` quoting it."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be an integer >= 1, got {threads!r}")
    return threads


def pin_threads(threads: int = DEFAULT_THREADS) -> None:
    """Use ``threads`` threads in torch and in every BLAS/OpenMP pool of this process.

    Applies to the pools already loaded (numpy's BLAS is loaded here first, so it is among them)
    and, through :data:`THREAD_ENV`, to pools loaded later and to child processes. Process-wide:
    call it once at the start of a command, before any clock.
    """
    threads = validate_threads(threads)
    for name in THREAD_ENV:
        os.environ[name] = str(threads)
    import numpy  # noqa: F401 - loads numpy's BLAS so that the limit below reaches it
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(limits=threads)
