"""The studies that train and compare layouts: learning rate, placement, dropout, batch size.

Each ``run_*`` takes the data, the study's settings and the seeds, and returns the run
records of a results JSON: one per training run, ``{"config": {...}, "seed": s, ...}`` with
the test accuracy after each epoch (moving statistics), the mean training loss of each epoch
(``None`` where it was not finite) and whether the loss ever was non-finite. Runs that share a
model and a batch size train together (:func:`bnjax_train.studies.engine.train_runs`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax.core import FrozenDict

from bnjax_train.studies.engine import (
    Data,
    Recipe,
    Runs,
    accuracy,
    predict,
    train_runs,
)
from bnjax_train.studies.nets import StudyCNN1D

__all__ = ["make_model", "make_recipe", "records", "run_batch_size", "run_dropout",
           "norm_fields", "run_learning_rate", "run_placement", "run_regularization",
           "scaled_learning_rate",
           "timing"]

Settings = Mapping[str, Any]
Record = dict[str, Any]


def make_model(settings: Settings, num_classes: int, **kw: Any) -> StudyCNN1D:
    """The study network at the widths of ``settings`` (``features``, ``hidden``).

    Example:
      >>> make_model({"features": [8, 8], "hidden": 16}, 10, norm="none").features
      (8, 8)
    """
    if "norm_kwargs" in kw:  # hashable, so that compiled functions are cached per model
        kw["norm_kwargs"] = FrozenDict(kw["norm_kwargs"])
    return StudyCNN1D(num_classes=num_classes, features=tuple(settings["features"]),
                      pool_after=tuple(settings.get("pool_after", (1, 3))),
                      hidden=int(settings["hidden"]), **kw)


def make_recipe(settings: Settings, **kw: Any) -> Recipe:
    """The :class:`Recipe` of ``settings`` (its fields that are there), ``kw`` overriding.

    Example:
      >>> make_recipe({"optimizer": "sgd", "epochs": 3, "learning_rate": 0.1}, batch_size=8)
      Recipe(optimizer='sgd', batch_size=8, epochs=3, schedule='cosine', l2=0.0)
    """
    fields = {k: settings[k] for k in ("optimizer", "batch_size", "epochs", "schedule", "l2")
              if k in settings}
    return Recipe(**{**fields, **kw})


def _clean(values: Any) -> list[float | None]:
    """A list of floats for JSON: non-finite values become None, others 6 significant digits."""
    return [float(f"{v:.6g}") if math.isfinite(v) else None for v in np.asarray(values).tolist()]


def records(runs: Runs, configs: Sequence[Mapping[str, Any]], seeds: Sequence[int],
            **extra: Any) -> list[Record]:
    """One record per run of ``runs``; ``extra`` holds ``(R,)`` or ``(R, E)`` arrays to add.

    Example:
      >>> runs = Runs(None, np.array([[0.5, 0.75]]), np.array([[1.0, np.nan]]),
      ...             np.array([True]), 10, {}, 0.0, 0.0)
      >>> records(runs, [{"norm": "batch"}], [3])[0]["train_loss"]
      [1.0, None]
    """
    out = []
    for r, (config, seed) in enumerate(zip(configs, seeds, strict=True)):
        rec = {"config": dict(config), "seed": int(seed),
               "test_accuracy": _clean(runs.test_accuracy[r]),
               "train_loss": _clean(runs.train_loss[r]),
               "nonfinite": bool(runs.nonfinite[r])}
        for name, value in {**runs.extra, **extra}.items():
            v = np.asarray(value)[r]
            rec[name] = _clean(v) if v.ndim else _clean([v])[0]
        out.append(rec)
    return out


def timing(runs: Sequence[Runs]) -> dict[str, float]:
    """Seconds spent in ``train_runs`` (compilation included) and compiling, over ``runs``.

    Example:
      >>> timing([Runs(None, np.zeros((1, 1)), np.zeros((1, 1)), np.zeros(1, bool), 1, {},
      ...              2.0, 5.0)])
      {'train_seconds': 5.0, 'compile_seconds': 2.0, 'compiled_steps': 1}
    """
    return {"train_seconds": sum(r.seconds for r in runs),
            "compile_seconds": sum(r.compile_seconds for r in runs),
            "compiled_steps": len(runs)}


def run_learning_rate(data: Data, settings: Settings, seeds: Sequence[int]) -> dict[str, Any]:
    """With and without BN, every learning rate: all seeds and rates of a norm train together.

    Example:
      >>> from bnjax_train.studies.engine import toy_data
      >>> settings = {"features": [2], "hidden": 4, "norms": ["batch"],
      ...             "learning_rates": [1e-3, 1e-2], "optimizer": "adam",
      ...             "batch_size": 16, "epochs": 1}
      >>> out = run_learning_rate(toy_data(), settings, [0])
      >>> len(out["runs"]), out["runs"][1]["config"]
      (2, {'norm': 'batch', 'learning_rate': 0.01})
    """
    out, all_runs = [], []
    for norm in settings["norms"]:
        grid = [(lr, s) for lr in settings["learning_rates"] for s in seeds]
        runs = train_runs(make_model(settings, data.num_classes, norm=norm), data,
                          make_recipe(settings), [s for _, s in grid], [lr for lr, _ in grid])
        all_runs.append(runs)
        out += records(runs, [{"norm": norm, "learning_rate": lr} for lr, _ in grid],
                       [s for _, s in grid])
    return {"runs": out, "steps_per_epoch": all_runs[0].steps_per_epoch, **timing(all_runs)}


def _per_config(data: Data, settings: Settings, seeds: Sequence[int],
                configs: Sequence[Mapping[str, Any]], train_accuracy: bool = False,
                ) -> dict[str, Any]:
    """Trains every config (model fields, and ``l2``) over all seeds together; one compile each."""
    out, all_runs = [], []
    for config in configs:
        fields = {k: v for k, v in config.items() if k != "l2"}
        model = make_model(settings, data.num_classes, **fields)
        recipe = make_recipe(settings, **{k: v for k, v in config.items() if k == "l2"})
        runs = train_runs(model, data, recipe, list(seeds),
                          [settings["learning_rate"]] * len(seeds))
        all_runs.append(runs)
        extra = {}
        if train_accuracy:  # inference mode, the whole training set
            extra["train_accuracy"] = accuracy(predict(model, runs.variables, data.x_train),
                                               data.y_train)
        out += records(runs, [config] * len(seeds), seeds, **extra)
    return {"runs": out, "steps_per_epoch": all_runs[0].steps_per_epoch, **timing(all_runs)}


def run_placement(data: Data, settings: Settings, seeds: Sequence[int]) -> dict[str, Any]:
    """conv-BN-ReLU, conv-ReLU-BN and no BN (``settings["configs"]``: model fields each).

    Example:
      >>> from bnjax_train.studies.engine import toy_data
      >>> settings = {"features": [2], "hidden": 4, "optimizer": "adam", "learning_rate": 1e-3,
      ...             "batch_size": 16, "epochs": 1,
      ...             "configs": [{"norm": "batch", "placement": "after"}]}
      >>> out = run_placement(toy_data(), settings, [0, 1])
      >>> [r["config"]["placement"] for r in out["runs"]], out["steps_per_epoch"]
      (['after', 'after'], 2)
    """
    return _per_config(data, settings, seeds, settings["configs"])


def run_dropout(data: Data, settings: Settings, seeds: Sequence[int]) -> dict[str, Any]:
    """BN and dropout, each with and without the other; also the final training accuracy.

    Example:
      >>> from bnjax_train.studies.engine import toy_data
      >>> settings = {"features": [2], "hidden": 4, "optimizer": "adam", "learning_rate": 1e-3,
      ...             "batch_size": 16, "epochs": 1,
      ...             "configs": [{"norm": "batch", "dropout": 0.0}]}  # BN, no dropout
      >>> out = run_dropout(toy_data(), settings, [0, 1])
      >>> 0.0 <= out["runs"][0]["train_accuracy"] <= 1.0
      True
    """
    return _per_config(data, settings, seeds, settings["configs"], train_accuracy=True)


def run_regularization(data: Data, settings: Settings, seeds: Sequence[int]) -> dict[str, Any]:
    """No regularizer, BN, dropout, L2 and BN with each, on a training subset; train accuracy.

    Each config holds model fields (``norm``, ``dropout``) and the L2 penalty ``l2``.

    Example:
      >>> from bnjax_train.studies.engine import toy_data
      >>> settings = {"features": [2], "hidden": 4, "optimizer": "adam", "learning_rate": 1e-3,
      ...             "batch_size": 16, "epochs": 1,
      ...             "configs": [{"norm": "none", "dropout": 0.0, "l2": 1e-3}]}
      >>> out = run_regularization(toy_data(), settings, [0, 1])
      >>> out["runs"][0]["config"], 0.0 <= out["runs"][0]["train_accuracy"] <= 1.0
      ({'norm': 'none', 'dropout': 0.0, 'l2': 0.001}, True)
    """
    return _per_config(data, settings, seeds, settings["configs"], train_accuracy=True)


def scaled_learning_rate(settings: Settings, batch_size: int) -> float:
    """The learning rate at ``batch_size``: ``learning_rate * sqrt(batch / reference_batch)``.

    Example:
      >>> scaled_learning_rate({"learning_rate": 1e-3, "reference_batch": 16}, 64)
      0.002
    """
    return float(settings["learning_rate"]) * math.sqrt(batch_size
                                                        / settings["reference_batch"])


def norm_fields(norm: str, ghost_batch: int) -> dict[str, Any]:
    """The network's ``norm`` and ``norm_kwargs`` for a norm name of the batch-size study.

    ``"ghost"`` normalizes ghost batches of ``ghost_batch`` examples; ``"group1"`` is group
    norm with one group, i.e. layer norm over every value of an example (the zoo's
    ``"layer"`` normalizes the channels at each position separately).

    Example:
      >>> norm_fields("group1", 16), norm_fields("batch", 16)
      ({'norm': 'group', 'norm_kwargs': {'num_groups': 1}}, {'norm': 'batch'})
    """
    if norm == "ghost":
        return {"norm": "ghost", "norm_kwargs": {"virtual_batch_size": ghost_batch}}
    if norm == "group1":
        return {"norm": "group", "norm_kwargs": {"num_groups": 1}}
    return {"norm": norm}


def run_batch_size(data: Data, settings: Settings, seeds: Sequence[int]) -> dict[str, Any]:
    """Every norm at every batch size (ghost batches only where there are two or more).

    Every batch size trains for ``epochs`` epochs and at least ``min_steps`` steps (the large
    batches take more epochs), at the learning rate of :func:`scaled_learning_rate`.

    Example:
      >>> from bnjax_train.studies.engine import toy_data
      >>> settings = {"features": [2], "hidden": 4, "optimizer": "adam", "learning_rate": 1e-3,
      ...             "reference_batch": 16, "epochs": 1, "min_steps": 2,
      ...             "batch_sizes": [16], "ghost_batch": 16, "norms": ["batch", "ghost"]}
      >>> out = run_batch_size(toy_data(), settings, [0, 1])  # 16 = one ghost batch: skipped
      >>> [(r["config"]["norm"], r["steps"]) for r in out["runs"]], out["skipped"]
      ([('batch', 2.0), ('batch', 2.0)], [{'norm': 'ghost', 'batch_size': 16}])
    """
    out, all_runs, skipped = [], [], []
    ghost = int(settings["ghost_batch"])
    n = len(data.x_train)
    for batch in settings["batch_sizes"]:
        epochs = max(int(settings["epochs"]), math.ceil(settings["min_steps"] / (n // batch)))
        for norm in settings["norms"]:
            if norm == "ghost" and (batch < 2 * ghost or batch % ghost):
                skipped.append({"norm": norm, "batch_size": batch})
                continue
            model = make_model(settings, data.num_classes, **norm_fields(norm, ghost))
            lr = scaled_learning_rate(settings, batch)
            runs = train_runs(model, data, make_recipe(settings, batch_size=batch, epochs=epochs),
                              list(seeds), [lr] * len(seeds))
            all_runs.append(runs)
            out += records(runs, [{"norm": norm, "batch_size": batch}] * len(seeds), seeds,
                           steps=np.full(len(seeds), runs.steps_per_epoch * epochs))
    return {"runs": out, "skipped": skipped, **timing(all_runs)}
