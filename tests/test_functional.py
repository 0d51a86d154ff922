"""bnjax.batch_norm and its helpers against float64 NumPy references written here."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax

# ---------------------------------------------------------------------------------------------
# Float64 NumPy reference (the Keras / BN-paper formulas, written independently of bnjax).


def _red_axes(ndim, feature_axes):
    return tuple(i for i in range(ndim) if i not in feature_axes)


def ref_moments(x, feature_axes, mask=None):
    x = np.asarray(x, np.float64)
    red = _red_axes(x.ndim, feature_axes)
    w = np.ones_like(x) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
    n = w.sum(axis=red, keepdims=True)
    mean = (w * x).sum(axis=red, keepdims=True) / n
    var = (w * (x - mean) ** 2).sum(axis=red, keepdims=True) / n
    return mean, var


def ref_bn_train(x, feature_axes, run_mean, run_var, scale, bias, momentum, eps, mask=None):
    mean, var = ref_moments(x, feature_axes, mask)
    x = np.asarray(x, np.float64)
    shape = mean.shape
    y = (x - mean) / np.sqrt(var + eps) * np.reshape(scale, shape) + np.reshape(bias, shape)
    new_mean = momentum * run_mean + (1 - momentum) * mean.reshape(run_mean.shape)
    new_var = momentum * run_var + (1 - momentum) * var.reshape(run_var.shape)
    return y, new_mean, new_var


def _feature_axes(axis, ndim):
    axes = (axis,) if isinstance(axis, int) else axis
    return tuple(sorted(a % ndim for a in axes))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b) / (np.abs(b) + 1e-6))


CASES = [
    # shape, axis
    ((16, 5), -1),
    ((4, 6, 6, 3), -1),
    ((4, 3, 6, 6), 1),
    ((5, 4, 3, 2), (1, 3)),
    ((7, 2, 9), (-3, 1)),
]


@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("momentum,eps", [(0.99, 1e-3), (0.5, 1e-5), (0.0, 1e-2), (1.0, 1e-3)])
@pytest.mark.parametrize("mask_kind", [None, "reduced", "full"])
def test_training_several_steps_matches_reference(shape, axis, momentum, eps, mask_kind):
    rng = np.random.default_rng(0)
    fa = _feature_axes(axis, len(shape))
    fshape = tuple(shape[a] for a in fa)
    scale = rng.uniform(0.5, 2.0, fshape).astype(np.float32)
    bias = rng.normal(size=fshape).astype(np.float32)
    stats = {"mean": jnp.zeros(fshape), "var": jnp.ones(fshape)}
    run_mean, run_var = np.zeros(fshape), np.ones(fshape)
    step = jax.jit(
        lambda x, s, m: bnjax.batch_norm(x, s, {"scale": scale, "bias": bias}, training=True,
                                         axis=axis, momentum=momentum, epsilon=eps, mask=m)
    )
    for _ in range(3):
        x = (rng.normal(size=shape) * rng.uniform(0.5, 3) + rng.normal() * 4).astype(np.float32)
        if mask_kind is None:
            mask = None
        else:
            mshape = shape if mask_kind == "full" else tuple(
                n if i not in fa else 1 for i, n in enumerate(shape))
            mask = rng.random(mshape) < 0.7
            mask.reshape(-1)[:3] = True  # at least a few valid values everywhere
            if mask_kind == "reduced":
                mask = np.squeeze(mask, axis=fa)
                mask_ref = np.expand_dims(mask, fa)
            else:
                mask_ref = mask
                # every feature needs two valid values for a defined variance
                idx = [0] * len(shape)
                mask_ref[tuple(slice(None) if i in fa else slice(0, 2)
                               for i in range(len(shape)))] = True
                del idx
        y, stats = step(x, stats, None if mask is None else jnp.asarray(mask))
        y_ref, run_mean, run_var = ref_bn_train(
            x, fa, run_mean, run_var, scale, bias, momentum, eps,
            None if mask is None else mask_ref)
        np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(stats["mean"], run_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["var"], run_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,axis", CASES)
def test_inference_uses_moving_statistics(shape, axis):
    rng = np.random.default_rng(1)
    fa = _feature_axes(axis, len(shape))
    fshape = tuple(shape[a] for a in fa)
    x = rng.normal(size=shape).astype(np.float32) * 3 + 1
    stats = {"mean": jnp.asarray(rng.normal(size=fshape), jnp.float32),
             "var": jnp.asarray(rng.uniform(0.1, 4, fshape), jnp.float32)}
    params = {"scale": jnp.asarray(rng.normal(size=fshape), jnp.float32),
              "bias": jnp.asarray(rng.normal(size=fshape), jnp.float32)}
    y, new = bnjax.batch_norm(x, stats, params, training=False, axis=axis, epsilon=1e-3)
    assert new is stats
    bshape = [1] * len(shape)
    for a, n in zip(fa, fshape, strict=True):
        bshape[a] = n
    b = lambda v: np.asarray(v, np.float64).reshape(bshape)  # noqa: E731
    y_ref = (x - b(stats["mean"])) / np.sqrt(b(stats["var"]) + 1e-3) * b(params["scale"]) + b(
        params["bias"])
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", [{}, {"scale"}, {"bias"}, {"scale", "bias"}])
def test_params_keys_optional(which):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8, 3)).astype(np.float32)
    params = {k: jnp.full(3, 2.0 if k == "scale" else 0.5) for k in which}
    y, _ = bnjax.batch_norm(x, {"mean": jnp.zeros(3), "var": jnp.ones(3)}, params,
                            training=True)
    m, v = ref_moments(x, (1,))
    y_ref = (x - m) / np.sqrt(v + 1e-3) * (2.0 if "scale" in which else 1.0) + (
        0.5 if "bias" in which else 0.0)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Gradients: the naive formula differentiated by jax in float64.


def _naive_loss64(x, scale, bias, feature_axes, eps, mask, w):
    red = _red_axes(x.ndim, feature_axes)
    m = jnp.ones(x.shape) if mask is None else jnp.broadcast_to(mask, x.shape).astype(x.dtype)
    n = m.sum(red, keepdims=True)
    mean = (m * x).sum(red, keepdims=True) / n
    var = (m * (x - mean) ** 2).sum(red, keepdims=True) / n
    y = (x - mean) / jnp.sqrt(var + eps) * scale.reshape(mean.shape) + bias.reshape(mean.shape)
    return jnp.sum(jnp.sin(y) * w)


@pytest.mark.parametrize("shape,axis", CASES[:4])
@pytest.mark.parametrize("masked", [False, True])
def test_gradients_match_float64_naive_formula(shape, axis, masked):
    rng = np.random.default_rng(3)
    fa = _feature_axes(axis, len(shape))
    fshape = tuple(shape[a] for a in fa)
    x = (rng.normal(size=shape) * 2 + 3).astype(np.float32)
    scale = rng.uniform(0.5, 2, fshape).astype(np.float32)
    bias = rng.normal(size=fshape).astype(np.float32)
    w = rng.normal(size=shape).astype(np.float32)
    mask = None
    if masked:
        mask = np.expand_dims(rng.random([n for i, n in enumerate(shape) if i not in fa]) < 0.6,
                              fa)
        mask.reshape(-1)[:2] = True
        # Outputs at masked-out positions carry no gradient (they are padding): the loss
        # reads valid outputs only, so the naive formula's gradient is the reference.
        w = w * mask

    def loss(x, scale, bias):
        y, _ = bnjax.batch_norm(
            x, {"mean": jnp.zeros(fshape), "var": jnp.ones(fshape)},
            {"scale": scale, "bias": bias}, training=True, axis=axis,
            mask=None if mask is None else np.squeeze(mask, fa))
        return jnp.sum(jnp.sin(y) * w)

    got = jax.grad(loss, argnums=(0, 1, 2))(x, scale, bias)
    with jax.enable_x64(True):
        want = jax.grad(_naive_loss64, argnums=(0, 1, 2))(
            jnp.asarray(x, jnp.float64), jnp.asarray(scale, jnp.float64),
            jnp.asarray(bias, jnp.float64), fa, 1e-3, mask, jnp.asarray(w, jnp.float64))
        want = [np.asarray(g) for g in want]
    for g, r in zip(got, want, strict=True):
        scale_r = np.max(np.abs(r))
        np.testing.assert_allclose(np.asarray(g, np.float64) / scale_r, r / scale_r, atol=1e-4)


def test_gradient_through_returned_statistics():
    """Cotangents of the new moving statistics flow back to x like the naive formula's."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(12, 4)).astype(np.float32) + 2

    def loss(x):
        y, new = bnjax.batch_norm(x, {"mean": jnp.zeros(4), "var": jnp.ones(4)},
                                  training=True, momentum=0.9)
        return jnp.sum(y**3) + jnp.sum(new["mean"] * 3.0) + jnp.sum(new["var"] ** 2)

    def ref(x):
        mean = x.mean(0)
        var = ((x - mean) ** 2).mean(0)
        y = (x - mean) / jnp.sqrt(var + 1e-3)
        return jnp.sum(y**3) + jnp.sum(0.1 * mean * 3.0) + jnp.sum((0.9 + 0.1 * var) ** 2)

    got = jax.grad(loss)(x)
    with jax.enable_x64(True):
        want = np.asarray(jax.grad(ref)(jnp.asarray(x, jnp.float64)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# ---------------------------------------------------------------------------------------------
# Numerics and dtypes.


@pytest.mark.parametrize("ratio", [1e2, 1e4])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_variance_accurate_with_large_mean(ratio, sign):
    rng = np.random.default_rng(5)
    std = np.array([1.0, 0.01, 300.0])
    x = (sign * ratio * std + rng.normal(size=(4096, 3)) * std).astype(np.float32)
    m = bnjax.moments(x)
    ref_var = np.asarray(x, np.float64).var(0)
    np.testing.assert_allclose(m.var, ref_var, rtol=1e-3)
    np.testing.assert_allclose(m.mean, np.asarray(x, np.float64).mean(0), rtol=1e-6)
    # the textbook one-pass formula would be far off here: the test can tell the difference
    naive = np.mean(x * x, 0, dtype=np.float32) - np.mean(x, 0, dtype=np.float32) ** 2
    if ratio >= 1e4:
        assert np.max(np.abs(naive - ref_var) / ref_var) > 1e-2


def test_variance_never_negative_on_constant_channels():
    x = jnp.full((64, 3), 1234.567, jnp.float32)
    m = bnjax.moments(x)
    assert np.all(np.asarray(m.var) >= 0)
    np.testing.assert_allclose(m.var, 0.0, atol=1e-6)
    y, _ = bnjax.batch_norm(x, {"mean": jnp.zeros(3), "var": jnp.ones(3)}, training=True)
    assert np.all(np.isfinite(np.asarray(y)))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_statistics_in_float32(dtype):
    rng = np.random.default_rng(6)
    x32 = (rng.normal(size=(256, 8)) * 2 + 50).astype(np.float32)
    x = jnp.asarray(x32).astype(dtype)
    stats = {"mean": jnp.zeros(8), "var": jnp.ones(8)}
    y, new = bnjax.batch_norm(x, stats, training=True)
    assert y.dtype == dtype
    assert new["mean"].dtype == jnp.float32 and new["var"].dtype == jnp.float32
    m = bnjax.moments(x)
    assert m.mean.dtype == jnp.float32
    xr = np.asarray(x.astype(jnp.float32), np.float64)  # the values actually given
    np.testing.assert_allclose(m.var, xr.var(0), rtol=1e-5)
    y_ref = (xr - xr.mean(0)) / np.sqrt(xr.var(0) + 1e-3)
    tol = 1e-2 if dtype == jnp.bfloat16 else 2e-3
    np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), y_ref, atol=tol * 4, rtol=tol)


def test_float64_stays_float64_with_x64():
    with jax.enable_x64(True):
        rng = np.random.default_rng(7)
        x = jnp.asarray(rng.normal(size=(32, 4)) + 1e6, jnp.float64)
        stats = {"mean": jnp.zeros(4, jnp.float64), "var": jnp.ones(4, jnp.float64)}
        y, new = bnjax.batch_norm(x, stats, training=True)
        assert y.dtype == jnp.float64 and new["var"].dtype == jnp.float64
        xr = np.asarray(x)
        np.testing.assert_allclose(y, (xr - xr.mean(0)) / np.sqrt(xr.var(0) + 1e-3), rtol=1e-8,
                                   atol=1e-8)


def test_dtype_argument_sets_output_dtype():
    x = jnp.ones((4, 2), jnp.bfloat16) * jnp.arange(4, dtype=jnp.bfloat16)[:, None]
    y, _ = bnjax.batch_norm(x, {"mean": jnp.zeros(2), "var": jnp.ones(2)}, training=True,
                            dtype=jnp.float32)
    assert y.dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# Named axes and the non-finite guard.


@pytest.mark.parametrize("masked", [False, True])
def test_vmap_axis_name_gives_global_statistics(masked):
    rng = np.random.default_rng(8)
    x = (rng.normal(size=(4, 6, 3)) * 2 + 100).astype(np.float32)
    mask = rng.random((4, 6)) < 0.6
    mask[0] = False  # one member holds no valid rows at all
    mask[1, :2] = True
    stats = {"mean": jnp.zeros(3), "var": jnp.ones(3)}

    def f(xi, mi):
        return bnjax.batch_norm(xi, stats, training=True, axis_name="d", momentum=0.9,
                                mask=mi if masked else None)

    y, new = jax.vmap(f, axis_name="d")(x, mask)
    flat, fmask = x.reshape(-1, 3), mask.reshape(-1)
    sel = flat[fmask] if masked else flat
    mean, var = sel.astype(np.float64).mean(0), sel.astype(np.float64).var(0)
    np.testing.assert_allclose(y.reshape(-1, 3), (flat - mean) / np.sqrt(var + 1e-3), rtol=1e-4,
                               atol=1e-4)
    for i in range(4):
        np.testing.assert_allclose(new["mean"][i], 0.1 * mean, rtol=1e-5)
        np.testing.assert_allclose(new["var"][i], 0.9 + 0.1 * var, rtol=1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_batch_keeps_moving_statistics(bad):
    rng = np.random.default_rng(9)
    x = rng.normal(size=(8, 3)).astype(np.float32)
    x[2, 1] = bad
    stats = {"mean": jnp.array([0.5, 0.5, 0.5]), "var": jnp.array([2.0, 2.0, 2.0])}
    _, new = bnjax.batch_norm(x, stats, training=True)
    np.testing.assert_array_equal(new["mean"][1], 0.5)
    np.testing.assert_array_equal(new["var"][1], 2.0)
    np.testing.assert_allclose(new["mean"][0], 0.99 * 0.5 + 0.01 * x[:, 0].mean(), rtol=1e-5)
    _, unguarded = bnjax.batch_norm(x, stats, training=True, guard_non_finite=False)
    assert not np.isfinite(np.asarray(unguarded["var"][1]))


def test_fully_masked_feature_keeps_moving_statistics_and_stays_finite():
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    mask = np.zeros((4, 3), bool)
    mask[:, 0] = True
    stats = {"mean": jnp.ones(3), "var": jnp.ones(3) * 3}
    y, new = bnjax.batch_norm(x, stats, training=True, mask=mask)
    assert np.all(np.isfinite(np.asarray(y)))
    np.testing.assert_array_equal(new["mean"][1:], 1.0)
    np.testing.assert_array_equal(new["var"][1:], 3.0)


def test_single_valid_row_under_mask_is_finite():
    x = np.random.default_rng(10).normal(size=(6, 2)).astype(np.float32)
    mask = np.zeros(6, bool)
    mask[3] = True
    y, new = bnjax.batch_norm(x, {"mean": jnp.zeros(2), "var": jnp.ones(2)},
                              {"bias": jnp.array([0.25, -1.0])}, training=True, mask=mask)
    np.testing.assert_allclose(y[3], [0.25, -1.0], atol=1e-6)
    np.testing.assert_allclose(new["mean"], 0.01 * x[3], rtol=1e-5)
    np.testing.assert_allclose(new["var"], 0.99, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Errors: type and the words of the message.

STATS3 = {"mean": jnp.zeros(3), "var": jnp.ones(3)}


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        ({"axis": 2}, ValueError, ["axis=2", "out of range", "[-2, 1]"]),
        ({"axis": -3}, ValueError, ["axis=-3", "out of range"]),
        ({"axis": (1, -1)}, ValueError, ["axis=(1, -1)", "more than once"]),
        ({"axis": 1.0}, TypeError, ["axis=1.0", "int"]),
        ({"momentum": 1.5}, ValueError, ["momentum=1.5", "[0, 1]"]),
        ({"momentum": -0.1}, ValueError, ["momentum=-0.1", "[0, 1]"]),
        ({"epsilon": 0.0}, ValueError, ["epsilon=0.0", "> 0"]),
        ({"epsilon": -1e-3}, ValueError, ["epsilon=-0.001", "> 0"]),
        ({"mask": np.ones((4, 2), bool)}, ValueError, ["mask has shape (4, 2)", "(4,)", "(4, 3)"]),
        ({"mask": np.ones(4, np.int32)}, TypeError, ["mask", "int32", "boolean"]),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, exc, words):
    with pytest.raises(exc) as info:
        bnjax.batch_norm(jnp.ones((4, 3)), STATS3, training=True, **kwargs)
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.uint8])
def test_integer_or_boolean_input_rejected(dtype):
    with pytest.raises(TypeError) as info:
        bnjax.batch_norm(jnp.ones((4, 3), dtype), STATS3, training=True)
    msg = str(info.value)
    assert f"x has dtype {jnp.dtype(dtype)}" in msg and "floating-point" in msg


def test_feature_size_mismatch_rejected():
    with pytest.raises(ValueError) as info:
        bnjax.batch_norm(jnp.ones((4, 5)), STATS3, training=False)
    assert "stats['mean'] has shape (3,)" in str(info.value)
    assert "feature shape (5,)" in str(info.value)
    with pytest.raises(ValueError, match=r"params\['scale'\] has shape \(2,\)"):
        bnjax.batch_norm(jnp.ones((4, 3)), STATS3, {"scale": jnp.ones(2)}, training=False)


@pytest.mark.parametrize("shape,axis", [((1, 3), -1), ((2, 3), (0, 1)), ((1, 1, 1, 4), -1)])
def test_single_value_per_channel_in_training_warns_and_gives_the_bias(shape, axis):
    # One value per feature: mean = x, variance 0, so x - mean = 0 and y = bias (Flax, Keras).
    feat = _feature_axes(axis, len(shape))
    fshape = tuple(shape[a] for a in feat)
    rng = np.random.default_rng(3)
    x = rng.normal(size=shape).astype(np.float32)
    stats = {"mean": jnp.full(fshape, 0.5), "var": jnp.full(fshape, 2.0)}
    params = {"scale": jnp.asarray(rng.normal(size=fshape), jnp.float32),
              "bias": jnp.asarray(rng.normal(size=fshape), jnp.float32)}
    with pytest.warns(bnjax.SingleValueWarning, match="single value per feature channel"):
        y, new = bnjax.batch_norm(x, stats, params, training=True, axis=axis, momentum=0.9,
                                  epsilon=1e-5)
    y_ref, mean_ref, var_ref = ref_bn_train(x, feat, np.full(fshape, 0.5), np.full(fshape, 2.0),
                                            params["scale"], params["bias"], 0.9, 1e-5)
    np.testing.assert_allclose(y, y_ref, atol=1e-6)
    np.testing.assert_allclose(y, np.broadcast_to(
        np.asarray(params["bias"]).reshape([shape[i] if i in feat else 1
                                            for i in range(len(shape))]), shape), atol=1e-6)
    np.testing.assert_allclose(new["mean"], mean_ref, rtol=1e-6)
    np.testing.assert_allclose(new["var"], var_ref, rtol=1e-6)
    # inference mode is fine with one value per channel, and does not warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bnjax.batch_norm(x, stats, training=False, axis=axis)


def test_single_value_matches_flax_and_the_warning_can_be_an_error():
    import flax.linen as nn

    x = jnp.asarray([[0.3, -1.2, 4.0]])
    variables = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    flax_y, flax_up = nn.BatchNorm(use_running_average=False, momentum=0.9).apply(
        variables, x, mutable=["batch_stats"])
    with pytest.warns(bnjax.SingleValueWarning):
        y, new = bnjax.batch_norm(x, {"mean": jnp.zeros(3), "var": jnp.ones(3)},
                                  {"scale": jnp.ones(3), "bias": jnp.zeros(3)}, training=True,
                                  momentum=0.9, epsilon=1e-5)
    np.testing.assert_allclose(y, flax_y, atol=1e-6)
    np.testing.assert_allclose(new["mean"], flax_up["batch_stats"]["mean"], rtol=1e-6)
    np.testing.assert_allclose(new["var"], flax_up["batch_stats"]["var"], rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", bnjax.SingleValueWarning)
        with pytest.raises(bnjax.SingleValueWarning):
            bnjax.batch_norm(x, {"mean": jnp.zeros(3), "var": jnp.ones(3)}, training=True)


def test_single_value_ghost_batches_still_raise():
    with pytest.raises(ValueError, match="virtual_batch_size=1 .* single value per feature"):
        bnjax.batch_norm(jnp.ones((4, 3)), STATS3, training=True, virtual_batch_size=1)


def test_training_must_be_a_python_bool():
    with pytest.raises(TypeError, match="training=None"):
        bnjax.batch_norm(jnp.ones((4, 3)), STATS3, training=None)
