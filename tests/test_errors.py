"""Bad input is answered, not absorbed: each error names the argument; nothing silently wrong."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
import bnjax.nnx

X = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32) * 2 + 1
STATS = {"mean": np.zeros(3, np.float32), "var": np.ones(3, np.float32)}


def bn(**kwargs):
    kwargs.setdefault("training", True)
    return bnjax.batch_norm(kwargs.pop("x", X), kwargs.pop("stats", STATS), **kwargs)


@pytest.mark.parametrize("value", [jnp.float32(1.5), np.float64(-0.1), np.nan, float("nan"),
                                   jnp.array(2.0), np.float32(np.inf)])
@pytest.mark.parametrize("name", ["momentum", "renorm_momentum"])
def test_concrete_array_momentum_is_checked_like_a_number(name, value):
    kwargs = {name: value}
    stats = STATS
    if name == "renorm_momentum":
        kwargs["renorm"] = True
        stats = bnjax.init_renorm_stats(STATS)
    with pytest.raises(ValueError, match=f"{name}="):
        bn(stats=stats, **kwargs)


@pytest.mark.parametrize("value", [jnp.float32(-1), np.float64(0.0), np.inf, float("nan"),
                                   jnp.array(-1e-3)])
def test_concrete_array_epsilon_is_checked_like_a_number(value):
    with pytest.raises(ValueError, match="epsilon="):
        bn(epsilon=value)
    with pytest.raises(ValueError, match="epsilon="):
        bn(epsilon=value, training=False)


def test_traced_epsilon_gets_a_clear_error():
    with pytest.raises(TypeError, match="epsilon=.*static"):
        jax.jit(lambda e: bn(epsilon=e)[0])(1e-3)
    layer = bnjax.BatchNorm()
    variables = layer.init(jax.random.key(0), X, use_running_average=True)
    with pytest.raises(TypeError, match="epsilon=.*static"):
        jax.jit(lambda e: bnjax.BatchNorm(epsilon=e).apply(variables, X, True))(1e-3)


def test_traced_momentum_schedule_is_allowed_and_a_nan_one_cannot_poison():
    @jax.jit
    def step(momentum):
        return bn(momentum=momentum)[1]

    new = step(jnp.float32(0.5))
    np.testing.assert_allclose(new["mean"], 0.5 * X.astype(np.float64).mean(0), rtol=1e-5)
    for bad in (jnp.nan, jnp.float32(1.5), jnp.float32(-3.0)):
        new = step(bad)
        if np.isnan(bad):  # a NaN update is refused by the guard; the old values stay
            np.testing.assert_array_equal(new["mean"], STATS["mean"])
            np.testing.assert_array_equal(new["var"], STATS["var"])
        assert np.all(np.isfinite(new["mean"])) and np.all(np.isfinite(new["var"]))


def test_guard_covers_an_overflowing_update():
    """Finite batch statistics, but the update itself overflows: the old values stay."""
    stats = {"mean": np.full(3, 3e38, np.float32), "var": np.full(3, 3e38, np.float32)}
    new = jax.jit(lambda m: bn(stats=stats, momentum=m)[1])(jnp.float32(1.5))
    np.testing.assert_array_equal(new["mean"], stats["mean"])
    np.testing.assert_array_equal(new["var"], stats["var"])


@pytest.mark.parametrize("shape,axis,word", [((0, 3), -1, "no values"),
                                             ((4, 0), -1, "size 0"),
                                             ((0, 2, 3), -1, "no values")])
def test_empty_batch_or_features_named_with_the_shape(shape, axis, word):
    x = np.zeros(shape, np.float32)
    stats = {"mean": np.zeros(shape[-1:], np.float32), "var": np.ones(shape[-1:], np.float32)}
    with pytest.raises(ValueError, match=re.escape(f"x has shape {shape}") + f".*{word}"):
        bnjax.batch_norm(x, stats, training=True, axis=axis)
    with pytest.raises(ValueError, match="x has shape"):
        bnjax.moments(x, axis)


@pytest.mark.parametrize("field,value", [("dtype", jnp.int32), ("param_dtype", jnp.int8),
                                         ("param_dtype", "int32"), ("dtype", bool)])
def test_integer_dtypes_rejected_by_name(field, value):
    with pytest.raises(TypeError, match=f"{field}="):
        bnjax.BatchNorm(**{field: value}).init(jax.random.key(0), X, use_running_average=True)
    with pytest.raises(TypeError, match=f"{field}="):
        bnjax.nnx.BatchNorm(3, **{field: value})
    if field == "dtype":
        with pytest.raises(TypeError, match="dtype="):
            bn(dtype=value)


@pytest.mark.parametrize("clipping,word", [({"rmax": 0.5}, "rmax=0.5"), ({"rmin": 1.5}, "rmin=1.5"),
                                           ({"dmax": -1.0}, "dmax=-1.0"),
                                           ({"rmin": 0.0}, "rmin=0.0"),
                                           ({"rmax": np.float32(0.9)}, "rmax=")])
def test_renorm_clipping_limits_checked(clipping, word):
    with pytest.raises(ValueError, match=f"renorm_clipping has {word}"):
        bn(stats=bnjax.init_renorm_stats(STATS), renorm=True, renorm_clipping=clipping)


def test_axis_index_groups_without_axis_name():
    with pytest.raises(ValueError, match="axis_index_groups=.*without axis_name"):
        bn(axis_index_groups=[[0, 1]])
    with pytest.raises(ValueError, match="axis_index_groups=.*without axis_name"):
        bnjax.BatchNorm(axis_index_groups=[[0, 1]]).init(jax.random.key(0), X,
                                                         use_running_average=True)
    with pytest.raises(ValueError, match="axis_index_groups=.*without axis_name"):
        bnjax.nnx.BatchNorm(3, axis_index_groups=[[0, 1]])


@pytest.mark.parametrize("value", ["False", 0, 1, np.array([True]), None])
def test_mode_flag_must_be_a_bool(value):
    if value is not None:
        with pytest.raises(TypeError, match="training="):
            bn(training=value)
    layer = bnjax.BatchNorm()
    variables = layer.init(jax.random.key(0), X, use_running_average=True)
    if value is None:
        with pytest.raises(ValueError, match="use_running_average"):
            layer.apply(variables, X)
        return
    with pytest.raises(TypeError, match="use_running_average="):
        layer.apply(variables, X, value, mutable=["batch_stats"])
    with pytest.raises(TypeError, match="training="):
        layer.apply(variables, X, training=value, mutable=["batch_stats"])
    with pytest.raises(TypeError, match="use_running_average="):
        bnjax.nnx.BatchNorm(3, use_running_average=value)
    with pytest.raises(TypeError, match="frozen="):
        bnjax.BatchNorm(frozen=value).init(jax.random.key(0), X, use_running_average=True)


def test_flax_flags_accepted_with_their_meaning():
    """``use_fast_variance`` changes nothing; ``force_float32_reductions=False`` keeps the
    moving statistics in ``param_dtype``, as in Flax."""
    x = np.asarray(np.random.default_rng(1).normal(size=(64, 3)) + 1e4, np.float32)
    ref_var = x.astype(np.float64).var(0)
    for fast in (True, False):
        layer = bnjax.BatchNorm(use_fast_variance=fast, momentum=0.0)
        variables = layer.init(jax.random.key(0), x, use_running_average=True)
        _, upd = layer.apply(variables, x, False, mutable=["batch_stats"])
        np.testing.assert_allclose(upd["batch_stats"]["var"], ref_var, rtol=1e-3)
    for force, dtype in ((True, jnp.float32), (False, jnp.bfloat16)):
        ours = bnjax.BatchNorm(param_dtype=jnp.bfloat16, force_float32_reductions=force)
        theirs = nn.BatchNorm(param_dtype=jnp.bfloat16, force_float32_reductions=force)
        for layer in (ours, theirs):
            v = layer.init(jax.random.key(0), x, use_running_average=True)
            assert v["batch_stats"]["mean"].dtype == dtype
            assert v["params"]["scale"].dtype == jnp.bfloat16


def test_finite_float32_bound_is_exact_as_documented():
    """Training output is finite while sum((x - x_0)^2) over a feature's values stays in
    float32's range (x_0 its first value); past it the batch variance overflows, and the guard
    keeps the moving statistics intact."""
    fmax = float(np.finfo(np.float32).max)
    n = 64
    for factor, finite in ((0.98, True), (1.05, False)):
        d = np.float32(np.sqrt(factor * fmax / (n // 2)))  # half the values at x_0 + d
        x = np.zeros((n, 1), np.float32)
        x[1::2] = d
        y, new = bnjax.batch_norm(x, {"mean": np.zeros(1, np.float32),
                                      "var": np.ones(1, np.float32)}, training=True)
        if finite:
            assert np.all(np.isfinite(y))
            np.testing.assert_allclose(np.abs(y), 1.0, rtol=1e-4)
            np.testing.assert_allclose(new["var"], 0.01 * (d / 2.0) ** 2 + 0.99, rtol=1e-4)
        else:
            np.testing.assert_array_equal(new["var"], 1.0)  # overflow refused by the guard
            np.testing.assert_array_equal(new["mean"], 0.0)
