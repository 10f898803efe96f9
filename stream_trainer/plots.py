"""PNG pictures of a run: the rolling prequential metric and the batch sizes along the stream."""

from __future__ import annotations

from pathlib import Path

from stream_trainer.evaluation import StreamHistory

__all__ = ["plot_history"]


def plot_history(history: StreamHistory, path: str | Path, *, title: str = "") -> Path:
    """Write a two-panel PNG (rolling metric, batch size vs records seen) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True, height_ratios=(3, 1.4))
    top.plot(history.seen, history.rolling, color="tab:blue", lw=1.2)
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
