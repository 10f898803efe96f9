"""How much of a training step the normalization layers cost, and how our layers compare to torch's.

**Share of step time** (``torch.profiler``): a trainer with the current defaults and one norm runs
``--steps`` prequential steps at batch sizes 1, 32 and 256 on a numeric stream, under the profiler.
Each norm layer's forward is wrapped in a ``record_function`` range by forward hooks (this counts
the serving forward of the step as well as the training one); its backward is the autograd
functions whose forward ops ran inside those ranges (matched on the profiler's ``sequence_nr``).
The share is (norm forward + norm backward) / (profiled step time). The profiler adds a fixed cost
per op, so layers made of many small ops (ours) look somewhat more expensive than unprofiled. The
trainer runs its autograd path (``engine="torch"``): the compiled engine
(:mod:`stream_trainer.engine`) calls no module, and ``python bench/bench_engine.py`` measures it.

**Layer microbenchmark**: forward + backward of one layer alone, ``(N, 64)`` input in training
mode, median over ``--repeats`` timings of a loop, for each of our layers beside
``torch.nn.BatchNorm1d`` and ``torch.nn.LayerNorm`` in the same process; ratio to ``BatchNorm1d``
(which refuses a batch of 1 in training mode).

    python -m bench norm_time
"""

from __future__ import annotations

import argparse
import bisect
import statistics
import time
from collections.abc import Sequence
from typing import Any

from bench._common import (
    DOCS,
    NORMS,
    RESULTS,
    md_table,
    meta_lines,
    run_meta,
    set_single_thread,
    write_json,
)

__all__ = ["add_arguments", "render", "run"]

OUT_JSON = RESULTS / "norm_time.json"
PLOT = DOCS / "bench_norm_time.png"
STREAM = ("synth:hyperplane?n=100000&n_features=16", "class")
WIDTH = 64


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--norms", default=",".join(NORMS))
    p.add_argument("--sizes", default="1,32,256")
    p.add_argument("--steps", type=int, default=60, help="profiled steps per (norm, size)")
    p.add_argument("--repeats", type=int, default=15, help="timings per layer microbenchmark")
    p.add_argument("--no-plot", action="store_true")


def _profile_share(norm: str, size: int, steps: int) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile, record_function

    from stream_trainer.records import Record
    from stream_trainer.sources import open_source
    from stream_trainer.training import IncrementalTrainer, TrainerConfig

    spec, target = STREAM
    # the PyTorch modules are what this measures
    trainer = IncrementalTrainer(TrainerConfig(target=target, norm=norm, seed=0, engine="torch"))
    source = open_source(spec, target=target)
    warm = 5
    records = (r for r in source if isinstance(r, Record))
    batches = [[next(records) for _ in range(size)] for _ in range(steps + warm)]
    for b in batches[:warm]:
        trainer.step(b)  # builds the model; warm-up not profiled
    assert trainer.model is not None
    ranges: dict[Any, Any] = {}
    hooks = []
    for name, layer in trainer.model.norm_layers():

        def pre(m: Any, inp: Any, name: str = name) -> None:
            rf = record_function(f"norm::{name}")
            rf.__enter__()
            ranges[m] = rf

        def post(m: Any, inp: Any, out: Any) -> None:
            ranges.pop(m).__exit__(None, None, None)

        hooks += [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for b in batches[warm:]:
                with record_function("bench::step"):
                    trainer.step(b)
    finally:
        for h in hooks:
            h.remove()
    events = list(prof.events())
    norm_ranges = sorted(
        (e.time_range.start, e.time_range.end) for e in events if e.name.startswith("norm::")
    )
    starts = [r[0] for r in norm_ranges]
    seqs = set()
    for e in events:
        if e.sequence_nr is None or e.sequence_nr < 0 or e.name.startswith(("norm::", "bench::")):
            continue
        if "evaluate_function" in e.name or "Backward" in e.name:
            continue
        i = bisect.bisect_right(starts, e.time_range.start) - 1
        if i >= 0 and e.time_range.end <= norm_ranges[i][1]:
            seqs.add(e.sequence_nr)
    fwd = sum(e.cpu_time_total for e in events if e.name.startswith("norm::"))
    bwd = sum(
        e.cpu_time_total
        for e in events
        if e.name.startswith("autograd::engine::evaluate_function") and e.sequence_nr in seqs
    )
    total = sum(e.cpu_time_total for e in events if e.name == "bench::step")
    # The unprofiled step time, for scale.
    t0 = time.perf_counter()
    for b in batches[warm:]:
        trainer.step(b)
    plain = (time.perf_counter() - t0) / steps
    return {
        "norm": norm,
        "size": size,
        "forward_us": fwd / steps,
        "backward_us": bwd / steps,
        "step_us_profiled": total / steps,
        "step_us": plain * 1e6,
        "share": (fwd + bwd) / total if total else float("nan"),
    }


def _layer_time(layer: Any, n: int, repeats: int) -> float | None:
    import torch

    x = torch.randn(n, WIDTH, requires_grad=True)
    g = torch.randn(n, WIDTH)
    layer.train()
    try:
        layer(x).backward(g)
    except (ValueError, RuntimeError):
        return None  # BatchNorm1d at batch size 1 in training mode
    inner = 200 if n <= 32 else 50
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            layer(x).backward(g)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times) * 1e6


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    set_single_thread()
    import torch
    from tqdm import tqdm

    from stream_trainer.norms import build_norm

    norms = [n.strip() for n in args.norms.split(",") if n.strip()]
    sizes = [int(s) for s in args.sizes.split(",")]
    meta = run_meta(
        argv,
        seeds=[0],
        limits={"stream": f"{STREAM[0]} (numeric, 16 features)"},
        notes=f"profiled {args.steps} steps per cell after 5 warm-up steps; layer "
        f"microbenchmark width {WIDTH}, median of {args.repeats}; 1 thread",
    )
    shares = []
    for norm, size in tqdm([(n, s) for n in norms for s in sizes], desc="profile", unit="cell"):
        shares.append(_profile_share(norm, size, args.steps))
    layers: list[tuple[str, Any]] = [(f"ours:{n}", lambda n=n: build_norm(n, WIDTH)) for n in norms]
    layers += [
        ("torch:BatchNorm1d", lambda: torch.nn.BatchNorm1d(WIDTH)),
        ("torch:LayerNorm", lambda: torch.nn.LayerNorm(WIDTH)),
    ]
    micro = []
    for name, make in tqdm(layers, desc="layers", unit="layer"):
        for size in sizes:
            micro.append(
                {"layer": name, "size": size, "us": _layer_time(make(), size, args.repeats)}
            )
    data = {"meta": meta, "shares": shares, "micro": micro}
    write_json(OUT_JSON, data)
    if not args.no_plot:
        plot(data)
    return data


def _ratio(micro: list[dict[str, Any]], layer: str, size: int) -> float | None:
    base = next(
        (m["us"] for m in micro if m["layer"] == "torch:BatchNorm1d" and m["size"] == size), None
    )
    mine = next((m["us"] for m in micro if m["layer"] == layer and m["size"] == size), None)
    return mine / base if base and mine else None


def plot(data: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares, micro = data["shares"], data["micro"]
    sizes = sorted({s["size"] for s in shares})
    norms = list(dict.fromkeys(s["norm"] for s in shares))
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    w = 0.8 / len(sizes)
    for k, size in enumerate(sizes):
        vals = {s["norm"]: 100 * s["share"] for s in shares if s["size"] == size}
        a.bar(
            [i + k * w for i in range(len(norms))],
            [vals.get(n, 0) for n in norms],
            w,
            label=f"batch {size}",
        )
    a.set_xticks([i + w * (len(sizes) - 1) / 2 for i in range(len(norms))], norms, rotation=30)
    a.set_ylabel("% of profiled step time in norm layers")
    a.legend(fontsize=8)
    a.grid(alpha=0.3, axis="y")
    layers = list(dict.fromkeys(m["layer"] for m in micro))
    msizes = sorted({m["size"] for m in micro})
    w = 0.8 / len(msizes)
    for k, size in enumerate(msizes):
        vals = {m["layer"]: m["us"] or 0 for m in micro if m["size"] == size}
        b.bar(
            [i + k * w for i in range(len(layers))],
            [vals.get(x, 0) for x in layers],
            w,
            label=f"N={size}",
        )
    b.set_xticks(
        [i + w * (len(msizes) - 1) / 2 for i in range(len(layers))],
        [x.replace("ours:", "") for x in layers],
        rotation=40,
        fontsize=8,
    )
    b.set_ylabel(f"forward+backward µs, (N, {WIDTH}), log scale")
    b.set_yscale("log")
    b.legend(fontsize=8)
    b.grid(alpha=0.3, axis="y")
    fig.suptitle("Cost of normalization layers", fontsize=11)
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


def render(data: dict[str, Any]) -> str:
    meta, shares, micro = data["meta"], data["shares"], data["micro"]
    sizes = sorted({s["size"] for s in shares})
    norms = list(dict.fromkeys(s["norm"] for s in shares))
    lines = [
        "## Time spent in normalization layers",
        "",
        *meta_lines(meta),
        "",
        "![norm time](docs/bench_norm_time.png)",
        "",
        "Share of the profiled prequential step (serve forward + train forward/backward + "
        "optimizer) spent in norm layers (forward + backward); unprofiled step time in "
        "brackets.",
        "",
    ]
    rows = []
    for n in norms:
        cells = []
        for z in sizes:
            s = next((s for s in shares if s["norm"] == n and s["size"] == z), None)
            cells.append(
                "" if s is None else f"{100 * s['share']:.1f}% ({s['step_us'] / 1000:.2f} ms)"
            )
        rows.append([f"`{n}`", *cells])
    lines += [md_table(["norm", *[f"batch {z}" for z in sizes]], rows), ""]
    msizes = sorted({m["size"] for m in micro})
    lines += [
        f"Forward + backward of one layer, `(N, {WIDTH})`, training mode, µs (median); "
        "ratio to `torch.nn.BatchNorm1d` in brackets (target for `ema_batch` and "
        "`batch_renorm` at N=256: ≤ 1.5x).",
        "",
    ]
    rows = []
    for layer in dict.fromkeys(m["layer"] for m in micro):
        cells = []
        for z in msizes:
            us = next((m["us"] for m in micro if m["layer"] == layer and m["size"] == z), None)
            r = _ratio(micro, layer, z)
            cells.append("n/a" if us is None else f"{us:.0f}" + (f" ({r:.2f}x)" if r else ""))
        rows.append([f"`{layer}`", *cells])
    lines += [md_table(["layer", *[f"N={z}" for z in msizes]], rows), ""]
    return "\n".join(lines)
