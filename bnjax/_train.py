"""The training-mode forward pass of batch normalization and its derivative, in both modes.

``train_forward(x, scale, bias, mask, axes, epsilon, axis_name, groups, out_dtype)`` returns
the normalized output and the batch ``Moments``. Its derivative is a custom JVP: a tangent
map linear in ``(dx, dscale, dbias)`` that forward mode (``jax.jvp``, ``jacfwd``,
``linearize``) evaluates and reverse mode (``grad``, ``vjp``, ``jacrev``) gets by JAX's
transposition. The map is written so that its transpose is the backward pass one would write
by hand: it keeps only ``x`` and per-feature values (``jax.checkpoint``), reduces two
per-feature sums (with ``axis_name``, one ``psum``) and writes nothing of ``x``'s size but
``dx``. Masked-out positions take no part at all: their values take no part in the
statistics, and their outputs carry no gradient (to ``x``, ``scale``, ``bias`` or the
statistics), so garbage there (NaN, Inf, huge values) cannot reach any gradient.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bnjax.stats import (
    Moments,
    apart,
    barrier,
    combine_sums,
    gather_sums,
    local_sums,
    stat_dtype,
    to_input_shape,
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


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6, 7, 8))
def train_forward(x: Array, scale: Array | None, bias: Array | None, mask: Array | None,
                  axes: tuple[int, ...], epsilon: float, axis_name: Any, groups: Any,
                  out_dtype: Any) -> tuple[Array, Moments]:
    """Training-mode BN: ``(y, batch Moments)`` with batch (global, with ``axis_name``) stats.

    Differentiable in both modes: the derivative is a custom JVP (:func:`_jvp`) whose tangent
    map JAX transposes into the backward pass.

    Example:
      >>> y, m = train_forward(jnp.array([[1.0], [3.0]]), None, None, None, (1,), 0.0,
      ...                      None, None, jnp.float32)
      >>> y.ravel().tolist(), m.mean.tolist(), m.var.tolist()
      ([-1.0, 1.0], [2.0], [1.0])
    """
    stats = combine_sums(gather_sums(local_sums(x, axes, mask), axis_name, groups))
    y = normalize_with(x, stats.mean, stats.var, scale, bias, axes, epsilon, out_dtype)
    return y, stats


@train_forward.defjvp
def _jvp(axes, epsilon, axis_name, groups, out_dtype, primals, tangents):
    """The output and its tangent: the batch statistics' derivative, linear in the tangents.

    With ``xc = x - mean``, ``r = 1/sqrt(var + eps)`` and ``g`` the scale, the tangents of the
    batch statistics are ``dmean = sum(dx) / n`` and ``dvar = 2 sum(xc dx) / n`` (sums over
    the whole, global batch: one ``psum`` of both), and ``dy = g r (dx - dmean) + xc (g dr +
    dg r) + db`` with ``dr = -r^3 dvar / 2``. JAX transposes this map into the backward pass,
    ``dx = g r (dy - (sum(dy) + xhat sum(dy xhat)) / n)`` with ``xhat = xc r`` (plus the
    terms from cotangents of the statistics): two per-feature sums and one elementwise pass.
    The map is under ``jax.checkpoint``, so that reverse mode keeps only its inputs (``x`` and
    per-feature values) and recomputes ``xc`` in the backward: no full-size intermediate is
    stored. With a mask, the sums run over valid positions only and the tangent (so the
    gradient) at masked-out positions is zero; ``xc`` is selected to 0 there, so that a NaN
    or Inf there never meets a zero cotangent.
    """
    x, scale, bias, mask = primals
    dx, dscale, dbias, _ = tangents
    y, stats = train_forward(x, scale, bias, mask, axes, epsilon, axis_name, groups, out_dtype)
    tangent = jax.checkpoint(prevent_cse=False, fun=functools.partial(
        _tangent_map, axes=axes, epsilon=epsilon, axis_name=axis_name, groups=groups,
        out_dtype=out_dtype))
    dy, dmean, dvar = tangent(x, stats, scale, mask, dx, dscale, dbias)
    return (y, stats), (dy, Moments(dmean, dvar, jnp.zeros_like(stats.count)))


def _tangent_map(x: Array, stats: Moments, scale: Array | None, mask: Array | None, dx: Array,
                 dscale: Array | None, dbias: Array | None, *, axes: tuple[int, ...],
                 epsilon: float, axis_name: Any, groups: Any, out_dtype: Any
                 ) -> tuple[Array, Array, Array]:
    """``(dy, dmean, dvar)``, linear in ``(dx, dscale, dbias)``; see :func:`_jvp`."""
    dt = stat_dtype(x.dtype)
    red = tuple(i for i in range(x.ndim) if i not in axes)

    def bshape(v: Array) -> Array:
        return to_input_shape(v, x.ndim, axes)

    r = lax.rsqrt(stats.var + epsilon)
    g = jnp.ones_like(r) if scale is None else scale.astype(dt)
    # x - mean is recomputed for each of its two uses (see stats.apart).
    (x1, m1), (x2, m2) = apart((x, stats.mean))

    def centered(x: Array, mean: Array) -> Array:
        xc = x.astype(dt) - bshape(mean)
        return xc if mask is None else jnp.where(mask, xc, 0)

    dxv = dx.astype(dt)
    if mask is not None:
        dxv = jnp.where(mask, dxv, 0)
    sums = (jnp.sum(dxv, axis=red), jnp.sum(centered(x1, m1) * dxv, axis=red))
    if axis_name is not None:
        sums = lax.psum(sums, axis_name, axis_index_groups=groups)  # one all-reduce
    n = jnp.maximum(stats.count, 1)
    dmean, dvar = sums[0] / n, 2 * sums[1] / n
    # dy = g r dx + shift + xc * coef, with per-feature shift and coef: in the backward
    # (the transpose), sum(dy) and sum(dy * xc) are then each reduced once.
    shift = -g * r * dmean
    if dbias is not None:
        shift = shift + dbias.astype(dt)
    coef = -0.5 * g * r**3 * dvar
    if dscale is not None:
        coef = coef + dscale.astype(dt) * r
    terms = (bshape(g * r) * dxv, jnp.broadcast_to(bshape(shift), x.shape),
             centered(x2, m2) * bshape(coef))
    if jnp.dtype(out_dtype) == dt:
        dy = terms[0] + terms[1] + terms[2]
    else:
        # Each term is rounded to the output dtype on its own: in the backward (the
        # transpose) each of the three consumers of the incoming cotangent then converts it
        # itself, instead of sharing one full-size float32 copy of it.
        a, b, c = barrier(tuple(t.astype(out_dtype) for t in terms))
        dy = a + b + c
    if mask is not None:
        dy = jnp.where(mask, dy, jnp.zeros((), dy.dtype))
    return dy, dmean, dvar
