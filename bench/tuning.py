"""The tuning suite: candidate defaults against the best fixed setting in hindsight, per stream.

Every (stream, seed, batching, contender) is one prequential run of
:func:`stream_trainer.evaluation.evaluate_stream`. A contender is a name and a dict of
:class:`~stream_trainer.training.TrainerConfig` overrides, merged with the stream's ``target`` and
the run's ``seed`` (``TrainerConfig(**overrides, target=..., seed=...)``). The contenders are

- the *grid* of fixed settings: ``ema_batch`` momentum over ``--grid`` (one member each,
  ``member_momenta=()``);
- the *candidates*: ``default`` (``TrainerConfig()`` as it is when the suite runs) and each
  ``--candidates NAME=JSON`` (JSON lists become tuples for tuple-typed settings);
- river's ``LogisticRegression`` and ``ARF`` through the project's
  :class:`~stream_trainer.training.river_baselines.RiverLearner`, at batch size 1 only (river
  learns one record at a time); their batch-1 accuracy stands in both batchings' columns.

Each learner runs at batch size 1 and at variable ``1:64``. The seed sets the model's
initialisation, the batch-size draws and, for ``synth:`` streams, the data (``seed=`` in the spec).
Per (stream, batching), with accuracies averaged over seeds: *best fixed* is the grid member with
the highest mean; a candidate's **regret** is ``best - candidate`` in points (negative: better
than every fixed setting); its margins are ``candidate - LR`` and ``candidate - ARF``.

Runs are cached one JSON file each under ``bench/results/raw/tuning/`` (git-ignored), keyed by
the stream spec, record limit, seed, batching, the contender's full configuration and the
stream_trainer source hash, so a rerun does only the runs it has not done. Results:
``bench/results/tuning.json``, plot ``docs/bench_tuning.png``.

    python -m bench tuning                      # every stream, seeds 0,1,2, 2 workers
    python -m bench tuning --candidates 'members4={"member_momenta":[0.002,0.01,0.03,0.1]}'
    python -m bench tuning --streams sea_recurring,weather --seeds 0 --limit 2000
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._common import (
    DOCS,
    RAW,
    RESULTS,
    SHARED_DATA,
    code_version,
    compact_rows,
    csv_list,
    md_table,
    mean_std,
    meta_lines,
    read_json,
    run_meta,
    set_single_thread,
    worker_map,
    write_json,
)

__all__ = [
    "STREAMS",
    "Contender",
    "TuningRun",
    "add_arguments",
    "regret_cells",
    "render",
    "run",
    "summarize",
]

OUT_JSON = RESULTS / "tuning.json"
PLOT = DOCS / "bench_tuning.png"
BATCHINGS = ("1", "1:64")
GRID = (0.002, 0.005, 0.01, 0.03, 0.1)
OLD_DEFAULT_MOMENTUM = 0.002  # the single-member default the "below LR" count compares with
RIVER = ("LogisticRegression", "ARF")
REGRET_LIMIT = 0.5  # points: the bound on a default's regret

# name: (source spec, target, records read). ``synth:`` specs get ``seed=S`` per run.
STREAMS: dict[str, tuple[str, str, int]] = {
    # real data: whole files, weather capped
    "phishing": ("river:Phishing", "is_phishing", 1250),
    "bananas": ("river:Bananas", "label", 5300),
    "image_segments": ("river:ImageSegments", "shape", 2310),
    "weather": (str(SHARED_DATA / "weather.csv"), "target", 8000),
    "usenet1": (str(SHARED_DATA / "usenet1.arff"), "interesting", 1500),
    "usenet2": (str(SHARED_DATA / "usenet2.arff"), "interesting", 1500),
    # one abrupt or gradual drift half way
    "agrawal_abrupt": ("synth:agrawal_drift?position=2500&width=1", "class", 5000),
    "agrawal_gradual": ("synth:agrawal_drift?position=2500&width=1000", "class", 5000),
    "sea_abrupt_noise10": ("synth:sea_drift?position=2500&width=1&noise=0.1", "class", 5000),
    "sea_gradual_noise20": ("synth:sea_drift?position=2500&width=1500&noise=0.2", "class", 5000),
    "sine_gradual": ("synth:sine_switch?concepts=0-2&period=2500&width=500", "class", 5000),
    "mixed_gradual": ("synth:mixed_switch?concepts=0-1&period=2500&width=500", "class", 5000),
    # several drifts, recurring concepts
    "agrawal_4_abrupt": (
        "synth:agrawal_switch?concepts=0-2-4-6&period=1250&width=1",
        "class",
        5000,
    ),
    "sea_recurring": (
        "synth:sea_switch?concepts=0-3-0-3-0&period=1000&width=1&noise=0.1",
        "class",
        5000,
    ),
    "stagger_recurring": (
        "synth:stagger_switch?concepts=0-1-2-0-1&period=1000&width=1",
        "class",
        5000,
    ),
    # continuous drift, slow and fast
    "hyperplane_slow": ("synth:hyperplane?mag_change=0.001&noise=0.05", "class", 5000),
    "hyperplane_fast": ("synth:hyperplane?mag_change=0.01&noise=0.05", "class", 5000),
    "rbf_slow": ("synth:rbf_drift?change_speed=0.0001", "class", 5000),
    "rbf_fast": ("synth:rbf_drift?change_speed=0.01", "class", 5000),
    "led_drift": ("synth:led_drift", "class", 5000),
    # stationary
    "rbf_stationary": ("synth:rbf_drift?change_speed=0", "class", 5000),
}

ROW_KEYS = ("stream", "contender", "kind", "batching", "seed", "limit", "samples", "accuracy")


@dataclass(frozen=True)
class Contender:
    """A named learner: ``kind`` is ``grid``, ``candidate`` or ``river`` (then ``name`` is the
    river model); ``overrides`` is canonical JSON of the TrainerConfig overrides."""

    name: str
    kind: str
    overrides: str = "{}"


def _tuple_fields() -> frozenset[str]:
    from stream_trainer.training import TrainerConfig

    return frozenset(f.name for f in dataclasses.fields(TrainerConfig) if "tuple" in str(f.type))


def trainer_config(overrides: str, target: str, seed: int) -> Any:
    """``TrainerConfig(**overrides, target=target, seed=seed)``, JSON lists as tuples where the
    setting is tuple-typed."""
    from stream_trainer.training import TrainerConfig

    values = json.loads(overrides)
    tuples = _tuple_fields()
    for key, value in values.items():
        if key in tuples and isinstance(value, list):
            values[key] = tuple(value)
    return TrainerConfig(**{**values, "target": target, "seed": seed})


def _fingerprint(contender: Contender, config: Any) -> str:
    """Every setting of the configuration (not only those that shape tensors) and the learner."""
    text = json.dumps(
        [contender.kind, contender.name if contender.kind == "river" else "", config.to_dict()],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def seeded_spec(spec: str, seed: int | str) -> str:
    """``synth:`` specs carry the run's seed; files and river's fixed datasets are what they are."""
    if not spec.startswith("synth:"):
        return spec
    return f"{spec}{'&' if '?' in spec else '?'}seed={seed}"


@dataclass(frozen=True)
class TuningRun:
    stream: str
    spec: str
    target: str
    limit: int
    seed: int
    batching: str
    contender: Contender
    cache: str = str(RAW / "tuning")  # not part of the key

    def key(self, fingerprint: str) -> str:
        text = json.dumps(
            [
                seeded_spec(self.spec, self.seed),
                self.limit,
                self.seed,
                self.batching,
                fingerprint,
                code_version(),
            ]
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def execute(task: TuningRun) -> dict[str, Any]:
    """One prequential run (in a worker process), or its cached row."""
    set_single_thread()
    from stream_trainer.evaluation import evaluate_stream
    from stream_trainer.sources import BatchSizes, open_source
    from stream_trainer.training import IncrementalTrainer
    from stream_trainer.training.river_baselines import RiverLearner

    contender = task.contender
    config = trainer_config(contender.overrides, task.target, task.seed)
    fingerprint = _fingerprint(contender, config)
    path = Path(task.cache) / f"{task.key(fingerprint)}.json"
    if path.exists():
        return dict(read_json(path))
    learner = (
        RiverLearner(contender.name, config)
        if contender.kind == "river"
        else IncrementalTrainer(config)
    )
    start = time.perf_counter()
    result = evaluate_stream(
        open_source(seeded_spec(task.spec, task.seed), target=task.target),
        learner,
        batch_sizes=BatchSizes.parse(task.batching),
        seed=task.seed,
        limit=task.limit,
        progress=False,
    )
    row = {
        "stream": task.stream,
        "source": seeded_spec(task.spec, task.seed),
        "contender": contender.name,
        "kind": contender.kind,
        "overrides": json.loads(contender.overrides),
        "batching": task.batching,
        "seed": task.seed,
        "limit": task.limit,
        "samples": result.report["samples"],
        "accuracy": result.report.get("accuracy"),
        "wall_seconds": time.perf_counter() - start,
        "fingerprint": fingerprint,
        "code_version": code_version(),
    }
    write_json(path, row)
    return row


def grid_name(momentum: float) -> str:
    return f"m={momentum:g}"


def _candidate(text: str) -> tuple[str, str]:
    """``NAME=JSON`` of ``--candidates``: a name and canonical JSON of an object."""
    name, sep, body = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=JSON, got {text!r}")
    try:
        value = json.loads(body)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"candidate {name!r}: not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"candidate {name!r}: expected a JSON object")
    return name.strip(), json.dumps(value, sort_keys=True)


def contenders(args: argparse.Namespace) -> list[Contender]:
    """Grid, ``default``, the ``--candidates`` and river's learners, each checked by building its
    configuration once (an unknown or invalid setting stops the suite before any run)."""
    out = [
        Contender(
            grid_name(m),
            "grid",
            json.dumps(
                {"norm_options": {"ema_batch": {"momentum": m}}, "member_momenta": []},
                sort_keys=True,
            ),
        )
        for m in (float(v) for v in csv_list(args.grid))
    ]
    out.append(Contender("default", "candidate"))
    out += [Contender(name, "candidate", body) for name, body in args.candidates]
    out += [Contender(name, "river") for name in csv_list(args.river)]
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise SystemExit(f"contender names must differ, got {names}")
    from stream_trainer.training.config import RIVER_MODELS

    for c in out:
        if c.kind == "river" and c.name not in RIVER_MODELS:
            raise SystemExit(f"unknown river learner {c.name!r}; known: {', '.join(RIVER_MODELS)}")
        try:
            trainer_config(c.overrides, "target", 0)
        except (TypeError, ValueError) as exc:
            raise SystemExit(f"contender {c.name!r}: {exc}") from None
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--streams", default=",".join(STREAMS), help=f"subset of {','.join(STREAMS)}")
    p.add_argument(
        "--grid", default=",".join(map(str, GRID)), help="ema_batch momenta of the fixed settings"
    )
    p.add_argument(
        "--candidates",
        type=_candidate,
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="a candidate default as TrainerConfig overrides (repeatable), beside `default`",
    )
    p.add_argument("--river", default=",".join(RIVER), help="river learners (batch 1 only)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--limit", type=int, help="cap on records per stream (default: each stream's)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-plot", action="store_true")


def _cost(task: TuningRun) -> float:
    """A guess of a run's relative cost, to start the slow ones first."""
    per_record = 4.0 if task.contender.name == "ARF" else 1.0 if task.batching == "1" else 0.2
    return per_record * task.limit


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    from tqdm import tqdm

    streams = csv_list(args.streams)
    unknown = [s for s in streams if s not in STREAMS]
    if unknown:
        raise SystemExit(f"unknown streams {unknown}; known: {', '.join(STREAMS)}")
    seeds = [int(s) for s in csv_list(args.seeds)]
    limits = {s: min(STREAMS[s][2], args.limit or STREAMS[s][2]) for s in streams}
    everyone = contenders(args)
    tasks = sorted(
        (
            TuningRun(s, STREAMS[s][0], STREAMS[s][1], limits[s], seed, b, c, str(RAW / "tuning"))
            for s in streams
            for c in everyone
            for b in (("1",) if c.kind == "river" else BATCHINGS)
            for seed in seeds
        ),
        key=lambda t: -_cost(t),
    )
    meta = run_meta(
        argv,
        seeds=seeds,
        limits={s: f"{seeded_spec(STREAMS[s][0], 'S')} first {limits[s]}" for s in streams},
        workers=args.workers,
        contenders={c.name: json.loads(c.overrides) for c in everyone if c.kind != "river"},
    )
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    bar = tqdm(total=len(tasks), unit="run", desc="tuning")
    with worker_map(args.workers) as imap, bar:
        for row in imap(execute, tasks):
            rows.append(row)
            bar.update(1)
            bar.set_postfix(last=f"{row['stream']}/{row['contender']}", refresh=False)
    meta["wall_seconds"] = time.perf_counter() - start
    meta["run_seconds"] = sum(r["wall_seconds"] for r in rows)
    meta["code_versions"] = sorted({r["code_version"] for r in rows})
    rows.sort(key=lambda r: (r["stream"], r["contender"], r["batching"], r["seed"]))
    summary = summarize(rows)
    cells, totals = regret_cells(summary, everyone)
    data: dict[str, Any] = {
        "meta": meta,
        "rows": compact_rows(rows, ROW_KEYS),
        "contenders": [dataclasses.asdict(c) for c in everyone],
        "summary": summary,
        "cells": cells,
        "totals": totals,
    }
    write_json(OUT_JSON, data)
    if not args.no_plot:
        plot(data)
    return data


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sd of accuracy over seeds per (stream, batching, contender)."""
    groups: dict[tuple[str, str, str], list[float]] = {}
    for r in rows:
        groups.setdefault((r["stream"], r["batching"], r["contender"]), []).append(r["accuracy"])
    out = []
    for (stream, batching, contender), accs in sorted(groups.items()):
        mean, sd = mean_std(accs)
        out.append(
            {
                "stream": stream,
                "batching": batching,
                "contender": contender,
                "accuracy": mean,
                "std": sd,
                "n": len(accs),
            }
        )
    return out


def regret_cells(
    summary: list[dict[str, Any]], everyone: Sequence[Contender]
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Per (stream, batching): best fixed setting, each candidate's regret and margins over the
    river learners (points); per candidate: worst regret, cells over :data:`REGRET_LIMIT`, and
    cells below river's LogisticRegression where the old default was at or above it."""
    mean = {(r["stream"], r["batching"], r["contender"]): r["accuracy"] for r in summary}
    grid = [c.name for c in everyone if c.kind == "grid"]
    candidates = [c.name for c in everyone if c.kind == "candidate"]
    old = grid_name(OLD_DEFAULT_MOMENTUM)
    cells = []
    for stream in dict.fromkeys(r["stream"] for r in summary):
        for batching in BATCHINGS:
            fixed = {g: mean[(stream, batching, g)] for g in grid if (stream, batching, g) in mean}
            if not fixed:
                continue
            best_name = max(fixed, key=lambda g: fixed[g])
            cell: dict[str, Any] = {
                "stream": stream,
                "batching": batching,
                "best": fixed[best_name],
                "best_name": best_name,
                "old_default": fixed.get(old),
            }
            for name in RIVER:  # river learns one record at a time: batch 1 for both columns
                cell[name] = mean.get((stream, "1", name))
            for name in candidates:
                acc = mean.get((stream, batching, name))
                if acc is None:
                    continue
                cell[name] = {
                    "accuracy": acc,
                    "regret": 100 * (fixed[best_name] - acc),
                    **{
                        f"minus_{r}": 100 * (acc - cell[r])
                        for r in RIVER
                        if cell.get(r) is not None
                    },
                }
            cells.append(cell)
    totals: dict[str, dict[str, Any]] = {}
    for name in candidates:
        mine = [c for c in cells if name in c]
        if not mine:
            continue
        worst = max(mine, key=lambda c: c[name]["regret"])
        lr = "LogisticRegression"
        lost = [
            c
            for c in mine
            if c.get(lr) is not None
            and c["old_default"] is not None
            and c["old_default"] >= c[lr]
            and c[name]["accuracy"] < c[lr]
        ]
        totals[name] = {
            "cells": len(mine),
            "worst_regret": worst[name]["regret"],
            "worst_cell": f"{worst['stream']} b={worst['batching']}",
            "over_limit": sum(c[name]["regret"] > REGRET_LIMIT for c in mine),
            "below_lr_where_old_default_was_not": len(lost),
            "below_lr_cells": [f"{c['stream']} b={c['batching']}" for c in lost],
        }
    return cells, totals


def plot(data: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = data["cells"]
    streams = list(dict.fromkeys(c["stream"] for c in cells))
    mean = {(r["stream"], r["batching"], r["contender"]): r["accuracy"] for r in data["summary"]}
    names = [c["name"] for c in data["contenders"]]
    kinds = {c["name"]: c["kind"] for c in data["contenders"]}
    markers = {"grid": "o", "candidate": "D", "river": "x"}
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(
        1, len(BATCHINGS), figsize=(max(8, 0.55 * len(streams)) * 2, 4.6), squeeze=False
    )
    for ax, batching in zip(axes[0], BATCHINGS, strict=True):
        best = {c["stream"]: c["best"] for c in cells if c["batching"] == batching}
        for i, name in enumerate(names):
            own = "1" if kinds[name] == "river" else batching
            xs, ys = [], []
            for x, stream in enumerate(streams):
                acc = mean.get((stream, own, name))
                if acc is not None and stream in best:
                    xs.append(x + (i - len(names) / 2) * 0.07)
                    ys.append(100 * (best[stream] - acc))
            ax.scatter(
                xs,
                ys,
                marker=markers[kinds[name]],
                s=36 if kinds[name] == "candidate" else 18,
                color=colors(i % 10),
                label=name,
                zorder=3 if kinds[name] == "candidate" else 2,
            )
        ax.axhline(REGRET_LIMIT, color="grey", lw=0.8, ls="--")
        ax.axhline(0, color="black", lw=0.6)
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xticks(range(len(streams)), streams, rotation=60, ha="right", fontsize=8)
        ax.set_title(f"batch {batching} (river learners at batch 1)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("regret: best fixed momentum - learner, points")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle("Regret against the best fixed ema_batch momentum in hindsight", fontsize=11)
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=100)
    plt.close(fig)


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def _points(value: float | None) -> str:
    if value is None:
        return ""
    text = f"{value:+.2f}"
    return f"**{text}**" if value > REGRET_LIMIT else text


def render(data: dict[str, Any]) -> str:
    """The BENCHMARKS.md section."""
    meta, cells, totals = data["meta"], data["cells"], data["totals"]
    candidates = [c["name"] for c in data["contenders"] if c["kind"] == "candidate"]
    river = [c["name"] for c in data["contenders"] if c["kind"] == "river"]
    overrides = meta.get("contenders", {})
    lines = ["## Tuning: regret against the best fixed setting", "", *meta_lines(meta)]
    lines += [
        "- contenders: the grid of `ema_batch` momenta (one member each; `m=0.002` is the old "
        "default), the candidates "
        + ", ".join(f"`{n}` = `{json.dumps(overrides.get(n, {}))}`" for n in candidates)
        + " (TrainerConfig overrides; `default` = `TrainerConfig()`), and river's "
        + ", ".join(f"`{n}`" for n in river)
        + "; river learners at batch 1 in both columns",
        f"- wall time of this command {meta.get('wall_seconds', 0) / 60:.1f} min on "
        f"{meta.get('workers')} workers (runs found in the cache are read, not rerun), run times "
        f"as recorded {meta.get('run_seconds', 0) / 60:.1f} min in all; stream_trainer source hash "
        + ", ".join(meta.get("code_versions", [])),
        "- cells: prequential accuracy %, mean over seeds; *best fixed*: the grid member with the "
        "highest mean (its momentum); a candidate's **regret** = best fixed - candidate, points "
        f"(**bold** above {REGRET_LIMIT})",
        "",
        "![regret per stream](docs/bench_tuning.png)",
        "",
    ]
    for name in candidates:
        t = totals.get(name)
        if t is None:
            continue
        lines.append(
            f"- `{name}`: worst regret {t['worst_regret']:+.2f} points ({t['worst_cell']}); "
            f"{t['over_limit']} of {t['cells']} cells with regret > {REGRET_LIMIT} points; "
            f"{t['below_lr_where_old_default_was_not']} cells below river's LogisticRegression "
            f"where the old default (`m=0.002`, one member) was at or above it"
            + (f" ({', '.join(t['below_lr_cells'])})" if t["below_lr_cells"] else "")
        )
    lines.append("")
    header = ["stream"]
    for b in BATCHINGS:
        header += [f"b={b} best fixed", *(f"b={b} {n} regret" for n in candidates)]
        header += [f"b={b} {n}" for n in river]
    by_cell = {(c["stream"], c["batching"]): c for c in cells}
    rows = []
    for stream in dict.fromkeys(c["stream"] for c in cells):
        row = [stream]
        for b in BATCHINGS:
            c = by_cell.get((stream, b), {})
            best = f"{_pct(c.get('best'))} ({c['best_name'][2:]})" if c else ""
            row.append(best)
            row += [_points(c[n]["regret"]) if n in c else "" for n in candidates]
            row += [_pct(c.get(n)) for n in river]
        rows.append(row)
    lines += [md_table(header, rows), ""]
    margin_header = ["stream"] + [
        f"b={b} {n} - {r}" for b in BATCHINGS for n in candidates for r in river
    ]
    margins = []
    for stream in dict.fromkeys(c["stream"] for c in cells):
        row = [stream]
        for b in BATCHINGS:
            c = by_cell.get((stream, b), {})
            for n in candidates:
                for r in river:
                    value = c.get(n, {}).get(f"minus_{r}")
                    row.append("" if value is None else f"{value:+.2f}")
        margins.append(row)
    lines += ["Margins over river's learners, points (candidate - river):", ""]
    lines += [md_table(margin_header, margins), ""]
    return "\n".join(lines)
