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

import json
import runpy
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

import bnjax
from bnjax_train import input_pipeline, sources
from bnjax_train import models as models_lib

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
INVOCATION_FIELDS = ("stop_after_steps", "progress_bar", "data_dir")
#: Fields that may change when a run resumes (they leave every array's shape as it is: the
#: learning rate and its schedule, the number of epochs, evaluation and checkpoint cadence,
#: the skip limit, the inference tools at the end); the change is logged in ``metrics.jsonl``.
RESUME_CHANGEABLE_FIELDS = ("learning_rate", "schedule", "warmup_epochs", "num_epochs",
                            "eval_batch_size", "checkpoint_every_steps", "keep_checkpoints",
                            "max_consecutive_skips", "precise_bn_batches", "export_folded")
#: Every field that may differ between a run and its resumption.
RESUME_FREE_FIELDS = INVOCATION_FIELDS + RESUME_CHANGEABLE_FIELDS
_OPTIONAL_FIELDS = ("with_bn", "precise_bn_batches", "export_folded")

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
        "checkpoint_every_steps": _int_at_least(0),
        "keep_checkpoints": _int_at_least(1),
        "progress_bar": (_is_bool, "True or False"),
        "stop_after_steps": _int_at_least(0),
        "precise_bn_batches": _int_at_least(0),
        "export_folded": (_is_bool, "True or False"),
    }


def _is_int_seq(v: Any, lo: int, *, nonempty: bool = False) -> bool:
    return (isinstance(v, tuple | list) and (bool(v) or not nonempty)
            and all(_is_int(i) and i >= lo for i in v))


def _int_seq(lo: int, *, nonempty: bool = False) -> Check:
    what = f"a {'non-empty ' if nonempty else ''}sequence of integers >= {lo}, e.g. (32, 64)"
    return (lambda v: _is_int_seq(v, lo, nonempty=nonempty)), what


def _norm_layer_options(norm: str) -> set[str]:
    """The attributes the layer of ``norm`` accepts in ``norm_kwargs[norm]``."""
    if norm == "none":
        return set()
    cls = models_lib.BatchFreeNorm if norm in ("group", "layer") else bnjax.BatchNorm
    return set(cls.__dataclass_fields__) - {"parent", "name", "axis_name", "kind"}


def _norm_kwargs_errors(value: Any) -> list[str]:
    """What is wrong in a model's ``norm_kwargs`` (``{norm: {layer attribute: value}}``)."""
    where = "config.model_kwargs.norm_kwargs"
    if not isinstance(value, Mapping):
        return [f"{where}={value!r}: must be a mapping {{norm: {{layer attribute: value}}}}, "
                "e.g. {'ghost': {'virtual_batch_size': 8}}"]
    errors = []
    for norm, kw in value.items():
        if norm not in models_lib.NORMS:
            errors.append(f"{where}.{norm}: unknown norm; accepted: {list(models_lib.NORMS)}")
        elif not isinstance(kw, Mapping):
            errors.append(f"{where}.{norm}={kw!r}: must be a mapping of layer attributes")
        elif set(kw) - _norm_layer_options(norm):
            errors.append(f"{where}.{norm}: unknown attribute(s) "
                          f"{sorted(set(kw) - _norm_layer_options(norm))}; the {norm!r} layer "
                          f"takes {sorted(_norm_layer_options(norm))}")
    return errors


#: The options each model of the zoo takes in ``config.model_kwargs``: a check of the value and
#: what it accepts (``norm_kwargs``, which every model takes, is checked against the layers'
#: attributes). Checked before any data is read; the model is then traced (shapes only) on the
#: dataset's inputs before anything compiles.
MODEL_OPTIONS: dict[str, dict[str, Check]] = {
    "cnn1d": {"features": _int_seq(1, nonempty=True), "kernel_size": _int_at_least(1),
              "pool_after": _int_seq(0), "hidden": _int_at_least(0)},
    "mlp": {"hidden": _int_seq(1)},
    "kmnist_cnn": {},
    "resnet20": {"blocks_per_stage": _int_at_least(1)},
}


def _plain(value: Any) -> Any:
    return value.to_dict() if hasattr(value, "to_dict") else value


def _model_kwargs_errors(config: Any) -> list[str]:
    """Errors of ``config.model_kwargs`` for ``config.model`` (unknown names, bad values)."""
    kwargs = {k: _plain(v) for k, v in dict(config.model_kwargs).items()}
    try:
        models_lib.create_model(config.model, num_classes=10, norm=resolved_norm(config),
                                **kwargs)
    except (TypeError, ValueError) as e:
        return [f"config.model_kwargs={kwargs!r}: {e}"]
    errors = _norm_kwargs_errors(kwargs.get("norm_kwargs") or {})
    for name, (ok, what) in MODEL_OPTIONS[config.model].items():
        if name in kwargs and not ok(kwargs[name]):
            errors.append(f"config.model_kwargs.{name}={kwargs[name]!r}: must be {what} "
                          f"(model {config.model!r})")
    return errors


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
        errors += _model_kwargs_errors(config)
    return errors


def check_model_builds(config: Any, example: Any, num_classes: int, batch: int) -> None:
    """Traces the config's model on a batch like ``example`` (shapes only, nothing compiled).

    Catches what :func:`validate_config` cannot see without the data: options that fail on the
    dataset's inputs (too many poolings for the length, ghost batches that do not divide the
    per-device batch, a norm option of the wrong type).

    Args:
      config: the validated config.
      example: one normalized input example batch (only its shape and dtype are used).
      num_classes: the dataset's number of classes.
      batch: the examples per device in a train step.

    Raises:
      ValueError: naming ``config.model_kwargs``, the input shape and the error.

    Example:
      >>> import numpy as np
      >>> config = load_config("tiny")
      >>> config.model_kwargs.pool_after = (0, 1, 2, 3, 4, 5, 6)
      >>> config.model_kwargs.features = (8,) * 7
      >>> check_model_builds(config, np.zeros((1, 40), np.float32), 10, 8)
      Traceback (most recent call last):
      ...
      ValueError: config.model_kwargs={...}: model 'cnn1d' cannot be built for inputs of ...
    """
    kwargs = {k: _plain(v) for k, v in dict(config.model_kwargs).items()}
    model = models_lib.create_model(config.model, num_classes=num_classes,
                                    norm=resolved_norm(config), **kwargs)
    x = jax.ShapeDtypeStruct((batch,) + tuple(np.shape(example)[1:]), np.result_type(example))
    try:
        variables = jax.eval_shape(
            lambda x: model.init(jax.random.key(0), x, training=False), x)
        jax.eval_shape(lambda v, x: model.apply(v, x, training=True, mutable=["batch_stats"]),
                       variables, x)
    except Exception as e:  # noqa: BLE001 -- whatever the model raises, name the option
        text = " ".join(str(e).split("\n")[0].split())[:300]
        raise ValueError(f"config.model_kwargs={kwargs!r}: model {config.model!r} cannot be "
                         f"built for inputs of shape {x.shape}: {type(e).__name__}: "
                         f"{text}") from None


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
