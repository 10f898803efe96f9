"""Prequential accuracy of the default MLP against the issue's targets (slow; runs in CI).

Target: with the defaults (seed 0), accuracy >= river's LogisticRegression on the same stream and
batching, and >= 0.89 on river's Phishing, >= 0.77 on the weather stream. Beside those two, the
first 5,000 records of four of river's generators with a linear concept (SEA, SEA with a drift,
Hyperplane, LED with a drift), where an MLP alone stays under a logistic regression and the
trainer's linear expert (:mod:`stream_trainer.training.mixture`) must close the gap. Combinations
that do not reach it yet are ``xfail(strict=True)`` with the measured numbers, so that the day they
pass the mark must go. The runs go to two single-threaded worker processes (about 2m30s on a
2-core CI box, weather at batch size 1 being the longest).
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import pytest
import torch

from stream_trainer.evaluation import evaluate_stream
from stream_trainer.sources import BatchSizes, default_target, open_source
from stream_trainer.training import IncrementalTrainer, TrainerConfig
from stream_trainer.training.river_baselines import RiverLearner

pytestmark = pytest.mark.slow

WEATHER = Path("/work/shared/data/weather.csv")
# source -> (accuracy target or None: only "at least LogisticRegression", records read or None)
STREAMS: dict[str, tuple[float | None, int | None]] = {
    "river:Phishing": (0.89, None),
    str(WEATHER): (0.77, None),
    "synth:sea": (None, 5000),
    "synth:sea_drift?position=2500&width=500": (None, 5000),
    "synth:hyperplane": (None, 5000),
    "synth:led_drift": (None, 5000),
}
NORMS = ("ema_batch", "batch_renorm", "layer")
SIZES = ("1", "1:64")

# Combinations known to stay under the target: none at the moment (seed 0). Records that came
# before the model existed are unscored, as in river's progressive validation (the whole first
# batch: 34 Phishing rows at ``1:64``, seed 0); see stream_trainer.training.metrics.
KNOWN_SHORT: dict[tuple[str, str, str], str] = {}


def _target(source: str) -> str:
    return default_target(source) or "target"


def _accuracy(source: str, sizes: str, model: str, norm: str = "ema_batch") -> float:
    """Prequential accuracy of the default MLP (``model="mlp"``) or a river baseline, seed 0, on
    one torch thread (runs in a worker process, see :func:`accuracies`)."""
    torch.set_num_threads(1)
    config = TrainerConfig(target=_target(source), norm=norm, seed=0)
    learner = IncrementalTrainer(config) if model == "mlp" else RiverLearner(model, config)
    result = evaluate_stream(
        open_source(source, target=config.target),
        learner,
        batch_sizes=BatchSizes.parse(sizes),
        seed=0,
        limit=STREAMS[source][1],
        progress=False,
    )
    return float(result.report["accuracy"])


Job = tuple[str, str, str, str]  # source, sizes, model, norm


@pytest.fixture(scope="module")
def accuracies(request: pytest.FixtureRequest) -> Iterator[dict[Job, Future[float]]]:
    """Every run the selected tests need, started at once on two single-threaded worker processes
    (longest first: weather at batch size 1), so the module takes about half its serial time."""
    jobs: set[Job] = set()
    for item in request.session.items:
        spec = getattr(item, "callspec", None)
        if item.module is not request.module or spec is None:
            continue
        if item.get_closest_marker("skip"):
            continue
        source, norm, sizes = spec.params["source"], spec.params["norm"], spec.params["sizes"]
        jobs |= {(source, sizes, "mlp", norm), (source, sizes, "LogisticRegression", "ema_batch")}
    order = sorted(jobs, key=lambda j: (j[0] != str(WEATHER), j[1] != "1", j[2] != "mlp"))
    with ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn")) as pool:
        yield {job: pool.submit(_accuracy, *job) for job in order}


def _cases() -> Iterator[object]:
    for source in STREAMS:
        for norm in NORMS:
            for sizes in SIZES:
                marks: list[pytest.MarkDecorator] = []
                if source == str(WEATHER) and not WEATHER.exists():
                    marks.append(pytest.mark.skip(reason=f"{WEATHER} is not on this machine"))
                reason = KNOWN_SHORT.get((source, norm, sizes))
                if reason:
                    marks.append(pytest.mark.xfail(strict=True, reason=reason))
                yield pytest.param(source, norm, sizes, marks=marks, id=f"{source}-{norm}-{sizes}")


@pytest.mark.parametrize(("source", "norm", "sizes"), list(_cases()))
def test_default_mlp_reaches_the_targets(
    source: str, norm: str, sizes: str, accuracies: dict[Job, Future[float]]
) -> None:
    ours = accuracies[(source, sizes, "mlp", norm)].result()
    baseline = accuracies[(source, sizes, "LogisticRegression", "ema_batch")].result()
    print(f"{source} {norm} {sizes}: mlp {ours:.4f} logistic regression {baseline:.4f}")
    assert ours >= baseline, f"{ours:.4f} < LogisticRegression {baseline:.4f}"
    target = STREAMS[source][0]
    if target is not None:
        assert ours >= target, f"{ours:.4f} < target {target}"
