"""A batch's per-example mask handed to every batch norm inside a linen model.

The train and eval steps of :mod:`bnjax.steps` call the model as ``apply_fn(variables, x,
training=...)``; a model written for one device does not take a mask. Around that call,
:func:`masked_batch_norms` intercepts every ``bnjax.BatchNorm`` and ``flax.linen.BatchNorm``
call (``flax.linen.intercept_methods``) and adds ``mask=``: the per-example mask ``(B,)``
reshaped to ``(B, 1, ..., 1)`` for the layer's rank-n input, so it means one flag per example
whatever the layer's feature axes (and is combined with a mask the model passes itself).
:func:`check_masked` then refuses a model whose batch statistics live in any other module,
naming it: the step could not keep the padding out of them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnjax._checks import canonicalize_axes, mask_to_input_rank
from bnjax.linen import BatchNorm

__all__ = ["check_masked", "example_mask", "masked_batch_norms", "zero_padding"]

Array = jax.Array


def example_mask(batch: Mapping[str, Any], n: int) -> Array | None:
    """``batch["mask"]`` as a boolean ``(n,)`` (one flag per example), None without one.

    Accepted: a boolean mask (True = a valid example, False = padding) or an integer one
    (nonzero = valid), of shape ``(n,)`` or ``(n, 1, ..., 1)``. A floating-point mask is
    refused rather than read as ``mask != 0``: weights such as 0.5 would count as 1 in the
    loss and in every batch norm's statistics, which cannot weight examples.

    Args:
      batch: the step's batch; ``n`` examples (the length of ``batch["y"]``).
      n: the number of examples.

    Raises:
      TypeError: the mask is not boolean or integer.
      ValueError: it does not hold one flag per example.

    Example:
      >>> example_mask({"mask": jnp.array([1, 0])}, 2).tolist()
      [True, False]
      >>> example_mask({"mask": jnp.array([0.5, 1.0])}, 2)
      Traceback (most recent call last):
      ...
      TypeError: batch['mask'] has dtype float32; it must be boolean (True = a valid example, ...
    """
    mask = batch.get("mask")
    if mask is None:
        return None
    dtype = jnp.result_type(mask)
    if dtype != jnp.bool_ and not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(
            f"batch['mask'] has dtype {dtype}; it must be boolean (True = a valid example, "
            "False = padding) or integer (nonzero = valid). The step does not weight "
            "examples: batch statistics cannot, so a weight such as 0.5 would count as a "
            "whole example. Pass mask > 0 for a mask, or write a step that weights the loss.")
    shape = tuple(jnp.shape(mask))
    if not shape or shape[0] != n or any(d != 1 for d in shape[1:]):
        raise ValueError(
            f"batch['mask'] has shape {shape} ({math.prod(shape)} flags) but the batch holds "
            f"{n} examples (the length of batch['y']); it must have shape ({n},), one flag "
            "per example.")
    return jnp.asarray(mask).astype(bool).reshape(n)


def _where(path: tuple[str, ...], module: Any) -> str:
    return "/".join(path) or type(module).__name__


def _layer_mask(module: Any, x: Any, own: Any, valid: Array, where: str) -> Array:
    """``valid`` as ``(B, 1, ..., 1)`` for ``x``, and-ed with the mask the model passed."""
    n = valid.shape[0]
    shape = tuple(jnp.shape(x))
    if len(shape) < 2 or shape[0] != n:
        raise ValueError(
            f"{type(module).__name__} at {where!r} gets an input of shape {shape}, whose "
            f"leading axis is not the batch's {n} examples, so batch['mask'] (shape ({n},)) "
            "cannot say which of its values are padding; normalize with the examples on "
            "axis 0, or leave 'mask' out of the batch (no padding).")
    mask = valid.reshape((n,) + (1,) * (len(shape) - 1))
    if own is None:
        return mask
    if isinstance(module, BatchNorm):  # bnjax's reading of a mask (per position or value)
        own = mask_to_input_rank(own, shape, canonicalize_axes(module.axis, len(shape)))
    return jnp.logical_and(jnp.asarray(own, bool), mask)


def _flax_batch_statistics(module: nn.BatchNorm, args: tuple, kwargs: dict) -> bool:
    """Whether a ``flax.linen.BatchNorm`` call normalizes with batch statistics."""
    running = args[1] if len(args) > 1 else kwargs.get("use_running_average")
    return not (module.use_running_average if running is None else running)


@contextlib.contextmanager
def masked_batch_norms(valid: Array | None) -> Iterator[list[tuple[str, ...]]]:
    """Within the context, every linen batch norm call gets ``mask=`` from ``valid``.

    Args:
      valid: the batch's per-example mask, boolean ``(B,)``; None changes nothing.

    Yields:
      The module paths of the batch norms that received the mask (filled as they run).

    Raises:
      ValueError: (when a layer runs) a ``flax.linen.BatchNorm`` with ``axis_name`` in
        batch-statistics mode (it averages per-device masked means, which is not the
        statistics of the valid examples when devices hold different numbers of them), or a
        batch norm whose input does not have the examples on axis 0.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> bn = BatchNorm()
      >>> x = jnp.array([[1.0], [3.0], [1e3]])
      >>> v = bn.init(jax.random.key(0), x, training=False)
      >>> with masked_batch_norms(jnp.array([True, True, False])) as paths:
      ...     _, new = bn.apply(v, x, training=True, mutable=["batch_stats"])
      >>> round(float(new["batch_stats"]["mean"][0]), 4), paths  # 0.01 * mean(1, 3)
      (0.02, [()])
    """
    handled: list[tuple[str, ...]] = []
    if valid is None:
        yield handled
        return

    def interceptor(next_fun, args, kwargs, context):  # noqa: ANN001, ANN202
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, BatchNorm | nn.BatchNorm):
            return next_fun(*args, **kwargs)
        path = tuple(module.path)
        where = _where(path, module)
        if (isinstance(module, nn.BatchNorm) and module.axis_name is not None
                and _flax_batch_statistics(module, args, kwargs)):
            raise ValueError(
                f"flax.linen.BatchNorm at {where!r} has axis_name={module.axis_name!r}: with "
                "batch['mask'] it would average each device's masked mean, which is not the "
                "mean of the valid examples when devices hold different numbers of them. Use "
                "bnjax.BatchNorm (same fields and variables; exact masked statistics across "
                "devices), or leave 'mask' out of the batch.")
        x = args[0] if args else kwargs["x"]
        kwargs = {**kwargs, "mask": _layer_mask(module, x, kwargs.get("mask"), valid, where)}
        handled.append(path)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield handled


def check_masked(batch_stats: Any, handled: list[tuple[str, ...]] | None) -> None:
    """Refuses batch statistics kept by a module that did not receive the mask.

    Args:
      batch_stats: the model's updated ``batch_stats`` collection.
      handled: the paths :func:`masked_batch_norms` yielded; None skips the check (no mask).

    Raises:
      ValueError: naming the first module whose statistics the mask did not reach.

    Example:
      >>> check_masked({"BatchNorm_0": {"mean": 0.0}}, [("BatchNorm_0",)])
      >>> check_masked({"MyNorm_0": {"mean": 0.0}}, [])
      Traceback (most recent call last):
      ...
      ValueError: the model keeps batch statistics at 'MyNorm_0' ...
    """
    if handled is None:
        return
    for key_path, _ in jax.tree_util.tree_flatten_with_path(batch_stats)[0]:
        keys = tuple(str(getattr(k, "key", k)) for k in key_path)
        if not any(keys[:len(p)] == p for p in handled):
            raise ValueError(
                f"the model keeps batch statistics at {'/'.join(keys[:-1]) or 'its top'!r} "
                f"(batch_stats{jax.tree_util.keystr(key_path)}) in a module that is not a "
                "bnjax.BatchNorm or flax.linen.BatchNorm, so the step cannot give it "
                "batch['mask'] and padding would enter them; build its batch norms with "
                "bnjax.BatchNorm, or leave 'mask' out of the batch.")


def zero_padding(tree: Any, valid: Array) -> Any:
    """Every leaf with its masked-out examples (rows of axis 0) replaced by zeros.

    Padding may hold anything (NaN, 1e30); once the batch norms ignore it, zeros keep it
    from reaching a gradient through the other layers (``0 * NaN`` is NaN).

    Example:
      >>> zero_padding({"x": jnp.array([[1.0], [jnp.nan]])}, jnp.array([True, False]))["x"]
      Array([[1.],
             [0.]], dtype=float32)
    """
    n = valid.shape[0]

    def one(a: Any) -> Any:
        a = jnp.asarray(a)
        return jnp.where(valid.reshape((n,) + (1,) * (a.ndim - 1)), a, jnp.zeros((), a.dtype))

    return jax.tree.map(one, tree)
