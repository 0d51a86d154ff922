"""Loading PyTorch and Keras batch-norm weights and running statistics into bnjax, and back.

Each ``from_*`` returns a :class:`Converted`: ``variables`` (``{"params": {"scale", "bias"},
"batch_stats": {"mean", "var", ...}}``, for ``bnjax.BatchNorm.apply`` or
``bnjax.batch_norm``) and ``kwargs`` (constructor arguments of ``bnjax.BatchNorm``:
``momentum`` and ``epsilon`` in bnjax's convention, ``axis``, ``use_scale``, ``use_bias``...).

PyTorch (``torch.nn.BatchNorm1d/2d/3d``):

- Names: ``weight -> scale``, ``bias -> bias``, ``running_mean -> mean``,
  ``running_var -> var``; ``num_batches_tracked`` has no bnjax counterpart (it is used only to
  rescale the variance, below, and can be handed back by :func:`to_torch`).
- Momentum: PyTorch's ``momentum`` is the weight on the *new* batch value; bnjax's (Keras')
  is the weight on the *old* moving value, so ``bnjax = 1 - torch`` (0.1 -> 0.9), computed in
  decimal so that 0.1 -> 0.9 -> 0.1 round-trips exactly. ``momentum=None`` (PyTorch's
  cumulative average) has no bnjax counterpart and leaves ``momentum`` out of ``kwargs``,
  with a warning (``bnjax.BatchNorm(**kwargs)`` would train with its default 0.99).
- Epsilon: the same placement, ``sqrt(var + eps)``; PyTorch's default is 1e-5 (bnjax 1e-3),
  so ``kwargs["epsilon"]`` carries it over.
- Layout: PyTorch's features are axis 1 (``NCHW``), so ``kwargs["axis"] = 1`` by default;
  ``layout="NHWC"`` gives ``axis=-1`` for a channels-last port (Flax convolutions).
- Running variance: PyTorch's ``running_var`` is an exponential moving average of the
  *unbiased* batch variances (divided by ``n - 1``, ``n`` = values per channel in a batch:
  ``N`` for ``(N, C)``, ``N * L`` for ``(N, C, L)``, ``N * H * W`` for ``(N, C, H, W)``);
  bnjax and Keras average the *biased* ones (divided by ``n``). By default the value is kept
  as is: the converted layer's inference output is then exactly PyTorch's eval output,
  which is what a ported model needs. The batch size is not in the state dict, so the biased
  average bnjax would have kept is recoverable only when you give ``values_per_channel=n``
  (and ``n`` was the same for every batch): with ``t = num_batches_tracked`` and
  ``w = (1 - torch_momentum) ** t`` (0 for the cumulative average) the weight still on the
  initial value 1, ``var = w + (running_var - w) * (n - 1) / n`` exactly. Use it to continue
  training in bnjax with statistics consistent with its own updates; the inference output
  then differs from PyTorch's by that factor. Layers with ``track_running_stats=False`` have no
  running statistics and always normalize with batch statistics; they cannot be converted.

Keras (``keras.layers.BatchNormalization``, Keras 3 and TF-Keras 2): the conventions are
bnjax's own, so the conversion is a renaming and loss-free both ways: ``gamma -> scale``,
``beta -> bias``, ``moving_mean -> mean``, ``moving_variance -> var`` and, for
``renorm=True``, ``moving_stddev -> std``, ``renorm_mean -> renorm_mean``,
``renorm_stddev -> renorm_std``. Given the layer itself, its config (axis, momentum, epsilon,
center, scale, renorm options, ``trainable=False`` -> ``frozen``, ``virtual_batch_size`` of
TF-Keras 2, and the built-in regularizers and constraints) is carried into ``kwargs``.
"""

from __future__ import annotations

import decimal
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import keras as K

Array = jax.Array

__all__ = [
    "Converted",
    "from_keras",
    "from_torch",
    "to_keras",
    "to_torch",
    "torch_momentum",
]


class Converted(NamedTuple):
    """A converted layer: its variables and the ``bnjax.BatchNorm`` arguments that match."""

    variables: dict[str, dict[str, Array]]
    kwargs: dict[str, Any]


def torch_momentum(momentum: float) -> float:
    """Converts a momentum between PyTorch's convention and bnjax's: ``1 - momentum``.

    The conversion is its own inverse. It is done in decimal arithmetic on the shortest
    representation of the float, so ``0.1 -> 0.9 -> 0.1`` round-trips exactly.

    Args:
      momentum: weight on the new batch value (PyTorch) or on the old moving value (bnjax).

    Returns:
      The momentum in the other convention.

    Example:
      >>> torch_momentum(0.1), torch_momentum(torch_momentum(0.1))
      (0.9, 0.1)
    """
    if isinstance(momentum, bool) or not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum={momentum!r} must be a number in [0, 1].")
    return float(decimal.Decimal(1) - decimal.Decimal(repr(float(momentum))))


def _np(v: Any) -> np.ndarray:
    """A NumPy copy of an array-like (NumPy, JAX, or a torch tensor on any device)."""
    if hasattr(v, "detach"):
        v = v.detach().cpu().numpy()
    return np.array(v)


def _init_weight(num_batches_tracked: Any, momentum: float | None) -> float:
    """The weight PyTorch's running average still puts on its initial value."""
    if num_batches_tracked is None:
        raise ValueError(
            "values_per_channel is given but the state dict has no num_batches_tracked; the "
            "exact rescaling of running_var needs the number of updates. Pass it in the state "
            "dict (or leave values_per_channel=None to keep running_var as is)."
        )
    t = int(np.asarray(_np(num_batches_tracked)))
    if momentum is None:
        return 0.0 if t > 0 else 1.0
    return float((1.0 - float(momentum)) ** t)


def _check_n(values_per_channel: Any) -> int:
    if isinstance(values_per_channel, bool) or not isinstance(
            values_per_channel, int | np.integer) or values_per_channel < 2:
        raise ValueError(
            f"values_per_channel={values_per_channel!r} must be an int >= 2: the number of "
            "values per channel in each training batch (N * H * W for BatchNorm2d)."
        )
    return int(values_per_channel)


_UNSET: Any = object()
_LAYOUT_AXES = {"NCHW": 1, "NCL": 1, "NCDHW": 1, "NC": 1, "NHWC": -1, "NLC": -1, "NDHWC": -1}


def _torch_source(source: Any, momentum: Any, eps: Any) -> tuple[Mapping[str, Any], Any, Any]:
    """The state dict, momentum and eps of a ``torch.nn.BatchNorm*d`` module or a state dict."""
    if isinstance(source, Mapping):
        return (source, 0.1 if momentum is _UNSET else momentum,
                1e-5 if eps is _UNSET else eps)
    if not (hasattr(source, "state_dict") and hasattr(source, "eps")
            and hasattr(source, "momentum")):
        raise TypeError(
            f"from_torch got {type(source).__name__}; pass a torch.nn.BatchNorm1d/2d/3d module "
            "or its state_dict() (a mapping of arrays)."
        )
    for name, given in (("momentum", momentum), ("eps", eps)):
        if given is not _UNSET:
            raise ValueError(
                f"{name}={given!r} is given with a module; the module's own {name} "
                f"({getattr(source, name)!r}) is used. Pass a state dict to override it."
            )
    if not getattr(source, "track_running_stats", True):
        raise ValueError(
            f"{type(source).__name__} has track_running_stats=False: it always normalizes "
            "with batch statistics, which has no bnjax inference counterpart."
        )
    return source.state_dict(), source.momentum, source.eps


def _missing_stats_message(state_dict: Mapping[str, Any], prefix: str,
                           sd: Mapping[str, Any], missing: list[str]) -> str:
    """Why a state dict has no running statistics at ``prefix``, and what to pass instead."""
    layers = sorted(k[: -len("running_mean")] for k in state_dict
                    if k.endswith("running_mean") and k != prefix + "running_mean")
    if layers:
        shown = ", ".join(repr(p) for p in layers[:8]) + (", ..." if len(layers) > 8 else "")
        return (f"state dict has no {missing} under prefix={prefix!r}: it holds "
                f"{len(layers)} batch norm layer(s), under the prefixes {shown}. Convert one "
                f"layer at a time, e.g. from_torch(state_dict, prefix={layers[0]!r}).")
    return (f"state dict (prefix {prefix!r}, keys {sorted(sd)}) has no {missing}: a PyTorch "
            "layer built with track_running_stats=False always normalizes with batch "
            "statistics, which has no bnjax inference counterpart.")


def from_torch(
    source: Any,
    *,
    prefix: str = "",
    momentum: float | None = _UNSET,
    eps: float = _UNSET,
    layout: str = "NCHW",
    values_per_channel: int | None = None,
    param_dtype: Any = jnp.float32,
) -> Converted:
    """Loads a PyTorch ``BatchNorm{1,2,3}d`` (the module, or its state dict) into bnjax.

    Args:
      source: a ``torch.nn.BatchNorm1d/2d/3d`` module (its state dict, ``momentum``,
        ``eps`` and ``affine`` are read from it), or a state dict (NumPy arrays or torch
        tensors; keys ``weight``, ``bias``, ``running_mean``, ``running_var``,
        ``num_batches_tracked``), possibly a whole model's with ``prefix``.
      prefix: key prefix of the layer in a model's state dict, e.g. ``"layer1.0.bn1."``.
      momentum: with a state dict, the PyTorch layer's momentum (new-value weight; None: the
        cumulative average; default PyTorch's 0.1). Not allowed with a module.
      eps: with a state dict, the PyTorch layer's eps (default 1e-5). Not allowed with a
        module.
      layout: the layout of the inputs the converted layer will see: ``"NCHW"`` (PyTorch's,
        features on axis 1; also ``"NC"``, ``"NCL"``, ``"NCDHW"``) or ``"NHWC"`` (channels
        last, axis -1, as Flax convolutions produce; also ``"NLC"``, ``"NDHWC"``). It sets
        ``kwargs["axis"]``.
      values_per_channel: if given, rescale ``running_var`` to the biased average (see the
        module docstring); None keeps it as is (exact PyTorch eval outputs).
      param_dtype: dtype of the returned arrays.

    Returns:
      ``Converted(variables, kwargs)``.

    Raises:
      ValueError: no running statistics (``track_running_stats=False``), a bad
        ``values_per_channel`` or ``layout``, a missing ``num_batches_tracked`` when
        rescaling, or ``momentum``/``eps`` given with a module.
      TypeError: ``source`` is neither a module nor a mapping.

    Example:
      >>> import numpy as np
      >>> sd = {"weight": np.ones(2), "bias": np.zeros(2), "running_mean": np.zeros(2),
      ...       "running_var": np.full(2, 2.0), "num_batches_tracked": np.array(3)}
      >>> c = from_torch(sd, layout="NHWC")
      >>> c.kwargs["momentum"], c.kwargs["epsilon"], c.kwargs["axis"]
      (0.9, 1e-05, -1)
      >>> c.variables["batch_stats"]["var"].tolist()
      [2.0, 2.0]
    """
    if layout not in _LAYOUT_AXES:
        raise ValueError(f"layout={layout!r} is not one of {sorted(_LAYOUT_AXES)}.")
    state_dict, momentum, eps = _torch_source(source, momentum, eps)
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    missing = [k for k in ("running_mean", "running_var") if k not in sd]
    if missing:
        raise ValueError(_missing_stats_message(state_dict, prefix, sd, missing))
    var = _np(sd["running_var"]).astype(np.float64)
    if values_per_channel is not None:
        n = _check_n(values_per_channel)
        w = _init_weight(sd.get("num_batches_tracked"), momentum)
        var = w + (var - w) * (n - 1) / n
    params = {}
    if "weight" in sd:
        params["scale"] = jnp.asarray(_np(sd["weight"]), param_dtype)
    if "bias" in sd:
        params["bias"] = jnp.asarray(_np(sd["bias"]), param_dtype)
    stats = {"mean": jnp.asarray(_np(sd["running_mean"]), param_dtype),
             "var": jnp.asarray(var, param_dtype)}
    kwargs: dict[str, Any] = {"axis": _LAYOUT_AXES[layout], "epsilon": float(eps),
                              "use_scale": "weight" in sd, "use_bias": "bias" in sd,
                              "param_dtype": param_dtype}
    if momentum is not None:
        kwargs["momentum"] = torch_momentum(momentum)
    else:
        warnings.warn(
            "from_torch: momentum=None (PyTorch's cumulative average of every batch) has no "
            "bnjax counterpart, so kwargs has no 'momentum' and bnjax.BatchNorm(**kwargs) "
            "would train with its default momentum 0.99. The converted variables are exact "
            "for inference; to train on, pass a momentum to bnjax.BatchNorm (or freeze the "
            "layer: frozen=True).", UserWarning, stacklevel=2)
    return Converted({"params": params, "batch_stats": stats}, kwargs)


def to_torch(
    variables: Mapping[str, Mapping[str, Any]],
    *,
    prefix: str = "",
    num_batches_tracked: int | None = None,
    momentum: float | None = 0.1,
    values_per_channel: int | None = None,
) -> dict[str, np.ndarray]:
    """The inverse of :func:`from_torch`: a PyTorch-style state dict of NumPy arrays.

    Loss-free: ``to_torch(from_torch(sd).variables, ...)`` gives back ``sd``'s values (in
    the variables' dtype) when called with the same ``momentum``, ``values_per_channel`` and
    ``num_batches_tracked``. Load it with ``layer.load_state_dict({k: torch.from_numpy(v)
    ...})``.

    Args:
      variables: ``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}``.
      prefix: prepended to every key.
      num_batches_tracked: stored as ``num_batches_tracked`` when given (required with
        ``values_per_channel``).
      momentum: PyTorch momentum, used only with ``values_per_channel``.
      values_per_channel: undo the rescaling :func:`from_torch` applied with the same value.

    Returns:
      ``{prefix + "weight", "bias", "running_mean", "running_var"[, "num_batches_tracked"]}``.

    Example:
      >>> import numpy as np
      >>> v = {"params": {"scale": np.ones(2)}, "batch_stats": {"mean": np.zeros(2),
      ...                                                      "var": np.ones(2)}}
      >>> sorted(to_torch(v, prefix="bn."))
      ['bn.running_mean', 'bn.running_var', 'bn.weight']
    """
    params = variables.get("params", {})
    stats = variables["batch_stats"]
    var = _np(stats["var"])
    if values_per_channel is not None:
        n = _check_n(values_per_channel)
        w = _init_weight(num_batches_tracked, momentum)
        var = (w + (var.astype(np.float64) - w) * n / (n - 1)).astype(var.dtype)
    out = {}
    if "scale" in params:
        out["weight"] = _np(params["scale"])
    if "bias" in params:
        out["bias"] = _np(params["bias"])
    out["running_mean"] = _np(stats["mean"])
    out["running_var"] = var
    if num_batches_tracked is not None:
        out["num_batches_tracked"] = np.array(num_batches_tracked, np.int64)
    return {prefix + k: v for k, v in out.items()}


_KERAS_TO_BNJAX = {
    "gamma": ("params", "scale"),
    "beta": ("params", "bias"),
    "moving_mean": ("batch_stats", "mean"),
    "moving_variance": ("batch_stats", "var"),
    "moving_stddev": ("batch_stats", "std"),
    "renorm_mean": ("batch_stats", "renorm_mean"),
    "renorm_stddev": ("batch_stats", "renorm_std"),
}
_KERAS_ORDER = tuple(_KERAS_TO_BNJAX)
_KERAS_OBJECTS = {
    "L1": K.L1, "L2": K.L2, "L1L2": K.L1L2, "NonNeg": K.NonNeg, "MaxNorm": K.MaxNorm,
    "MinMaxNorm": K.MinMaxNorm, "UnitNorm": K.UnitNorm,
}


def _keras_object(spec: Any, arg: str) -> Any:
    """A serialized Keras regularizer/constraint as the matching bnjax.keras object."""
    if spec is None:
        return None
    if isinstance(spec, Mapping) and spec.get("class_name") in _KERAS_OBJECTS:
        config = dict(spec.get("config") or {})
        if "axis" in config and isinstance(config["axis"], list):
            config["axis"] = tuple(config["axis"])
        return _KERAS_OBJECTS[spec["class_name"]](**config)
    raise ValueError(
        f"{arg}={spec!r} in the Keras config is not one of the built-in regularizers or "
        f"constraints ({sorted(_KERAS_OBJECTS)}); convert the weights with from_keras(weights) "
        "and pass your own callable to bnjax.BatchNorm."
    )


def _weights_by_name(weights: Any, center: bool, scale: bool, renorm: bool
                     ) -> dict[str, np.ndarray]:
    if isinstance(weights, Mapping):
        out = {}
        for key, value in weights.items():
            name = str(key).split("/")[-1].split(":")[0]
            if name not in _KERAS_TO_BNJAX:
                raise ValueError(
                    f"weights has key {key!r}; accepted names: {list(_KERAS_ORDER)} (optionally "
                    "with a 'layer/' prefix or ':0' suffix)."
                )
            out[name] = _np(value)
        return out
    names = [n for n in _KERAS_ORDER[:4]
             if (n != "gamma" or scale) and (n != "beta" or center)]
    if renorm:
        names += list(_KERAS_ORDER[4:])
    weights = list(weights)
    if len(weights) != len(names):
        raise ValueError(
            f"weights has {len(weights)} arrays but a Keras BatchNormalization with "
            f"center={center}, scale={scale}, renorm={renorm} has {len(names)}: {names} (the "
            "order of layer.get_weights()). Pass the matching flags, or a dict by name."
        )
    return {n: _np(w) for n, w in zip(names, weights, strict=True)}


def from_keras(
    weights: Any,
    *,
    center: bool = True,
    scale: bool = True,
    renorm: bool = False,
    param_dtype: Any = jnp.float32,
) -> Converted:
    """Loads a Keras ``BatchNormalization`` layer, or its weights, into bnjax (loss-free).

    Args:
      weights: a Keras layer (its weights and config are read), a list in
        ``layer.get_weights()`` order (``gamma``, ``beta``, ``moving_mean``,
        ``moving_variance`` and, with renorm, ``moving_stddev``, ``renorm_mean``,
        ``renorm_stddev``; ``gamma``/``beta`` absent for ``scale``/``center`` False), or a
        dict by those names.
      center: the layer had ``beta`` (for a list of weights).
      scale: the layer had ``gamma`` (for a list of weights).
      renorm: the layer had the renorm statistics (for a list of weights).
      param_dtype: dtype of the returned arrays.

    Returns:
      ``Converted(variables, kwargs)``; ``kwargs`` carries the layer's config when a layer
      is given, else ``use_scale``, ``use_bias`` and ``renorm``.

    Example:
      >>> import numpy as np
      >>> c = from_keras([np.ones(2), np.zeros(2), np.zeros(2), np.ones(2)])
      >>> sorted(c.variables["params"]), sorted(c.variables["batch_stats"])
      (['bias', 'scale'], ['mean', 'var'])
    """
    kwargs: dict[str, Any] = {}
    if hasattr(weights, "get_weights") and hasattr(weights, "get_config"):
        config = weights.get_config()
        center, scale = bool(config.get("center", True)), bool(config.get("scale", True))
        renorm = bool(config.get("renorm", False))
        axis = config.get("axis", -1)
        kwargs.update(
            axis=tuple(axis) if isinstance(axis, list | tuple) else int(axis),
            momentum=float(config.get("momentum", 0.99)),
            epsilon=float(config.get("epsilon", 1e-3)),
            frozen=not bool(config.get("trainable", True)),
        )
        if renorm:
            kwargs.update(renorm_clipping=dict(config.get("renorm_clipping") or {}) or None,
                          renorm_momentum=float(config.get("renorm_momentum", 0.99)))
        if config.get("virtual_batch_size") is not None:
            kwargs["virtual_batch_size"] = int(config["virtual_batch_size"])
        for keras_name, ours in (("gamma_regularizer", "scale_regularizer"),
                                 ("beta_regularizer", "bias_regularizer"),
                                 ("gamma_constraint", "scale_constraint"),
                                 ("beta_constraint", "bias_constraint")):
            obj = _keras_object(config.get(keras_name), keras_name)
            if obj is not None:
                kwargs[ours] = obj
        weights = {w.name if hasattr(w, "name") else str(i): _np(v)
                   for i, (w, v) in enumerate(zip(weights.weights, weights.get_weights(),
                                                  strict=True))}
    by_name = _weights_by_name(weights, center, scale, renorm)
    for required in ("moving_mean", "moving_variance"):
        if required not in by_name:
            raise ValueError(f"weights lack {required!r} (got {sorted(by_name)}).")
    variables: dict[str, dict[str, Array]] = {"params": {}, "batch_stats": {}}
    for name, value in by_name.items():
        collection, ours = _KERAS_TO_BNJAX[name]
        # TF-Keras 2 stores multi-axis or virtual-batch weights with size-1 reduced axes.
        value = value.squeeze() if value.ndim > 1 else value
        variables[collection][ours] = jnp.asarray(value, param_dtype)
    has_renorm = "std" in variables["batch_stats"]
    kwargs.update(use_scale="scale" in variables["params"], use_bias="bias" in variables["params"],
                  renorm=has_renorm, param_dtype=param_dtype)
    return Converted(variables, kwargs)


def to_keras(variables: Mapping[str, Mapping[str, Any]]) -> list[np.ndarray]:
    """The inverse of :func:`from_keras`: arrays in ``layer.get_weights()`` order.

    ``gamma`` and ``beta`` are included when the variables have ``scale`` and ``bias``; the
    renorm statistics when they have ``std``. Loss-free: the arrays are copies. Load them with
    ``layer.set_weights(to_keras(variables))``. A renorm schedule's ``renorm_step`` has no
    Keras counterpart and is dropped.

    Args:
      variables: ``{"params": ..., "batch_stats": ...}`` of a bnjax layer.

    Returns:
      A list of NumPy arrays.

    Example:
      >>> import numpy as np
      >>> v = {"params": {"scale": np.ones(2)}, "batch_stats": {"mean": np.zeros(2),
      ...                                                      "var": np.ones(2)}}
      >>> [w.tolist() for w in to_keras(v)]
      [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]
    """
    out = []
    for name in _KERAS_ORDER:
        collection, ours = _KERAS_TO_BNJAX[name]
        tree = variables.get(collection, {})
        if ours in tree:
            out.append(_np(tree[ours]))
        elif name in ("moving_mean", "moving_variance"):
            raise ValueError(f"variables['{collection}'] has no '{ours}' (needed for {name}).")
    return out
