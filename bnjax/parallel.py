"""Placement for data parallelism: replicate a state, split a batch, join a multi-host job.

Two layouts, one per kind of data-parallel step of :mod:`bnjax.steps`:

- ``jax.pmap`` steps (``data_parallel=True``): every leaf of the state gets a leading device
  axis, one copy per local device (:func:`replicate`, undone by :func:`unreplicate`), and a
  batch is split as ``(num_local_devices, per_device, ...)`` (:func:`shard_batch`).
- mesh steps (``mesh=...``): the state is one global array per leaf, replicated on every
  device of the mesh (:func:`put_replicated`), and a batch is one global array per key,
  split over the mesh's data axis (:func:`put_batch`: each process passes its own rows);
  :func:`fetch_replicated` copies replicated outputs (state, metrics) to the host.

With several processes (hosts), call :func:`initialize_distributed` first: ``pmap`` and the
mesh then span the devices of every process, and each process feeds its own shard of the data.
Everything here places data with ``jax.device_put`` and shardings
(``jax.device_put_replicated`` and ``jax.device_put_sharded`` are deprecated).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bnjax.spmd import automatic_mesh, axis_size, data_axes
from bnjax.validation import validate_data_parallel

__all__ = [
    "fetch_replicated",
    "host_first_replica",
    "initialize_distributed",
    "put_batch",
    "put_replicated",
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
# Mesh layout: global arrays.


def put_replicated(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Every leaf as a global array replicated on every device of ``mesh`` (all processes).

    With several processes, every process passes the same values (e.g. the same initial state
    from the same seed). Leaves already placed that way are returned as they are. The arrays are
    placed on ``mesh`` with automatic axes, as the mesh steps return them.

    Args:
      tree: a pytree of arrays (e.g. a ``TrainState`` on the host).
      mesh: the device mesh of the step.

    Returns:
      The tree of replicated global arrays (same shapes as the leaves).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
      >>> w = put_replicated({"w": jnp.ones(3)}, mesh)["w"]
      >>> w.shape, w.is_fully_replicated, len(w.sharding.device_set) == jax.device_count()
      ((3,), True, True)
    """
    sharding = NamedSharding(automatic_mesh(mesh), P())

    def put(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array):
            if leaf.sharding == sharding:
                return leaf
            if not leaf.is_fully_addressable:
                if not leaf.is_fully_replicated:
                    return jax.device_put(leaf, sharding)
                leaf = leaf.addressable_data(0)
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def put_batch(batch: Mapping[str, Any], mesh: jax.sharding.Mesh,
              axis_name: str | tuple[str, ...] | None = None) -> dict[str, Any]:
    """This process's rows of a batch as global arrays split over the mesh's data axis.

    Single process: ``batch`` is the whole batch. Several processes: each passes its own rows
    (the same number on every process) and the global batch is their concatenation in process
    order (``jax.make_array_from_process_local_data``).

    Args:
      batch: a mapping of arrays sharing the leading batch dimension (this process's rows).
      mesh: the device mesh of the step.
      axis_name: the data axis (or axes); None for the mesh's only axis.

    Returns:
      The mapping with global arrays of the global batch size.

    Raises:
      ValueError: the arrays disagree on the batch size, or it does not split evenly over this
        process's devices along the data axis.

    Example:
      >>> import jax, numpy as np
      >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
      >>> x = put_batch({"x": np.zeros((2 * jax.device_count(), 3))}, mesh)["x"]
      >>> x.addressable_shards[0].data.shape
      (2, 3)
    """
    axes = data_axes(mesh, axis_name)
    sharding = NamedSharding(automatic_mesh(mesh), P(axes if len(axes) > 1 else axes[0]))
    shards = max(1, axis_size(mesh, axes) * len(mesh.local_devices) // mesh.devices.size)
    sizes = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in batch.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values() or \
            next(iter(sizes.values())) % shards:
        raise ValueError(
            f"batch arrays have leading sizes {sizes}; every array must share one batch size, "
            f"a multiple of the {shards} shards this process holds along axis {axes} (pad the "
            "batch and mask the padding with batch['mask'])."
        )

    def put(v: Any) -> Any:
        if isinstance(v, jax.Array) and not v.is_fully_addressable:
            return v if v.sharding == sharding else jax.device_put(v, sharding)
        return jax.make_array_from_process_local_data(sharding, np.asarray(v))

    return {k: put(v) for k, v in batch.items()}


def fetch_replicated(tree: Any) -> Any:
    """A host (NumPy) copy of every leaf of a replicated output (a mesh step's state, metrics).

    Reads this process's first shard, which holds the whole value, without running a
    computation or talking to the other processes.

    Raises:
      ValueError: a leaf is a global array that is not replicated.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
      >>> fetch_replicated(put_replicated({"w": jnp.arange(2.0)}, mesh))["w"].tolist()
      [0.0, 1.0]
    """
    def one(a: Any) -> Any:
        if isinstance(a, jax.Array):
            if not a.is_fully_replicated:
                raise ValueError(
                    f"a leaf of shape {a.shape} has sharding {a.sharding}, not replicated; "
                    "fetch_replicated reads replicated outputs (use jax.device_get for others).")
            return np.asarray(a.addressable_data(0))
        return np.asarray(a)

    return jax.tree.map(one, tree)


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
    (pmap: arrays shaped ``(jax.local_device_count(), per_device_batch, ...)``; mesh: its rows,
    through :func:`put_batch`, on a mesh of ``jax.devices()``) and batch-norm statistics,
    gradients and metrics are global.

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
