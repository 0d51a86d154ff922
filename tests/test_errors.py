"""Bad input is answered, not absorbed: each error names the argument; nothing silently wrong."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

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


def test_mask_shape_with_two_meanings_is_refused_and_each_spelling_works():
    """A (C,) mask on (B, C) with B == C: per row (bnjax's old reading) or per feature
    (NumPy broadcasting, Flax's); refused, and both explicit spellings mean what they say."""
    x = np.random.default_rng(1).normal(size=(3, 3)) + np.arange(3)
    flags = np.array([True, False, True])
    with pytest.raises(ValueError, match=r"mask has shape \(3,\).*means two things.*"
                                         r"mask\.reshape\(\(3, 1\)\).*mask\.reshape\(\(1, 3\)\)"):
        bn(x=jnp.asarray(x, jnp.float32), mask=flags)
    _, per_row = bn(x=jnp.asarray(x, jnp.float32), mask=flags.reshape(3, 1), momentum=0.0)
    np.testing.assert_allclose(per_row["mean"], x[flags].mean(0), rtol=1e-5)
    _, per_feature = bn(x=jnp.asarray(x, jnp.float32), mask=flags.reshape(1, 3), momentum=0.0)
    np.testing.assert_allclose(per_feature["mean"][flags], x.mean(0)[flags], rtol=1e-5)
    # The feature without any valid value keeps its moving statistics.
    np.testing.assert_allclose(per_feature["mean"][1], STATS["mean"][1])
    # Unambiguous shapes are read as before: (B,) with B != C is one flag per row.
    _, rows = bn(x=X[:4], mask=np.array([True, True, False, True]), momentum=0.0)
    np.testing.assert_allclose(rows["mean"], X[[0, 1, 3]].astype(np.float64).mean(0), rtol=1e-5)


def test_axis_index_groups_under_shard_map_is_refused_in_the_forward():
    mesh = jax.make_mesh((4,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    stats = {"mean": jnp.zeros(3), "var": jnp.ones(3)}

    def f(x):
        return bnjax.batch_norm(x, stats, training=True, axis_name="d",
                                axis_index_groups=[[0, 1], [2, 3]])[0]

    sharded = jax.shard_map(f, mesh=mesh, in_specs=jax.P("d"), out_specs=jax.P("d"))
    with pytest.raises(ValueError, match=r"axis_index_groups=.*jax\.shard_map.*mesh axis"):
        jax.jit(sharded)(jnp.ones((8, 3)))


def test_subnormal_epsilon_is_refused_where_it_would_give_nan():
    constant = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"epsilon=1e-40 is below the smallest normal float32"):
        bn(x=constant, epsilon=1e-40)
    with pytest.raises(ValueError, match=r"epsilon=0\.0 must be finite and > 0"):
        bnjax.BatchNorm(epsilon=0.0).init(jax.random.key(0), constant, training=False)
    with pytest.raises(ValueError, match="smallest normal float32"):
        bnjax.BatchNorm(epsilon=1e-40).init(jax.random.key(0), constant, training=False)
    # In float64 1e-40 is a normal number: accepted, and the constant channel stays finite.
    with jax.enable_x64(True):
        y, _ = bn(x=constant.astype(np.float64), epsilon=1e-40,
                  stats={k: v.astype(np.float64) for k, v in STATS.items()})
        assert np.isfinite(np.asarray(y)).all()


@pytest.mark.parametrize("name, value", [("momentum", "0.9"), ("epsilon", "1e-3"),
                                         ("momentum", [0.9]), ("epsilon", b"1")])
def test_non_numbers_are_refused(name, value):
    with pytest.raises(TypeError, match=f"{name}=.*must be a real scalar"):
        bn(**{name: value})
    with pytest.raises(TypeError, match=f"{name}=.*must be a real scalar"):
        bnjax.BatchNorm(**{name: value}).init(jax.random.key(0), X, training=False)
    with pytest.raises(TypeError, match=f"{name}=.*must be a real scalar"):
        bnjax.nnx.BatchNorm(3, **{name: value})


def test_from_torch_of_a_whole_model_names_the_layer_prefixes():
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2),
                                torch.nn.ReLU(), torch.nn.Conv2d(2, 2, 3),
                                torch.nn.BatchNorm2d(2))
    with pytest.raises(ValueError, match=r"2 batch norm layer\(s\), under the prefixes '1\.', "
                                         r"'4\.'.*prefix='1\.'"):
        bnjax.convert.from_torch(model.state_dict())
    converted = bnjax.convert.from_torch(model.state_dict(), prefix="4.")
    np.testing.assert_allclose(converted.variables["batch_stats"]["var"],
                               model[4].running_var.numpy())


class _NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(3, 4, rngs=rngs)
        self.norm = bnjax.nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.dense(x))


class _Bridged(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(2)(nnx.bridge.to_linen(_NNXNet)(x))


def test_inference_tools_refuse_nnx_models_by_name():
    model, x = _NNXNet(nnx.Rngs(0)), np.ones((4, 3), np.float32)
    tools = {
        "fold_batch_norm": lambda m, v: bnjax.fold_batch_norm(m, v, x),
        "precise_batch_stats": lambda m, v: bnjax.precise_batch_stats(m, v, [x]),
        "mc_batch_norm_predict": lambda m, v: bnjax.mc_batch_norm_predict(
            m, v, x, [x], num_samples=2, rng=jax.random.key(0)),
    }
    for name, tool in tools.items():
        with pytest.raises(TypeError, match=f"{name} takes a flax.linen model; _NNXNet is a "
                                            "flax.nnx.Module"):
            tool(model, nnx.state(model))
    bridged = _Bridged()
    variables = bridged.init(jax.random.key(0), x)
    for tool in tools.values():  # precise_batch_stats reports it as the model failing to run
        with pytest.raises((TypeError, ValueError), match=r"'ToLinen_0'.*bridged to linen"):
            tool(bridged, variables)


def test_training_with_immutable_batch_stats_names_the_layer_path_as_flax_does():
    class Block(nn.Module):
        norm: type

        @nn.compact
        def __call__(self, x, train: bool):
            return self.norm(epsilon=1e-5, name="bn")(x, use_running_average=not train)

    class Net(nn.Module):
        norm: type

        @nn.compact
        def __call__(self, x, train: bool):
            return Block(self.norm, name="block")(x, train)

    x = jnp.ones((4, 3))
    messages = {}
    for norm in (nn.BatchNorm, bnjax.BatchNorm):
        variables = Net(norm).init(jax.random.key(0), x, train=False)
        with pytest.raises(Exception) as info:
            Net(norm).apply(variables, x, train=True)  # batch_stats left immutable
        messages[norm] = str(info.value)
    assert '"/block/bn"' in messages[nn.BatchNorm]  # Flax names the layer so
    assert '"/block/bn"' in messages[bnjax.BatchNorm]
    assert "mutable=['batch_stats']" in messages[bnjax.BatchNorm]
    assert "<training argument>" in messages[bnjax.BatchNorm]  # not a keyword of a bare layer
