"""The train and eval steps' loss and metrics: the defaults, and the checks and reductions.

A loss is ``loss_fn(outputs, batch) -> (B,)``, one loss per example; a metric function is
``metrics_fn(outputs, batch) -> {name: (B,)}``, one value per example for each metric. The
steps of :mod:`bnjax.steps` call them on the model's outputs and on the batch with its
padding (masked-out examples) replaced by zeros, drop the padding's values with
``jnp.where`` and reduce over the valid examples of the global batch themselves; this module
checks what the functions return and holds the defaults, softmax cross-entropy on integer
labels and the 0/1 flags of a correct prediction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from bnjax._batch_mask import example_mask, zero_padding

__all__ = [
    "accuracy",
    "all_finite",
    "check_callable",
    "correct",
    "global_sum",
    "metric_sums",
    "per_example_loss",
    "resolve",
    "softmax_cross_entropy",
    "step_inputs",
    "valid_sum",
    "valid_sums",
]

Array = jax.Array
Batch = Mapping[str, Any]
LossFn = Callable[[Any, Batch], Array]
MetricsFn = Callable[[Any, Batch], Mapping[str, Array]]


def _labels(batch: Batch) -> Array:
    y = batch["y"]
    if not jnp.issubdtype(jnp.result_type(y), jnp.integer):
        raise TypeError(
            f"batch['y'] has dtype {jnp.result_type(y)}; it must hold integer class labels."
        )
    return y


def softmax_cross_entropy(outputs: Array, batch: Batch) -> Array:
    """The default loss: per-example softmax cross-entropy of logits on integer labels.

    Args:
      outputs: logits ``(B, classes)`` (computed in float32).
      batch: holds ``"y"``, integer labels ``(B,)``.

    Returns:
      ``(B,)`` float32 losses.

    Raises:
      TypeError: ``batch["y"]`` does not hold integers.

    Example:
      >>> l = softmax_cross_entropy(jnp.zeros((2, 4)), {"y": jnp.array([0, 3])})
      >>> [round(float(v), 4) for v in l]  # log(4)
      [1.3863, 1.3863]
    """
    y = _labels(batch)
    return optax.softmax_cross_entropy_with_integer_labels(outputs.astype(jnp.float32), y)


def _hits(outputs: Array, batch: Batch) -> Array:
    return jnp.argmax(outputs.astype(jnp.float32), -1) == _labels(batch)


def accuracy(outputs: Array, batch: Batch) -> dict[str, Array]:
    """The train step's default metrics: ``{"accuracy": 1 where the top logit is the label}``.

    Example:
      >>> accuracy(jnp.array([[0.0, 1.0], [1.0, 0.0]]), {"y": jnp.array([1, 1])})["accuracy"]
      Array([ True, False], dtype=bool)
    """
    return {"accuracy": _hits(outputs, batch)}


def correct(outputs: Array, batch: Batch) -> dict[str, Array]:
    """The eval step's default metrics: ``{"correct": ...}``, the flags :func:`accuracy` has.

    Summed by the eval step, they count the correct predictions.

    Example:
      >>> correct(jnp.array([[0.0, 1.0], [1.0, 0.0]]), {"y": jnp.array([1, 1])})["correct"]
      Array([ True, False], dtype=bool)
    """
    return {"correct": _hits(outputs, batch)}


def check_callable(name: str, fn: Any, what: str) -> None:
    """Refuses an ``fn`` that is neither None nor callable, naming the argument.

    Example:
      >>> check_callable("loss_fn", 3, "(outputs, batch) -> per-example losses (B,)")
      Traceback (most recent call last):
      ...
      TypeError: loss_fn=3 must be callable, (outputs, batch) -> per-example losses (B,)...
    """
    if fn is not None and not callable(fn):
        raise TypeError(f"{name}={fn!r} must be callable, {what}, or None for the default.")


def resolve(loss_fn: LossFn | None, metrics_fn: MetricsFn | None,
            default_metrics: MetricsFn) -> tuple[LossFn, MetricsFn]:
    """A step's loss and metrics: the arguments checked, or the classification defaults.

    Without ``metrics_fn``, the metrics are ``default_metrics`` (of logits and labels) with
    the default loss, and none with a ``loss_fn`` of the user's (they may not be logits).

    Example:
      >>> loss_fn, metrics_fn = resolve(None, None, accuracy)
      >>> loss_fn is softmax_cross_entropy, metrics_fn is accuracy
      (True, True)
    """
    check_callable("loss_fn", loss_fn, "(outputs, batch) -> per-example losses (B,)")
    check_callable("metrics_fn", metrics_fn,
                   "(outputs, batch) -> {name: per-example values (B,)}")
    if metrics_fn is None:
        metrics_fn = default_metrics if loss_fn is None else _no_metrics
    return loss_fn or softmax_cross_entropy, metrics_fn


def _no_metrics(outputs: Any, batch: Batch) -> dict[str, Array]:
    return {}


def step_inputs(batch: Batch) -> tuple[Any, dict[str, Any], Array | None, Array]:
    """``(x, batch, mask or None, valid)`` with the padding (masked-out rows) zeroed.

    ``x`` is ``batch["x"]`` with its padded examples replaced by zeros; so is every other
    entry of the returned batch (``"mask"`` excepted) whose leaves hold one row per example
    (leading axis of the batch's length, that of ``batch["y"]``); other leaves are kept.

    Example:
      >>> x, b, mask, valid = step_inputs({"x": jnp.array([[1.0], [jnp.nan]]),
      ...                                  "y": jnp.array([2.0, jnp.nan]),
      ...                                  "mask": jnp.array([True, False])})
      >>> x.tolist(), b["y"].tolist(), valid.tolist()
      ([[1.0], [0.0]], [2.0, 0.0], [True, False])
    """
    x, n = batch["x"], jnp.shape(batch["y"])[0]
    mask = example_mask(batch, n)
    if mask is None:
        return x, dict(batch), None, jnp.ones((n,), bool)

    def rows(a: Any) -> Any:
        return zero_padding(a, mask) if jnp.ndim(a) and jnp.shape(a)[0] == n else a

    zeroed = {k: v if k == "mask" else jax.tree.map(rows, v) for k, v in batch.items()}
    zeroed["x"] = zero_padding(x, mask)
    return zeroed["x"], zeroed, mask, mask


def _wide(a: Array) -> Array:
    """``a`` as float32, or wider if it is."""
    dtype = jnp.result_type(a)
    wide = jnp.promote_types(dtype, jnp.float32) if jnp.issubdtype(dtype, jnp.inexact) else (
        jnp.float32)
    return jnp.asarray(a).astype(wide)


def global_sum(v: Array, axis_name: str | tuple[str, ...] | None) -> Array:
    """``v`` summed over the devices of ``axis_name`` (as it is for None: one device, jit).

    Example:
      >>> float(global_sum(jnp.float32(2.0), None))
      2.0
    """
    return v if axis_name is None else jax.lax.psum(v, axis_name)


def all_finite(tree: Any) -> Array:
    """Whether every floating-point value of ``tree`` is finite (the non-finite skip).

    Example:
      >>> bool(all_finite({"w": jnp.array([1.0, jnp.inf]), "n": jnp.array(3)}))
      False
    """
    leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def valid_sum(values: Array, valid: Array) -> Array:
    """The sum of the valid examples' values (float32 or wider); the padding's are dropped.

    ``jnp.where``, not a product with 0: a padded example's value may be NaN or infinite.

    Example:
      >>> float(valid_sum(jnp.array([1.0, jnp.nan, 2.0]), jnp.array([True, False, True])))
      3.0
    """
    return jnp.sum(jnp.where(valid, _wide(values), 0.0))


def _per_example_shape(value: Any, n: int, where: str) -> None:
    shape = tuple(jnp.shape(value)) if hasattr(value, "shape") or jnp.isscalar(value) else None
    if shape != (n,):
        got = f"shape {shape}" if shape is not None else f"a {type(value).__name__}"
        raise ValueError(
            f"{where} returned {got}, but it must return one value per example, an array of "
            f"shape ({n},) for the {n} examples it was given: the step itself averages over "
            f"the valid examples of the global batch, so return the per-example values, not "
            f"their mean (e.g. jnp.mean(err ** 2, axis=-1), not jnp.mean(err ** 2)).")


def per_example_loss(loss_fn: LossFn, outputs: Any, batch: Batch, n: int) -> Array:
    """``loss_fn(outputs, batch)``, refused unless it is ``(n,)`` floating-point losses.

    Example:
      >>> per_example_loss(lambda o, b: jnp.mean(o), jnp.ones((3, 2)), {}, 3)
      Traceback (most recent call last):
      ...
      ValueError: loss_fn(outputs, batch) returned shape (), but it must return one value ...
    """
    losses = loss_fn(outputs, batch)
    _per_example_shape(losses, n, "loss_fn(outputs, batch)")
    dtype = jnp.result_type(losses)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"loss_fn(outputs, batch) returned dtype {dtype}; the losses must be floating "
            "point (they are differentiated).")
    return losses


def metric_sums(metrics_fn: MetricsFn, outputs: Any, batch: Batch, valid: Array,
                reserved: tuple[str, ...]) -> dict[str, Array]:
    """Each metric of ``metrics_fn(outputs, batch)`` summed over the valid examples.

    Args:
      metrics_fn: ``(outputs, batch) -> {name: (B,)}``; boolean, integer or float values.
      outputs: the model's outputs.
      batch: the batch (padding zeroed).
      valid: ``(B,)`` booleans, the valid examples.
      reserved: names the step reports itself, refused as metric names.

    Raises:
      TypeError: the result is not a mapping of string names, or a value is complex.
      ValueError: a value is not ``(B,)``, or a name is reserved.

    Example:
      >>> s = metric_sums(lambda o, b: {"hit": o > 0}, jnp.array([1.0, -1.0, 2.0]), {},
      ...                 jnp.array([True, True, False]), ("loss",))
      >>> float(s["hit"])
      1.0
    """
    result = metrics_fn(outputs, batch)
    if not isinstance(result, Mapping) or not all(isinstance(k, str) for k in result):
        got = (f"a mapping with the keys {list(result)!r}" if isinstance(result, Mapping) else
               f"an array of shape {tuple(result.shape)}" if hasattr(result, "shape") else
               f"a {type(result).__name__}")
        raise TypeError(
            f"metrics_fn(outputs, batch) returned {got}; it must return a dict of "
            "per-example metrics, {name: array of shape (B,)} with string names.")
    clash = [k for k in result if k in reserved]
    if clash:
        raise ValueError(
            f"metrics_fn(outputs, batch) returned the metric name {clash[0]!r}, which the "
            f"step reports itself ({', '.join(map(repr, reserved))}); rename the metric.")
    sums = {}
    n = valid.shape[0]
    for name, value in result.items():
        _per_example_shape(value, n, f"metrics_fn(outputs, batch)[{name!r}]")
        if jnp.issubdtype(jnp.result_type(value), jnp.complexfloating):
            raise TypeError(
                f"metrics_fn(outputs, batch)[{name!r}] has dtype {jnp.result_type(value)}; a "
                "metric must be boolean, integer or real floating point.")
        sums[name] = valid_sum(value, valid)
    return sums


def valid_sums(loss_fn: LossFn, metrics_fn: MetricsFn, outputs: Any, batch: Batch,
               valid: Array, reserved: tuple[str, ...]) -> tuple[Array, dict[str, Array]]:
    """The sum of the valid examples' losses, and of each metric (:func:`metric_sums`).

    Example:
      >>> loss, sums = valid_sums(lambda o, b: o ** 2, lambda o, b: {"pos": o > 0},
      ...                         jnp.array([1.0, -2.0, jnp.nan]), {},
      ...                         jnp.array([True, True, False]), ("loss",))
      >>> float(loss), float(sums["pos"])
      (5.0, 1.0)
    """
    losses = per_example_loss(loss_fn, outputs, batch, valid.shape[0])
    return valid_sum(losses, valid), metric_sums(metrics_fn, outputs, batch, valid, reserved)
