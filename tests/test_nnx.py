"""bnjax.nnx.BatchNorm: equal to the linen layer, train/eval switching, nnx.jit training."""

import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bnjax
import bnjax.nnx as bnnx

EPS = 1e-3

CONFIGS = [
    {},
    {"momentum": 0.8, "epsilon": 1e-5},
    {"renorm": True, "renorm_clipping": {"rmin": 0.8, "rmax": 1.2, "dmax": 0.3},
     "renorm_momentum": 0.9},
    {"virtual_batch_size": 4},
    {"axis": (1, 3)},
]


def _feature_shape(kw):
    return (3, 4) if kw.get("axis") == (1, 3) else (4,)


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: ",".join(kw) or "default")
def test_nnx_equals_linen_over_training_steps(kw):
    """Same inputs, same SGD updates: outputs, gradients and statistics agree within 1e-6."""
    rng = np.random.default_rng(0)
    shape = (8, 3, 2, 4)
    fshape = _feature_shape(kw)
    linen_bn = bnjax.BatchNorm(**kw)
    variables = linen_bn.init(jax.random.key(0), jnp.zeros(shape), training=False)
    params, stats = variables["params"], variables["batch_stats"]
    model = bnnx.BatchNorm(fshape if len(fshape) > 1 else fshape[0], **kw)
    tx = optax.sgd(0.3)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    opt_state = tx.init(params)

    @jax.jit
    def linen_step(params, stats, opt_state, x, t):
        def loss(p):
            y, upd = linen_bn.apply({"params": p, "batch_stats": stats}, x, training=True,
                                    mutable=["batch_stats"])
            return jnp.sum((y - t) ** 2), (y, upd["batch_stats"])

        (_, (y, new_stats)), g = jax.value_and_grad(loss, has_aux=True)(params)
        upd, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, upd), new_stats, opt_state, y

    @nnx.jit
    def nnx_step(model, opt, x, t):
        def loss(m):
            y = m(x)
            return jnp.sum((y - t) ** 2), y

        (_, y), g = nnx.value_and_grad(loss, has_aux=True)(model)
        opt.update(model, g)
        return y

    for _ in range(4):
        x = jnp.asarray(rng.normal(2.0, 3.0, size=shape), jnp.float32)
        t = jnp.asarray(rng.normal(size=shape), jnp.float32)
        params, stats, opt_state, y_linen = linen_step(params, stats, opt_state, x, t)
        y_nnx = nnx_step(model, opt, x, t)
        np.testing.assert_allclose(np.asarray(y_nnx), np.asarray(y_linen), atol=1e-6)
        for name, value in stats.items():
            np.testing.assert_allclose(np.asarray(getattr(model, name)[...]),
                                       np.asarray(value), atol=1e-6, err_msg=name)
        for name, value in params.items():
            np.testing.assert_allclose(np.asarray(getattr(model, name)[...]),
                                       np.asarray(value), atol=1e-6, err_msg=name)
    model.eval()
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    y_eval = linen_bn.apply({"params": params, "batch_stats": stats}, x, training=False)
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(y_eval), atol=1e-6)


class Block(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(3, 2, rngs=rngs)
        self.bn = bnnx.BatchNorm(2, momentum=0.5)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.dense(x))


def test_train_eval_switch_and_view():
    model = Block(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).normal(3.0, 2.0, size=(6, 3)), jnp.float32)
    assert model.bn.use_running_average is False  # NNX convention: a new layer trains
    model.eval()
    assert model.bn.use_running_average is True
    y = model(x)
    h = np.asarray(model.dense(x), np.float64)
    np.testing.assert_allclose(np.asarray(y), h / np.sqrt(1 + EPS), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(model.bn.mean[...]), 0.0)  # eval: no update
    model.train()
    assert model.bn.use_running_average is False
    y = model(x)
    np.testing.assert_allclose(np.asarray(y), (h - h.mean(0)) / np.sqrt(h.var(0) + EPS),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(model.bn.mean[...]), 0.5 * h.mean(0), rtol=1e-5)
    # nnx.view gives an inference view sharing the variables.
    view = nnx.view(model, use_running_average=True, deterministic=True)
    before = np.asarray(model.bn.var[...])
    view(x)
    np.testing.assert_array_equal(np.asarray(model.bn.var[...]), before)
    # A call-time flag overrides the attribute.
    model.bn(model.dense(x), training=False)
    np.testing.assert_array_equal(np.asarray(model.bn.var[...]), before)


def test_built_as_flax_nnx_with_the_default_epsilon_warns_once():
    def count(fn, action="always"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter(action)
            fn()
        return sum(issubclass(w.category, bnjax.FlaxEpsilonWarning) for w in caught)

    # With rngs, as flax.nnx.BatchNorm must be built: a port that kept bnjax's default.
    assert count(lambda: [bnnx.BatchNorm(3, rngs=nnx.Rngs(0)) for _ in range(2)],
                 action="default") == 1
    assert count(lambda: bnnx.BatchNorm(3, epsilon=1e-5, rngs=nnx.Rngs(0))) == 0
    assert count(lambda: bnnx.BatchNorm(3, epsilon=1e-3, rngs=nnx.Rngs(0))) == 0
    assert count(lambda: bnnx.BatchNorm(3)) == 0  # no rngs: bnjax's own way


def test_frozen_and_explicit_mode():
    bn = bnnx.BatchNorm(2, frozen=True)
    x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_allclose(np.asarray(bn(x, training=True)), np.asarray(x) / np.sqrt(1 + EPS),
                               rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(bn.mean[...]), 0.0)
    bn = bnnx.BatchNorm(2, use_running_average=None)
    with pytest.raises(ValueError, match="needs a mode"):
        bn(x)


def test_regularization_loss_and_constraints():
    model = nnx.Sequential(bnnx.BatchNorm(2, scale_regularizer="l2", bias_constraint="non_neg"),
                           bnnx.BatchNorm(2, bias_regularizer=bnjax.keras.L1(0.5),
                                          frozen=False),
                           bnnx.BatchNorm(2, scale_regularizer="l2", frozen=True))
    model.layers[0].scale[...] = jnp.array([1.0, -2.0])
    model.layers[1].bias[...] = jnp.array([-1.0, 3.0])
    # 0.01 * (1 + 4) + 0.5 * (1 + 3); the frozen layer adds nothing.
    np.testing.assert_allclose(float(bnnx.regularization_loss(model)), 0.05 + 2.0, rtol=1e-6)
    grads = nnx.grad(lambda m: bnnx.regularization_loss(m))(model)
    np.testing.assert_allclose(np.asarray(grads.layers[0].scale[...]), [0.02, -0.04],
                               rtol=1e-6)
    model.layers[0].bias[...] = jnp.array([-0.5, 0.5])
    bnnx.apply_constraints(model)
    np.testing.assert_array_equal(np.asarray(model.layers[0].bias[...]), [0.0, 0.5])


def test_nnx_errors():
    with pytest.raises(ValueError, match="num_features"):
        bnnx.BatchNorm(0)
    with pytest.raises(ValueError, match="momentum"):
        bnnx.BatchNorm(2, momentum=2.0)
    with pytest.raises(ValueError, match="not a regularizer"):
        bnnx.BatchNorm(2, scale_regularizer="l5")
    with pytest.raises(ValueError, match="feature shape"):
        bnnx.BatchNorm(3)(jnp.ones((4, 2)))


def test_bnjax_nnx_imports_on_its_own():
    code = "import bnjax.nnx, jax.numpy as j; print(bnjax.nnx.BatchNorm(2)(j.ones((3, 2))).shape)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={"JAX_PLATFORMS": "cpu", "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(3, 2)"


def test_linen_and_nnx_variables_share_names():
    linen_vars = bnjax.BatchNorm(renorm=True, renorm_clipping=bnjax.renorm_schedule).init(
        jax.random.key(0), jnp.ones((2, 3)), training=False)
    state = nnx.state(bnnx.BatchNorm(3, renorm=True, renorm_clipping=bnjax.renorm_schedule))
    nnx_names = {str(path[0]) for path, _ in nnx.to_flat_state(state)}
    linen_names = set(linen_vars["params"]) | set(linen_vars["batch_stats"])
    assert nnx_names == linen_names
