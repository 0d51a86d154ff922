"""Porting a Flax model is a text replacement: ``nn.BatchNorm`` -> ``bnjax.BatchNorm``.

Each model is written the way the Flax examples write it, run once as written (Flax's layer)
and once after replacing the layer's name in the source; three jitted SGD steps must give the
same parameters and batch statistics.
"""

import functools
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bnjax
import bnjax.nnx

# A Flax-examples-style ResNet block stack: the norm is a partial with the mode bound.
RESNET_PARTIAL = textwrap.dedent('''
    class ResNetBlock(nn.Module):
        filters: int
        norm: object

        @nn.compact
        def __call__(self, x):
            residual = x
            y = nn.Conv(self.filters, (3, 3), use_bias=False)(x)
            y = self.norm()(y)
            y = nn.relu(y)
            y = nn.Conv(self.filters, (3, 3), use_bias=False)(y)
            y = self.norm(scale_init=nn.initializers.zeros)(y)
            if residual.shape != y.shape:
                residual = nn.Conv(self.filters, (1, 1), use_bias=False)(residual)
                residual = self.norm(name="norm_proj")(residual)
            return nn.relu(residual + y)


    class ResNet(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = True):
            norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                                     momentum=0.9, epsilon=1e-5, dtype=jnp.float32)
            x = nn.Conv(8, (3, 3), use_bias=False, name="conv_init")(x)
            x = norm(name="bn_init")(x)
            x = nn.relu(x)
            x = ResNetBlock(8, norm)(x)
            x = ResNetBlock(16, norm)(x)
            x = jnp.mean(x, axis=(1, 2))
            return nn.Dense(10)(x)
''')

# The other common style: the mode passed positionally at the call.
CNN_POSITIONAL = textwrap.dedent('''
    class ResNet(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = True):
            x = nn.Conv(8, (3, 3))(x)
            x = nn.BatchNorm(momentum=0.9, epsilon=1e-5)(x, not train)
            x = nn.relu(x)
            x = nn.Conv(16, (3, 3), strides=(2, 2))(x)
            x = nn.BatchNorm(momentum=0.9, epsilon=1e-5, use_fast_variance=False,
                             force_float32_reductions=True)(x, not train)
            x = nn.relu(x)
            x = jnp.mean(x, axis=(1, 2))
            x = nn.Dense(32)(x)
            x = nn.BatchNorm(None, -1, 0.9, 1e-5)(x, not train)  # fields in Flax's order
            return nn.Dense(10)(nn.relu(x))
''')


def _build(source, replace):
    if replace:
        source = source.replace("nn.BatchNorm", "bnjax.BatchNorm")
        assert "bnjax.BatchNorm" in source
    scope = {"nn": nn, "jnp": jnp, "functools": functools, "bnjax": bnjax}
    exec(source, scope)  # noqa: S102 - the test's own model source
    return scope["ResNet"]()


def _train(model, steps=3):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(6, 8, 8, 3)) * 2 + 1, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, size=6))
    variables = model.init(jax.random.key(0), x, train=False)
    tx = optax.sgd(0.1, momentum=0.9)
    opt = tx.init(variables["params"])

    @jax.jit
    def step(params, stats, opt):
        def loss_fn(p):
            logits, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                      mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), upd

        (_, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), upd["batch_stats"], opt

    params, stats = variables["params"], variables["batch_stats"]
    for _ in range(steps):
        params, stats, opt = step(params, stats, opt)
    eval_logits = model.apply({"params": params, "batch_stats": stats}, x, train=False)
    return variables, params, stats, eval_logits


@pytest.mark.parametrize("source", [RESNET_PARTIAL, CNN_POSITIONAL], ids=["partial", "positional"])
def test_text_replacement_port_trains_like_flax(source):
    init_f, params_f, stats_f, logits_f = _train(_build(source, replace=False))
    init_b, params_b, stats_b, logits_b = _train(_build(source, replace=True))
    # The same variables at init (names, shapes, values), so checkpoints move between them.
    assert jax.tree.structure(init_f) == jax.tree.structure(init_b)
    jax.tree.map(np.testing.assert_array_equal, init_f, init_b)
    # Training moved the statistics (the mode reached the layer) ...
    moved = jax.tree.map(lambda a, b: np.max(np.abs(np.asarray(a) - np.asarray(b))),
                         stats_f, init_f["batch_stats"])
    assert min(jax.tree.leaves(moved)) > 1e-3
    # ... and both libraries agree after three SGD steps.
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
    jax.tree.map(close, params_b, params_f)
    jax.tree.map(close, stats_b, stats_f)
    close(logits_b, logits_f)


# ---------------------------------------------------------------------------------------------
# Flax NNX.

NNX_MODEL = textwrap.dedent('''
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
            self.bn1 = nnx.BatchNorm(8, momentum=0.9, epsilon=1e-5, rngs=rngs)
            self.conv2 = nnx.Conv(8, 8, (3, 3), rngs=rngs)
            self.bn2 = nnx.BatchNorm(8, momentum=0.9, epsilon=1e-5, use_bias=False,
                                     scale_init=nnx.initializers.normal(1.0), rngs=rngs)
            self.dense = nnx.Linear(8, 10, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.bn1(self.conv(x)))
            x = nnx.relu(self.bn2(self.conv2(x), use_running_average=False))
            return self.dense(x.mean(axis=(1, 2)))
''')


def _build_nnx(replace):
    source = NNX_MODEL
    if replace:
        source = source.replace("nnx.BatchNorm", "bnjax.nnx.BatchNorm")
    scope = {"nnx": nnx, "bnjax": bnjax}
    exec(source, scope)  # noqa: S102 - the test's own model source
    return scope["Net"](nnx.Rngs(0))


def _train_nnx(model, steps=3):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(6, 8, 8, 3)) * 2 + 1, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, size=6))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), labels).mean()

        grads = nnx.grad(loss_fn)(model)
        optimizer.update(model, grads)

    for _ in range(steps):
        step(model, optimizer)
    model.eval()
    return nnx.state(model), model(x)


def test_nnx_text_replacement_port_initializes_and_trains_like_flax():
    flax_model, bnjax_model = _build_nnx(False), _build_nnx(True)
    # Every layer, the ones after the norms included, starts from the same weights: the
    # bnjax layer draws from rngs exactly as flax.nnx.BatchNorm does.
    init_f, init_b = nnx.state(flax_model), nnx.state(bnjax_model)
    assert jax.tree.structure(init_f) == jax.tree.structure(init_b)
    jax.tree.map(np.testing.assert_array_equal, init_f, init_b)
    state_f, out_f = _train_nnx(flax_model)
    state_b, out_b = _train_nnx(bnjax_model)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
    jax.tree.map(close, state_b, state_f)
    close(out_b, out_f)
    assert np.max(np.abs(np.asarray(state_f["bn1"]["mean"][...]))) > 1e-3  # it trained


def test_positional_mode_is_flax_use_running_average():
    """``bn(x, True)`` uses the moving statistics in both libraries (and updates nothing)."""
    x = jnp.asarray(np.random.default_rng(2).normal(size=(5, 3)) * 3 + 2, jnp.float32)
    for layer in (nn.BatchNorm(), bnjax.BatchNorm()):
        variables = layer.init(jax.random.key(0), x, True)
        y, upd = layer.apply(variables, x, True, mutable=["batch_stats"])
        np.testing.assert_allclose(y, x / np.sqrt(1 + layer.epsilon), rtol=1e-6)
        np.testing.assert_array_equal(upd["batch_stats"]["mean"], np.zeros(3))
        y, upd = layer.apply(variables, x, False, mutable=["batch_stats"])
        np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.01 * x.mean(0), rtol=1e-5)


def test_bnjax_and_flax_linen_accept_the_same_fields():
    import dataclasses

    flax_fields = {f.name for f in dataclasses.fields(nn.BatchNorm)} - {"parent", "name"}
    ours = {f.name for f in dataclasses.fields(bnjax.BatchNorm)}
    assert flax_fields <= ours, flax_fields - ours


def test_bnjax_nnx_accepts_flax_nnx_arguments():
    import inspect

    theirs = set(inspect.signature(nnx.BatchNorm.__init__).parameters)
    ours = set(inspect.signature(bnjax.nnx.BatchNorm.__init__).parameters)
    assert theirs <= ours, theirs - ours
