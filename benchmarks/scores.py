"""Scores of predictive uncertainty, in float64 NumPy: entropy and AUROC.

Shared by ``python -m benchmarks inference_eval`` and ``python -m bnjax_train.studies mcbn``.
Nothing here imports JAX.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import rankdata

__all__ = ["auroc", "entropy"]


def entropy(p: Any) -> np.ndarray:
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
