"""The arithmetic of batch normalization: moments, normalization and the moving average.

Every other part of bnjax calls these functions; nothing else computes batch statistics.

Conventions (Keras and Flax): the variance is the biased batch variance, epsilon is added to
it inside the square root, and the moving statistics follow
``moving = momentum * moving + (1 - momentum) * batch``.

Shapes: ``x`` has any rank; ``axis`` names the feature axes (an int or a tuple of ints,
negatives allowed) and every other axis is reduced. Per-feature arrays (statistics, scale,
bias) have the *feature shape* ``tuple(x.shape[a] for a in axis)``, ``(C,)`` for the usual
channels-last case.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
Axis = int | Sequence[int]

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


class Moments(NamedTuple):
    """Batch statistics per feature: mean, biased variance, and the number of values used."""

    mean: Array
    var: Array
    count: Array


# --------------------------------------------------------------------------------------------
# Validation helpers (each error names the argument, the value and what is accepted).


def canonicalize_axes(axis: Axis, ndim: int) -> tuple[int, ...]:
    """Returns the feature axes as sorted non-negative ints, or raises a clear error.

    Args:
      axis: an int or a sequence of ints; negative values count from the end.
      ndim: rank of the input.

    Returns:
      The sorted tuple of feature axes.

    Example:
      >>> canonicalize_axes(-1, 4)
      (3,)
      >>> canonicalize_axes((1, -1), 4)
      (1, 3)
    """
    if isinstance(axis, int | np.integer):
        axes = (axis,)
    elif isinstance(axis, Sequence):
        axes = tuple(axis)
    else:
        raise TypeError(f"axis={axis!r} must be an int or a tuple of ints (the feature axes).")
    if not axes:
        raise ValueError(f"axis={axis!r} is empty; pass at least one feature axis.")
    out = []
    for a in axes:
        if not isinstance(a, int | np.integer) or isinstance(a, bool):
            raise TypeError(f"axis={axis!r} holds {a!r}; each feature axis must be an int.")
        if not -ndim <= a < ndim:
            raise ValueError(
                f"axis={axis!r} is out of range for an input of rank {ndim}; "
                f"accepted values are in [{-ndim}, {ndim - 1}]."
            )
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(
            f"axis={axis!r} names the same axis more than once (as {tuple(out)}) for an input "
            f"of rank {ndim}; each feature axis may appear once."
        )
    return tuple(sorted(out))


def _check_input(x: Array) -> None:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"x has dtype {dtype}; batch normalization needs a floating-point input "
            "(float16, bfloat16, float32 or float64). Cast it first, e.g. x.astype(jnp.float32)."
        )


def _check_hparams(momentum: Any, epsilon: Any) -> None:
    if not isinstance(momentum, jax.Array) and not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(
            f"momentum={momentum!r} is outside [0, 1]; it is the weight on the old moving value "
            "(Keras convention, default 0.99). A PyTorch momentum m converts to 1 - m."
        )
    if not isinstance(epsilon, jax.Array) and not float(epsilon) > 0.0:
        raise ValueError(
            f"epsilon={epsilon!r} must be > 0; it is added to the variance inside the square "
            "root (Keras default 1e-3)."
        )


def _stat_dtype(dtype: Any) -> Any:
    """Statistics are computed in float32, or float64 when the input is float64."""
    return jnp.promote_types(dtype, jnp.float32)


def _feature_shape(x: Array, axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x.shape[a] for a in axes)


def _to_input_shape(v: Array, ndim: int, axes: tuple[int, ...]) -> Array:
    """Reshapes a per-feature array so it broadcasts against the input."""
    shape = [1] * ndim
    for a, n in zip(axes, v.shape, strict=True):
        shape[a] = n
    return v.reshape(shape)


def _mask_to_input_rank(mask: Array, x_shape: tuple[int, ...], axes: tuple[int, ...]) -> Array:
    """Validates a mask and returns it with the input's rank (size 1 on feature axes)."""
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"mask has dtype {mask.dtype}; it must be boolean (True = use the value).")
    reduced_shape = tuple(n for i, n in enumerate(x_shape) if i not in axes)
    if mask.shape == tuple(x_shape):
        return mask
    if mask.shape == reduced_shape:
        return jnp.expand_dims(mask, axes)
    raise ValueError(
        f"mask has shape {mask.shape}; for an input of shape {tuple(x_shape)} with feature "
        f"axes {axes} it must have shape {reduced_shape} (the input without its feature axes) "
        f"or {tuple(x_shape)} (the input's shape)."
    )


# --------------------------------------------------------------------------------------------
# Moments.


def _local_sums(x: Array, axes: tuple[int, ...], mask: Array | None) -> Array:
    """Per-device shifted sums, stacked as ``[count, shift, sum(x - shift), sum((x - shift)^2)]``.

    The shift is one value of the batch per feature (the first valid one), so the sums stay
    small even when ``|mean| / std`` is large and ``E[x^2] - E[x]^2`` would lose every digit.
    The two sums are two reductions that each read ``x`` once (see below).
    """
    dt = _stat_dtype(x.dtype)
    red = tuple(i for i in range(x.ndim) if i not in axes)
    if mask is None:
        first = tuple(0 if i in red else slice(None) for i in range(x.ndim))
        shift = x[first].astype(dt)
        count = jnp.full(shift.shape, np.prod([x.shape[i] for i in red]), dt)
    else:
        # Shift by the first valid position (over all features when the mask is per value).
        pos = jnp.any(mask, axis=axes, keepdims=True) if mask.shape == x.shape else mask
        idx = jnp.unravel_index(jnp.argmax(pos.reshape(-1)), pos.shape)
        starts = [idx[i] if i in red else 0 for i in range(x.ndim)]
        sizes = [1 if i in red else x.shape[i] for i in range(x.ndim)]
        shift = lax.dynamic_slice(x, starts, sizes).reshape(_feature_shape(x, axes)).astype(dt)
        count = jnp.sum(mask, axis=red, dtype=dt)
        count = jnp.broadcast_to(count.reshape([mask.shape[a] for a in axes]), shift.shape)
    shift = lax.stop_gradient(shift)
    # Each sum recomputes ``x - shift`` (and the cast of a half-precision ``x``) inside its own
    # reduction, reading only ``x``. With one shared difference or cast, XLA (CPU) writes it
    # out as a full-size temporary for the two sums to read, which costs more than reading
    # ``x`` twice. Copies that XLA cannot merge keep both fused; the barrier moves no data.
    x_1, x_2, shift_1, shift_2 = lax.optimization_barrier((x, x, shift, shift))
    d1 = x_1.astype(dt) - _to_input_shape(shift_1, x.ndim, axes)
    d2 = x_2.astype(dt) - _to_input_shape(shift_2, x.ndim, axes)
    if mask is not None:
        d1, d2 = jnp.where(mask, d1, 0), jnp.where(mask, d2, 0)
    s1 = jnp.sum(d1, axis=red)
    s2 = jnp.sum(d2 * d2, axis=red)
    return jnp.stack([count, shift, s1, s2])


def _combine_sums(sums: Array) -> Moments:
    """Exact mean and biased variance from stacked per-part sums of shape ``(P, 4, *F)``.

    Uses the parallel-variance formula (Chan et al.): each part's mean and sum of squared
    deviations, then the spread of the part means around the global mean. Parts with no
    values contribute nothing; with no values at all the mean and variance are 0 and count 0.
    """
    n, shift, s1, s2 = sums[:, 0], sums[:, 1], sums[:, 2], sums[:, 3]
    has = n > 0
    safe_n = jnp.where(has, n, 1)
    # Part means as offsets from one reference value (the shift of the first part with
    # values): with a large |mean| / std the offsets stay small, so their spread keeps its
    # digits (the part means themselves would be rounded to the precision of the mean).
    ref = jnp.take_along_axis(shift, jnp.argmax(has, axis=0)[None], axis=0)[0]
    part_dev = (shift - ref) + s1 / safe_n
    part_m2 = jnp.maximum(s2 - s1 * s1 / safe_n, 0)
    total = jnp.sum(n, axis=0)
    safe_total = jnp.where(total > 0, total, 1)
    dev = jnp.sum(jnp.where(has, n * part_dev, 0), axis=0) / safe_total
    spread = jnp.where(has, n * jnp.square(part_dev - dev), 0)
    var = (jnp.sum(jnp.where(has, part_m2, 0), axis=0) + jnp.sum(spread, axis=0)) / safe_total
    mean = jnp.where(total > 0, ref + dev, 0)
    return Moments(mean, jnp.maximum(var, 0), total)


def _gather_sums(
    local: Array, axis_name: str | Sequence[str] | None, axis_index_groups: Any
) -> Array:
    """One collective: every device receives every device's sums (or its group's)."""
    if axis_name is None:
        return local[None]
    _check_axis(axis_name, axis_index_groups)
    names = frozenset(_axis_names(axis_name))
    if axis_index_groups is None and names <= _vma(local) and _HAS_GATHER_TO:
        # Under jax.shard_map the gathered sums are the same on every device: say so, so that
        # the statistics (and the moving averages) are typed as replicated across the axis.
        return lax.all_gather(local, axis_name, tiled=False, to="invarying")
    return lax.all_gather(local, axis_name, axis_index_groups=axis_index_groups, tiled=False)


_HAS_GATHER_TO = "to" in inspect.signature(lax.all_gather).parameters


def _axis_names(axis_name: str | Sequence[str]) -> tuple[Any, ...]:
    return tuple(axis_name) if isinstance(axis_name, list | tuple) else (axis_name,)


def _check_axis(axis_name: str | Sequence[str], axis_index_groups: Any) -> None:
    """Trace-time check: the axis name is bound and the groups partition it evenly."""
    size = 1
    for name in _axis_names(axis_name):
        try:
            size *= lax.axis_size(name)
        except NameError:
            raise ValueError(
                f"axis_name={axis_name!r} is not bound here: {name!r} must be the axis_name of "
                "an enclosing jax.pmap, jax.vmap, flax.linen.vmap or the mesh axis of a "
                "jax.shard_map. Use axis_name=None under plain jax.jit (sharded inputs give "
                "global statistics there without it)."
            ) from None
    if axis_index_groups is None:
        return
    try:
        groups = [[int(i) for i in g] for g in axis_index_groups]
    except TypeError:
        groups = []
    flat = sorted(i for g in groups for i in g)
    if not groups or flat != list(range(size)) or len({len(g) for g in groups}) != 1:
        raise ValueError(
            f"axis_index_groups={axis_index_groups!r} does not partition the {size} indices of "
            f"axis_name={axis_name!r} into groups of equal size; every index 0..{size - 1} must "
            "appear in exactly one group, e.g. [[0, 1], [2, 3], ...]."
        )


def moments(
    x: Array,
    axis: Axis = -1,
    *,
    mask: Array | None = None,
    axis_name: str | Sequence[str] | None = None,
    axis_index_groups: Any = None,
) -> Moments:
    """Mean and biased variance of ``x`` over every axis but ``axis``.

    Accurate where ``E[x^2] - E[x]^2`` breaks down (large ``|mean| / std``): each device sums
    deviations from one of its own values, and the parts are combined with the exact parallel
    variance formula. With ``axis_name`` the statistics are those of the global batch across
    that named axis (``pmap``, ``shard_map``, ``vmap``), computed with a single collective.

    Args:
      x: input, any float dtype; ``(..., C)`` for the default ``axis=-1``.
      axis: feature axis or axes; all other axes are reduced.
      mask: optional boolean, shaped like ``x`` without its feature axes (or like ``x``);
        False entries take no part in the statistics.
      axis_name: named mapped axis (or axes) to reduce over as well.
      axis_index_groups: optional partition of that axis into groups reduced separately.

    Returns:
      ``Moments(mean, var, count)``, each of the feature shape, in float32 (float64 for
      float64 input).

    Example:
      >>> import jax.numpy as jnp
      >>> m = moments(jnp.array([[1.0, 10.0], [3.0, 30.0]]))
      >>> m.mean.tolist(), m.var.tolist()
      ([2.0, 20.0], [1.0, 100.0])
    """
    _check_input(x)
    axes = canonicalize_axes(axis, x.ndim)
    m = None if mask is None else _mask_to_input_rank(mask, x.shape, axes)
    local = _local_sums(x, axes, m)
    gathered = _gather_sums(local, axis_name, axis_index_groups)
    parts = gathered.reshape((-1,) + local.shape)
    return _combine_sums(parts)


# --------------------------------------------------------------------------------------------
# Normalization and the moving average.


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
      x: input ``(..., C)`` (or with the feature axes ``axis``).
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
      >>> import jax.numpy as jnp
      >>> y = normalize(jnp.array([[0.0], [2.0]]), jnp.array([1.0]), jnp.array([1.0]),
      ...               epsilon=1e-12)
      >>> y.ravel().tolist()
      [-1.0, 1.0]
    """
    _check_input(x)
    axes = canonicalize_axes(axis, x.ndim)
    dt = _stat_dtype(x.dtype)
    out_dtype = x.dtype if dtype is None else dtype
    mul = lax.rsqrt(var.astype(dt) + epsilon)
    if scale is not None:
        mul = mul * scale.astype(dt)
    y = (x.astype(dt) - _to_input_shape(mean.astype(dt), x.ndim, axes)) * _to_input_shape(
        mul, x.ndim, axes
    )
    if bias is not None:
        y = y + _to_input_shape(bias.astype(dt), x.ndim, axes)
    return y.astype(out_dtype)


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
      momentum: weight on the old moving value, in [0, 1].
      guard: when True, a feature whose batch statistics are not finite, or that had no
        values at all (everything masked), keeps its moving statistics unchanged.

    Returns:
      The new ``{"mean", "var"}`` in the dtype of ``stats``.

    Example:
      >>> import jax.numpy as jnp
      >>> new = update_moving_stats({"mean": jnp.zeros(1), "var": jnp.ones(1)},
      ...                           Moments(jnp.ones(1), jnp.ones(1) * 3, jnp.ones(1) * 4),
      ...                           momentum=0.5)
      >>> new["mean"].tolist(), new["var"].tolist()
      ([0.5], [2.0])
    """
    out = {}
    ok = (batch.count > 0) & jnp.isfinite(batch.mean) & jnp.isfinite(batch.var)
    for key, value in (("mean", batch.mean), ("var", batch.var)):
        old = stats[key]
        new = momentum * old + (1 - momentum) * value.astype(old.dtype)
        out[key] = jnp.where(ok, new, old).astype(old.dtype) if guard else new.astype(old.dtype)
    return out


# --------------------------------------------------------------------------------------------
# Training-mode forward with a hand-written backward pass.


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _train_forward(x, scale, bias, mask, axes, epsilon, axis_name, groups, out_dtype):
    out, _ = _train_forward_fwd(x, scale, bias, mask, axes, epsilon, axis_name, groups, out_dtype)
    return out


def _train_forward_fwd(x, scale, bias, mask, axes, epsilon, axis_name, groups, out_dtype):
    local = _local_sums(x, axes, mask)
    parts = _gather_sums(local, axis_name, groups).reshape((-1,) + local.shape)
    stats = _combine_sums(parts)
    y = normalize(x, stats.mean, stats.var, scale, bias, axis=axes, epsilon=epsilon,
                  dtype=out_dtype)
    return (y, stats), (x, scale, bias, mask, stats)


def _train_forward_bwd(axes, epsilon, axis_name, groups, out_dtype, res, cts):
    """Backward pass of training-mode BN from ``x``, the batch mean and 1/std.

    With ``xhat = (x - mean) * r``, ``r = 1/sqrt(var + eps)`` and ``g`` the scale,
    ``dx = g r (dy - m (sum(dy) + xhat * sum(dy * xhat)) / n)`` plus the terms from cotangents
    of the returned statistics; sums run over the whole (global) batch, all in one reduction.
    """
    x, scale, bias, mask, stats = res
    dy, dstats = cts
    dt = _stat_dtype(x.dtype)
    red = tuple(i for i in range(x.ndim) if i not in axes)
    bshape = functools.partial(_to_input_shape, ndim=x.ndim, axes=axes)
    r = lax.rsqrt(stats.var + epsilon)
    g = jnp.ones_like(r) if scale is None else scale.astype(dt)
    # x - mean and the casts are recomputed in each reduction and in dx rather than stored
    # (see _local_sums): separate copies keep XLA from merging them into written temporaries.
    x_1, dy_1, dy_2, mean_1, mean_2 = lax.optimization_barrier(
        (x, dy, dy, stats.mean, stats.mean))
    sum_dy = jnp.sum(dy_1.astype(dt), axis=red)
    sum_dy_xc = jnp.sum(dy_2.astype(dt) * (x_1.astype(dt) - bshape(mean_1)), axis=red)
    dy = dy.astype(dt)
    xc = x.astype(dt) - bshape(mean_2)
    local = jnp.stack([sum_dy, sum_dy_xc])
    dmean = dstats.mean.astype(dt)
    dvar = dstats.var.astype(dt)
    if axis_name is not None:
        both = lax.psum(jnp.concatenate([local, dmean[None], dvar[None]]), axis_name,
                        axis_index_groups=groups)
        glob, dmean, dvar = both[:2], both[2], both[3]
    else:
        glob = local
    n = jnp.maximum(stats.count, 1)
    # d loss / d mean and d loss / d var of the batch statistics, per feature.
    c_mean = (-g * r * glob[0] + dmean) / n
    c_var = (-0.5 * g * r**3 * glob[1] + dvar) * 2 / n
    dx = bshape(g * r) * dy + bshape(c_mean) + bshape(c_var) * xc
    if mask is not None:
        # Masked-out values take no part in the statistics: only their direct path remains.
        dx = jnp.where(mask, dx, bshape(g * r) * dy)
    full = axis_name is not None and groups is None
    dscale = None if scale is None else _match_vma(
        sum_dy_xc * r, scale, glob[1] * r if full else None, axis_name).astype(scale.dtype)
    dbias = None if bias is None else _match_vma(
        sum_dy, bias, glob[0] if full else None, axis_name).astype(bias.dtype)
    dmask = None if mask is None else np.zeros(mask.shape, jax.dtypes.float0)
    return _match_vma(dx, x, None, axis_name).astype(x.dtype), dscale, dbias, dmask


def _vma(v: Any) -> frozenset:
    """The manual mesh axes ``v`` varies over (``jax.shard_map`` with ``check_vma``)."""
    aval = jax.typeof(v)
    mat = getattr(aval, "manual_axis_type", None)  # jax >= 0.9
    return frozenset(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ())


def _match_vma(ct: Array, primal: Array, summed: Array | None, axis_name: Any) -> Array:
    """Gives a cotangent the varying axes of its primal, as ``jax.shard_map`` requires.

    A primal that is the same on every device (invariant, e.g. replicated parameters under
    ``shard_map``) gets the sum of the per-device cotangents, which is what JAX's own
    transpose of the implicit broadcast does. ``summed`` is that sum when already computed
    over exactly ``axis_name`` (the backward's one ``psum``), so no second collective is needed.
    Under ``pmap`` and ``vmap`` nothing is tracked and the cotangent stays per device.
    """
    extra = _vma(ct) - _vma(primal)
    if extra:
        names = set(_axis_names(axis_name)) if axis_name is not None else set()
        ct = summed if summed is not None and extra == names else lax.psum(ct, tuple(extra))
    missing = _vma(primal) - _vma(ct)
    if missing:
        ct = lax.pcast(ct, tuple(missing), to="varying")
    return ct


_train_forward.defvjp(_train_forward_fwd, _train_forward_bwd)


# --------------------------------------------------------------------------------------------
# The public entry point.


def _check_per_feature(name: str, value: Array | None, feature_shape: tuple[int, ...],
                       axes: tuple[int, ...]) -> None:
    if value is not None and tuple(jnp.shape(value)) != feature_shape:
        raise ValueError(
            f"{name} has shape {tuple(jnp.shape(value))} but the input has feature shape "
            f"{feature_shape} on axis {axes}; the statistics and parameters must match the "
            "input's feature axes (was the layer built for another number of channels?)."
        )


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
      stats: moving statistics ``{"mean": (C,), "var": (C,)}`` (feature shape for tuple axes).
      params: optional ``{"scale": (C,), "bias": (C,)}``; either key may be absent.
      training: use (and update) batch statistics, or use the moving ones.
      axis: feature axis or axes (int or tuple, negatives allowed); all others are reduced.
      momentum: weight on the old moving value, in [0, 1].
      epsilon: added to the variance inside the square root, > 0.
      axis_name: named mapped axis to compute global batch statistics over.
      axis_index_groups: groups of that axis reduced separately (see ``jax.lax.psum``).
      mask: optional boolean shaped like ``x`` without its feature axes (or like ``x``);
        masked-out values take no part in the statistics (they are still normalized).
      dtype: output dtype; defaults to ``x.dtype``.
      guard_non_finite: keep a feature's moving statistics unchanged when its batch
        statistics are not finite or it had no values (training mode only).
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
        ``d`` to ``[-dmax, dmax]``; a missing key means no limit.
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
      TypeError: ``x`` is not floating point, or ``mask`` is not boolean.
      ValueError: bad ``axis``, ``momentum``, ``epsilon``, ``mask`` shape, statistics or
        parameters of another feature shape, or training with a single value per feature.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[1.0, 2.0], [3.0, 6.0]])
      >>> stats = {"mean": jnp.zeros(2), "var": jnp.ones(2)}
      >>> y, new = batch_norm(x, stats, training=True, epsilon=1e-6)
      >>> y.round(3).tolist()
      [[-1.0, -1.0], [1.0, 1.0]]
      >>> [round(float(v), 4) for v in new["mean"]]
      [0.02, 0.04]
    """
    _check_input(x)
    _check_hparams(momentum, epsilon)
    if not isinstance(training, bool | np.bool_):
        raise TypeError(
            f"training={training!r} must be a Python bool (True: batch statistics, "
            "False: moving statistics); it selects the computation, so it cannot be traced."
        )
    axes = canonicalize_axes(axis, x.ndim)
    feature_shape = _feature_shape(x, axes)
    for key in ("mean", "var"):
        if key not in stats:
            raise ValueError(f"stats has keys {sorted(stats)}; it needs 'mean' and 'var'.")
        _check_per_feature(f"stats['{key}']", stats[key], feature_shape, axes)
    params = {} if params is None else params
    unknown = set(params) - {"scale", "bias"}
    if unknown:
        raise ValueError(f"params has unknown keys {sorted(unknown)}; accepted: 'scale', 'bias'.")
    scale, bias = params.get("scale"), params.get("bias")
    _check_per_feature("params['scale']", scale, feature_shape, axes)
    _check_per_feature("params['bias']", bias, feature_shape, axes)
    m = None if mask is None else _mask_to_input_rank(mask, x.shape, axes)
    if renorm:
        renorm_clipping = _check_renorm(renorm_clipping, renorm_momentum, stats)
        for key in _RENORM_KEYS:
            _check_per_feature(f"stats['{key}']", stats[key], feature_shape, axes)

    if not training:
        y = normalize(x, stats["mean"], stats["var"], scale, bias, axis=axes, epsilon=epsilon,
                      dtype=dtype)
        return y, stats

    reduced = int(np.prod([x.shape[i] for i in range(x.ndim) if i not in axes]))
    if virtual_batch_size is not None:
        virtual_batch_size = _check_virtual_batch(virtual_batch_size, x.shape, axes)
        reduced = reduced // (x.shape[0] // virtual_batch_size)
    if reduced == 1 and axis_name is None:
        raise ValueError(
            f"training=True with input shape {tuple(x.shape)} and feature axis {axes} leaves a "
            "single value per feature channel: its batch variance is 0 and the output would be "
            "the bias alone. Use training=False (moving statistics) or a larger batch."
        )
    out_dtype = x.dtype if dtype is None else jnp.dtype(dtype)
    return _train(
        x, stats, scale, bias, m, axes, float(epsilon), axis_name,
        _freeze_groups(axis_index_groups), out_dtype, momentum, guard_non_finite, renorm,
        renorm_clipping, renorm_momentum, virtual_batch_size)


def _freeze_groups(groups: Any) -> Any:
    """Makes ``axis_index_groups`` hashable for use as a static argument."""
    if groups is None:
        return None
    return tuple(tuple(int(i) for i in g) for g in groups)


# --------------------------------------------------------------------------------------------
# Variants: batch renormalization (Ioffe, 2017) and ghost batches (Hoffer et al., 2017).

_RENORM_KEYS = ("std", "renorm_mean", "renorm_std")
_CLIP_KEYS = ("rmin", "rmax", "dmax")


def init_renorm_stats(stats: Mapping[str, Array]) -> dict[str, Array]:
    """Adds the extra moving statistics batch renormalization keeps, initialized as Keras does.

    ``std`` is the moving standard deviation for inference (``var`` is derived from it after
    every renorm update, ``var = max(std**2 - epsilon, 0)``); ``renorm_mean`` and
    ``renorm_std`` are the moving statistics that the corrections ``r`` and ``d`` are taken
    against, updated with ``renorm_momentum``. Keras starts both standard deviations at
    ``sqrt(var)`` and ``renorm_mean`` at ``mean``.

    Args:
      stats: ``{"mean", "var"}`` moving statistics.

    Returns:
      A new dict with ``mean``, ``var``, ``std``, ``renorm_mean`` and ``renorm_std``.

    Example:
      >>> import jax.numpy as jnp
      >>> s = init_renorm_stats({"mean": jnp.zeros(2), "var": jnp.full(2, 4.0)})
      >>> sorted(s), s["std"].tolist()
      (['mean', 'renorm_mean', 'renorm_std', 'std', 'var'], [2.0, 2.0])
    """
    std = jnp.sqrt(stats["var"])
    return {**stats, "std": std, "renorm_mean": stats["mean"], "renorm_std": std}


def renorm_schedule(
    step: int | Array,
    *,
    rmax: float = 3.0,
    dmax: float = 5.0,
    warmup_steps: int = 5000,
    rmax_steps: int = 40000,
    dmax_steps: int = 25000,
) -> dict[str, Array]:
    """Clipping limits of batch renormalization at a training step, as in Ioffe (2017).

    The paper trains as plain batch norm (``rmax = 1``, ``dmax = 0``) for ``warmup_steps``,
    then relaxes the limits, reaching ``rmax`` at ``rmax_steps`` and ``dmax`` at
    ``dmax_steps`` (3 at 40k and 5 at 25k steps there). The relaxation here is linear;
    ``rmin = 1 / rmax`` throughout. ``step`` may be traced, so the limits can change inside a
    jitted train step; ``bnjax.BatchNorm(renorm=True, renorm_clipping=renorm_schedule)``
    counts the steps itself.

    Args:
      step: number of training steps taken.
      rmax: final upper limit of ``r`` (>= 1).
      dmax: final limit of ``|d|`` (>= 0).
      warmup_steps: steps run as plain batch norm.
      rmax_steps: step at which ``rmax`` is reached (> ``warmup_steps``).
      dmax_steps: step at which ``dmax`` is reached (> ``warmup_steps``).

    Returns:
      ``{"rmin", "rmax", "dmax"}`` as float32 scalars, a ``renorm_clipping`` mapping.

    Example:
      >>> c = renorm_schedule(22500)
      >>> round(float(c["rmax"]), 3), round(float(c["dmax"]), 3), round(float(c["rmin"]), 3)
      (2.0, 4.375, 0.5)
    """
    if not float(rmax) >= 1.0:
        raise ValueError(f"rmax={rmax!r} must be >= 1 (r is clipped to [1/rmax, rmax]).")
    if not float(dmax) >= 0.0:
        raise ValueError(f"dmax={dmax!r} must be >= 0 (d is clipped to [-dmax, dmax]).")
    for name, end in (("rmax_steps", rmax_steps), ("dmax_steps", dmax_steps)):
        if not end > warmup_steps:
            raise ValueError(
                f"{name}={end!r} must be greater than warmup_steps={warmup_steps!r}: it is the "
                "step at which the limit is fully relaxed."
            )
    step = jnp.asarray(step, jnp.float32)

    def ramp(end: int) -> Array:
        return jnp.clip((step - warmup_steps) / (end - warmup_steps), 0.0, 1.0)

    r_hi = 1.0 + (rmax - 1.0) * ramp(rmax_steps)
    return {"rmin": 1.0 / r_hi, "rmax": r_hi, "dmax": dmax * ramp(dmax_steps)}


def _check_renorm(
    clipping: Any, renorm_momentum: Any, stats: Mapping[str, Array]
) -> Mapping[str, Any]:
    clipping = {} if clipping is None else clipping
    if not isinstance(clipping, Mapping):
        raise TypeError(
            f"renorm_clipping={clipping!r} must be a mapping with optional keys 'rmin', 'rmax', "
            "'dmax' (or None for no clipping)."
        )
    unknown = set(clipping) - set(_CLIP_KEYS)
    if unknown:
        raise ValueError(
            f"renorm_clipping has unknown keys {sorted(unknown)}; accepted: 'rmin', 'rmax', "
            "'dmax'."
        )
    concrete = {k: v for k, v in clipping.items()
                if v is not None and not isinstance(v, jax.core.Tracer)}
    if "rmin" in concrete and "rmax" in concrete and float(concrete["rmax"]) < float(
            concrete["rmin"]):
        raise ValueError(
            f"renorm_clipping has rmax={concrete['rmax']!r} < rmin={concrete['rmin']!r}; "
            "r is clipped to [rmin, rmax], so rmax must be >= rmin."
        )
    if "dmax" in concrete and float(concrete["dmax"]) < 0:
        raise ValueError(
            f"renorm_clipping has dmax={concrete['dmax']!r}; it must be >= 0 (d is clipped to "
            "[-dmax, dmax])."
        )
    if not isinstance(renorm_momentum, jax.Array) and not 0.0 <= float(renorm_momentum) <= 1.0:
        raise ValueError(
            f"renorm_momentum={renorm_momentum!r} is outside [0, 1]; it is the weight on the old "
            "value of the renorm moving statistics (Keras default 0.99)."
        )
    missing = [k for k in _RENORM_KEYS if k not in stats]
    if missing:
        raise ValueError(
            f"renorm=True needs stats with keys {list(_RENORM_KEYS)} besides 'mean' and 'var'; "
            f"missing {missing}. Create them with bnjax.init_renorm_stats(stats)."
        )
    return clipping


def _check_virtual_batch(vbs: Any, x_shape: tuple[int, ...], axes: tuple[int, ...]) -> int:
    if isinstance(vbs, bool) or not isinstance(vbs, int | np.integer) or vbs < 1:
        raise TypeError(
            f"virtual_batch_size={vbs!r} must be a positive int (the number of examples per "
            "ghost batch) or None."
        )
    if not x_shape or 0 in axes:
        raise ValueError(
            f"virtual_batch_size={vbs!r} splits the batch axis 0, but axis 0 is a feature axis "
            f"(feature axes {axes}, input shape {tuple(x_shape)}); the batch must be axis 0."
        )
    if x_shape[0] % vbs:
        raise ValueError(
            f"virtual_batch_size={vbs!r} does not divide the batch size {x_shape[0]} (axis 0 of "
            f"an input of shape {tuple(x_shape)}); pick a divisor of the batch size."
        )
    return int(vbs)


def _renorm_correction(
    batch: Moments, stats: Mapping[str, Array], epsilon: float, clipping: Mapping[str, Any]
) -> tuple[Array, Array]:
    """Keras' ``r`` and ``d`` against the renorm moving statistics, clipped, gradient-free."""
    dt = batch.mean.dtype
    std = jnp.sqrt(batch.var + epsilon)
    ref_std = jnp.maximum(stats["renorm_std"].astype(dt), np.sqrt(epsilon).astype(dt))
    r = std / ref_std
    d = (batch.mean - stats["renorm_mean"].astype(dt)) / ref_std
    if clipping.get("rmin") is not None:
        r = jnp.maximum(r, jnp.asarray(clipping["rmin"], dt))
    if clipping.get("rmax") is not None:
        r = jnp.minimum(r, jnp.asarray(clipping["rmax"], dt))
    if clipping.get("dmax") is not None:
        dmax = jnp.asarray(clipping["dmax"], dt)
        d = jnp.clip(d, -dmax, dmax)
    return lax.stop_gradient(r), lax.stop_gradient(d)


def _update_renorm_stats(
    stats: Mapping[str, Array],
    batch: Moments,
    momentum: float | Array,
    renorm_momentum: float | Array,
    epsilon: float,
    guard: bool,
) -> dict[str, Array]:
    """Keras 3's renorm updates: EMAs of the batch mean and std, ``var`` derived from ``std``."""
    ok = (batch.count > 0) & jnp.isfinite(batch.mean) & jnp.isfinite(batch.var)
    std = jnp.sqrt(batch.var + epsilon)

    def ema(key: str, value: Array, mom: float | Array) -> Array:
        old = stats[key]
        new = mom * old + (1 - mom) * value.astype(old.dtype)
        return (jnp.where(ok, new, old) if guard else new).astype(old.dtype)

    out = dict(stats)
    out["renorm_mean"] = ema("renorm_mean", batch.mean, renorm_momentum)
    out["renorm_std"] = ema("renorm_std", std, renorm_momentum)
    out["mean"] = ema("mean", batch.mean, momentum)
    out["std"] = ema("std", std, momentum)
    var = jnp.maximum(jnp.square(out["std"]) - epsilon, 0)
    out["var"] = (jnp.where(ok, var, stats["var"]) if guard else var).astype(stats["var"].dtype)
    return out


def _average_ghost_moments(batch: Moments) -> Moments:
    """Mean over the ghost batches (leading axis) of their means and variances.

    Ghost batches without any value (all masked) are left out of the average.
    """
    has = batch.count > 0
    k = jnp.maximum(jnp.sum(has, axis=0), 1).astype(batch.mean.dtype)
    mean = jnp.sum(jnp.where(has, batch.mean, 0), axis=0) / k
    var = jnp.sum(jnp.where(has, batch.var, 0), axis=0) / k
    return Moments(mean, var, jnp.sum(batch.count, axis=0))


def _train(
    x: Array,
    stats: Mapping[str, Array],
    scale: Array | None,
    bias: Array | None,
    mask: Array | None,
    axes: tuple[int, ...],
    epsilon: float,
    axis_name: Any,
    groups: Any,
    out_dtype: Any,
    momentum: float | Array,
    guard: bool,
    renorm: bool,
    clipping: Mapping[str, Any],
    renorm_momentum: float | Array,
    virtual_batch_size: int | None,
) -> tuple[Array, dict[str, Array]]:
    """Training-mode forward over ``_train_forward``, plain or with renorm and/or ghost batches.

    Ghost batches: axis 0 is reshaped to ``(G, V)`` with ``V = virtual_batch_size``, so ghost
    batch ``k`` holds the contiguous examples ``k * V, ..., (k + 1) * V - 1``; each is
    normalized with its own statistics (``vmap`` over ``_train_forward``). Renorm: the
    normalized values ``xhat`` become ``(xhat * r + d) * scale + bias`` with ``r``, ``d``
    per ghost batch (or for the whole batch), gradients stopped.
    """
    dt = _stat_dtype(x.dtype)
    ghost = virtual_batch_size is not None
    if ghost:
        n_groups = x.shape[0] // virtual_batch_size

        def split(a: Array) -> Array:
            return a.reshape((n_groups, virtual_batch_size) + a.shape[1:])

        xs, ms = split(x), None if mask is None else split(mask)

        def run(s: Array | None, b: Array | None, od: Any) -> tuple[Array, Moments]:
            def one(xx: Array, mm: Array | None) -> tuple[Array, Moments]:
                return _train_forward(xx, s, b, mm, axes, epsilon, axis_name, groups, od)

            return jax.vmap(one)(xs, ms)

        def per_feature(v: Array) -> Array:
            shape = [n_groups] + [1] * x.ndim
            for a, n in zip(axes, v.shape[1:], strict=True):
                shape[a + 1] = n
            return v.reshape(shape)
    else:
        def run(s: Array | None, b: Array | None, od: Any) -> tuple[Array, Moments]:
            return _train_forward(x, s, b, mask, axes, epsilon, axis_name, groups, od)

        def per_feature(v: Array) -> Array:
            return _to_input_shape(v, x.ndim, axes)

    if renorm:
        xhat, batch = run(None, None, dt)
        r, d = _renorm_correction(batch, stats, epsilon, clipping)
        eff_scale, eff_bias = r, d
        if scale is not None:
            eff_scale, eff_bias = r * scale.astype(dt), d * scale.astype(dt)
        if bias is not None:
            eff_bias = eff_bias + bias.astype(dt)
        y = (xhat * per_feature(eff_scale) + per_feature(eff_bias)).astype(out_dtype)
    else:
        y, batch = run(scale, bias, out_dtype)
    if mask is not None:
        # A feature without any valid value (in a ghost batch, or in the whole batch) has no
        # batch statistics: it is normalized with the moving ones, as in inference mode.
        xx, ax = (xs, tuple(a + 1 for a in axes)) if ghost else (x, axes)
        moving = normalize(xx, stats["mean"], stats["var"], scale, bias, axis=ax,
                           epsilon=epsilon, dtype=out_dtype)
        y = jnp.where(per_feature(batch.count > 0), y, moving)
    if ghost:
        y = y.reshape(x.shape)
        batch = _average_ghost_moments(batch)
    if renorm:
        return y, _update_renorm_stats(stats, batch, momentum, renorm_momentum, epsilon, guard)
    return y, update_moving_stats(stats, batch, momentum, guard=guard)
