"""Smoke test of the bench tooling on tiny inputs (results go to a temporary directory)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

bench_common = pytest.importorskip("bench._common")


@pytest.fixture
def tmp_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every bench module's outputs at ``tmp_path``."""
    import bench.accuracy
    import bench.gap
    import bench.norm_time
    import bench.report
    import bench.throughput

    monkeypatch.setattr(bench.accuracy, "RAW", tmp_path / "raw")  # read when tasks are made
    monkeypatch.setattr(bench.accuracy, "OUT_JSON", tmp_path / "accuracy.json")
    monkeypatch.setattr(bench.accuracy, "PLOT", tmp_path / "accuracy.png")
    for mod, name in (
        (bench.gap, "gap"),
        (bench.norm_time, "norm_time"),
        (bench.throughput, "throughput"),
    ):
        monkeypatch.setattr(mod, "OUT_JSON", tmp_path / f"{name}.json")
        monkeypatch.setattr(mod, "PLOT", tmp_path / f"{name}.png")
    monkeypatch.setattr(bench.report, "RESULTS", tmp_path)
    return tmp_path


def _args(module: object, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)  # type: ignore[attr-defined]
    return parser.parse_args(argv)


def test_accuracy_runs_caches_and_renders(tmp_results: Path) -> None:
    import bench.accuracy as acc

    argv = [
        "--streams",
        "phishing",
        "--norms",
        "batch,layer",
        "--sizes",
        "1,1:64",
        "--seeds",
        "0",
        "--limit",
        "40",
        "--workers",
        "1",
    ]
    data = acc.run(_args(acc, argv), argv)
    assert {(r["norm"], r["size"]) for r in data["summary"]} == {
        ("batch", "1"),
        ("batch", "1:64"),
        ("layer", "1"),
        ("layer", "1:64"),
    }
    assert all(0 <= r["accuracy"] <= 1 for r in data["rows"])
    assert len(list((tmp_results / "raw" / "accuracy").glob("*.json"))) == 4
    assert (tmp_results / "accuracy.png").stat().st_size > 0
    text = acc.render(json.loads((tmp_results / "accuracy.json").read_text()))
    assert "phishing" in text and "b=1:64" in text and "machine" in text


def test_gap_and_report(tmp_results: Path) -> None:
    import bench.gap as gap
    import bench.report as report

    argv = [
        "--streams",
        "bananas",
        "--norms",
        "batch,layer",
        "--sizes",
        "64",
        "--seeds",
        "0",
        "--train",
        "130",
        "--serve",
        "70",
        "--workers",
        "1",
        "--no-plot",
    ]
    data = gap.run(_args(gap, argv), argv)
    by_norm = {r["norm"]: r for r in data["summary"]}
    assert by_norm["layer"]["output_gap_l1"] == pytest.approx(0.0, abs=1e-6)
    assert by_norm["batch"]["output_gap_l1"] > 0
    out = report.write_report(tmp_results / "BENCHMARKS.md")
    text = out.read_text()
    assert "## Train/serve gap" in text and "python -m bench accuracy" in text


def test_throughput_quick_without_deep_river(tmp_results: Path) -> None:
    import bench.throughput as tp

    argv = ["--quick", "--no-deep-river", "--no-plot"]
    data = tp.run(_args(tp, argv), argv)
    rows = data["rows"]
    assert {(r["group"], r["contender"], r["size"]) for r in rows} == {
        *(("steady", name, size) for name in (tp.OURS, tp.OURS_ONE, tp.PLAIN, tp.PLAIN_LAYER_NORM)
          for size in (1, 64)),
        ("steady", tp.RIVER_LR, 1),
        ("command", tp.OURS_COMMAND, 1),
        ("command", tp.OURS_COMMAND, 64),
        ("contention", tp.IDLE, 64),
        ("contention", tp.BUSY, 64),
    }  # fmt: skip
    assert all(r["samples_per_second"] > 0 and len(r["all"]) == 1 for r in rows)
    command = next(r for r in rows if r["group"] == "command")
    assert command["samples_per_second"] == pytest.approx(300 / command["seconds"])
    text = tp.render(data)
    assert "| plain nn.Sequential loop, LayerNorm |" in text and "idle ÷ busy" in text
    assert "target default (its members) ÷ one member, step time at batch 1 ≤ 1.5" in text
    assert f"| {tp.DEEP_RIVER} |" not in text and f"| {tp.DEEP_RIVER_SCRIPT} |" not in text


def test_norm_time_tiny(tmp_results: Path) -> None:
    import bench.norm_time as nt

    argv = ["--norms", "ema_batch", "--sizes", "1,8", "--steps", "3", "--repeats", "1", "--no-plot"]
    data = nt.run(_args(nt, argv), argv)
    assert all(0 < s["share"] <= 1 for s in data["shares"])
    assert any(m["layer"] == "torch:BatchNorm1d" and m["us"] is None for m in data["micro"])
    assert "BatchNorm1d" in nt.render(data)


def test_cli_lists_benches() -> None:
    from stream_trainer.cli import build_parser

    args = build_parser().parse_args(["bench", "report"])
    assert args.name == "report"


def test_sweep_tiny(tmp_results: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.sweep as sweep

    monkeypatch.setattr(sweep, "RAW", tmp_results / "raw")
    monkeypatch.setattr(sweep, "OUT_JSON", tmp_results / "sweep.json")
    argv = [
        "--streams",
        "phishing",
        "--norms",
        "layer",
        "--lrs",
        "0.01",
        "--widths",
        "8",
        "--seeds",
        "0",
        "--limit",
        "40",
        "--workers",
        "1",
        "--no-plot",
    ]
    data = sweep.run(_args(sweep, argv), argv)
    assert data["summary"][0]["width"] == 8 and data["summary"][0]["lr"] == 0.01
    assert "| `layer` | 1:64 | 0.01 | 8 |" in sweep.render(data)


def test_engine_bench_tiny(tmp_path: Path) -> None:
    import bench.bench_engine as be

    out = tmp_path / "engine.md"
    argv = ["--records", "200", "--sizes", "1,8", "--repeats", "1", "--member-steps", "12"]
    assert be.main([*argv, "--cache-runs", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| 8 |" in text and "| 64 |" in text and "K = 4 ÷ K = 1" in text
    assert "with an empty numba cache" in text
    assert be.trainer_rate(be._records(100), 4, "torch") > 0


def test_predict_load_tiny(tmp_path: Path) -> None:
    """The /predict load test end to end at a small scale: a service process, an open-loop
    load, every request answered, the figures in the table."""
    import bench.bench_predict as bp

    out = tmp_path / "predict.md"
    # batch size 1 and 200,000 rows: the service is still training when both phases end
    argv = ["--seconds", "1", "--rate", "40", "--records", "200000", "--clients", "2"]
    argv += ["--batch-sizes", "1"]
    assert bp.main([*argv, "--out", str(out)]) == 0
    text = out.read_text()
    assert "| 40 | 40 | 40 |" in text and "statuses {200: 40}" in text
    assert bp.percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert bp.percentile([float(i) for i in range(1, 101)], 0.99) == 99.0


def test_baselines_tiny(tmp_path: Path) -> None:
    import bench.bench_baselines as bl

    out = tmp_path / "baselines.md"
    argv = ["--streams", "Phishing", "--sizes", "4", "--limit", "60", "--workers", "1"]
    assert bl.main([*argv, "--out", str(out)]) == 0
    text = out.read_text()
    assert "| Phishing | 4 |" in text and "cells (the MLP alone:" in text and "Wall time" in text
    assert "| ARF |" in text and "seed 0 " in text
    ours, seconds = bl.accuracy("river:Phishing", 60, "4", "mlp")
    assert 0.0 < ours <= 1.0 and seconds > 0
    assert bl.main([*argv, "--no-arf", "--seed", "2", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| ARF |" not in text and "seed 2 " in text and "| MLP alone |" in text
    with pytest.raises(SystemExit):
        bl.main(["--streams", "Nope"])


def test_delayed_labels_tiny(tmp_path: Path) -> None:
    import bench.bench_delayed_labels as dl
    import bench.report as report

    inline, delayed = dl.batches(300, 4, 8, "1:16", 0)
    assert [len(b) for b in inline] == [
        sum("id" in v and "f0" in v for v in b) for b in delayed[: len(inline)]
    ]
    labels = [v for b in delayed for v in b if "y" in v]
    assert sorted(v["id"] for v in labels) == list(range(300))
    out = tmp_path / "delayed_labels.md"
    argv = ["--records", "300", "--features", "4", "--repeats", "1", "--out", str(out)]
    assert dl.main(argv) == 0
    text = out.read_text()
    assert "`python bench/bench_delayed_labels.py --records 300 --features 4 --repeats 1`" in text
    rows = report._delayed_labels(tmp_path)
    assert rows and rows[0][0].startswith("delayed-label service") and rows[0][2] == "≥ 0.8"
    assert float(rows[0][1].split()[0]) > 0


def test_report_reproduces_committed_benchmarks() -> None:
    """BENCHMARKS.md is generated only: `python -m bench report` rebuilds it byte for byte."""
    import bench.report as report

    committed = report.OUTPUT.read_text()
    assert report.build_report() == committed, "stale BENCHMARKS.md: run `python -m bench report`"
    assert "## Summary" in committed and "bench/results/reading.md" not in committed


def test_summary_computes_ratios_from_result_files(tmp_path: Path) -> None:
    import bench.report as report
    import bench.throughput as tp

    assert "No results yet" in report.summary(tmp_path)
    meta = {"command": "python -m bench throughput"}
    rows = [
        {"group": "steady", "contender": tp.OURS, "size": 1, "samples_per_second": 300.0},
        {"group": "steady", "contender": tp.DEEP_RIVER, "size": 1, "samples_per_second": 100.0},
        {"group": "steady", "contender": tp.OURS, "size": 64, "samples_per_second": 900.0},
        {"group": "steady", "contender": tp.PLAIN, "size": 64, "samples_per_second": 1000.0},
        {"group": "contention", "contender": tp.IDLE, "size": 64, "samples_per_second": 500.0},
        {"group": "contention", "contender": tp.BUSY, "size": 64, "samples_per_second": 400.0},
        {"group": "steady", "contender": tp.OURS_ONE, "size": 1, "samples_per_second": 420.0},
    ]
    (tmp_path / "throughput.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    (tmp_path / "kafka.md").write_text(
        "# Kafka\n\n- command: `python bench/bench_kafka.py --records 10`\n\n"
        "| max_batch_records | e2e | consumer process / bound |\n|---:|---:|---:|\n"
        "| 8 | 1 | 0.50 (0.4-0.6) |\n| 64 | 2 | 0.81 (0.79-0.85) |\n"
    )
    text = report.summary(tmp_path)
    command = "`python -m bench throughput`"
    assert (
        f"| trainer ÷ deep-river, samples/s at batch 1, steady | 3.00 | ≥ 10 | {command} |" in text
    )
    assert "| trainer ÷ plain loop without norm, samples/s at batch 64 | 0.90 | ≥ 1.5 |" in text
    assert (
        "| width 128 at batch 64: idle ÷ beside one busy process, samples/s | 1.25 | ≤ 1.3 |"
        in text
    )
    assert "| default (its members) ÷ one member, step time at batch 1 | 1.40 | ≤ 1.5 |" in text
    assert "LayerNorm" not in text  # not measured: no row
    assert "| 0.81 (0.79-0.85) | ≥ 0.8 | `python bench/bench_kafka.py --records 10` |" in text


def test_tuning_regret_from_rows_cached_and_resumable(
    tmp_results: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bench.tuning as tuning

    monkeypatch.setattr(tuning, "RAW", tmp_results / "raw")
    monkeypatch.setattr(tuning, "OUT_JSON", tmp_results / "tuning.json")
    monkeypatch.setattr(tuning, "PLOT", tmp_results / "tuning.png")
    argv = [
        "--streams",
        "phishing,sea_recurring",
        "--grid",
        "0.002,0.03",
        "--candidates",
        'wide={"hidden": [16, 16]}',
        "--seeds",
        "0",
        "--limit",
        "300",
        "--workers",
        "1",
    ]
    data = tuning.run(_args(tuning, argv), argv)
    raw = sorted((tmp_results / "raw" / "tuning").glob("*.json"))
    # 2 streams x (2 grid + default + wide) x 2 batchings, + LR and ARF at batch 1
    assert len(data["rows"]) == len(raw) == 2 * (4 * 2 + 2)
    assert {r["limit"] for r in data["rows"]} == {300}
    sources = {json.loads(p.read_text())["source"] for p in raw}
    assert "synth:sea_switch?concepts=0-3-0-3-0&period=1000&width=1&noise=0.1&seed=0" in sources
    acc = {(r["stream"], r["batching"], r["contender"]): r["accuracy"] for r in data["rows"]}
    for cell in data["cells"]:
        s, b = cell["stream"], cell["batching"]
        fixed = {g: acc[(s, b, g)] for g in ("m=0.002", "m=0.03")}
        best = max(fixed.values())
        assert cell["best"] == pytest.approx(best, abs=1e-4)
        assert fixed[cell["best_name"]] == max(fixed.values())
        for name in ("default", "wide"):
            assert cell[name]["regret"] == pytest.approx(100 * (best - acc[(s, b, name)]), abs=0.02)
            lr, arf = acc[(s, "1", "LogisticRegression")], acc[(s, "1", "ARF")]
            assert cell[name]["minus_LogisticRegression"] == pytest.approx(
                100 * (acc[(s, b, name)] - lr), abs=0.02
            )
            assert cell[name]["minus_ARF"] == pytest.approx(
                100 * (acc[(s, b, name)] - arf), abs=0.02
            )
    worst = max(c["default"]["regret"] for c in data["cells"])
    assert data["totals"]["default"]["worst_regret"] == worst
    assert data["totals"]["default"]["cells"] == 4
    text = tuning.render(json.loads((tmp_results / "tuning.json").read_text()))
    assert "b=1:64 default regret" in text and "river learners at batch 1 in both columns" in text
    assert (tmp_results / "tuning.png").stat().st_size > 0

    # A rerun reads every run from the cache: a doctored cached accuracy shows up in the result.
    doctored = next(
        p
        for p in raw
        if (lambda r: (r["stream"], r["contender"], r["batching"]))(json.loads(p.read_text()))
        == ("phishing", "default", "1")
    )
    row = json.loads(doctored.read_text())
    row["accuracy"] = 0.0
    doctored.write_text(json.dumps(row))
    gone = next(p for p in raw if p != doctored)
    gone.unlink()
    again = tuning.run(_args(tuning, argv), argv)
    assert gone.exists() and len(list((tmp_results / "raw" / "tuning").glob("*.json"))) == len(raw)
    cell = next(c for c in again["cells"] if (c["stream"], c["batching"]) == ("phishing", "1"))
    assert cell["default"]["regret"] == pytest.approx(100 * cell["best"], abs=0.02)
    assert again["totals"]["default"]["worst_regret"] == pytest.approx(100 * cell["best"], abs=0.02)


def test_tuning_regret_cells_and_totals() -> None:
    from bench.tuning import Contender, regret_cells

    everyone = [
        Contender("m=0.002", "grid"),
        Contender("m=0.03", "grid"),
        Contender("default", "candidate"),
        Contender("LogisticRegression", "river"),
    ]
    summary = [
        {"stream": "s", "batching": "1", "contender": "m=0.002", "accuracy": 0.86},
        {"stream": "s", "batching": "1", "contender": "m=0.03", "accuracy": 0.90},
        {"stream": "s", "batching": "1", "contender": "default", "accuracy": 0.84},
        {"stream": "s", "batching": "1:64", "contender": "m=0.002", "accuracy": 0.80},
        {"stream": "s", "batching": "1:64", "contender": "m=0.03", "accuracy": 0.78},
        {"stream": "s", "batching": "1:64", "contender": "default", "accuracy": 0.81},
        {"stream": "s", "batching": "1", "contender": "LogisticRegression", "accuracy": 0.85},
    ]
    cells, totals = regret_cells(summary, everyone)
    one, many = cells
    assert (one["best_name"], many["best_name"]) == ("m=0.03", "m=0.002")
    assert one["default"]["regret"] == pytest.approx(6.0)
    assert many["default"]["regret"] == pytest.approx(-1.0)
    # river's batch-1 accuracy stands in the 1:64 column too
    assert many["default"]["minus_LogisticRegression"] == pytest.approx(-4.0)
    t = totals["default"]
    assert t["worst_regret"] == pytest.approx(6.0) and t["over_limit"] == 1
    # b=1: the old default (0.86) was above LR (0.85), the candidate (0.84) is under it;
    # b=1:64: the old default (0.80) was already under LR, so that cell does not count
    assert t["below_lr_where_old_default_was_not"] == 1 and t["below_lr_cells"] == ["s b=1"]


def test_tuning_candidates_are_checked() -> None:
    import bench.tuning as tuning

    argv = ["--candidates", 'bad={"no_such_setting": 1}']
    with pytest.raises(SystemExit, match="no_such_setting"):
        tuning.contenders(_args(tuning, argv))
    with pytest.raises(SystemExit):
        _args(tuning, ["--candidates", "x=[1]"])
    args = _args(tuning, ["--candidates", 'w={"hidden": [8, 8]}', "--grid", "0.01"])
    names = [c.name for c in tuning.contenders(args)]
    assert names == ["m=0.01", "default", "w", "LogisticRegression", "ARF"]
    config = tuning.trainer_config(tuning.contenders(args)[2].overrides, "y", 3)
    assert config.hidden == (8, 8) and config.seed == 3 and config.target == "y"
    # a grid setting is one member with that momentum, whatever the default members are
    grid = tuning.trainer_config(tuning.contenders(args)[0].overrides, "y", 3)
    assert grid.member_norm_options() == [{**grid.norm_options, "ema_batch": {"momentum": 0.01}}]
