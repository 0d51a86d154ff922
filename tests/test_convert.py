"""PyTorch and Keras converters: round trips, PyTorch's eval formula, the running variance."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax import convert


def torch_state(c=3, seed=0, affine=True, t=7):
    rng = np.random.default_rng(seed)
    sd = {"running_mean": rng.normal(size=c).astype(np.float32),
          "running_var": rng.uniform(0.5, 2.0, c).astype(np.float32),
          "num_batches_tracked": np.array(t, np.int64)}
    if affine:
        sd = {"weight": rng.uniform(0.5, 1.5, c).astype(np.float32),
              "bias": rng.normal(size=c).astype(np.float32), **sd}
    return sd


def torch_eval_formula(x, sd, eps):
    """PyTorch's eval-mode BatchNorm2d, float64: (x - rm) / sqrt(rv + eps) * w + b on axis 1."""
    b = (1, -1) + (1,) * (x.ndim - 2)
    y = (x - sd["running_mean"].reshape(b)) / np.sqrt(sd["running_var"].reshape(b) + eps)
    if "weight" in sd:
        y = y * sd["weight"].reshape(b) + sd["bias"].reshape(b)
    return y


@pytest.mark.parametrize("affine", [True, False])
def test_converted_torch_layer_eval_equals_torch_formula_float64(affine):
    sd = {k: np.asarray(v, np.float64) for k, v in torch_state(affine=affine).items()}
    x = np.random.default_rng(1).normal(size=(2, 3, 4, 5))
    with jax.enable_x64(True):
        c = convert.from_torch(sd, eps=1e-5, param_dtype=jnp.float64)
        bn = bnjax.BatchNorm(**c.kwargs)
        y = bn.apply(c.variables, jnp.asarray(x), training=False)
        assert y.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(y), torch_eval_formula(x, sd, 1e-5),
                                   rtol=1e-12, atol=1e-12)
    assert c.kwargs["momentum"] == 0.9 and c.kwargs["axis"] == 1
    assert c.kwargs["use_scale"] is affine and c.kwargs["use_bias"] is affine


def test_converted_torch_layer_eval_float32():
    sd = torch_state()
    x = np.random.default_rng(2).normal(size=(4, 3, 6)).astype(np.float32)
    c = convert.from_torch({"features.1." + k: v for k, v in sd.items()}, prefix="features.1.")
    y = bnjax.BatchNorm(**c.kwargs).apply(c.variables, jnp.asarray(x), training=False)
    np.testing.assert_allclose(np.asarray(y), torch_eval_formula(x.astype(np.float64), sd, 1e-5),
                               rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("n", [None, 2, 48])
@pytest.mark.parametrize("affine", [True, False])
def test_torch_round_trip_is_loss_free(n, affine):
    sd = torch_state(affine=affine)
    if n:  # the rescaling is affine: exact up to float64 rounding
        sd = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in sd.items()}
        with jax.enable_x64(True):
            c = convert.from_torch(sd, values_per_channel=n, param_dtype=jnp.float64)
    else:  # kept as is: bit for bit
        c = convert.from_torch(sd)
    back = convert.to_torch(c.variables, num_batches_tracked=int(sd["num_batches_tracked"]),
                            values_per_channel=n)
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype, k
        np.testing.assert_allclose(back[k], v, rtol=1e-13 if n else 0, err_msg=k)
    if n:  # the rescaling really changed the variance
        assert not np.allclose(np.asarray(c.variables["batch_stats"]["var"]), sd["running_var"])


@pytest.mark.parametrize("m", [0.1, 0.01, 0.25, 0.0, 1.0, 0.3])
def test_momentum_conversion_round_trips(m):
    assert convert.torch_momentum(convert.torch_momentum(m)) == m
    assert abs(convert.torch_momentum(m) - (1 - m)) < 1e-15


@pytest.mark.parametrize("torch_momentum", [0.1, None])
def test_unbiased_running_var_rescaled_to_bnjax_biased_average(torch_momentum):
    """Simulate PyTorch's update rule; values_per_channel recovers bnjax's own statistics."""
    rng = np.random.default_rng(3)
    n, c, steps = 6, 2, 5  # BatchNorm1d on (6, 2): 6 values per channel per batch
    rm, rv = np.zeros(c), np.ones(c)  # PyTorch's initial running statistics
    batches = [rng.normal(1.0, 2.0, size=(n, c)) for _ in range(steps)]
    for t, xb in enumerate(batches, start=1):
        f = 1.0 / t if torch_momentum is None else torch_momentum
        rm = (1 - f) * rm + f * xb.mean(0)
        rv = (1 - f) * rv + f * xb.var(0, ddof=1)  # unbiased, as PyTorch stores it
    sd = {"running_mean": rm, "running_var": rv, "num_batches_tracked": np.array(steps)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # momentum=None warns: test_cumulative_average_warns
        kept = convert.from_torch(sd, momentum=torch_momentum)
        fixed = convert.from_torch(sd, momentum=torch_momentum, values_per_channel=n)
    np.testing.assert_allclose(np.asarray(kept.variables["batch_stats"]["var"]), rv, rtol=1e-6)
    # Reference: the same average of the biased variances, from the same initial value.
    ref = np.ones(c)
    for t, xb in enumerate(batches, start=1):
        f = 1.0 / t if torch_momentum is None else torch_momentum
        ref = (1 - f) * ref + f * xb.var(0)
    np.testing.assert_allclose(np.asarray(fixed.variables["batch_stats"]["var"]), ref,
                               rtol=1e-6)
    if torch_momentum is not None:
        # ... which is what bnjax itself keeps when trained on those batches.
        stats = {"mean": jnp.zeros(c), "var": jnp.ones(c)}
        for xb in batches:
            _, stats = bnjax.batch_norm(jnp.asarray(xb, jnp.float32), stats, training=True,
                                        momentum=fixed.kwargs["momentum"])
        np.testing.assert_allclose(np.asarray(stats["var"]), ref, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(stats["mean"]), rm, rtol=1e-5, atol=1e-6)
    else:
        assert "momentum" not in fixed.kwargs


def test_cumulative_average_warns_that_the_kwargs_would_train_with_0_99():
    """momentum=None (PyTorch's cumulative average) has no bnjax momentum: said, not hidden."""
    import torch

    layer = torch.nn.BatchNorm1d(3, momentum=None)
    with pytest.warns(UserWarning, match=r"momentum=None .*cumulative average.*0\.99"):
        c = convert.from_torch(layer)
    assert "momentum" not in c.kwargs
    assert bnjax.BatchNorm(**c.kwargs).momentum == 0.99  # what the warning says
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a momentum converts silently
        assert convert.from_torch(torch.nn.BatchNorm1d(3)).kwargs["momentum"] == 0.9


def test_torch_errors():
    with pytest.raises(ValueError, match="track_running_stats=False"):
        convert.from_torch({"weight": np.ones(2), "bias": np.zeros(2)})
    sd = torch_state()
    del sd["num_batches_tracked"]
    with pytest.raises(ValueError, match="num_batches_tracked"):
        convert.from_torch(sd, values_per_channel=8)
    with pytest.raises(ValueError, match="values_per_channel"):
        convert.from_torch(torch_state(), values_per_channel=1)
    with pytest.raises(ValueError, match="momentum"):
        convert.torch_momentum(1.5)


@pytest.mark.parametrize("kw", [
    {},
    {"center": False, "momentum": 0.9, "epsilon": 1e-4},
    {"renorm": True, "renorm_clipping": {"rmax": 1.5, "dmax": 0.5}, "renorm_momentum": 0.9,
     "gamma_regularizer": "l2", "beta_constraint": "non_neg"},
])
def test_keras_layer_round_trip_and_inference(keras, kw):
    rng = np.random.default_rng(4)
    layer = keras.layers.BatchNormalization(**kw)
    layer.build((8, 3))
    for step in range(3):  # move the statistics away from their initial values
        layer(rng.normal(step, 2.0, size=(8, 3)).astype(np.float32), training=True)
    c = convert.from_keras(layer)
    x = rng.normal(size=(5, 3)).astype(np.float32)
    y = bnjax.BatchNorm(**c.kwargs).apply(c.variables, jnp.asarray(x), training=False)
    np.testing.assert_allclose(np.asarray(y), np.asarray(layer(x, training=False)),
                               rtol=1e-6, atol=1e-6)
    # Continue training on both sides: the converted layer behaves as the Keras layer.
    x = rng.normal(1.0, 3.0, size=(8, 3)).astype(np.float32)
    y, _ = bnjax.BatchNorm(**c.kwargs).apply(c.variables, jnp.asarray(x), training=True,
                                            mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y), np.asarray(layer(x, training=True)), rtol=1e-5,
                               atol=2e-6)
    # Back to Keras: a fresh layer gets the same weights, exactly.
    fresh = keras.layers.BatchNormalization(**kw)
    fresh.build((8, 3))
    c2 = convert.from_keras(layer)
    fresh.set_weights(convert.to_keras(c2.variables))
    for a, b in zip(fresh.get_weights(), layer.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    if kw.get("renorm"):
        assert c.kwargs["renorm_clipping"] == {"rmax": 1.5, "dmax": 0.5}
        assert c.kwargs["scale_regularizer"] == bnjax.keras.L2(0.01)
        assert c.kwargs["bias_constraint"] == bnjax.keras.NonNeg()


def test_keras_weight_lists_and_dicts():
    rng = np.random.default_rng(5)
    w = [rng.normal(size=3).astype(np.float32) for _ in range(4)]
    c = convert.from_keras(w)
    assert [np.asarray(a).tolist() for a in convert.to_keras(c.variables)] == \
        [a.tolist() for a in w]
    c = convert.from_keras(w[1:], scale=False)
    assert "scale" not in c.variables["params"] and c.kwargs["use_scale"] is False
    np.testing.assert_array_equal(np.asarray(c.variables["params"]["bias"]), w[1])
    named = {"bn/gamma:0": w[0], "bn/moving_mean:0": w[2], "bn/moving_variance:0": w[3]}
    c = convert.from_keras(named)
    np.testing.assert_array_equal(np.asarray(c.variables["batch_stats"]["var"]), w[3])
    assert c.kwargs["use_bias"] is False
    with pytest.raises(ValueError, match="has 3 arrays"):
        convert.from_keras(w[1:])
    with pytest.raises(ValueError, match="accepted names"):
        convert.from_keras({"kernel": w[0]})


# ---------------------------------------------------------------------------------------------
# A real torch.nn.BatchNorm2d module, in both layouts.


def _trained_torch_bn(**kwargs):
    import torch

    torch.manual_seed(0)
    layer = torch.nn.BatchNorm2d(4, **kwargs)
    if layer.affine:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 2.0)
            layer.bias.normal_()
    layer.train()
    for _ in range(3):  # a few training batches move the running statistics
        layer(torch.randn(5, 4, 3, 3) * 2 + 1)
    return layer.eval()


@pytest.mark.parametrize("kwargs", [{}, {"momentum": 0.3, "eps": 1e-4}, {"affine": False}])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_from_torch_module_matches_torch_eval_output(kwargs, layout):
    import torch

    layer = _trained_torch_bn(**kwargs)
    x = np.random.default_rng(1).normal(size=(2, 4, 3, 3)).astype(np.float32) * 3
    with torch.no_grad():
        want = layer(torch.from_numpy(x)).numpy()
    c = convert.from_torch(layer, layout=layout)
    assert c.kwargs["momentum"] == pytest.approx(1 - layer.momentum)
    assert c.kwargs["epsilon"] == pytest.approx(layer.eps)
    assert c.kwargs["use_scale"] == c.kwargs["use_bias"] == layer.affine
    xin = x if layout == "NCHW" else x.transpose(0, 2, 3, 1)
    got = bnjax.BatchNorm(**c.kwargs).apply(c.variables, xin, use_running_average=True)
    got = np.asarray(got) if layout == "NCHW" else np.asarray(got).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_from_torch_module_refuses_what_it_cannot_honour():
    import torch

    with pytest.raises(ValueError, match="momentum=0.5 is given with a module"):
        convert.from_torch(torch.nn.BatchNorm1d(3), momentum=0.5)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        convert.from_torch(torch.nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="layout='NWCH'"):
        convert.from_torch(torch.nn.BatchNorm1d(3), layout="NWCH")
    with pytest.raises(TypeError, match="from_torch got"):
        convert.from_torch([1, 2, 3])
