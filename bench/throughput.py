"""Samples/s of the trainer beside the contenders a user would write instead, in one run.

Every figure is the median of ``--rounds`` rounds; within a round every contender runs once, in an
order that rotates by one each round, so that a burst of load on the machine falls on all of them
alike. This process and deep-river's are pinned to one thread (torch's and the BLAS/OpenMP pools:
:func:`stream_trainer.threads.pin_threads`). Four groups:

**steady state**, at batch 1 and 64, over the same ``--records`` records of a CSV stream, parsed
beforehand, after ``--warmup`` records of warm-up (the optimizer built, every lazy import paid):

* *ours*: ``IncrementalTrainer(TrainerConfig(target=...)).step(batch)``, the public API only,
  so whatever step the trainer runs inside is what is measured; and the same with one MLP member
  (``member_momenta=()``), the step the default's members multiply;
* *deep-river*: ``StandardScaler | deep_river.classification.Classifier`` with an MLP of the
  same widths (Linear, ReLU; no norm), same optimizer and learning rate, in its own environment
  (:mod:`bench.envs`) as a long-lived worker (:mod:`bench.deep_river_job`);
* *plain loop*: ``nn.Sequential`` of Linear and ReLU per hidden width, then Linear; Adam at the
  same learning rate; predict under ``no_grad``, then cross-entropy, backward, step, on tensors
  standardized beforehand; once without norm and once with ``nn.LayerNorm`` after each hidden
  Linear;
* *river*: ``StandardScaler | LogisticRegression``, ``predict_one`` then ``learn_one`` in
  river's own loop (batch 1 only).

**whole command**: ``stream-trainer evaluate`` on the first ``--command-records`` rows of the
CSV against deep-river's script (:mod:`bench.deep_river_job` ``script``) on the same rows: wall
time of each process from start to exit, interpreter start, imports and CSV parsing included;
reported apart from the steady state.

**contention**: ours with width 128 (``hidden=(128, 128)``) at batch 64, steady state, idle and
while one other process burns a core; reported as idle ÷ busy.

    python -m bench throughput            # the default run, about five minutes
    python -m bench throughput --quick    # a smoke test on a few hundred records
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bench._common import (
    DOCS,
    RESULTS,
    ROOT,
    SHARED_DATA,
    md_table,
    meta_lines,
    run_meta,
    write_json,
)

__all__ = ["add_arguments", "render", "run"]

OUT_JSON = RESULTS / "throughput.json"
PLOT = DOCS / "bench_throughput.png"
SOURCE = (str(SHARED_DATA / "weather.csv"), "target")

OURS = "ours"
OURS_ONE = "ours, one member (`--member-momenta none`)"
DEEP_RIVER = "deep-river"
PLAIN = "plain nn.Sequential loop, no norm"
PLAIN_LAYER_NORM = "plain nn.Sequential loop, LayerNorm"
RIVER_LR = "river StandardScaler then LogisticRegression"
OURS_COMMAND = "ours: `stream-trainer evaluate`"
DEEP_RIVER_SCRIPT = "deep-river: the same as a script"
CONTENTION = "ours, width 128, batch 64"
IDLE, BUSY = "idle", "one busy process"
_QUICK = {"records": 256, "warmup": 64, "command_records": 300, "rounds": 1}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default=SOURCE[0], help="a CSV file of numeric features")
    p.add_argument("--target", default=SOURCE[1])
    p.add_argument("--records", type=int, default=2000, help="timed records per steady pass")
    p.add_argument("--warmup", type=int, default=500, help="records learned before any clock")
    p.add_argument("--command-records", type=int, default=4000)
    p.add_argument("--sizes", default="1,64")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-deep-river", action="store_true", help="skip deep-river (no venv needed)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in _QUICK.items()),
    )
    p.add_argument("--no-plot", action="store_true")


# -- contenders: each builds, warms up, then times one pass per call --------------------------


def _records(source: str, target: str, n: int) -> list[Any]:
    from stream_trainer.records import Record
    from stream_trainer.sources import open_source

    items = itertools.islice(open_source(source, target=target), n)
    return [r for r in items if isinstance(r, Record)]


def _batches(items: Any, size: int) -> list[Any]:
    """``items`` (a list or a tensor) cut into consecutive slices of ``size``."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def _timed(passes: Callable[[], int]) -> float:
    """Samples/s of one call of ``passes`` (which returns how many samples it went through)."""
    t0 = time.perf_counter()
    n = passes()
    return n / (time.perf_counter() - t0)


def _ours(
    records: list[Any], target: str, size: int, warmup: int, seed: int, **settings: Any
) -> Callable[[], float]:
    from stream_trainer.training import IncrementalTrainer, TrainerConfig

    trainer = IncrementalTrainer(TrainerConfig(target=target, seed=seed, **settings))
    warm, timed = _batches(records[:warmup], size), _batches(records[warmup:], size)
    for batch in warm:
        trainer.step(batch)

    def one_pass() -> int:
        for batch in timed:
            trainer.step(batch)
        return len(records) - warmup

    return lambda: _timed(one_pass)


def _matrix(records: list[Any], target: str) -> tuple[Any, list[str]]:
    """The numeric features as a float32 matrix, standardized over these records, and labels."""
    import numpy as np

    names = [k for k in records[0].value if k != target]
    x = np.asarray([[float(r.value[k]) for k in names] for r in records], dtype=np.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    return x, [str(r.value[target]) for r in records]


def _plain(
    records: list[Any], target: str, size: int, warmup: int, seed: int, layer_norm: bool
) -> Callable[[], float]:
    import numpy as np
    import torch
    from torch import nn

    from stream_trainer.training import TrainerConfig

    config = TrainerConfig(target=target)
    x, labels = _matrix(records, target)
    classes = sorted(set(labels))
    y = torch.from_numpy(np.asarray([classes.index(c) for c in labels], dtype=np.int64))
    xt = torch.from_numpy(x)
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = x.shape[1]
    for h in config.hidden:
        layers += [nn.Linear(width, h), *([nn.LayerNorm(h)] if layer_norm else []), nn.ReLU()]
        width = h
    model = nn.Sequential(*layers, nn.Linear(width, len(classes)))
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    warm = list(zip(_batches(xt[:warmup], size), _batches(y[:warmup], size), strict=True))
    timed = list(zip(_batches(xt[warmup:], size), _batches(y[warmup:], size), strict=True))

    def one_pass(batches: list[tuple[Any, Any]]) -> int:
        """Predict (the hits counted, as a prequential loop does), then learn; the samples."""
        hits = seen = 0
        for xb, yb in batches:
            with torch.no_grad():
                hits += int((model(xb).argmax(1) == yb).sum())
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(yb)
        return seen

    one_pass(warm)
    return lambda: _timed(lambda: one_pass(timed))


def _river_lr(records: list[Any], target: str, warmup: int) -> Callable[[], float]:
    from river import linear_model, multiclass, preprocessing

    _, labels = _matrix(records, target)
    classes = sorted(set(labels))
    xs = [{k: float(v) for k, v in r.value.items() if k != target} for r in records]
    ys: list[Any] = labels if len(classes) > 2 else [c == classes[-1] for c in labels]
    clf = linear_model.LogisticRegression()
    model = preprocessing.StandardScaler() | (
        multiclass.OneVsRestClassifier(clf) if len(classes) > 2 else clf
    )

    def one_pass(pairs: list[tuple[dict[str, float], Any]]) -> int:
        for x, y in pairs:
            model.predict_one(x)
            model.learn_one(x, y)
        return len(pairs)

    one_pass(list(zip(xs[:warmup], ys[:warmup], strict=True)))
    timed = list(zip(xs[warmup:], ys[warmup:], strict=True))
    return lambda: _timed(lambda: one_pass(timed))


def _deep_river_args() -> list[str]:
    from stream_trainer.training import TrainerConfig

    c = TrainerConfig(target="y")
    return [
        *("--hidden", ",".join(map(str, c.hidden)), "--optimizer", c.optimizer),
        *("--lr", str(c.lr), "--grad-clip", str(c.grad_clip or 0)),
    ]


class _DeepRiverWorker:
    """The steady-state worker of :mod:`bench.deep_river_job`, one pass per :meth:`measure`."""

    def __init__(self, records: list[Any], target: str, sizes: list[int], warmup: int) -> None:
        from bench.envs import deep_river_python

        _, labels = _matrix(records, target)
        names = [k for k in records[0].value if k != target]
        self._tmp = tempfile.TemporaryDirectory()
        data = Path(self._tmp.name) / "stream.jsonl"
        raw = [{k: float(r.value[k]) for k in names} for r in records]
        data.write_text(
            "".join(json.dumps({"x": v, "y": y}) + "\n" for v, y in zip(raw, labels, strict=True))
        )
        job = str(ROOT / "bench" / "deep_river_job.py")
        cmd = [str(deep_river_python()), job, "worker", "--data", str(data)]
        cmd += ["--sizes", ",".join(map(str, sizes)), "--warmup", str(warmup), *_deep_river_args()]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.versions = self._reply()

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"deep-river worker exited with {self.proc.wait()}")
        return dict(json.loads(line))

    def measure(self, size: int) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{size}\n")
        self.proc.stdin.flush()
        return float(self._reply()["samples_per_second"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self._tmp.cleanup()


def _process_seconds(cmd: list[str]) -> float:
    """Wall seconds of a process from start to exit (it must succeed)."""
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


def _command(source: str, target: str, n: int, size: int, report: Path) -> list[str]:
    return [
        *(sys.executable, "-m", "stream_trainer", "evaluate", "--source", source),
        *("--target", target, "--limit", str(n), "--batch-size", str(size)),
        *("--no-progress", "--report-json", str(report)),
    ]


def _deep_river_script(source: str, target: str, n: int, size: int) -> list[str]:
    from bench.envs import deep_river_python

    job = str(ROOT / "bench" / "deep_river_job.py")
    return [
        *(str(deep_river_python()), job, "script", "--csv", source, "--target", target),
        *("--limit", str(n), "--batch", str(size), *_deep_river_args()),
    ]


@contextlib.contextmanager
def _busy_process() -> Iterator[None]:
    """One other process burning a core for the duration."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # running before the clock starts
        yield
    finally:
        proc.kill()
        proc.wait()


# -- the run ------------------------------------------------------------------------------------


def _rotated(items: list[Any], by: int) -> list[Any]:
    k = by % len(items) if items else 0
    return items[k:] + items[:k]


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    if args.quick:
        for key, value in _QUICK.items():
            setattr(args, key, value)
    from stream_trainer.threads import pin_threads

    pin_threads(1)
    sizes = [int(s) for s in args.sizes.split(",")]
    records = _records(args.source, args.target, args.warmup + args.records)
    if len(records) <= args.warmup:
        raise SystemExit(f"{args.source}: {len(records)} records, not more than --warmup")
    n_timed = len(records) - args.warmup
    meta = run_meta(
        argv,
        seeds=[args.seed],
        limits={
            "steady state": f"{args.source}, {n_timed} records timed per pass after "
            f"{args.warmup} of warm-up, parsed beforehand",
            "whole command": f"the first {args.command_records} rows of {args.source}",
        },
        notes=f"median of {args.rounds} rounds, contenders interleaved (order rotated each "
        "round); one thread (torch and BLAS/OpenMP) in every process",
    )
    steady: dict[tuple[str, int], Callable[[], float]] = {}
    for size in sizes:
        steady[OURS, size] = _ours(records, args.target, size, args.warmup, args.seed)
        steady[OURS_ONE, size] = _ours(
            records, args.target, size, args.warmup, args.seed, member_momenta=()
        )
        for name, norm in ((PLAIN, False), (PLAIN_LAYER_NORM, True)):
            steady[name, size] = _plain(
                records, args.target, size, args.warmup, args.seed, layer_norm=norm
            )
    steady[RIVER_LR, 1] = _river_lr(records, args.target, args.warmup)
    worker = None
    if not args.no_deep_river:
        from bench.envs import ensure_deep_river

        meta["deep_river_env"] = ensure_deep_river(quiet=True)
        worker = _DeepRiverWorker(records, args.target, sizes, args.warmup)
        for size in sizes:
            steady[DEEP_RIVER, size] = functools.partial(worker.measure, size)
    contention = _ours(records, args.target, 64, args.warmup, args.seed, hidden=(128, 128))
    samples: dict[tuple[str, str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        commands: dict[tuple[str, int], list[str]] = {}
        for size in sizes:
            n = args.command_records
            commands[OURS_COMMAND, size] = _command(args.source, args.target, n, size, report)
            if worker is not None:
                script = _deep_river_script(args.source, args.target, n, size)
                commands[DEEP_RIVER_SCRIPT, size] = script
        try:
            for r in range(args.rounds):
                print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
                for key in _rotated(list(steady), r):
                    samples.setdefault(("steady", *key), []).append(steady[key]())
                for key in _rotated(list(commands), r):
                    seconds = _process_seconds(commands[key])
                    samples.setdefault(("command", *key), []).append(seconds)
                for load in _rotated([IDLE, BUSY], r):
                    with _busy_process() if load == BUSY else contextlib.nullcontext():
                        speed = contention()
                    samples.setdefault(("contention", load, 64), []).append(speed)
        finally:
            if worker is not None:
                worker.close()
    rows = []
    for (group, name, size), values in samples.items():
        row: dict[str, Any] = {"group": group, "contender": name, "size": size}
        if group == "command":
            row["seconds"] = statistics.median(values)
            row["samples_per_second"] = args.command_records / row["seconds"]
        else:
            row["samples_per_second"] = statistics.median(values)
        row["all"] = [round(v, 4 if group == "command" else 1) for v in values]
        rows.append(row)
    data = {"meta": meta, "rows": rows}
    write_json(OUT_JSON, data)
    if not args.no_plot:
        plot(data)
    return data


# -- rendering ----------------------------------------------------------------------------------


def _get(rows: list[dict[str, Any]], group: str, name: str, size: int) -> dict[str, Any] | None:
    found = (r for r in rows if (r.get("group"), r["contender"], r["size"]) == (group, name, size))
    return next(found, None)


def ratio(rows: list[dict[str, Any]], group: str, ours: str, other: str, size: int) -> float | None:
    """``ours``'s samples/s over ``other``'s in ``group`` at batch ``size`` (None: not measured)."""
    a, b = _get(rows, group, ours, size), _get(rows, group, other, size)
    if a is None or b is None:
        return None
    return float(a["samples_per_second"] / b["samples_per_second"])


# (group, ours, other, size, goal, what): the targets of the issue that asked for this bench.
TARGETS = (
    ("steady", OURS, DEEP_RIVER, 1, 10.0, "trainer ÷ deep-river, samples/s at batch 1, steady"),
    (
        "steady",
        OURS,
        PLAIN_LAYER_NORM,
        1,
        10.0,
        "trainer ÷ plain LayerNorm loop, samples/s at batch 1, steady",
    ),
    ("steady", OURS, PLAIN, 64, 1.5, "trainer ÷ plain loop without norm, samples/s at batch 64"),
    (
        "steady",
        OURS_ONE,
        DEEP_RIVER,
        1,
        10.0,
        "trainer with one member ÷ deep-river, samples/s at batch 1, steady",
    ),
    (
        "steady",
        OURS_ONE,
        PLAIN_LAYER_NORM,
        1,
        10.0,
        "trainer with one member ÷ plain LayerNorm loop, samples/s at batch 1, steady",
    ),
    (
        "steady",
        OURS_ONE,
        PLAIN,
        64,
        1.5,
        "trainer with one member ÷ plain loop without norm, samples/s at batch 64",
    ),
    (
        "command",
        OURS_COMMAND,
        DEEP_RIVER_SCRIPT,
        1,
        5.0,
        "`evaluate` ÷ deep-river's script, whole process at batch 1",
    ),
)
CONTENTION_TARGET = ("width 128 at batch 64: idle ÷ beside one busy process, samples/s", 1.3)
# (size, goal): the default's members cost at most ``goal`` times the one-member step.
MEMBER_COST_TARGETS = ((1, 1.5), (64, 2.0))


def member_cost_checks(rows: list[dict[str, Any]]) -> list[tuple[str, float, float]]:
    """``(what, measured, goal)`` per :data:`MEMBER_COST_TARGETS` size measured: one member's
    samples/s over the default's (the default's step time in one-member steps)."""
    out = []
    for size, goal in MEMBER_COST_TARGETS:
        value = ratio(rows, "steady", OURS_ONE, OURS, size)
        if value is not None:
            what = f"default (its members) ÷ one member, step time at batch {size}"
            out.append((what, value, goal))
    return out


def contention_ratio(rows: list[dict[str, Any]]) -> float | None:
    """Idle samples/s over busy samples/s of the width-128 contention pair (None: missing)."""
    idle, busy = _get(rows, "contention", IDLE, 64), _get(rows, "contention", BUSY, 64)
    if idle is None or busy is None:
        return None
    return float(idle["samples_per_second"] / busy["samples_per_second"])


def plot(data: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if r.get("group") == "steady"]
    sizes = sorted({r["size"] for r in rows})
    names = list(dict.fromkeys(r["contender"] for r in rows))
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 3.5), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        shown = [n for n in names if _get(rows, "steady", n, size)]
        vals = [_get(rows, "steady", n, size)["samples_per_second"] for n in shown]  # type: ignore[index]
        bars = ax.barh(shown, vals, color=["tab:blue" if n == OURS else "tab:gray" for n in shown])
        for b, v in zip(bars, vals, strict=True):
            ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {v:,.0f}/s", va="center")
        ax.set_xscale("log")
        ax.set_xlim(right=max([*vals, 1]) * 8)
        ax.set_title(f"steady state, batch size {size}")
        ax.set_xlabel("samples/s (median of rounds)")
        ax.invert_yaxis()
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


def _speed_table(rows: list[dict[str, Any]], group: str, ours: str, seconds: bool) -> str:
    sizes = sorted({r["size"] for r in rows if r.get("group") == group})
    names = list(dict.fromkeys(r["contender"] for r in rows if r.get("group") == group))
    header = ["contender"]
    for z in sizes:
        header += [f"b={z} s", f"b={z} samples/s"] if seconds else [f"b={z} samples/s"]
        header.append(f"b={z} ours ÷ it")
    table = []
    for name in names:
        cells = [name]
        for z in sizes:
            r = _get(rows, group, name, z)
            if r is None:
                cells += ["", "", ""] if seconds else ["", ""]
                continue
            if seconds:
                cells.append(f"{r['seconds']:.2f}")
            cells.append(f"{r['samples_per_second']:,.0f}")
            value = ratio(rows, group, ours, name, z)
            cells.append("" if value is None else f"{value:.2f}x")
        table.append(cells)
    return md_table(header, table)


def render(data: dict[str, Any]) -> str:
    meta, rows = data["meta"], data["rows"]
    lines = ["## Throughput beside the contenders", "", *meta_lines(meta)]
    if "deep_river_env" in meta:
        e = meta["deep_river_env"]
        lines.append(
            f"- deep-river {e.get('deep_river')} with river {e.get('river')} and torch "
            f"{e.get('torch')} in `.bench-venvs/deep-river` (`python -m bench envs`)"
        )
    lines += [
        "",
        "![throughput](docs/bench_throughput.png)",
        "",
        "Steady state (records parsed beforehand, after the warm-up), samples/s; *ours ÷ it* "
        "above 1: we are faster:",
        "",
        _speed_table(rows, "steady", OURS, seconds=False),
        "",
        "The whole command against deep-river's script on the same rows: wall seconds of the "
        "process (start, imports, parsing, learning), and rows over those seconds:",
        "",
        _speed_table(rows, "command", OURS_COMMAND, seconds=True),
        "",
    ]
    idle, busy = _get(rows, "contention", IDLE, 64), _get(rows, "contention", BUSY, 64)
    value = contention_ratio(rows)
    if idle and busy and value is not None:
        lines += [
            f"{CONTENTION}, steady state: {idle['samples_per_second']:,.0f} samples/s idle, "
            f"{busy['samples_per_second']:,.0f} with one busy process beside it: "
            f"idle ÷ busy {value:.2f}.",
            "",
        ]
    checks = []
    for group, ours, other, size, goal, what in TARGETS:
        value = ratio(rows, group, ours, other, size)
        if value is not None:
            verdict = "met" if value >= goal else "**not met**"
            checks.append(f"- target {what} ≥ {goal:g}: measured {value:.2f}: {verdict}")
    value = contention_ratio(rows)
    if value is not None:
        what, goal = CONTENTION_TARGET
        verdict = "met" if value <= goal else "**not met**"
        checks.append(f"- target {what} ≤ {goal:g}: measured {value:.2f}: {verdict}")
    for what, value, goal in member_cost_checks(rows):
        verdict = "met" if value <= goal else "**not met**"
        checks.append(f"- target {what} ≤ {goal:g}: measured {value:.2f}: {verdict}")
    return "\n".join(lines + checks) + "\n"
