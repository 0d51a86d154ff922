"""The options of each model in ``config.model_kwargs``, checked before anything runs.

:data:`MODEL_OPTIONS` says what each model of the zoo takes (and what each option accepts);
``norm_kwargs`` is checked against the attributes of the norm layers. :func:`model_kwargs_errors`
runs as part of ``bnjax_train.config_lib.validate_config``, before any data is read;
:func:`check_model_builds` then traces the model on the dataset's inputs (shapes only, nothing
compiled), for what only the data can show.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

import bnjax
from bnjax_train import models as models_lib

__all__ = [
    "MODEL_OPTIONS",
    "Check",
    "check_model_builds",
    "int_at_least",
    "is_int",
    "model_kwargs_errors",
    "plain",
    "resolved_norm",
]

#: A check of a value, and what it accepts (for the message).
Check = tuple[Callable[[Any], bool], str]


def is_int(v: Any) -> bool:
    """Whether ``v`` is an integer (not a bool).

    Example:
      >>> is_int(3), is_int(True), is_int(3.0)
      (True, False, False)
    """
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def int_at_least(lo: int) -> Check:
    """The check of an integer >= ``lo``.

    Example:
      >>> ok, what = int_at_least(1)
      >>> ok(0), what
      (False, 'an integer >= 1')
    """
    return (lambda v: is_int(v) and v >= lo), f"an integer >= {lo}"


def _is_int_seq(v: Any, lo: int, *, nonempty: bool = False) -> bool:
    return (isinstance(v, tuple | list) and (bool(v) or not nonempty)
            and all(is_int(i) and i >= lo for i in v))


def _int_seq(lo: int, *, nonempty: bool = False) -> Check:
    what = f"a {'non-empty ' if nonempty else ''}sequence of integers >= {lo}, e.g. (32, 64)"
    return (lambda v: _is_int_seq(v, lo, nonempty=nonempty)), what


def _norm_layer_options(norm: str) -> set[str]:
    """The attributes the layer of ``norm`` accepts in ``norm_kwargs[norm]``."""
    if norm == "none":
        return set()
    cls = {"group": models_lib.BatchFreeNorm, "layer": models_lib.BatchFreeNorm,
           "flax": models_lib.FlaxBatchNorm}.get(norm, bnjax.BatchNorm)
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
    "cnn1d": {"features": _int_seq(1, nonempty=True), "kernel_size": int_at_least(1),
              "pool_after": _int_seq(0), "hidden": int_at_least(0)},
    "mlp": {"hidden": _int_seq(1)},
    "kmnist_cnn": {},
    "resnet20": {"blocks_per_stage": int_at_least(1)},
}


def plain(value: Any) -> Any:
    """A ``ConfigDict`` as a dict (other values as they are).

    Example:
      >>> import ml_collections
      >>> plain(ml_collections.ConfigDict({"a": 1})), plain(3)
      ({'a': 1}, 3)
    """
    return value.to_dict() if hasattr(value, "to_dict") else value


def model_kwargs_errors(config: Any) -> list[str]:
    """Errors of ``config.model_kwargs`` for ``config.model`` (unknown names, bad values).

    Example:
      >>> import ml_collections
      >>> print(*model_kwargs_errors(ml_collections.ConfigDict(
      ...     {"model": "mlp", "norm": "batch", "model_kwargs": {"hidden": (8, 0)}})))
      config.model_kwargs.hidden=(8, 0): must be a sequence of integers >= 1, e.g. (32, 64)
      (model 'mlp')
    """
    kwargs = {k: plain(v) for k, v in dict(config.model_kwargs).items()}
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
      >>> from bnjax_train.config_lib import load_config
      >>> config = load_config("tiny")
      >>> config.model_kwargs.pool_after = (0, 1, 2, 3, 4, 5, 6)
      >>> config.model_kwargs.features = (8,) * 7
      >>> check_model_builds(config, np.zeros((1, 40), np.float32), 10, 8)
      Traceback (most recent call last):
      ...
      ValueError: config.model_kwargs={...}: model 'cnn1d' cannot be built for inputs of ...
    """
    kwargs = {k: plain(v) for k, v in dict(config.model_kwargs).items()}
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
