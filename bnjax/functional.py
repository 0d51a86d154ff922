"""The arithmetic of batch normalization: the public pure functions.

Every other part of bnjax calls these functions; nothing else computes batch statistics.

Conventions (Keras and Flax): the variance is the biased batch variance, epsilon is added to
it inside the square root, and the moving statistics follow
``moving = momentum * moving + (1 - momentum) * batch``.

Shapes: ``x`` has any rank; ``axis`` names the feature axes (an int or a tuple of ints,
negatives allowed) and every other axis is reduced. Per-feature arrays (statistics, scale,
bias) have the *feature shape* ``tuple(x.shape[a] for a in axis)``, ``(C,)`` for the usual
channels-last case.

Masks: a masked-out value takes no part in anything. It does not enter the statistics, it
cannot change an output at a valid position, and no gradient flows through it or through the
output at its position, whatever it holds (NaN, Inf, 1e30, any finite value). Outputs at
masked-out positions are still computed (normalized like the others) for convenience.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bnjax import _checks as C
from bnjax._checks import Axis, canonicalize_axes
from bnjax._complex import complex_moments, is_complex
from bnjax._train import normalize_with, train_forward
from bnjax.stats import Moments, moments, on_automatic_axes, stat_dtype, to_input_shape
from bnjax.variants import (
    RENORM_KEYS,
    average_ghost_moments,
    guarded,
    init_renorm_stats,
    renorm_correction,
    renorm_schedule,
    update_renorm_stats,
)

Array = jax.Array

__all__ = [
    "Moments",
    "batch_norm",
    "canonicalize_axes",
    "init_renorm_stats",
    "moments",
    "normalize",
    "renorm_schedule",
    "update_moving_stats",
]


def normalize(
    x: Array,
    mean: Array,
    var: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    axis: Axis = -1,
    epsilon: float = 1e-3,
    dtype: Any = None,
) -> Array:
    """``scale * (x - mean) / sqrt(var + epsilon) + bias``, per feature.

    Args:
      x: input ``(..., C)``.
      mean: per-feature mean, of the feature shape.
      var: per-feature variance, of the feature shape.
      scale: optional per-feature gamma.
      bias: optional per-feature beta.
      axis: feature axis or axes of ``x``.
      epsilon: added to the variance inside the square root.
      dtype: output dtype; defaults to ``x.dtype``.

    Returns:
      The normalized array, shaped like ``x``.

    Example:
      >>> y = normalize(jnp.array([[0.0], [2.0]]), jnp.array([1.0]), jnp.array([1.0]),
      ...               epsilon=1e-12)
      >>> y.ravel().tolist()
      [-1.0, 1.0]
    """
    C.check_input(x)
    axes = canonicalize_axes(axis, x.ndim)
    epsilon = C.check_epsilon(epsilon, jnp.result_type(x))
    C.check_dtype("dtype", dtype, allow_complex=True)
    out_dtype = x.dtype if dtype is None else dtype
    return normalize_with(x, mean, var, scale, bias, axes, epsilon, out_dtype)


def update_moving_stats(
    stats: Mapping[str, Array],
    batch: Moments,
    momentum: float | Array = 0.99,
    *,
    guard: bool = True,
) -> dict[str, Array]:
    """Keras/Flax moving average: ``momentum * moving + (1 - momentum) * batch``.

    Args:
      stats: ``{"mean": (C,), "var": (C,)}`` moving statistics.
      batch: the batch's ``Moments`` (biased variance).
      momentum: weight on the old moving value, in [0, 1] (may be traced: a schedule).
      guard: when True, a feature keeps its moving statistics when its batch statistics are
        not finite, when it had no values at all (everything masked), or when the updated
        value itself is not finite (a NaN momentum, an overflow).

    Returns:
      The new ``{"mean", "var"}`` in the dtype of ``stats``.

    Example:
      >>> new = update_moving_stats({"mean": jnp.zeros(1), "var": jnp.ones(1)},
      ...                           Moments(jnp.ones(1), jnp.ones(1) * 3, jnp.ones(1) * 4),
      ...                           momentum=0.5)
      >>> new["mean"].tolist(), new["var"].tolist()
      ([0.5], [2.0])
    """
    C.check_momentum(momentum)
    ok = (batch.count > 0) & jnp.isfinite(batch.mean) & jnp.isfinite(batch.var)
    out = {}
    for key, value in (("mean", batch.mean), ("var", batch.var)):
        old = stats[key]
        # A complex batch mean makes the moving mean complex (as in Flax); otherwise the
        # statistics keep their dtype.
        old = old.astype(jnp.promote_types(old.dtype, value.dtype)) if is_complex(value) else old
        out[key] = guarded(ok, momentum * old + (1 - momentum) * value.astype(old.dtype), old,
                           guard)
    return out


def _check_arrays(x: Array, stats: Mapping[str, Array], params: Mapping[str, Array] | None,
                  axes: tuple[int, ...], renorm: bool) -> tuple[Array | None, Array | None]:
    """Checks the statistics and parameters against the input; returns (scale, bias)."""
    feature_shape = tuple(x.shape[a] for a in axes)
    for key in ("mean", "var", *(RENORM_KEYS if renorm else ())):
        if key not in stats:
            hint = (" Create the renorm ones with bnjax.init_renorm_stats(stats)."
                    if key in RENORM_KEYS else "")
            raise ValueError(f"stats has keys {sorted(stats)}; it needs {key!r}.{hint}")
        C.check_per_feature(f"stats['{key}']", stats[key], feature_shape, axes)
    params = {} if params is None else params
    unknown = set(params) - {"scale", "bias"}
    if unknown:
        raise ValueError(f"params has unknown keys {sorted(unknown)}; accepted: 'scale', 'bias'.")
    scale, bias = params.get("scale"), params.get("bias")
    C.check_per_feature("params['scale']", scale, feature_shape, axes)
    C.check_per_feature("params['bias']", bias, feature_shape, axes)
    return scale, bias


def masked_normalize(x: Array, mask: Array, mean: Array, var: Array, scale: Array | None,
                      bias: Array | None, axes: tuple[int, ...], epsilon: float,
                      out_dtype: Any) -> Array:
    """Normalizes with given statistics; masked-out positions carry no gradient.

    Shared by the layers' inference path and CrossQ's batch renormalization
    (``bnjax.batch_renorm``); its arguments are checked by the caller.

    The gradient path sees a safe value (the mean) at masked-out positions, so that nothing
    there is multiplied by a zero cotangent (NaN * 0 is NaN); their output is the plain
    normalization, gradient-free.
    """
    safe = jnp.where(mask, x, to_input_shape(mean.astype(x.dtype), x.ndim, axes))
    live = normalize_with(safe, mean, var, scale, bias, axes, epsilon, out_dtype)
    dead = normalize_with(x, mean, var, scale, bias, axes, epsilon, out_dtype)
    return jnp.where(mask, live, lax.stop_gradient(dead))


def batch_norm(
    x: Array,
    stats: Mapping[str, Array],
    params: Mapping[str, Array] | None = None,
    *,
    training: bool,
    axis: Axis = -1,
    momentum: float | Array = 0.99,
    epsilon: float = 1e-3,
    axis_name: str | Sequence[str] | None = None,
    axis_index_groups: Any = None,
    mask: Array | None = None,
    dtype: Any = None,
    guard_non_finite: bool = True,
    renorm: bool = False,
    renorm_clipping: Mapping[str, Any] | None = None,
    renorm_momentum: float | Array = 0.99,
    virtual_batch_size: int | None = None,
) -> tuple[Array, Mapping[str, Array]]:
    """Batch normalization with Keras semantics, as a pure function.

    Training (``training=True``): normalizes with the batch mean and biased batch variance,
    ``y = scale * (x - mean_B) / sqrt(var_B + epsilon) + bias``, and returns the moving
    statistics updated as ``momentum * moving + (1 - momentum) * batch``. Inference
    (``training=False``): normalizes with the moving statistics and returns ``stats`` itself.

    Args:
      x: input ``(..., C)``; any float dtype (statistics are computed in float32 or wider).
        A complex input is normalized as Flax does: complex batch mean, real variance
        ``E[|x - mean|^2]`` (exact), a complex moving mean and a real moving variance.
      stats: moving statistics ``{"mean": (C,), "var": (C,)}`` (feature shape for tuple axes).
      params: optional ``{"scale": (C,), "bias": (C,)}``; either key may be absent.
      training: use (and update) batch statistics, or use the moving ones; a Python bool.
      axis: feature axis or axes (int or tuple, negatives allowed); all others are reduced.
      momentum: weight on the old moving value, in [0, 1]; may be traced (a schedule).
      epsilon: added to the variance inside the square root; a static finite number > 0.
      axis_name: named mapped axis to compute global batch statistics over.
      axis_index_groups: groups of that axis reduced separately (see ``jax.lax.psum``).
      mask: optional boolean shaped like ``x`` without its feature axes, or broadcastable to
        ``x``. A masked-out value takes no part in the statistics, cannot change an output
        at a valid position, and gets no gradient, whatever it holds; the output at its
        position is still normalized, but carries no gradient.
      dtype: output dtype; defaults to ``x.dtype``.
      guard_non_finite: keep a feature's moving statistics unchanged when its batch
        statistics or its updated moving statistics are not finite, or it had no values
        (training mode only).
      renorm: batch renormalization (Ioffe, 2017) with Keras 3 semantics. Training output
        ``((x - mean_B) / sigma_B * r + d) * scale + bias`` with ``sigma_B =
        sqrt(var_B + epsilon)``, ``r = sigma_B / renorm_std`` and ``d = (mean_B -
        renorm_mean) / renorm_std`` (``renorm_std`` floored at ``sqrt(epsilon)``), clipped
        by ``renorm_clipping``, gradients stopped through ``r`` and ``d``. ``stats`` then
        also holds ``std``, ``renorm_mean``, ``renorm_std`` (see ``init_renorm_stats``):
        ``renorm_*`` follow the batch mean and ``sigma_B`` with ``renorm_momentum``;
        ``mean`` and ``std`` follow them with ``momentum``, and ``var = max(std**2 -
        epsilon, 0)``. Inference is plain batch norm with ``mean`` and ``var``.
      renorm_clipping: optional ``{"rmin", "rmax", "dmax"}`` (any subset; values may be
        traced, e.g. from ``renorm_schedule``): ``r`` is clipped to ``[rmin, rmax]`` and
        ``d`` to ``[-dmax, dmax]``; a missing key means no limit. Concrete limits must
        satisfy ``0 < rmin <= 1 <= rmax`` and ``dmax >= 0``.
      renorm_momentum: weight on the old value of ``renorm_mean`` and ``renorm_std``.
      virtual_batch_size: ghost batch normalization (Hoffer et al., 2017) in training mode:
        axis 0 (the batch axis; it must not be a feature axis) is cut into consecutive ghost
        batches of this many examples (examples ``0..V-1`` form the first, ``V..2V-1`` the
        second, ...), each normalized with its own statistics and the shared scale and
        bias. It must divide the batch size. The moving statistics are updated once, from
        the mean over the ghost batches of their means and of their variances. With
        ``axis_name``, ghost batch ``k`` spans the ``k``-th ghost batch of every device.

    Returns:
      ``(y, new_stats)``: ``y`` shaped like ``x``; ``new_stats`` is ``stats`` itself in
      inference mode.

    Raises:
      TypeError: ``x`` is not floating point, ``mask`` is not boolean, ``training`` is not
        a bool, ``dtype`` is not a float dtype, or ``epsilon`` is traced.
      ValueError: bad ``axis``, ``momentum``, ``epsilon``, ``mask`` shape, clipping limits,
        ``axis_index_groups`` without ``axis_name``, statistics or parameters of another
        feature shape, an empty batch in training, or ghost batches of a single value per
        feature; ``renorm`` or ``virtual_batch_size`` with a complex input.

    Warns:
      SingleValueWarning: training with a single value per feature (no ``axis_name``): the
        batch variance is 0 and the output is the bias, as in Flax and Keras.

    Example:
      >>> x = jnp.array([[1.0, 2.0], [3.0, 6.0]])
      >>> stats = {"mean": jnp.zeros(2), "var": jnp.ones(2)}
      >>> y, new = batch_norm(x, stats, training=True, epsilon=1e-6)
      >>> y.round(3).tolist()
      [[-1.0, -1.0], [1.0, 1.0]]
      >>> [round(float(v), 4) for v in new["mean"]]
      [0.02, 0.04]
    """
    C.check_input(x)
    C.check_mode("training", training, optional=False)
    C.check_momentum(momentum)
    epsilon = C.check_epsilon(epsilon, jnp.result_type(x))
    C.check_dtype("dtype", dtype, allow_complex=True)
    axes = canonicalize_axes(axis, x.ndim)
    C.check_input(x, axes, training=bool(training))
    scale, bias = _check_arrays(x, stats, params, axes, renorm)
    groups = C.freeze_groups(axis_index_groups, axis_name)
    m = None if mask is None else C.mask_to_input_rank(mask, x.shape, axes)
    out_dtype = x.dtype if dtype is None else jnp.dtype(dtype)
    if renorm:
        renorm_clipping = C.check_renorm_clipping(renorm_clipping)
        C.check_momentum(renorm_momentum, "renorm_momentum")

    if not training:
        if m is None:
            y = normalize_with(x, stats["mean"], stats["var"], scale, bias, axes, epsilon,
                               out_dtype)
        else:
            y = masked_normalize(x, m, stats["mean"], stats["var"], scale, bias, axes,
                                  epsilon, out_dtype)
        return y, stats

    # math.prod, not int(np.prod(...)): a symbolic (jax.export) batch size stays symbolic.
    reduced = math.prod(x.shape[i] for i in range(x.ndim) if i not in axes)
    if virtual_batch_size is not None:
        virtual_batch_size = C.check_virtual_batch(virtual_batch_size, x.shape, axes)
        reduced = reduced // (x.shape[0] // virtual_batch_size)
    if reduced == 1 and axis_name is None:
        if virtual_batch_size is not None:
            raise ValueError(
                f"virtual_batch_size={virtual_batch_size} with input shape {tuple(x.shape)} and "
                f"feature axis {axes} leaves a single value per feature channel in each ghost "
                "batch: its output would be the bias alone. Use a larger virtual_batch_size.")
        C.warn_single_value(x.shape, axes)
    if is_complex(x):
        return _complex_train(x, stats, scale, bias, m, axes, epsilon, axis_name, groups,
                              out_dtype, momentum, guard_non_finite, renorm, virtual_batch_size)
    cfg = _TrainConfig(axes, epsilon, axis_name, groups, out_dtype, renorm,
                       renorm_clipping if renorm else {}, virtual_batch_size)
    y, batch = on_automatic_axes(lambda x, *a: _train(x, *a, cfg), x, axes, stats, scale,
                                 bias, m, returns_y=True)
    if renorm:
        return y, update_renorm_stats(stats, batch, momentum, renorm_momentum, epsilon,
                                      guard_non_finite)
    return y, update_moving_stats(stats, batch, momentum, guard=guard_non_finite)


def _complex_train(x: Array, stats: Mapping[str, Array], scale: Array | None,
                   bias: Array | None, mask: Array | None, axes: tuple[int, ...],
                   epsilon: float, axis_name: Any, groups: Any, out_dtype: Any,
                   momentum: float | Array, guard: bool, renorm: bool,
                   ghost: int | None) -> tuple[Array, dict[str, Array]]:
    """Training mode for a complex input (Flax's convention; see ``bnjax._complex``).

    The running mean becomes complex (as in Flax); the variance stays real. A feature without
    valid values is normalized with the moving statistics and keeps them.
    """
    for name, used in (("renorm", renorm), ("virtual_batch_size", ghost is not None)):
        if used:
            raise ValueError(f"{name} is not supported for complex input (x has dtype "
                             f"{x.dtype}); accepted for complex x: plain batch norm "
                             f"({name}={'False' if name == 'renorm' else 'None'}).")
    batch = complex_moments(x, axes, mask, axis_name, groups)
    y = normalize_with(x, batch.mean, batch.var, scale, bias, axes, epsilon, out_dtype)
    if mask is not None:
        moving = normalize_with(x, stats["mean"], stats["var"], scale, bias, axes, epsilon,
                                out_dtype)
        y = jnp.where(to_input_shape(batch.count > 0, x.ndim, axes), y,
                      lax.stop_gradient(moving))
    return y, update_moving_stats(stats, batch, momentum, guard=guard)


class _TrainConfig(NamedTuple):
    """The static settings of one training-mode call."""

    axes: tuple[int, ...]
    epsilon: float
    axis_name: Any
    groups: Any
    out_dtype: Any
    renorm: bool
    clipping: Mapping[str, Any]
    ghost: int | None


def _train(x: Array, stats: Mapping[str, Array], scale: Array | None, bias: Array | None,
           mask: Array | None, cfg: _TrainConfig) -> tuple[Array, Moments]:
    """Training-mode output and batch moments, plain or with renorm and/or ghost batches.

    Ghost batches: axis 0 is reshaped to ``(G, V)`` with ``V = virtual_batch_size``, so ghost
    batch ``k`` holds the contiguous examples ``k * V, ..., (k + 1) * V - 1``; each is
    normalized with its own statistics (``vmap`` over ``train_forward``) and the moments are
    averaged over the ghost batches. Renorm: the normalized values ``xhat`` become
    ``(xhat * r + d) * scale + bias`` with ``r``, ``d`` per ghost batch (or for the whole
    batch), gradients stopped.
    """
    dt = stat_dtype(x.dtype)
    axes = cfg.axes
    if cfg.ghost is not None:
        groups = x.shape[0] // cfg.ghost
        xs = x.reshape((groups, cfg.ghost) + x.shape[1:])
        ms = None if mask is None else mask.reshape((groups, -1) + mask.shape[1:])
        axes = tuple(a + 1 for a in cfg.axes)

        def run(s: Array | None, b: Array | None, od: Any) -> tuple[Array, Moments]:
            def one(xx: Array, mm: Array | None) -> tuple[Array, Moments]:
                return train_forward(xx, s, b, mm, cfg.axes, cfg.epsilon, cfg.axis_name,
                                     cfg.groups, od)

            return jax.vmap(one)(xs, ms)
    else:
        xs, ms = x, mask

        def run(s: Array | None, b: Array | None, od: Any) -> tuple[Array, Moments]:
            return train_forward(x, s, b, mask, axes, cfg.epsilon, cfg.axis_name, cfg.groups,
                                 od)

    def per_feature(v: Array) -> Array:
        """A per-feature (per ghost batch) array shaped to broadcast against ``xs``."""
        if cfg.ghost is None:
            return to_input_shape(v, xs.ndim, axes)
        return to_input_shape(v, xs.ndim, (0, *axes))

    if cfg.renorm:
        xhat, batch = run(None, None, dt)
        y = _renorm_output(xhat, ms, batch, stats, scale, bias, cfg, per_feature)
    else:
        y, batch = run(scale, bias, cfg.out_dtype)
    if mask is not None:
        # A feature without any valid value (in a ghost batch, or in the whole batch) has no
        # batch statistics: it is normalized with the moving ones, as in inference mode. All
        # its positions are masked out, so this output carries no gradient.
        moving = normalize_with(xs, stats["mean"], stats["var"], scale, bias, axes,
                                cfg.epsilon, cfg.out_dtype)
        y = jnp.where(per_feature(batch.count > 0), y, lax.stop_gradient(moving))
    if cfg.ghost is not None:
        y = y.reshape(x.shape)
        batch = average_ghost_moments(batch)
    return y, batch


def _renorm_output(xhat: Array, mask: Array | None, batch: Moments, stats: Mapping[str, Array],
                   scale: Array | None, bias: Array | None, cfg: _TrainConfig,
                   per_feature: Any) -> Array:
    """``(xhat * r + d) * scale + bias``; masked-out positions carry no gradient."""
    dt = xhat.dtype
    r, d = renorm_correction(batch, stats, cfg.epsilon, cfg.clipping)
    eff_scale, eff_bias = r, d
    if scale is not None:
        eff_scale, eff_bias = r * scale.astype(dt), d * scale.astype(dt)
    if bias is not None:
        eff_bias = eff_bias + bias.astype(dt)
    mul, add = per_feature(eff_scale), per_feature(eff_bias)
    if mask is None:
        return (xhat * mul + add).astype(cfg.out_dtype)
    live = jnp.where(mask, xhat, 0) * mul + add
    dead = lax.stop_gradient(xhat * mul + add)
    return jnp.where(mask, live, dead).astype(cfg.out_dtype)
