"""What a run prints and draws: where it resumes, one line per epoch, how it ends, ``curves.png``.

Every metric may be None (``null`` in ``metrics.jsonl``): a mean over no steps (every step of
the epoch was skipped as non-finite) or a non-finite value; it prints as ``n/a``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["checkpoint_warning", "epoch_line", "final_line", "finished_line", "plot_curves",
           "resume_line", "run_title", "stopped_line"]


#: Curves with at most this many points get a marker at each.
_MARKERS_UP_TO = 50


def _num(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


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
           f"{_num(record['train_loss'])} acc {_num(record['train_accuracy'])}")
    for split in list(splits)[::-1]:
        msg += (f" | {split} loss {_num(record[f'{split}_loss'])} acc "
                f"{_num(record[f'{split}_accuracy'])}")
    if record["total_skipped_steps"]:
        ran = "" if record["train_loss"] is not None else ", every step of the epoch"
        msg += (f" | skipped {record['skipped_steps']}{ran} (total "
                f"{record['total_skipped_steps']}; train means over the steps that ran)")
    return f"{msg} | {record['elapsed_s']:.1f} s"


def resume_line(where: str, step: int, epoch: int, batch: int, num_epochs: int,
                steps_per_epoch: int) -> str:
    """The line printed when a run resumes (``epoch`` 0-based, as in ``LoopState``).

    Example:
      >>> resume_line("runs/x/checkpoints/6", 6, 1, 2, 2, 4)
      'Resuming from runs/x/checkpoints/6 at step 6: epoch 2 of 2, batch 3 of 4 next'
    """
    return (f"Resuming from {where} at step {step}: epoch {epoch + 1} of {num_epochs}, "
            f"batch {batch + 1} of {steps_per_epoch} next")


def checkpoint_warning(skipped: Sequence[tuple[int, str]], resumed: int,
                       moved: Sequence[str]) -> str:
    """The warning printed when the newest checkpoints were damaged and skipped.

    Example:
      >>> checkpoint_warning([(8, "its step array says 7, its folder 8")], 4, [])
      'warning: skipped checkpoint 8 (its step array says 7, its folder 8); resuming from 4'
    """
    text = "; ".join(f"checkpoint {step} ({why})" for step, why in skipped)
    where = f"; moved to {', '.join(moved)}" if moved else ""
    return f"warning: skipped {text}; resuming from {resumed}{where}"


def final_line(result: Mapping[str, Any], seconds: float, workdir: str) -> str:
    """The last line of a run that trained to the end.

    Example:
      >>> print(final_line({"test_accuracy": 0.5, "test_loss": 1.25, "step": 8}, 3.0, "runs/x"))
      Final test accuracy: 0.5000 (test loss 1.2500) after 8 steps; 3.0 s in this process;
      outputs in runs/x
    """
    return (f"Final test accuracy: {_num(result['test_accuracy'])} (test loss "
            f"{_num(result['test_loss'])}) after {result['step']} steps; {seconds:.1f} s in "
            f"this process; outputs in {workdir}")


def finished_line(result: Mapping[str, Any], workdir: str, applying: str = "") -> str:
    """What a finished run prints when it is run again.

    ``applying`` names the inference tools the config asks for (``"PreciseBN and the folded
    export"``), which then run on the final checkpoint; without them there is nothing to do.

    Example:
      >>> print(finished_line({"test_accuracy": 0.5, "test_loss": 1.25, "step": 8, "epoch": 2},
      ...                     "runs/x"))  # doctest: +NORMALIZE_WHITESPACE
      Finished run in runs/x: final test accuracy 0.5000 (test loss 1.2500) after 8 steps,
      2 epochs; nothing to do (a larger --config.num_epochs trains on)
      >>> print(finished_line({"test_accuracy": 0.5, "test_loss": 1.25, "step": 8, "epoch": 2},
      ...                     "runs/x", "the folded export"))  # doctest: +NORMALIZE_WHITESPACE
      Finished run in runs/x: final test accuracy 0.5000 (test loss 1.2500) after 8 steps,
      2 epochs; applying the folded export to its final checkpoint
    """
    then = (f"applying {applying} to its final checkpoint" if applying else
            "nothing to do (a larger --config.num_epochs trains on)")
    return (f"Finished run in {workdir}: final test accuracy "
            f"{_num(result.get('test_accuracy'))} (test loss {_num(result.get('test_loss'))}) "
            f"after {result['step']} steps, {result['epoch']} epochs; {then}")


def stopped_line(step: int, signal_name: str | None, saved: bool) -> str:
    """The one line a run stopped early prints: by a signal, or by ``stop_after_steps``.

    Example:
      >>> stopped_line(6, "SIGINT", True)
      'interrupted at step 6; saved; run the same command to resume'
      >>> stopped_line(3, None, True)
      'Stopped after step 3 (config.stop_after_steps); run the same command again to resume.'
    """
    if signal_name is None:
        return (f"Stopped after step {step} (config.stop_after_steps); run the same command "
                "again to resume.")
    what = "saved" if saved else "nothing new to save"
    return f"interrupted at step {step}; {what}; run the same command to resume"


def run_title(config: Any) -> str:
    """``MODEL (norm=NORM) on DATASET``: what a run trains.

    Example:
      >>> run_title({"model": "mlp", "norm": "batch", "with_bn": False, "dataset": "mnist1d"})
      'mlp (norm=none) on mnist1d'
    """
    norm = "none" if config.get("with_bn", True) is False else config["norm"]
    return f"{config['model']} (norm={norm}) on {config['dataset']}"


def plot_curves(records: Sequence[Mapping[str, Any]], path: str, title: str) -> None:
    """Draws loss and accuracy against the step for each split into one PNG.

    Steps are integers on the axis, and each point has a marker while there are few (a short
    run's curve is a handful of points). The file is replaced atomically: a run stopped while
    drawing keeps the previous figure.

    Example:
      >>> import os, tempfile
      >>> recs = [{"step": 4, "train_loss": 1.0, "train_accuracy": 0.5, "test_loss": 1.1,
      ...          "test_accuracy": 0.4}]
      >>> with tempfile.TemporaryDirectory() as d:
      ...     plot_curves(recs, os.path.join(d, "curves.png"), "tiny")
      ...     sorted(os.listdir(d)), os.path.getsize(os.path.join(d, "curves.png")) > 0
      (['curves.png'], True)
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = [r["step"] for r in records]
    marker = "o" if len(records) <= _MARKERS_UP_TO else None
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-"), ("val", ":"), ("test", "--")):
        if records and f"{split}_loss" in records[0]:
            for ax, metric in ((ax_loss, "loss"), (ax_acc, "accuracy")):
                ax.plot(steps, [r[f"{split}_{metric}"] for r in records], style,
                        marker=marker, label=split)
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
