"""Training state and jit-compiled train / eval steps, single-device or data-parallel.

The data-parallel steps run under ``jax.pmap`` over the local devices with the axis name
``"batch"``: every device holds a replica of the state and a shard of the batch (placed with
:mod:`bnjax.parallel`), gradients are averaged with ``pmean`` and batch-norm layers built with
``axis_name="batch"`` see the statistics of the global batch, so their moving statistics stay
identical on every device. With several processes (hosts), call
:func:`bnjax.parallel.initialize_distributed` first: the same ``pmap`` then spans the devices of
every process, and each process feeds its own shard of the data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from bnjax.parallel import validate_data_parallel

__all__ = [
    "TrainState",
    "make_eval_step",
    "make_train_step",
]

Batch = Mapping[str, Any]
Metrics = dict[str, jax.Array]


class TrainState(struct.PyTreeNode):
    """Everything a train step reads and writes: step count, params, batch_stats, optimizer state.

    Attributes:
      step: number of train steps taken (batches consumed), skipped non-finite steps included.
      params: the model's ``params`` collection.
      batch_stats: the model's ``batch_stats`` collection (moving statistics).
      opt_state: the optimizer state of ``tx``.
      apply_fn: the model's ``apply`` (static, not a pytree leaf).
      tx: the optax optimizer (static, not a pytree leaf).

    Example:
      >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
      >>> model = nn.Dense(2)
      >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
      >>> state = TrainState.create(apply_fn=model.apply, params=variables["params"],
      ...                           batch_stats={}, tx=optax.sgd(0.1))
      >>> int(state.step)
      0
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    apply_fn: Callable[..., Any] = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    @classmethod
    def create(
        cls,
        *,
        apply_fn: Callable[..., Any],
        params: Any,
        batch_stats: Any,
        tx: optax.GradientTransformation,
    ) -> TrainState:
        """Builds a state at step 0 with a freshly initialized optimizer state.

        Args:
          apply_fn: the model's ``apply``.
          params: initial ``params`` collection.
          batch_stats: initial ``batch_stats`` collection (``{}`` for a model without BN).
          tx: optax optimizer.

        Returns:
          The new ``TrainState``.

        Example:
          >>> import jax.numpy as jnp, optax
          >>> s = TrainState.create(apply_fn=None, params={"w": jnp.ones(2)}, batch_stats={},
          ...                       tx=optax.adam(1e-3))
          >>> int(s.step)
          0
        """
        if not isinstance(tx, optax.GradientTransformation):
            raise TypeError(
                f"tx={tx!r} is not an optax.GradientTransformation; pass an optax optimizer "
                "such as optax.adam(1e-3)."
            )
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=tx.init(params),
            apply_fn=apply_fn,
            tx=tx,
        )



# --------------------------------------------------------------------------------------------
# Steps.


def _global_sum(v: jax.Array, axis_name: str | None) -> jax.Array:
    return v if axis_name is None else jax.lax.psum(v, axis_name)


def _tree_all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _example_mask(batch: Batch, n: int) -> jax.Array:
    mask = batch.get("mask")
    return jnp.ones((n,), bool) if mask is None else jnp.asarray(mask).astype(bool).reshape(n)


def _check_labels(y: Any) -> None:
    if not jnp.issubdtype(jnp.result_type(y), jnp.integer):
        raise TypeError(
            f"batch['y'] has dtype {jnp.result_type(y)}; it must hold integer class labels."
        )


def _train_step_body(
    state: TrainState,
    batch: Batch,
    axis_name: str | None,
    constrain_fn: Callable[[Any], Any] | None,
) -> tuple[TrainState, Metrics]:
    x, y = batch["x"], batch["y"]
    _check_labels(y)
    n_local = y.shape[0]
    valid = _example_mask(batch, n_local)
    count = _global_sum(jnp.sum(valid, dtype=jnp.float32), axis_name)
    safe_count = jnp.maximum(count, 1.0)
    num_replicas = 1 if axis_name is None else jax.lax.psum(1, axis_name)

    def loss_fn(params: Any) -> tuple[jax.Array, tuple[Any, jax.Array, jax.Array]]:
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, x, training=True,
            mutable=["batch_stats", "losses"])
        logits = logits.astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        ce_local = jnp.sum(jnp.where(valid, ce, 0.0))
        penalties = jax.tree.leaves(updates.get("losses", {}))
        penalty = sum((jnp.sum(p) for p in penalties), jnp.zeros((), jnp.float32))
        # The objective whose device average is the global loss: pmean of the gradients
        # then gives the gradient of (mean CE over the global batch) + penalty.
        objective = ce_local * num_replicas / safe_count + penalty
        correct = jnp.sum(jnp.where(valid, jnp.argmax(logits, -1) == y, False))
        return objective, (updates.get("batch_stats", {}), ce_local, penalty, correct)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, (new_stats, ce_local, penalty, correct)), grads = grad_fn(state.params)
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
    loss = _global_sum(ce_local, axis_name) / safe_count + penalty
    accuracy = _global_sum(correct.astype(jnp.float32), axis_name) / safe_count

    updates, new_opt_state = state.tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    if constrain_fn is not None:
        new_params = constrain_fn(new_params)

    ok = jnp.isfinite(loss) & _tree_all_finite(grads)

    def pick(new: Any, old: Any) -> Any:
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

    new_state = state.replace(
        step=state.step + 1,
        params=pick(new_params, state.params),
        opt_state=pick(new_opt_state, state.opt_state),
        batch_stats=pick(new_stats, state.batch_stats),
    )
    metrics = {"loss": loss, "accuracy": accuracy,
               "skipped": jnp.where(ok, 0.0, 1.0).astype(jnp.float32)}
    return new_state, metrics


def _eval_step_body(state: TrainState, batch: Batch, axis_name: str | None) -> Metrics:
    x, y = batch["x"], batch["y"]
    _check_labels(y)
    valid = _example_mask(batch, y.shape[0])
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, x,
                            training=False).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    loss_sum = jnp.sum(jnp.where(valid, ce, 0.0))
    correct = jnp.sum(jnp.where(valid, jnp.argmax(logits, -1) == y, False), dtype=jnp.float32)
    count = jnp.sum(valid, dtype=jnp.float32)
    return {k: _global_sum(v, axis_name) for k, v in
            (("loss_sum", loss_sum), ("correct", correct), ("count", count))}


def _check_axis_name(axis_name: Any) -> None:
    if not isinstance(axis_name, str) or not axis_name:
        raise ValueError(
            f"axis_name={axis_name!r} must be a non-empty string naming the device axis "
            "(the same name the model's BatchNorm layers use, 'batch' by default)."
        )


class _ValidatedPmap:
    """A pmapped step that validates each new input signature before running it."""

    def __init__(self, fn: Callable[..., Any], axis_name: str) -> None:
        self._fn = fn
        self._axis_name = axis_name
        self._seen: set[Any] = set()

    def __call__(self, state: TrainState, batch: Batch) -> Any:
        key = tuple(sorted((k, tuple(np.shape(v))) for k, v in batch.items()))
        if key not in self._seen:
            shapes = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(np.shape(a)[1:], jnp.result_type(a)), state)
            validate_data_parallel(shapes, batch, axis_name=self._axis_name)
            self._seen.add(key)
        return self._fn(state, batch)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        """Lowers the underlying pmapped step (to inspect the compiled HLO)."""
        return self._fn.lower(*args, **kwargs)


def make_train_step(
    *,
    data_parallel: bool = False,
    axis_name: str = "batch",
    constrain_fn: Callable[[Any], Any] | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Builds a compiled train step ``(state, batch) -> (state, metrics)``.

    The model is called as ``apply_fn({"params", "batch_stats"}, x, training=True,
    mutable=["batch_stats", "losses"])``. The loss is the mean softmax cross-entropy over the
    valid examples of the global batch (``batch["mask"]``, bool per example, optional) plus the
    sum of every leaf of the ``"losses"`` collection (penalties a module sows). When the loss or
    any gradient is not finite, params, optimizer state and batch_stats are left unchanged and
    ``metrics["skipped"]`` is 1 (``step`` still counts the batch).

    Args:
      data_parallel: run under ``jax.pmap`` over the devices with ``axis_name``; the state
        is replicated (:func:`bnjax.parallel.replicate`) and batch arrays are
        ``(num_local_devices, per_device_batch, ...)`` (:func:`bnjax.parallel.shard_batch`).
        Gradients are averaged with ``pmean``; the input is checked with
        :func:`bnjax.parallel.validate_data_parallel` before the first step of each new batch
        shape.
      axis_name: name of the device axis (the one BatchNorm layers synchronize over).
      constrain_fn: optional function applied to the params after each optimizer update
        (Keras-style constraints).

    Returns:
      The step function; metrics are ``{"loss", "accuracy", "skipped"}`` over the global batch.

    Example:
      >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
      >>> model = nn.Dense(3)
      >>> v = model.init(jax.random.key(0), jnp.ones((1, 4)))
      >>> state = TrainState.create(apply_fn=lambda v, x, training, mutable: (
      ...     model.apply(v, x), {}), params=v["params"], batch_stats={}, tx=optax.sgd(0.1))
      >>> step = make_train_step()
      >>> state, m = step(state, {"x": jnp.ones((2, 4)), "y": jnp.array([0, 1])})
      >>> int(state.step), float(m["skipped"])
      (1, 0.0)
    """
    if constrain_fn is not None and not callable(constrain_fn):
        raise TypeError(f"constrain_fn={constrain_fn!r} must be callable (params -> params).")
    if not data_parallel:
        return jax.jit(lambda s, b: _train_step_body(s, b, None, constrain_fn))
    _check_axis_name(axis_name)
    fn = jax.pmap(lambda s, b: _train_step_body(s, b, axis_name, constrain_fn),
                  axis_name=axis_name)
    return _ValidatedPmap(fn, axis_name)


def make_eval_step(
    *, data_parallel: bool = False, axis_name: str = "batch"
) -> Callable[[TrainState, Batch], Metrics]:
    """Builds a compiled eval step ``(state, batch) -> {"loss_sum", "correct", "count"}``.

    The model runs with ``training=False`` (moving statistics); ``batch_stats`` never change.
    The sums run over the valid examples (``batch["mask"]``) of the global batch; with
    ``data_parallel`` every device returns the same global sums.

    Args:
      data_parallel: run under ``jax.pmap`` over the devices with ``axis_name``.
      axis_name: name of the device axis.

    Returns:
      The eval step function.

    Example:
      >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
      >>> model = nn.Dense(3)
      >>> v = model.init(jax.random.key(0), jnp.ones((1, 4)))
      >>> state = TrainState.create(apply_fn=lambda v, x, training: model.apply(v, x),
      ...                           params=v["params"], batch_stats={}, tx=optax.sgd(0.1))
      >>> m = make_eval_step()(state, {"x": jnp.ones((2, 4)), "y": jnp.array([0, 1]),
      ...                              "mask": jnp.array([True, False])})
      >>> float(m["count"])
      1.0
    """
    if not data_parallel:
        return jax.jit(lambda s, b: _eval_step_body(s, b, None))
    _check_axis_name(axis_name)
    fn = jax.pmap(lambda s, b: _eval_step_body(s, b, axis_name), axis_name=axis_name)
    return _ValidatedPmap(fn, axis_name)
