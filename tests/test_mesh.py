"""Mesh steps (bnjax.make_train_step(mesh=...)) on 8 CPU devices, both ways to synchronize BN.

"jit": plain jax.jit over a mesh, BN layers with axis_name=None (XLA makes the statistics of the
sharded batch global). "shard_map": the step under jax.shard_map, BN layers with axis_name set
to the data axis (bnjax's one collective per layer). References are float64: flax.linen
BatchNorm (with its mask) and hand-written losses and SGD on the whole batch, never bnjax's
steps; "1e-5 relative" is the max error over the largest reference magnitude of each array.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from bn_reference import (
    EPSILON,
    MOMENTUM,
    SyncMLP,
    init_variables,
    make_data,
    np_bn,
    ref_train_step,
)
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax
from bnjax import parallel
from bnjax import steps as step_lib

D = 8
LR = 0.1
WAYS = ["jit", "shard_map"]


def close(got, ref, rtol=1e-5, what=""):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    err = np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30)
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol}"


def close_tree(got, ref, rtol=1e-5):
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(ref),
                            strict=True):
        close(g, r, rtol, what=jax.tree_util.keystr(path))


def state_of(model, variables, tx=None):
    return step_lib.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                      batch_stats=variables["batch_stats"],
                                      tx=tx or optax.sgd(LR))


def run(mesh, way, model, variables, batches, axis_name=None):
    """Mesh train steps on ``batches``; the host metrics and the final host variables."""
    step = bnjax.make_train_step(mesh=mesh, shard_map=way == "shard_map", axis_name=axis_name)
    state = parallel.put_replicated(state_of(model, variables), mesh)
    metrics = []
    for b in batches:
        state, m = step(state, parallel.put_batch(b, mesh, axis_name))
        metrics.append(parallel.fetch_replicated(m))
    for leaf in jax.tree.leaves(state):  # replicated on every device of the mesh
        assert leaf.is_fully_replicated and len(leaf.sharding.device_set) == D
    return metrics, parallel.fetch_replicated(
        {"params": state.params, "batch_stats": state.batch_stats})


# --------------------------------------------------------------------------------------------
# Masked batch norm on uneven shards: device i holds i valid rows of 8 (device 0 none).


class MaskedMLP(nn.Module):
    """Dense -> BN(mask) -> relu, twice, then Dense; the last input column says which rows
    are valid (the BN statistics and the loss use those only). ``reference`` builds the
    float64 flax.linen.BatchNorm twin with the same variable names."""

    axis_name: object = None
    reference: bool = False

    @nn.compact
    def __call__(self, x, training):
        keep = x[:, -1] > 0
        h = x[:, :-1]
        dtype = jnp.float64 if self.reference else jnp.float32
        for _ in range(2):
            h = nn.Dense(6, dtype=dtype, param_dtype=dtype)(h)
            if self.reference:
                h = nn.BatchNorm(use_running_average=not training, momentum=MOMENTUM,
                                 epsilon=EPSILON, dtype=dtype, param_dtype=dtype)(
                                     h, mask=keep[:, None])
            else:
                h = bnjax.BatchNorm(axis_name=self.axis_name)(h, training=training, mask=keep)
            h = nn.relu(h)
        return nn.Dense(3, dtype=dtype, param_dtype=dtype)(h)


def masked_batches(steps=2, per_device=8):
    keep = (np.arange(per_device)[None, :] < np.arange(D)[:, None]).reshape(-1)
    out = []
    for s in range(steps):
        x, y = make_data(D * per_device, seed=20 + s)
        out.append({"x": np.concatenate([x, keep[:, None].astype(np.float32)], 1), "y": y,
                    "mask": keep})
    return out


def ref_masked_step(variables, batch):
    """One float64 SGD step of the flax twin on the whole batch: (variables, loss, accuracy)."""
    with jax.enable_x64():
        model = MaskedMLP(reference=True)
        to64 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)  # noqa: E731
        params, stats = to64(variables["params"]), to64(variables["batch_stats"])
        x, y = jnp.asarray(batch["x"], jnp.float64), jnp.asarray(batch["y"])
        valid = jnp.asarray(batch["mask"])

        def loss_fn(p):
            logits, upd = model.apply({"params": p, "batch_stats": stats}, x, training=True,
                                      mutable=["batch_stats"])
            nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)[:, 0]
            n = valid.sum()
            acc = jnp.sum(jnp.where(valid, jnp.argmax(logits, -1) == y, False)) / n
            return jnp.sum(jnp.where(valid, nll, 0)) / n, (upd["batch_stats"], acc)

        (loss, (new_stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        new_params = jax.tree.map(lambda p, g: p - LR * g, params, grads)
        out = jax.tree.map(np.asarray, {"params": new_params, "batch_stats": new_stats})
        return out, float(loss), float(acc)


@pytest.mark.parametrize("way", WAYS)
def test_masked_uneven_shards_match_float64_reference(way):
    mesh = jax.make_mesh((D,), ("data",))
    model = MaskedMLP(axis_name="data" if way == "shard_map" else None)
    variables = init_variables(layers=2)
    bs = masked_batches()
    metrics, got = run(mesh, way, model, variables, bs)
    ref = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    for b, m in zip(bs, metrics, strict=True):
        ref, loss, acc = ref_masked_step(ref, b)
        close(m["loss"], loss, what="loss")
        close(m["accuracy"], acc, what="accuracy")
        assert float(m["skipped"]) == 0.0
    close_tree(got, ref)


# --------------------------------------------------------------------------------------------
# Meshes of two axes, mesh axis types, BN groups.


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("shape,names,axis_name", [
    ((2, 4), ("hosts", "data"), ("hosts", "data")),  # the batch split over both axes
    ((4, 2), ("data", "model"), "data"),  # split over "data", replicated over "model"
])
def test_two_axis_meshes_match_float64_reference(way, shape, names, axis_name):
    mesh = jax.make_mesh(shape, names)
    model = SyncMLP(axis_name=axis_name if way == "shard_map" else None)
    variables = init_variables(layers=2)
    bs = [dict(zip(("x", "y"), make_data(32, seed=30 + s), strict=True)) for s in range(2)]
    metrics, got = run(mesh, way, model, variables, bs, axis_name=axis_name)
    ref = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    for b, m in zip(bs, metrics, strict=True):
        ref, loss, acc = ref_train_step(ref, b, layers=2, lr=LR)
        close(m["loss"], loss, what="loss")
        close(m["accuracy"], acc, what="accuracy")
    close_tree(got, ref)


@pytest.mark.parametrize("way", WAYS)
def test_any_mesh_axis_type_and_user_placed_arrays(way):
    """An Auto mesh fed arrays the user placed on an Explicit mesh (jax.make_mesh's default)."""
    explicit = jax.make_mesh((D,), ("data",))
    auto = jax.make_mesh((D,), ("data",), axis_types=(AxisType.Auto,))
    assert explicit.axis_types == (AxisType.Explicit,)
    model = SyncMLP(axis_name="data" if way == "shard_map" else None)
    variables = init_variables(layers=2)
    b = dict(zip(("x", "y"), make_data(32, seed=40), strict=True))
    step = bnjax.make_train_step(mesh=auto, shard_map=way == "shard_map")
    state = jax.device_put(state_of(model, variables), NamedSharding(explicit, P()))
    batch = jax.device_put(b, NamedSharding(explicit, P("data")))
    state, m = step(state, batch)
    ref, loss, _ = ref_train_step({"params": variables["params"],
                                   "batch_stats": variables["batch_stats"]}, b, layers=2, lr=LR)
    close(parallel.fetch_replicated(m["loss"]), loss, what="loss")
    close_tree(parallel.fetch_replicated({"params": state.params,
                                          "batch_stats": state.batch_stats}), ref)


def test_shard_map_bn_over_an_inner_mesh_axis_gives_each_pair_its_own_statistics():
    """BN over pairs of devices: a (4, 2) mesh ("group", "pair"), the batch split over both
    axes, the layers synchronized over "pair" only: every pair normalizes with its own 8 rows.

    The loss is the mean over the whole batch, so its gradient is the mean of the pairs'
    gradients, and SGD is linear: the reference is the mean over the pairs of one float64 step
    on each pair's rows. The moving statistics come out as the mean of the pairs' (the step
    keeps the state replicated).
    """
    mesh = jax.make_mesh((4, 2), ("group", "pair"))
    model = SyncMLP(axis_name="pair")
    variables = init_variables(layers=2)
    x, y = make_data(D * 4, seed=50)
    metrics, got = run(mesh, "shard_map", model, variables, [{"x": x, "y": y}],
                       axis_name=("group", "pair"))
    start = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    refs = [ref_train_step(start, {"x": x[8 * g:8 * g + 8], "y": y[8 * g:8 * g + 8]},
                           layers=2, lr=LR) for g in range(4)]
    close(metrics[0]["loss"], np.mean([r[1] for r in refs]), what="loss")
    close(metrics[0]["accuracy"], np.mean([r[2] for r in refs]), what="accuracy")
    close_tree(got, jax.tree.map(lambda *a: np.mean(a, 0), *[r[0] for r in refs]))


def test_per_device_statistics_under_shard_map_average_the_moving_statistics():
    """BN without axis_name under shard_map: each device normalizes with its own rows (as under
    pmap); the new moving statistics are the mean of the devices', so the state stays
    replicated. Checked on one BN layer with float64 NumPy."""
    mesh = jax.make_mesh((D,), ("data",))
    model = SyncMLP(layers=1, axis_name=None)
    variables = init_variables(layers=1)
    x, y = make_data(D * 4, seed=60)
    _, got = run(mesh, "shard_map", model, variables, [{"x": x, "y": y}])
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    h = (x.astype(np.float64) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]).reshape(D, 4, -1)
    old = variables["batch_stats"]["BatchNorm_0"]
    for key, batch_value in (("mean", h.mean(1).mean(0)), ("var", h.var(1).mean(0))):
        want = MOMENTUM * np.asarray(old[key], np.float64) + (1 - MOMENTUM) * batch_value
        close(got["batch_stats"]["BatchNorm_0"][key], want, what=key)


# --------------------------------------------------------------------------------------------
# Collectives in the compiled mesh steps.


def _count(hlo, op):
    # Instructions look like "%name = f32[...] all-reduce(...)" (also "-start" async forms).
    return len(re.findall(rf"\s{op}(?:-start)?\(", hlo))


def _collectives(layers, axis_name, **step_kwargs):
    model = SyncMLP(layers=layers, axis_name=axis_name)
    state = state_of(model, init_variables(layers=layers))
    x, y = make_data(D * 4)
    if step_kwargs.get("data_parallel"):
        state, batch = parallel.replicate(state), parallel.shard_batch({"x": x, "y": y})
    else:
        mesh = step_kwargs["mesh"]
        state, batch = parallel.put_replicated(state, mesh), parallel.put_batch(
            {"x": x, "y": y}, mesh)
    hlo = bnjax.make_train_step(**step_kwargs).lower(state, batch).compile().as_text()
    ops = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter")
    return {op: _count(hlo, op) for op in ops}


@pytest.mark.parametrize("layers", [1, 3])
def test_shard_map_step_has_the_collectives_of_the_pmap_step(layers):
    """Under jax.shard_map, synchronized BN adds one all-gather per layer forward and one
    all-reduce per layer backward to the step of per-device BN, and the whole step has exactly
    the collectives of the pmap step (measured: L all-gathers, L + 2 all-reduces)."""
    mesh = jax.make_mesh((D,), ("data",))
    sync = _collectives(layers, "data", mesh=mesh, shard_map=True)
    local = _collectives(layers, None, mesh=mesh, shard_map=True)
    assert sync == _collectives(layers, "batch", data_parallel=True), sync
    assert local["all-gather"] == 0
    assert sync["all-gather"] - local["all-gather"] == layers, (sync, local)
    assert sync["all-reduce"] - local["all-reduce"] == layers, (sync, local)


def test_jit_step_collectives_are_all_reduces_four_per_bn_layer_two_on_the_usual_path():
    """Under plain jax.jit XLA writes the synchronization itself: no all-gather, and on the CPU
    four all-reduces per BN layer in the compiled program: the forward's plain sums and the
    backward's sums (which XLA's combiner merges with the gradients' all-reduce) run every
    step; the other two (the shift, one value of the batch broadcast from the device that holds
    it, and the shifted sums) sit in the conditional branch that runs only where |mean| / std
    is large (bnjax.stats). Measured: 4 L + 2 all-reduces."""
    mesh = jax.make_mesh((D,), ("data",))
    one, three = (_collectives(layers, None, mesh=mesh) for layers in (1, 3))
    for counts in (one, three):
        assert counts["all-gather"] == counts["all-to-all"] == 0, counts
        assert counts["collective-permute"] == counts["reduce-scatter"] == 0, counts
    assert three["all-reduce"] - one["all-reduce"] == 4 * 2, (one, three)


# --------------------------------------------------------------------------------------------
# Placement helpers.


def test_placement_helpers():
    mesh = jax.make_mesh((D,), ("data",))
    tree = {"w": np.arange(3.0, dtype=np.float32), "n": np.int32(2)}
    placed = parallel.put_replicated(tree, mesh)
    assert all(a.is_fully_replicated and len(a.sharding.device_set) == D
               for a in jax.tree.leaves(placed))
    again = parallel.put_replicated(placed, mesh)
    assert again["w"] is placed["w"]  # already placed: returned as it is
    host = parallel.fetch_replicated(placed)
    assert isinstance(host["w"], np.ndarray) and host["w"].tolist() == [0.0, 1.0, 2.0]
    batch = parallel.put_batch({"x": np.arange(32.0).reshape(16, 2), "y": np.arange(16)}, mesh)
    assert batch["x"].shape == (16, 2)
    assert [s.data.shape for s in batch["x"].addressable_shards] == [(2, 2)] * D
    np.testing.assert_array_equal(np.asarray(batch["y"]), np.arange(16))
    with pytest.raises(ValueError, match=r"leading sizes \{'x': 16, 'y': 15\}"):
        parallel.put_batch({"x": np.zeros((16, 2)), "y": np.zeros(15)}, mesh)
    with pytest.raises(ValueError, match="a multiple of the 8 shards"):
        parallel.put_batch({"x": np.zeros((12, 2))}, mesh)
    with pytest.raises(ValueError, match="not replicated"):
        parallel.fetch_replicated(batch["x"])


# --------------------------------------------------------------------------------------------
# Errors before anything runs.


def _batch(n=32):
    x, y = make_data(n)
    return {"x": x, "y": y}


def test_layer_axis_names_that_do_not_fit_the_way_are_clear_errors():
    mesh = jax.make_mesh((D,), ("data",))
    placed = lambda axis, **kw: parallel.put_replicated(  # noqa: E731
        state_of(SyncMLP(axis_name=axis, **kw), init_variables()), mesh)
    batch = parallel.put_batch(_batch(), mesh)
    with pytest.raises(ValueError, match=r"axis_name='data' but a jax.jit mesh step binds no "
                                         r"axis names.*shard_map=True"):
        bnjax.make_train_step(mesh=mesh)(placed("data"), batch)
    with pytest.raises(ValueError, match=r"axis_name='batch' but the mesh step splits the "
                                         r"batch over axis_name='data'"):
        bnjax.make_train_step(mesh=mesh, shard_map=True)(placed("batch"), batch)
    # jax.shard_map has no grouped psum: the error says how to get the groups from the mesh.
    with pytest.raises(ValueError, match=r"axis_index_groups=.*give the groups a mesh axis"):
        bnjax.make_train_step(mesh=mesh, shard_map=True)(
            placed("data", axis_index_groups=[[0, 1], [2, 3], [4, 5], [6, 7]]), batch)


def test_batch_that_does_not_split_over_the_mesh_is_a_clear_error():
    mesh = jax.make_mesh((D,), ("data",))
    state = parallel.put_replicated(state_of(SyncMLP(axis_name=None), init_variables()), mesh)
    with pytest.raises(ValueError, match=r"batch\['x'\] has shape \(30, 4\).*a multiple of 8"):
        bnjax.make_train_step(mesh=mesh)(state, _batch(30))
    with pytest.raises(ValueError, match="'x' \\(inputs\\), 'y'"):
        bnjax.make_eval_step(mesh=mesh)(state, {"x": np.zeros((8, 4))})


def test_bad_mesh_arguments_are_clear_errors():
    mesh = jax.make_mesh((D,), ("data",))
    with pytest.raises(ValueError, match="data_parallel=True .* and mesh="):
        bnjax.make_train_step(data_parallel=True, mesh=mesh)
    with pytest.raises(ValueError, match="shard_map=True .* pass mesh="):
        bnjax.make_eval_step(shard_map=True)
    with pytest.raises(TypeError, match="is not a jax.sharding.Mesh"):
        bnjax.make_train_step(mesh="data")
    with pytest.raises(ValueError, match=r"axis_name='batch' must name distinct axes of the "
                                         r"mesh, whose axes are \('data',\)"):
        bnjax.make_train_step(mesh=mesh, axis_name="batch")
    with pytest.raises(ValueError, match=r"axis_name=None but the mesh has axes "
                                         r"\('data', 'model'\)"):
        bnjax.make_train_step(mesh=jax.make_mesh((4, 2), ("data", "model")))


@pytest.mark.parametrize("case", ["plain", "mask", "ghost", "features_sharded", "linen"])
def test_a_layer_under_plain_jit_on_explicitly_sharded_inputs(case):
    """``jax.make_mesh``'s explicit axes, no step helper: the statistics still index the batch.

    x (16, 4) sharded over 8 devices on its batch axis (and over 2 on its features for
    ``features_sharded``); values, new moving statistics and the gradients of
    ``sum(y * dy)`` against the float64 NumPy reference, ghost batches computed per group.
    """
    both = case == "features_sharded"
    shape, names = ((4, 2), ("batch", "model")) if both else ((8,), ("batch",))
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Explicit,) * len(shape))
    spec = P("batch", "model") if both else P("batch")
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(16, 4)) * 3 + 50).astype(np.float32)
    dy = rng.normal(size=(16, 4)).astype(np.float32)
    scale, bias = np.linspace(0.5, 2, 4).astype(np.float32), np.linspace(-1, 1, 4).astype(
        np.float32)
    stats = {"mean": np.full(4, 0.5, np.float32), "var": np.full(4, 2.0, np.float32)}
    mask = np.arange(16) % 3 != 1 if case == "mask" else None
    ghost = 8 if case == "ghost" else None

    def loss(x, scale, bias, stats, mask):
        if case == "linen":
            bn = bnjax.BatchNorm(use_running_average=False)
            y, upd = bn.apply({"params": {"scale": scale, "bias": bias}, "batch_stats": stats},
                              x, mutable=["batch_stats"])
            new = upd["batch_stats"]
        else:
            y, new = bnjax.batch_norm(x, stats, {"scale": scale, "bias": bias}, training=True,
                                      mask=mask, virtual_batch_size=ghost)
        return jnp.sum(y * dy), (y, new)

    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, spec))
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
        (dx, dscale, dbias), (y, new) = grad(xs, scale, bias, stats, mask)
        assert jax.typeof(y).sharding.spec == jax.typeof(xs).sharding.spec
    groups = [slice(0, 16)] if ghost is None else [slice(0, 8), slice(8, 16)]
    parts = [np_bn(x[g], None if mask is None else mask[g], scale, bias, stats["mean"],
                   stats["var"], dy[g]) for g in groups]
    ref_y, ref_dx = (np.concatenate([p[i] for p in parts]) for i in (0, 3))
    close(y, ref_y, what="y")
    close(dx, ref_dx, 1e-4, what="dx")
    close(dscale, sum(p[4] for p in parts), 1e-4, what="dscale")
    close(dbias, sum(p[5] for p in parts), what="dbias")
    close(new["mean"], np.mean([p[1] for p in parts], 0), what="mean")
    close(new["var"], np.mean([p[2] for p in parts], 0), what="var")
    with jax.set_mesh(mesh):
        m = jax.jit(bnjax.moments)(xs)
    close(m.mean, x.astype(np.float64).mean(0), what="moments mean")
    close(m.var, x.astype(np.float64).var(0), what="moments var")
