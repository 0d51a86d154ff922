"""CrossQ's batch renormalization: Stable-Baselines-Jax's ``BatchRenorm``, on bnjax's core.

CrossQ (Bhatt et al., ICLR 2024) puts batch normalization in the critic instead of target
networks; its JAX layer is ``sbx.common.jax_layers.BatchRenorm``. This module gives the same
layer (fields, call, variable tree ``batch_stats/{mean, var, r_max, d_max, steps}``, so its
checkpoints load unchanged) computed by bnjax's public functions: exact float32 statistics
(:func:`bnjax.moments`, not ``E[x^2] - E[x]^2``), masks, synchronized statistics with
``axis_name``, the non-finite guard of :func:`bnjax.update_moving_stats`.

The arithmetic, as published (training, after initialization):

- ``mu_B, var_B``: the batch mean and biased batch variance;
- ``r = clip(stop_gradient(sqrt(var_B + eps) / sqrt(var + eps)), 1 / r_max, r_max)`` and
  ``d = clip(stop_gradient((mu_B - mean) / sqrt(var + eps)), -d_max, d_max)``;
- while ``steps < warmup_steps`` the output is plain batch norm with ``mu_B, var_B``;
  afterwards it is ``normalize(x, mu_B - d * sqrt(var_B) / r, var_B / r**2)``, so that it
  depends on the running statistics (gradients flow through ``mu_B`` and ``var_B``, not
  through ``r`` and ``d``);
- ``mean, var`` follow ``momentum * old + (1 - momentum) * batch`` and ``steps`` grows by one.

Inference normalizes with ``mean`` and ``var``. Where ``var_B`` is 0 (a constant feature, a
ReLU unit dead on the whole batch) the derivative of ``sqrt(var_B)`` is taken as 0: the
published layer's gradient is NaN there, even during warm-up.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from bnjax import _checks as C
from bnjax._checks import Axis, canonicalize_axes
from bnjax._train import normalize_with
from bnjax.functional import masked_normalize, update_moving_stats
from bnjax.stats import Moments, moments, stat_dtype

Array = jax.Array

__all__ = ["BatchRenorm", "crossq_batch_renorm", "init_crossq_stats"]

#: The keys of a CrossQ ``batch_stats`` entry, in the published layer's order.
STATS_KEYS = ("mean", "var", "r_max", "d_max", "steps")


def init_crossq_stats(feature_shape: Sequence[int] | int, r_max: int = 3,
                      d_max: int = 5) -> dict[str, Any]:
    """The published layer's initial ``batch_stats``: zeros, ones, ``r_max``, ``d_max``, 0.

    ``r_max``, ``d_max`` and ``steps`` are Python ints, as the published layer stores them
    (under ``jit`` they become int32 arrays), so the trees of the two layers are equal.

    Args:
      feature_shape: the per-feature shape, ``(C,)`` for channels last.
      r_max: the limit of ``r`` (clipped to ``[1 / r_max, r_max]``).
      d_max: the limit of ``d`` (clipped to ``[-d_max, d_max]``).

    Returns:
      ``{"mean", "var", "r_max", "d_max", "steps"}``.

    Example:
      >>> s = init_crossq_stats(2)
      >>> s["var"].tolist(), s["r_max"], s["d_max"], s["steps"]
      ([1.0, 1.0], 3, 5, 0)
    """
    shape = (feature_shape,) if isinstance(feature_shape, int) else tuple(feature_shape)
    return {"mean": jnp.zeros(shape, jnp.float32), "var": jnp.ones(shape, jnp.float32),
            "r_max": r_max, "d_max": d_max, "steps": 0}


def _check_warmup(warmup_steps: Any) -> None:
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps,
                                                         numbers.Integral | jax.Array):
        raise TypeError(f"warmup_steps is {warmup_steps!r} ({type(warmup_steps).__name__}); it "
                        "must be an int >= 0 (the number of training calls of plain batch norm)")
    if isinstance(warmup_steps, numbers.Integral) and warmup_steps < 0:
        raise ValueError(f"warmup_steps is {warmup_steps}; it must be an int >= 0 (the number "
                         "of training calls of plain batch norm)")


def _check_stats(stats: Mapping[str, Any], feature_shape: tuple[int, ...],
                 axes: tuple[int, ...]) -> None:
    for key in STATS_KEYS:
        if key not in stats:
            raise ValueError(f"stats has keys {sorted(stats)}; it needs {key!r} (all of "
                             f"{list(STATS_KEYS)}: see bnjax.init_crossq_stats).")
    for key in ("mean", "var"):
        C.check_per_feature(f"stats['{key}']", stats[key], feature_shape, axes)


def _sqrt0(v: Array) -> Array:
    """``sqrt(v)`` whose derivative at ``v == 0`` is 0 instead of infinite (``0 * inf``)."""
    pos = v > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, v, 1)), 0)


def _corrected(batch: Moments, stats: Mapping[str, Any], epsilon: float, warm: Array,
               dt: Any) -> tuple[Array, Array]:
    """The mean and variance to normalize with: the batch's, or corrected by ``r`` and ``d``."""
    mean, var = batch.mean, batch.var
    ra_mean, ra_var = stats["mean"].astype(dt), stats["var"].astype(dt)
    r_max, d_max = jnp.asarray(stats["r_max"], dt), jnp.asarray(stats["d_max"], dt)
    ra_std = jnp.sqrt(ra_var + epsilon)
    r = jnp.clip(lax.stop_gradient(jnp.sqrt(var + epsilon) / ra_std), 1 / r_max, r_max)
    d = jnp.clip(lax.stop_gradient((mean - ra_mean) / ra_std), -d_max, d_max)
    use_mean = jnp.where(warm, mean - d * _sqrt0(var) / r, mean)
    use_var = jnp.where(warm, var / r**2, var)
    # A feature without any valid value (all masked out) has no batch statistics.
    has = batch.count > 0
    return jnp.where(has, use_mean, ra_mean), jnp.where(has, use_var, ra_var)


def _output(x: Array, mask: Array | None, mean: Array, var: Array, scale: Array | None,
            bias: Array | None, axes: tuple[int, ...], epsilon: float, dtype: Any) -> Array:
    """``normalize`` (arguments already checked); masked-out positions carry no gradient."""
    out_dtype = x.dtype if dtype is None else dtype
    if mask is None:
        return normalize_with(x, mean, var, scale, bias, axes, epsilon, out_dtype)
    return masked_normalize(x, mask, mean, var, scale, bias, axes, epsilon, out_dtype)


def crossq_batch_renorm(
    x: Array,
    stats: Mapping[str, Any],
    params: Mapping[str, Array] | None = None,
    *,
    training: bool,
    warmup_steps: int | Array = 100_000,
    axis: Axis = -1,
    momentum: float | Array = 0.99,
    epsilon: float = 1e-3,
    axis_name: str | Sequence[str] | None = None,
    axis_index_groups: Any = None,
    mask: Array | None = None,
    dtype: Any = None,
    guard_non_finite: bool = True,
) -> tuple[Array, dict[str, Any]]:
    """CrossQ's batch renormalization (``sbx.common.jax_layers.BatchRenorm``) as a function.

    See the module docstring for the arithmetic. The statistics are bnjax's exact ones
    (:func:`bnjax.moments`); the published layer uses ``E[x^2] - E[x]^2``.

    Args:
      x: input ``(..., C)``; any float dtype (statistics are computed in float32 or wider).
      stats: ``{"mean", "var", "r_max", "d_max", "steps"}`` (see :func:`init_crossq_stats`).
      params: optional ``{"scale", "bias"}``; either key may be absent.
      training: batch statistics (and updated ``stats``), or the running ones; a Python bool.
      warmup_steps: training calls of plain batch norm before the correction starts; the
        switch is ``stats["steps"] >= warmup_steps``, so it may happen inside ``jit``.
      axis: feature axis or axes; all others are reduced.
      momentum: weight on the old running value, in [0, 1].
      epsilon: added to the variances inside the square roots.
      axis_name: named mapped axis (or axes) for the global batch statistics.
      axis_index_groups: groups of that axis reduced separately (see ``jax.lax.psum``).
      mask: optional boolean, shaped like ``x`` without its feature axes (or broadcastable
        to ``x``): a masked-out value takes no part in the statistics and gets no gradient;
        the output at its position is still normalized, without gradient.
      dtype: output dtype; defaults to ``x.dtype``.
      guard_non_finite: keep a feature's running statistics when its batch statistics are
        not finite or it had no values (``steps`` still counts the call).

    Returns:
      ``(y, new_stats)``; ``new_stats`` is ``stats`` itself in inference mode.

    Raises:
      TypeError: ``x`` not floating point, ``training`` not a bool, bad ``warmup_steps``.
      ValueError: bad ``axis``, ``momentum``, ``epsilon``, ``mask`` shape, missing
        statistics or ones of another feature shape, negative ``warmup_steps``.

    Example:
      >>> x = jnp.array([[1.0], [3.0]])
      >>> y, new = crossq_batch_renorm(x, init_crossq_stats(1), training=True, epsilon=1e-6)
      >>> y.round(3).ravel().tolist(), round(float(new["mean"][0]), 4), new["steps"]
      ([-1.0, 1.0], 0.02, 1)
    """
    C.check_input(x)
    C.check_mode("training", training, optional=False)
    C.check_momentum(momentum)
    _check_warmup(warmup_steps)
    epsilon = C.check_epsilon(epsilon, jnp.result_type(x))
    C.check_dtype("dtype", dtype)
    axes = canonicalize_axes(axis, x.ndim)
    _check_stats(stats, tuple(x.shape[a] for a in axes), axes)
    params = {} if params is None else params
    scale, bias = params.get("scale"), params.get("bias")
    m = None if mask is None else C.mask_to_input_rank(mask, x.shape, axes)
    if not training:
        return _output(x, m, stats["mean"], stats["var"], scale, bias, axes, epsilon,
                       dtype), stats
    batch = moments(x, axes, mask=m, axis_name=axis_name, axis_index_groups=axis_index_groups)
    warm = jnp.greater_equal(stats["steps"], warmup_steps)
    mean, var = _corrected(batch, stats, epsilon, warm, stat_dtype(x.dtype))
    y = _output(x, m, mean, var, scale, bias, axes, epsilon, dtype)
    new = dict(stats)
    new.update(update_moving_stats(stats, batch, momentum, guard=guard_non_finite))
    new["steps"] = operator.add(stats["steps"], 1)
    return y, new


class BatchRenorm(nn.Module):
    """CrossQ's batch renormalization layer: ``sbx.common.jax_layers.BatchRenorm``, exact.

    A CrossQ or SBX model adopts it by changing one import (``from bnjax import
    BatchRenorm``): the same fields (defaults included: momentum 0.99, epsilon 0.001,
    ``warmup_steps`` 100 000), the same call, the same variables (``params/{scale, bias}``,
    ``batch_stats/{mean, var, r_max, d_max, steps}``), so checkpoints load unchanged. The
    arithmetic is :func:`crossq_batch_renorm`; its statistics are exact where the published
    layer's ``E[x^2] - E[x]^2`` loses digits. During ``init`` the running statistics are not
    updated, ``axis_name`` is not used and the output is plain batch norm, as published.

    Attributes:
      use_running_average: running statistics (inference) instead of batch ones; merged with
        the call's argument as in ``flax.linen.BatchNorm``.
      axis: the feature axis or axes.
      momentum: weight on the old running value.
      epsilon: added to the variances inside the square roots.
      warmup_steps: training calls of plain batch norm before the correction starts.
      dtype: output dtype (default: the input's).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias: learn a bias (beta).
      use_scale: learn a scale (gamma).
      bias_init: initializer of the bias.
      scale_init: initializer of the scale.
      axis_name: named mapped axis (or axes) for synchronized statistics.
      axis_index_groups: groups of that axis reduced separately.
      guard_non_finite: keep the running statistics of a feature whose batch statistics are
        not finite (bnjax's guard; the published layer has none).

    Example:
      >>> import jax
      >>> layer = BatchRenorm(use_running_average=False, warmup_steps=10)
      >>> v = layer.init(jax.random.key(0), jnp.ones((4, 3)))
      >>> sorted(v["batch_stats"]), v["batch_stats"]["r_max"]
      (['d_max', 'mean', 'r_max', 'steps', 'var'], 3)
      >>> y, upd = layer.apply(v, jnp.arange(12.0).reshape(4, 3), mutable=["batch_stats"])
      >>> int(upd["batch_stats"]["steps"]), y.shape
      (1, (4, 3))
    """

    use_running_average: bool | None = None
    axis: int | Sequence[int] = -1
    momentum: float = 0.99
    epsilon: float = 0.001
    warmup_steps: int = 100_000
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Callable[..., Array] = nn.initializers.zeros
    scale_init: Callable[..., Array] = nn.initializers.ones
    axis_name: str | Sequence[str] | None = None
    axis_index_groups: Any = None
    guard_non_finite: bool = True

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None, *,
                 mask: Array | None = None) -> Array:
        """Normalizes ``x``; updates ``batch_stats`` in training (not during ``init``).

        Args:
          x: the input.
          use_running_average: as in ``flax.linen.BatchNorm`` (merged with the field).
          mask: optional boolean mask (see :func:`crossq_batch_renorm`).

        Returns:
          The normalized input, shaped like ``x``.
        """
        use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                             use_running_average)
        C.check_input(x)
        axes = canonicalize_axes(self.axis, x.ndim)
        shape = tuple(x.shape[a] for a in axes)
        init = init_crossq_stats(shape)
        names = ("mean", "var") + STATS_KEYS[2:]
        vs = {k: self.variable("batch_stats", k, lambda v=init[k]: v) for k in names}
        params = {}
        if self.use_scale:
            params["scale"] = self.param("scale", self.scale_init, shape, self.param_dtype)
        if self.use_bias:
            params["bias"] = self.param("bias", self.bias_init, shape, self.param_dtype)
        stats = {k: v.value for k, v in vs.items()}
        initializing = self.is_initializing()
        y, new = crossq_batch_renorm(
            x, stats, params, training=not use_running_average,
            # During init: plain batch norm (steps < steps + 1), as the published layer.
            warmup_steps=operator.add(stats["steps"], 1) if initializing else self.warmup_steps,
            axis=axes, momentum=self.momentum, epsilon=self.epsilon,
            axis_name=None if initializing else self.axis_name,
            axis_index_groups=None if initializing else self.axis_index_groups,
            mask=mask, dtype=self.dtype, guard_non_finite=self.guard_non_finite)
        if not use_running_average and not initializing:
            for k in ("mean", "var", "steps"):
                vs[k].value = new[k]
        return y
