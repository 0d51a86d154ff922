"""The training config: its schema, its validation, and loading config files by name or path.

A config is an ``ml_collections.ConfigDict`` returned by ``get_config()`` of a Python file in
``configs/`` (see ``configs/default.py`` for every field). :func:`load_config` finds those files
relative to this program (``<repository>/configs``), so it works from any current directory and
after a non-editable ``pip install .``; a file that is missing, fails to run or has no
``get_config`` raises :class:`ConfigFileError` naming it.

:func:`validate_config` checks every field, and the options of each model in
``model_kwargs`` (:data:`MODEL_OPTIONS`), before any data is read or anything compiled. When a
run resumes, the fields in :data:`RESUME_CHANGEABLE_FIELDS` (they leave every array's shape as
it is) may differ from the run's ``config.json``, and those in :data:`INVOCATION_FIELDS` (how
this process runs, not what it computes) too; any other difference is refused.
"""

from __future__ import annotations

import difflib
import json
import runpy
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from bnjax_train import input_pipeline, sources
from bnjax_train import models as models_lib
from bnjax_train.model_options import (
    MODEL_OPTIONS,
    Check,
    check_model_builds,
    model_kwargs_errors,
    resolved_norm,
)
from bnjax_train.model_options import int_at_least as _int_at_least

__all__ = [
    "CONFIG_DIR",
    "INVOCATION_FIELDS",
    "MODEL_OPTIONS",
    "OPTIMIZERS",
    "RESUME_CHANGEABLE_FIELDS",
    "RESUME_FREE_FIELDS",
    "SCHEDULES",
    "ConfigFileError",
    "ConfigFileNotFoundError",
    "check_model_builds",
    "config_dict",
    "load_config",
    "resolved_norm",
    "validate_config",
]

#: The folder of the program's config files: ``configs/`` next to this package.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
OPTIMIZERS = ("adam", "adamw", "sgd", "momentum")
SCHEDULES = ("constant", "cosine", "warmup_cosine")
#: Fields that say how this process runs, not what the run computes: they may differ between a
#: run and its resumption and the change is not recorded.
INVOCATION_FIELDS = ("stop_after_steps", "progress_bar", "data_dir", "parallel")
#: Fields that may change when a run resumes (they leave every array's shape as it is: the
#: learning rate and its schedule, the number of epochs, evaluation and checkpoint cadence,
#: the skip and blow-up limits, the inference tools at the end); the change is logged in
#: ``metrics.jsonl``.
RESUME_CHANGEABLE_FIELDS = ("learning_rate", "schedule", "warmup_epochs", "num_epochs",
                            "eval_batch_size", "checkpoint_every_steps", "keep_checkpoints",
                            "max_consecutive_skips", "max_param_growth", "precise_bn_batches",
                            "export_folded")
#: Every field that may differ between a run and its resumption.
RESUME_FREE_FIELDS = INVOCATION_FIELDS + RESUME_CHANGEABLE_FIELDS
_OPTIONAL_FIELDS = ("with_bn", "precise_bn_batches", "export_folded", "parallel",
                    "max_param_growth")
# Accepted but not listed as a known field: with_bn belongs to configs/mnist_mlp.py (the
# paper's switch), not to the fields configs/default.py documents.
_UNLISTED_FIELDS = ("with_bn",)

def _is_num(v: Any) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool) \
        and bool(np.isfinite(v))


def _one_of(options: Sequence[str]) -> Check:
    return (lambda v: v in options), f"one of {list(options)}"


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
        "dataset": (_dataset_ok, "'mnist1d', 'digits' or 'tfds:NAME' (e.g. 'tfds:mnist', "
                                 "'tfds:cifar10')"),
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
        "max_param_growth": (lambda v: _is_num(v) and (v == 0 or v >= 1),
                             "0 (no limit) or a finite number >= 1"),
        "parallel": _one_of(("mesh", "shard_map", "pmap")),
        "checkpoint_every_steps": _int_at_least(0),
        "keep_checkpoints": _int_at_least(1),
        "progress_bar": (_is_bool, "True or False"),
        "stop_after_steps": _int_at_least(0),
        "precise_bn_batches": _int_at_least(0),
        "export_folded": (_is_bool, "True or False"),
    }


def _unknown_field(name: str, fields: Mapping[str, Check]) -> str:
    """The error of an unknown field: the closest known one, then the documented fields.

    ``with_bn`` (a field of ``configs/mnist_mlp.py`` only) is suggested but not listed.

    Example:
      >>> _unknown_field("lerning_rate", {"learning_rate": None, "with_bn": None})
      "config.lerning_rate: unknown field; did you mean 'learning_rate'? known fields: \
['learning_rate']"
    """
    close = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.75)
    hint = f" did you mean {close[0]!r}?" if close else ""
    listed = sorted(k for k in fields if k not in _UNLISTED_FIELDS)
    return f"config.{name}: unknown field;{hint} known fields: {listed}"


def _field_errors(config: Any, fields: Mapping[str, Check]) -> tuple[list[str], set[str]]:
    """Errors of the fields one by one, and the names of the fields that passed."""
    keys = list(config.keys())
    errors = [_unknown_field(k, fields) for k in keys if k not in fields]
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
        errors += model_kwargs_errors(config)
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


class ConfigFileError(ValueError):
    """A config file that fails to run or whose ``get_config()`` gives no config."""


class ConfigFileNotFoundError(ConfigFileError, FileNotFoundError):
    """No config file by that name or path."""


def _line_in(error: BaseException, path: Path) -> str:
    """`` (line N)``: the last line of ``path`` in ``error``'s traceback, if any."""
    lines = [f.lineno for f in traceback.extract_tb(error.__traceback__)
             if Path(f.filename).resolve() == path.resolve()]
    return f" (line {lines[-1]})" if lines else ""


def _run_config_file(path: Path, shown: str) -> Any:
    """``get_config()`` of the file at ``path``; errors name the file as ``shown``."""
    try:
        namespace = runpy.run_path(str(path))
    except SyntaxError as e:
        raise ConfigFileError(f"config file {shown!r} is not valid Python (line {e.lineno}: "
                              f"{e.msg})") from None
    except Exception as e:
        raise ConfigFileError(f"config file {shown!r} failed to run: {type(e).__name__}: "
                              f"{e}{_line_in(e, path)}") from None
    get_config = namespace.get("get_config")
    if not callable(get_config):
        raise ConfigFileError(
            f"config file {shown!r} has no get_config() function; a config file defines "
            "get_config() returning an ml_collections.ConfigDict (see configs/default.py)")
    try:
        config = get_config()
    except Exception as e:
        raise ConfigFileError(f"config file {shown!r}: get_config() raised "
                              f"{type(e).__name__}: {e}{_line_in(e, path)}") from None
    if isinstance(config, Mapping) and not isinstance(config, ml_collections.ConfigDict):
        config = ml_collections.ConfigDict(dict(config))
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigFileError(f"config file {shown!r}: get_config() returned a "
                              f"{type(config).__name__}, not an ml_collections.ConfigDict")
    return config


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
      ConfigFileNotFoundError: no such file (a ``FileNotFoundError`` too).
      ConfigFileError: the file is not valid Python, raises when run, has no ``get_config``,
        or its ``get_config()`` raises or returns something else than a config; the message
        names the file (and the line).

    Example:
      >>> load_config("default").dataset
      'mnist1d'
      >>> load_config("configs/tiny.py").num_epochs
      2
      >>> load_config("configs/nope.py")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      bnjax_train.config_lib.ConfigFileNotFoundError: config file 'configs/nope.py' not found ...
    """
    path = Path(name_or_path)
    candidates = [path]
    if not path.is_absolute():
        if path.suffix != ".py" and len(path.parts) == 1:
            candidates.append(CONFIG_DIR / f"{path}.py")
        candidates.append(CONFIG_DIR.parent / path)
    for candidate in candidates:
        if candidate.is_file():
            return _run_config_file(candidate, str(name_or_path))
    raise ConfigFileNotFoundError(
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
