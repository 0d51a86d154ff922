"""Training state and jit-compiled train / eval steps, single-device or data-parallel.

The data-parallel steps run under ``jax.pmap`` over the local devices with the axis name
``"batch"``: every device holds a replica of the state and a shard of the batch, gradients are
averaged with ``pmean`` and batch-norm layers built with ``axis_name="batch"`` see the statistics
of the global batch, so their moving statistics stay identical on every device. With several
processes (hosts), call :func:`initialize_distributed` first: the same ``pmap`` then spans the
devices of every process, and each process feeds its own shard of the data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

__all__ = [
    "TrainState",
    "initialize_distributed",
    "make_eval_step",
    "make_train_step",
    "replicate",
    "shard_batch",
    "unreplicate",
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
    return jax.tree.map(lambda a: a[0], tree)


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

    jax.eval_shape(run, state.params, state.batch_stats, x)
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
            validate_data_parallel(unreplicate(state), batch, axis_name=self._axis_name)
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
