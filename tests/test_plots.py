"""Plots of a run: steps before any sample was scored are not drawn as a metric of 0, and a run
with nothing new to draw keeps the plot that exists."""

from __future__ import annotations

import math
from pathlib import Path

from stream_trainer.cli import main
from stream_trainer.evaluation import StreamHistory
from stream_trainer.plots import metric_points, plot_history

PNG = b"\x89PNG\r\n\x1a\n"


def test_unscored_steps_are_nan_and_left_out_of_the_line():
    history = StreamHistory()
    empty = {"accuracy": 0.0, "rolling_accuracy": 0.0, "log_loss": 0.0, "kappa": 0.0}
    history.add(1, 1, empty, scored=0)  # a new model's first batch: no prediction
    history.add(9, 8, empty, scored=0)
    history.add(17, 8, {"rolling_accuracy": 0.75}, scored=8)
    history.add(18, 1, {"rolling_accuracy": 0.0}, scored=9)  # a real 0 stays
    assert math.isnan(history.rolling[0]) and math.isnan(history.rolling[1])
    assert metric_points(history) == ([17, 18], [0.75, 0.0])
    assert history.batch_size == [1, 8, 8, 1]  # batch sizes are drawn for every step


def test_an_empty_history_writes_nothing_and_keeps_an_existing_plot(tmp_path: Path):
    path = tmp_path / "run.png"
    assert plot_history(StreamHistory(), path) is None
    assert not path.exists()
    history = StreamHistory()
    history.add(1, 1, {"rolling_accuracy": 0.5}, scored=1)
    assert plot_history(history, path) == path
    drawn = path.read_bytes()
    assert drawn[:8] == PNG
    assert plot_history(StreamHistory(), path) is None
    assert path.read_bytes() == drawn


def test_a_resumed_run_with_nothing_new_keeps_its_plot(tmp_path: Path, capsys):
    source = tmp_path / "stream.csv"
    rows = [
        f"{(i * 37 % 101) / 50 - 1:.3f},{(i * 53 % 97) / 48 - 1:.3f},{i % 2}" for i in range(200)
    ]
    source.write_text("x1,x2,y\n" + "\n".join(rows) + "\n")
    plot = tmp_path / "run.png"
    argv = [
        "run", "--source", str(source), "--target", "y",
        "--checkpoint", f"file://{tmp_path / 'ck'}", "--plot", str(plot),
        "--metrics-address", "off", "--hidden", "8", "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    assert "samples=200" in capsys.readouterr().out
    drawn = plot.read_bytes()
    assert drawn[:8] == PNG
    assert main(argv) == 0  # resumes at the end of the file: nothing new
    assert "samples=200" in capsys.readouterr().out
    assert plot.read_bytes() == drawn
