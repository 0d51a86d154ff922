"""Flax models we did not write run on bnjax unedited (``bnjax.swap``).

The proof: the Flax examples' ImageNet ResNet (linen) and MNIST CNN (NNX), vendored in
tests/fixtures/ as published, train three SGD steps under the swap exactly as their text port
(``nn.BatchNorm`` -> ``bnjax.BatchNorm``) does, and as Flax's own layer does up to rounding.
The options are checked against float64 NumPy and against Flax.
"""

import contextlib
import functools
import importlib.util
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bnjax
import bnjax.nnx

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SAME = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7)
CLOSE = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5)


def _import(name):
    """The fixture file imported as it is."""
    spec = importlib.util.spec_from_file_location(f"fixture_{name}", FIXTURES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _port(name, old, new):
    """The fixture's text with ``old`` replaced by ``new``: the hand port of the model."""
    source = (FIXTURES / f"{name}.py").read_text()
    assert old in source
    scope = {"__name__": f"port_{name}", "bnjax": bnjax}
    exec(compile(source.replace(old, new), f"port_{name}", "exec"), scope)  # noqa: S102
    return scope


def _tree_check(check, a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(check, a, b)


# ---------------------------------------------------------------------------------------------
# Linen: examples/imagenet/models.py, its smallest stage config, on 16x16 images. Its batch
# norms synchronize over axis_name='batch': 2 replicas of 3 examples under jax.vmap, gradients
# averaged with pmean, as the example's pmap train step does.


def _train_linen(model, swap, steps=3):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 3, 16, 16, 3)) * 2 + 1, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, size=(2, 3)))
    tx = optax.sgd(0.1, momentum=0.9)

    def loss_fn(params, stats, x, y):
        logits, upd = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                  mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, upd["batch_stats"]

    @jax.jit
    def step(params, stats, opt):
        def replica(x, y):
            (_, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y)
            return jax.lax.pmean(grads, "batch"), new

        grads, new = jax.vmap(replica, axis_name="batch")(x, labels)
        grads, new = jax.tree.map(lambda a: a[0], (grads, new))  # the same on every replica
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), new, opt, grads

    with swap as report:
        variables = model.init(jax.random.key(0), x[0], train=False)
        params, stats = variables["params"], variables["batch_stats"]
        opt, grads = tx.init(params), []
        for _ in range(steps):
            params, stats, opt, g = step(params, stats, opt)
            grads.append(g)
        logits = jax.jit(lambda v: model.apply(v, x[0], train=False))(
            {"params": params, "batch_stats": stats})
    return {"init": variables, "params": params, "stats": stats, "grads": grads,
            "logits": logits}, report


@pytest.fixture(scope="module")
def linen_runs():
    flax_models = _import("flax_imagenet_models")
    port = _port("flax_imagenet_models", "nn.BatchNorm", "bnjax.BatchNorm")
    make = dict(num_classes=10, num_filters=8)
    flax_run, _ = _train_linen(flax_models._ResNet1(**make), _no_swap())
    swap_run, report = _train_linen(flax_models._ResNet1(**make),
                                    bnjax.replacing_flax_batch_norm())
    port_run, _ = _train_linen(port["_ResNet1"](**make), _no_swap())
    return flax_run, swap_run, port_run, report


def _no_swap():
    return contextlib.nullcontext(bnjax.SwapReport())


def test_flax_imagenet_resnet_unedited_trains_like_its_port(linen_runs):
    flax_run, swap_run, port_run, report = linen_runs
    assert report.replaced == ["bn_init", "ResNetBlock_0/BatchNorm_0",
                               "ResNetBlock_0/BatchNorm_1"]
    # The same variables at init (names, shapes, values) as Flax's layer and the port.
    _tree_check(np.testing.assert_array_equal, swap_run["init"], flax_run["init"])
    _tree_check(np.testing.assert_array_equal, swap_run["init"], port_run["init"])
    for key in ("params", "stats", "grads", "logits"):
        _tree_check(SAME, swap_run[key], port_run[key])  # bnjax's arithmetic, both ways
        _tree_check(CLOSE, swap_run[key], flax_run[key])  # and Flax's numbers
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), swap_run["stats"],
                         swap_run["init"]["batch_stats"])
    assert min(jax.tree.leaves(moved)) > 1e-3  # training mode reached every layer


# ---------------------------------------------------------------------------------------------
# NNX: the CNN of examples/mnist/train.py on 28x28 images (its Linear expects 7*7*64).


def _train_nnx(model, steps=3):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 28, 28, 1)) * 2 + 1, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, size=4))
    rngs = nnx.Rngs(dropout=1)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    init = jax.tree.map(jnp.copy, nnx.state(model))

    @nnx.jit
    def step(model, optimizer, rngs):
        def loss_fn(m, rngs):  # as the example's: the dropout streams an argument
            logits = m(x, rngs)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        grads = nnx.grad(loss_fn)(model, rngs)
        optimizer.update(model, grads)
        return grads

    grads = [nnx.to_pure_dict(step(model, optimizer, rngs)) for _ in range(steps)]
    model.eval()
    return {"init": nnx.to_pure_dict(init), "state": nnx.to_pure_dict(nnx.state(model)),
            "grads": grads, "logits": model(x, rngs)}


def test_flax_mnist_cnn_unedited_trains_like_its_port():
    cnn = _import("flax_mnist_cnn").CNN
    port = _port("flax_mnist_cnn", "nnx.BatchNorm", "bnjax.nnx.BatchNorm")["CNN"]
    runs = {"flax": _train_nnx(cnn(nnx.Rngs(0))), "port": _train_nnx(port(nnx.Rngs(0)))}
    # The CNN leaves epsilon at Flax's default (1e-5), its text port at bnjax's (Keras 1e-3):
    # the swap keeps the module's own, or takes Keras' like the port.
    for epsilon in ("module", "keras"):
        model = cnn(nnx.Rngs(0))
        report = bnjax.replace_nnx_batch_norm(model, epsilon=epsilon)
        assert report.replaced == ["batch_norm1", "batch_norm2"]
        assert isinstance(model.batch_norm1, bnjax.nnx.BatchNorm)
        runs[epsilon] = _train_nnx(model)
    for run in runs.values():
        _tree_check(np.testing.assert_array_equal, run["init"], runs["flax"]["init"])
    for key in ("state", "grads", "logits"):
        _tree_check(SAME, runs["keras"][key], runs["port"][key])  # bnjax's arithmetic, both ways
        _tree_check(CLOSE, runs["module"][key], runs["flax"][key])  # and Flax's numbers
    assert np.max(np.abs(runs["module"]["state"]["batch_norm2"]["mean"])) > 1e-3  # it trained


# ---------------------------------------------------------------------------------------------
# Options, dtypes and errors (small layers, eager).


def _np_bn(x, eps):
    x = np.asarray(x, np.float64)
    return (x - x.mean(0)) / np.sqrt(x.var(0) + eps)


class _Block(nn.Module):
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x, train):
        return nn.BatchNorm(use_running_average=not train, epsilon=self.epsilon, name="bn0")(x)


class _Net(nn.Module):
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x, train):
        return _Block(self.epsilon)(x, train)


@pytest.mark.parametrize("epsilon,used", [("module", 1e-5), ("keras", 1e-3), (0.5, 0.5)])
def test_linen_epsilon_option(epsilon, used):
    x = jnp.asarray(np.random.default_rng(3).normal(size=(6, 3)) * 0.05, jnp.float32)
    variables = _Net().init(jax.random.key(0), x, train=False)
    with bnjax.replacing_flax_batch_norm(epsilon=epsilon) as report:
        y, upd = _Net().apply(variables, x, train=True, mutable=["batch_stats"])
    assert report.replaced == ["_Block_0/bn0"] and report.count == 1
    np.testing.assert_allclose(y, _np_bn(x, used), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["_Block_0"]["bn0"]["var"],
                               0.99 + 0.01 * np.var(np.asarray(x, np.float64), 0), rtol=1e-6)


@pytest.mark.parametrize("guard", [True, False])
def test_linen_non_finite_guard_option(guard):
    x = jnp.ones((4, 2)).at[0, 1].set(jnp.nan)
    variables = _Net().init(jax.random.key(0), x, train=False)
    with bnjax.replacing_flax_batch_norm(guard_non_finite=guard):
        _, upd = _Net().apply(variables, x, train=True, mutable=["batch_stats"])
    mean = np.asarray(upd["batch_stats"]["_Block_0"]["bn0"]["mean"])
    assert mean[0] == pytest.approx(0.01)  # the finite feature updates
    assert (mean[1] == 0.0) if guard else np.isnan(mean[1])  # the NaN one: kept, or as Flax


@pytest.mark.parametrize("cast_params", [False, True])
def test_linen_output_dtype_follows_flax(cast_params):
    """``dtype=None``: Flax promotes the input with the scale and bias; the swap keeps that."""
    x = jnp.asarray(np.random.default_rng(4).normal(size=(8, 3)), jnp.bfloat16)
    variables = nn.BatchNorm().init(jax.random.key(0), x, True)
    if cast_params:
        variables = {**variables, "params": jax.tree.map(lambda a: a.astype(jnp.bfloat16),
                                                         variables["params"])}
    flax_y = nn.BatchNorm().apply(variables, x, True)
    with bnjax.replacing_flax_batch_norm():
        y = nn.BatchNorm().apply(variables, x, True)
    assert y.dtype == flax_y.dtype == (jnp.bfloat16 if cast_params else jnp.float32)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(flax_y, np.float32),
                               rtol=1e-2)


def test_without_flax_batch_norm_is_the_identity():
    x = jnp.arange(6.0).reshape(3, 2)
    with bnjax.without_flax_batch_norm() as report:
        variables = _Net().init(jax.random.key(0), x, train=False)
        y = _Net().apply(variables, x, train=True)
    assert variables == {} and report.replaced == ["_Block_0/bn0"]
    np.testing.assert_array_equal(y, x)


def test_a_subclass_reaching_flax_call_through_super_is_replaced():
    class KerasStyle(nn.BatchNorm):
        def __call__(self, x, *, training):
            return super().__call__(x, not training)

    x = jnp.asarray(np.random.default_rng(5).normal(size=(5, 2)), jnp.float32)
    layer = KerasStyle(epsilon=1e-3)
    variables = layer.init(jax.random.key(0), x, training=False)
    with bnjax.replacing_flax_batch_norm(guard_non_finite=False) as report:
        y, _ = layer.apply(variables, x, training=True, mutable=["batch_stats"])
    assert report.replaced == ["<root>"]
    np.testing.assert_allclose(y, _np_bn(x, 1e-3), rtol=1e-4, atol=1e-5)


def test_linen_errors_name_the_argument_or_the_module_path():
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match=r"epsilon='flax' is not accepted; pass 'module'"):
        bnjax.replacing_flax_batch_norm(epsilon="flax")
    with pytest.raises(ValueError, match=r"epsilon=-1\.0 must be finite and > 0"):
        bnjax.replacing_flax_batch_norm(epsilon=-1.0)
    with pytest.raises(TypeError, match="guard_non_finite"):
        bnjax.replacing_flax_batch_norm(guard_non_finite="yes")
    with bnjax.replacing_flax_batch_norm(), pytest.raises(
            ValueError, match=r"flax.linen.BatchNorm at '_Block_0/bn0' cannot run on bnjax: "
                              r"epsilon=0\.0 must be finite and > 0"):
        _Net(epsilon=0.0).init(jax.random.key(0), x, train=False)


def test_nnx_replacement_keeps_variables_and_shared_references():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.List([nnx.BatchNorm(2, momentum=0.5, rngs=rngs),
                                    nnx.Linear(2, 2, rngs=rngs)])
            self.table = nnx.Dict({"bn": nnx.BatchNorm(2, use_bias=False, rngs=rngs)})
            self.again = self.blocks[0]  # one layer, two references

    net = Net(nnx.Rngs(0))
    before = nnx.to_pure_dict(nnx.state(net))
    scale = net.table["bn"].scale
    report = bnjax.replace_nnx_batch_norm(net, guard_non_finite=False)
    assert sorted(report.replaced) == ["blocks/0", "table/bn"]
    assert net.again is net.blocks[0] and isinstance(net.again, bnjax.nnx.BatchNorm)
    assert net.table["bn"].scale is scale and net.table["bn"].bias is None
    _tree_check(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(net)), before)
    x = jnp.asarray(np.random.default_rng(6).normal(size=(4, 2)), jnp.float32)
    y = net.again(x)  # training mode, the module's own momentum and epsilon (1e-5)
    np.testing.assert_allclose(y, _np_bn(x, 1e-5), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(net.blocks[0].mean[...], 0.5 * np.asarray(x, np.float64).mean(0),
                               rtol=1e-5)


def test_nnx_errors_name_the_layer_path():
    class Custom(nnx.BatchNorm):
        def __call__(self, x):
            return super().__call__(x) * 2

    class Net(nnx.Module):
        def __init__(self, layer):
            self.layer = layer

    with pytest.raises(TypeError, match=r"at 'layer' is a Custom, which overrides __call__"):
        bnjax.replace_nnx_batch_norm(Net(Custom(2, rngs=nnx.Rngs(0))))
    with pytest.raises(ValueError, match=r"at 'layer' cannot run on bnjax: momentum=2\.0"):
        bnjax.replace_nnx_batch_norm(Net(nnx.BatchNorm(2, momentum=2.0, rngs=nnx.Rngs(0))))
    tupled = Net(None)
    tupled.layer = nnx.data((nnx.BatchNorm(2, rngs=nnx.Rngs(0)),))
    with pytest.raises(TypeError, match=r"at 'layer/0' sits in a tuple"):
        bnjax.replace_nnx_batch_norm(tupled)
    with pytest.raises(ValueError, match="model is itself a flax.nnx.BatchNorm"):
        bnjax.replace_nnx_batch_norm(nnx.BatchNorm(2, rngs=nnx.Rngs(0)))


def test_linen_swap_is_exact_where_flax_fast_variance_is_not():
    """A large mean against the spread: bnjax's shifted sums keep the digits Flax loses."""
    x = np.random.default_rng(7).normal(size=(64, 5)) * 3 + 100
    ref = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
    bn = nn.BatchNorm(use_running_average=False)
    variables = bn.init(jax.random.key(0), jnp.asarray(x, jnp.float32))
    flax_y, _ = bn.apply(variables, jnp.asarray(x, jnp.float32), mutable=["batch_stats"])
    with bnjax.replacing_flax_batch_norm():
        y, _ = bn.apply(variables, jnp.asarray(x, jnp.float32), mutable=["batch_stats"])
    assert np.max(np.abs(np.asarray(y) - ref)) < 1e-5 < np.max(np.abs(np.asarray(flax_y) - ref))


def test_linen_swap_under_scan_and_with_a_layer_called_twice():
    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            bn = nn.BatchNorm(use_running_average=False, momentum=0.5)
            return bn(bn(x) * 2 + 1)

    class Body(nn.Module):
        @nn.compact
        def __call__(self, c, _):
            return Twice()(nn.Dense(3)(c)), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(Body, variable_axes={"params": 0, "batch_stats": 0},
                           split_rngs={"params": True}, length=2)
            return scan()(x, None)[0]

    x = jnp.asarray(np.random.default_rng(8).normal(size=(6, 3)), jnp.float32)
    variables = Stack().init(jax.random.key(0), x)
    flax_out = Stack().apply(variables, x, mutable=["batch_stats"])
    with bnjax.replacing_flax_batch_norm(guard_non_finite=False) as report:
        out = Stack().apply(variables, x, mutable=["batch_stats"])
    assert report.replaced == ["ScanBody_0/Twice_0/BatchNorm_0"]
    _tree_check(CLOSE, out, flax_out)
