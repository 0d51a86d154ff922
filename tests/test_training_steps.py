"""Train and eval steps of bnjax.steps: one device, and 8 CPU devices under pmap and on a mesh.

Modes: "single" (jax.jit on one device), "pmap" (data_parallel=True, axis "batch"), "mesh"
(jax.jit over a mesh whose axis the user named "data"; BN layers without axis_name) and
"shard_map" (the same mesh under jax.shard_map; BN layers with axis_name="data").

The reference (bn_reference.ref_train_step) is a float64 model with flax.linen.BatchNorm, a
hand-written masked cross-entropy and plain SGD on the whole batch; "1e-5 relative" is the max
error over the largest reference magnitude of each array.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from bn_reference import SyncMLP, init_variables, make_data, ref_train_step

from bnjax import parallel
from bnjax import steps as step_lib

D = 8
LAYERS = 2
LR = 0.1
MODES = ["single", "pmap", "mesh", "shard_map"]
MESH_AXIS = "data"  # the user's name for the mesh axis


def model_axis(mode):
    """The axis_name the model's BN layers need in ``mode``."""
    return {"pmap": "batch", "shard_map": MESH_AXIS}.get(mode)


def the_mesh():
    return jax.make_mesh((D,), (MESH_AXIS,))


def step_kwargs(mode):
    if mode == "pmap":
        return {"data_parallel": True}
    if mode in ("mesh", "shard_map"):
        return {"mesh": the_mesh(), "shard_map": mode == "shard_map"}
    return {}


def place(mode, state):
    if mode == "pmap":
        return parallel.replicate(state)
    if mode in ("mesh", "shard_map"):
        return parallel.put_replicated(state, the_mesh())
    return state


def prep(mode, batch):
    if mode == "pmap":
        return parallel.shard_batch(batch)
    if mode in ("mesh", "shard_map"):
        return parallel.put_batch(batch, the_mesh())
    return batch


def first(x):
    """The first element of a value that may carry a pmap device axis, as a float."""
    return float(np.asarray(x).reshape(-1)[0])


def close(got, ref, rtol=1e-5, what=""):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    err = np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30)
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol}"


def make_state(axis_name, tx=None, penalty=0.0, groups=None, layers=LAYERS):
    model = SyncMLP(layers=layers, axis_name=axis_name, penalty=penalty,
                    axis_index_groups=groups)
    v = init_variables(layers=layers)
    return step_lib.TrainState.create(apply_fn=model.apply, params=v["params"],
                                      batch_stats=v["batch_stats"], tx=tx or optax.sgd(LR))


def host(tree, mode):
    if mode in ("mesh", "shard_map"):
        return parallel.fetch_replicated(tree)
    return jax.tree.map(np.asarray, parallel.unreplicate(tree) if mode == "pmap" else tree)


def assert_identical_replicas(mode, state):
    """Parameters and moving statistics agree on every device."""
    for leaf in jax.tree.leaves((state.params, state.batch_stats)):
        if mode == "pmap":
            a = np.asarray(leaf)
            assert np.array_equal(a, np.broadcast_to(a[:1], a.shape))
        else:
            assert leaf.is_fully_replicated and len(leaf.sharding.device_set) == D
            shards = [np.asarray(s.data) for s in leaf.addressable_shards]
            assert all(np.array_equal(shards[0], b) for b in shards[1:])


def batches(masked, steps=2, n=D * 4):
    out = []
    for s in range(steps):
        x, y = make_data(n, seed=10 + s)
        b = {"x": x, "y": y}
        if masked:
            b["mask"] = (np.arange(n) * 7 + s) % 4 != 0  # a quarter left out, uneven per device
        out.append(b)
    return out


def run_steps(mode, bs, constrain_fn=None, penalty=0.0, tx=None):
    state = place(mode, make_state(model_axis(mode), tx=tx, penalty=penalty))
    step = step_lib.make_train_step(constrain_fn=constrain_fn, **step_kwargs(mode))
    metrics = []
    for b in bs:
        state, m = step(state, prep(mode, b))
        metrics.append(host(m, mode))
    return state, metrics


def check_against_reference(state, metrics, bs, mode, penalty=0.0, clip=None):
    ref = init_variables(layers=LAYERS)
    ref = {"params": ref["params"], "batch_stats": ref["batch_stats"]}
    for b, m in zip(bs, metrics, strict=True):
        ref, loss, acc = ref_train_step(ref, b, layers=LAYERS, lr=LR, penalty=penalty,
                                        clip=clip)
        close(m["loss"], loss, what="loss")
        close(m["accuracy"], acc, what="accuracy")
        assert float(m["skipped"]) == 0.0
    got = host({"params": state.params, "batch_stats": state.batch_stats}, mode)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(ref),
                            strict=True):
        close(g, r, what=jax.tree_util.keystr(path))
    assert int(np.asarray(state.step).reshape(-1)[0]) == len(bs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("masked", [False, True])
def test_train_step_matches_float64_reference(mode, masked):
    bs = batches(masked)
    state, metrics = run_steps(mode, bs)
    check_against_reference(state, metrics, bs, mode)
    if mode != "single":
        assert_identical_replicas(mode, state)


@pytest.mark.parametrize("mode", ["pmap", "mesh", "shard_map"])
def test_losses_collection_and_constrain_fn(mode):
    """A sown penalty joins the loss and its gradient; constrain_fn clips after each update."""
    bs = batches(False)
    clip = 0.3
    state, metrics = run_steps(mode, bs, penalty=0.05,
                               constrain_fn=lambda p: jax.tree.map(
                                   lambda a: jnp.clip(a, -clip, clip), p))
    check_against_reference(state, metrics, bs, mode, penalty=0.05, clip=clip)
    assert max(np.max(np.abs(a)) for a in jax.tree.leaves(host(state.params, mode))) <= clip


@pytest.mark.parametrize("mode", MODES)
def test_non_finite_batches_are_skipped(mode):
    state = place(mode, make_state(model_axis(mode), tx=optax.adam(1e-2)))
    step = step_lib.make_train_step(**step_kwargs(mode))
    good = batches(False, steps=1)[0]
    state, m = step(state, prep(mode, good))  # a normal step first: a non-trivial opt state
    assert first(m["skipped"]) == 0.0
    for bad_value in (np.nan, np.inf):
        before = host(state, mode)
        bad = dict(good, x=good["x"].copy())
        bad["x"][5, 1] = bad_value
        state, m = step(state, prep(mode, bad))
        after = host(state, mode)
        assert first(m["skipped"]) == 1.0
        assert not np.isfinite(first(m["loss"]))
        for name in ("params", "opt_state", "batch_stats"):
            for a, b in zip(jax.tree.leaves(getattr(before, name)),
                            jax.tree.leaves(getattr(after, name)), strict=True):
                assert np.all(np.isfinite(b)) and np.array_equal(a, b), name
        assert int(first(after.step)) == int(first(before.step)) + 1
    state, m = step(state, prep(mode, good))
    assert first(m["skipped"]) == 0.0
    assert not np.array_equal(jax.tree.leaves(host(state.params, mode))[0],
                              jax.tree.leaves(after.params)[0])


def _np_logits(variables, x):
    p, s = variables["params"], variables["batch_stats"]
    h = np.asarray(x, np.float64)
    for i in range(LAYERS):
        h = h @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
        bn, st = p[f"BatchNorm_{i}"], s[f"BatchNorm_{i}"]
        h = np.maximum((h - st["mean"]) / np.sqrt(st["var"] + 1e-3) * bn["scale"] + bn["bias"],
                       0)
    return h @ p[f"Dense_{LAYERS}"]["kernel"] + p[f"Dense_{LAYERS}"]["bias"]


@pytest.mark.parametrize("mode", MODES)
def test_eval_step_uses_moving_statistics_and_honours_the_mask(mode):
    state = make_state(model_axis(mode))
    b = batches(True, steps=1)[0]
    b["x"][~b["mask"]] = np.nan  # padding reaches no valid sum
    step = step_lib.make_eval_step(**step_kwargs(mode))
    m = step(place(mode, state), prep(mode, b))
    m = {k: first(v) for k, v in m.items()}
    v = jax.tree.map(lambda a: np.asarray(a, np.float64),
                     {"params": state.params, "batch_stats": state.batch_stats})
    logits = _np_logits(v, b["x"])
    top = logits.max(1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
    valid = b["mask"]
    nll = -logp[np.arange(len(b["y"])), b["y"]]
    assert m["count"] == valid.sum()
    assert m["correct"] == np.sum((logits.argmax(1) == b["y"])[valid])
    close(m["loss_sum"], nll[valid].sum())


# --------------------------------------------------------------------------------------------
# Padded batches: batch["mask"] reaches the model's batch norms, padding reaches nothing.

PAD_ROWS = [1, 6, 7, 14]  # 16 rows over 8 devices: one device holds only padding


def padded(value, n=16):
    x, y = make_data(n, seed=3)
    valid = ~np.isin(np.arange(n), PAD_ROWS)
    x[~valid] = value
    y[~valid] = 2
    return {"x": x, "y": y, "mask": valid}


@pytest.mark.parametrize("mode", MODES)
def test_padded_masked_step_equals_the_step_on_the_valid_examples(mode):
    """Zeros, 1e3 and NaN padding: params, moving statistics and loss of the 12 valid rows."""
    ref, loss, acc = ref_train_step(init_variables(layers=LAYERS), padded(0.0), layers=LAYERS,
                                    lr=LR)  # float64 flax.linen on the valid rows alone
    step = step_lib.make_train_step(**step_kwargs(mode))
    start = place(mode, make_state(model_axis(mode)))
    for value in (0.0, 1e3, np.nan):
        state, m = step(start, prep(mode, padded(value)))
        m = host(m, mode)
        assert float(np.ravel(m["skipped"])[0]) == 0.0, value
        close(np.ravel(m["loss"])[0], loss, what=f"loss, padding {value}")
        close(np.ravel(m["accuracy"])[0], acc, what=f"accuracy, padding {value}")
        got = host({"params": state.params, "batch_stats": state.batch_stats}, mode)
        for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(got),
                                jax.tree.leaves(ref), strict=True):
            close(g, r, what=f"{jax.tree_util.keystr(path)}, padding {value}")


class FlaxBNMLP(nn.Module):
    """SyncMLP's layers and names with flax.linen.BatchNorm (float32)."""

    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, training):
        for _ in range(LAYERS):
            x = nn.Dense(6)(x)
            x = nn.BatchNorm(use_running_average=not training, momentum=0.99, epsilon=1e-3,
                             axis_name=self.axis_name)(x)
            x = nn.relu(x)
        return nn.Dense(3)(x)


def test_flax_batch_norm_gets_the_mask_too():
    ref, loss, _ = ref_train_step(init_variables(layers=LAYERS), padded(0.0), layers=LAYERS,
                                  lr=LR)
    v = init_variables(layers=LAYERS)
    state = step_lib.TrainState.create(apply_fn=FlaxBNMLP().apply, params=v["params"],
                                       batch_stats=v["batch_stats"], tx=optax.sgd(LR))
    step = step_lib.make_train_step()
    for value in (1e3, np.nan):
        new, m = step(state, padded(value))
        close(m["loss"], loss, what="loss")
        got = jax.tree.map(np.asarray, {"params": new.params, "batch_stats": new.batch_stats})
        for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
            close(g, r, rtol=1e-4, what=f"padding {value}")  # Flax's E[x^2] - E[x]^2


class HandMadeNorm(nn.Module):
    """A hand-made batch norm: its statistics live in batch_stats, it takes no mask."""

    @nn.compact
    def __call__(self, x, training):
        mean = self.variable("batch_stats", "mean", jnp.zeros, x.shape[-1])
        if training:
            mean.value = 0.9 * mean.value + 0.1 * x.mean(0)
        return x - mean.value


class WithHandMadeNorm(nn.Module):
    @nn.compact
    def __call__(self, x, training):
        return nn.Dense(3)(HandMadeNorm()(x, training))


class Transposed(nn.Module):
    """Normalizes over the examples of x.T (features on axis 0): no per-example mask fits."""

    @nn.compact
    def __call__(self, x, training):
        import bnjax

        return nn.Dense(3)(bnjax.BatchNorm(axis=0)(x.T, training=training).T)


@pytest.mark.parametrize("model,mode,match", [
    (FlaxBNMLP(axis_name="batch"), "pmap",
     r"flax.linen.BatchNorm at 'BatchNorm_0' has axis_name='batch'.*bnjax.BatchNorm"),
    (WithHandMadeNorm(), "single", r"batch statistics at 'HandMadeNorm_0'"),
    (Transposed(), "single", r"BatchNorm at 'BatchNorm_0' gets an input of shape \(4, 16\)"),
])
def test_a_model_the_mask_cannot_reach_is_refused_by_name(model, mode, match):
    x = jnp.ones((2, 4))
    v = model.init(jax.random.key(0), x, training=False)
    state = step_lib.TrainState.create(apply_fn=model.apply, params=v["params"],
                                       batch_stats=v.get("batch_stats", {}), tx=optax.sgd(LR))
    step = step_lib.make_train_step(**step_kwargs(mode))
    with pytest.raises(ValueError, match=match):
        step(place(mode, state), prep(mode, padded(0.0)))


def test_each_batch_norm_gets_one_flag_per_example_whatever_its_rank():
    """(B,) becomes (B, 1, 1) for a (B, T, C) input: the statistics of the valid examples."""
    import bnjax
    from bnjax._batch_mask import masked_batch_norms

    x = np.random.RandomState(0).randn(5, 2, 3).astype(np.float32)
    x[3] = 1e6
    valid = np.arange(5) != 3
    bn = bnjax.BatchNorm(momentum=0.0)
    v = bn.init(jax.random.key(0), x, training=False)
    with masked_batch_norms(jnp.asarray(valid)) as paths:
        _, new = bn.apply(v, x, training=True, mutable=["batch_stats"])
    assert paths == [()]
    xv = x[valid].astype(np.float64).reshape(-1, 3)
    close(new["batch_stats"]["mean"], xv.mean(0), what="mean")
    close(new["batch_stats"]["var"], xv.var(0), what="var")


# --------------------------------------------------------------------------------------------
# Data-parallel input errors, raised before any step runs.


def _dp_batch():
    x, y = make_data(D * 4)
    return parallel.shard_batch({"x": x, "y": y})


def test_wrong_axis_name_in_the_model_is_a_clear_error():
    state = parallel.replicate(make_state("data"))
    step = step_lib.make_train_step(data_parallel=True)
    with pytest.raises(ValueError, match=r"axis_name='data'.*axis_name='batch'"):
        step(state, _dp_batch())


def test_groups_that_do_not_partition_the_devices_are_a_clear_error():
    state = parallel.replicate(make_state("batch", groups=[[0, 1], [2, 3]]))
    step = step_lib.make_train_step(data_parallel=True)
    with pytest.raises(ValueError, match=r"does not partition the 8 devices"):
        step(state, _dp_batch())


@pytest.mark.parametrize("size", [30, 12])
def test_batch_not_divisible_by_the_device_count_is_a_clear_error(size):
    x, y = make_data(size)
    with pytest.raises(ValueError, match=rf"batch size {size} is not divisible by the device "
                                         "count 8"):
        parallel.shard_batch({"x": x, "y": y})
    step = step_lib.make_train_step(data_parallel=True)
    with pytest.raises(ValueError, match=r"num_local_devices=8"):
        step(parallel.replicate(make_state("batch")), {"x": x, "y": y})


def test_bad_step_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="axis_name"):
        step_lib.make_train_step(data_parallel=True, axis_name="")
    with pytest.raises(TypeError, match="constrain_fn"):
        step_lib.make_train_step(constrain_fn=3)
    x, y = make_data(8)
    with pytest.raises(TypeError, match=r"batch\['y'\]"):
        step_lib.make_train_step()(make_state(None), {"x": x, "y": y.astype(np.float32)})
    with pytest.raises(ValueError, match="process_id"):
        parallel.initialize_distributed("127.0.0.1:1234", num_processes=2, process_id=2)
    with pytest.raises(ValueError, match="coordinator_address"):
        parallel.initialize_distributed("localhost", num_processes=2, process_id=0)


# --------------------------------------------------------------------------------------------
# batch["mask"]: one boolean (or integer) flag per example, anything else refused by name.


@pytest.mark.parametrize("mask,match", [
    (np.full(8, 0.5, np.float32), r"batch\['mask'\] has dtype float32; it must be boolean"),
    (np.ones(8, np.float16), r"batch\['mask'\] has dtype float16"),
])
def test_a_float_mask_of_weights_is_refused_not_read_as_true(mask, match):
    x, y = make_data(8)
    with pytest.raises(TypeError, match=match):
        step_lib.make_train_step()(make_state(None), {"x": x, "y": y, "mask": mask})
    with pytest.raises(TypeError, match=match):
        step_lib.make_eval_step()(make_state(None), {"x": x, "y": y, "mask": mask})


@pytest.mark.parametrize("shape", [(7,), (9,), (2, 4), (8, 2), ()])
def test_a_mask_of_the_wrong_length_names_both_lengths(shape):
    x, y = make_data(8)
    mask = np.ones(shape, bool)
    with pytest.raises(ValueError, match=rf"batch\['mask'\] has shape {re.escape(str(shape))} "
                                         r".*the batch holds 8 examples.*shape \(8,\)"):
        step_lib.make_train_step()(make_state(None), {"x": x, "y": y, "mask": mask})


def test_an_integer_mask_is_read_as_nonzero_valid_and_a_column_mask_as_a_row():
    """int 0/1 (B,) and bool (B, 1) masks train as the bool (B,) one: the valid rows only."""
    bs = padded(1e3)
    ref, loss, _ = ref_train_step(init_variables(layers=LAYERS), padded(0.0), layers=LAYERS,
                                  lr=LR)
    for mask in (bs["mask"].astype(np.int32), bs["mask"][:, None]):
        state, m = step_lib.make_train_step()(make_state(None), {**bs, "mask": mask})
        close(m["loss"], loss, what="loss")
        for g, r in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref["params"]),
                        strict=True):
            close(g, r, what="params")
