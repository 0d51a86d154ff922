"""Argument validation shared by every entry point (functions and layers).

Each check raises ``TypeError`` or ``ValueError`` naming the argument, the value it got and
what would be accepted. Concrete values (Python numbers, NumPy scalars, concrete JAX arrays)
are all checked the same way; only values traced by a JAX transformation pass unchecked where
a traced value is allowed at all.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Axis = int | Sequence[int]

__all__ = [
    "SingleValueWarning",
    "canonicalize_axes",
    "check_dtype",
    "check_epsilon",
    "check_input",
    "check_mode",
    "check_momentum",
    "check_per_feature",
    "check_renorm_clipping",
    "check_virtual_batch",
    "freeze_groups",
    "mask_to_input_rank",
    "warn_single_value",
]


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
    if isinstance(axis, int | np.integer) and not isinstance(axis, bool):
        axes = (axis,)
    elif isinstance(axis, Sequence) and not isinstance(axis, str):
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


def check_input(x: Any, axes: tuple[int, ...] | None = None, *, training: bool = False) -> None:
    """Checks that ``x`` is floating point (or complex) and, given its feature axes, not empty.

    Args:
      x: the input.
      axes: its canonical feature axes, or None to check the dtype only.
      training: whether batch statistics are needed (then the batch must hold values).

    Example:
      >>> check_input(jnp.zeros((0, 3)), (1,))          # an empty batch is fine in inference
      >>> check_input(jnp.zeros((0, 3)), (1,), training=True)
      Traceback (most recent call last):
      ...
      ValueError: x has shape (0, 3) with feature axes (1,): the batch holds no values to ...
    """
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"x has dtype {dtype}; batch normalization needs a floating-point input "
            "(float16, bfloat16, float32, float64, or complex64/complex128 as in Flax). Cast "
            "it first, e.g. x.astype(jnp.float32)."
        )
    if axes is None:
        return
    shape = tuple(jnp.shape(x))
    if any(shape[a] == 0 for a in axes):
        raise ValueError(
            f"x has shape {shape} with feature axes {axes}: a feature axis of size 0 leaves "
            "nothing to normalize (was the layer given the wrong axis?)."
        )
    if training and any(n == 0 for i, n in enumerate(shape) if i not in axes):
        raise ValueError(
            f"x has shape {shape} with feature axes {axes}: the batch holds no values to "
            "compute statistics from. Skip empty batches, or use training=False."
        )


#: Frames in these folders are bnjax's, Flax's or JAX's own, never the user's layer call.
_LIBRARY_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (flax, jax)) + (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,)


def user_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside bnjax, Flax and JAX, for ``warnings.warn``.

    Counted from the function that calls ``warnings.warn``: a warning then names the line of
    the user's code that calls (linen) or builds (NNX) the layer, not a line inside Flax's
    wrappers.

    Example:
      >>> user_stacklevel() >= 2
      True
    """
    frame, level = sys._getframe(2), 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level


class SingleValueWarning(UserWarning):
    """Training-mode batch norm saw a single value per feature: its output is the bias.

    With one value per feature the batch mean is that value and the batch variance 0, so
    ``x - mean`` is 0 and every output is the bias (as in Flax and Keras; PyTorch raises).
    bnjax computes exactly that and warns, once per traced shape: it is almost always a
    mistake in a model (a batch of one, a wrong ``axis``), but ported Flax code (ensembles
    trained under ``nnx.vmap`` on batches of one) relies on it. Silence it with
    ``warnings.filterwarnings("ignore", category=bnjax.SingleValueWarning)``, or make it an
    error with ``"error"``.
    """


def warn_single_value(shape: tuple[int, ...], axes: tuple[int, ...]) -> None:
    """Warns :class:`SingleValueWarning` for training on ``shape`` with one value per feature.

    A static check (shapes only): it costs nothing in the compiled computation.

    Example:
      >>> import warnings
      >>> with warnings.catch_warnings(record=True) as w:
      ...     warnings.simplefilter("always")
      ...     warn_single_value((1, 3), (1,))
      >>> w[0].category.__name__
      'SingleValueWarning'
    """
    warnings.warn(
        f"training=True with input shape {tuple(shape)} and feature axis {axes} leaves a "
        "single value per feature channel: its batch variance is 0 and the output is the "
        "bias alone (as in Flax and Keras). Use training=False (moving statistics) or a "
        "larger batch; or, where this is meant (ensembles on batches of one), filter "
        "bnjax.SingleValueWarning.", SingleValueWarning, stacklevel=user_stacklevel())


def _concrete_float(name: str, value: Any, accepted: str) -> float | None:
    """``float(value)`` for a concrete scalar, None for a traced one."""
    if isinstance(value, jax.core.Tracer):
        return None
    numeric = isinstance(value, numbers.Real) or (
        isinstance(value, np.ndarray | np.generic | jax.Array)
        and (jnp.issubdtype(value.dtype, jnp.floating)
             or jnp.issubdtype(value.dtype, jnp.integer)))
    if isinstance(value, bool | np.bool_) or not numeric or jnp.ndim(value) != 0:
        raise TypeError(f"{name}={value!r} must be a real scalar; accepted: {accepted}.")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}={value!r} must be a real scalar; accepted: {accepted}.") from None


def check_momentum(momentum: Any, name: str = "momentum") -> None:
    """Checks a moving-average weight: a scalar in [0, 1]; a traced one (a schedule) passes.

    Example:
      >>> import numpy as np
      >>> check_momentum(np.float32(0.9))
      >>> check_momentum(np.float32(1.5))
      Traceback (most recent call last):
      ...
      ValueError: momentum=np.float32(1.5) is outside [0, 1]; it is the weight on the old ...
    """
    accepted = "a number in [0, 1], the weight on the old moving value (Keras 0.99)"
    value = _concrete_float(name, momentum, accepted)
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{name}={momentum!r} is outside [0, 1]; it is the weight on the old moving value "
            "(Keras convention, default 0.99). A PyTorch momentum m converts to 1 - m."
        )


def check_epsilon(epsilon: Any, dtype: Any = None) -> float:
    """Checks epsilon: a static, finite scalar > 0. Returns it as a Python float.

    Given the input's dtype, epsilon must also be a normal number in the dtype the statistics
    are computed in (float32, or float64 for float64 input): a subnormal one is flushed to 0
    on most hardware, and a constant feature would then divide 0 by 0.

    Example:
      >>> check_epsilon(1e-5)
      1e-05
      >>> check_epsilon(float("inf"))
      Traceback (most recent call last):
      ...
      ValueError: epsilon=inf must be finite and > 0; it is added to the variance inside ...
      >>> check_epsilon(1e-40, jnp.float32)
      Traceback (most recent call last):
      ...
      ValueError: epsilon=1e-40 is below the smallest normal float32 (1.18e-38): the ...
    """
    if isinstance(epsilon, jax.core.Tracer):
        raise TypeError(
            f"epsilon={epsilon!r} is traced by a JAX transformation; it must be a static "
            "number (as in flax.linen.BatchNorm): pass a Python float, not a traced array."
        )
    value = _concrete_float("epsilon", epsilon, "a finite number > 0 (Keras 1e-3)")
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(
            f"epsilon={epsilon!r} must be finite and > 0; it is added to the variance inside "
            "the square root (Keras default 1e-3, Flax and PyTorch 1e-5)."
        )
    if dtype is not None:
        compute = jnp.promote_types(dtype, jnp.float32)
        tiny = float(jnp.finfo(compute).tiny)
        if value < tiny:
            raise ValueError(
                f"epsilon={epsilon!r} is below the smallest normal {compute} ({tiny:.3g}): the "
                f"statistics of a {jnp.dtype(dtype)} input are computed in {compute}, where it "
                "is flushed to 0 and a constant feature gives 0/0 = NaN. Use a normal number, "
                "e.g. 1e-3 (Keras) or 1e-5 (Flax, PyTorch)."
            )
    return value


def check_mode(name: str, value: Any, *, optional: bool = True) -> None:
    """Checks a mode flag (``training``, ``use_running_average``, ...): a Python bool.

    Example:
      >>> check_mode("training", "False")
      Traceback (most recent call last):
      ...
      TypeError: training='False' must be a Python bool (or None); it selects the ...
    """
    if value is None and optional:
        return
    if not isinstance(value, bool | np.bool_):
        also = " (or None)" if optional else ""
        raise TypeError(
            f"{name}={value!r} must be a Python bool{also}; it selects the computation "
            "(batch or moving statistics), so it cannot be a string, an array or traced."
        )


def check_dtype(name: str, dtype: Any, *, optional: bool = True,
                allow_complex: bool = False) -> None:
    """Checks an output or parameter dtype: a floating-point dtype (or None if optional).

    ``allow_complex`` also accepts complex64 and complex128 (an output dtype, as in Flax).

    Example:
      >>> check_dtype("param_dtype", jnp.int32)
      Traceback (most recent call last):
      ...
      TypeError: param_dtype=<class 'jax.numpy.int32'> is not a floating-point dtype; ...
    """
    if dtype is None and optional:
        return
    try:
        ok = jnp.issubdtype(jnp.dtype(dtype), jnp.inexact if allow_complex else jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        extra = ", complex64, complex128" if allow_complex else ""
        raise TypeError(
            f"{name}={dtype!r} is not a floating-point dtype; accepted: float16, bfloat16, "
            f"float32, float64{extra}{' or None' if optional else ''}."
        )


def check_per_feature(name: str, value: Array | None, feature_shape: tuple[int, ...],
                      axes: tuple[int, ...]) -> None:
    """Checks that a statistic or parameter has the input's feature shape.

    Example:
      >>> check_per_feature("params['scale']", jnp.ones(4), (3,), (1,))
      Traceback (most recent call last):
      ...
      ValueError: params['scale'] has shape (4,) but the input has feature shape (3,) on ...
    """
    if value is not None and tuple(jnp.shape(value)) != feature_shape:
        raise ValueError(
            f"{name} has shape {tuple(jnp.shape(value))} but the input has feature shape "
            f"{feature_shape} on axis {axes}; the statistics and parameters must match the "
            "input's feature axes (was the layer built for another number of channels?)."
        )


def _broadcasts_to(shape: tuple[Any, ...], x_shape: tuple[Any, ...]) -> bool:
    """Whether ``shape`` broadcasts to ``x_shape``; a symbolic (``jax.export``) size is kept.

    ``jnp.broadcast_shapes`` (not NumPy's, which needs ints) decides on symbolic sizes: ``b``
    matches ``b`` and ``1``, and nothing that is not provably equal.
    """
    try:
        return tuple(jnp.broadcast_shapes(tuple(shape), tuple(x_shape))) == tuple(x_shape)
    except ValueError:
        return False


def _refuse_two_meanings(shape: tuple[int, ...], x_shape: tuple[int, ...],
                         axes: tuple[int, ...]) -> None:
    """Raises when a mask of the input's shape without its feature axes also broadcasts.

    E.g. a ``(C,)`` mask on a ``(B, C)`` input with ``B == C``: one flag per row (bnjax's
    reading of that shape) or one per feature (NumPy broadcasting, as Flax reads it).
    """
    reduced = [i for i in range(len(x_shape)) if i not in axes]
    trailing = list(range(len(x_shape) - len(shape), len(x_shape)))
    broadcasts = _broadcasts_to(shape, x_shape)
    # The readings differ only where a mask axis of size > 1 lands on different input axes.
    if not broadcasts or all(n == 1 or r == t for n, r, t in zip(shape, reduced, trailing,
                                                                 strict=True)):
        return
    row = tuple(1 if i in axes else n for i, n in enumerate(x_shape))
    value = tuple((1,) * (len(x_shape) - len(shape)) + tuple(shape))
    raise ValueError(
        f"mask has shape {tuple(shape)}, which for an input of shape {tuple(x_shape)} with "
        f"feature axes {axes} means two things: one flag per position shared by the features "
        "(the input's shape without its feature axes) or, by NumPy broadcasting, flags along "
        f"the trailing axes. Say which: mask.reshape({row}) for one flag per position, or "
        f"mask.reshape({value}) (or the input's full shape) for broadcasting."
    )


def mask_to_input_rank(mask: Any, x_shape: tuple[int, ...], axes: tuple[int, ...]) -> Array:
    """Validates a mask and returns it with the input's rank.

    Accepted: the input's shape without its feature axes (one flag per position, shared by
    the features), or any shape that broadcasts to the input's (as ``flax.linen.BatchNorm``
    takes). The result has size 1 on every feature axis for a per-position mask, the input's
    shape for a per-value mask.

    Example:
      >>> mask_to_input_rank(jnp.ones((4,), bool), (4, 3), (1,)).shape
      (4, 1)
      >>> mask_to_input_rank(jnp.ones((4, 1), bool), (4, 3), (1,)).shape
      (4, 1)
    """
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"mask has dtype {mask.dtype}; it must be boolean (True = use the value).")
    x_shape = tuple(x_shape)
    reduced_shape = tuple(n for i, n in enumerate(x_shape) if i not in axes)
    if mask.shape == reduced_shape:
        _refuse_two_meanings(mask.shape, x_shape, axes)
        return jnp.expand_dims(mask, axes)
    if not (mask.ndim <= len(x_shape) and _broadcasts_to(mask.shape, x_shape)):
        raise ValueError(
            f"mask has shape {mask.shape}; for an input of shape {x_shape} with feature "
            f"axes {axes} it must have shape {reduced_shape} (the input without its feature "
            f"axes) or a shape that broadcasts to {x_shape} (the input's shape)."
        )
    mask = mask.reshape((1,) * (len(x_shape) - mask.ndim) + mask.shape)
    per_position = all(mask.shape[a] == 1 for a in axes)
    target = tuple(1 if (per_position and i in axes) else n for i, n in enumerate(x_shape))
    return jnp.broadcast_to(mask, target)


def check_renorm_clipping(clipping: Any) -> Mapping[str, Any]:
    """Checks batch renormalization's ``{"rmin", "rmax", "dmax"}`` (any subset, or None).

    Example:
      >>> check_renorm_clipping({"rmax": 0.5})
      Traceback (most recent call last):
      ...
      ValueError: renorm_clipping has rmax=0.5; it must be >= 1 (r is clipped to [rmin, ...
    """
    clipping = {} if clipping is None else clipping
    if not isinstance(clipping, Mapping):
        raise TypeError(
            f"renorm_clipping={clipping!r} must be a mapping with optional keys 'rmin', 'rmax', "
            "'dmax' (or None for no clipping)."
        )
    unknown = set(clipping) - {"rmin", "rmax", "dmax"}
    if unknown:
        raise ValueError(
            f"renorm_clipping has unknown keys {sorted(unknown)}; accepted: 'rmin', 'rmax', "
            "'dmax'."
        )
    c = {k: _concrete_float(f"renorm_clipping[{k!r}]", v, "a number")
         for k, v in clipping.items() if v is not None}
    rules = (("rmax", lambda v: v >= 1, ">= 1 (r is clipped to [rmin, rmax] around 1)"),
             ("rmin", lambda v: 0 < v <= 1, "in (0, 1] (r is clipped to [rmin, rmax] around 1)"),
             ("dmax", lambda v: v >= 0, ">= 0 (d is clipped to [-dmax, dmax])"))
    for key, ok, what in rules:
        if c.get(key) is not None and not ok(c[key]):
            raise ValueError(f"renorm_clipping has {key}={clipping[key]!r}; it must be {what}.")
    return clipping


def check_virtual_batch(vbs: Any, x_shape: tuple[int, ...], axes: tuple[int, ...]) -> int:
    """Checks a ghost batch size against the input: a positive divisor of axis 0's size.

    Example:
      >>> check_virtual_batch(4, (8, 3), (1,))
      4
    """
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
    if jax.export.is_symbolic_dim(x_shape[0] % vbs):
        example = ", ".join([f"{vbs}*k", *map(str, x_shape[1:])])
        raise ValueError(
            f"virtual_batch_size={vbs!r} cuts axis 0 into ghost batches, but the batch size "
            f"{x_shape[0]} is symbolic (jax.export) and not known to be a multiple of {vbs}. "
            f"Export with a batch size that is, e.g. jax.export.symbolic_shape({example!r}), "
            "or without virtual_batch_size."
        )
    if x_shape[0] % vbs:
        raise ValueError(
            f"virtual_batch_size={vbs!r} does not divide the batch size {x_shape[0]} (axis 0 of "
            f"an input of shape {tuple(x_shape)}); pick a divisor of the batch size."
        )
    return int(vbs)


def freeze_groups(groups: Any, axis_name: Any) -> Any:
    """``axis_index_groups`` as a hashable tuple of tuples; they need an ``axis_name``.

    Example:
      >>> freeze_groups([[0, 1], [2, 3]], "batch")
      ((0, 1), (2, 3))
    """
    if groups is None:
        return None
    if axis_name is None:
        raise ValueError(
            f"axis_index_groups={groups!r} is given without axis_name; the groups partition "
            "the devices of a named axis, so set axis_name too (or drop axis_index_groups)."
        )
    try:
        return tuple(tuple(int(i) for i in g) for g in groups)
    except TypeError:
        raise TypeError(
            f"axis_index_groups={groups!r} must be a list of lists of device indices, e.g. "
            "[[0, 1], [2, 3]]."
        ) from None
