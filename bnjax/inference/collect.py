"""Batches and batch-norm layers for the statistics tools (PreciseBN, Monte Carlo batch norm).

Both tools take batches in several forms (:func:`collect_batches`), check that the model's
batch norms can be given new statistics (:func:`bn_layers`) and run the model with the
statistics of its own inputs (:func:`make_collector`).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bnjax import functional as F
from bnjax.inference.common import Path, get_path, path_str
from bnjax.inference.tracing import (
    BNCall,
    LayerCall,
    intercept_layers,
    quiet_epsilon,
    trace_layers,
)

Array = jax.Array


def batch_input(batch: Any, input_key: str, where: str) -> Array:
    """The model input in one batch: the array itself, or ``batch[input_key]`` of a dict.

    Args:
      batch: an array ``(batch_size, ...)`` or a dict holding one under ``input_key``.
      input_key: key of the model input in dict batches.
      where: the batch's name, for messages (e.g. ``"batches[3]"``).

    Raises:
      ValueError: a dict without ``input_key``, or not a floating-point array with a batch
        axis of at least one example.
      TypeError: not an array or a dict.

    Example:
      >>> import jax.numpy as jnp
      >>> batch_input({"x": jnp.ones((2, 3)), "y": 0}, "x", "batches[0]").shape
      (2, 3)
    """
    if isinstance(batch, Mapping):
        if input_key not in batch:
            raise ValueError(
                f"{where} is a dict with keys {sorted(batch)} but no {input_key!r}; pass "
                f"batches as arrays or dicts holding the model input under input_key="
                f"{input_key!r}."
            )
        batch = batch[input_key]
    if isinstance(batch, str) or not hasattr(batch, "shape"):
        raise TypeError(
            f"{where} has type {type(batch).__name__}; each batch must be an array shaped "
            "(batch_size, ...) or a dict holding one (e.g. {'x': ..., 'y': ...})."
        )
    batch = jnp.asarray(batch)
    if not jnp.issubdtype(batch.dtype, jnp.floating) or batch.ndim < 1 or batch.shape[0] < 1:
        raise ValueError(
            f"{where} has shape {tuple(batch.shape)} and dtype {batch.dtype}; a batch must be "
            "a floating-point array shaped (batch_size >= 1, ...)."
        )
    return batch


def collect_batches(batches: Any, limit: float, input_key: str, name: str) -> list[Array]:
    """Up to ``limit`` model inputs, checked to share one per-example shape.

    Args:
      batches: an iterable of batches (see :func:`batch_input`), or one array of stacked
        batches ``(num_batches, batch_size, ...)``.
      limit: the most batches to take (``math.inf``: all).
      input_key: key of the model input in dict batches.
      name: the argument's name, for messages.

    Raises:
      ValueError: no batches, or batches of differing or unusable shapes.
      TypeError: ``batches`` or a batch of the wrong type.

    Example:
      >>> import jax.numpy as jnp
      >>> [x.shape for x in collect_batches(jnp.ones((3, 2, 4)), 2, "x", "batches")]
      [(2, 4), (2, 4)]
    """
    if hasattr(batches, "shape") and not isinstance(batches, Mapping):
        if len(batches.shape) < 2:
            raise ValueError(
                f"{name} is one array of shape {tuple(batches.shape)}; an array of batches "
                "must be stacked as (num_batches, batch_size, ...)."
            )
    elif isinstance(batches, Mapping | str) or not isinstance(batches, Iterable):
        raise TypeError(
            f"{name} has type {type(batches).__name__}; pass an iterable of batches (arrays "
            "shaped (batch_size, ...) or dicts with the input under input_key), or one array "
            "of stacked batches shaped (num_batches, batch_size, ...)."
        )
    out: list[Array] = []
    for i, batch in enumerate(batches):
        if i >= limit:
            break
        x = batch_input(batch, input_key, f"{name}[{i}]")
        if out and x.shape[1:] != out[0].shape[1:]:
            raise ValueError(
                f"{name}[{i}] has shape {tuple(x.shape)} but {name}[0] has shape "
                f"{tuple(out[0].shape)}; every batch must have the same per-example shape "
                f"{tuple(out[0].shape[1:])} (only the batch size may differ)."
            )
        out.append(x)
    if not out:
        raise ValueError(f"{name} is empty; pass at least one batch.")
    return out


def bn_layers(model: nn.Module, variables: Mapping[str, Any], x: Array,
              call_kwargs: Mapping[str, Any], fn: str) -> list[LayerCall]:
    """The batch-norm layers the model calls, in call order, checked for the statistics tools.

    Raises:
      ValueError: the model does not run on ``x`` with ``call_kwargs``, a batch norm runs in
        training mode, the model calls no batch norm or one twice, or a layer's
        ``batch_stats`` do not have its feature shape.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, bnjax
      >>> model = nn.Sequential([nn.Dense(2),
      ...                        bnjax.BatchNorm(use_running_average=True, epsilon=1e-3)])
      >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
      >>> [c.path for c in bn_layers(model, variables, jnp.ones((4, 3)), {}, "example")]
      [('layers_1',)]
    """
    try:
        calls, _ = trace_layers(model, variables, x, call_kwargs, fn)
    except Exception as e:
        if isinstance(e, ValueError) and str(e).startswith(fn):
            raise
        raise ValueError(
            f"{fn}: the model could not be run on inputs of shape {tuple(x.shape)} with "
            f"call_kwargs={dict(call_kwargs)!r}: {e}"
        ) from e
    bns = [c for c in calls if c.kind == "bn"]
    if not bns:
        raise ValueError(
            f"{fn}: the model calls no batch-norm layer (bnjax.BatchNorm or "
            "flax.linen.BatchNorm); there are no statistics to compute."
        )
    counts = Counter(c.path for c in bns)
    for c in bns:
        if counts[c.path] > 1:
            raise ValueError(
                f"{fn}: batch-norm layer {path_str(c.path)} is called {counts[c.path]} times "
                "in one forward pass; its statistics would mix several inputs, which these "
                "tools do not support. Use one layer per call."
            )
        stats = get_path(variables["batch_stats"], c.path)
        feature_shape = tuple(c.in_shape[a] for a in
                              F.canonicalize_axes(c.module.axis, len(c.in_shape)))
        if not isinstance(stats, Mapping) or tuple(np.shape(stats.get("mean"))) != \
                feature_shape:
            raise ValueError(
                f"{fn}: batch_stats of layer {path_str(c.path)} are missing or do not have the "
                f"feature shape {feature_shape} (a layer inside nn.scan / nn.vmap is not "
                "supported)."
            )
    known = {c.path for c in bns}
    others = [path_str(p[:-1]) for p, _ in flax.traverse_util.flatten_dict(
        variables["batch_stats"]).items() if p[:-1] not in known]
    if others:
        warnings.warn(
            f"{fn}: batch_stats of {sorted(set(others))} do not belong to a recognised "
            "batch-norm layer and are left unchanged.", stacklevel=3)
    return bns


def make_collector(model: nn.Module, call_kwargs: Mapping[str, Any],
                   record: Path | None) -> Callable[[Any, Array], Any]:
    """A jitted ``f(variables, x)`` over the model in inference mode.

    With ``record`` a path: returns the ``Moments`` of that batch norm's input (every other
    layer normalizes with the statistics in ``variables``). With ``record=None``: every batch
    norm normalizes with the moments of its own input (training-mode statistics without the
    moving-average update) and ``f`` returns those moments as a ``batch_stats`` tree.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, bnjax
      >>> model = nn.Sequential([bnjax.BatchNorm(use_running_average=True, epsilon=1e-3)])
      >>> x = jnp.array([[1.0], [3.0]])
      >>> variables = model.init(jax.random.key(0), x)
      >>> make_collector(model, {}, ("layers_0",))(variables, x).var
      Array([1.], dtype=float32)
      >>> make_collector(model, {}, None)(variables, x)["layers_0"]["mean"]
      Array([2.], dtype=float32)
    """
    found: list[F.Moments] = []

    def on_bn(call: BNCall, next_fun):
        module = call.module
        if record is not None and module.scope.path != record:
            return call.run(next_fun)
        m = F.moments(call.x, module.axis, mask=call.mask)
        if record is not None:
            found.append(m)
        else:
            for key, value in (("mean", m.mean), ("var", m.var)):
                old = module.get_variable("batch_stats", key)
                module.put_variable("batch_stats", key, value.astype(old.dtype))
        return call.run(next_fun)

    @jax.jit
    def collect(variables, x):
        found.clear()
        with quiet_epsilon(), intercept_layers(on_bn):
            if record is not None:
                model.apply(variables, x, **call_kwargs)
                return found[0]
            _, updates = model.apply(variables, x, mutable=["batch_stats"], **call_kwargs)
            return updates["batch_stats"]

    return collect
