"""What a run prints and draws: the start line, one line per epoch, ``curves.png``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["epoch_line", "plot_curves"]


def epoch_line(record: Mapping[str, Any], num_epochs: int, splits: Sequence[str]) -> str:
    """The line printed after each epoch, from its ``metrics.jsonl`` record.

    Args:
      record: the epoch's metrics (``epoch``, ``step``, ``train_*``, ``<split>_*``, ...).
      num_epochs: epochs of the run.
      splits: the evaluated splits, e.g. ``["test", "val"]`` (printed in reverse order).

    Example:
      >>> r = {"epoch": 1, "step": 4, "train_loss": 2.0, "train_accuracy": 0.25,
      ...      "test_loss": 1.5, "test_accuracy": 0.5, "total_skipped_steps": 0,
      ...      "skipped_steps": 0, "elapsed_s": 3.0}
      >>> epoch_line(r, 2, ["test"])
      'epoch 1/2 step 4: train loss 2.0000 acc 0.2500 | test loss 1.5000 acc 0.5000 | 3.0 s'
    """
    msg = (f"epoch {record['epoch']}/{num_epochs} step {record['step']}: train loss "
           f"{record['train_loss']:.4f} acc {record['train_accuracy']:.4f}")
    for split in list(splits)[::-1]:
        msg += (f" | {split} loss {record[f'{split}_loss']:.4f} acc "
                f"{record[f'{split}_accuracy']:.4f}")
    if record["total_skipped_steps"]:
        msg += (f" | skipped {record['skipped_steps']} "
                f"(total {record['total_skipped_steps']})")
    return f"{msg} | {record['elapsed_s']:.1f} s"


def plot_curves(records: Sequence[Mapping[str, Any]], path: str, title: str) -> None:
    """Draws loss and accuracy against the step for each split into one PNG.

    Example:
      >>> import os, tempfile
      >>> recs = [{"step": 4, "train_loss": 1.0, "train_accuracy": 0.5, "test_loss": 1.1,
      ...          "test_accuracy": 0.4}]
      >>> with tempfile.TemporaryDirectory() as d:
      ...     plot_curves(recs, os.path.join(d, "curves.png"), "tiny")
      ...     os.path.getsize(os.path.join(d, "curves.png")) > 0
      True
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-"), ("val", ":"), ("test", "--")):
        if records and f"{split}_loss" in records[0]:
            ax_loss.plot(steps, [r[f"{split}_loss"] for r in records], style, label=split)
            ax_acc.plot(steps, [r[f"{split}_accuracy"] for r in records], style, label=split)
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
