"""Placement for data parallelism: replicate a state, split a batch, join a multi-host job.

The data-parallel steps of :mod:`bnjax.steps` run under ``jax.pmap`` with the axis name
``"batch"``: every device holds a replica of the state (:func:`replicate`) and a shard of the
batch (:func:`shard_batch`). With several processes (hosts), call :func:`initialize_distributed`
first: the same ``pmap`` then spans the devices of every process, and each process feeds its own
shard of the data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bnjax.stats import axis_names

__all__ = [
    "host_first_replica",
    "initialize_distributed",
    "replicate",
    "shard_batch",
    "unreplicate",
    "validate_data_parallel",
]


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


def host_first_replica(tree: Any) -> Any:
    """The first local replica of every leaf of a pmap output, as NumPy.

    Copies this process's first shard to the host without running a computation: with several
    processes, an eager op here could wait behind the other processes' collectives.

    Example:
      >>> import jax.numpy as jnp
      >>> host_first_replica(replicate({"w": jnp.arange(2.0)}))["w"].tolist()
      [0.0, 1.0]
    """
    def one(a: Any) -> Any:
        if isinstance(a, jax.Array):
            return np.asarray(a.addressable_data(0))[0]
        return np.asarray(a)[0]

    return jax.tree.map(one, tree)


def shard_batch(batch: Mapping[str, Any], num_devices: int | None = None) -> dict[str, Any]:
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


def _model_sync_layers(state: Any, x: Any) -> list[tuple[str, Any, Any]]:
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


def validate_data_parallel(
    state: Any,
    batch: Mapping[str, Any],
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
      >>> from bnjax.steps import TrainState
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
                hint = " (a global batch? split it with bnjax.parallel.shard_batch)"
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
    allowed = set(axis_names(axis_name))
    for path, name, groups in _model_sync_layers(state, x0):
        if name is None:
            continue
        bad = [a for a in axis_names(name) if a not in allowed]
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
    steps of :mod:`bnjax.steps` span all of them: each process passes its own shard of the data
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
