"""The batch-norm ablation: one config trained with and without batch norm, curves in one PNG.

Command (from the repository root)::

    python -m bnjax_train.compare                                   # configs/default.py (MNIST-1D)
    python -m bnjax_train.compare --config configs/mnist_mlp.py --target 0.98 --workdir runs/cmp_mlp

Each variant trains in its own workdir (``<workdir>/batch`` and ``<workdir>/none``, resumable
like any run of ``train.py``); the figure (``--out``, default ``<workdir>/compare.png``) shows the
test accuracy and the training loss of both against the step, and the table printed (also
written to ``<workdir>/compare.json``) gives each variant's final test accuracy, the first step
at which its test accuracy (evaluated after each epoch) reached 0.90, 0.95 and ``--target``, and
the first at which its training loss (epoch mean) fell to ``--loss_target``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from bnjax_train import run_files

__all__ = ["compare_norms", "plot_comparison", "steps_to_target"]

_VARIANTS = (("batch", "with batch norm"), ("none", "without batch norm"))


def steps_to_target(records: Sequence[Mapping[str, Any]], target: float,
                    key: str = "test_accuracy", *, below: bool = False) -> int | None:
    """First ``step`` whose ``key`` reaches ``target`` (or falls to it), or None if none does.

    Args:
      records: metrics lines (``metrics.jsonl``), in order.
      target: the value to reach.
      key: the metric compared with ``target``.
      below: look for ``key <= target`` (a loss) instead of ``key >= target``.

    Returns:
      The step, or None.

    Example:
      >>> steps_to_target([{"step": 40, "test_accuracy": 0.5},
      ...                  {"step": 80, "test_accuracy": 0.95}], 0.9)
      80
    """
    for r in records:
        v = r.get(key)
        if v is not None and (v <= target if below else v >= target):
            return int(r["step"])
    return None


def _variant_config(config: Any, norm: str) -> Any:
    config = config.copy_and_resolve_references() if hasattr(
        config, "copy_and_resolve_references") else dict(config)
    config.norm = norm
    if "with_bn" in config:
        config.with_bn = norm != "none"
    return config


def _read(path: str) -> list[dict[str, Any]]:
    """The epoch lines of a run's ``metrics.jsonl`` (event lines left out)."""
    with open(path) as f:
        return run_files.epoch_records([json.loads(line) for line in f if line.strip()])


def plot_comparison(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str, *,
                    target: float, title: str = "") -> None:
    """Draws test accuracy and training loss against the step for each run into one PNG.

    Args:
      runs: label -> metrics lines.
      path: output PNG.
      target: accuracy drawn as a dashed line; the first step reaching it is marked.
      title: figure title.

    Example:
      >>> import os, tempfile
      >>> recs = [{"step": 1, "test_accuracy": 0.5, "train_loss": 1.0}]
      >>> with tempfile.TemporaryDirectory() as d:
      ...     plot_comparison({"a": recs}, os.path.join(d, "c.png"), target=0.9)
      ...     os.path.getsize(os.path.join(d, "c.png")) > 0
      True
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, records in runs.items():
        steps = [r["step"] for r in records]
        (line,) = ax_acc.plot(steps, [r["test_accuracy"] for r in records], marker=".",
                              label=label)
        ax_loss.plot(steps, [r["train_loss"] for r in records], marker=".", label=label,
                     color=line.get_color())
        hit = steps_to_target(records, target)
        if hit is not None:
            ax_acc.axvline(hit, color=line.get_color(), alpha=0.4, linestyle=":")
            ax_acc.annotate(f"{hit}", (hit, target), color=line.get_color(),
                            textcoords="offset points", xytext=(3, -12))
    ax_acc.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {target}")
    ax_acc.set(xlabel="step", ylabel="test accuracy (moving statistics)",
               title="test accuracy after each epoch")
    ax_loss.set(xlabel="step", ylabel="training loss (epoch mean)", title="training loss",
                yscale="log")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_norms(config: Any, workdir: str, *, target: float = 0.97,
                  loss_target: float = 0.01, out: str | None = None,
                  ) -> dict[str, dict[str, Any]]:
    """Trains ``config`` with batch norm and without, plots both, reports steps to ``target``.

    Args:
      config: a training config (``configs/*.py``); its ``norm`` (and ``with_bn``, if present)
        is set for each variant.
      workdir: parent folder of the two runs' workdirs (``batch/`` and ``none/``).
      target: test accuracy whose first reaching step is reported (and marked in the figure);
        the steps to 0.90 and 0.95 are reported as well.
      loss_target: training loss whose first reaching step is reported.
      out: the PNG to write; default ``<workdir>/compare.png``.

    Returns:
      ``{"batch": {...}, "none": {...}}`` with ``final_test_accuracy``, ``best_test_accuracy``,
      ``steps_to_accuracy`` (target -> first step, None if never reached),
      ``steps_to_train_loss``, ``steps`` and ``workdir``.

    Example:
      >>> from bnjax_train.config_lib import load_config
      >>> summary = compare_norms(load_config("tiny"), "/tmp/cmp")  # doctest: +SKIP
    """
    from bnjax_train import train

    os.makedirs(workdir, exist_ok=True)
    targets = sorted({0.9, 0.95, float(target)})
    runs: dict[str, list[dict[str, Any]]] = {}
    summary: dict[str, dict[str, Any]] = {}
    for norm, label in _VARIANTS:
        run_dir = os.path.join(workdir, norm)
        print(f"== {label}: {run_dir}", flush=True)
        train.train_and_evaluate(_variant_config(config, norm), run_dir)
        records = _read(os.path.join(run_dir, "metrics.jsonl"))
        runs[label] = records
        summary[norm] = {
            "final_test_accuracy": records[-1]["test_accuracy"],
            "best_test_accuracy": max((r["test_accuracy"] for r in records
                                       if r.get("test_accuracy") is not None), default=None),
            "steps_to_accuracy": {str(t): steps_to_target(records, t) for t in targets},
            "steps_to_train_loss": steps_to_target(records, loss_target, "train_loss",
                                                   below=True),
            "steps": records[-1]["step"],
            "workdir": run_dir,
        }
    out = out or os.path.join(workdir, "compare.png")
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    plot_comparison(runs, out, target=target,
                    title=f"{config.model} on {config.dataset}: batch norm vs none")
    with open(os.path.join(workdir, "compare.json"), "w") as f:
        json.dump({"targets": targets, "loss_target": loss_target, "figure": out, **summary},
                  f, indent=2)

    def fmt(step: int | None) -> str:
        return "not reached" if step is None else str(step)

    print("\n| variant | final test accuracy | best | "
          + " | ".join(f"steps to test acc {t:g}" for t in targets)
          + f" | steps to train loss {loss_target:g} |")
    print("|---|---|---|" + "---|" * (len(targets) + 1))
    for norm, label in _VARIANTS:
        s = summary[norm]
        print(f"| {label} | {s['final_test_accuracy']:.4f} | {s['best_test_accuracy']:.4f} | "
              + " | ".join(fmt(s["steps_to_accuracy"][str(t)]) for t in targets)
              + f" | {fmt(s['steps_to_train_loss'])} |")
    print(f"\nFigure: {out}")
    return summary


def _main(argv: Sequence[str]) -> None:
    from absl import flags, logging

    from bnjax_train import input_pipeline, train

    del argv
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    try:
        compare_norms(f.config, f.workdir, target=f.target, loss_target=f.loss_target,
                      out=f.out)
    except (ValueError, input_pipeline.DatasetNotFoundError, train.NonFiniteTrainingError) as e:
        print(f"bnjax_train.compare: error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Command line: ``python -m bnjax_train.compare [--config FILE] [--workdir DIR] ...``."""
    from absl import app, flags
    from ml_collections import config_flags

    from bnjax_train.config_lib import CONFIG_DIR

    config_flags.DEFINE_config_file(
        "config", str(CONFIG_DIR / "default.py"),
        "Training config; its norm is switched between 'batch' and 'none'.", lock_config=True)
    flags.DEFINE_string("workdir", os.path.join("runs", "compare"),
                        "Parent folder of the two runs.")
    flags.DEFINE_float("target", 0.97, "Test accuracy whose first reaching step is reported "
                       "and marked (steps to 0.90 and 0.95 are reported too).")
    flags.DEFINE_float("loss_target", 0.01,
                       "Training loss whose first reaching step is reported.")
    flags.DEFINE_string("out", None, "Output PNG (default <workdir>/compare.png).")
    app.run(_main)


if __name__ == "__main__":
    main()
