"""The train and eval steps take the loss and the metrics: ``loss_fn`` and ``metrics_fn``.

A regression net (Dense -> bnjax.BatchNorm -> relu -> Dense(1)) trained with a per-example
MSE. References: a float64 flax.linen model (flax.linen.BatchNorm, the same variables) with a
hand-written jax.grad loop and plain optax SGD on the valid rows alone, and float64 NumPy for
the metrics; never bnjax's steps. "1e-5 relative" is the max error over the largest reference
magnitude of each array. Modes as in tests/test_training_steps.py: one device, pmap, a mesh
under jax.jit, the same mesh under jax.shard_map (8 CPU devices, tests/conftest.py).
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnjax
from bnjax import parallel
from bnjax import steps as step_lib

D = 8
LR = 0.1
EPS = 1e-3
N = 16
PAD_ROWS = [1, 6, 7, 14]  # over 8 devices, 2 rows each: the device of rows 6 and 7 holds none
MODES = ["single", "pmap", "mesh", "shard_map"]


def mse(outputs, batch):
    """Per-example mean squared error, ``(B,)``."""
    return jnp.mean((outputs - batch["y"]) ** 2, axis=-1)


def abs_error(outputs, batch):
    return {"mae": jnp.mean(jnp.abs(outputs - batch["y"]), axis=-1)}


class Regressor(nn.Module):
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, training):
        x = nn.Dense(8)(x)
        x = bnjax.BatchNorm(axis_name=self.axis_name)(x, training=training)
        return nn.Dense(1)(nn.relu(x))


class RefRegressor(nn.Module):
    """The same layers and variable names, float64, with flax.linen.BatchNorm."""

    @nn.compact
    def __call__(self, x, training):
        f64 = {"dtype": jnp.float64, "param_dtype": jnp.float64}
        x = nn.Dense(8, **f64)(x)
        x = nn.BatchNorm(use_running_average=not training, momentum=0.99, epsilon=EPS,
                         **f64)(x)
        return nn.Dense(1, **f64)(nn.relu(x))


def data(seed, n=N):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32) * 2 + 1
    y = (np.sin(x[:, :1]) + x[:, 1:2] * x[:, 2:]).astype(np.float32)
    return x, y


def padded_batch(seed):
    """16 rows, 4 of them padding holding NaN in x and y, and the mask."""
    x, y = data(seed)
    valid = ~np.isin(np.arange(N), PAD_ROWS)
    x[~valid], y[~valid] = np.nan, np.nan
    return {"x": x, "y": y, "mask": valid}


def valid_rows(batch):
    return {k: v[batch["mask"]] for k, v in batch.items() if k != "mask"}


def init_variables():
    """Initial variables; Dense_0's bias nonzero (batch norm leaves it still, up to rounding)."""
    x, _ = data(0)
    v = Regressor().init(jax.random.key(0), x[:2], training=False)
    bias = np.random.default_rng(0).normal(size=8).astype(np.float32)
    v["params"]["Dense_0"]["bias"] = jnp.asarray(bias)
    return v


def model_axis(mode):
    return {"pmap": "batch", "shard_map": "data"}.get(mode)


def the_mesh():
    return jax.make_mesh((D,), ("data",))


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


def host(tree, mode):
    if mode in ("mesh", "shard_map"):
        return parallel.fetch_replicated(tree)
    return jax.tree.map(np.asarray, parallel.unreplicate(tree) if mode == "pmap" else tree)


def close(got, ref, rtol=1e-5, what=""):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    err = np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30)
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol}"


def close_tree(got, ref, rtol=1e-5, what=""):
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(ref),
                            strict=True):
        close(g, r, rtol, what=f"{what}{jax.tree_util.keystr(path)}")


def make_state(mode="single", tx=None):
    v = init_variables()
    return step_lib.TrainState.create(apply_fn=Regressor(axis_name=model_axis(mode)).apply,
                                      params=v["params"], batch_stats=v["batch_stats"],
                                      tx=tx or optax.sgd(LR))


def run(mode, batches, **kwargs):
    """The train step on ``batches``: final host variables and each step's host metrics."""
    step = step_lib.make_train_step(**kwargs, **step_kwargs(mode))
    state, metrics = place(mode, make_state(mode)), []
    for b in batches:
        state, m = step(state, prep(mode, b))
        metrics.append({k: float(np.ravel(v)[0]) for k, v in host(m, mode).items()})
    return host({"params": state.params, "batch_stats": state.batch_stats}, mode), metrics


def reference(batches):
    """float64 flax.linen, a hand-written jax.grad loop and optax.sgd on the valid rows."""
    with jax.enable_x64():
        v = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), init_variables())
        params, stats = v["params"], v["batch_stats"]
        tx = optax.sgd(LR)
        opt_state = tx.init(params)
        losses = []
        for b in batches:
            x, y = (jnp.asarray(a, jnp.float64) for a in valid_rows(b).values())

            def loss_of(p, x=x, y=y, stats=stats):
                out, new = RefRegressor().apply({"params": p, "batch_stats": stats}, x,
                                                training=True, mutable=["batch_stats"])
                return jnp.mean((out - y) ** 2), new["batch_stats"]

            (loss, stats), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            losses.append(float(loss))
        return jax.tree.map(np.asarray, {"params": params, "batch_stats": stats}), losses


BATCHES = [padded_batch(seed) for seed in (1, 2, 3, 4)]


def test_regression_on_padded_rows_ends_where_the_valid_rows_alone_end():
    """The acceptance: 12 valid + 4 NaN rows with the mask = the 12 rows alone, 4 SGD steps."""
    padded, padded_metrics = run("single", BATCHES, loss_fn=mse)
    alone, alone_metrics = run("single", [valid_rows(b) for b in BATCHES], loss_fn=mse)
    close_tree(padded, alone, rtol=1e-6, what="padded vs alone ")  # float32 rounding
    ref, ref_losses = reference(BATCHES)
    close_tree(padded, ref, what="vs float64 ")
    for m, a, loss in zip(padded_metrics, alone_metrics, ref_losses, strict=True):
        assert sorted(m) == ["loss", "skipped"] and m["skipped"] == 0.0
        close(m["loss"], a["loss"], rtol=1e-6, what="loss vs alone")
        close(m["loss"], loss, what="loss vs float64")


@pytest.mark.parametrize("mode", ["pmap", "mesh", "shard_map"])
def test_regression_on_padded_sharded_batches_matches_the_valid_rows_alone(mode):
    padded, metrics = run(mode, BATCHES[:2], loss_fn=mse)
    ref, ref_losses = reference(BATCHES[:2])
    close_tree(padded, ref, what=f"{mode} ")
    for m, loss in zip(metrics, ref_losses, strict=True):
        assert m["skipped"] == 0.0
        close(m["loss"], loss, what=f"{mode} loss")


def np_outputs(variables, x, stats_of=None):
    """The regressor in float64 NumPy: batch statistics of ``stats_of`` rows, else moving."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    h = np.asarray(x, np.float64) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    if stats_of is not None:
        mean, var = h[stats_of].mean(0), h[stats_of].var(0)
    else:
        mean, var = (np.asarray(variables["batch_stats"]["BatchNorm_0"][k], np.float64)
                     for k in ("mean", "var"))
    bn = p["BatchNorm_0"]
    h = np.maximum((h - mean) / np.sqrt(var + EPS) * bn["scale"] + bn["bias"], 0.0)
    return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


@pytest.mark.parametrize("mode", ["single", "shard_map"])
def test_metrics_fn_is_averaged_over_the_valid_rows_in_train_and_summed_in_eval(mode):
    b = BATCHES[0]
    valid = b["mask"]
    v = init_variables()
    out = np_outputs(v, np.nan_to_num(b["x"]), stats_of=valid)[valid]
    y = b["y"][valid].astype(np.float64)
    _, [m] = run(mode, [b], loss_fn=mse, metrics_fn=abs_error)
    assert sorted(m) == ["loss", "mae", "skipped"]
    close(m["mae"], np.mean(np.abs(out - y)), what="train mae")
    close(m["loss"], np.mean((out - y) ** 2), what="train loss")

    state = make_state(mode)
    state = state.replace(batch_stats={"BatchNorm_0": {"mean": jnp.full(8, 0.3),
                                                       "var": jnp.full(8, 2.0)}})
    ev = step_lib.make_eval_step(loss_fn=mse, metrics_fn=abs_error, **step_kwargs(mode))
    e = {k: float(np.ravel(a)[0]) for k, a in host(ev(place(mode, state), prep(mode, b)),
                                                    mode).items()}
    out = np_outputs({"params": state.params, "batch_stats": state.batch_stats},
                     np.nan_to_num(b["x"]))[valid]
    assert sorted(e) == ["count", "loss_sum", "mae"] and e["count"] == 12.0
    close(e["mae"], np.sum(np.abs(out - y)), what="eval mae sum")
    close(e["loss_sum"], np.sum((out - y) ** 2), what="eval loss sum")


def test_the_default_is_cross_entropy_and_accuracy_and_metrics_fn_adds_to_a_default_loss():
    """Classification with the default loss and a metrics_fn of the user's: its names only."""
    x, _ = data(5)
    labels = (x[:, 0] > 1).astype(np.int32)
    model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
    v = model.init(jax.random.key(1), x)
    state = step_lib.TrainState.create(apply_fn=lambda v, x, training, mutable: model.apply(
        v, x, mutable=mutable), params=v["params"], batch_stats={}, tx=optax.sgd(LR))
    batch = {"x": x, "y": labels}
    _, m = step_lib.make_train_step()(state, batch)
    assert sorted(m) == ["accuracy", "loss", "skipped"]

    def top_margin(logits, batch):
        return {"margin": jnp.max(logits, -1) - jnp.min(logits, -1)}

    _, m2 = step_lib.make_train_step(metrics_fn=top_margin)(state, batch)
    assert sorted(m2) == ["loss", "margin", "skipped"]
    logits = np.asarray(model.apply(v, x), np.float64)  # flax.linen.Dense only
    top = logits.max(1, keepdims=True)
    nll = -(logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True)))
    close(m2["loss"], nll[np.arange(N), labels].mean(), what="default cross-entropy")
    close(m2["margin"], np.mean(logits.max(1) - logits.min(1)), what="margin")
    assert float(m["loss"]) == float(m2["loss"])


def test_a_per_example_entry_of_the_batch_is_zeroed_and_a_nan_loss_of_padding_dropped():
    """The loss reads batch["w"] (NaN in the padding) and returns NaN for padded rows itself:
    jnp.where drops them (a product with 0 would not), and the gradient stays finite."""
    def weighted(outputs, batch):
        per_row = batch["w"] * mse(outputs, batch)
        return jnp.where(batch["mask"], per_row, jnp.nan)

    w = np.linspace(0.5, 2.0, N).astype(np.float32)
    w[PAD_ROWS] = np.nan
    got, [m] = run("single", [{**BATCHES[0], "w": w}], loss_fn=weighted)
    assert m["skipped"] == 0.0
    b = BATCHES[0]
    valid = b["mask"]
    out = np_outputs(init_variables(), np.nan_to_num(b["x"]), stats_of=valid)[valid]
    close(m["loss"], np.mean(w[valid] * np.mean((out - b["y"][valid]) ** 2, -1)),
          what="weighted loss")
    assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(got))


def _state_and_batch():
    return make_state(), BATCHES[0]


@pytest.mark.parametrize("loss_fn,error,match", [
    (lambda o, b: jnp.mean(mse(o, b)), ValueError,
     r"loss_fn\(outputs, batch\) returned shape \(\), but it must return one value per "
     r"example, an array of shape \(16,\).*not their mean"),
    (lambda o, b: (o - b["y"]) ** 2, ValueError, r"returned shape \(16, 1\).*\(16,\)"),
    (lambda o, b: (mse(o, b), {}), ValueError, r"returned a tuple.*shape \(16,\)"),
    (lambda o, b: jnp.zeros(16, jnp.int32), TypeError,
     r"loss_fn\(outputs, batch\) returned dtype int32; the losses must be floating point"),
])
@pytest.mark.parametrize("which", ["train", "eval"])
def test_a_loss_that_is_not_per_example_is_refused_by_name(loss_fn, error, match, which):
    state, batch = _state_and_batch()
    make = step_lib.make_train_step if which == "train" else step_lib.make_eval_step
    with pytest.raises(error, match=match):
        make(loss_fn=loss_fn)(state, batch)


@pytest.mark.parametrize("metrics_fn,error,match", [
    (lambda o, b: jnp.abs(o[:, 0]), TypeError,
     r"metrics_fn\(outputs, batch\) returned an array of shape \(16,\); it must return a "
     r"dict of per-example metrics"),
    (lambda o, b: {"mae": jnp.mean(jnp.abs(o))}, ValueError,
     r"metrics_fn\(outputs, batch\)\['mae'\] returned shape \(\).*\(16,\)"),
    (lambda o, b: {"loss": jnp.abs(o[:, 0])}, ValueError,
     r"returned the metric name 'loss', which the step reports itself"),
    (lambda o, b: {1: jnp.abs(o[:, 0])}, TypeError,
     r"returned a mapping with the keys \[1\].*with string names"),
])
def test_metrics_that_are_not_per_example_are_refused_by_name(metrics_fn, error, match):
    state, batch = _state_and_batch()
    with pytest.raises(error, match=match):
        step_lib.make_train_step(loss_fn=mse, metrics_fn=metrics_fn)(state, batch)


def test_eval_refuses_its_own_names_and_the_shape_is_per_device_under_shard_map():
    state, batch = _state_and_batch()
    ev = step_lib.make_eval_step(loss_fn=mse, metrics_fn=lambda o, b: {"count": o[:, 0]})
    with pytest.raises(ValueError, match=r"metric name 'count'.*'loss_sum', 'count'"):
        ev(state, batch)
    step = step_lib.make_train_step(loss_fn=lambda o, b: jnp.mean(mse(o, b)),
                                    **step_kwargs("shard_map"))
    with pytest.raises(ValueError, match=re.escape("shape (2,) for the 2 examples it was")):
        step(place("shard_map", make_state("shard_map")), prep("shard_map", batch))


@pytest.mark.parametrize("make", [step_lib.make_train_step, step_lib.make_eval_step])
@pytest.mark.parametrize("arg", ["loss_fn", "metrics_fn"])
def test_a_loss_or_metrics_that_is_not_callable_is_refused_by_name(make, arg):
    with pytest.raises(TypeError, match=rf"{arg}='mse' must be callable, \(outputs, batch\)"):
        make(**{arg: "mse"})
