"""The settings of each study: the full run (published in docs/studies.md) and ``--quick``.

Shared by all studies: MNIST-1D (4000 training and 1000 test sequences of 40 values), the
study network :class:`~bnjax_train.studies.nets.StudyCNN1D` at half the zoo CNN1D's widths
(conv 16-16-32-32, dense 64: the whole set of studies must train in under 30 minutes on two
CPU cores), cosine learning-rate decay to zero, no weight decay (but for the L2 of the
``regularization`` study). The last three studies also run on scikit-learn's 8x8 digits
(:data:`DIGITS`: a 2D version of the network). The quick settings train a few tiny runs (one
conv layer) on 400 examples and test on 200: a test of the machinery whose figures mean
nothing.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["DATASETS", "DIGITS", "FULL", "QUICK", "settings_for"]

_NET = {"dataset": "mnist1d", "features": [16, 16, 32, 32], "hidden": 64, "schedule": "cosine"}
_ADAM = {**_NET, "optimizer": "adam", "learning_rate": 3e-3, "batch_size": 100}
_SGD = {**_NET, "optimizer": "momentum", "learning_rate": 0.1, "batch_size": 100}
_REGULARIZERS = [{"norm": n, "dropout": d, "l2": l2} for n, d, l2 in (
    ("none", 0.0, 0.0), ("batch", 0.0, 0.0), ("none", 0.3, 0.0), ("none", 0.0, 5e-4),
    ("batch", 0.0, 5e-4), ("batch", 0.3, 0.0))]

#: Full settings per study.
FULL: dict[str, dict[str, Any]] = {
    # SGD with momentum 0.9: the optimizer of the batch-norm paper's learning-rate claim.
    "learning_rate": {**_NET, "optimizer": "momentum", "batch_size": 100, "epochs": 15,
                      "norms": ["batch", "none"], "targets": [0.9, 0.95],
                      "learning_rates": [0.003, 0.01, 0.03, 0.1, 0.3, 1.0]},
    "placement": {**_ADAM, "epochs": 20, "targets": [0.9, 0.95],
                  "configs": [{"norm": "batch", "placement": "before"},
                              {"norm": "batch", "placement": "after"},
                              {"norm": "none", "placement": "before"}]},
    "dropout": {**_ADAM, "epochs": 20, "targets": [0.9, 0.95],
                "configs": [{"norm": "batch", "dropout": 0.0}, {"norm": "batch", "dropout": 0.3},
                            {"norm": "none", "dropout": 0.3}, {"norm": "none", "dropout": 0.0}]},
    # 6 epochs and at least 600 steps at every batch size (batch 256: 40 epochs); Adam's rate
    # scaled by sqrt(batch / 16). "layer" is the zoo's layer norm (the channels at each
    # position), "group1" group norm with one group (every value of an example).
    "batch_size": {**_NET, "optimizer": "adam", "learning_rate": 1e-3, "reference_batch": 16,
                   "epochs": 6, "min_steps": 600, "batch_sizes": [2, 4, 16, 64, 256],
                   "ghost_batch": 16,
                   "norms": ["batch", "renorm", "ghost", "group", "group1", "layer", "none"]},
    "momentum": {**_ADAM, "epochs": 10, "momenta": [0.9, 0.99, 0.999], "precise_batches": 20},
    "mcbn": {**_ADAM, "epochs": 15, "mc_batch_sizes": [8, 32, 128, 512], "num_samples": 32},
    # Santurkar et al. (2018): SGD with momentum at a rate where both train (learning_rate
    # study); the probes' SGD step is the learning rate; noisy BN's noise per channel and
    # step: mean ~ U(-m, m), variance ~ U(1, v), at two strengths (m, v).
    "covariate_shift": {**_SGD, "epochs": 10, "probe_batches": 4, "shift_step": 0.1,
                        "configs": [{"norm": "batch"}, {"norm": "batch", "noise": [0.5, 2.0]},
                                    {"norm": "batch", "noise": [1.0, 4.0]}, {"norm": "none"}]},
    "smoothness": {**_SGD, "epochs": 10, "probe_batches": 4, "step_sizes": [0.05, 0.1, 0.2, 0.4],
                   "configs": [{"norm": "batch"}, {"norm": "none"}]},
    # A quarter of the training set, so that it can be memorized; Keras-style L2 on kernels.
    "regularization": {**_ADAM, "batch_size": 50, "epochs": 30, "max_train": 1000,
                       "targets": [0.65, 0.7], "little": 0.01, "configs": _REGULARIZERS},
}

# One conv layer and the dense layer: every layer kind, with the fewest layers to compile.
_TINY = {"features": [4], "hidden": 8, "pool_after": [0], "epochs": 1, "max_train": 400,
         "max_test": 200}

#: ``--quick`` overrides of :data:`FULL`: every table column and verdict clause, fewest runs.
QUICK: dict[str, dict[str, Any]] = {
    "learning_rate": {**_TINY, "learning_rates": [0.01, 1.0], "targets": [0.2, 0.3]},
    "placement": {**_TINY, "targets": [0.2, 0.3]},
    "dropout": {**_TINY, "targets": [0.2, 0.3]},
    # BN, a variant of it (ghost: "n/a" at batch 4), a batch-free norm and none.
    "batch_size": {**_TINY, "batch_sizes": [4, 32], "max_train": 128, "min_steps": 8,
                   "norms": ["batch", "ghost", "group1", "none"]},
    "momentum": {**_TINY, "momenta": [0.9, 0.999], "precise_batches": 2},
    "mcbn": {**_TINY, "mc_batch_sizes": [8, 64], "num_samples": 2},
    # A quick run has no verdict, so one or two configs cover the code: noise, no norm, L2 on
    # BN, dropout.
    "covariate_shift": {**_TINY, "epochs": 2, "probe_batches": 1,
                        "configs": [FULL["covariate_shift"]["configs"][i] for i in (2, 3)]},
    "smoothness": {**_TINY, "probe_batches": 1, "step_sizes": [0.4],
                   "configs": [{"norm": "batch"}]},
    "regularization": {**_TINY, "max_train": 200, "targets": [0.2, 0.3],
                       "configs": [_REGULARIZERS[i] for i in (2, 4)]},
}

#: The datasets a study runs on (``--dataset``): MNIST-1D for all, digits for the last three.
DATASETS: dict[str, tuple[str, ...]] = {
    **{name: ("mnist1d",) for name in FULL}, **{name: ("mnist1d", "digits") for name in (
        "covariate_shift", "smoothness", "regularization")}}

# The study network on 8x8 images: two conv layers (2D), each followed by 2x2 pooling.
_DIGITS_NET = {"dataset": "digits", "features": [16, 32], "pool_after": [0, 1], "hidden": 64}

#: Overrides of :data:`FULL` on ``"digits"`` (1,437 training images, 360 test).
DIGITS: dict[str, dict[str, Any]] = {
    "covariate_shift": {**_DIGITS_NET, "batch_size": 50, "epochs": 15},
    "smoothness": {**_DIGITS_NET, "batch_size": 50, "epochs": 15},
    "regularization": {**_DIGITS_NET, "batch_size": 30, "epochs": 40, "max_train": 300,
                       "targets": [0.85, 0.9]},
}


def settings_for(name: str, quick: bool = False, dataset: str = "mnist1d") -> dict[str, Any]:
    """A copy of the settings of study ``name`` on ``dataset`` (``quick``: tiny overrides).

    Example:
      >>> settings_for("momentum")["momenta"], settings_for("momentum", quick=True)["epochs"]
      ([0.9, 0.99, 0.999], 1)
      >>> settings_for("smoothness", dataset="digits")["features"]
      [16, 32]
    """
    if name not in FULL:
        raise ValueError(f"study={name!r} is not a study; accepted: {list(FULL)}.")
    if dataset not in DATASETS[name]:
        raise ValueError(f"dataset={dataset!r} for study {name!r}; accepted: "
                         f"{list(DATASETS[name])}.")
    digits = DIGITS[name] if dataset == "digits" else {}
    return copy.deepcopy({**FULL[name], **digits, **(QUICK[name] if quick else {})})
