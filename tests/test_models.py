"""Model zoo: shapes, layer structure, parameter counts, norm switch, references in NumPy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax_train import models


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _np_bn_train(z, scale, bias, eps=1e-3):
    mean = z.mean(0)
    var = ((z - mean) ** 2).mean(0)  # biased
    return scale * (z - mean) / np.sqrt(var + eps) + bias, mean, var


def _shapes(tree):
    return jax.tree.map(lambda a: tuple(a.shape), tree)


def _count(tree):
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


INPUTS = {
    "cnn1d": (4, 40),
    "mlp": (4, 28, 28, 1),
    "kmnist_cnn": (4, 28, 28, 1),
    "resnet20": (4, 32, 32, 3),
}


@pytest.mark.parametrize("name", sorted(INPUTS))
@pytest.mark.parametrize("norm", ["batch", "none"])
def test_shapes_and_norm_switch(name, norm):
    model = models.create_model(name, num_classes=7, norm=norm)
    x = jax.ShapeDtypeStruct(INPUTS[name], jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, training=False), x)
    out = jax.eval_shape(
        lambda v, x: model.apply(v, x, training=True, mutable=["batch_stats"]), variables, x)
    assert out[0].shape == (INPUTS[name][0], 7)
    if norm == "none":
        assert "batch_stats" not in variables
    else:
        assert jax.tree.leaves(variables["batch_stats"])


def test_resnet20_parameter_count_and_zero_init():
    # He et al.'s CIFAR ResNet-20 with identity (zero-padded) shortcuts, counted by hand:
    convs = 3 * 3 * 3 * 16 + 6 * 3 * 3 * 16 * 16                    # stem, stage 1
    convs += 3 * 3 * 16 * 32 + 5 * 3 * 3 * 32 * 32                  # stage 2
    convs += 3 * 3 * 32 * 64 + 5 * 3 * 3 * 64 * 64                  # stage 3
    bn = 2 * (16 + 6 * 16 + 6 * 32 + 6 * 64)                         # scale and bias
    dense = 64 * 10 + 10
    model = models.create_model("resnet20", num_classes=10)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)), training=False))
    assert _count(variables["params"]) == convs + bn + dense == 269_722
    blocks = [k for k in variables["params"] if k.startswith("_ResidualBlock")]
    assert len(blocks) == 9
    # The last BN of a block starts with a zero scale, so every block starts as
    # relu(x + shortcut): a stride-1 block is the identity on its (non-negative) input.
    x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 16))
    block = models._ResidualBlock(16, 1, "batch", None)
    v = jax.jit(lambda x: block.init(jax.random.key(2), x, training=False))(x)
    np.testing.assert_array_equal(v["params"]["BatchNorm_1"]["scale"], 0.0)
    np.testing.assert_array_equal(v["params"]["BatchNorm_0"]["scale"], 1.0)
    y, _ = jax.jit(lambda v, x: block.apply(v, x, training=True, mutable=["batch_stats"]))(v, x)
    np.testing.assert_allclose(y, x, rtol=1e-6)


def test_kmnist_cnn_layer_sequence():
    model = models.create_model("kmnist_cnn", num_classes=10)
    v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)),
                                          training=False))
    p = _shapes(v["params"])
    assert p["Conv_0"]["kernel"] == (3, 3, 1, 32)
    assert p["Conv_1"]["kernel"] == (3, 3, 32, 64)
    assert p["Dense_0"]["kernel"] == (7 * 7 * 64, 256)
    assert p["Dense_1"]["kernel"] == (256, 10)
    # Conv32-BN-Pool-BN-Conv64-BN-Pool-BN-Dense256-BN-Dense10: five BN layers, in that order.
    sizes = [p[f"BatchNorm_{i}"]["scale"][0] for i in range(5)]
    assert sizes == [32, 32, 64, 64, 256]
    assert "BatchNorm_5" not in p


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_mlp_matches_numpy_reference(norm):
    model = models.create_model("mlp", num_classes=10, norm=norm)
    x = np.random.default_rng(0).normal(size=(16, 8, 8)).astype(np.float32)
    v = jax.jit(lambda x: model.init(jax.random.key(0), x, training=False))(x)
    out, _ = jax.jit(lambda v, x: model.apply(v, x, training=True, mutable=["batch_stats"]))(v, x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
    h = x.reshape(16, -1).astype(np.float64)
    for i in range(3):
        assert p[f"Dense_{i}"]["kernel"].shape[1] == 100
        z = h @ p[f"Dense_{i}"]["kernel"]
        if norm == "none":
            z = z + p[f"Dense_{i}"]["bias"]
        else:
            assert "bias" not in p[f"Dense_{i}"]  # BN's offset replaces it
            bn = p[f"BatchNorm_{i}"]
            z, _, _ = _np_bn_train(z, bn["scale"], bn["bias"])
        h = _sigmoid(z)
    ref = h @ p["Dense_3"]["kernel"] + p["Dense_3"]["bias"]
    np.testing.assert_allclose(out, ref, rtol=2e-4, atol=2e-5)


def test_cnn1d_accepts_2d_and_3d_inputs():
    model = models.create_model("cnn1d", num_classes=10, features=(4, 4), hidden=8)
    x = np.random.default_rng(0).normal(size=(3, 40)).astype(np.float32)
    v = jax.jit(lambda x: model.init(jax.random.key(0), x, training=False))(x)
    apply = jax.jit(lambda v, x: model.apply(v, x, training=False))
    np.testing.assert_allclose(apply(v, x), apply(v, x[..., None]), rtol=1e-6)


def test_cnn1d_sync_bn_under_pmap_sees_the_global_batch():
    n = jax.local_device_count()
    assert n == 8
    model_sync = models.create_model("cnn1d", num_classes=10, features=(4,), pool_after=(),
                                     hidden=0, axis_name="batch")
    model_one = models.create_model("cnn1d", num_classes=10, features=(4,), pool_after=(),
                                    hidden=0)
    x = np.random.default_rng(0).normal(size=(n * 2, 12)).astype(np.float32)
    v = jax.jit(lambda x: model_one.init(jax.random.key(0), x, training=False))(x)
    _, upd_one = jax.jit(lambda v, x: model_one.apply(v, x, training=True,
                                                      mutable=["batch_stats"]))(v, x)
    rep = jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), v)
    _, upd = jax.pmap(lambda v, x: model_sync.apply(v, x, training=True,
                                                    mutable=["batch_stats"]),
                      axis_name="batch")(rep, x.reshape(n, 2, 12))
    for a, b in zip(jax.tree.leaves(upd_one), jax.tree.leaves(upd), strict=True):
        for d in range(n):
            np.testing.assert_allclose(b[d], a, rtol=1e-5, atol=1e-6)


def test_make_norm():
    assert isinstance(models.make_norm("batch", momentum=0.9), bnjax.BatchNorm)
    assert models.make_norm("batch", axis_name="batch").axis_name == "batch"
    ident = models.make_norm("none", scale_init=nn.initializers.zeros)
    assert isinstance(ident, models.Identity)
    assert ident.apply({}, jnp.arange(3.0), training=True).tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="norm='bogus'.*accepted"):
        models.make_norm("bogus")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"name": "vgg", "num_classes": 10}, ValueError, "model='vgg'.*accepted"),
        ({"name": "mlp", "num_classes": 10, "norm": "bogus"}, ValueError, "norm='bogus'"),
        ({"name": "mlp", "num_classes": 1}, ValueError, "num_classes=1"),
        ({"name": "mlp", "num_classes": 10, "widht": 3}, TypeError, "widht"),
    ],
)
def test_create_model_errors(kwargs, error, match):
    name = kwargs.pop("name")
    with pytest.raises(error, match=match):
        models.create_model(name, **kwargs)
