"""Tables and verdicts of the studies of why BN helps: covariate shift, smoothness, regularization.

As in :mod:`bnjax_train.studies.report_training`: ``(header, rows)`` and one line each, from a
results JSON alone. A probe curve (one value per epoch) is summarized per run by its mean over
the epochs where it is defined and finite; the cells are ``mean ± std`` of that over the seeds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from bnjax_train.studies import metrics
from bnjax_train.studies.summary import (
    SIGNIFICANT,
    difference,
    finals,
    speed,
    status,
    steps_cell,
)

__all__ = [
    "covariate_shift_table",
    "covariate_shift_verdict",
    "curve_means",
    "regularization_label",
    "regularization_table",
    "regularization_verdict",
    "shift_label",
    "smoothness_table",
    "smoothness_verdict",
]

Data = Mapping[str, Any]
Table = tuple[list[str], list[list[str]]]
Record = Mapping[str, Any]


def curve_means(records: Sequence[Record], key: str) -> list[float]:
    """Each record's mean of curve ``key`` over its finite values (records with none: left out).

    Example:
      >>> curve_means([{"s": [None, 1.0, 3.0]}, {"s": [None, None]}], "s")
      [2.0]
    """
    out = []
    for r in records:
        vals = [v for v in r[key] if v is not None and math.isfinite(v)]
        if vals:
            out.append(sum(vals) / len(vals))
    return out


def _cell(records: Sequence[Record], key: str, digits: int = 3) -> str:
    vals = curve_means(records, key)
    text = metrics.cell(vals, digits)
    return text if len(vals) == len(records) or not vals else (
        f"{text} ({len(vals)}/{len(records)})")


def shift_label(config: Mapping[str, Any]) -> str:
    """``"BN"``, ``"noisy BN (...)"`` (its noise's mean range and variance range) or ``"no BN"``.

    Example:
      >>> shift_label({"norm": "batch", "noise": [1.0, 4.0]}), shift_label({"norm": "none"})
      ('noisy BN (mean ±1, variance 1-4)', 'no BN')
    """
    if config.get("norm") == "none":
        return "no BN"
    if config.get("noise"):
        mean, var = config["noise"]
        return f"noisy BN (mean ±{mean:g}, variance 1-{var:g})"
    return "BN"


def _groups(data: Data, name: Any) -> list[tuple[str, list[Record]]]:
    """``(name(config), its runs)`` per config; a run's config must equal it (BN is not noisy)."""
    runs = data["results"]["runs"]
    return [(name(c), [r for r in runs if r["config"] == c])
            for c in data["meta"]["settings"]["configs"]]


def covariate_shift_table(data: Data) -> Table:
    """Accuracy, loss, feature shift and gradient change (and cosine) of BN, noisy BN, no BN.

    Example:
      >>> from bnjax_train.studies.summary import committed
      >>> header, rows = covariate_shift_table(committed("covariate_shift"))
      >>> header[3], [row[0] for row in rows][::2]
      ('feature shift per epoch', ['BN', 'noisy BN (mean ±1, variance 1-4)'])
    """
    header = ["network", "final test accuracy", "final training loss",
              "feature shift per epoch", "gradient change (relative)", "gradient cosine"]
    rows = [[name, metrics.cell(finals(runs)),
             metrics.cell([v for v in finals(runs, "train_loss") if v is not None], 4),
             _cell(runs, "feature_shift"), _cell(runs, "gradient_change"),
             _cell(runs, "gradient_cosine")] for name, runs in _groups(data, shift_label)]
    return header, rows


def _z(a: Sequence[Record], b: Sequence[Record], key: str) -> float:
    """Standard errors by which ``a``'s curve means are above ``b``'s (0 when one is empty)."""
    va, vb = curve_means(a, key), curve_means(b, key)
    return metrics.compare(va, vb)[1] if va and vb else 0.0


def covariate_shift_verdict(data: Data) -> str:
    """Does BN reduce the shift, and does BN with the shift put back (noisy BN) lose its gain?

    Example:
      >>> from bnjax_train.studies.summary import committed
      >>> covariate_shift_verdict(committed("covariate_shift")).startswith(
      ...     ("confirmed", "partly confirmed", "not confirmed"))
      True
    """
    g = dict(_groups(data, shift_label))
    bn, plain = g["BN"], g["no BN"]
    noisy = {k: v for k, v in g.items() if k.startswith("noisy")}
    reduces = {k: _z(plain, bn, k) for k in ("feature_shift", "gradient_change")}

    def mean(runs: Sequence[Record], key: str) -> float:
        return metrics.mean_std(curve_means(runs, key) or [math.nan])[0]

    parts, loses = [], []
    for name, runs in noisy.items():
        text, z_acc = difference(finals(runs), finals(bn))
        z_shift = _z(runs, bn, "feature_shift")
        if z_shift >= SIGNIFICANT:  # the control worked: more shift than BN
            loses.append(z_acc <= -SIGNIFICANT)
        parts.append(f"{name}: shift {mean(runs, 'feature_shift'):.3f} ({z_shift:.1f} standard "
                     f"errors above BN's), gradient change {mean(runs, 'gradient_change'):.3f},"
                     f" test accuracy {metrics.mean_std(finals(runs))[0]:.3f} ({text} vs BN)")
    facts = {"BN reduces the shift": all(z >= SIGNIFICANT for z in reduces.values()),
             "BN shifted more (noisy BN) loses accuracy": bool(loses) and all(loses)}
    acc = {k: metrics.mean_std(finals(g[k]))[0] for k in ("BN", "no BN")}
    return (f"{status(facts)}: feature shift per epoch {mean(bn, 'feature_shift'):.3f} with BN "
            f"vs {mean(plain, 'feature_shift'):.3f} without ({reduces['feature_shift']:.1f} "
            f"standard errors), gradient change {mean(bn, 'gradient_change'):.3f} vs "
            f"{mean(plain, 'gradient_change'):.3f} ({reduces['gradient_change']:.1f} standard "
            f"errors), test accuracy {acc['BN']:.3f} vs {acc['no BN']:.3f} ("
            + difference(finals(bn), finals(plain))[0] + "); " + "; ".join(parts) + ".")


def smoothness_table(data: Data) -> Table:
    """Accuracy and the landscape along the gradient (loss range, gradient change, beta).

    Example:
      >>> from bnjax_train.studies.summary import committed
      >>> header, rows = smoothness_table(committed("smoothness"))
      >>> header[2], [row[0] for row in rows]
      ('loss range along the gradient', ['BN', 'no BN'])
    """
    header = ["network", "final test accuracy", "loss range along the gradient",
              "largest gradient change", "effective beta-smoothness", "gradient norm"]
    rows = [[name, metrics.cell(finals(runs)), _cell(runs, "loss_range", 4),
             _cell(runs, "gradient_change", 4), _cell(runs, "beta", 3),
             _cell(runs, "gradient_norm", 4)] for name, runs in _groups(data, shift_label)]
    return header, rows


_SMOOTH = (("loss_range", "loss range"), ("gradient_change", "gradient change"),
           ("beta", "effective beta"))


def smoothness_verdict(data: Data) -> str:
    """Are the loss range, the gradient change and beta along the gradient smaller with BN?

    Example:
      >>> from bnjax_train.studies.summary import committed
      >>> smoothness_verdict(committed("smoothness")).startswith(
      ...     ("confirmed", "partly confirmed", "not confirmed"))
      True
    """
    g = dict(_groups(data, shift_label))
    bn, plain = g["BN"], g["no BN"]
    parts, facts = [], {}
    for key, name in _SMOOTH:
        z = _z(plain, bn, key)
        m_bn, m_none = (metrics.mean_std(curve_means(v, key) or [math.nan])[0]
                        for v in (bn, plain))
        facts[f"smaller {name} with BN"] = z >= SIGNIFICANT
        parts.append(f"{name} {m_bn:.4g} with BN vs {m_none:.4g} without ({z:.1f} standard "
                     "errors)")
    acc = difference(finals(bn), finals(plain))[0]
    return (f"{status(facts)}: " + "; ".join(parts)
            + f"; final test accuracy with BN minus without: {acc.removeprefix('difference ')}.")


def regularization_label(config: Mapping[str, Any]) -> str:
    """A name of a regularization config: its norm, dropout and L2, or "no regularizer".

    Example:
      >>> regularization_label({"norm": "batch", "dropout": 0.0, "l2": 5e-4})
      'BN + L2 0.0005'
      >>> regularization_label({"norm": "none", "dropout": 0.0, "l2": 0.0})
      'no regularizer'
    """
    parts = (["BN"] if config.get("norm") == "batch" else []) + (
        [f"dropout {config['dropout']:g}"] if config.get("dropout") else []) + (
        [f"L2 {config['l2']:g}"] if config.get("l2") else [])
    return " + ".join(parts) or "no regularizer"


def regularization_table(data: Data) -> Table:
    """Test and training accuracy, their gap, steps to the targets and the training loss.

    Example:
      >>> from bnjax_train.studies.summary import committed
      >>> header, rows = regularization_table(committed("regularization"))
      >>> header[:4], rows[0][0]
      (['regularizer', 'final test accuracy', 'training accuracy', 'train - test gap'], \
'no regularizer')
    """
    s, res = data["meta"]["settings"], data["results"]
    header = (["regularizer", "final test accuracy", "training accuracy", "train - test gap"]
              + [f"steps to {t}" for t in s["targets"]] + ["final training loss"])
    rows = []
    for name, runs in _groups(data, regularization_label):
        gaps = [r["train_accuracy"] - r["test_accuracy"][-1] for r in runs]
        rows.append([name, metrics.cell(finals(runs)),
                     metrics.cell([r["train_accuracy"] for r in runs]), metrics.cell(gaps)]
                    + [steps_cell(runs, t, res["steps_per_epoch"]) for t in s["targets"]]
                    + [metrics.cell([v for v in finals(runs, "train_loss") if v is not None],
                                    4)])
    return header, rows


def _gaps(runs: Sequence[Record]) -> list[float]:
    return [r["train_accuracy"] - r["test_accuracy"][-1] for r in runs]


def regularization_verdict(data: Data) -> str:
    """Does BN narrow the gap, speed training, and add little accuracy, with no other regularizer?

    Example:
      >>> from bnjax_train.studies.summary import committed
      >>> regularization_verdict(committed("regularization")).startswith(
      ...     ("confirmed", "partly confirmed", "not confirmed"))
      True
    """
    s, res = data["meta"]["settings"], data["results"]
    g = dict(_groups(data, regularization_label))
    plain, bn = g["no regularizer"], g["BN"]
    gap_text, z_gap = difference(_gaps(plain), _gaps(bn))
    target = s["targets"][0]
    m_bn, m_plain, z_speed = speed(bn, plain, target, res["steps_per_epoch"])
    gain = metrics.mean_std(finals(bn))[0] - metrics.mean_std(finals(plain))[0]
    facts = {"BN narrows the train-test gap": z_gap >= SIGNIFICANT,
             "BN speeds training": z_speed >= SIGNIFICANT,
             f"BN adds little accuracy (under {s['little']:g})": gain < s["little"]}
    steps = (f"{m_bn:.0f} vs {m_plain:.0f} steps to {target} ({abs(z_speed):.1f} standard "
             "errors)" if m_bn is not None and m_plain is not None else
             f"to {target}: not every run of both gets there")
    others = "; ".join(
        f"{name} {difference(finals(runs), finals(plain))[0].removeprefix('difference ')}"
        for name, runs in g.items() if name not in ("no regularizer", "BN"))
    return (f"{status(facts)}: BN vs no regularizer: train - test gap smaller by "
            f"{gap_text.removeprefix('difference ')}; {steps}; test accuracy "
            f"{gain:+.3f}; the others' test accuracy against no regularizer: {others}.")
