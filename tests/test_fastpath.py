"""The fast training path (custom VJP) against the plain batch-norm formula.

bnjax computes training-mode BN with a hand-written backward pass and statistics from
shifted sums (tuned for memory traffic). These tests check that it gives the outputs, new
moving statistics and gradients of the textbook formula, written here in float64 NumPy
(analytic gradients) and as a plain jnp function differentiated by JAX, within 1e-5 relative
in float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax

EPS = 1e-3
MOMENTUM = 0.9


def _rel_close(actual, ref, tol, what):
    """Max-norm relative error: max |a - r| <= tol * max |r| (entries near 0 included)."""
    actual = np.asarray(actual, np.float64)
    ref = np.asarray(ref, np.float64)
    assert actual.shape == ref.shape, what
    scale = max(np.max(np.abs(ref)), 1e-30)
    err = np.max(np.abs(actual - ref)) / scale
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


def ref_forward_backward(x, scale, bias, run_mean, run_var, dy, dmean, dvar, axis):
    """Float64 NumPy: y, new moving stats and the gradients of
    L = sum(y * dy) + sum(new_mean * dmean) + sum(new_var * dvar)
    with respect to x, scale and bias (the BN paper's formulas)."""
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    feat = (axis % x.ndim,)
    red = tuple(i for i in range(x.ndim) if i not in feat)
    shape = [1] * x.ndim
    shape[feat[0]] = x.shape[feat[0]]
    g = np.reshape(np.asarray(scale, np.float64), shape)
    b = np.reshape(np.asarray(bias, np.float64), shape)
    m = np.prod([x.shape[i] for i in red])
    mu = x.mean(axis=red, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=red, keepdims=True)
    r = 1.0 / np.sqrt(var + EPS)
    xhat = (x - mu) * r
    y = g * xhat + b
    new_mean = MOMENTUM * run_mean + (1 - MOMENTUM) * mu.reshape(-1)
    new_var = MOMENTUM * run_var + (1 - MOMENTUM) * var.reshape(-1)
    # Through y: dx = g r / m (m dy - sum dy - xhat sum(dy xhat)).
    sum_dy = dy.sum(axis=red, keepdims=True)
    sum_dy_xhat = (dy * xhat).sum(axis=red, keepdims=True)
    dx = g * r / m * (m * dy - sum_dy - xhat * sum_dy_xhat)
    # Through the moving statistics: d mean / dx = 1/m, d var / dx = 2 (x - mu) / m.
    cm = np.reshape((1 - MOMENTUM) * np.asarray(dmean, np.float64), shape)
    cv = np.reshape((1 - MOMENTUM) * np.asarray(dvar, np.float64), shape)
    dx = dx + cm / m + cv * 2.0 * (x - mu) / m
    dscale = sum_dy_xhat.reshape(-1)
    dbias = sum_dy.reshape(-1)
    return y, new_mean, new_var, dx, dscale, dbias


def _data(shape, axis, dtype, seed=0, offset=3.0, spread=2.0):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = (rng.normal(size=shape) * spread + offset).astype(np.float32)
    x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))  # the values the input holds
    dy = rng.normal(size=shape).astype(np.float32)
    dy = np.asarray(jnp.asarray(dy, dtype).astype(jnp.float32))
    scale = rng.uniform(0.5, 1.5, c).astype(np.float32)
    bias = rng.normal(size=c).astype(np.float32)
    run_mean = rng.normal(size=c).astype(np.float32)
    run_var = rng.uniform(0.5, 2.0, c).astype(np.float32)
    dmean = rng.normal(size=c).astype(np.float32)
    dvar = rng.normal(size=c).astype(np.float32)
    return x, dy, scale, bias, run_mean, run_var, dmean, dvar


def _fast(x, dy, scale, bias, run_mean, run_var, dmean, dvar, axis, dtype):
    """bnjax's training path: outputs and the vjp for the cotangents (dy, dmean, dvar)."""
    stats = {"mean": jnp.asarray(run_mean), "var": jnp.asarray(run_var)}

    def f(x, scale, bias):
        y, new = bnjax.batch_norm(x, stats, {"scale": scale, "bias": bias}, training=True,
                                  axis=axis, momentum=MOMENTUM, epsilon=EPS)
        return y, new["mean"], new["var"]

    out, vjp = jax.vjp(jax.jit(f), jnp.asarray(x, dtype), jnp.asarray(scale), jnp.asarray(bias))
    grads = vjp((jnp.asarray(dy, dtype), jnp.asarray(dmean), jnp.asarray(dvar)))
    return out, grads


def _plain_jnp(x, dy, scale, bias, run_mean, run_var, dmean, dvar, axis):
    """The formula as plain jnp in float32, differentiated by JAX's autodiff."""
    feat = axis % x.ndim
    red = tuple(i for i in range(x.ndim) if i != feat)
    shape = [1] * x.ndim
    shape[feat] = x.shape[feat]

    def f(x, scale, bias):
        mu = jnp.mean(x, axis=red, keepdims=True)
        var = jnp.mean(jnp.square(x - mu), axis=red, keepdims=True)
        y = scale.reshape(shape) * (x - mu) / jnp.sqrt(var + EPS) + bias.reshape(shape)
        return (y, MOMENTUM * run_mean + (1 - MOMENTUM) * mu.reshape(-1),
                MOMENTUM * run_var + (1 - MOMENTUM) * var.reshape(-1))

    out, vjp = jax.vjp(jax.jit(f), jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
    return out, vjp((jnp.asarray(dy), jnp.asarray(dmean), jnp.asarray(dvar)))


SHAPES = [
    ((8, 6, 6, 16), -1),   # NHWC
    ((32, 4, 4, 8), -1),
    ((6, 5, 7, 3), 1),     # channels in the middle
    ((64, 12), -1),        # dense features
]


@pytest.mark.parametrize("shape,axis", SHAPES)
def test_fast_path_matches_float64_reference(shape, axis):
    data = _data(shape, axis, jnp.float32)
    (y, new_mean, new_var), (dx, dscale, dbias) = _fast(*data, axis, jnp.float32)
    ry, rmean, rvar, rdx, rdscale, rdbias = ref_forward_backward(*data[:1], *data[2:6],
                                                                 data[1], *data[6:], axis)
    for name, a, r in [("y", y, ry), ("new mean", new_mean, rmean), ("new var", new_var, rvar),
                       ("dx", dx, rdx), ("dscale", dscale, rdscale), ("dbias", dbias, rdbias)]:
        _rel_close(a, r, 1e-5, name)


@pytest.mark.parametrize("shape,axis", SHAPES[:3])
def test_fast_path_matches_autodiff_of_plain_formula(shape, axis):
    data = _data(shape, axis, jnp.float32, seed=1)
    (y, m, v), grads = _fast(*data, axis, jnp.float32)
    (py, pm, pv), pgrads = _plain_jnp(*data, axis)
    for name, a, r in [("y", y, py), ("new mean", m, pm), ("new var", v, pv),
                       ("dx", grads[0], pgrads[0]), ("dscale", grads[1], pgrads[1]),
                       ("dbias", grads[2], pgrads[2])]:
        _rel_close(a, r, 1e-5, name)


def test_fast_path_bfloat16_input():
    shape, axis = (16, 4, 4, 8), -1
    data = _data(shape, axis, jnp.bfloat16, seed=2)
    (y, new_mean, new_var), (dx, dscale, dbias) = _fast(*data, axis, jnp.bfloat16)
    assert y.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16
    ry, rmean, rvar, rdx, rdscale, rdbias = ref_forward_backward(*data[:1], *data[2:6],
                                                                 data[1], *data[6:], axis)
    # Statistics and parameter gradients are float32 sums of the bfloat16 values.
    _rel_close(new_mean, rmean, 1e-5, "new mean")
    _rel_close(new_var, rvar, 1e-5, "new var")
    _rel_close(dscale, rdscale, 1e-5, "dscale")
    _rel_close(dbias, rdbias, 1e-5, "dbias")
    # y and dx are rounded to bfloat16 once (8 bits of mantissa).
    _rel_close(y, ry, 2**-7, "y")
    _rel_close(dx, rdx, 2**-7, "dx")


def test_fast_path_without_scale_and_bias():
    shape, axis = (8, 5, 5, 4), -1
    x, dy, _, _, run_mean, run_var, dmean, dvar = _data(shape, axis, jnp.float32, seed=3)
    stats = {"mean": jnp.asarray(run_mean), "var": jnp.asarray(run_var)}

    def f(x):
        y, new = bnjax.batch_norm(x, stats, None, training=True, axis=axis,
                                  momentum=MOMENTUM, epsilon=EPS)
        return y, new["mean"], new["var"]

    out, vjp = jax.vjp(jax.jit(f), jnp.asarray(x))
    (dx,) = vjp((jnp.asarray(dy), jnp.asarray(dmean), jnp.asarray(dvar)))
    c = shape[axis]
    ry, _, _, rdx, _, _ = ref_forward_backward(x, np.ones(c), np.zeros(c), run_mean, run_var,
                                               dy, dmean, dvar, axis)
    _rel_close(out[0], ry, 1e-5, "y")
    _rel_close(dx, rdx, 1e-5, "dx")


def test_fast_path_across_devices_equals_global_batch():
    """Split over a named axis (vmap), the fast path equals the formula on the whole batch."""
    parts, shape, axis = 4, (8, 3, 3, 8), -1
    data = _data((parts * shape[0],) + shape[1:], axis, jnp.float32, seed=4)
    x, dy, scale, bias, run_mean, run_var, dmean, dvar = data
    stats = {"mean": jnp.asarray(run_mean), "var": jnp.asarray(run_var)}

    def f(x, scale, bias):
        y, new = bnjax.batch_norm(x, stats, {"scale": scale, "bias": bias}, training=True,
                                  axis=axis, momentum=MOMENTUM, epsilon=EPS, axis_name="d")
        return y, new["mean"], new["var"]

    def per_device(x, dy):
        out, vjp = jax.vjp(f, x, jnp.asarray(scale), jnp.asarray(bias))
        # Every device holds the same statistics; the loss counts them once (cotangent/parts).
        return out, vjp((dy, jnp.asarray(dmean) / parts, jnp.asarray(dvar) / parts))

    xs = jnp.asarray(x).reshape((parts,) + shape)
    dys = jnp.asarray(dy).reshape((parts,) + shape)
    run = jax.jit(jax.vmap(per_device, axis_name="d"))
    (y, new_mean, new_var), (dx, dscale, dbias) = run(xs, dys)
    ry, rmean, rvar, rdx, rdscale, rdbias = ref_forward_backward(
        x, scale, bias, run_mean, run_var, dy, dmean, dvar, axis)
    _rel_close(y.reshape(ry.shape), ry, 1e-5, "y")
    _rel_close(new_mean[0], rmean, 1e-5, "new mean")
    _rel_close(new_var[0], rvar, 1e-5, "new var")
    _rel_close(dx.reshape(rdx.shape), rdx, 1e-5, "dx")
    _rel_close(dscale.sum(0), rdscale, 1e-5, "dscale")
    _rel_close(dbias.sum(0), rdbias, 1e-5, "dbias")


@pytest.mark.parametrize("ratio", [1e3, 1e4])
def test_fast_path_variance_with_large_mean(ratio):
    """|mean| / std up to 1e4 in float32: the batch variance stays within 1e-3 of float64."""
    rng = np.random.default_rng(5)
    x = (ratio + rng.normal(size=(64, 4, 4, 8))).astype(np.float32)
    ref_var = np.asarray(x, np.float64).var(axis=(0, 1, 2))
    _, new = jax.jit(lambda x: bnjax.batch_norm(
        x, {"mean": jnp.zeros(8), "var": jnp.zeros(8)}, training=True, momentum=0.0,
        epsilon=EPS))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(new["var"]), ref_var, rtol=1e-3)
