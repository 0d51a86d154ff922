"""Complex inputs: normalized as Flax does, with the exact variance.

References: complex128 NumPy written here (mean of x, real variance ``mean(|x - mean|^2)``),
and ``flax.linen.BatchNorm`` / ``flax.nnx.BatchNorm`` themselves.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnjax
import bnjax.nnx

EPS = 1e-5


def _complex(shape, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) + 1j * rng.normal(size=shape) + offset).astype(np.complex64)


def ref_train(x, run_mean, run_var, momentum, eps, mask=None):
    """Complex128 reference over all axes but the last: y, new mean, new var."""
    x = np.asarray(x, np.complex128)
    red = tuple(range(x.ndim - 1))
    w = np.ones(x.shape) if mask is None else np.broadcast_to(mask, x.shape).astype(float)
    n = w.sum(axis=red)
    xz = np.where(w > 0, x, 0)
    mean = xz.sum(axis=red) / n
    var = np.where(w > 0, np.abs(x - mean) ** 2, 0).sum(axis=red) / n
    y = (x - mean) / np.sqrt(var + eps)
    return y, momentum * run_mean + (1 - momentum) * mean, momentum * run_var + (
        1 - momentum) * var


@pytest.mark.parametrize("offset", [0.0, 300.0 + 200.0j])
@pytest.mark.parametrize("masked", [False, True])
def test_complex_training_matches_complex128_reference(offset, masked):
    x = _complex((6, 4, 3), offset=offset)
    mask = None
    if masked:
        mask = np.random.default_rng(1).random((6, 4)) < 0.6
        x = np.where(mask[..., None], x, np.nan + 0j).astype(np.complex64)
    stats = {"mean": jnp.zeros(3), "var": jnp.ones(3)}
    y, new = bnjax.batch_norm(x, stats, training=True, momentum=0.9, epsilon=EPS, mask=mask)
    y_ref, mean_ref, var_ref = ref_train(x, np.zeros(3), np.ones(3), 0.9, EPS,
                                         None if mask is None else mask[..., None])
    assert y.dtype == jnp.complex64
    assert new["mean"].dtype == jnp.complex64 and new["var"].dtype == jnp.float32
    valid = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask[..., None], x.shape)
    np.testing.assert_allclose(np.asarray(y)[valid], y_ref[valid], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(new["mean"], mean_ref, rtol=1e-5, atol=1e-5)
    # exact variance: no loss from the large offset (E|x|^2 - |E x|^2 would lose it)
    np.testing.assert_allclose(new["var"], var_ref, rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(y)[valid]))


def test_complex_moments_and_inference():
    x = _complex((8, 2), seed=4)
    m = bnjax.moments(x)
    xr = np.asarray(x, np.complex128)
    np.testing.assert_allclose(m.mean, xr.mean(0), rtol=1e-5)
    np.testing.assert_allclose(m.var, (np.abs(xr - xr.mean(0)) ** 2).mean(0), rtol=1e-5)
    stats = {"mean": jnp.asarray([1 + 1j, -2j], jnp.complex64), "var": jnp.asarray([2.0, 0.5])}
    y, same = bnjax.batch_norm(x, stats, training=False, epsilon=EPS)
    ref = (xr - np.asarray(stats["mean"])) / np.sqrt(np.asarray(stats["var"]) + EPS)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    assert same is stats


@pytest.mark.parametrize("masked", [False, True])
def test_complex_linen_matches_flax(masked):
    x = _complex((4, 3, 2), seed=2)
    mask = None
    if masked:
        mask = np.random.default_rng(5).random((4, 3, 1)) < 0.5
        x = np.where(mask, x, np.nan).astype(np.complex64)
    kw = dict(momentum=0.9, use_running_average=False, dtype=jnp.complex64, epsilon=EPS)
    theirs, ours = nn.BatchNorm(**kw), bnjax.BatchNorm(**kw)
    variables = theirs.init(jax.random.key(0), x, mask=mask)
    y_t, up_t = theirs.apply(variables, x, mask=mask, mutable=["batch_stats"])
    y_o, up_o = ours.apply(variables, x, mask=mask, mutable=["batch_stats"])
    valid = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
    np.testing.assert_allclose(np.asarray(y_o)[valid], np.asarray(y_t)[valid], atol=1e-5)
    for key in ("mean", "var"):
        assert up_o["batch_stats"][key].dtype == up_t["batch_stats"][key].dtype
        np.testing.assert_allclose(up_o["batch_stats"][key], up_t["batch_stats"][key],
                                   atol=1e-6)


@pytest.mark.filterwarnings("ignore::numpy.exceptions.ComplexWarning")  # Flax's side
@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types:FutureWarning")
def test_complex_nnx_matches_flax():
    # flax.nnx.BatchNorm stores its moving statistics in float32 arrays: a complex batch mean
    # keeps its real part there; bnjax.nnx.BatchNorm does the same (explicitly).
    x = _complex((5, 3), seed=6)
    theirs = nnx.BatchNorm(3, use_running_average=False, momentum=0.9, rngs=nnx.Rngs(0))
    ours = bnjax.nnx.BatchNorm(3, use_running_average=False, momentum=0.9, epsilon=EPS,
                               rngs=nnx.Rngs(0))
    np.testing.assert_allclose(ours(x), theirs(x), atol=1e-5)
    for key in ("mean", "var"):
        a, b = getattr(ours, key)[...], getattr(theirs, key)[...]
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_complex_gradient_matches_flax():
    x = _complex((6, 2), seed=7)
    bn = nn.BatchNorm(use_running_average=False, epsilon=EPS)
    variables = bn.init(jax.random.key(0), x)

    def loss(module, x):
        y, _ = module.apply(variables, x, mutable=["batch_stats"])
        return jnp.sum(jnp.abs(y * jnp.arange(1, 3)) ** 2 + jnp.real(y) * jnp.arange(12.0)
                       .reshape(6, 2))

    g_t = jax.grad(loss, argnums=1)(bn, x)
    g_o = jax.grad(loss, argnums=1)(bnjax.BatchNorm(use_running_average=False, epsilon=EPS), x)
    np.testing.assert_allclose(g_o, g_t, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kw,word", [({"renorm": True}, "renorm"),
                                     ({"virtual_batch_size": 2}, "virtual_batch_size")])
def test_complex_refuses_renorm_and_ghost_batches(kw, word):
    stats = {"mean": jnp.zeros(3), "var": jnp.ones(3)}
    if kw.get("renorm"):
        stats = bnjax.init_renorm_stats(stats)
    with pytest.raises(ValueError, match=f"{word} is not supported for complex input"):
        bnjax.batch_norm(_complex((4, 3)), stats, training=True, **kw)


def test_complex_output_dtype_accepted_integer_still_refused():
    with pytest.raises(TypeError, match="complex64, complex128"):
        bnjax.batch_norm(jnp.ones((4, 3)), {"mean": jnp.zeros(3), "var": jnp.ones(3)},
                         training=True, dtype=jnp.int32)


def test_complex_statistics_over_a_named_axis_are_the_global_batch():
    x = _complex((4, 5, 3), seed=8)  # 4 shards of 5 rows
    stats = {"mean": jnp.zeros(3), "var": jnp.ones(3)}

    def step(xs):
        return bnjax.batch_norm(xs, stats, training=True, momentum=0.5, epsilon=EPS,
                                axis_name="d")

    y, new = jax.vmap(step, axis_name="d")(x)
    y_ref, mean_ref, var_ref = ref_train(x.reshape(20, 3), np.zeros(3), np.ones(3), 0.5, EPS)
    np.testing.assert_allclose(np.asarray(y).reshape(20, 3), y_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new["mean"][0], mean_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["var"][0], var_ref, rtol=1e-5)


def test_complex_feature_without_values_keeps_its_moving_statistics():
    x = _complex((6, 3), seed=9)
    mask = np.ones((6, 3), bool)
    mask[:, 1] = False
    x = np.where(mask, x, np.nan).astype(np.complex64)
    stats = {"mean": jnp.asarray([0.0, 0.5, 0.0]), "var": jnp.asarray([1.0, 4.0, 1.0])}
    y, new = bnjax.batch_norm(x, stats, training=True, momentum=0.9, epsilon=EPS, mask=mask)
    np.testing.assert_allclose(new["mean"][1], 0.5)
    np.testing.assert_allclose(new["var"][1], 4.0)
    assert np.all(np.isfinite(np.asarray(new["mean"]))) and np.all(np.isfinite(new["var"]))
    _, mean_ref, var_ref = ref_train(x[:, [0, 2]], np.zeros(2), np.ones(2), 0.9, EPS)
    np.testing.assert_allclose(np.asarray(new["mean"])[[0, 2]], mean_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new["var"])[[0, 2]], var_ref, rtol=1e-5)
    valid = np.asarray(y)[:, [0, 2]]
    assert np.all(np.isfinite(valid))
