"""Checks of a data-parallel step's input, before any step runs: clear errors, not traces.

The pmap steps take ``(num_local_devices, per_device, ...)`` batches and a replicated state; the
mesh steps take global batches split over a mesh's data axis. In both, every synchronized
layer of the model must name the step's device axis (or none), and its ``axis_index_groups``
must partition that axis evenly. The model's layers are found by tracing it abstractly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bnjax.spmd import axis_size, data_axes
from bnjax.stats import axis_names

__all__ = ["validate_data_parallel", "validate_mesh_data_parallel"]


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
    _check_keys(batch)
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


def _check_keys(batch: Any) -> None:
    if not isinstance(batch, Mapping) or "x" not in batch or "y" not in batch:
        raise ValueError(
            f"batch has keys {sorted(batch) if isinstance(batch, Mapping) else type(batch)}; "
            "it must be a mapping with 'x' (inputs), 'y' (integer labels) and optionally "
            "'mask' (bool per example)."
        )


def _check_groups(groups: Any, size: int, *, where: str) -> None:
    try:
        flat = [[int(i) for i in g] for g in groups]
    except TypeError:
        flat = None
    ok = (
        flat is not None
        and flat
        and sorted(i for g in flat for i in g) == list(range(size))
        and len({len(g) for g in flat}) == 1
    )
    if not ok:
        raise ValueError(
            f"{where}: axis_index_groups={groups!r} does not partition the {size} devices "
            f"into groups of equal size; every index 0..{size - 1} must appear in exactly "
            "one group, e.g. [[0, 1], [2, 3], ...]."
        )



def validate_mesh_data_parallel(
    state: Any,
    batch: Mapping[str, Any],
    mesh: jax.sharding.Mesh,
    *,
    axis_name: str | tuple[str, ...] | None = None,
    shard_map: bool = False,
) -> None:
    """Checks a mesh step's input before it runs; raises a clear ``ValueError``.

    Checks that ``batch`` holds ``x`` and ``y`` whose (global) leading sizes agree and split
    evenly over the data axis; that under ``jax.jit`` (``shard_map=False``) no layer of the
    model names an axis (XLA makes the statistics global by itself, and plain ``jax.jit``
    binds no axis names); and that under ``jax.shard_map`` every synchronized layer names the
    data axis, one of its axes (the groups of a smaller batch norm) or none, without
    ``axis_index_groups`` (``jax.shard_map`` has no grouped reductions: a mesh axis per group
    size does that).

    Args:
      state: the ``TrainState`` (replicated, or on the host: only shapes are read).
      batch: the global batch as passed to the mesh step.
      mesh: the step's mesh.
      axis_name: the data axis (or axes); None for the mesh's only axis.
      shard_map: whether the step runs under ``jax.shard_map``.

    Raises:
      ValueError: with the offending argument, its value and what is accepted.

    Example:
      >>> import jax, jax.numpy as jnp, optax, bnjax
      >>> from bnjax.steps import TrainState
      >>> model = bnjax.BatchNorm(axis_name="data")
      >>> v = model.init(jax.random.key(0), jnp.ones((2, 3)), training=False)
      >>> s = TrainState.create(apply_fn=model.apply, params=v["params"],
      ...                       batch_stats=v["batch_stats"], tx=optax.sgd(0.1))
      >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
      >>> n = jax.device_count()
      >>> validate_mesh_data_parallel(s, {"x": jnp.ones((2 * n, 3)), "y": jnp.zeros(2 * n, int)},
      ...                             mesh, shard_map=True)
    """
    axes = data_axes(mesh, axis_name)
    n = axis_size(mesh, axes)
    _check_keys(batch)
    sizes = {k: tuple(np.shape(v)) for k, v in batch.items()}
    size = sizes["x"][0] if sizes["x"] else None
    for key, shape in sizes.items():
        if not shape or shape[0] != size or size % n:
            raise ValueError(
                f"batch[{key!r}] has shape {shape} (batch['x']: {sizes['x']}); a mesh step "
                f"splits every batch array over the {n} devices of axis {axes}: the arrays must "
                f"share a leading batch size that is a multiple of {n} (pad the batch and mask "
                "the padding with batch['mask'])."
            )
    x0 = jax.ShapeDtypeStruct((size // n,) + sizes["x"][1:], jnp.result_type(batch["x"]))
    for path, name, groups in _model_sync_layers(state, x0):
        if name is None:
            continue
        if not shard_map:
            raise ValueError(
                f"layer {path!r} has axis_name={name!r} but a jax.jit mesh step binds no axis "
                "names (XLA makes the statistics of the sharded batch global by itself): build "
                f"the layer with axis_name=None, or pass shard_map=True to run the step under "
                f"jax.shard_map over {axes}."
            )
        if [a for a in axis_names(name) if a not in axes]:
            raise ValueError(
                f"layer {path!r} has axis_name={name!r} but the mesh step splits the batch "
                f"over axis_name={axes if len(axes) > 1 else axes[0]!r}; build the layer with "
                "that name (or None for per-device statistics)."
            )
        if groups is not None:
            raise ValueError(
                f"layer {path!r} has axis_index_groups={groups!r}, which jax.shard_map cannot "
                "reduce over (its psum has no axis_index_groups); give the groups a mesh axis "
                "of their own instead, e.g. jax.make_mesh((4, 2), ('group', 'bn')) with the "
                "batch split over axis_name=('group', 'bn') and the layers built with "
                "axis_name='bn'."
            )
