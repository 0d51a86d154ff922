"""A layer frozen mid-training stays still under any optimizer, as Keras's trainable=False.

Zero gradients alone do not keep a parameter still: momentum, Adam's moments and decoupled
weight decay move it. The fine-tuning pattern: 3 steps with the batch norm training, then the
model rebuilt with ``frozen=True`` while the state (params, optimizer state) carries on for 3
more steps. Keras 3 (``trainable=False`` after 3 steps, the same optimizer; on the JAX backend
a fresh one after the recompile) runs beside: both leave gamma and beta unchanged to the bit,
and the 3 training steps are Keras's.
"""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

import bnjax
from bnjax import steps as step_lib

STEPS = 3


class Net(nn.Module):
    frozen: bool = False

    @nn.compact
    def __call__(self, x, training):
        x = nn.Dense(4, use_bias=False, name="d0")(x)  # a bias before BN gets noise only
        x = bnjax.BatchNorm(momentum=0.9, frozen=self.frozen, name="bn")(x, training=training)
        return nn.Dense(3, name="d1")(nn.relu(x))


def data():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(16, 5)) * 2 + 1).astype(np.float32)
    return x, (np.arange(16) % 3).astype(np.int32)


def initial():
    x, _ = data()
    return Net().init(jax.random.key(1), x, training=False)


def bits(tree):
    """Every leaf's raw bytes: equality to the bit, signed zeros and NaN payloads included."""
    return [np.asarray(a).tobytes() for a in jax.tree.leaves(tree)]


OPTIMIZERS = {
    "adam": (lambda: optax.adam(1e-2, eps=1e-12),
             lambda k: k.optimizers.Adam(1e-2, epsilon=1e-12)),
    "sgd_momentum": (lambda: optax.sgd(0.1, momentum=0.9),
                     lambda k: k.optimizers.SGD(0.1, momentum=0.9)),
}


def run_bnjax(tx):
    """3 steps training, 3 frozen; params after 3 and after 6, and the optimizer states."""
    v = initial()
    state = step_lib.TrainState.create(apply_fn=Net().apply, params=v["params"],
                                       batch_stats=v["batch_stats"], tx=tx)
    step = step_lib.make_train_step()
    x, y = data()
    for _ in range(STEPS):
        state, m = step(state, {"x": x, "y": y})
        assert float(m["skipped"]) == 0.0
    mid = state
    state = state.replace(apply_fn=Net(frozen=True).apply)  # rebuilt, the state carries on
    for _ in range(STEPS):
        state, _ = step(state, {"x": x, "y": y})
    return v, mid, state


def run_keras(keras, make_opt):
    v = initial()
    x, y = data()
    model = keras.Sequential([
        keras.Input((5,)), keras.layers.Dense(4, use_bias=False, name="d0"),
        keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3, name="bn"),
        keras.layers.ReLU(), keras.layers.Dense(3, name="d1")])
    p, s = v["params"], v["batch_stats"]
    model.get_layer("d0").set_weights([p["d0"]["kernel"]])
    model.get_layer("bn").set_weights([p["bn"]["scale"], p["bn"]["bias"], s["bn"]["mean"],
                                       s["bn"]["var"]])
    model.get_layer("d1").set_weights([p["d1"]["kernel"], p["d1"]["bias"]])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=make_opt(keras), loss=loss)
    for _ in range(STEPS):
        model.train_on_batch(x, y)
    weights = {n: [np.array(w) for w in model.get_layer(n).get_weights()]
               for n in ("d0", "bn", "d1")}
    model.get_layer("bn").trainable = False
    # Keras needs a compile after a trainable change; on the JAX backend the optimizer is
    # bound to the variables it was built with, so the frozen phase gets a fresh one.
    model.compile(optimizer=make_opt(keras), loss=loss)
    for _ in range(STEPS):
        model.train_on_batch(x, y)
    after = {n: [np.array(w) for w in model.get_layer(n).get_weights()]
             for n in ("d0", "bn", "d1")}
    return weights, after


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_frozen_mid_training_is_bit_identical_in_make_train_step_as_in_keras(keras, name):
    make_tx, make_keras_opt = OPTIMIZERS[name]
    v, mid, end = run_bnjax(make_tx())
    k_mid, k_end = run_keras(keras, make_keras_opt)
    # Keras: gamma and beta bit-identical once trainable=False, and moved before.
    assert bits(k_end["bn"][:2]) == bits(k_mid["bn"][:2])
    assert not np.allclose(k_mid["bn"][0], np.asarray(v["params"]["bn"]["scale"]))
    # bnjax beside it: the same.
    assert bits(end.params["bn"]) == bits(mid.params["bn"])
    assert not np.allclose(mid.params["bn"]["scale"], v["params"]["bn"]["scale"])
    # The 3 training steps are Keras's, every weight; frozen, the moving statistics stay.
    ours = {"d0": [mid.params["d0"]["kernel"]],
            "bn": [mid.params["bn"]["scale"], mid.params["bn"]["bias"],
                   mid.batch_stats["bn"]["mean"], mid.batch_stats["bn"]["var"]],
            "d1": [mid.params["d1"]["kernel"], mid.params["d1"]["bias"]]}
    for layer in ("d0", "bn", "d1"):
        for a, b in zip(ours[layer], k_mid[layer], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=layer)
    assert bits(k_end["bn"][2:]) == bits(k_mid["bn"][2:])
    assert bits(end.batch_stats["bn"]) == bits(mid.batch_stats["bn"])
    assert not np.allclose(end.params["d0"]["kernel"], mid.params["d0"]["kernel"])
    assert not np.allclose(k_end["d0"][0], k_mid["d0"][0])  # the other layers train on


def opt_entries(opt_state, layer="bn"):
    """The optimizer state's leaves that belong to ``layer``'s params."""
    flat = jax.tree_util.tree_flatten_with_path(opt_state)[0]
    return [leaf for path, leaf in flat if layer in jax.tree_util.keystr(path)]


@pytest.mark.parametrize("make_tx", [
    lambda: optax.adam(1e-2), lambda: optax.sgd(0.1, momentum=0.9),
    lambda: optax.adamw(1e-2, weight_decay=0.5), lambda: optax.lion(1e-3),
    lambda: optax.chain(optax.clip_by_global_norm(0.1), optax.adam(1e-2)),
    lambda: optax.inject_hyperparams(optax.rmsprop)(learning_rate=1e-2, momentum=0.9),
], ids=["adam", "sgd_momentum", "adamw", "lion", "clip_adam", "inject_rmsprop"])
def test_make_train_step_holds_params_and_their_optimizer_state(make_tx):
    tx = make_tx()
    _, mid, end = run_bnjax(tx)
    assert bits(end.params["bn"]) == bits(mid.params["bn"])
    entries = opt_entries(mid.opt_state)
    assert entries and bits(opt_entries(end.opt_state)) == bits(entries)  # slots left alone
    # The other layers take the steps the plain optimizer gives them (optax alone, the frozen
    # layer put back after each step; these optimizers act on each leaf alone).
    x, y = data()
    frozen = Net(frozen=True)
    params, opt_state = mid.params, mid.opt_state
    for _ in range(STEPS):
        def loss(p):
            logits = frozen.apply({"params": p, "batch_stats": mid.batch_stats}, x,
                                  training=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
        params = {**optax.apply_updates(params, updates), "bn": mid.params["bn"]}
    for layer in ("d0", "d1"):
        for a, b in zip(jax.tree.leaves(end.params[layer]), jax.tree.leaves(params[layer]),
                        strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_inside_multi_transform_the_params_are_held_though_the_state_cannot_be():
    """optax.multi_transform's state does not mirror the params: params held all the same."""
    params = initial()["params"]
    labels = {k: jax.tree.map(lambda _, lab=lab: lab, params[k])
              for k, lab in (("d0", "a"), ("bn", "a"), ("d1", "b"))}
    tx = optax.multi_transform({"a": optax.adam(1e-2), "b": optax.sgd(0.1, momentum=0.9)},
                               labels)
    _, mid, end = run_bnjax(tx)
    assert bits(end.params["bn"]) == bits(mid.params["bn"])


def test_trainable_mask_marks_the_frozen_layers_params():
    x, _ = data()
    mask = bnjax.trainable_mask(Net(frozen=True), x, training=False)
    assert mask == {"d0": {"kernel": True}, "bn": {"scale": False, "bias": False},
                    "d1": {"kernel": True, "bias": True}}
    assert all(jax.tree.leaves(bnjax.trainable_mask(Net(), x, training=False)))


@pytest.mark.parametrize("make_tx", [
    lambda: optax.adamw(1e-2, weight_decay=0.5), lambda: optax.sgd(0.1, momentum=0.9)],
    ids=["adamw", "sgd_momentum"])
def test_keep_frozen_holds_a_users_own_loop_carrying_on_its_state(make_tx):
    """A hand-written loop: the optimizer wrapped once frozen, its opt_state carried on."""
    x, y = data()
    v = initial()
    tx = make_tx()
    params, opt_state = v["params"], tx.init(v["params"])

    def train(model, tx, params, opt_state, stats, put_back=None):
        def loss(p):
            logits, new = model.apply({"params": p, "batch_stats": stats}, x, training=True,
                                      mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new

        for _ in range(STEPS):
            grads, new = jax.grad(loss, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            params, stats = optax.apply_updates(params, updates), new["batch_stats"]
            if put_back is not None:
                params = {**params, "bn": put_back}
        return params, opt_state, stats

    params, opt_state, stats = train(Net(), tx, params, opt_state, v["batch_stats"])
    held = bnjax.keep_frozen(tx, bnjax.trainable_mask(Net(frozen=True), x, training=False))
    end, end_state, _ = train(Net(frozen=True), held, params, opt_state, stats)
    assert bits(end["bn"]) == bits(params["bn"])
    assert bits(opt_entries(end_state)) == bits(opt_entries(opt_state))
    moved, _, _ = train(Net(frozen=True), tx, params, opt_state, stats)  # optax alone
    assert not np.allclose(moved["bn"]["scale"], params["bn"]["scale"])  # what it prevents
    # The other layers: the plain optimizer's steps, the frozen layer put back after each.
    ref, _, _ = train(Net(frozen=True), tx, params, opt_state, stats, put_back=params["bn"])
    for a, b in zip(jax.tree.leaves({k: end[k] for k in ("d0", "d1")}),
                    jax.tree.leaves({k: ref[k] for k in ("d0", "d1")}), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_keep_frozen_refuses_what_is_not_an_optimizer_and_a_mask_of_other_params():
    with pytest.raises(TypeError, match=r"tx=3 is not an optax.GradientTransformation"):
        bnjax.keep_frozen(3, {})
    p = {"w": np.ones(2, np.float32), "b": np.ones(2, np.float32)}
    tx = bnjax.keep_frozen(optax.sgd(0.1), {"w": True})
    with pytest.raises(ValueError, match=r"trainable has the tree structure .* one bool per "
                                         r"parameter"):
        tx.update(p, tx.init(p), p)


def test_nnx_optimizer_filter_leaves_a_frozen_layer_alone():
    """NNX: the optimizer built on the params outside the frozen layers (docs/layer.md)."""
    from flax import nnx

    import bnjax.nnx as bnnx

    class NnxNet(nnx.Module):
        def __init__(self):
            rngs = nnx.Rngs(0)
            self.d0, self.d1 = nnx.Linear(5, 4, rngs=rngs), nnx.Linear(4, 3, rngs=rngs)
            self.bn = bnnx.BatchNorm(4, momentum=0.9, rngs=rngs)

        def __call__(self, x):
            return self.d1(nnx.relu(self.bn(self.d0(x))))

    x, y = data()
    model = NnxNet()
    model.train()

    def loss(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    def steps(optimizer):
        for _ in range(STEPS):
            optimizer.update(model, nnx.grad(loss, argnums=nnx.DiffState(0, optimizer.wrt))(
                model))

    steps(nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param))
    model.bn.frozen = True
    frozen = [p for p, m in nnx.iter_modules(model) if isinstance(m, bnnx.BatchNorm) and m.frozen]
    wrt = nnx.All(nnx.Param, lambda path, _: not any(path[:len(f)] == f for f in frozen))
    before = bits((model.bn.scale[...], model.bn.bias[...]))
    kernel = np.asarray(model.d0.kernel[...])
    steps(nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=0.5), wrt=wrt))
    assert bits((model.bn.scale[...], model.bn.bias[...])) == before
    assert not np.allclose(model.d0.kernel[...], kernel)


def test_on_a_mesh_the_frozen_layer_is_held_on_every_device():
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    v = initial()
    state = step_lib.TrainState.create(apply_fn=Net(frozen=True).apply, params=v["params"],
                                       batch_stats=v["batch_stats"],
                                       tx=optax.adamw(1e-2, weight_decay=0.5))  # decays all
    state = bnjax.put_replicated(state, mesh)
    step = step_lib.make_train_step(mesh=mesh)
    x, y = data()
    for _ in range(STEPS):
        state, _ = step(state, bnjax.put_batch({"x": x, "y": y}, mesh))
    got = bnjax.fetch_replicated(state.params)
    assert bits(got["bn"]) == bits(v["params"]["bn"])
    assert not np.allclose(got["d1"]["kernel"], v["params"]["d1"]["kernel"])
