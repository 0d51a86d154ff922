"""The training config: its schema, its validation, and loading config files by name or path.

A config is an ``ml_collections.ConfigDict`` returned by ``get_config()`` of a Python file in
``configs/`` (see ``configs/default.py`` for every field). :func:`load_config` finds those files
relative to this program (``<repository>/configs``), so it works from any current directory and
after a non-editable ``pip install .``.
"""

from __future__ import annotations

import json
import runpy
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bnjax_train import input_pipeline, sources
from bnjax_train import models as models_lib

__all__ = [
    "CONFIG_DIR",
    "OPTIMIZERS",
    "RESUME_FREE_FIELDS",
    "SCHEDULES",
    "config_dict",
    "load_config",
    "resolved_norm",
    "validate_config",
]

#: The folder of the program's config files: ``configs/`` next to this package.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
OPTIMIZERS = ("adam", "adamw", "sgd", "momentum")
SCHEDULES = ("constant", "cosine", "warmup_cosine")
#: Fields that may differ between an interrupted run and its resumption (they do not change
#: the numbers a run produces).
RESUME_FREE_FIELDS = ("stop_after_steps", "progress_bar", "data_dir", "keep_checkpoints",
                      "checkpoint_every_steps", "precise_bn_batches", "export_folded",
                      "parallel")
_OPTIONAL_FIELDS = ("with_bn", "precise_bn_batches", "export_folded", "parallel")

Check = tuple[Callable[[Any], bool], str]


def _is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool) \
        and bool(np.isfinite(v))


def _one_of(options: Sequence[str]) -> Check:
    return (lambda v: v in options), f"one of {list(options)}"


def _int_at_least(lo: int) -> Check:
    return (lambda v: _is_int(v) and v >= lo), f"an integer >= {lo}"


def _dataset_ok(v: Any) -> bool:
    try:
        sources.validate_dataset_name(v)
    except ValueError:
        return False
    return True


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _config_fields() -> dict[str, Check]:
    """Every field of a config: a check of its value and what the check accepts."""
    return {
        "dataset": (_dataset_ok, "'mnist1d' or 'tfds:NAME' (e.g. 'tfds:mnist', 'tfds:cifar10')"),
        "data_dir": (lambda v: isinstance(v, str) and bool(v), "a non-empty folder path"),
        "validation_split": (lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
        "max_train_examples": _int_at_least(0),
        "augment": _one_of(input_pipeline.AUGMENTATIONS),
        "model": _one_of(sorted(models_lib.MODELS)),
        "norm": _one_of(models_lib.NORMS),
        "model_kwargs": (lambda v: isinstance(v, Mapping) or hasattr(v, "to_dict"),
                         "a mapping of model attributes"),
        "with_bn": (_is_bool, "True or False"),
        "seed": _int_at_least(0),
        "num_epochs": _int_at_least(1),
        "batch_size": _int_at_least(1),
        "eval_batch_size": _int_at_least(1),
        "optimizer": _one_of(OPTIMIZERS),
        "learning_rate": (lambda v: _is_num(v) and v > 0, "a finite number > 0"),
        "schedule": _one_of(SCHEDULES),
        "warmup_epochs": (lambda v: _is_num(v) and v >= 0, "a finite number >= 0"),
        "weight_decay": (lambda v: _is_num(v) and v >= 0, "a finite number >= 0"),
        "momentum": (lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
        "max_consecutive_skips": _int_at_least(1),
        "parallel": _one_of(("mesh", "shard_map", "pmap")),
        "checkpoint_every_steps": _int_at_least(0),
        "keep_checkpoints": _int_at_least(1),
        "progress_bar": (_is_bool, "True or False"),
        "stop_after_steps": _int_at_least(0),
        "precise_bn_batches": _int_at_least(0),
        "export_folded": (_is_bool, "True or False"),
    }


def resolved_norm(config: Any) -> str:
    """The normalization a config asks for: ``config.norm``, or ``"none"`` if ``with_bn`` is False.

    Example:
      >>> import ml_collections
      >>> resolved_norm(ml_collections.ConfigDict({"norm": "batch", "with_bn": False}))
      'none'
    """
    norm = config.get("norm", "batch")
    if "with_bn" in config and config.with_bn is False:
        return "none"
    return norm


def _field_errors(config: Any, fields: Mapping[str, Check]) -> tuple[list[str], set[str]]:
    """Errors of the fields one by one, and the names of the fields that passed."""
    keys = list(config.keys())
    errors = [f"config.{k}: unknown field; known fields: {sorted(fields)}"
              for k in keys if k not in fields]
    errors += [f"config.{k}: missing" for k in fields
               if k not in keys and k not in _OPTIONAL_FIELDS]
    good = set()
    for k, (ok, what) in fields.items():
        if k in keys:
            if ok(config[k]):
                good.add(k)
            else:
                errors.append(f"config.{k}={config[k]!r}: must be {what}")
    return errors, good


def _cross_field_errors(config: Any, good: set[str], num_devices: int) -> list[str]:
    """Errors of fields that are fine alone but not together (for fields that passed alone)."""
    errors = []
    n = num_devices
    for k in ("batch_size", "eval_batch_size"):
        if k in good and config[k] % n:
            errors.append(
                f"config.{k}={config[k]}: must be divisible by the {n} devices the batch is "
                f"split across (e.g. {max(n, config[k] - config[k] % n)})")
    if config.get("with_bn") is True and config.get("norm") == "none":
        errors.append("config.with_bn=True contradicts config.norm='none'")
    if {"warmup_epochs", "num_epochs"} <= good and config.warmup_epochs > config.num_epochs:
        errors.append(f"config.warmup_epochs={config.warmup_epochs!r}: must be <= "
                      f"config.num_epochs={config.num_epochs}")
    if {"model", "norm", "model_kwargs"} <= good:
        try:
            models_lib.create_model(config.model, num_classes=10, norm=resolved_norm(config),
                                    **dict(config.model_kwargs))
        except (TypeError, ValueError) as e:
            errors.append(f"config.model_kwargs={dict(config.model_kwargs)!r}: {e}")
    return errors


def validate_config(config: Any, *, num_devices: int | None = None) -> None:
    """Checks every field of a training config; raises one ``ValueError`` naming each bad field.

    Args:
      config: an ``ml_collections.ConfigDict`` (or mapping) as in ``configs/default.py``.
      num_devices: devices the global batch is split across; defaults to
        ``jax.device_count()``.

    Raises:
      ValueError: unknown or missing fields, or values out of range; the message names every
        offending field (``config.FIELD``), its value and what is accepted.

    Example:
      >>> config = load_config("default")
      >>> config.learning_rate = -1.0
      >>> validate_config(config, num_devices=1)
      Traceback (most recent call last):
      ...
      ValueError: invalid config:
        config.learning_rate=-1.0: must be a finite number > 0
    """
    n = jax.device_count() if num_devices is None else int(num_devices)
    errors, good = _field_errors(config, _config_fields())
    errors += _cross_field_errors(config, good, n)
    if errors:
        raise ValueError("invalid config:\n  " + "\n  ".join(errors))


def load_config(name_or_path: str | Path) -> Any:
    """Runs a config file's ``get_config()``: a path, or the name of a file in ``configs/``.

    Config files are Python and are executed: load only files you trust. A name without a
    folder or ``.py`` (``"tiny"``) is looked up in :data:`CONFIG_DIR`; a path that does not
    exist from the current directory but does relative to the repository (``"configs/tiny.py"``)
    is found there too, so the program's own configs load from any directory.

    Args:
      name_or_path: e.g. ``"configs/tiny.py"`` or ``"tiny"``.

    Returns:
      The ``ml_collections.ConfigDict``.

    Raises:
      FileNotFoundError: no such file.

    Example:
      >>> load_config("default").dataset
      'mnist1d'
      >>> load_config("configs/tiny.py").num_epochs
      2
    """
    path = Path(name_or_path)
    candidates = [path]
    if not path.is_absolute():
        if path.suffix != ".py" and len(path.parts) == 1:
            candidates.append(CONFIG_DIR / f"{path}.py")
        candidates.append(CONFIG_DIR.parent / path)
    for candidate in candidates:
        if candidate.is_file():
            return runpy.run_path(str(candidate))["get_config"]()
    raise FileNotFoundError(
        f"config file {str(name_or_path)!r} not found (looked at "
        f"{[str(c) for c in candidates]}).")


def config_dict(config: Any) -> dict[str, Any]:
    """The config as plain JSON data (tuples become lists), as written to ``config.json``.

    Example:
      >>> import ml_collections
      >>> config_dict(ml_collections.ConfigDict({"features": (8, 8)}))
      {'features': [8, 8]}
    """
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(d, default=list))
