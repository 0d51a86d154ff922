"""One PNG figure per study, drawn from its results JSON (matplotlib, Agg backend).

Means over the seeds, with error bars or bands of one sample standard deviation.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from bnjax_train.studies import metrics
from bnjax_train.studies.report_landscape import regularization_label, shift_label
from bnjax_train.studies.summary import finals, label, reached, select

__all__ = ["plot_study"]

Data = Mapping[str, Any]


def _stats(values: Sequence[float]) -> tuple[float, float]:
    return metrics.mean_std(values) if len(values) else (float("nan"), float("nan"))


def _curves(ax: Any, groups: Sequence[tuple[str, Sequence[Mapping[str, Any]]]],
            key: str = "test_accuracy", style: str = "-", color: str | None = None) -> None:
    for name, runs in groups:
        y = np.array([[np.nan if v is None else v for v in r[key]] for r in runs], np.float64)
        x = np.arange(1, y.shape[1] + 1)
        m = y.mean(axis=0)
        s = y.std(axis=0, ddof=1) if len(y) > 1 else np.zeros_like(m)
        line, = ax.plot(x, m, style, label=name, color=color)
        ax.fill_between(x, m - s, m + s, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.legend(fontsize=8)


def _learning_rate(data: Data, axes: Any) -> None:
    s, res = data["meta"]["settings"], data["results"]
    lrs = s["learning_rates"]
    for i, n in enumerate(s["norms"]):
        runs = [select(res["runs"], norm=n, learning_rate=lr) for lr in lrs]
        acc = np.array([_stats(finals(r)) for r in runs])
        axes[0].errorbar(lrs, acc[:, 0], acc[:, 1], marker="o", capsize=3, color=f"C{i}",
                         label=label({"norm": n}))
        for target, style in zip(s["targets"], ("-", "--", ":"), strict=False):
            steps = np.array([_stats(reached(r, target, res["steps_per_epoch"]))
                              for r in runs])
            axes[1].errorbar(lrs, steps[:, 0], steps[:, 1], marker="o", capsize=3, ls=style,
                             color=f"C{i}", label=f"{label({'norm': n})}, to {target}")
    for ax, what in zip(axes, ("final test accuracy", "steps to the target (runs reaching)"),
                        strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel(what)
        ax.legend(fontsize=8)


def _placement(data: Data, axes: Any) -> None:
    runs = data["results"]["runs"]
    groups = [(label(c), select(runs, **c)) for c in data["meta"]["settings"]["configs"]]
    _curves(axes[0], groups)
    axes[0].set_ylabel("test accuracy")
    _curves(axes[1], groups, key="train_loss")
    axes[1].set_ylabel("training loss")
    axes[1].set_yscale("log")


def _dropout(data: Data, axes: Any) -> None:
    _placement(data, axes[:2])
    runs = data["results"]["runs"]
    configs = data["meta"]["settings"]["configs"]
    gaps = [_stats([r["train_accuracy"] - r["test_accuracy"][-1] for r in select(runs, **c)])
            for c in configs]
    axes[2].bar(range(len(configs)), [g[0] for g in gaps], yerr=[g[1] for g in gaps], capsize=3)
    axes[2].set_xticks(range(len(configs)), [label(c) for c in configs], rotation=20, fontsize=8)
    axes[2].set_ylabel("train - test accuracy")


def _batch_size(data: Data, axes: Any) -> None:
    s, runs = data["meta"]["settings"], data["results"]["runs"]
    for n in s["norms"]:
        sizes = [b for b in s["batch_sizes"] if select(runs, norm=n, batch_size=b)]
        acc = np.array([_stats(finals(select(runs, norm=n, batch_size=b))) for b in sizes])
        axes[0].errorbar(sizes, acc[:, 0], acc[:, 1], marker="o", capsize=3,
                         label=label({"norm": n}))
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("batch size")
    axes[0].set_ylabel("final test accuracy")
    axes[0].legend(fontsize=8)


def _momentum(data: Data, axes: Any) -> None:
    runs = data["results"]["runs"]
    for i, m in enumerate(data["meta"]["settings"]["momenta"]):
        for key, style, what in (("test_accuracy", "-", "moving"),
                                 ("test_accuracy_precise", "--", "PreciseBN")):
            _curves(axes[0], [(f"momentum {m:g}, {what}", select(runs, momentum=m))], key=key,
                    style=style, color=f"C{i}")
    axes[0].set_ylabel("test accuracy")


def _mcbn(data: Data, axes: Any) -> None:
    s, ev = data["meta"]["settings"], data["results"]["evaluations"]
    sizes = s["mc_batch_sizes"]
    plain = select(ev, inference="plain")
    panels = ((("auroc_entropy", "entropy"), ("auroc_mutual_information", "mutual information")),
              (("nll", "NLL"),), (("ece", "ECE"),))
    for ax, keys, what in zip(axes, panels, ("OOD AUROC", "test NLL", "test ECE"), strict=True):
        for i, (k, name) in enumerate(keys):
            vals = np.array([_stats([e[k] for e in select(ev, inference="mcbn",
                                                          mc_batch_size=b)]) for b in sizes])
            ax.errorbar(sizes, vals[:, 0], vals[:, 1], marker="o", capsize=3, color=f"C{i}",
                        label=f"MCBN, {name}")
            if k in plain[0]:
                ax.axhline(_stats([e[k] for e in plain])[0], ls="--", color=f"C{i}",
                           label=f"plain inference, {name}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("MC batch size")
        ax.set_ylabel(what)
        ax.legend(fontsize=8)


def _probe_curves(keys: Sequence[tuple[str, str, bool]]) -> Callable[[Data, Any], None]:
    """A figure of one panel per probe curve ``(key, y label, log scale)`` of each network."""

    def draw(data: Data, axes: Any) -> None:
        runs = data["results"]["runs"]
        groups = [(shift_label(c), [r for r in runs if r["config"] == c])
                  for c in data["meta"]["settings"]["configs"]]
        for ax, (key, what, log) in zip(axes, keys, strict=True):
            _curves(ax, groups, key=key)
            ax.set_ylabel(what)
            if log:
                ax.set_yscale("log")

    return draw


def _regularization(data: Data, axes: Any) -> None:
    runs, configs = data["results"]["runs"], data["meta"]["settings"]["configs"]
    _curves(axes[0], [(regularization_label(c), select(runs, **c)) for c in configs])
    axes[0].set_ylabel("test accuracy")
    gaps = [_stats([r["train_accuracy"] - r["test_accuracy"][-1] for r in select(runs, **c)])
            for c in configs]
    axes[1].bar(range(len(configs)), [g[0] for g in gaps], yerr=[g[1] for g in gaps], capsize=3)
    axes[1].set_xticks(range(len(configs)), [regularization_label(c) for c in configs],
                       rotation=20, fontsize=8)
    axes[1].set_ylabel("train - test accuracy")


_PLOTS: dict[str, tuple[int, Callable[[Data, Any], None]]] = {
    "learning_rate": (2, _learning_rate), "placement": (2, _placement), "dropout": (3, _dropout),
    "batch_size": (1, _batch_size), "momentum": (1, _momentum), "mcbn": (3, _mcbn),
    "covariate_shift": (3, _probe_curves((("test_accuracy", "test accuracy", False),
                                          ("feature_shift", "feature shift per epoch", True),
                                          ("gradient_change", "gradient change (relative)",
                                           True)))),
    "smoothness": (3, _probe_curves((("loss_range", "loss range along the gradient", True),
                                     ("gradient_change", "largest gradient change", True),
                                     ("beta", "effective beta-smoothness", True)))),
    "regularization": (2, _regularization),
}


def plot_study(data: Data, path: str | os.PathLike) -> None:
    """Draws the figure of a study's results JSON into the PNG ``path``.

    Example:
      >>> import json, tempfile
      >>> from pathlib import Path
      >>> from bnjax_train.studies.summary import REPO
      >>> data = json.loads((REPO / "docs/studies/placement.json").read_text())
      >>> with tempfile.TemporaryDirectory() as d:
      ...     plot_study(data, Path(d) / "p.png")
      ...     (Path(d) / "p.png").stat().st_size > 0
      True
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = data["meta"]["study"]
    panels, draw = _PLOTS[name]
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8), squeeze=False)
    draw(data, axes[0])
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    quick = " (QUICK RUN: decides nothing)" if data["meta"].get("quick") else ""
    where = data["meta"]["settings"]["dataset"]
    fig.suptitle(f"{name} on {where}: {len(data['meta']['seeds'])} seeds, mean ± std{quick}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
