"""The settings of each study: the full run (published in docs/studies.md) and ``--quick``.

Shared by all studies: MNIST-1D (4000 training and 1000 test sequences of 40 values), the
study network :class:`~bnjax_train.studies.nets.StudyCNN1D` at half the zoo CNN1D's widths
(conv 16-16-32-32, dense 64: the whole set of studies must train in under 30 minutes on two
CPU cores), cosine learning-rate decay to zero, no weight decay. The quick settings train a
few tiny runs (one conv layer) on 400 examples and test on 200: a test of the machinery whose
figures mean nothing.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["FULL", "QUICK", "settings_for"]

_NET = {"dataset": "mnist1d", "features": [16, 16, 32, 32], "hidden": 64, "schedule": "cosine"}
_ADAM = {**_NET, "optimizer": "adam", "learning_rate": 3e-3, "batch_size": 100}

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
}


def settings_for(name: str, quick: bool = False) -> dict[str, Any]:
    """A copy of the settings of study ``name`` (``quick``: with the quick overrides).

    Example:
      >>> settings_for("momentum")["momenta"], settings_for("momentum", quick=True)["epochs"]
      ([0.9, 0.99, 0.999], 1)
    """
    if name not in FULL:
        raise ValueError(f"study={name!r} is not a study; accepted: {list(FULL)}.")
    return copy.deepcopy({**FULL[name], **(QUICK[name] if quick else {})})
