"""What every benchmark shares: paths, the machine description, result files, small statistics."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import json
import os
import platform
import shlex
import statistics
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
RAW = RESULTS / "raw"
DOCS = ROOT / "docs"
SHARED_DATA = ROOT.parent / "shared" / "data"  # ../shared/data beside the checkout

NORMS = ("batch", "ema_batch", "batch_renorm", "layer", "group", "rms", "online", "none")

# Streams of the accuracy grid: spec, target, default record limit (stated in every table).
STREAMS: dict[str, tuple[str, str, int]] = {
    "phishing": ("river:Phishing", "is_phishing", 1250),
    "bananas": ("river:Bananas", "label", 1500),
    "agrawal_drift": ("synth:agrawal_drift?n=1500&position=750&width=150", "class", 1500),
    "weather": (str(SHARED_DATA / "weather.csv"), "target", 1500),
}


def machine() -> dict[str, Any]:
    """uname, core count, CPU model, Python and torch versions: written beside every figure."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "uname": " ".join(platform.uname()),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        import river

        info["river"] = river.__version__
    except ImportError:  # pragma: no cover
        pass
    with contextlib.suppress(OSError):
        info["loadavg"] = os.getloadavg()[0]
    return info


def run_meta(argv: Sequence[str] | None, **extra: Any) -> dict[str, Any]:
    """Command, date and machine of a benchmark run."""
    cmd = "python -m bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    return {
        "command": cmd.strip(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        **extra,
    }


def meta_lines(meta: dict[str, Any]) -> list[str]:
    """The Markdown bullet lines every results section starts with."""
    m = meta["machine"]
    lines = [
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}",
        f"- machine: `{m['uname']}`, nproc {m['nproc']}, CPU {m['cpu']}, "
        f"load average at start {m.get('loadavg', float('nan')):.2f}",
        f"- python {m['python']}, torch {m.get('torch')}, river {m.get('river')}",
    ]
    for key in ("seeds", "limits", "notes"):
        value = meta.get(key)
        if isinstance(value, dict):
            value = "; ".join(f"{k}: {v}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        if value is not None:
            lines.append(f"- {key}: {value}")
    return lines


def _dumps(data: Any) -> str:
    """JSON with one line per top-level key and one line per element of a list of records: small
    and still readable in a diff."""
    if not isinstance(data, dict):
        return json.dumps(data, sort_keys=True)
    parts = []
    for key in sorted(data):
        value = data[key]
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            items = ",\n".join("  " + json.dumps(v, sort_keys=True) for v in value)
            parts.append(f" {json.dumps(key)}: [\n{items}\n ]")
        else:
            parts.append(f" {json.dumps(key)}: {json.dumps(value, sort_keys=True)}")
    return "{\n" + ",\n".join(parts) + "\n}"


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(_dumps(data) + "\n")
    tmp.replace(path)


# Per-run keys kept in the committed aggregate files (the raw cache keeps everything).
ROW_KEYS = (
    "stream",
    "norm",
    "size",
    "seed",
    "limit",
    "lr",
    "hidden",
    "samples",
    "accuracy",
    "rolling_accuracy",
    "log_loss",
    "samples_per_second",
    "code_version",
)


def compact_rows(
    rows: list[dict[str, Any]], keys: Sequence[str] = ROW_KEYS
) -> list[dict[str, Any]]:
    """The ``keys`` of each row, floats to 5 significant digits."""

    def short(v: Any) -> Any:
        return float(f"{v:.5g}") if isinstance(v, float) else v

    return [{k: short(r[k]) for k in keys if k in r} for r in rows]


def csv_list(text: str) -> list[str]:
    """The non-empty items of a comma-separated command-line value."""
    return [p.strip() for p in text.split(",") if p.strip()]


@functools.cache
def code_version() -> str:
    """Hash of the stream_trainer sources: an edit to the trainer invalidates cached runs."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "stream_trainer").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


@contextlib.contextmanager
def worker_map(workers: int) -> Iterator[Any]:
    """``imap_unordered`` of a spawn pool, or the builtin ``map`` in this process for 1 worker."""
    if workers <= 1:
        yield map
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        yield pool.imap_unordered


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def median(values: Iterable[float]) -> float:
    vals = [v for v in values if v == v]
    return statistics.median(vals) if vals else float("nan")


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    vals = [v for v in values if v == v]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> str:
    """A GitHub table; ``align`` is one char per column (l or r), default: first l, rest r."""
    align = align or ("l" + "r" * (len(header) - 1))
    sep = ["---" if a == "l" else "---:" for a in align]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def set_single_thread() -> None:
    """One thread per process, in torch and in the BLAS/OpenMP pools
    (:func:`stream_trainer.threads.pin_threads`): the bench runs two worker processes on two
    cores."""
    import torch

    from stream_trainer.threads import pin_threads

    pin_threads(1)
    with contextlib.suppress(RuntimeError):  # already set in this process
        torch.set_num_interop_threads(1)


def write_script_result(
    script: str, argv: Sequence[str] | None, out: Path, title: str, body: list[str]
) -> str:
    """Write the Markdown result of a standalone bench script (``python bench/NAME.py``): the
    title, the run's command, date and machine (:func:`meta_lines`), then ``body``; print it too.
    ``argv`` is what ``main`` was given (``None``: the command line)."""
    shown = sys.argv[1:] if argv is None else argv
    meta = run_meta(argv, command=" ".join([f"python {script}", *shown]).strip())
    text = "\n".join([f"# {title}", "", *meta_lines(meta), *body]) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return text
