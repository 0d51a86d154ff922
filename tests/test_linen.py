"""bnjax.BatchNorm (flax.linen) against flax.linen.BatchNorm, Keras 3 and NumPy references."""

import functools
import os
import warnings

os.environ.setdefault("KERAS_BACKEND", "jax")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

import bnjax  # noqa: E402
import bnjax.nnx as bnnx  # noqa: E402


class ConvNet(nn.Module):
    """A small conv model whose norm layer class is swappable; mode passed Flax-style."""

    norm: type
    kw: tuple = ()  # constructor arguments of the norm layer

    @nn.compact
    def __call__(self, x, train: bool):
        norm = lambda: self.norm(**dict(self.kw))  # noqa: E731
        x = nn.Conv(8, (3, 3), use_bias=False)(x)
        x = norm()(x, use_running_average=not train)
        x = nn.relu(x)
        x = nn.Conv(6, (3, 3), strides=2)(x)
        x = norm()(x, use_running_average=not train)
        x = nn.Dense(5)(nn.relu(x).mean((1, 2)))
        return norm()(x, use_running_average=not train)


def test_swap_with_flax_batchnorm_keeps_variables_and_outputs():
    x = jax.random.normal(jax.random.key(1), (6, 10, 10, 3)) * 2 + 1
    # Flax's layer with Keras's hyper-parameters against bnjax's defaults
    flax_model = ConvNet(nn.BatchNorm, (("momentum", 0.99), ("epsilon", 1e-3)))
    bnjax_model = ConvNet(bnjax.BatchNorm)
    v_flax = flax_model.init(jax.random.key(0), x, False)
    v_ours = bnjax_model.init(jax.random.key(0), x, False)
    assert jax.tree.structure(v_flax) == jax.tree.structure(v_ours)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), v_flax) == jax.tree.map(
        lambda a: (a.shape, a.dtype), v_ours)
    for a, b in zip(jax.tree.leaves(v_flax), jax.tree.leaves(v_ours), strict=True):
        np.testing.assert_array_equal(a, b)

    variables = v_flax
    for step in range(3):
        xs = x + step
        y_f, up_f = flax_model.apply(variables, xs, True, mutable=["batch_stats"])
        y_o, up_o = bnjax_model.apply(variables, xs, True, mutable=["batch_stats"])
        np.testing.assert_allclose(y_o, y_f, rtol=1e-5, atol=1e-5)
        for a, b in zip(jax.tree.leaves(up_o), jax.tree.leaves(up_f), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        variables = {**variables, **up_f}
    np.testing.assert_allclose(bnjax_model.apply(variables, x, False),
                               flax_model.apply(variables, x, False), rtol=1e-5, atol=1e-5)


def test_matches_keras3_batchnormalization_over_several_steps():
    import keras

    rng = np.random.default_rng(0)
    gamma = rng.uniform(0.5, 2, 4).astype(np.float32)
    beta = rng.normal(size=4).astype(np.float32)
    k = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3)
    k.build((None, 5, 4))
    k.set_weights([gamma, beta, np.zeros(4, np.float32), np.ones(4, np.float32)])
    bn = bnjax.BatchNorm(momentum=0.9)
    variables = {"params": {"scale": gamma, "bias": beta},
                 "batch_stats": {"mean": jnp.zeros(4), "var": jnp.ones(4)}}
    for _ in range(4):
        x = (rng.normal(size=(16, 5, 4)) * 3 + 2).astype(np.float32)
        y_k = np.asarray(k(x, training=True))
        y, up = bn.apply(variables, x, training=True, mutable=["batch_stats"])
        variables = {**variables, **up}
        np.testing.assert_allclose(y, y_k, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(up["batch_stats"]["mean"], k.moving_mean.numpy(), rtol=1e-5)
        np.testing.assert_allclose(up["batch_stats"]["var"], k.moving_variance.numpy(),
                                   rtol=1e-5)
    x = rng.normal(size=(3, 5, 4)).astype(np.float32)
    np.testing.assert_allclose(bn.apply(variables, x, training=False),
                               np.asarray(k(x, training=False)), rtol=1e-5, atol=1e-5)


def test_several_training_calls_match_numpy_reference():
    rng = np.random.default_rng(1)
    bn = bnjax.BatchNorm(axis=1, momentum=0.8, epsilon=1e-2)
    x0 = rng.normal(size=(4, 3, 5)).astype(np.float32)
    variables = bn.init(jax.random.key(0), x0, training=True)
    run_mean, run_var = np.zeros(3), np.ones(3)
    for _ in range(3):
        x = (rng.normal(size=(4, 3, 5)) * 2 - 1).astype(np.float32)
        mask = rng.random((4, 5)) < 0.7
        y, up = bn.apply(variables, x, training=True, mask=mask, mutable=["batch_stats"])
        variables = {**variables, **up}
        xt = np.moveaxis(x, 1, -1).astype(np.float64)[mask]
        mean, var = xt.mean(0), xt.var(0)
        run_mean = 0.8 * run_mean + 0.2 * mean
        run_var = 0.8 * run_var + 0.2 * var
        y_ref = (x - mean[None, :, None]) / np.sqrt(var[None, :, None] + 1e-2)
        np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(up["batch_stats"]["mean"], run_mean, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(up["batch_stats"]["var"], run_var, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Mode selection.

X = jnp.arange(24.0).reshape(8, 3)


def _epsilon_warnings(fn, action="always"):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter(action)
        fn()
    return [w for w in caught if issubclass(w.category, bnjax.FlaxEpsilonWarning)]


def test_flax_style_port_with_the_default_epsilon_warns_once_and_the_advice_holds():
    x = jnp.asarray(np.random.default_rng(4).normal(0, 0.01, (16, 3)), jnp.float32)
    key = jax.random.key(0)
    flax_v = nn.BatchNorm(momentum=0.9).init(key, x, use_running_average=True)
    flax_y, _ = nn.BatchNorm(momentum=0.9).apply(flax_v, x, False, mutable=["batch_stats"])

    def ported(**kw):  # the text nn.BatchNorm replaced by bnjax.BatchNorm
        return bnjax.BatchNorm(momentum=0.9, **kw).apply(flax_v, x, False,
                                                         mutable=["batch_stats"])[0]

    caught = _epsilon_warnings(lambda: (ported(), ported()), action="default")
    assert len(caught) == 1  # once, not per call
    assert "Pass epsilon=1e-5 to keep Flax's numbers" in str(caught[0].message)
    # The advice: the default changes Flax's numbers (0.01-scale input: var ~ 1e-4),
    # epsilon=1e-5 keeps them, against flax.linen.BatchNorm itself.
    assert float(jnp.abs(ported() - flax_y).max()) > 1.0
    np.testing.assert_allclose(ported(epsilon=1e-5), flax_y, rtol=1e-4, atol=1e-4)
    # Every Flax way of giving the mode warns: positional, keyword, the field.
    bn = bnjax.BatchNorm()
    v = bn.init(key, x, training=False)
    for call in (lambda: bn.apply(v, x, True), lambda: bn.apply(v, x, use_running_average=True),
                 lambda: bnjax.BatchNorm(use_running_average=True).apply(v, x)):
        assert len(_epsilon_warnings(call)) == 1
    # An epsilon given (Keras's too), the Keras-style call and a frozen layer do not.
    for call in (lambda: bnjax.BatchNorm(epsilon=1e-3).apply(v, x, True),
                 lambda: bnjax.BatchNorm(epsilon=1e-5).apply(v, x, True),
                 lambda: bn.apply(v, x, training=False),
                 lambda: bnjax.BatchNorm(frozen=True).apply(v, x, True)):
        assert _epsilon_warnings(call) == []



def _init(**kw):
    bn = bnjax.BatchNorm(**kw)
    return bn, bn.init(jax.random.key(0), X, use_running_average=True)


@pytest.mark.parametrize(
    "ctor,call,expect_train",
    [
        ({}, {"training": True}, True),
        ({}, {"training": False}, False),
        ({}, {"use_running_average": False}, True),
        ({}, {"use_running_average": True}, False),
        ({"use_running_average": True}, {}, False),
        ({"use_running_average": False}, {}, True),
        ({"use_running_average": True}, {"use_running_average": False}, True),
        ({"use_running_average": True}, {"training": False}, False),
    ],
)
def test_mode_from_training_or_use_running_average(ctor, call, expect_train):
    bn, variables = _init(**ctor)
    y, up = bn.apply(variables, X, mutable=["batch_stats"], **call)
    mean = np.asarray(X, np.float64).mean(0)
    changed = not np.allclose(up["batch_stats"]["mean"], 0.0)
    assert changed == expect_train
    if expect_train:
        np.testing.assert_allclose(up["batch_stats"]["mean"], 0.01 * mean, rtol=1e-5)
    else:
        np.testing.assert_allclose(y, X / np.sqrt(1 + 1e-3), rtol=1e-5)


def test_contradicting_mode_arguments_rejected():
    bn, variables = _init()
    with pytest.raises(ValueError) as info:
        bn.apply(variables, X, training=True, use_running_average=True, mutable=["batch_stats"])
    assert "contradict" in str(info.value) and "training=True" in str(info.value)
    bn2, _ = _init(use_running_average=True)
    with pytest.raises(ValueError, match="contradict"):
        bn2.apply(variables, X, training=True, mutable=["batch_stats"])


def test_missing_mode_rejected_with_advice():
    bn, variables = _init()
    with pytest.raises(ValueError) as info:
        bn.apply(variables, X)
    assert "training=True" in str(info.value) and "use_running_average" in str(info.value)


def test_training_without_mutable_batch_stats_gives_clear_error():
    bn, variables = _init()
    with pytest.raises(ValueError) as info:
        bn.apply(variables, X, training=True)
    assert "mutable=['batch_stats']" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Frozen layers, initialization, variables.


def test_frozen_layer_is_inference_and_never_updates():
    bn, variables = _init(frozen=True)
    variables = {**variables, "batch_stats": {"mean": jnp.array([1.0, 2.0, 3.0]),
                                              "var": jnp.array([4.0, 1.0, 0.25])}}
    y, up = bn.apply(variables, X, training=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(up["batch_stats"]["mean"], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(up["batch_stats"]["var"], [4.0, 1.0, 0.25])
    y_ref = (np.asarray(X) - [1.0, 2.0, 3.0]) / np.sqrt(np.array([4.0, 1.0, 0.25]) + 1e-3)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5)
    # no mode and no mutable collection needed for a frozen layer
    np.testing.assert_allclose(bn.apply(variables, X), y_ref, rtol=1e-5)


@functools.cache
def _keras_frozen_training(keras, steps=3, lr=0.05):
    """Dense -> BatchNormalization(trainable=False) -> Dense after ``steps`` Keras SGD steps.

    Returns the initial weights, the batch and the weights after training, by layer name.
    """
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(16, 5)) * 2 + 1).astype(np.float32)
    t = rng.normal(size=(16, 2)).astype(np.float32)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, name="d0"),
                              keras.layers.BatchNormalization(momentum=0.9, name="bn"),
                              keras.layers.Dense(2, name="d1")])
    bn = model.get_layer("bn")
    bn.set_weights([rng.uniform(0.5, 2, 4), rng.normal(size=4), rng.normal(size=4),
                    rng.uniform(0.5, 2, 4)])
    bn.trainable = False  # Keras: inference mode, and no gradients for gamma and beta
    names = ("d0", "bn", "d1")
    before = {n: [np.array(w) for w in model.get_layer(n).get_weights()] for n in names}
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    for _ in range(steps):
        model.train_on_batch(x, t)
    after = {n: [np.array(w) for w in model.get_layer(n).get_weights()] for n in names}
    return before, x, t, after


class _FrozenNet(nn.Module):
    @nn.compact
    def __call__(self, x, training):
        x = nn.Dense(4, name="d0")(x)
        x = bnjax.BatchNorm(momentum=0.9, frozen=True, name="bn")(x, training=training)
        return nn.Dense(2, name="d1")(x)


class _FrozenNnxNet(nnx.Module):
    def __init__(self, before):
        rngs = nnx.Rngs(0)
        self.d0, self.d1 = nnx.Linear(5, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)
        for layer, (kernel, bias) in ((self.d0, before["d0"]), (self.d1, before["d1"])):
            layer.kernel[...], layer.bias[...] = jnp.asarray(kernel), jnp.asarray(bias)
        self.bn = bnnx.BatchNorm(4, momentum=0.9, frozen=True)
        gamma, beta, mean, var = (jnp.asarray(w, jnp.float32) for w in before["bn"])
        self.bn.scale[...], self.bn.bias[...] = gamma, beta
        self.bn.mean[...], self.bn.var[...] = mean, var

    def __call__(self, x):
        return self.d1(self.bn(self.d0(x)))


def _train_frozen_linen(before, x, t, steps, lr):
    (k0, b0), (gamma, beta, mean, var), (k1, b1) = before["d0"], before["bn"], before["d1"]
    variables = {"params": {"d0": {"kernel": k0, "bias": b0},
                            "bn": {"scale": gamma, "bias": beta},
                            "d1": {"kernel": k1, "bias": b1}},
                 "batch_stats": {"bn": {"mean": mean, "var": var}}}
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), variables)
    params, tx = variables["params"], optax.sgd(lr)
    opt_state = tx.init(params)
    loss = lambda p: jnp.mean((_FrozenNet().apply(  # noqa: E731
        {**variables, "params": p}, x, training=True) - t) ** 2)
    for _ in range(steps):
        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state)
        params = optax.apply_updates(params, updates)
    stats = variables["batch_stats"]["bn"]
    return {"d0": [params["d0"]["kernel"], params["d0"]["bias"]],
            "bn": [params["bn"]["scale"], params["bn"]["bias"], stats["mean"], stats["var"]],
            "d1": [params["d1"]["kernel"], params["d1"]["bias"]]}


def _train_frozen_nnx(before, x, t, steps, lr):
    model = _FrozenNnxNet(before)
    model.train()
    optimizer = nnx.Optimizer(model, optax.sgd(lr), wrt=nnx.Param)
    loss = lambda m: jnp.mean((m(x) - t) ** 2)  # noqa: E731
    for _ in range(steps):
        optimizer.update(model, nnx.grad(loss)(model))
    return {"d0": [model.d0.kernel[...], model.d0.bias[...]],
            "bn": [model.bn.scale[...], model.bn.bias[...], model.bn.mean[...],
                   model.bn.var[...]],
            "d1": [model.d1.kernel[...], model.d1.bias[...]]}


@pytest.mark.parametrize("train", [_train_frozen_linen, _train_frozen_nnx],
                         ids=["linen", "nnx"])
def test_frozen_layer_trains_like_keras_trainable_false(keras, train):
    # Keras's trainable=False: inference mode, and gamma and beta are not trained. After the
    # same SGD steps every weight, the frozen layer's included, is Keras's.
    before, x, t, after = _keras_frozen_training(keras)
    ours = train(before, x, t, steps=3, lr=0.05)
    for name in ("d0", "bn", "d1"):
        for a, b in zip(ours[name], after[name], strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=name)
    for a, b in zip(after["bn"], before["bn"], strict=True):
        np.testing.assert_array_equal(a, b)  # Keras left the frozen layer as it was
    assert not np.allclose(after["d0"][0], before["d0"][0])  # and trained the others


def test_init_runs_outside_pmap_with_axis_name_and_does_not_update():
    bn = bnjax.BatchNorm(axis_name="batch", mean_init=nn.initializers.constant(0.5),
                         var_init=nn.initializers.constant(2.0))
    variables = bn.init(jax.random.key(0), X, training=True)
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], 0.5)
    np.testing.assert_array_equal(variables["batch_stats"]["var"], 2.0)


def test_initializers_and_switches():
    bn = bnjax.BatchNorm(scale_init=nn.initializers.constant(3.0),
                         bias_init=nn.initializers.constant(-1.0))
    v = bn.init(jax.random.key(0), X, training=False)
    np.testing.assert_array_equal(v["params"]["scale"], 3.0)
    np.testing.assert_array_equal(v["params"]["bias"], -1.0)
    v2 = bnjax.BatchNorm(use_bias=False, use_scale=False).init(jax.random.key(0), X,
                                                              training=False)
    assert "params" not in v2
    y, _ = bnjax.BatchNorm(use_bias=False, use_scale=False).apply(
        v2, X, training=True, mutable=["batch_stats"])
    xr = np.asarray(X, np.float64)
    np.testing.assert_allclose(y, (xr - xr.mean(0)) / np.sqrt(xr.var(0) + 1e-3), rtol=1e-5)


def test_feature_size_mismatch_with_existing_statistics():
    bn, variables = _init()
    with pytest.raises(ValueError) as info:
        bn.apply(variables, jnp.ones((8, 4)), training=False)
    msg = str(info.value)
    assert "batch_stats['mean'] has shape (3,)" in msg and "feature shape (4,)" in msg


def test_half_precision_input_keeps_dtype_and_float32_variables():
    x = (jax.random.normal(jax.random.key(0), (16, 4)) * 3 + 7).astype(jnp.bfloat16)
    bn = bnjax.BatchNorm()
    v = bn.init(jax.random.key(0), x, training=False)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(v))
    y, up = bn.apply(v, x, training=True, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16 and up["batch_stats"]["var"].dtype == jnp.float32
    y32 = bnjax.BatchNorm(dtype=jnp.float32).apply(v, x, training=True, mutable=["batch_stats"])[0]
    assert y32.dtype == jnp.float32


@pytest.mark.parametrize(
    "kw,words",
    [
        ({"momentum": 2.0}, ["momentum=2.0", "[0, 1]"]),
        ({"epsilon": 0}, ["epsilon=0", "> 0"]),
        ({"axis": 5}, ["axis=5", "out of range"]),
    ],
)
def test_bad_constructor_arguments(kw, words):
    with pytest.raises(ValueError) as info:
        bnjax.BatchNorm(**kw).init(jax.random.key(0), X, training=False)
    for w in words:
        assert w in str(info.value)


def test_integer_input_rejected_by_module():
    with pytest.raises(TypeError, match="floating-point"):
        bnjax.BatchNorm().init(jax.random.key(0), jnp.ones((4, 3), jnp.int32), training=False)


def test_single_value_per_channel_in_training_warns_and_matches_flax():
    bn, variables = _init(epsilon=1e-5)
    x = jnp.asarray([[0.5, -2.0, 7.0]])
    with pytest.warns(bnjax.SingleValueWarning, match="single value per feature channel"):
        y, up = bn.apply(variables, x, training=True, mutable=["batch_stats"])
    y_f, up_f = nn.BatchNorm(momentum=0.99, epsilon=1e-5).apply(
        variables, x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(y, y_f, atol=1e-6)
    np.testing.assert_allclose(y, np.broadcast_to(variables["params"]["bias"], (1, 3)),
                               atol=1e-6)
    for key in ("mean", "var"):
        np.testing.assert_allclose(up["batch_stats"][key], up_f["batch_stats"][key], rtol=1e-6)


def test_bind_of_a_stateful_layer_on_a_rank_one_input_matches_flax():
    # Flax's ModuleTest.test_bind_stateful: bind, then train on a (3,) input.
    x = jnp.asarray([1.0, -2.0, 0.5])
    kw = dict(use_running_average=False, epsilon=1e-5)
    variables = nn.BatchNorm(**kw).init(jax.random.key(0), x)
    out = {}
    for name, layer in (("flax", nn.BatchNorm(**kw)), ("bnjax", bnjax.BatchNorm(**kw))):
        bound = layer.bind(variables, mutable=["batch_stats"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", bnjax.SingleValueWarning)
            out[name] = bound(x), bound.variables["batch_stats"]
    np.testing.assert_allclose(out["bnjax"][0], out["flax"][0], atol=1e-6)
    for key in ("mean", "var"):
        np.testing.assert_allclose(out["bnjax"][1][key], out["flax"][1][key], rtol=1e-6)


def test_non_finite_batch_does_not_poison_module_statistics():
    bn, variables = _init()
    x = np.asarray(X).copy()
    x[0, 2] = np.nan
    _, up = bn.apply(variables, x, training=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(up["batch_stats"]["mean"][2], 0.0)
    np.testing.assert_array_equal(up["batch_stats"]["var"][2], 1.0)
    assert np.all(np.isfinite(np.asarray(up["batch_stats"]["mean"])))
