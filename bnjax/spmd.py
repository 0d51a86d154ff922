"""Data-parallel steps on a device mesh: ``jax.jit`` over shardings, or ``jax.shard_map``.

A mesh step keeps the state replicated on every device of a ``jax.sharding.Mesh`` and splits
the batch over its data axis (any name; several axes may be named together). Batch norm can
be synchronized across the devices in two ways:

- **jax.jit** (``shard_map=False``, the default). The step is the single-device computation on
  the global batch; the model's ``BatchNorm`` layers are built with ``axis_name=None``. XLA's
  SPMD partitioner sees that the batch is sharded and inserts the cross-device reductions
  itself, so the statistics are those of the global batch. The model code is the single-device
  code, and it composes with shardings of other mesh axes (parameters sharded over a model
  axis, for instance).
- **jax.shard_map** (``shard_map=True``). The step body runs once per device on its shard of
  the batch, with the layers' ``axis_name`` set to the data axis: each layer gathers every
  device's shifted sums with bnjax's single collective and combines them exactly, gradients
  are averaged over the axis. This is the ``pmap`` program on a mesh: the collectives are the
  ones bnjax writes (one per layer forward, one per layer backward), and it is the way to get
  statistics of groups of devices smaller than the mesh (split the batch over two mesh axes,
  ``axis_name=("group", "bn")``, and build the layers with ``axis_name="bn"``;
  ``axis_index_groups`` is ``pmap``'s way, which ``jax.shard_map`` cannot reduce over) or
  per-device statistics (layers with ``axis_name=None``); the step averages such moving
  statistics over the devices, so that the state stays replicated.

Both give the statistics of the global batch, exactly, masked or not, and the same losses as
one device with the same global batch. They differ in the collectives (counted in the compiled
train step, ``tests/test_mesh.py``): under ``jax.shard_map`` each synchronized layer adds one
all-gather forward and one all-reduce backward, exactly the collectives of the ``pmap`` step;
under ``jax.jit`` XLA writes the all-reduces itself and no all-gather: on the CPU two per layer
on the usual path (the forward's plain sums; the backward sums, merged with the gradients'
all-reduce) and two more in the branch that recomputes shifted sums where ``|mean| / std`` is
large (the shift, one value of the batch, broadcast from the device holding it, and the sums).

Which to use when:

- ``jax.jit`` (default): a model written for one device, data parallelism combined with other
  shardings of the same mesh, or when XLA should own the communication.
- ``jax.shard_map``: the fewest collectives per layer (latency-bound small messages, many
  devices), statistics over groups of devices (an inner mesh axis) or per device, or a
  ``pmap`` program moved to a mesh unchanged. Figures on 8 CPU devices:
  ``docs/benchmarks.md`` (``python -m benchmarks parallel``).

The steps work on meshes of either axis type: inside a ``jax.jit`` step every axis is
automatic (``jax.sharding.auto_axes``), so a mesh from ``jax.make_mesh`` (explicit axes by
default) and arrays placed on it are accepted; the outputs are placed on the same devices with
automatic axes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bnjax.stats import axis_names, vma

__all__ = ["automatic_mesh", "axis_size", "data_axes", "mean_of_summed", "mesh_step",
           "replicate_varying"]

#: A step body ``(state, batch, axis_name) -> outputs``; ``axis_name`` is None under jax.jit.
Body = Callable[[Any, Mapping[str, Any], Any], Any]


def data_axes(mesh: Mesh, axis_name: str | tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The mesh axes a batch is split over: ``axis_name``, or the mesh's only axis.

    Args:
      mesh: a ``jax.sharding.Mesh``.
      axis_name: a mesh axis name or a tuple of them; None for the mesh's only axis.

    Raises:
      TypeError: ``mesh`` is not a ``jax.sharding.Mesh``.
      ValueError: ``axis_name`` names no axis of the mesh, or is None on a mesh of several
        axes.

    Example:
      >>> import jax
      >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
      >>> data_axes(mesh), data_axes(mesh, "data")
      (('data',), ('data',))
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"mesh={mesh!r} is not a jax.sharding.Mesh; build one with "
            "jax.make_mesh((jax.device_count(),), ('data',)).")
    if axis_name is None:
        if len(mesh.axis_names) != 1:
            raise ValueError(
                f"axis_name=None but the mesh has axes {tuple(mesh.axis_names)}; name the data "
                f"axis the batch is split over, e.g. axis_name={mesh.axis_names[0]!r}.")
        return (mesh.axis_names[0],)
    names = axis_names(axis_name)
    bad = [a for a in names if a not in mesh.axis_names]
    if bad or not names or len(set(names)) != len(names):
        raise ValueError(
            f"axis_name={axis_name!r} must name distinct axes of the mesh, whose axes are "
            f"{tuple(mesh.axis_names)}.")
    return tuple(names)


def automatic_mesh(mesh: Mesh) -> Mesh:
    """The same devices and axis names with every axis of type ``Auto``.

    Example:
      >>> import jax
      >>> automatic_mesh(jax.make_mesh((1,), ("data",))).axis_types
      (Auto,)
    """
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def replicate_varying(tree: Any, axis_name: str | tuple[str, ...]) -> Any:
    """Under ``jax.shard_map``: the mean over the axes of every leaf that varies over them.

    Leaves that are already the same on every device (typed invariant) are returned as they
    are, so only per-device values (the moving statistics of layers without ``axis_name``)
    cost a collective.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = automatic_mesh(jax.make_mesh((jax.device_count(),), ("data",)))
      >>> f = jax.shard_map(lambda x: replicate_varying(x, "data"), mesh=mesh,
      ...                   in_specs=P("data"), out_specs=P())
      >>> float(f(jnp.arange(jax.device_count(), dtype=jnp.float32))[0]) == (
      ...     (jax.device_count() - 1) / 2)
      True
    """
    names = axis_names(axis_name)

    def one(a: Any) -> Any:
        varying = tuple(ax for ax in names if ax in vma(a))
        return jax.lax.pmean(a, varying) if varying else a

    return jax.tree.map(one, tree)


def mean_of_summed(grads: Any, axis_name: str | tuple[str, ...], num_devices: Any) -> Any:
    """Under ``jax.shard_map``: the device mean of per-device gradients, as ``pmean`` gives.

    The parameters enter the step replicated (typed invariant), so differentiating a per-device
    loss already sums the gradients over the devices (the transpose of the implicit
    ``pvary`` is a ``psum``): dividing by the device count gives the mean. Gradients still
    typed per-device are averaged with ``pmean``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = automatic_mesh(jax.make_mesh((jax.device_count(),), ("data",)))
      >>> def grad_mean(w, x):  # the gradient of the mean of w * x over the devices
      ...     g = jax.grad(lambda w: jnp.sum(w * x))(w)  # summed over the devices
      ...     return mean_of_summed(g, "data", jax.device_count())
      >>> f = jax.shard_map(grad_mean, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
      >>> float(f(jnp.float32(1.0), jnp.full(jax.device_count(), 3.0)))
      3.0
    """
    names = axis_names(axis_name)

    def one(g: Any) -> Any:
        varying = tuple(ax for ax in names if ax in vma(g))
        return jax.lax.pmean(g, varying) if varying else g / num_devices

    return jax.tree.map(one, grads)


def _automatic(fn: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
    """``fn`` traced with every mesh axis automatic, whatever the inputs' sharding types.

    bnjax's layers index the batch (the shift of the shifted sums), which explicit sharding
    types do not allow on a sharded dimension; in automatic mode XLA partitions it.
    """
    explicit = mesh.abstract_mesh.update_axis_types(
        {a: AxisType.Explicit for a in mesh.axis_names})

    def run(*args: Any) -> Any:
        with jax.sharding.use_abstract_mesh(explicit):
            return jax.sharding.auto_axes(fn, axes=tuple(mesh.axis_names),
                                          out_sharding=P())(*args)

    return run


def mesh_step(body: Body, mesh: Mesh, axis_name: str | tuple[str, ...] | None = None, *,
              shard_map: bool = False) -> Callable[[Any, Mapping[str, Any]], Any]:
    """A jit-compiled ``(state, batch) -> body(...)`` on ``mesh``, every output replicated.

    The state is replicated on every device, the batch split over the data axis (the leading
    dimension of every batch array).

    Args:
      body: ``(state, batch, axis_name) -> outputs``, the step for one batch. Under
        ``jax.jit`` it sees the global batch and ``axis_name=None``; under ``jax.shard_map``
        one device's shard and the data axis name (a tuple when several axes are named).
      mesh: the device mesh.
      axis_name: the data axis (or axes); None for the mesh's only axis.
      shard_map: run ``body`` under ``jax.shard_map`` (one device's view, named axis) instead
        of plain ``jax.jit`` (global view; XLA inserts the collectives).

    Returns:
      The compiled step; ``.lower(state, batch)`` gives the lowered computation.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
      >>> step = mesh_step(lambda s, b, name: s + jnp.mean(b["x"]), mesh)
      >>> float(step(jnp.float32(1.0), {"x": jnp.ones(jax.device_count() * 2)}))
      2.0
    """
    axes = data_axes(mesh, axis_name)
    auto = automatic_mesh(mesh)
    spec = P(axes if len(axes) > 1 else axes[0])
    replicated, split = NamedSharding(auto, P()), NamedSharding(auto, spec)
    if shard_map:
        name = axes if len(axes) > 1 else axes[0]
        fn = jax.shard_map(lambda s, b: body(s, b, name), mesh=auto, in_specs=(P(), spec),
                           out_specs=P())
    else:
        fn = _automatic(lambda s, b: body(s, b, None), auto)
    return jax.jit(fn, in_shardings=(replicated, split), out_shardings=replicated)


def axis_size(mesh: Mesh, axes: tuple[str, ...]) -> int:
    """Number of devices along ``axes`` of ``mesh`` (the number of batch shards).

    Example:
      >>> import jax
      >>> axis_size(jax.make_mesh((jax.device_count(),), ("data",)), ("data",)) > 0
      True
    """
    return math.prod(mesh.shape[a] for a in axes)
