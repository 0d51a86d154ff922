"""Batch renormalization, ghost batch norm, Keras-style regularizers and constraints.

References are float64 NumPy written here from the papers (Ioffe 2017, Algorithm 1 with the
Keras 3 bookkeeping of the moving statistics; Hoffer et al. 2017), Keras 3 itself where its
semantics match, and Keras' own regularizer and constraint objects.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnjax
from bnjax import functional as F
from bnjax import keras as K

EPS = 1e-3


# ------------------------------------------------------------------------------------------
# Float64 references.


def rows(x):
    """(B, ..., C) -> (N, C): every non-feature position is a row."""
    x = np.asarray(x, np.float64)
    return x.reshape(-1, x.shape[-1])


def ref_renorm(x, g, b, st, clip, eps=EPS, mom=0.99, rmom=0.99, dy=None):
    """One training step of batch renormalization on rows (N, C); returns y, new stats, r, d, grads.

    Paper: r = sigma_B / sigma, d = (mu_B - mu) / sigma, clipped, treated as constants;
    y = gamma * (xhat * r + d) + beta. Keras keeps separate moving statistics for r, d
    (renorm_mean, renorm_std with renorm_momentum) and for inference (mean, std with momentum,
    var = std^2 - eps); sigma is floored at sqrt(eps).
    """
    x = np.asarray(x, np.float64)
    mu, var = x.mean(0), x.var(0)
    sig = np.sqrt(var + eps)
    ref_sig = np.maximum(st["renorm_std"], np.sqrt(eps))
    r = sig / ref_sig
    d = (mu - st["renorm_mean"]) / ref_sig
    r = np.clip(r, clip.get("rmin", -np.inf), clip.get("rmax", np.inf))
    d = np.clip(d, -clip.get("dmax", np.inf), clip.get("dmax", np.inf))
    xhat = (x - mu) / sig
    y = g * (xhat * r + d) + b
    new = {
        "renorm_mean": rmom * st["renorm_mean"] + (1 - rmom) * mu,
        "renorm_std": rmom * st["renorm_std"] + (1 - rmom) * sig,
        "mean": mom * st["mean"] + (1 - mom) * mu,
        "std": mom * st["std"] + (1 - mom) * sig,
    }
    new["var"] = np.maximum(new["std"] ** 2 - eps, 0)
    grads = None
    if dy is not None:
        dxhat = dy * g * r
        dx = (dxhat - dxhat.mean(0) - xhat * (dxhat * xhat).mean(0)) / sig
        grads = (dx, (dy * (xhat * r + d)).sum(0), dy.sum(0))
    return y, new, r, d, grads


def ref_bn_rows(x, eps=EPS):
    x = np.asarray(x, np.float64)
    mu, var = x.mean(0), x.var(0)
    return (x - mu) / np.sqrt(var + eps), mu, var


def ref_ghost(x, vbs, g, b, st, eps=EPS, mom=0.99, dy=None):
    """Ghost BN: consecutive groups of vbs examples along axis 0, each normalized on its own."""
    x = np.asarray(x, np.float64)
    groups = x.shape[0] // vbs
    ys, mus, vs, dxs = [], [], [], []
    for k in range(groups):
        part = x[k * vbs:(k + 1) * vbs]
        xr = rows(part)
        xhat, mu, var = ref_bn_rows(xr, eps)
        ys.append((g * xhat + b).reshape(part.shape))
        mus.append(mu)
        vs.append(var)
        if dy is not None:
            dyr = rows(dy[k * vbs:(k + 1) * vbs])
            dxhat = dyr * g
            dx = (dxhat - dxhat.mean(0) - xhat * (dxhat * xhat).mean(0)) / np.sqrt(var + eps)
            dxs.append(dx.reshape(part.shape))
    new = {"mean": mom * st["mean"] + (1 - mom) * np.mean(mus, 0),
           "var": mom * st["var"] + (1 - mom) * np.mean(vs, 0)}
    dx = np.concatenate(dxs) if dy is not None else None
    return np.concatenate(ys), new, dx


def as_np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# ------------------------------------------------------------------------------------------
# Batch renormalization.

CLIPS = [
    {"rmin": 0.7, "rmax": 1.3, "dmax": 0.25},
    {"rmax": 1.1},
    {"dmax": 0.1},
    {},
]


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("shape", [(16, 3), (4, 3, 2, 3)])
def test_renorm_matches_float64_reference_over_steps(clip, shape):
    rng = np.random.default_rng(0)
    c = shape[-1]
    g, b = rng.uniform(0.5, 2.0, c), rng.normal(size=c)
    st_ref = {"mean": np.zeros(c), "var": np.ones(c), "std": np.ones(c),
              "renorm_mean": np.zeros(c), "renorm_std": np.ones(c)}
    st = F.init_renorm_stats({"mean": jnp.zeros(c), "var": jnp.ones(c)})
    params = {"scale": jnp.asarray(g, jnp.float32), "bias": jnp.asarray(b, jnp.float32)}
    fn = functools.partial(F.batch_norm, training=True, renorm=True, momentum=0.8,
                           renorm_momentum=0.7, renorm_clipping=clip, epsilon=EPS)

    def loss(xx, p, st, dy):
        y, new = fn(xx, st, p)
        return jnp.sum(y * dy), (y, new)

    grad_fn = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))
    clipped = False
    for step in range(5):
        # Shifting statistics keep r and d away from 1 and 0, so the clipping bites.
        x = rng.normal(1.5 * step, 0.5 + step, size=shape)
        dy = rng.normal(size=shape)
        y_ref, st_ref, r, d, (dx_ref, dg_ref, db_ref) = ref_renorm(
            rows(x), g, b, st_ref, clip, mom=0.8, rmom=0.7, dy=rows(dy))
        clipped |= bool(np.any(np.isin(r, list(clip.values()))) or np.any(
            np.abs(np.abs(d) - clip.get("dmax", -1)) < 1e-12))
        (_, (y, st)), (dx, dp) = grad_fn(jnp.asarray(x, jnp.float32), params, st,
                                         jnp.asarray(dy, jnp.float32))
        np.testing.assert_allclose(rows(y), y_ref, rtol=2e-5, atol=2e-5)
        for k in st_ref:
            np.testing.assert_allclose(np.asarray(st[k]), st_ref[k], rtol=2e-5, atol=2e-6,
                                       err_msg=k)
        np.testing.assert_allclose(rows(dx), dx_ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(dp["scale"]), dg_ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(dp["bias"]), db_ref, rtol=1e-5, atol=1e-5)
    if clip:
        assert clipped, "the clipping limits were never reached: the test would not see them"


def test_renorm_inference_is_plain_bn():
    rng = np.random.default_rng(1)
    st = F.init_renorm_stats({"mean": jnp.array([0.5, -1.0]), "var": jnp.array([2.0, 0.3])})
    x = rng.normal(size=(5, 2))
    y, new = F.batch_norm(jnp.asarray(x, jnp.float32), st, training=False, renorm=True)
    ref = (x - np.array([0.5, -1.0])) / np.sqrt(np.array([2.0, 0.3]) + EPS)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-6)
    assert new is st


def test_renorm_matches_keras3_layer(keras):
    rng = np.random.default_rng(2)
    clip = {"rmin": 0.8, "rmax": 1.2, "dmax": 0.3}
    layer = keras.layers.BatchNormalization(renorm=True, renorm_clipping=clip, momentum=0.8,
                                            renorm_momentum=0.9)
    layer.build((8, 3))
    g, b = np.array([1.0, 2.0, 0.5], np.float32), np.array([0.1, -0.2, 0.3], np.float32)
    layer.gamma.assign(g)
    layer.beta.assign(b)
    bn = bnjax.BatchNorm(renorm=True, renorm_clipping=clip, momentum=0.8, renorm_momentum=0.9)
    variables = bn.init(jax.random.key(0), jnp.zeros((8, 3)), training=False)
    variables = {"params": {"scale": jnp.asarray(g), "bias": jnp.asarray(b)},
                 "batch_stats": variables["batch_stats"]}
    for step in range(4):
        x = rng.normal(step, 1.0 + step, size=(8, 3)).astype(np.float32)
        y_keras = np.asarray(layer(x, training=True))
        y, upd = bn.apply(variables, x, training=True, mutable=["batch_stats"])
        variables = {**variables, **upd}
        np.testing.assert_allclose(np.asarray(y), y_keras, rtol=1e-5, atol=2e-6)
    names = {"mean": "moving_mean", "var": "moving_variance", "std": "moving_stddev",
             "renorm_mean": "renorm_mean", "renorm_std": "renorm_stddev"}
    kw = {w.name: np.asarray(w.value) for w in layer.weights}
    for ours, theirs in names.items():
        np.testing.assert_allclose(np.asarray(variables["batch_stats"][ours]), kw[theirs],
                                   rtol=1e-5, atol=1e-6, err_msg=ours)
    x = rng.normal(size=(8, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(bn.apply(variables, x, training=False)),
                               np.asarray(layer(x, training=False)), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("step,rmax,dmax", [
    (0, 1.0, 0.0), (5000, 1.0, 0.0), (15000, 1.0 + 2.0 * 10 / 35, 5.0 * 10 / 20),
    (25000, 1.0 + 2.0 * 20 / 35, 5.0), (40000, 3.0, 5.0), (10**6, 3.0, 5.0),
])
def test_renorm_schedule_follows_the_paper(step, rmax, dmax):
    c = bnjax.renorm_schedule(step)
    np.testing.assert_allclose(float(c["rmax"]), rmax, rtol=1e-6)
    np.testing.assert_allclose(float(c["rmin"]), 1.0 / rmax, rtol=1e-6)
    np.testing.assert_allclose(float(c["dmax"]), dmax, rtol=1e-6, atol=1e-7)


def test_linen_renorm_schedule_counts_steps():
    sched = functools.partial(bnjax.renorm_schedule, warmup_steps=1, rmax_steps=2, dmax_steps=2)
    bn = bnjax.BatchNorm(renorm=True, renorm_clipping=sched, momentum=0.5, renorm_momentum=0.5)
    rng = np.random.default_rng(3)
    variables = bn.init(jax.random.key(0), jnp.zeros((6, 2)), training=False)
    assert int(variables["batch_stats"]["renorm_step"]) == 0
    st_ref = {"mean": np.zeros(2), "var": np.ones(2), "std": np.ones(2),
              "renorm_mean": np.zeros(2), "renorm_std": np.ones(2)}
    apply = jax.jit(lambda v, x: bn.apply(v, x, training=True, mutable=["batch_stats"]))
    for step in range(3):
        x = rng.normal(2.0 * step, 3.0, size=(6, 2))
        clip = {k: float(v) for k, v in sched(step).items()}
        y_ref, st_ref, *_ = ref_renorm(x, 1.0, 0.0, st_ref, clip, mom=0.5, rmom=0.5)
        y, upd = apply(variables, jnp.asarray(x, jnp.float32))
        variables = {**variables, **upd}
        np.testing.assert_allclose(np.asarray(y), y_ref, rtol=2e-5, atol=2e-5)
        if step == 0:  # rmax = 1, dmax = 0: plain batch norm
            np.testing.assert_allclose(np.asarray(y), ref_bn_rows(x)[0], rtol=2e-5, atol=2e-5)
    assert int(variables["batch_stats"]["renorm_step"]) == 3


@pytest.mark.parametrize("kwargs,stats_keys,match", [
    ({"renorm_clipping": {"rmax": 1.0, "rmin": 2.0}}, None, "rmax"),
    ({"renorm_clipping": {"dmax": -1.0}}, None, "dmax"),
    ({"renorm_clipping": {"r_max": 2.0}}, None, "unknown keys"),
    ({"renorm_momentum": 1.5}, None, "renorm_momentum"),
    ({}, ("mean", "var"), "init_renorm_stats"),
])
def test_renorm_errors(kwargs, stats_keys, match):
    st = F.init_renorm_stats({"mean": jnp.zeros(2), "var": jnp.ones(2)})
    if stats_keys:
        st = {k: st[k] for k in stats_keys}
    with pytest.raises(ValueError, match=match):
        F.batch_norm(jnp.ones((4, 2)), st, training=True, renorm=True, **kwargs)


def test_renorm_schedule_errors():
    with pytest.raises(ValueError, match="rmax"):
        bnjax.renorm_schedule(0, rmax=0.5)
    with pytest.raises(ValueError, match="dmax_steps"):
        bnjax.renorm_schedule(0, warmup_steps=10, dmax_steps=5)


# ------------------------------------------------------------------------------------------
# Ghost batch normalization.


@pytest.mark.parametrize("shape,vbs", [((12, 3), 4), ((12, 3), 3), ((8, 2, 3, 4), 2),
                                       ((6, 3), 6)])
def test_ghost_matches_float64_reference(shape, vbs):
    rng = np.random.default_rng(4)
    c = shape[-1]
    g, b = rng.uniform(0.5, 2.0, c), rng.normal(size=c)
    st_ref = {"mean": np.zeros(c), "var": np.ones(c)}
    st = {"mean": jnp.zeros(c), "var": jnp.ones(c)}
    params = {"scale": jnp.asarray(g, jnp.float32), "bias": jnp.asarray(b, jnp.float32)}

    def loss(xx, st, dy):
        y, new = F.batch_norm(xx, st, params, training=True, momentum=0.9,
                              virtual_batch_size=vbs)
        return jnp.sum(y * dy), (y, new)

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    for _ in range(3):
        # Each ghost batch gets its own offset so that per-ghost statistics differ.
        x = rng.normal(size=shape) + np.repeat(np.arange(shape[0] // vbs) * 3.0, vbs).reshape(
            (-1,) + (1,) * (len(shape) - 1))
        dy = rng.normal(size=shape)
        y_ref, st_ref, dx_ref = ref_ghost(x, vbs, g, b, st_ref, mom=0.9, dy=dy)

        (_, (y, st)), dx = grad_fn(jnp.asarray(x, jnp.float32), st, jnp.asarray(dy))
        np.testing.assert_allclose(np.asarray(y), y_ref, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(np.asarray(dx), dx_ref, rtol=1e-4, atol=1e-4)
        for k in st_ref:
            np.testing.assert_allclose(np.asarray(st[k]), st_ref[k], rtol=1e-5, atol=1e-6)


def test_ghost_with_renorm_uses_per_ghost_corrections():
    rng = np.random.default_rng(5)
    clip = {"rmin": 0.8, "rmax": 1.25, "dmax": 0.5}
    x = rng.normal(size=(8, 2)) * np.array([1.0, 3.0]) + 1.0
    x[4:] += 2.0
    st0 = {"mean": np.zeros(2), "var": np.ones(2), "std": np.ones(2),
           "renorm_mean": np.zeros(2), "renorm_std": np.ones(2)}
    ys, mus, vs = [], [], []
    for k in range(2):
        y_k, _, _, _, _ = ref_renorm(x[4 * k:4 * k + 4], 1.0, 0.0, st0, clip)
        ys.append(y_k)
        mus.append(x[4 * k:4 * k + 4].mean(0))
        vs.append(x[4 * k:4 * k + 4].var(0))
    mu, var = np.mean(mus, 0), np.mean(vs, 0)
    sig = np.sqrt(var + EPS)
    y, st = F.batch_norm(jnp.asarray(x, jnp.float32), F.init_renorm_stats(
        {"mean": jnp.zeros(2), "var": jnp.ones(2)}), training=True, renorm=True,
        renorm_clipping=clip, virtual_batch_size=4)
    np.testing.assert_allclose(np.asarray(y), np.concatenate(ys), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(st["renorm_std"]), 0.99 + 0.01 * sig, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(st["mean"]), 0.01 * mu, rtol=1e-5, atol=1e-7)


def test_ghost_spans_devices_with_axis_name():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 4, 3))  # (devices, per-device batch, C)
    x[:, 2:] += 5.0  # ghost batch 1 (the second half of every device) is shifted
    st = {"mean": jnp.zeros(3), "var": jnp.ones(3)}
    f = jax.pmap(lambda xx: F.batch_norm(xx, st, training=True, axis_name="d",
                                         virtual_batch_size=2), axis_name="d",
                 devices=jax.devices()[:2])
    y, new = f(jnp.asarray(x, jnp.float32))
    # Ghost batch k = the k-th pair of every device's shard.
    y_ref = np.empty_like(x)
    mus, vs = [], []
    for k in range(2):
        part = x[:, 2 * k:2 * k + 2].reshape(-1, 3)
        xhat, mu, var = ref_bn_rows(part)
        y_ref[:, 2 * k:2 * k + 2] = xhat.reshape(2, 2, 3)
        mus.append(mu)
        vs.append(var)
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(new["mean"][0]), 0.01 * np.mean(mus, 0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(new["var"][1]), 0.99 + 0.01 * np.mean(vs, 0),
                               rtol=1e-6)


def test_ghost_masked_examples_and_empty_ghost_batch():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(6, 2))
    mask = np.array([True, True, False, False, False, True])
    y, new = F.batch_norm(jnp.asarray(x, jnp.float32), {"mean": jnp.zeros(2),
                                                         "var": jnp.ones(2)},
                          training=True, virtual_batch_size=2, mask=jnp.asarray(mask),
                          momentum=0.5)
    # Ghost batches: {0,1} full, {2,3} empty (left out of the average), {4,5} one value.
    _, mu0, var0 = ref_bn_rows(x[0:2])
    mu2, var2 = x[5], np.zeros(2)
    np.testing.assert_allclose(np.asarray(new["mean"]), 0.5 * (mu0 + mu2) / 2, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(new["var"]), 0.5 + 0.5 * (var0 + var2) / 2,
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(y[:2]), (x[:2] - mu0) / np.sqrt(var0 + EPS),
                               rtol=1e-5, atol=1e-5)
    # The empty ghost batch has no statistics: it is normalized with the moving ones.
    np.testing.assert_allclose(np.asarray(y[2:4]), x[2:4] / np.sqrt(1 + EPS), rtol=1e-5)


def test_ghost_in_linen_and_inference_ignores_it():
    bn = bnjax.BatchNorm(virtual_batch_size=2, momentum=0.0)
    x = jnp.asarray(np.random.default_rng(8).normal(size=(4, 3)), jnp.float32)
    variables = bn.init(jax.random.key(0), x, training=False)
    y, upd = bn.apply(variables, x, training=True, mutable=["batch_stats"])
    y_ref, st_ref, _ = ref_ghost(np.asarray(x), 2, 1.0, 0.0, {"mean": 0.0, "var": 1.0}, mom=0.0)
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=2e-5, atol=2e-5)
    # Inference: plain BN with the moving statistics, for any batch size.
    x3 = x[:3]
    y3 = bn.apply({**variables, **upd}, x3, training=False)
    ref = (np.asarray(x3) - st_ref["mean"]) / np.sqrt(st_ref["var"] + EPS)
    np.testing.assert_allclose(np.asarray(y3), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vbs,shape,axis,err,match", [
    (5, (12, 3), -1, ValueError, "does not divide"),
    (0, (12, 3), -1, TypeError, "positive int"),
    (2.0, (12, 3), -1, TypeError, "positive int"),
    (2, (12, 3), 0, ValueError, "batch must be axis 0"),
    (1, (12, 3), -1, ValueError, "single value"),
])
def test_ghost_errors(vbs, shape, axis, err, match):
    st = {"mean": jnp.zeros(shape[axis]), "var": jnp.ones(shape[axis])}
    with pytest.raises(err, match=match):
        F.batch_norm(jnp.ones(shape), st, training=True, axis=axis, virtual_batch_size=vbs)


# ------------------------------------------------------------------------------------------
# Keras-style regularizers and constraints.


def test_regularizers_and_constraints_match_keras(keras):
    w = np.random.default_rng(9).normal(size=5).astype(np.float32) * 2
    pairs = [
        (K.L1(0.3), keras.regularizers.L1(0.3)),
        (K.L2(0.2), keras.regularizers.L2(0.2)),
        (K.L1L2(0.1, 0.4), keras.regularizers.L1L2(0.1, 0.4)),
        (K.get_regularizer("l2"), keras.regularizers.get("l2")),
        (K.NonNeg(), keras.constraints.NonNeg()),
        (K.MaxNorm(1.5), keras.constraints.MaxNorm(1.5)),
        (K.MinMaxNorm(0.5, 1.0, rate=0.7), keras.constraints.MinMaxNorm(0.5, 1.0, rate=0.7)),
        (K.UnitNorm(), keras.constraints.UnitNorm()),
        (K.get_constraint("max_norm"), keras.constraints.get("max_norm")),
    ]
    for ours, theirs in pairs:
        np.testing.assert_allclose(np.asarray(ours(jnp.asarray(w))), np.asarray(theirs(w)),
                                   rtol=1e-6, atol=1e-7, err_msg=repr(ours))


class Net(nn.Module):
    scale_regularizer: object = None
    bias_regularizer: object = None
    scale_constraint: object = None
    bias_constraint: object = None
    frozen: bool = False

    @nn.compact
    def __call__(self, x, training):
        x = nn.Dense(4, use_bias=False)(x)
        bn = bnjax.BatchNorm(scale_regularizer=self.scale_regularizer,
                             bias_regularizer=self.bias_regularizer,
                             scale_constraint=self.scale_constraint,
                             bias_constraint=self.bias_constraint, frozen=self.frozen)
        x = nn.relu(bn(x, training=training))
        x = bn(x, training=training)  # shared layer: its penalty must count once
        return nn.Dense(3)(x)


def _state(model, x, lr=0.1):
    from bnjax.steps import TrainState

    variables = model.init(jax.random.key(0), x, training=False)
    params = variables["params"]
    params = {**params, "BatchNorm_0": {"scale": jnp.array([1.0, -0.5, 2.0, 0.3]),
                                        "bias": jnp.array([0.2, -0.1, 0.4, 3.0])}}
    return TrainState.create(apply_fn=model.apply, params=params,
                             batch_stats=variables["batch_stats"], tx=optax.sgd(lr))


def test_regularizer_penalty_reaches_train_step_loss():
    from bnjax.steps import make_train_step

    rng = np.random.default_rng(10)
    batch = {"x": jnp.asarray(rng.normal(size=(8, 5)), jnp.float32),
             "y": jnp.asarray(rng.integers(0, 3, 8), jnp.int32)}
    plain = _state(Net(), batch["x"])
    reg = _state(Net(scale_regularizer=K.L2(0.5), bias_regularizer="l1"), batch["x"])
    step = make_train_step()
    new_plain, m_plain = step(plain, batch)
    new_reg, m_reg = step(reg, batch)
    g = np.array([1.0, -0.5, 2.0, 0.3])
    b = np.array([0.2, -0.1, 0.4, 3.0])
    penalty = 0.5 * np.sum(g**2) + 0.01 * np.sum(np.abs(b))  # once, though called twice
    np.testing.assert_allclose(float(m_reg["loss"]) - float(m_plain["loss"]), penalty,
                               rtol=1e-5)
    # The penalty's gradient reached the parameters: 2 * 0.5 * g and 0.01 * sign(b) more.
    d_scale = (np.asarray(new_plain.params["BatchNorm_0"]["scale"])
               - np.asarray(new_reg.params["BatchNorm_0"]["scale"]))
    d_bias = (np.asarray(new_plain.params["BatchNorm_0"]["bias"])
              - np.asarray(new_reg.params["BatchNorm_0"]["bias"]))
    np.testing.assert_allclose(d_scale, 0.1 * g, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(d_bias, 0.1 * 0.01 * np.sign(b), rtol=1e-4, atol=1e-7)


def test_frozen_layer_sows_no_penalty():
    # Keras regularizes only trainable weights; a frozen layer adds nothing to the loss.
    x = jnp.ones((4, 5))
    for frozen, expected in ((True, {}), (False, {"regularization": 0.5 * 4})):
        model = Net(scale_regularizer=K.L2(0.5), frozen=frozen)
        variables = model.init(jax.random.key(0), x, training=False)
        assert "losses" not in variables
        _, upd = model.apply(variables, x, training=True, mutable=["batch_stats", "losses"])
        got = {k: float(v) for k, v in upd.get("losses", {}).get("BatchNorm_0", {}).items()}
        assert got == pytest.approx(expected)


def test_constraints_hold_after_updates():
    from bnjax.steps import make_train_step

    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
    model = Net(scale_constraint="non_neg", bias_constraint=K.MaxNorm(1.0))
    constrain = bnjax.make_constrain_fn(model, x, training=False)
    state = _state(model, x, lr=0.5)
    free = _state(Net(), x, lr=0.5)
    step, free_step = make_train_step(constrain_fn=constrain), make_train_step()
    for i in range(3):
        batch = {"x": jnp.asarray(rng.normal(size=(8, 5)), jnp.float32),
                 "y": jnp.asarray(rng.integers(0, 3, 8), jnp.int32)}
        state, _ = step(state, batch)
        free, _ = free_step(free, batch)
        scale = np.asarray(state.params["BatchNorm_0"]["scale"])
        bias = np.asarray(state.params["BatchNorm_0"]["bias"])
        assert np.all(scale >= 0), (i, scale)
        assert np.linalg.norm(bias) <= 1.0 + 1e-6, (i, bias)
    # Without the constraints the same updates leave the constraint sets.
    free_p = free.params["BatchNorm_0"]
    assert np.any(np.asarray(free_p["scale"]) < 0) or np.linalg.norm(free_p["bias"]) > 1.0
    # The constraint touched only the BatchNorm parameters.
    assert set(constrain(state.params)) == set(state.params)
    np.testing.assert_array_equal(np.asarray(constrain(state.params)["Dense_0"]["kernel"]),
                                  np.asarray(state.params["Dense_0"]["kernel"]))


def test_regularizer_and_constraint_name_errors():
    with pytest.raises(ValueError, match="scale_regularizer='l3'"):
        bnjax.BatchNorm(scale_regularizer="l3").init(jax.random.key(0), jnp.ones((2, 2)),
                                                     training=False)
    with pytest.raises(ValueError, match="not a constraint"):
        K.get_constraint("positive")


# ------------------------------------------------------------------------------------------
# Normalization choices of the model zoo.


def test_zoo_norm_choices_and_batch_dependence():
    import ml_collections

    from bnjax_train import models

    assert set(models.NORMS) == {"batch", "renorm", "ghost", "group", "layer", "none", "flax"}
    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.normal(size=(4, 10)), jnp.float32)
    x2 = x.at[2:].set(x[2:] * 5.0 + 3.0)  # change the last two examples only
    options = ml_collections.ConfigDict({"ghost": {"virtual_batch_size": 2},
                                         "group": {"num_groups": 4}})
    for norm in models.NORMS:
        model = models.create_model("mlp", num_classes=3, norm=norm, hidden=(6,),
                                    norm_kwargs=options)
        variables = model.init(jax.random.key(0), x, training=False)
        y1, _ = model.apply(variables, x, training=True, mutable=["batch_stats"])
        y2, _ = model.apply(variables, x2, training=True, mutable=["batch_stats"])
        same = np.allclose(np.asarray(y1[:2]), np.asarray(y2[:2]), atol=1e-6)
        # The first two examples see the others only through batch statistics.
        assert same == (norm in ("ghost", "group", "layer", "none")), norm
        has_stats = "batch_stats" in variables
        assert has_stats == (norm in ("batch", "renorm", "ghost", "flax")), norm
        if norm == "renorm":
            assert "renorm_step" in variables["batch_stats"]["BatchNorm_0"]


def test_zoo_group_norm_groups_divide_channels():
    from bnjax_train import models

    x = np.random.default_rng(13).normal(size=(3, 100))
    layer = models.make_norm("group")  # 8 groups asked for, gcd(8, 100) = 4 used
    variables = layer.init(jax.random.key(0), jnp.asarray(x, jnp.float32))
    y = layer.apply(variables, jnp.asarray(x, jnp.float32), training=True)
    g = x.reshape(3, 4, 25)
    ref = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + EPS))
    np.testing.assert_allclose(np.asarray(y), ref.reshape(3, 100), rtol=1e-4, atol=1e-4)
