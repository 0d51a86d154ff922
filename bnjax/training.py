"""Training state and jit-compiled train / eval steps, single-device or data-parallel.

The data-parallel steps run under ``jax.pmap`` over the local devices with the axis name
``"batch"``: every device holds a replica of the state and a shard of the batch, gradients are
averaged with ``pmean`` and batch-norm layers built with ``axis_name="batch"`` see the statistics
of the global batch, so their moving statistics stay identical on every device. With several
processes (hosts), call :func:`initialize_distributed` first: the same ``pmap`` then spans the
devices of every process, and each process feeds its own shard of the data.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

__all__ = [
    "NonFiniteTrainingError",
    "TrainState",
    "initialize_distributed",
    "load_config",
    "make_eval_step",
    "make_train_step",
    "replicate",
    "resolved_norm",
    "shard_batch",
    "train_and_evaluate",
    "unreplicate",
    "validate_config",
    "validate_data_parallel",
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
# Replication helpers for the pmap (data-parallel) steps.


def replicate(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """Copies every leaf of ``tree`` onto each local device (a new leading axis).

    Args:
      tree: a pytree of arrays (e.g. a ``TrainState``).
      devices: devices to replicate over; defaults to ``jax.local_devices()``.

    Returns:
      The tree with each leaf shaped ``(num_devices, *leaf.shape)``, one copy per device.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> r = replicate({"w": jnp.ones(3)})
      >>> r["w"].shape == (jax.local_device_count(), 3)
      True
    """
    devices = list(jax.local_devices() if devices is None else devices)
    sharding = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(devices), ("devices",)), jax.sharding.PartitionSpec("devices"))

    def put(leaf: Any) -> Any:
        leaf = np.asarray(leaf)
        return jax.device_put(np.broadcast_to(leaf, (len(devices),) + leaf.shape), sharding)

    return jax.tree.map(put, tree)


def unreplicate(tree: Any) -> Any:
    """Takes the first device's copy of every leaf (inverse of :func:`replicate`).

    Args:
      tree: a pytree whose leaves have a leading device axis.

    Returns:
      The tree with that axis removed.

    Example:
      >>> import jax.numpy as jnp
      >>> unreplicate(replicate({"w": jnp.arange(3.0)}))["w"].tolist()
      [0.0, 1.0, 2.0]
    """
    def first(a: Any) -> Any:
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            # Multi-process: this process's first replica (a shard of shape (1, ...)).
            return a.addressable_data(0)[0]
        return a[0]

    return jax.tree.map(first, tree)


def shard_batch(batch: Batch, num_devices: int | None = None) -> dict[str, Any]:
    """Splits a global batch ``(B, ...)`` into ``(num_devices, B // num_devices, ...)``.

    Args:
      batch: a mapping of arrays sharing the leading batch dimension.
      num_devices: number of shards; defaults to ``jax.local_device_count()``.

    Returns:
      The mapping with every array reshaped for a data-parallel (pmap) step.

    Raises:
      ValueError: the batch size is not divisible by ``num_devices``, or arrays disagree on it.

    Example:
      >>> import numpy as np
      >>> shard_batch({"x": np.zeros((8, 3))}, num_devices=4)["x"].shape
      (4, 2, 3)
    """
    n = jax.local_device_count() if num_devices is None else int(num_devices)
    sizes = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in batch.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(
            f"batch arrays have leading sizes {sizes}; every array must share one batch "
            "dimension to be split across devices."
        )
    size = next(iter(sizes.values()))
    if size % n:
        raise ValueError(
            f"batch size {size} is not divisible by the device count {n}; use a batch size "
            f"that is a multiple of {n} (e.g. {max(n, size - size % n)}) or pad the batch and "
            "mask the padding with batch['mask']."
        )
    return {k: np.reshape(v, (n, size // n) + np.shape(v)[1:]) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------
# Validation of data-parallel input (before any step runs).


def _model_sync_layers(state: TrainState, x: Any) -> list[tuple[str, Any, Any]]:
    """``(path, axis_name, axis_index_groups)`` of every module with an ``axis_name`` attribute.

    Found by tracing the model abstractly (``jax.eval_shape``) with a method interceptor, so
    layers created inside ``@nn.compact`` methods are seen as well.
    """
    found: list[tuple[str, Any, Any]] = []

    def interceptor(next_fun, args, kwargs, context):  # noqa: ANN001, ANN202
        module = context.module
        if context.method_name == "__call__" and hasattr(module, "axis_name"):
            entry = ("/".join(module.path) or type(module).__name__, module.axis_name,
                     getattr(module, "axis_index_groups", None))
            if entry not in found:
                found.append(entry)
        return next_fun(*args, **kwargs)

    def run(params: Any, batch_stats: Any, xs: Any) -> Any:
        with nn.intercept_methods(interceptor):
            # Inference mode: no collective is traced, so unbound axis names do not fail here.
            return state.apply_fn({"params": params, "batch_stats": batch_stats}, xs,
                                  training=False)

    try:
        jax.eval_shape(run, state.params, state.batch_stats, x)
    except Exception:  # noqa: BLE001
        # Only a pre-check: a model that cannot be traced this way reports its own error
        # when the step itself is traced.
        pass
    return found


def _names(axis_name: Any) -> tuple[Any, ...]:
    return tuple(axis_name) if isinstance(axis_name, list | tuple) else (axis_name,)


def validate_data_parallel(
    state: TrainState,
    batch: Batch,
    *,
    axis_name: str = "batch",
    num_devices: int | None = None,
) -> None:
    """Checks a data-parallel step's input before it runs; raises a clear ``ValueError``.

    Checks that ``batch`` holds ``x`` and ``y`` split as ``(num_devices, per_device, ...)``,
    that every synchronized layer of the model (any module with an ``axis_name`` attribute,
    such as ``bnjax.BatchNorm``) names ``axis_name`` (or no axis), and that its
    ``axis_index_groups`` partition the devices into groups of equal size.

    Args:
      state: an *unreplicated* ``TrainState`` (leaves without the device axis).
      batch: the batch as passed to the data-parallel step.
      axis_name: the axis name of the step (``"batch"`` by default).
      num_devices: size of the device axis; defaults to ``jax.device_count()`` (all
        processes' devices).

    Raises:
      ValueError: with the offending argument, its value and what is accepted.

    Example:
      >>> import jax, jax.numpy as jnp, optax, bnjax
      >>> model = bnjax.BatchNorm(axis_name="batch")
      >>> v = model.init(jax.random.key(0), jnp.ones((2, 3)), training=False)
      >>> s = TrainState.create(apply_fn=model.apply, params=v["params"],
      ...                       batch_stats=v["batch_stats"], tx=optax.sgd(0.1))
      >>> n = jax.local_device_count()
      >>> validate_data_parallel(s, {"x": jnp.ones((n, 2, 3)), "y": jnp.zeros((n, 2), int)})
    """
    n_global = jax.device_count() if num_devices is None else int(num_devices)
    n_local = n_global // jax.process_count() if num_devices is None else int(num_devices)
    if not isinstance(batch, Mapping) or "x" not in batch or "y" not in batch:
        raise ValueError(
            f"batch has keys {sorted(batch) if isinstance(batch, Mapping) else type(batch)}; "
            "it must be a mapping with 'x' (inputs), 'y' (integer labels) and optionally "
            "'mask' (bool per example)."
        )
    per_device = None
    for key, value in batch.items():
        shape = tuple(np.shape(value))
        if len(shape) < 2 or shape[0] != n_local:
            hint = ""
            if len(shape) >= 1 and shape[0] % n_local == 0 and shape[0] != n_local:
                hint = " (a global batch? split it with bnjax.training.shard_batch)"
            elif len(shape) >= 1 and shape[0] % n_local:
                hint = (f" (a batch of {shape[0]} is not divisible by the {n_local} local "
                        "devices)")
            raise ValueError(
                f"batch[{key!r}] has shape {shape}; a data-parallel step needs "
                f"(num_local_devices={n_local}, per_device_batch, ...){hint}."
            )
        if per_device is None:
            per_device = shape[1]
        elif shape[1] != per_device:
            raise ValueError(
                f"batch[{key!r}] has shape {shape} but batch['x'] has per-device batch "
                f"{per_device}; every array must share the first two dimensions."
            )
    x0 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a)[1:], jnp.result_type(a)),
                      batch["x"])
    allowed = set(_names(axis_name))
    for path, name, groups in _model_sync_layers(state, x0):
        if name is None:
            continue
        bad = [a for a in _names(name) if a not in allowed]
        if bad:
            raise ValueError(
                f"layer {path!r} has axis_name={name!r} but the data-parallel step maps the "
                f"devices over axis_name={axis_name!r}; build the layer with "
                f"axis_name={axis_name!r} (or None for per-device statistics)."
            )
        if groups is not None:
            _check_groups(groups, n_global, where=f"layer {path!r}")


def _check_groups(groups: Any, axis_size: int, *, where: str) -> None:
    try:
        flat = [[int(i) for i in g] for g in groups]
    except TypeError:
        flat = None
    ok = (
        flat is not None
        and flat
        and sorted(i for g in flat for i in g) == list(range(axis_size))
        and len({len(g) for g in flat}) == 1
    )
    if not ok:
        raise ValueError(
            f"{where}: axis_index_groups={groups!r} does not partition the {axis_size} devices "
            f"into groups of equal size; every index 0..{axis_size - 1} must appear in exactly "
            "one group, e.g. [[0, 1], [2, 3], ...]."
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
      data_parallel: run under ``jax.pmap`` over the devices with ``axis_name``; the state is
        replicated (:func:`replicate`) and batch arrays are ``(num_local_devices,
        per_device_batch, ...)`` (:func:`shard_batch`). Gradients are averaged with
        ``pmean``; the input is checked with :func:`validate_data_parallel` before the first
        step of each new batch shape.
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


# --------------------------------------------------------------------------------------------
# Multi-host.


def initialize_distributed(
    coordinator_address: str,
    num_processes: int,
    process_id: int,
    *,
    local_device_ids: Sequence[int] | None = None,
    cpu_collectives: str | None = "gloo",
    initialization_timeout: int = 300,
) -> None:
    """Joins a multi-process (multi-host) JAX job; call once per process before using JAX.

    After it returns, ``jax.devices()`` lists every process's devices and the data-parallel
    steps of this module span all of them: each process passes its own shard of the data
    (arrays shaped ``(jax.local_device_count(), per_device_batch, ...)``) and batch-norm
    statistics, gradients and metrics are global.

    Args:
      coordinator_address: ``"host:port"`` of process 0, reachable from every process.
      num_processes: total number of processes.
      process_id: this process's index in ``[0, num_processes)``.
      local_device_ids: optional devices of this host to use.
      cpu_collectives: collectives implementation for CPU devices (``"gloo"``, or ``"mpi"``);
        None leaves JAX's setting alone. It only affects the CPU backend.
      initialization_timeout: seconds to wait for every process to join.

    Raises:
      ValueError: ``num_processes`` < 1, ``process_id`` out of range, or a malformed address.

    Example:
      >>> initialize_distributed("127.0.0.1:1234", num_processes=0, process_id=0)
      Traceback (most recent call last):
      ...
      ValueError: num_processes=0 must be an int >= 1.
    """
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes={num_processes!r} must be an int >= 1.")
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(
            f"process_id={process_id!r} must be an int in [0, {num_processes - 1}] "
            f"(num_processes={num_processes})."
        )
    host, _, port = str(coordinator_address).rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(
            f"coordinator_address={coordinator_address!r} must be 'host:port', e.g. "
            "'10.0.0.1:1234' (the address of process 0)."
        )
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout,
    )


# --------------------------------------------------------------------------------------------
# The training program's loop (train.py): config validation, data, checkpoints, metrics.

OPTIMIZERS = ("adam", "adamw", "sgd", "momentum")
SCHEDULES = ("constant", "cosine", "warmup_cosine")
# Fields that may differ between an interrupted run and its resumption (they do not change
# the numbers a run produces).
_RESUME_FREE_FIELDS = ("stop_after_steps", "progress_bar", "data_dir", "keep_checkpoints",
                       "checkpoint_every_steps", "precise_bn_batches", "export_folded")


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive train steps had a non-finite loss or gradient."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool) \
        and bool(np.isfinite(v))


def _config_fields() -> dict[str, tuple[Callable[[Any], bool], str]]:
    from bnjax import data as data_lib
    from bnjax import models as models_lib

    def one_of(options: Sequence[str]) -> tuple[Callable[[Any], bool], str]:
        return (lambda v: v in options), f"one of {list(options)}"

    def int_at_least(lo: int) -> tuple[Callable[[Any], bool], str]:
        return (lambda v: _is_int(v) and v >= lo), f"an integer >= {lo}"

    def dataset_ok(v: Any) -> bool:
        try:
            data_lib.validate_dataset_name(v)
        except ValueError:
            return False
        return True

    return {
        "dataset": (dataset_ok, "'mnist1d' or 'tfds:NAME' (e.g. 'tfds:mnist', 'tfds:cifar10')"),
        "data_dir": (lambda v: isinstance(v, str) and bool(v), "a non-empty folder path"),
        "validation_split": (lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
        "max_train_examples": int_at_least(0),
        "augment": one_of(data_lib.AUGMENTATIONS),
        "model": one_of(sorted(models_lib.MODELS)),
        "norm": one_of(models_lib.NORMS),
        "model_kwargs": (lambda v: isinstance(v, Mapping) or hasattr(v, "to_dict"),
                         "a mapping of model attributes"),
        "with_bn": (lambda v: isinstance(v, bool), "True or False"),
        "seed": int_at_least(0),
        "num_epochs": int_at_least(1),
        "batch_size": int_at_least(1),
        "eval_batch_size": int_at_least(1),
        "optimizer": one_of(OPTIMIZERS),
        "learning_rate": (lambda v: _is_num(v) and v > 0, "a finite number > 0"),
        "schedule": one_of(SCHEDULES),
        "warmup_epochs": (lambda v: _is_num(v) and v >= 0, "a finite number >= 0"),
        "weight_decay": (lambda v: _is_num(v) and v >= 0, "a finite number >= 0"),
        "momentum": (lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
        "max_consecutive_skips": int_at_least(1),
        "checkpoint_every_steps": int_at_least(0),
        "keep_checkpoints": int_at_least(1),
        "progress_bar": (lambda v: isinstance(v, bool), "True or False"),
        "stop_after_steps": int_at_least(0),
        "precise_bn_batches": int_at_least(0),
        "export_folded": (lambda v: isinstance(v, bool), "True or False"),
    }


_OPTIONAL_FIELDS = ("with_bn", "precise_bn_batches", "export_folded")


def resolved_norm(config: Any) -> str:
    """The normalization a config asks for: ``config.norm``, or ``"none"`` if ``with_bn`` is False.

    Example:
      >>> import ml_collections
      >>> resolved_norm(ml_collections.ConfigDict({"norm": "batch", "with_bn": False}))
      'none'
    """
    norm = config.get("norm", "batch")
    if "with_bn" in config and config.with_bn is False:
        return "none"
    return norm


def validate_config(config: Any, *, num_devices: int | None = None) -> None:
    """Checks every field of a training config; raises one ``ValueError`` naming each bad field.

    Args:
      config: an ``ml_collections.ConfigDict`` (or mapping) as in ``configs/default.py``.
      num_devices: devices the global batch is split across; defaults to
        ``jax.device_count()``.

    Raises:
      ValueError: unknown or missing fields, or values out of range; the message names every
        offending field (``config.FIELD``), its value and what is accepted.

    Example:
      >>> config = load_config("default")
      >>> config.learning_rate = -1.0
      >>> validate_config(config, num_devices=1)
      Traceback (most recent call last):
      ...
      ValueError: invalid config:
        config.learning_rate=-1.0: must be a finite number > 0
    """
    fields = _config_fields()
    keys = list(config.keys())
    errors = [f"config.{k}: unknown field; known fields: {sorted(fields)}"
              for k in keys if k not in fields]
    errors += [f"config.{k}: missing" for k in fields
               if k not in keys and k not in _OPTIONAL_FIELDS]
    good = set()
    for k, (ok, what) in fields.items():
        if k in keys:
            if ok(config[k]):
                good.add(k)
            else:
                errors.append(f"config.{k}={config[k]!r}: must be {what}")
    # Checks across fields, for the fields that passed their own check.
    n = jax.device_count() if num_devices is None else int(num_devices)
    for k in ("batch_size", "eval_batch_size"):
        if k in good and config[k] % n:
            errors.append(
                f"config.{k}={config[k]}: must be divisible by the {n} devices the batch is "
                f"split across (e.g. {max(n, config[k] - config[k] % n)})")
    if config.get("with_bn") is True and config.get("norm") == "none":
        errors.append("config.with_bn=True contradicts config.norm='none'")
    if {"warmup_epochs", "num_epochs"} <= good and config.warmup_epochs > config.num_epochs:
        errors.append(f"config.warmup_epochs={config.warmup_epochs!r}: must be <= "
                      f"config.num_epochs={config.num_epochs}")
    if {"model", "norm", "model_kwargs"} <= good:
        from bnjax import models as models_lib

        try:
            models_lib.create_model(config.model, num_classes=10, norm=resolved_norm(config),
                                    **dict(config.model_kwargs))
        except (TypeError, ValueError) as e:
            errors.append(f"config.model_kwargs={dict(config.model_kwargs)!r}: {e}")
    if errors:
        raise ValueError("invalid config:\n  " + "\n  ".join(errors))


_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_config(name_or_path: str) -> Any:
    """Runs a config file's ``get_config()``: a path, or the name of a file in ``configs/``.

    Config files are Python and are executed: load only files you trust.

    Args:
      name_or_path: e.g. ``"configs/tiny.py"`` or ``"tiny"`` (``configs/tiny.py`` of the
        repository this package sits in).

    Returns:
      The ``ml_collections.ConfigDict``.

    Raises:
      FileNotFoundError: no such file.

    Example:
      >>> load_config("default").dataset
      'mnist1d'
    """
    import runpy

    path = name_or_path
    if not os.path.exists(path) and os.sep not in path and not path.endswith(".py"):
        path = os.path.join(_CONFIG_DIR, f"{path}.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {name_or_path!r} not found (looked at {path!r}).")
    return runpy.run_path(path)["get_config"]()


def _make_optimizer(config: Any, steps_per_epoch: int) -> optax.GradientTransformation:
    total = config.num_epochs * steps_per_epoch
    warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total - 1)
    lr = float(config.learning_rate)
    if config.schedule == "constant":
        schedule = optax.constant_schedule(lr)
        if warmup > 0:
            schedule = optax.join_schedules(
                [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    elif config.schedule == "cosine" or warmup <= 0:
        schedule = optax.cosine_decay_schedule(lr, total)
    else:
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total)

    def decay_mask(params: Any) -> Any:  # kernels only: no decay of biases and norm params
        return jax.tree.map(lambda p: np.ndim(p) > 1, params)

    wd = float(config.weight_decay)
    if config.optimizer == "adamw":
        return optax.adamw(schedule, weight_decay=wd, mask=decay_mask)
    base = {
        "adam": lambda: optax.adam(schedule),
        "sgd": lambda: optax.sgd(schedule),
        "momentum": lambda: optax.sgd(schedule, momentum=float(config.momentum)),
    }[config.optimizer]()
    if wd:
        return optax.chain(optax.add_decayed_weights(wd, mask=decay_mask), base)
    return base


def _host_first(tree: Any) -> Any:
    """The first local replica of every leaf of a pmap output, as NumPy.

    Copies this process's first shard to the host without running a computation: with several
    processes, an eager op here could wait behind the other processes' collectives.
    """
    def one(a: Any) -> Any:
        if isinstance(a, jax.Array):
            return np.asarray(a.addressable_data(0))[0]
        return np.asarray(a)[0]

    return jax.tree.map(one, tree)


def _config_dict(config: Any) -> dict[str, Any]:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(d, default=list))


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_metrics(path: str) -> list[dict[str, Any]]:
    """The complete lines of ``metrics.jsonl`` (a torn last line is dropped)."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


def _plot_curves(records: Sequence[Mapping[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-"), ("val", ":"), ("test", "--")):
        if records and f"{split}_loss" in records[0]:
            ax_loss.plot(steps, [r[f"{split}_loss"] for r in records], style, label=split)
            ax_acc.plot(steps, [r[f"{split}_accuracy"] for r in records], style, label=split)
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
    """Trains and evaluates a model as ``config`` says, resuming from ``workdir`` if possible.

    Uses every device (data parallel under ``pmap`` with synchronized batch norm when there
    is more than one), evaluates with the moving statistics after each epoch, and writes into
    ``workdir``: ``config.json`` (the resolved config), ``metrics.jsonl`` (one line per epoch),
    ``checkpoints/<step>/`` (orbax: params, batch_stats, optimizer state, step, RNG and the
    data position; each epoch, every ``checkpoint_every_steps`` and at the end) and
    ``curves.png``. Running it again on the same ``workdir`` continues from the last complete
    checkpoint and ends with the same metrics as an uninterrupted run.

    Args:
      config: the training config (see ``configs/default.py``); checked by
        :func:`validate_config` before anything else runs.
      workdir: output folder (created if needed).

    Returns:
      The last metrics line (``epoch``, ``step``, ``train_*``, ``test_*``, ...) plus
      ``"interrupted": True`` when ``stop_after_steps`` stopped the run early.

    Raises:
      ValueError: a bad config field (named in the message), or a ``workdir`` holding a run
        with another config.
      bnjax.data.DatasetNotFoundError: the dataset is not on disk.
      NonFiniteTrainingError: ``max_consecutive_skips`` steps in a row were not finite.

    Example:
      >>> import tempfile
      >>> config = load_config("tiny")
      >>> config.update(num_epochs=1, max_train_examples=200, batch_size=40)
      >>> result = train_and_evaluate(config, tempfile.mkdtemp())  # doctest: +SKIP
    """
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    from bnjax import data as data_lib
    from bnjax import models as models_lib

    t_start = time.time()
    validate_config(config)
    process_index, process_count = jax.process_index(), jax.process_count()
    n_local = jax.local_device_count()
    data_parallel = jax.device_count() > 1
    is_main = process_index == 0
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)

    # Data.
    ds = data_lib.load_dataset(
        config.dataset, data_dir=config.data_dir, validation_split=config.validation_split,
        process_index=process_index, process_count=process_count)
    if config.max_train_examples:
        limit = min(config.max_train_examples, ds.train.total)
        keep = len(range(process_index, limit, process_count))
        ds = dataclasses.replace(ds, train=data_lib.Split(
            x=ds.train.x[:keep], y=ds.train.y[:keep], total=limit))
    spe = data_lib.steps_per_epoch(ds, config.batch_size, process_count)
    if spe < 1:
        raise ValueError(
            f"config.batch_size={config.batch_size}: larger than the {ds.train.total} training "
            f"examples of {config.dataset!r}; use a batch size <= {ds.train.total}.")
    # Model and state.
    norm = resolved_norm(config)
    model = models_lib.create_model(
        config.model, num_classes=ds.num_classes, norm=norm,
        axis_name="batch" if data_parallel else None, **dict(config.model_kwargs))
    rng = jax.random.key(config.seed)
    init_rng, rng = jax.random.split(rng)
    rng_data = np.asarray(jax.random.key_data(rng))  # saved in checkpoints
    x0 = ds.normalize(ds.train.x[:1])
    variables = jax.jit(lambda k, x: model.init(k, x, training=False))(init_rng, x0)
    tx = _make_optimizer(config, spe)
    state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                              batch_stats=variables.get("batch_stats", {}), tx=tx)

    def host_tree(s: TrainState, replicated: bool = False) -> dict[str, Any]:
        tree = {"step": s.step, "params": s.params, "batch_stats": s.batch_stats,
                "opt_state": s.opt_state}
        tree = _host_first(tree) if replicated else jax.device_get(tree)
        return {**tree, "rng": rng_data}

    # Checkpoints and the files of the workdir.
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    config_path = os.path.join(workdir, "config.json")
    cfg = _config_dict(config)
    mngr = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                             enable_async_checkpointing=False),
        item_names=("state", "meta"))
    latest = mngr.latest_step()
    meta: dict[str, Any] = {"epoch": 0, "batch_in_epoch": 0, "epoch_sums": [0.0, 0.0, 0.0, 0],
                            "consecutive_skips": 0, "total_skipped": 0, "elapsed_s": 0.0}
    if latest is not None:
        if os.path.exists(config_path):
            with open(config_path) as f:
                old = json.load(f)
            diff = sorted(k for k in set(old) | set(cfg) if k not in _RESUME_FREE_FIELDS
                          and old.get(k) != cfg.get(k))
            if diff:
                raise ValueError(
                    f"workdir {workdir!r} holds a run with another config (fields "
                    + ", ".join(f"config.{k}: {old.get(k)!r} there, {cfg.get(k)!r} now"
                                for k in diff)
                    + "); resume it with the same config or use a new --workdir.")
        restored = mngr.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(host_tree(state)), meta=ocp.args.JsonRestore()))
        tree, meta = restored.state, dict(restored.meta)
        state = state.replace(step=jnp.asarray(tree["step"]), params=tree["params"],
                              batch_stats=tree["batch_stats"], opt_state=tree["opt_state"])
        rng_data = np.asarray(tree["rng"])
        rng = jax.random.wrap_key_data(jnp.asarray(rng_data))
        if is_main:
            print(f"Resuming from {os.path.join(workdir, 'checkpoints', str(latest))} "
                  f"(step {latest}, epoch {meta['epoch'] + 1}, batch {meta['batch_in_epoch']})",
                  flush=True)
    records = [r for r in _read_metrics(metrics_path)
               if latest is not None and r.get("step", 0) <= latest]
    if is_main:
        _write_atomic(config_path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        _write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in records))

    train_step = make_train_step(data_parallel=data_parallel)
    eval_step = make_eval_step(data_parallel=data_parallel)
    if data_parallel:
        state = replicate(state)

    def feed(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if data_parallel:
            return batch
        return {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}

    def first(tree: Any) -> Any:
        return _host_first(tree) if data_parallel else jax.device_get(tree)

    def evaluate(split: data_lib.Split) -> dict[str, float]:
        sums = np.zeros(3)
        for batch in data_lib.eval_batches(ds, split, batch_size=config.eval_batch_size,
                                           num_local_devices=n_local,
                                           process_count=process_count):
            m = first(eval_step(state, feed(batch)))
            sums += [float(m["loss_sum"]), float(m["correct"]), float(m["count"])]
        count = max(sums[2], 1.0)
        return {"loss": sums[0] / count, "accuracy": sums[1] / count}

    def save(step: int) -> None:
        mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(host_tree(state, replicated=data_parallel)),
            meta=ocp.args.JsonSave(meta)))
        mngr.wait_until_finished()

    step = int(latest or 0)
    epoch, start = int(meta["epoch"]), int(meta["batch_in_epoch"])
    sums = list(meta["epoch_sums"])  # loss, accuracy, skipped, steps of the current epoch
    consecutive, total_skipped = int(meta["consecutive_skips"]), int(meta["total_skipped"])
    elapsed0 = float(meta["elapsed_s"]) - time.time()
    interrupted = False
    if is_main:
        how = ""
        if data_parallel:
            how = " (data parallel, synchronized BN)" if norm == "batch" else " (data parallel)"
        print(f"Training {config.model} (norm={norm}) on {config.dataset}: "
              f"{len(ds.train)} train / {len(ds.test)} test examples, "
              f"{config.num_epochs} epochs x {spe} steps, batch {config.batch_size} on "
              f"{jax.device_count()} device(s){how}; workdir {workdir}", flush=True)

    def consume(m: Any) -> None:
        nonlocal consecutive, total_skipped
        m = first(m)
        skipped = float(m["skipped"]) > 0
        sums[2] += float(skipped)
        sums[3] += 1
        if skipped:
            consecutive += 1
            total_skipped += 1
        else:
            consecutive = 0
            sums[0] += float(m["loss"])
            sums[1] += float(m["accuracy"])
        if consecutive >= config.max_consecutive_skips:
            raise NonFiniteTrainingError(
                f"{consecutive} consecutive training steps (up to step {step}) had a "
                "non-finite loss or gradient and were skipped (config.max_consecutive_skips="
                f"{config.max_consecutive_skips}); stopping. The parameters and moving "
                "statistics are unchanged by those steps; lower config.learning_rate or check "
                f"the data. The last complete checkpoint in {workdir} is intact.")

    while epoch < config.num_epochs and not interrupted:
        bar = tqdm(total=spe, initial=start, desc=f"epoch {epoch + 1}/{config.num_epochs}",
                   disable=not (config.progress_bar and is_main), leave=False, unit="step",
                   dynamic_ncols=True)
        pending = None
        batches = data_lib.train_batches(
            ds, batch_size=config.batch_size, seed=config.seed, epoch=epoch, start=start,
            num_local_devices=n_local, process_index=process_index,
            process_count=process_count, augment=config.augment)
        for k, batch in enumerate(batches, start=start):
            state, m = train_step(state, feed(batch))
            if pending is not None:
                consume(pending)
            pending = m
            step += 1
            bar.update(1)
            if (k + 1) % 10 == 0 and sums[3] > sums[2]:
                n_ok = sums[3] - sums[2]
                bar.set_postfix(loss=f"{sums[0] / n_ok:.4f}", acc=f"{sums[1] / n_ok:.4f}")
            end_of_epoch = k + 1 == spe
            stop = bool(config.stop_after_steps) and step >= config.stop_after_steps
            periodic = (bool(config.checkpoint_every_steps)
                        and step % config.checkpoint_every_steps == 0)
            if end_of_epoch or stop or periodic:
                consume(pending)
                pending = None
            if end_of_epoch:
                break
            if stop or periodic:
                meta.update(epoch=epoch, batch_in_epoch=k + 1, epoch_sums=sums,
                            consecutive_skips=consecutive, total_skipped=total_skipped,
                            elapsed_s=elapsed0 + time.time())
                save(step)
            if stop:
                interrupted = True
                break
        if pending is not None:
            consume(pending)
        bar.close()
        if interrupted:
            break
        n_ok = max(sums[3] - sums[2], 1)
        record: dict[str, Any] = {
            "epoch": epoch + 1, "step": step,
            "train_loss": sums[0] / n_ok, "train_accuracy": sums[1] / n_ok,
            "skipped_steps": int(sums[2]), "total_skipped_steps": total_skipped,
        }
        splits = [("test", ds.test)] + ([("val", ds.validation)] if ds.validation else [])
        for split_name, split in splits:
            for key, value in evaluate(split).items():
                record[f"{split_name}_{key}"] = value
        record["elapsed_s"] = round(elapsed0 + time.time(), 3)
        records.append(record)
        if is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
            msg = (f"epoch {epoch + 1}/{config.num_epochs} step {step}: train loss "
                   f"{record['train_loss']:.4f} acc {record['train_accuracy']:.4f}")
            for split_name, _ in splits[::-1]:
                msg += (f" | {split_name} loss {record[f'{split_name}_loss']:.4f} acc "
                        f"{record[f'{split_name}_accuracy']:.4f}")
            if total_skipped:
                msg += f" | skipped {record['skipped_steps']} (total {total_skipped})"
            print(f"{msg} | {record['elapsed_s']:.1f} s", flush=True)
        epoch, start, sums = epoch + 1, 0, [0.0, 0.0, 0.0, 0]
        meta.update(epoch=epoch, batch_in_epoch=0, epoch_sums=sums,
                    consecutive_skips=consecutive, total_skipped=total_skipped,
                    elapsed_s=elapsed0 + time.time())
        save(step)
        if config.stop_after_steps and step >= config.stop_after_steps:
            interrupted = epoch < config.num_epochs
            break

    mngr.close()
    result: dict[str, Any] = dict(records[-1]) if records else {"step": step}
    if interrupted:
        result["interrupted"] = True
        if is_main:
            print(f"Stopped after step {step} (config.stop_after_steps); run the same command "
                  "again to resume.", flush=True)
        return result
    if is_main and records:
        _plot_curves(records, os.path.join(workdir, "curves.png"),
                     f"{config.model} (norm={norm}) on {config.dataset}")
        print(f"Final test accuracy: {result['test_accuracy']:.4f} (test loss "
              f"{result['test_loss']:.4f}) after {result['step']} steps; "
              f"{time.time() - t_start:.1f} s in this process; outputs in {workdir}",
              flush=True)
    # Inference tools on the final model (bnjax.inference): PreciseBN, folded export.
    if not (config.get("precise_bn_batches", 0) or config.get("export_folded", False)):
        return result
    from bnjax import inference

    host = unreplicate(state) if data_parallel else state
    variables = {"params": host.params, "batch_stats": host.batch_stats}
    if config.get("precise_bn_batches", 0) and host.batch_stats and process_count == 1:
        batches = (b["x"].reshape((-1,) + b["x"].shape[2:]) for b in data_lib.train_batches(
            ds, batch_size=config.batch_size, seed=config.seed, epoch=config.num_epochs,
            num_local_devices=n_local))
        variables = inference.precise_batch_stats(model, variables, batches,
                                                  config.precise_bn_batches)
        bs = variables["batch_stats"]
        state = state.replace(batch_stats=replicate(bs) if data_parallel else bs)
        result.update({f"test_{k}_precise_bn": v for k, v in evaluate(ds.test).items()})
        print(f"PreciseBN ({config.precise_bn_batches} batches): test accuracy "
              f"{result['test_accuracy_precise_bn']:.4f} (moving averages: "
              f"{result['test_accuracy']:.4f})", flush=True)
    elif config.get("precise_bn_batches", 0) and host.batch_stats:
        print("config.precise_bn_batches: skipped (several processes)", flush=True)
    if config.get("export_folded", False) and is_main:
        report = inference.export_folded_model(model, variables, ds.normalize(ds.test.x[:8]),
                                               os.path.join(workdir, "folded"))
        result["folded_export"] = report["path"]
        print(f"Exported the folded model ({len(report['folded'])} batch norms folded, "
              f"{len(report['kept'])} kept) to {report['path']}", flush=True)
    return result
