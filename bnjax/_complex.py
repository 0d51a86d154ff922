"""Batch statistics of complex inputs, with Flax's convention.

Flax normalizes a complex input with its complex mean and the real variance
``E[|x - E[x]|^2]``; so does bnjax. The statistics are computed in two passes (the mean, then
the mean squared distance to it), so the variance is exact, not ``E[|x|^2] - |E[x]|^2``. This
path is taken only for complex dtypes (a static choice): the float path is untouched. Its
gradient is JAX's own differentiation of these few lines. With ``axis_name`` it runs two
collectives (sums and count, then squared distances).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bnjax.stats import Moments, to_input_shape

Array = jax.Array

__all__ = ["complex_moments", "is_complex"]


def is_complex(x: Any) -> bool:
    """Whether ``x`` (an array or a dtype) is complex.

    Example:
      >>> is_complex(jnp.zeros(2, jnp.complex64)), is_complex(jnp.float32)
      (True, False)
    """
    dtype = x.dtype if hasattr(x, "dtype") else x
    return bool(jnp.issubdtype(jnp.dtype(dtype), jnp.complexfloating))


def complex_moments(x: Array, axes: tuple[int, ...], mask: Array | None, axis_name: Any,
                    groups: Any) -> Moments:
    """``Moments(mean, var, count)``: complex mean, real ``E[|x - mean|^2]``, exact.

    ``mask`` has ``x``'s rank (broadcastable); masked-out values (NaN included) take no part.
    A feature without values gets mean 0 and variance 0 (and count 0).

    Example:
      >>> m = complex_moments(jnp.array([[1 + 1j], [3 - 1j]], jnp.complex64), (1,), None,
      ...                     None, None)
      >>> m.mean.tolist(), m.var.tolist(), m.count.tolist()
      ([(2+0j)], [2.0], [2.0])
    """
    dt = jnp.promote_types(x.dtype, jnp.complex64)
    real = jnp.finfo(dt).dtype
    red = tuple(i for i in range(x.ndim) if i not in axes)
    xs = x.astype(dt)
    if mask is None:
        valid = jnp.ones(x.shape, bool)
    else:
        valid = jnp.broadcast_to(mask, x.shape)
        xs = jnp.where(valid, xs, 0)
    total = jnp.sum(xs, axis=red)
    count = jnp.sum(valid, axis=red, dtype=real)
    if axis_name is not None:
        total, count = lax.psum((total, count), axis_name, axis_index_groups=groups)
    mean = total / jnp.maximum(count, 1)
    dev = xs - to_input_shape(mean, x.ndim, axes)
    sq = jnp.where(valid, jnp.real(dev) ** 2 + jnp.imag(dev) ** 2, 0)
    sq = jnp.sum(sq, axis=red)
    if axis_name is not None:
        sq = lax.psum(sq, axis_name, axis_index_groups=groups)
    return Moments(mean, sq / jnp.maximum(count, 1), count)
