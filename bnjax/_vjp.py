"""The training-mode forward pass of batch normalization with a hand-written backward pass.

``train_forward(x, scale, bias, mask, axes, epsilon, axis_name, groups, out_dtype)`` returns
the normalized output and the batch ``Moments``. Its backward pass needs only ``x``, the batch
mean and ``1/std``, computes both per-feature sums in one reduction each (and, with
``axis_name``, one ``psum``), and gives masked-out positions no part at all: their values take
no part in the statistics, and their outputs carry no gradient (to ``x``, ``scale``, ``bias``
or the statistics), so garbage there (NaN, Inf, huge values) cannot reach any gradient.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bnjax.stats import (
    Moments,
    axis_names,
    combine_sums,
    gather_sums,
    local_sums,
    stat_dtype,
    sums_of,
    to_input_shape,
    vma,
)

Array = jax.Array

__all__ = ["normalize_with", "train_forward"]


def normalize_with(x: Array, mean: Array, var: Array, scale: Array | None,
                   bias: Array | None, axes: tuple[int, ...], epsilon: float,
                   out_dtype: Any) -> Array:
    """``scale * (x - mean) / sqrt(var + epsilon) + bias`` on canonical axes, no checks.

    Example:
      >>> normalize_with(jnp.array([[0.0], [2.0]]), jnp.ones(1), jnp.ones(1), None, None,
      ...                (1,), 0.0, jnp.float32).ravel().tolist()
      [-1.0, 1.0]
    """
    dt = stat_dtype(x.dtype)
    mul = lax.rsqrt(var.astype(dt) + epsilon)
    if scale is not None:
        mul = mul * scale.astype(dt)
    y = (x.astype(dt) - to_input_shape(mean.astype(dt), x.ndim, axes)) * to_input_shape(
        mul, x.ndim, axes)
    if bias is not None:
        y = y + to_input_shape(bias.astype(dt), x.ndim, axes)
    return y.astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def train_forward(x: Array, scale: Array | None, bias: Array | None, mask: Array | None,
                  axes: tuple[int, ...], epsilon: float, axis_name: Any, groups: Any,
                  out_dtype: Any) -> tuple[Array, Moments]:
    """Training-mode BN: ``(y, batch Moments)`` with batch (global, with ``axis_name``) stats.

    Example:
      >>> y, m = train_forward(jnp.array([[1.0], [3.0]]), None, None, None, (1,), 0.0,
      ...                      None, None, jnp.float32)
      >>> y.ravel().tolist(), m.mean.tolist(), m.var.tolist()
      ([-1.0, 1.0], [2.0], [1.0])
    """
    out, _ = _fwd(x, scale, bias, mask, axes, epsilon, axis_name, groups, out_dtype)
    return out


def _fwd(x, scale, bias, mask, axes, epsilon, axis_name, groups, out_dtype):
    stats = combine_sums(gather_sums(local_sums(x, axes, mask), axis_name, groups))
    y = normalize_with(x, stats.mean, stats.var, scale, bias, axes, epsilon, out_dtype)
    return (y, stats), (x, scale, bias, mask, stats)


def _bwd(axes, epsilon, axis_name, groups, out_dtype, res, cts):
    """Backward pass of training-mode BN from ``x``, the batch mean and 1/std.

    With ``xhat = (x - mean) * r``, ``r = 1/sqrt(var + eps)`` and ``g`` the scale,
    ``dx = g r (dy - m (sum(dy) + xhat * sum(dy * xhat)) / n)`` plus the terms from cotangents
    of the returned statistics; sums run over the whole (global) batch, all in one reduction.
    With a mask, the sums run over valid positions only, and masked-out positions get a zero
    gradient: a masked-out value is selected away (never multiplied by zero, which would
    turn a NaN or Inf there into a NaN gradient).
    """
    x, scale, bias, mask, stats = res
    dy, dstats = cts
    dt = stat_dtype(x.dtype)
    red = tuple(i for i in range(x.ndim) if i not in axes)

    def bshape(v: Array) -> Array:
        return to_input_shape(v, x.ndim, axes)

    r = lax.rsqrt(stats.var + epsilon)
    g = jnp.ones_like(r) if scale is None else scale.astype(dt)
    # x - mean and the casts are recomputed in each reduction and in dx rather than stored:
    # see sums_of (one pass on GPU/TPU, two fused reductions on CPU).

    def dy_valid(x: Array, dy: Array, mean: Array, *rest: Array) -> Array:
        dy = dy.astype(dt)
        return dy if mask is None else jnp.where(rest[0], dy, 0)

    def dy_xc(x: Array, dy: Array, mean: Array, *rest: Array) -> Array:
        v = dy.astype(dt) * (x.astype(dt) - bshape(mean))
        return v if mask is None else jnp.where(rest[0], v, 0)

    operands = (x, dy, stats.mean) + (() if mask is None else (mask,))
    sum_dy, sum_dy_xc = sums_of(dy_valid, dy_xc, operands, red)
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
    dx = bshape(g * r) * dy.astype(dt) + bshape(c_mean) + bshape(c_var) * (
        x.astype(dt) - bshape(stats.mean))
    if mask is not None:
        dx = jnp.where(mask, dx, 0)
    full = axis_name is not None and groups is None
    dscale = None if scale is None else _match_vma(
        sum_dy_xc * r, scale, glob[1] * r if full else None, axis_name).astype(scale.dtype)
    dbias = None if bias is None else _match_vma(
        sum_dy, bias, glob[0] if full else None, axis_name).astype(bias.dtype)
    dmask = None if mask is None else np.zeros(mask.shape, jax.dtypes.float0)
    return _match_vma(dx, x, None, axis_name).astype(x.dtype), dscale, dbias, dmask


def _match_vma(ct: Array, primal: Array, summed: Array | None, axis_name: Any) -> Array:
    """Gives a cotangent the varying axes of its primal, as ``jax.shard_map`` requires.

    A primal that is the same on every device (invariant, e.g. replicated parameters under
    ``shard_map``) gets the sum of the per-device cotangents, which is what JAX's own
    transpose of the implicit broadcast does. ``summed`` is that sum when already computed
    over exactly ``axis_name`` (the backward's one ``psum``), so no second collective is needed.
    Under ``pmap`` and ``vmap`` nothing is tracked and the cotangent stays per device.
    """
    extra = vma(ct) - vma(primal)
    if extra:
        names = set(axis_names(axis_name)) if axis_name is not None else set()
        ct = summed if summed is not None and extra == names else lax.psum(ct, tuple(extra))
    missing = vma(primal) - vma(ct)
    if missing:
        ct = lax.pcast(ct, tuple(missing), to="varying")
    return ct


train_forward.defvjp(_fwd, _bwd)
