"""Property-based tests: bnjax agrees with a float64 reference or raises the documented error.

Over shapes, feature axes, dtypes, masks, momentum and epsilon (including constant channels and
a single valid value under a mask): never a silent wrong answer, never NaN from finite input,
and gradients equal to the float64 reference.

``batch_norm`` runs jitted, compiled once per input signature (shapes, dtype, axis, mask,
epsilon) and reused by every example that draws it, with ``momentum`` traced (the API allows a
traced momentum): op by op, each new signature would compile every operation on its own.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bnjax

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = [np.float32, jnp.float16, jnp.bfloat16]


FEW_SHAPES = [(4, 3), (2, 3, 2), (3, 1, 2, 2)]


@st.composite
def problems(draw, few_shapes=False):
    """A random problem; ``few_shapes`` draws from a short list so compilations are reused."""
    if few_shapes:
        shape = draw(st.sampled_from(FEW_SHAPES))
        ndim = len(shape)
    else:
        ndim = draw(st.integers(1, 4))
        shape = tuple(draw(st.lists(st.integers(1, 3), min_size=ndim, max_size=ndim)))
    n_feat = draw(st.integers(1, ndim))
    feat = sorted(draw(st.permutations(range(ndim)))[:n_feat])
    # spell each axis positive or negative
    axis = tuple(a - ndim if draw(st.booleans()) else a for a in feat)
    axis = axis[0] if len(axis) == 1 and draw(st.booleans()) else axis
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    offset = draw(st.sampled_from([0.0, 3.0, -50.0, 1e3]))
    spread = draw(st.sampled_from([0.0, 1e-3, 1.0, 20.0]))  # 0.0: constant channels
    x = offset + spread * rng.normal(size=shape)
    x = x.astype(np.float32).astype(dtype)  # the values actually given
    mask_kind = draw(st.sampled_from([None, "reduced", "full", "one"]))
    red_shape = tuple(n for i, n in enumerate(shape) if i not in feat)
    if mask_kind is None:
        mask = None
    elif mask_kind == "full":
        mask = rng.random(shape) < 0.6
    else:
        mask = rng.random(red_shape) < 0.6
        if mask_kind == "one":  # exactly one valid value per feature
            mask = np.zeros(red_shape, bool)
            mask.reshape(-1)[rng.integers(mask.size)] = True
        try:  # a shape that broadcasts to x's too could mean per feature: spell it out
            np.broadcast_shapes(red_shape, shape)
            mask = np.expand_dims(mask, feat)
        except ValueError:
            pass
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0]))
    epsilon = draw(st.sampled_from([1e-5, 1e-3, 0.1, 1.0]))
    fshape = tuple(shape[a] for a in feat)
    stats = {"mean": rng.normal(size=fshape).astype(np.float32),
             "var": rng.uniform(0.1, 3, fshape).astype(np.float32)}
    params = {"scale": rng.uniform(-2, 2, fshape).astype(np.float32),
              "bias": rng.normal(size=fshape).astype(np.float32)}
    return x, tuple(feat), axis, mask, momentum, epsilon, stats, params


@functools.cache
def _compiled_batch_norm(training, axis, epsilon):
    """``batch_norm`` with these static settings, jitted (compiled once per signature).

    Returns ``(y, new_stats, new_stats is stats)``: the identity (inference returns the
    statistics themselves) is a property of the traced call, checked while tracing.
    """
    def run(x, stats, params, momentum, mask):
        y, new = bnjax.batch_norm(x, stats, params, training=training, axis=axis,
                                  momentum=momentum, epsilon=epsilon, mask=mask)
        return y, new, new is stats

    return jax.jit(run)


def _batch_norm(problem, training):
    x, _, axis, mask, momentum, eps, stats, params = problem
    return _compiled_batch_norm(training, axis, eps)(x, stats, params, np.float32(momentum),
                                                     mask)


def _to64(y):
    return np.asarray(y).astype(np.float64)


def _per_value(mask, feat, shape):
    """A per-position mask (without or with size-1 feature axes) as float64 of x's shape."""
    full = mask if mask.ndim == len(shape) else np.expand_dims(mask, feat)
    return np.broadcast_to(full, shape).astype(np.float64)


def _reference(x, feat, mask, momentum, eps, stats, params):
    """Float64 reference; returns y, new mean, new var and the per-feature count."""
    x = np.asarray(x, np.float64)
    red = tuple(i for i in range(x.ndim) if i not in feat)
    if mask is None:
        w = np.ones_like(x)
    elif mask.shape == x.shape:
        w = mask.astype(np.float64)
    else:
        w = _per_value(mask, feat, x.shape)
    n = w.sum(red, keepdims=True)
    safe = np.maximum(n, 1)
    mean = (w * x).sum(red, keepdims=True) / safe
    var = (w * (x - mean) ** 2).sum(red, keepdims=True) / safe
    b = lambda v: np.reshape(v, mean.shape).astype(np.float64)  # noqa: E731
    # a feature with no valid value is normalized with the moving statistics
    mean = np.where(n > 0, mean, b(stats["mean"]))
    var = np.where(n > 0, var, b(stats["var"]))
    y = (x - mean) / np.sqrt(var + eps) * b(params["scale"]) + b(params["bias"])
    fs = stats["mean"].shape
    new_mean = momentum * stats["mean"] + (1 - momentum) * mean.reshape(fs)
    new_var = momentum * stats["var"] + (1 - momentum) * var.reshape(fs)
    has = n.reshape(fs) > 0
    new_mean = np.where(has, new_mean, stats["mean"])
    new_var = np.where(has, new_var, stats["var"])
    return y, new_mean, new_var, n


@settings(SETTINGS, max_examples=120)
@given(problems())
def test_training_agrees_with_reference_or_raises_documented_error(problem):
    x, feat, axis, mask, momentum, eps, stats, params = problem
    reduced = int(np.prod([n for i, n in enumerate(x.shape) if i not in feat]))
    with warnings.catch_warnings():
        # One value per feature: the output is the bias (the reference computes the same).
        warnings.simplefilter("ignore" if reduced == 1 else "error", bnjax.SingleValueWarning)
        y, new, _ = _batch_norm(problem, training=True)
    assert y.dtype == x.dtype and y.shape == x.shape
    y = _to64(y)
    assert np.all(np.isfinite(y)), "NaN or Inf from finite input"
    y_ref, mean_ref, var_ref, n = _reference(x, feat, mask, momentum, eps, stats, params)
    np.testing.assert_allclose(new["mean"], mean_ref, rtol=2e-5, atol=1e-5 * (
        1 + np.abs(np.asarray(x, np.float64)).max()))
    np.testing.assert_allclose(new["var"], var_ref, rtol=2e-4, atol=1e-5)
    # output tolerance: rounding of the output dtype plus float32 statistics on |x| / sqrt(eps)
    out_eps = {np.dtype(np.float32): 1e-6, jnp.dtype(jnp.float16): 1e-3,
               jnp.dtype(jnp.bfloat16): 8e-3}[np.dtype(x.dtype)]
    gain = np.abs(params["scale"]).max() / np.sqrt(eps)
    xmax = np.abs(np.asarray(x, np.float64)).max()
    tol = out_eps * np.abs(y_ref).max() + 3e-7 * xmax * gain + 1e-6
    np.testing.assert_allclose(y, y_ref, atol=tol, rtol=0)


@settings(SETTINGS, max_examples=100)  # one normalization: fewer cases to cover
@given(problems())
def test_inference_agrees_with_reference(problem):
    x, feat, axis, mask, momentum, eps, stats, params = problem
    y, new, same = _batch_norm(problem, training=False)
    assert same  # inference returns the statistics themselves
    jax.tree.map(np.testing.assert_array_equal, new, stats)
    shape = [x.shape[i] if i in feat else 1 for i in range(x.ndim)]
    b = lambda v: np.reshape(v, shape).astype(np.float64)  # noqa: E731
    y_ref = (np.asarray(x, np.float64) - b(stats["mean"])) / np.sqrt(b(stats["var"]) + eps) * b(
        params["scale"]) + b(params["bias"])
    out_eps = {np.dtype(np.float32): 1e-6, jnp.dtype(jnp.float16): 1e-3,
               jnp.dtype(jnp.bfloat16): 8e-3}[np.dtype(x.dtype)]
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_allclose(_to64(y), y_ref, atol=out_eps * (np.abs(y_ref).max() + 1) * 2,
                               rtol=0)


def _naive_loss64(x, scale, bias, feat, eps, valid):
    """Float64 naive BN written out; the loss reads valid outputs only (padding)."""
    red = tuple(i for i in range(x.ndim) if i not in feat)
    n = valid.sum(red, keepdims=True)
    safe = jnp.maximum(n, 1)
    mean = (valid * x).sum(red, keepdims=True) / safe
    var = (valid * (x - mean) ** 2).sum(red, keepdims=True) / safe
    y = (x - mean) / jnp.sqrt(var + eps) * scale.reshape(mean.shape) + bias.reshape(mean.shape)
    return jnp.sum(jnp.where((valid > 0) & (n > 0), y * jnp.cos(y), 0.0))


# Its gradients, compiled once per shape and feature axes (epsilon is traced here).
_naive_grads64 = jax.jit(jax.grad(_naive_loss64, argnums=(0, 1, 2)), static_argnums=(3,))


@functools.cache
def _compiled_grads(axis, epsilon):
    """Gradients (input, params) of bnjax's training output read at valid positions, jitted."""
    def loss(x, params, stats, mask, valid):
        y, _ = bnjax.batch_norm(x, stats, params, training=True, axis=axis, epsilon=epsilon,
                                mask=mask)
        y = y.astype(jnp.float32)
        return jnp.sum(jnp.where(valid, y * jnp.cos(y), 0.0))

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


@settings(SETTINGS, max_examples=20)
@given(problems(few_shapes=True))
def test_gradients_agree_with_float64_reference(problem):
    """Gradients (input, scale, bias) against the naive formula differentiated in float64."""
    x, feat, axis, mask, momentum, eps, stats, params = problem
    reduced = int(np.prod([n for i, n in enumerate(x.shape) if i not in feat]))
    if reduced == 1:
        return
    x32 = x.astype(np.float32)
    red = tuple(i for i in range(x.ndim) if i not in feat)
    x64 = x32.astype(np.float64)
    mean, std = np.abs(x64.mean(red)), x64.std(red)
    if np.any((std > 0) & (mean > 1e3 * std)):
        # float32 holds x - mean only to ~1e-7 |mean|: past |mean| / std = 1e3 the rounding of
        # the input itself exceeds the tolerance (the statistics are still exact, see above).
        return
    if mask is None:
        valid = np.ones(x.shape)
    elif mask.shape == x.shape:
        valid = mask.astype(np.float64)
    else:
        valid = _per_value(mask, feat, x.shape)

    gx, gp = _compiled_grads(axis, eps)(x32, params, stats, mask, valid > 0)
    with jax.enable_x64(True):
        fshape = tuple(x.shape[a] for a in feat)
        want = _naive_grads64(
            jnp.asarray(x32, jnp.float64), jnp.asarray(params["scale"], jnp.float64),
            jnp.asarray(params["bias"], jnp.float64), feat, eps, jnp.asarray(valid))
        shapes = (x.shape, fshape, fshape)
        want = [np.asarray(w).reshape(s) for w, s in zip(want, shapes, strict=True)]
    for got, ref in zip((gx, gp["scale"], gp["bias"]), want, strict=True):
        got = np.asarray(got, np.float64)
        assert np.all(np.isfinite(got))
        # float32 statistics: relative to the gradient's scale, amplified by 1/sqrt(eps)
        tol = 2e-4 * (np.abs(ref).max() + 1) * (1 + 1e-2 / np.sqrt(eps))
        np.testing.assert_allclose(got, ref, atol=tol, rtol=0)


@st.composite
def bad_arguments(draw):
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(2, 4), min_size=ndim, max_size=ndim)))
    kind = draw(st.sampled_from(["axis_range", "axis_repeat", "momentum", "epsilon", "mask",
                                 "stats"]))
    kwargs = {"axis": -1, "momentum": 0.99, "epsilon": 1e-3, "mask": None}
    fshape = (shape[-1],)
    if kind == "axis_range":
        kwargs["axis"] = draw(st.sampled_from([ndim, ndim + 3, -ndim - 1]))
        words = ["axis=", "out of range"]
    elif kind == "axis_repeat":
        kwargs["axis"] = (ndim - 1, -1)
        words = ["axis=", "more than once"]
    elif kind == "momentum":
        kwargs["momentum"] = draw(st.sampled_from([-0.5, -1e-6, 1.0001, 5.0]))
        words = [f"momentum={kwargs['momentum']!r}", "[0, 1]"]
    elif kind == "epsilon":
        kwargs["epsilon"] = draw(st.sampled_from([0.0, -1e-3, -1.0]))
        words = [f"epsilon={kwargs['epsilon']!r}", "> 0"]
    elif kind == "mask":
        kwargs["mask"] = np.ones(shape[:-1] + (shape[-1] + 1,), bool)
        words = ["mask has shape", "must have shape"]
    else:
        fshape = (shape[-1] + 1,)
        words = ["stats['mean'] has shape", "feature shape"]
    training = draw(st.booleans())
    return shape, fshape, kwargs, training, words


@SETTINGS
@given(bad_arguments())
def test_bad_arguments_always_raise_documented_errors(case):
    shape, fshape, kwargs, training, words = case
    stats = {"mean": np.zeros(fshape, np.float32), "var": np.ones(fshape, np.float32)}
    with pytest.raises(ValueError) as info:
        bnjax.batch_norm(np.ones(shape, np.float32), stats, training=training, **kwargs)
    for w in words:
        assert w in str(info.value)
