"""PNG pictures of a run: the rolling prequential metric and the batch sizes along the stream."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from stream_trainer.evaluation import StreamHistory

__all__ = ["metric_points", "plot_history"]

log = logging.getLogger(__name__)


def metric_points(history: StreamHistory) -> tuple[list[int], list[float]]:
    """The metric's line: ``(records seen, metric)`` of every step with a scored sample."""
    points = [
        (x, y) for x, y in zip(history.seen, history.rolling, strict=True) if not math.isnan(y)
    ]
    return [x for x, _ in points], [y for _, y in points]


def plot_history(history: StreamHistory, path: str | Path, *, title: str = "") -> Path | None:
    """Write a two-panel PNG (rolling metric, batch size vs records seen) and return its path.

    Steps with no sample scored yet (``nan`` in the history) are left out of the metric's line.
    With nothing to draw (a resumed run that found nothing new) no file is written and ``None``
    is returned: an existing plot is kept rather than replaced by empty axes.
    """
    path = Path(path)
    if not history.seen:
        if path.exists():
            log.info("nothing new to plot: kept %s", path)
        else:
            log.info("nothing to plot: %s not written", path)
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True, height_ratios=(3, 1.4))
    top.plot(*metric_points(history), color="tab:blue", lw=1.2)
    top.set_ylabel(history.metric_name.replace("_", " "))
    top.grid(alpha=0.3)
    if title:
        top.set_title(title)
    bottom.scatter(history.seen, history.batch_size, s=2, color="tab:gray")
    bottom.set_yscale("log", base=2)
    bottom.set_ylabel("batch size")
    bottom.set_xlabel("records seen")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
