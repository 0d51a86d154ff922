"""Training state and jit-compiled train / eval steps: one device, a device mesh, or pmap.

The loss and the metrics are arguments (per-example functions of the model's outputs and the
batch); the steps own what batch norm needs: the mean over the valid examples across devices,
the mask handed to the batch norms, the padding zeroed, the non-finite skip. Three ways to run
a step, with the same loss, metrics, skip logic and penalties:

- one device (the default): ``jax.jit`` of the step on the batch as given.
- a device mesh (``mesh=``): the state replicated on every device of a ``jax.sharding.Mesh``,
  the batch split over its data axis, batch norm synchronized by plain ``jax.jit`` or under
  ``jax.shard_map`` (``shard_map=True``); :mod:`bnjax.spmd` says which to use when.
- ``jax.pmap`` (``data_parallel=True``) over the local devices with the axis name ``"batch"``:
  every device holds a replica of the state and a shard of the batch (placed with
  :mod:`bnjax.parallel`), gradients are averaged with ``pmean`` and batch-norm layers built
  with ``axis_name="batch"`` see the statistics of the global batch, so their moving
  statistics stay identical on every device.

With several processes (hosts), call :func:`bnjax.parallel.initialize_distributed` first: the
same mesh (of ``jax.devices()``) or ``pmap`` then spans the devices of every process, and each
process feeds its own shard of the data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh

from bnjax import _losses, spmd
from bnjax._batch_mask import check_masked, masked_batch_norms
from bnjax._frozen import frozen_layers, hold_frozen, trainable_tree
from bnjax._losses import LossFn, MetricsFn, all_finite, global_sum, step_inputs, valid_sums
from bnjax.validation import validate_data_parallel, validate_mesh_data_parallel

__all__ = [
    "TrainState",
    "keep_frozen",
    "make_eval_step",
    "make_train_step",
    "trainable_mask",
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


def trainable_mask(model: Any, *example_args: Any, **example_kwargs: Any) -> Any:
    """The params tree of a linen model as bools: False for a frozen ``bnjax.BatchNorm``.

    The model is traced once abstractly (``jax.eval_shape`` of ``model.init`` with the example
    arguments; nothing is computed) and every ``bnjax.BatchNorm(frozen=True)`` it calls marks
    its ``scale`` and ``bias`` False; every other leaf is True. Zero gradients alone do not
    keep a frozen layer still under momentum, Adam or decoupled weight decay; give the mask to
    :func:`keep_frozen` (it keeps the optimizer state's structure, so it can wrap the
    optimizer of a run that carries on), or to ``optax.masked``, ``optax.multi_transform``
    or ``optax.adamw(mask=...)`` when building a new optimizer. :func:`make_train_step` holds
    frozen layers by itself.

    Args:
      model: a ``flax.linen`` module.
      *example_args: positional arguments for ``model.init`` after the key (e.g. an input).
      **example_kwargs: keyword arguments for ``model.init`` (e.g. ``training=False``).

    Returns:
      A tree of Python bools with the structure of ``model.init(...)["params"]``.

    Example:
      >>> import jax.numpy as jnp, flax.linen as nn
      >>> from bnjax.linen import BatchNorm
      >>> model = nn.Sequential([nn.Dense(3), BatchNorm(frozen=True, use_running_average=True)])
      >>> trainable_mask(model, jnp.ones((2, 4)))
      {'layers_0': {'bias': True, 'kernel': True}, 'layers_1': {'bias': False, 'scale': False}}
    """
    with frozen_layers() as found:
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *example_args,
                                                   **example_kwargs))
    return trainable_tree(shapes.get("params", {}), found)


def keep_frozen(tx: optax.GradientTransformation,
                trainable: Any) -> optax.GradientTransformation:
    """``tx`` with the parameters that ``trainable`` marks False held, bit for bit.

    Each update of ``tx`` runs as before; then the updates of the frozen leaves become
    ``-0.0`` (``optax.apply_updates`` leaves a parameter unchanged to the bit) and, where the
    optimizer state holds copies of the params tree (momentum, Adam's moments; found by
    ``optax.tree_map_params``), their entries keep their values, as Keras leaves a
    ``trainable=False`` weight and its optimizer slots alone. The state is ``tx``'s own, so
    an ``opt_state`` built by ``tx`` carries on under ``keep_frozen(tx, ...)``. Inside
    ``optax.masked`` or ``optax.multi_transform`` the state is not matched: the parameters
    are still held, their state entries advance as ``tx`` computes them.

    Args:
      tx: an optax optimizer.
      trainable: a tree of bools shaped like the params (:func:`trainable_mask`), or a
        callable ``params -> tree`` (called on the updates, when the update is traced).

    Returns:
      The optax optimizer.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = keep_frozen(optax.adamw(0.1), {"w": True, "b": False})
      >>> p = {"w": jnp.ones(2), "b": jnp.ones(2)}
      >>> u, _ = tx.update({"w": jnp.ones(2), "b": jnp.ones(2)}, tx.init(p), p)
      >>> optax.apply_updates(p, u)["b"].tolist()
      [1.0, 1.0]
    """
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(f"tx={tx!r} is not an optax.GradientTransformation; pass an optax "
                        "optimizer such as optax.adam(1e-3).")

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        mask = trainable(updates) if callable(trainable) else trainable
        new_updates, new_state = tx.update(updates, state, params)
        return hold_frozen(tx, mask, new_updates, new_state, state)

    return optax.GradientTransformation(tx.init, update)


# --------------------------------------------------------------------------------------------
# Steps.


def _apply(state: TrainState, params: Any, x: Any, mask: jax.Array | None,
           **kwargs: Any) -> Any:
    """The model on ``x``, ``mask`` passed to its batch norms (refused where it cannot be)."""
    with masked_batch_norms(mask) as handled:
        out = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x,
                             **kwargs)
    if "mutable" in kwargs:
        check_masked(out[1].get("batch_stats", {}), None if mask is None else handled)
    return out


def _train_step_body(
    state: TrainState,
    batch: Batch,
    axis_name: str | tuple[str, ...] | None,
    fns: tuple[LossFn, MetricsFn, Callable[[Any], Any] | None],
    manual: bool = False,
) -> tuple[TrainState, Metrics]:
    loss_fn, metrics_fn, constrain_fn = fns
    x, batch, mask, valid = step_inputs(batch)
    count = global_sum(jnp.sum(valid, dtype=jnp.float32), axis_name)
    safe_count = jnp.maximum(count, 1.0)
    num_replicas = 1 if axis_name is None else jax.lax.psum(1, axis_name)
    frozen: list[tuple[str, ...]] = []  # frozen bnjax.BatchNorm layers, found as they trace

    def objective_fn(params: Any) -> tuple[jax.Array, tuple[Any, jax.Array, jax.Array, Any]]:
        with frozen_layers() as found:
            outputs, updates = _apply(state, params, x, mask, training=True,
                                      mutable=["batch_stats", "losses"])
        frozen.extend(found)
        loss_local, sums = valid_sums(loss_fn, metrics_fn, outputs, batch, valid,
                                      ("loss", "skipped"))
        penalties = jax.tree.leaves(updates.get("losses", {}))
        penalty = sum((jnp.sum(p) for p in penalties), jnp.zeros((), jnp.float32))
        # The objective whose device average is the global loss: pmean of the gradients
        # then gives the gradient of (mean loss over the global batch) + penalty.
        objective = loss_local * num_replicas / safe_count + penalty
        return objective, (updates.get("batch_stats", {}), loss_local, penalty, sums)

    grad_fn = jax.value_and_grad(objective_fn, has_aux=True)
    (_, (new_stats, loss_local, penalty, sums)), grads = grad_fn(state.params)
    if manual:  # jax.shard_map: the state must come out the same on every device
        grads = spmd.mean_of_summed(grads, axis_name, num_replicas)
        new_stats, penalty = spmd.replicate_varying((new_stats, penalty), axis_name)
    elif axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
    loss = global_sum(loss_local, axis_name) / safe_count + penalty
    means = {k: global_sum(v, axis_name) / safe_count for k, v in sums.items()}

    updates, new_opt_state = state.tx.update(grads, state.opt_state, state.params)
    if frozen:
        trainable = trainable_tree(state.params, frozen)
        updates, new_opt_state = hold_frozen(state.tx, trainable, updates, new_opt_state,
                                             state.opt_state)
    new_params = optax.apply_updates(state.params, updates)
    if constrain_fn is not None:
        new_params = constrain_fn(new_params)
    if frozen:  # a frozen layer's parameters are the old arrays, whatever constrain_fn does
        new_params = jax.tree.map(lambda t, n, o: n if t else o, trainable, new_params,
                                  state.params)

    ok = jnp.isfinite(loss) & all_finite(grads)

    def pick(new: Any, old: Any) -> Any:
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

    new_state = state.replace(
        step=state.step + 1,
        params=pick(new_params, state.params),
        opt_state=pick(new_opt_state, state.opt_state),
        batch_stats=pick(new_stats, state.batch_stats),
    )
    metrics = {"loss": loss, **means, "skipped": jnp.where(ok, 0.0, 1.0).astype(jnp.float32)}
    return new_state, metrics


def _eval_step_body(state: TrainState, batch: Batch, axis_name: str | tuple[str, ...] | None,
                    loss_fn: LossFn, metrics_fn: MetricsFn) -> Metrics:
    x, batch, mask, valid = step_inputs(batch)
    outputs = _apply(state, state.params, x, mask, training=False)
    loss_sum, sums = valid_sums(loss_fn, metrics_fn, outputs, batch, valid,
                                ("loss_sum", "count"))
    sums = {"loss_sum": loss_sum, **sums, "count": jnp.sum(valid, dtype=jnp.float32)}
    return {k: global_sum(v, axis_name) for k, v in sums.items()}


def _check_axis_name(axis_name: Any) -> None:
    if not isinstance(axis_name, str) or not axis_name:
        raise ValueError(
            f"axis_name={axis_name!r} must be a non-empty string naming the device axis "
            "(the same name the model's BatchNorm layers use, 'batch' by default)."
        )


class _Validated:
    """A compiled step that checks each new input signature before running it."""

    def __init__(self, fn: Callable[..., Any], check: Callable[[Any, Batch], None]) -> None:
        self._fn = fn
        self._check = check
        self._seen: set[Any] = set()

    def __call__(self, state: TrainState, batch: Batch) -> Any:
        key = tuple(sorted((k, tuple(np.shape(v))) for k, v in batch.items()))
        if key not in self._seen:
            self._check(state, batch)
            self._seen.add(key)
        return self._fn(state, batch)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        """Lowers the underlying compiled step (to inspect the compiled HLO)."""
        return self._fn.lower(*args, **kwargs)


def _shapes(state: Any, *, per_device: bool = False) -> Any:
    """The state's leaves as shapes (without the leading device axis of a pmap replica)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a)[1 if per_device else 0:],
                                                       jnp.result_type(a)), state)


def _build(body: spmd.Body, *, data_parallel: bool, mesh: Mesh | None,
           axis_name: str | tuple[str, ...] | None, shard_map: bool) -> Callable[..., Any]:
    """The step ``body`` compiled for one device, a mesh or pmap, its input checked."""
    if data_parallel and mesh is not None:
        raise ValueError(
            f"data_parallel=True (jax.pmap) and mesh={mesh!r} are two ways to use several "
            "devices; pass one of them.")
    if shard_map and mesh is None:
        raise ValueError("shard_map=True runs the step under jax.shard_map over a mesh's data "
                         "axis; pass mesh=jax.make_mesh(...) as well.")
    if mesh is not None:
        fn = spmd.mesh_step(body, mesh, axis_name, shard_map=shard_map)
        return _Validated(fn, lambda s, b: validate_mesh_data_parallel(
            _shapes(s), b, mesh, axis_name=axis_name, shard_map=shard_map))
    if not data_parallel:
        return jax.jit(lambda s, b: body(s, b, None))
    name = "batch" if axis_name is None else axis_name
    _check_axis_name(name)
    fn = jax.pmap(lambda s, b: body(s, b, name), axis_name=name)
    return _Validated(fn, lambda s, b: validate_data_parallel(
        _shapes(s, per_device=True), b, axis_name=name))


def make_train_step(
    *,
    loss_fn: LossFn | None = None,
    metrics_fn: MetricsFn | None = None,
    data_parallel: bool = False,
    mesh: Mesh | None = None,
    shard_map: bool = False,
    axis_name: str | tuple[str, ...] | None = None,
    constrain_fn: Callable[[Any], Any] | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Builds a compiled train step ``(state, batch) -> (state, metrics)``.

    The model is called as ``outputs, _ = apply_fn({"params", "batch_stats"}, batch["x"],
    training=True, mutable=["batch_stats", "losses"])``. The loss is the mean of
    ``loss_fn(outputs, batch)`` over the valid examples of the global batch (``batch["mask"]``,
    optional: one flag per example, boolean or integer, nonzero = valid; a float mask is
    refused, the step does not weight examples) plus the sum of every leaf of the ``"losses"``
    collection (penalties a module sows). When the loss or any gradient is not finite, params,
    optimizer state and batch_stats are left unchanged and ``metrics["skipped"]`` is 1
    (``step`` still counts it).

    A ``bnjax.BatchNorm(frozen=True)`` layer's ``scale`` and ``bias`` stay bit-identical
    under any optax optimizer (momentum, Adam, weight decay), and so do their entries of the
    optimizer state (see :func:`keep_frozen`): freezing a layer of a running model
    (``state.replace(apply_fn=frozen_model.apply)``) stops it as Keras's ``trainable=False``.

    A padded batch trains exactly as its valid examples alone: with ``batch["mask"]``, every
    ``bnjax.BatchNorm`` and ``flax.linen.BatchNorm`` of the model gets ``mask=`` (one flag per
    example, ``(B, 1, ..., 1)`` for its input; no change to the model), and the padding is
    replaced by zeros before the model sees it, so NaN or huge padding reaches nothing. A
    model whose batch statistics the mask cannot reach (another module keeping
    ``batch_stats``, a ``flax.linen.BatchNorm`` with ``axis_name``, a batch norm whose input
    does not have the examples on axis 0) is refused with a ``ValueError`` naming the module.

    Args:
      loss_fn: ``(outputs, batch) -> (B,)``, one float loss per example of the batch it gets
        (a device's shard under pmap and ``shard_map``); the step averages over the valid
        examples across devices itself, so a scalar (a mean) is refused (``ValueError``). The
        batch has its padding zeroed (``"x"``, every entry with a row per example) and the
        padding's losses are dropped with ``jnp.where``: NaN padding reaches no gradient.
        Default: softmax cross-entropy of the logits (float32) on integer ``batch["y"]``.
      metrics_fn: ``(outputs, batch) -> {name: (B,)}``, per-example metrics (bool, int or
        float), each reported as its mean over the valid examples of the global batch (not
        named ``"loss"`` or ``"skipped"``). Default: ``{"accuracy": argmax(outputs, -1) ==
        batch["y"]}`` with the default loss, none with a ``loss_fn`` of yours.
      data_parallel: run under ``jax.pmap`` over the devices with ``axis_name``; the state
        is replicated (:func:`bnjax.parallel.replicate`) and batch arrays are
        ``(num_local_devices, per_device_batch, ...)`` (:func:`bnjax.parallel.shard_batch`).
        Gradients are averaged with ``pmean``; the input is checked with
        :func:`bnjax.parallel.validate_data_parallel` before the first step of each new batch
        shape.
      mesh: run on this ``jax.sharding.Mesh``: the state replicated on every device
        (:func:`bnjax.parallel.put_replicated`), the batch a global array split over the
        data axis (:func:`bnjax.parallel.put_batch`); the input is checked with
        :func:`bnjax.validation.validate_mesh_data_parallel` before the first step of each
        new batch shape. Batch-norm layers are built with ``axis_name=None`` (XLA makes
        their statistics global), or with the data axis name when ``shard_map``.
      shard_map: with ``mesh``, run the step body under ``jax.shard_map`` over the data axis
        (each device its shard, bnjax's own collective per batch-norm layer) instead of
        plain ``jax.jit``; :mod:`bnjax.spmd` says which to use when.
      axis_name: pmap: name of the device axis (the one BatchNorm layers synchronize over;
        default ``"batch"``). Mesh: the data axis (or a tuple of axes) the batch is split
        over; default the mesh's only axis.
      constrain_fn: optional function applied to the params after each optimizer update
        (Keras-style constraints).

    Returns:
      The step function; metrics are ``{"loss", <metrics_fn's names>, "skipped"}`` over the
      global batch, by default ``{"loss", "accuracy", "skipped"}`` (replicated on a mesh, one
      copy per device under pmap).

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

      On a mesh of every device (each device gets 2 of the examples):

      >>> from bnjax.parallel import put_batch, put_replicated
      >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
      >>> n = 2 * jax.device_count()
      >>> batch = put_batch({"x": jnp.ones((n, 4)), "y": jnp.arange(n) % 3}, mesh)
      >>> state, m = make_train_step(mesh=mesh)(put_replicated(state, mesh), batch)
      >>> int(state.step), m["loss"].is_fully_replicated
      (2, True)

      A per-example regression loss and a metric of yours:

      >>> step = make_train_step(loss_fn=lambda out, b: jnp.mean((out - b["y"]) ** 2, -1),
      ...                        metrics_fn=lambda out, b: {"mae": jnp.abs(out - b["y"])[:, 0]})
      >>> sorted(step(state, {"x": jnp.ones((2, 4)), "y": jnp.zeros((2, 3))})[1])
      ['loss', 'mae', 'skipped']
    """
    if constrain_fn is not None and not callable(constrain_fn):
        raise TypeError(f"constrain_fn={constrain_fn!r} must be callable (params -> params).")
    fns = (*_losses.resolve(loss_fn, metrics_fn, _losses.accuracy), constrain_fn)
    manual = shard_map and mesh is not None
    return _build(lambda s, b, name: _train_step_body(s, b, name, fns, manual),
                  data_parallel=data_parallel, mesh=mesh, axis_name=axis_name,
                  shard_map=shard_map)


def make_eval_step(
    *,
    loss_fn: LossFn | None = None,
    metrics_fn: MetricsFn | None = None,
    data_parallel: bool = False,
    mesh: Mesh | None = None,
    shard_map: bool = False,
    axis_name: str | tuple[str, ...] | None = None,
) -> Callable[[TrainState, Batch], Metrics]:
    """Builds a compiled eval step ``(state, batch) -> {"loss_sum", "correct", "count"}``.

    The model runs with ``training=False`` (moving statistics); ``batch_stats`` never change.
    The sums run over the valid examples (``batch["mask"]``) of the global batch, whose mask
    the model's batch norms get as in :func:`make_train_step` (padding zeroed); with
    ``data_parallel`` every device returns the same global sums, on a mesh they are replicated.
    Sums, not means, so that a dataset's mean is its batches' sums over their ``count``.

    Args:
      loss_fn: ``(outputs, batch) -> (B,)`` per-example losses as in :func:`make_train_step`
        (same default); ``"loss_sum"`` is their sum.
      metrics_fn: ``(outputs, batch) -> {name: (B,)}``, each metric's sum over the valid
        examples under its name (not ``"loss_sum"`` or ``"count"``). Default: ``{"correct":
        argmax(outputs, -1) == batch["y"]}`` with the default loss, none with a ``loss_fn``.
      data_parallel: run under ``jax.pmap`` over the devices with ``axis_name``.
      mesh: run on this mesh, the batch split over its data axis (as in
        :func:`make_train_step`).
      shard_map: with ``mesh``, run under ``jax.shard_map`` instead of plain ``jax.jit``.
      axis_name: pmap: name of the device axis (default ``"batch"``); mesh: the data axis
        (default the mesh's only axis).

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
      >>> sorted(make_eval_step(loss_fn=lambda out, b: jnp.sum(out ** 2, -1), metrics_fn=lambda
      ...     out, b: {"big": out[:, 0] > 1})(state, {"x": jnp.ones((2, 4)), "y": jnp.zeros(2)}))
      ['big', 'count', 'loss_sum']
    """
    loss_fn, metrics_fn = _losses.resolve(loss_fn, metrics_fn, _losses.correct)
    return _build(lambda s, b, name: _eval_step_body(s, b, name, loss_fn, metrics_fn),
                  data_parallel=data_parallel, mesh=mesh, axis_name=axis_name,
                  shard_map=shard_map)
