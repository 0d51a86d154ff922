"""The numbers of the studies, in float64 NumPy: summaries over seeds, calibration, speed.

Nothing here imports JAX: the tables and verdicts are computed from a results JSON alone.
The uncertainty scores (:func:`entropy`, :func:`auroc`) are shared with
``python -m benchmarks inference_eval``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

__all__ = [
    "CHANCE_FACTOR",
    "auroc",
    "cell",
    "compare",
    "diverged",
    "entropy",
    "expected_calibration_error",
    "mean_std",
    "negative_log_likelihood",
    "steps_to_target",
]

#: A run whose final accuracy is below this many times chance (1 / classes) has diverged.
CHANCE_FACTOR = 2.0


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for one value) of ``values``.

    Example:
      >>> mean_std([1.0, 2.0, 3.0])
      (2.0, 1.0)
    """
    v = np.asarray(values, np.float64)
    if v.size == 0:
        raise ValueError("mean_std of no values.")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def cell(values: Sequence[float], digits: int = 3) -> str:
    """A table cell ``"mean ± std"`` with ``digits`` decimals, or ``"-"`` for no values.

    Example:
      >>> cell([0.9, 0.92]), cell([120, 160], digits=0), cell([])
      ('0.910 ± 0.014', '140 ± 28', '-')
    """
    if len(values) == 0:
        return "-"
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def compare(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Difference of the means ``mean(a) - mean(b)`` and its size in standard errors.

    The standard error is ``sqrt(var_a / n_a + var_b / n_b)`` (sample variances); with no
    spread at all the size is infinite for a difference and 0 for none.

    Example:
      >>> d, z = compare([0.9, 0.92, 0.94], [0.8, 0.82, 0.84])
      >>> round(d, 3), round(z, 2)
      (0.1, 6.12)
    """
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    se = math.sqrt(sa**2 / len(a) + sb**2 / len(b))
    diff = ma - mb
    if se == 0:
        return diff, 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff, diff / se


def steps_to_target(curve: Sequence[float], target: float, steps_per_epoch: int) -> int | None:
    """Optimizer steps until the end of the first epoch whose test accuracy reaches ``target``.

    Example:
      >>> steps_to_target([0.5, 0.8, 0.95], 0.9, 40), steps_to_target([0.5], 0.9, 40)
      (120, None)
    """
    for i, acc in enumerate(curve):
        if acc >= target:
            return (i + 1) * steps_per_epoch
    return None


def diverged(final_accuracy: float, nonfinite: bool, num_classes: int) -> bool:
    """A run diverged: a non-finite loss, or a final accuracy under twice chance.

    Example:
      >>> diverged(0.95, False, 10), diverged(0.11, False, 10), diverged(0.9, True, 10)
      (False, True, True)
    """
    return bool(nonfinite) or final_accuracy < CHANCE_FACTOR / num_classes


def negative_log_likelihood(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood (nats) of the labels under ``probs`` ``(n, classes)``.

    Example:
      >>> round(negative_log_likelihood(np.array([[0.5, 0.5], [0.9, 0.1]]), np.array([0, 0])), 4)
      0.3993
    """
    p = np.asarray(probs, np.float64)[np.arange(len(labels)), np.asarray(labels)]
    return float(-np.mean(np.log(np.clip(p, 1e-12, None))))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: ``sum_b (n_b / n) |accuracy_b - confidence_b|``.

    The confidence of an example is its largest probability; ``bins`` equal-width bins of
    (0, 1], each example in the bin whose upper edge is the first at or above its confidence
    (Guo et al., 2017).

    Example:
      >>> p = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
      >>> round(expected_calibration_error(p, np.array([0, 1, 0, 0])), 4)
      0.4
    """
    p = np.asarray(probs, np.float64)
    confidence = p.max(axis=-1)
    correct = (p.argmax(axis=-1) == np.asarray(labels)).astype(np.float64)
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(total)


def entropy(p: np.ndarray) -> np.ndarray:
    """Entropy (nats) of each row of probabilities ``p``, in float64 NumPy.

    Example:
      >>> entropy(np.array([[0.5, 0.5], [1.0, 0.0]])).round(4).tolist()
      [0.6931, 0.0]
    """
    p = np.asarray(p, np.float64)
    return 0.0 - np.sum(p * np.log(np.clip(p, 1e-30, None)), axis=-1)  # 0.0, not -0.0


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve of scores ranking ``positive`` above ``negative`` (ties: 1/2).

    Example:
      >>> auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0])), auroc(np.ones(2), np.ones(3))
      (1.0, 0.5)
    """
    ranks = rankdata(np.concatenate([positive, negative]))
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
