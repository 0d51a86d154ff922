"""Batch statistics: local shifted sums, their exact combination, and the cross-device collective.

The statistics of a (possibly masked, possibly sharded) batch are computed in three steps:

1. :func:`local_sums`: each device sums deviations from one of its own values per feature,
   ``[count, shift, sum(x - shift), sum((x - shift)^2)]``.
2. :func:`gather_sums`: one ``all_gather`` gives every device every device's sums (or its
   group's); without ``axis_name`` the local sums are the only part.
3. :func:`combine_sums`: the parallel-variance formula combines the parts exactly.

Shifting by a value of the batch keeps the sums small when ``|mean| / std`` is large, where
``E[x^2] - E[x]^2`` would lose every digit; combining per-device parts by their exact formula
makes uneven or masked shards give the global statistics.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from bnjax._checks import Axis, canonicalize_axes, check_input, freeze_groups, mask_to_input_rank

Array = jax.Array

__all__ = [
    "Moments",
    "apart",
    "barrier",
    "axis_names",
    "check_axis",
    "combine_sums",
    "explicit_axes",
    "gather_sums",
    "local_sums",
    "moments",
    "on_automatic_axes",
    "stat_dtype",
    "sums_of",
    "to_input_shape",
    "vma",
]


class Moments(NamedTuple):
    """Batch statistics per feature: mean, biased variance, and the number of values used."""

    mean: Array
    var: Array
    count: Array


def stat_dtype(dtype: Any) -> Any:
    """Statistics are computed in float32, or float64 when the input is float64.

    Example:
      >>> stat_dtype(jnp.bfloat16)
      dtype('float32')
    """
    return jnp.promote_types(dtype, jnp.float32)


def to_input_shape(v: Array, ndim: int, axes: tuple[int, ...]) -> Array:
    """Reshapes a per-feature array so it broadcasts against the input.

    Example:
      >>> to_input_shape(jnp.zeros(3), 4, (3,)).shape
      (1, 1, 1, 3)
    """
    shape = [1] * ndim
    for a, n in zip(axes, v.shape, strict=True):
        shape[a] = n
    return v.reshape(shape)


def _first_valid(x: Array, mask: Array, axes: tuple[int, ...]) -> tuple[Array, Array]:
    """Per feature: a valid value of that feature (0 where none) and whether one exists."""
    red = tuple(i for i in range(x.ndim) if i not in axes)
    if mask.shape == x.shape:
        # Per-value mask: every feature takes its own first valid position.
        order = red + axes
        fshape = tuple(x.shape[a] for a in axes)
        xs = jnp.transpose(x, order).reshape((-1,) + fshape)
        ms = jnp.transpose(mask, order).reshape((-1,) + fshape)
        idx = jnp.argmax(ms, axis=0)
        value = jnp.take_along_axis(xs, idx[None], axis=0)[0]
        return value, jnp.any(ms, axis=0)
    # Per-position mask (size 1 on the feature axes): one position serves every feature.
    idx = jnp.unravel_index(jnp.argmax(mask.reshape(-1)), mask.shape)
    starts = [idx[i] if i in red else 0 for i in range(x.ndim)]
    sizes = [1 if i in red else x.shape[i] for i in range(x.ndim)]
    value = lax.dynamic_slice(x, starts, sizes).reshape(tuple(x.shape[a] for a in axes))
    return value, jnp.broadcast_to(jnp.any(mask), value.shape)


def local_sums(x: Array, axes: tuple[int, ...], mask: Array | None) -> Array:
    """Per-device shifted sums, stacked as ``[count, shift, sum(x - shift), sum((x - shift)^2)]``.

    The shift is one value of the batch per feature (the first valid value of that feature),
    so the sums stay small even when ``|mean| / std`` is large; on the CPU it is 0 (plain
    sums) where that is accurate enough (see ``_cpu_sums``). Masked-out values, whatever
    they hold (NaN, Inf, any finite value), take no part: they are selected away, never
    multiplied by zero. The two sums are computed by :func:`sums_of`.

    Args:
      x: input.
      axes: canonical feature axes.
      mask: None, or a boolean mask from ``mask_to_input_rank``.

    Returns:
      An array of shape ``(4, *feature_shape)`` in the statistics dtype.

    Example:
      >>> sums = local_sums(jnp.array([[1.0], [3.0]]), (1,), None)
      >>> sums.shape, combine_sums(sums[None]).var.tolist()
      ((4, 1), [1.0])
    """
    dt = stat_dtype(x.dtype)
    red = tuple(i for i in range(x.ndim) if i not in axes)
    if mask is None:
        count = jnp.full([x.shape[a] for a in axes], math.prod(x.shape[i] for i in red), dt)
        shift, s1, s2 = lax.platform_dependent(
            x, cpu=functools.partial(_cpu_sums, red=red, axes=axes, dt=dt),
            default=functools.partial(_shifted_sums, red=red, axes=axes, dt=dt))
        return jnp.stack([count, shift, s1, s2])
    shift, has = _first_valid(x, mask, axes)
    shift = lax.stop_gradient(jnp.where(has, shift.astype(dt), 0))
    count = jnp.sum(mask, axis=red, dtype=dt)
    count = jnp.broadcast_to(count.reshape([mask.shape[a] for a in axes]), shift.shape)

    def deviation(x: Array, shift: Array, mask: Array) -> Array:
        return jnp.where(mask, x.astype(dt) - to_input_shape(shift, x.ndim, axes), 0)

    s1, s2 = sums_of(deviation, lambda *o: jnp.square(deviation(*o)), (x, shift, mask), red)
    return jnp.stack([count, shift, s1, s2])


def apart(operands: Any) -> tuple[Any, Any]:
    """Two copies of ``operands`` that XLA:CPU cannot merge; the operands twice elsewhere.

    XLA:CPU writes an elementwise value used by two fusions out as a full-size temporary,
    which costs more than computing it twice; each use computed from its own copy (an
    ``optimization_barrier``, which moves no data) stays fused with its own work.

    Example:
      >>> a, b = apart(jnp.ones(2))
      >>> (a + b).tolist()
      [2.0, 2.0]
    """
    return barrier((operands, operands))


def barrier(operands: Any) -> Any:
    """``operands`` through one ``optimization_barrier`` on the CPU; unchanged elsewhere.

    The barrier's transpose is a barrier too: values that go through one in a linear map
    reach their consumers as distinct copies in its transpose (which XLA cannot merge).
    Under ``jax.shard_map`` the barrier makes every output vary over the manual axes that
    any operand varies over; elsewhere the operands are given the same types.

    Example:
      >>> barrier((jnp.ones(1), jnp.zeros(1)))[0].tolist()
      [1.0]
    """
    leaves, tree = jax.tree.flatten(operands)
    varying = frozenset().union(*(vma(v) for v in leaves))

    def vary(v: Array) -> Array:
        missing = tuple(sorted(varying - vma(v), key=str))
        return lax.pcast(v, missing, to="varying") if missing else v

    def same(*ops: Array) -> tuple[Array, ...]:
        return tuple(map(vary, ops))

    out = lax.platform_dependent(*leaves, cpu=lambda *o: lax.optimization_barrier(o),
                                 default=same)
    return jax.tree.unflatten(tree, out)


def sums_of(f1: Any, f2: Any, operands: tuple[Array, ...], red: tuple[int, ...]
            ) -> tuple[Array, Array]:
    """``(sum(f1(*operands)), sum(f2(*operands)))`` over ``red``, as each compiler fuses best.

    The form is chosen when the computation is lowered for a platform:

    - CPU: two reductions, each recomputing its elementwise function from the operands. With
      one shared intermediate (a difference, a cast), XLA:CPU writes it out as a full-size
      temporary for the two sums to read, which costs more than reading the operands twice;
      copies that XLA cannot merge (an ``optimization_barrier``, which moves no data) keep
      both reductions fused with their elementwise work.
    - GPU and TPU: one variadic reduction of both values, so the operands are read once, in
      one fusion.

    Example:
      >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
      >>> s1, s2 = sums_of(lambda a: a, lambda a: a * a, (x,), (0,))
      >>> s1.tolist(), s2.tolist()
      ([4.0, 6.0], [10.0, 20.0])
    """

    def separate(*ops: Array) -> tuple[Array, Array]:
        first, second = lax.optimization_barrier((ops, ops))
        return jnp.sum(f1(*first), axis=red), jnp.sum(f2(*second), axis=red)

    def one_pass(*ops: Array) -> tuple[Array, Array]:
        a, b = f1(*ops), f2(*ops)
        zero = (jnp.zeros((), a.dtype), jnp.zeros((), b.dtype))
        return tuple(lax.reduce((a, b), zero, lambda u, v: (u[0] + v[0], u[1] + v[1]), red))

    return lax.platform_dependent(*operands, cpu=separate, default=one_pass)


#: The CPU's plain sums are kept when every feature's ``mean^2 <= _PLAIN_SUMS_LIMIT * var``:
#: the variance from ``E[x^2] - E[x]^2`` then loses at most a factor ``1 + limit`` of the
#: shifted sums' accuracy. Past it (a large ``|mean| / std``) the shifted sums are computed.
_PLAIN_SUMS_LIMIT = 4.0


def _shifted_sums(x: Array, *, red: tuple[int, ...], axes: tuple[int, ...],
                  dt: Any) -> tuple[Array, Array, Array]:
    """``(shift, sum(x - shift), sum((x - shift)^2))``: exact for any ``|mean| / std``.

    The shift is the batch's first value of each feature.
    """
    first = tuple(0 if i in red else slice(None) for i in range(x.ndim))
    shift = lax.stop_gradient(x[first].astype(dt))

    def deviation(x: Array, shift: Array) -> Array:
        return x.astype(dt) - to_input_shape(shift, x.ndim, axes)

    s1, s2 = sums_of(deviation, lambda *o: jnp.square(deviation(*o)), (x, shift), red)
    return shift, s1, s2


def _cpu_sums(x: Array, *, red: tuple[int, ...], axes: tuple[int, ...],
              dt: Any) -> tuple[Array, Array, Array]:
    """Plain sums of ``x`` and ``x^2`` when they are accurate enough, else the shifted sums.

    XLA:CPU reduces ``x`` and ``x^2`` faster than ``x - shift`` and its square (the shift is a
    per-feature operand of the reduction), so the plain sums come first; they also tell how
    far the mean is from 0 in units of the spread. Only where that is large (a rare input: a
    feature with ``|mean| / std`` above 2) is ``x`` read again with the shift, inside a
    ``lax.cond``, so the variance stays exact at any ``|mean| / std``.
    """
    def cast(x: Array) -> Array:
        return x.astype(dt)

    s1, s2 = sums_of(cast, lambda x: jnp.square(cast(x)), (x,), red)
    n = math.prod(x.shape[i] for i in red)
    mean = s1 / n
    spread = s2 / n - mean * mean
    # One compare and one reduction; NaN and overflow fail it too.
    plain_ok = jnp.all((mean * mean <= _PLAIN_SUMS_LIMIT * spread) & (spread < jnp.inf))
    return lax.cond(plain_ok, lambda: (jnp.zeros_like(s1), s1, s2),
                    lambda: _shifted_sums(x, red=red, axes=axes, dt=dt))


def combine_sums(sums: Array) -> Moments:
    """Exact mean and biased variance from stacked per-part sums of shape ``(P, 4, *F)``.

    Uses the parallel-variance formula (Chan et al.): each part's mean and sum of squared
    deviations, then the spread of the part means around the global mean. Parts with no
    values contribute nothing; with no values at all the mean and variance are 0 and count 0.

    Example:
      >>> parts = jnp.stack([local_sums(jnp.array([[1.0]]), (1,), None),
      ...                    local_sums(jnp.array([[3.0], [5.0]]), (1,), None)])
      >>> m = combine_sums(parts)
      >>> m.mean.tolist(), m.var.tolist(), m.count.tolist()
      ([3.0], [2.6666667461395264], [3.0])
    """
    if sums.shape[0] == 1:
        return _one_part(sums[0])
    n, shift, s1, s2 = sums[:, 0], sums[:, 1], sums[:, 2], sums[:, 3]
    has = n > 0
    safe_n = jnp.where(has, n, 1)
    # Part means as offsets from one reference value (the shift of the first part with
    # values): with a large |mean| / std the offsets stay small, so their spread keeps its
    # digits (the part means themselves would be rounded to the precision of the mean).
    ref = jnp.take_along_axis(shift, jnp.argmax(has, axis=0)[None], axis=0)[0]
    part_mean = s1 / safe_n
    part_dev = (shift - ref) + part_mean
    # s1 * (s1 / n), not s1 * s1 / n: the square of a large sum overflows long before s2 does.
    part_m2 = jnp.maximum(s2 - s1 * part_mean, 0)
    total = jnp.sum(n, axis=0)
    safe_total = jnp.where(total > 0, total, 1)
    dev = jnp.sum(jnp.where(has, n * part_dev, 0), axis=0) / safe_total
    spread = jnp.where(has, n * jnp.square(part_dev - dev), 0)
    var = (jnp.sum(jnp.where(has, part_m2, 0), axis=0) + jnp.sum(spread, axis=0)) / safe_total
    mean = jnp.where(total > 0, ref + dev, 0)
    return Moments(mean, jnp.maximum(var, 0), total)


def _one_part(sums: Array) -> Moments:
    """``combine_sums`` of a single part: the same formula with fewer (small) operations."""
    n, shift, s1, s2 = sums[0], sums[1], sums[2], sums[3]
    safe_n = jnp.maximum(n, 1)
    part_mean = s1 / safe_n
    var = jnp.maximum(s2 - s1 * part_mean, 0) / safe_n
    return Moments(jnp.where(n > 0, shift + part_mean, 0), var, n)


_HAS_GATHER_TO = "to" in inspect.signature(lax.all_gather).parameters


def axis_names(axis_name: str | Sequence[str]) -> tuple[Any, ...]:
    """A named axis (or several) as a tuple of names.

    Example:
      >>> axis_names("batch"), axis_names(("data", "model"))
      (('batch',), ('data', 'model'))
    """
    return tuple(axis_name) if isinstance(axis_name, list | tuple) else (axis_name,)


def vma(v: Any) -> frozenset:
    """The manual mesh axes ``v`` varies over (``jax.shard_map`` with ``check_vma``).

    Example:
      >>> vma(jnp.zeros(3))
      frozenset()
    """
    aval = jax.typeof(v)
    mat = getattr(aval, "manual_axis_type", None)  # jax >= 0.9
    return frozenset(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ())


def gather_sums(local: Array, axis_name: str | Sequence[str] | None, axis_index_groups: Any
                ) -> Array:
    """One collective: every device receives every device's sums (or its group's).

    Returns:
      The parts, shape ``(P, *local.shape)``; ``P = 1`` without ``axis_name``.

    Example:
      >>> import jax
      >>> parts = jax.vmap(lambda s: gather_sums(s, "d", None), axis_name="d")(jnp.ones((2, 4)))
      >>> parts.shape
      (2, 2, 4)
    """
    if axis_name is None:
        return local[None]
    check_axis(axis_name, axis_index_groups)
    names = frozenset(axis_names(axis_name))
    if axis_index_groups is not None and names <= vma(local):
        raise ValueError(
            f"axis_index_groups={axis_index_groups!r} with axis_name={axis_name!r} under "
            "jax.shard_map: its psum has no axis_index_groups, so the backward pass cannot "
            "run. Give the groups a mesh axis of their own instead, e.g. jax.make_mesh((4, 2), "
            "('group', 'bn')) with the batch split over ('group', 'bn') and axis_name='bn' "
            "(axis_index_groups is for jax.pmap)."
        )
    if axis_index_groups is None and names <= vma(local) and _HAS_GATHER_TO:
        # Under jax.shard_map the gathered sums are the same on every device: say so, so that
        # the statistics (and the moving averages) are typed as replicated across the axis.
        out = lax.all_gather(local, axis_name, tiled=False, to="invarying")
    elif len(names) > 1 and axis_index_groups is None:
        # Several names outside jax.shard_map (nested vmap or pmap), where one all_gather
        # over all of them is not supported: one per name, innermost first.
        out = local
        for name in reversed(axis_names(axis_name)):
            out = lax.all_gather(out, name, tiled=False)
    else:
        out = lax.all_gather(local, axis_name, axis_index_groups=axis_index_groups,
                             tiled=False)
    return out.reshape((-1,) + local.shape)


def explicit_axes(x: Array) -> tuple[str, ...]:
    """The mesh axes of ``x``'s sharding type that are explicit (``jax.make_mesh``'s default).

    Example:
      >>> explicit_axes(jnp.zeros(3))
      ()
    """
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    names = tuple(getattr(mesh, "axis_names", None) or ())
    types = tuple(getattr(mesh, "axis_types", None) or ())
    return tuple(n for n, t in zip(names, types, strict=False) if t == AxisType.Explicit)


def on_automatic_axes(fn: Any, x: Array, axes: tuple[int, ...], *args: Any,
                      returns_y: bool) -> Any:
    """``fn(x, *args)``, traced with ``x``'s explicit mesh axes made automatic.

    The statistics index the batch (the shift of the shifted sums, a mask's first valid
    value), which explicit sharding types refuse on a sharded dimension; in automatic mode
    XLA partitions the computation, as it does for every input under plain ``jax.jit``.
    The output ``y`` (when ``returns_y``) keeps ``x``'s sharding; per-feature outputs are
    sharded as ``x``'s feature axes are (replicated for a batch-sharded ``x``).

    Example:
      >>> on_automatic_axes(lambda x: x + 1, jnp.zeros(2), (0,), returns_y=True).tolist()
      [1.0, 1.0]
    """
    names = explicit_axes(x)
    if not names:
        return fn(x, *args)
    spec = tuple(jax.typeof(x).sharding.spec)
    spec += (None,) * (x.ndim - len(spec))
    feature = P(*(spec[a] for a in axes))
    out_specs = (P(*spec), Moments(feature, feature, feature)) if returns_y else Moments(
        feature, feature, feature)
    return jax.sharding.auto_axes(fn, axes=names, out_sharding=out_specs)(x, *args)


def check_axis(axis_name: str | Sequence[str], axis_index_groups: Any) -> None:
    """Trace-time check: the axis name is bound and the groups partition it evenly.

    Example:
      >>> check_axis("batch", None)
      Traceback (most recent call last):
      ...
      ValueError: axis_name='batch' is not bound here: 'batch' must be the axis_name of ...
    """
    size = 1
    for name in axis_names(axis_name):
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
    groups = [list(g) for g in axis_index_groups]
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
      x: input, any float dtype; ``(..., C)`` for the default ``axis=-1``. A complex input
        gets Flax's complex mean and real variance ``E[|x - mean|^2]`` (exact, two passes).
      axis: feature axis or axes; all other axes are reduced.
      mask: optional boolean, shaped like ``x`` without its feature axes (or broadcastable
        to ``x``); False entries take no part in the statistics, whatever they hold.
      axis_name: named mapped axis (or axes) to reduce over as well.
      axis_index_groups: optional partition of that axis into groups reduced separately.

    Returns:
      ``Moments(mean, var, count)``, each of the feature shape, in float32 (float64 for
      float64 input).

    Example:
      >>> m = moments(jnp.array([[1.0, 10.0], [3.0, 30.0]]))
      >>> m.mean.tolist(), m.var.tolist()
      ([2.0, 20.0], [1.0, 100.0])
    """
    check_input(x)
    axes = canonicalize_axes(axis, x.ndim)
    check_input(x, axes, training=True)
    groups = freeze_groups(axis_index_groups, axis_name)
    m = None if mask is None else mask_to_input_rank(mask, x.shape, axes)

    if jnp.issubdtype(jnp.result_type(x), jnp.complexfloating):
        from bnjax._complex import complex_moments  # imports this module

        return complex_moments(x, axes, m, axis_name, groups)

    def stats(x: Array, m: Array | None) -> Moments:
        return combine_sums(gather_sums(local_sums(x, axes, m), axis_name, groups))

    return on_automatic_axes(stats, x, axes, m, returns_y=False)
