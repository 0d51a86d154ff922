"""The swap acts where the user sees it (``bnjax.swap``): jit caches, nesting, threads, NNX
graphdefs, and the calls Flax refuses or accepts.

References: float64 NumPy written here, and Flax's own layer run in a function that never ran
under a swap.
"""

import contextlib
import functools
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnjax
import bnjax.nnx

# A large mean against the spread: Flax's fast variance loses digits here, bnjax's does not,
# so the two layers' outputs tell which one ran.
X = np.random.default_rng(7).normal(size=(64, 5)) * 3 + 100
BN = nn.BatchNorm(use_running_average=False)
VARIABLES = BN.init(jax.random.key(0), jnp.asarray(X, jnp.float32))


def _np_bn(x, eps):
    x = np.asarray(x, np.float64)
    return (x - x.mean(0)) / np.sqrt(x.var(0) + eps)


def _err(y, ref):
    return float(np.max(np.abs(np.asarray(y, np.float64) - ref)))


@functools.cache
def _flax_output():
    """Flax's own layer, in a function of its own that never runs under a swap."""
    @jax.jit
    def flax_only(v, x):
        return nn.BatchNorm(use_running_average=False).apply(v, x, mutable=["batch_stats"])[0]

    return np.asarray(flax_only(VARIABLES, jnp.asarray(X, jnp.float32)))


def _natural():
    """A comparison written the natural way: one jitted function, called in and out."""
    @jax.jit
    def forward(v, x):
        return BN.apply(v, x, mutable=["batch_stats"])[0]

    return lambda: np.asarray(forward(VARIABLES, jnp.asarray(X, jnp.float32)))


def test_the_reference_tells_the_two_layers_apart():
    assert _err(_flax_output(), _np_bn(X, 1e-5)) > 1e-4  # Flax's fast variance
    with bnjax.replacing_flax_batch_norm():
        y, _ = BN.apply(VARIABLES, jnp.asarray(X, jnp.float32), mutable=["batch_stats"])
    assert _err(y, _np_bn(X, 1e-5)) < 1e-5  # bnjax's exact one


def test_traced_inside_then_called_outside_runs_flax():
    forward = _natural()
    with bnjax.replacing_flax_batch_norm() as report:
        inside = forward()
    outside = forward()
    assert report.replaced == ["<root>"]
    assert _err(inside, _np_bn(X, 1e-5)) < 1e-5
    np.testing.assert_array_equal(outside, _flax_output())


def test_traced_outside_then_called_inside_runs_bnjax():
    forward = _natural()
    outside = forward()
    with bnjax.replacing_flax_batch_norm() as report:
        inside = forward()
    np.testing.assert_array_equal(outside, _flax_output())
    assert report.replaced == ["<root>"]
    assert _err(inside, _np_bn(X, 1e-5)) < 1e-5


def test_a_swap_with_other_settings_traces_again_and_equal_settings_reuse_the_trace():
    forward = _natural()
    with bnjax.replacing_flax_batch_norm():
        forward()
    with bnjax.replacing_flax_batch_norm(epsilon=0.5) as report:
        y = forward()
    assert report.count == 1
    np.testing.assert_allclose(y, _np_bn(X, 0.5), rtol=1e-5, atol=1e-5)
    with bnjax.replacing_flax_batch_norm(epsilon=0.5) as again:
        y = forward()  # the trace of the same settings, reused: nothing new is replaced
    assert again.count == 0
    np.testing.assert_allclose(y, _np_bn(X, 0.5), rtol=1e-5, atol=1e-5)


def test_lowered_and_compiled_keep_what_they_were_traced_with():
    compiled_inside = None
    with bnjax.replacing_flax_batch_norm():
        compiled_inside = jax.jit(
            lambda v, x: BN.apply(v, x, mutable=["batch_stats"])[0]
        ).lower(VARIABLES, jnp.asarray(X, jnp.float32)).compile()
    y = compiled_inside(VARIABLES, jnp.asarray(X, jnp.float32))  # outside: still bnjax
    assert _err(y, _np_bn(X, 1e-5)) < 1e-5


# ---------------------------------------------------------------------------------------------
# Nesting: the innermost active swap decides, for every pair.

SWAPS = {
    "bnjax": (lambda: bnjax.replacing_flax_batch_norm(), _np_bn(X, 1e-5)),
    "bnjax eps 0.5": (lambda: bnjax.replacing_flax_batch_norm(epsilon=0.5), _np_bn(X, 0.5)),
    "bnjax keras, no guard": (
        lambda: bnjax.replacing_flax_batch_norm(epsilon="keras", guard_non_finite=False),
        _np_bn(X, 1e-3)),
    "identity": (lambda: bnjax.without_flax_batch_norm(), X),
}


def _check(y, name):
    ref = SWAPS[name][1]
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("inner", list(SWAPS))
@pytest.mark.parametrize("outer", list(SWAPS))
def test_the_innermost_swap_decides(outer, inner):
    forward = _natural()
    x = jnp.asarray(X, jnp.float32)

    def eager():
        return BN.apply(VARIABLES, x, mutable=["batch_stats"])[0]

    with SWAPS[outer][0]() as out_report:
        _check(forward(), outer)
        with SWAPS[inner][0]() as in_report:
            _check(eager(), inner)
            _check(forward(), inner)
        _check(eager(), outer)
        _check(forward(), outer)
    np.testing.assert_array_equal(forward(), _flax_output())
    assert in_report.replaced == ["<root>"] and out_report.replaced == ["<root>"]


# ---------------------------------------------------------------------------------------------
# Per thread.


def test_another_thread_does_not_see_the_swap():
    x = jnp.asarray(X, jnp.float32)
    seen = {}

    def run(name):
        seen[name] = np.asarray(BN.apply(VARIABLES, x, mutable=["batch_stats"])[0])

    with bnjax.replacing_flax_batch_norm() as report:
        thread = threading.Thread(target=run, args=("other thread",))
        thread.start()
        thread.join()
        run("this thread")
    assert report.replaced == ["<root>"]
    np.testing.assert_allclose(seen["other thread"], _flax_output(), rtol=1e-6, atol=1e-6)
    assert _err(seen["this thread"], _np_bn(X, 1e-5)) < 1e-5


def test_a_swap_in_another_thread_leaves_this_one_alone():
    entered, done = threading.Event(), threading.Event()

    def hold():
        with bnjax.without_flax_batch_norm():
            entered.set()
            done.wait(60)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert entered.wait(60)
        y = _natural()()
    finally:
        done.set()
        thread.join()
    np.testing.assert_array_equal(y, _flax_output())


# ---------------------------------------------------------------------------------------------
# NNX: the graph is the model's identity.


class _NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.bn = nnx.BatchNorm(5, rngs=rngs)

    def __call__(self, x):
        return self.bn(x)


def test_nnx_graphdef_split_before_the_replacement_rebuilds_flax_layer():
    model = _NNXNet(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    bnjax.replace_nnx_batch_norm(model, epsilon=0.5)
    assert type(nnx.merge(graphdef, state).bn) is nnx.BatchNorm  # Flax's layer again
    assert type(nnx.merge(*nnx.split(model)).bn) is bnjax.nnx.BatchNorm


def test_nnx_jit_traces_again_after_the_replacement():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(8, 5)), jnp.float32)
    model = _NNXNet(nnx.Rngs(0))
    forward = nnx.jit(lambda m, x: m(x))
    np.testing.assert_allclose(forward(model, x), _np_bn(x, 1e-5), rtol=1e-4, atol=1e-4)
    bnjax.replace_nnx_batch_norm(model, epsilon=0.5)
    np.testing.assert_allclose(forward(model, x), _np_bn(x, 0.5), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Calls Flax refuses raise as under Flax; calls Flax accepts run.


def _flax_error(call):
    with pytest.raises((TypeError, ValueError)) as flax_error:
        call()
    return flax_error


@pytest.mark.parametrize("swap", [bnjax.replacing_flax_batch_norm,
                                  bnjax.without_flax_batch_norm])
@pytest.mark.parametrize("field,args,kwargs,words", [
    # The mode given at construction and at call, either way, or nowhere: Flax's words.
    (True, (False,), {}, "was passed to the constructor and at call time"),
    (False, (), {"use_running_average": True}, "was passed to the constructor and at call"),
    (None, (), {}, "must be passed to the constructor or at call time"),
    # Arguments Flax's call does not take: Python's binding error, in its own words there.
    (False, (), {"training": True}, "unexpected keyword argument 'training'"),
    (False, (True, None, 1), {}, "positional arguments"),
])
def test_calls_flax_refuses_raise_as_under_flax_with_the_path(swap, field, args, kwargs, words):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=field, name="bn")(x, *args, **kwargs)

    x = jnp.ones((4, 3))
    flax_error = _flax_error(lambda: Net().init(jax.random.key(0), x))
    assert words in str(flax_error.value)
    with swap(), pytest.raises(flax_error.type) as swap_error:
        Net().init(jax.random.key(0), x)
    message = str(swap_error.value)
    assert message.startswith("flax.linen.BatchNorm at 'bn': ") and words in message


@pytest.mark.parametrize("use_running_average", [False, True])
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_])
def test_integer_input_is_cast_as_flax_casts_it(dtype, use_running_average):
    x = jnp.asarray(np.random.default_rng(3).integers(0, 7, size=(6, 3)), dtype)
    bn = nn.BatchNorm(use_running_average=use_running_average)
    variables = bn.init(jax.random.key(0), x)
    variables = {**variables, "batch_stats": {"mean": jnp.full(3, 2.0), "var": jnp.full(3, 4.0)}}
    flax_y, _ = bn.apply(variables, x, mutable=["batch_stats"])
    with bnjax.replacing_flax_batch_norm() as report:
        y, _ = bn.apply(variables, x, mutable=["batch_stats"])
    assert report.count == 1 and y.dtype == flax_y.dtype == jnp.float32
    xf = np.asarray(x, np.float64)
    ref = (xf - 2.0) / np.sqrt(4.0 + 1e-5) if use_running_average else _np_bn(xf, 1e-5)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, flax_y, rtol=1e-5, atol=1e-5)


def test_masks_are_read_as_flax_reads_them():
    x = jnp.asarray(np.random.default_rng(4).normal(size=(3, 3)), jnp.float32)
    bn = nn.BatchNorm(use_running_average=False)
    variables = bn.init(jax.random.key(0), x)
    # A (3,) mask on a (3, 3) input broadcasts along the features (Flax's reading); an int
    # mask is cast to bool.
    mask = jnp.asarray([1, 1, 0])
    flax_y, flax_new = bn.apply(variables, x, mask=mask, mutable=["batch_stats"])
    with bnjax.replacing_flax_batch_norm():
        y, new = bn.apply(variables, x, mask=mask, mutable=["batch_stats"])
    xf = np.asarray(x, np.float64)
    # One flag per feature: features 0 and 1 use every row, feature 2 none (Flax: NaN; bnjax
    # keeps its moving mean).
    np.testing.assert_allclose(new["batch_stats"]["mean"][:2], 0.01 * xf[:, :2].mean(0),
                               rtol=1e-5)
    np.testing.assert_allclose(y[:, :2], _np_bn(xf[:, :2], 1e-5), rtol=1e-4, atol=1e-5)
    assert np.isnan(flax_new["batch_stats"]["mean"][2])  # Flax: the mean of nothing
    assert (new["batch_stats"]["mean"][2], new["batch_stats"]["var"][2]) == (0.0, 1.0)  # kept
    np.testing.assert_allclose(y[:, :2], flax_y[:, :2], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new["batch_stats"]["mean"][:2], flax_new["batch_stats"]["mean"][:2],
                               rtol=1e-5)
    bad = jnp.ones(4, bool)
    flax_error = _flax_error(lambda: bn.apply(variables, x, mask=bad, mutable=["batch_stats"]))
    with bnjax.replacing_flax_batch_norm(), pytest.raises(flax_error.type, match=(
            r"flax.linen.BatchNorm at '<root>': mask has shape \(4,\), which does not broadcast "
            r"to the input's shape \(3, 3\)")):
        bn.apply(variables, x, mask=bad, mutable=["batch_stats"])


def test_an_error_raised_while_running_on_bnjax_names_the_module_path():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=False, name="bn")(x)

    x = jnp.ones((4, 3))
    variables = Net().init(jax.random.key(0), x)
    with bnjax.replacing_flax_batch_norm(), pytest.raises(
            ValueError, match=r"flax.linen.BatchNorm at 'bn' cannot run on bnjax: x has shape "
                              r"\(0, 3\) .* the batch holds no values"):
        Net().apply(variables, jnp.ones((0, 3)), mutable=["batch_stats"])


# ---------------------------------------------------------------------------------------------
# Masked positions: the forward is Flax's; in training mode bnjax's masked outputs carry no
# gradient (a listed difference), in inference mode the mask is ignored, as Flax ignores it.


def _masked_grads(use_running_average, loss_reads_masked, swap):
    x = jnp.asarray(np.random.default_rng(5).normal(size=(6, 2)) * 2 + 1, jnp.float32)
    mask = jnp.asarray([True, True, False, True, False, True])[:, None]
    w = jnp.asarray(np.random.default_rng(6).normal(size=(6, 2)), jnp.float32)
    bn = nn.BatchNorm(use_running_average=use_running_average)
    variables = bn.init(jax.random.key(0), x)
    stats = {"mean": jnp.asarray([0.5, -1.0]), "var": jnp.asarray([2.0, 0.5])}

    def loss(params, x):
        y, _ = bn.apply({"params": params, "batch_stats": stats}, x, mask=mask,
                        mutable=["batch_stats"])
        return jnp.sum(w * y * (1.0 if loss_reads_masked else mask))

    with swap:
        grads = jax.grad(loss, argnums=(0, 1))(variables["params"], x)
    return grads, (np.asarray(x, np.float64), np.asarray(mask), np.asarray(w, np.float64), stats)


def _flax_and_swap(*args):
    flax, _ = _masked_grads(*args, swap=contextlib.nullcontext())
    ours, data = _masked_grads(*args, swap=bnjax.replacing_flax_batch_norm())
    return flax, ours, data


def test_masked_gradients_in_training_mode_are_flax_s_when_the_loss_ignores_masked_outputs():
    flax, ours, _ = _flax_and_swap(False, False)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), ours, flax)


def test_masked_outputs_carry_no_gradient_in_training_mode_under_the_swap():
    flax, ours, (x, mask, w, _) = _flax_and_swap(False, True)
    valid = mask[:, 0]
    var = x[valid].var(0)
    # Flax: a masked input's gradient is w * scale / sqrt(var + eps) (its output is
    # normalized with statistics it does not enter); bnjax: zero.
    np.testing.assert_allclose(flax[1][~valid], w[~valid] / np.sqrt(var + 1e-5), rtol=1e-4)
    np.testing.assert_array_equal(ours[1][~valid], 0.0)
    # The bias gradient: every output's weight under Flax, only the valid outputs' here.
    np.testing.assert_allclose(flax[0]["bias"], w.sum(0), rtol=1e-5)
    np.testing.assert_allclose(ours[0]["bias"], w[valid].sum(0), rtol=1e-5)


def test_in_inference_mode_the_mask_is_ignored_as_flax_ignores_it():
    flax, ours, (x, _, w, stats) = _flax_and_swap(True, True)
    expected = w / np.sqrt(np.asarray(stats["var"], np.float64) + 1e-5)
    np.testing.assert_allclose(flax[1], expected, rtol=1e-5)
    np.testing.assert_allclose(ours[1], expected, rtol=1e-5)
    np.testing.assert_allclose(ours[0]["bias"], w.sum(0), rtol=1e-5)


def test_an_nnx_call_after_the_replacement_is_bnjax_s_own():
    x = jnp.asarray(np.random.default_rng(8).normal(size=(4, 5)), jnp.float32)
    mask = jnp.asarray([True, False, True, True])[:, None]
    flax_model, model = _NNXNet(nnx.Rngs(0)), _NNXNet(nnx.Rngs(0))
    bnjax.replace_nnx_batch_norm(model)
    flax_model.eval()
    model.eval()
    flax_model(x.astype(jnp.int32))  # Flax's layer casts an integer input ...
    with pytest.raises(TypeError, match="x has dtype int32"):
        model(x.astype(jnp.int32))  # ... bnjax's refuses it
    grad = jax.grad(lambda x, m: jnp.sum(m.bn(x, mask=mask)), argnums=0)
    expected = np.ones((4, 5)) / np.sqrt(1.0 + 1e-5)  # moving var 1: Flax ignores the mask
    np.testing.assert_allclose(grad(x, flax_model), expected, rtol=1e-6)
    np.testing.assert_allclose(grad(x, model)[np.asarray(mask[:, 0])], expected[:3], rtol=1e-6)
    np.testing.assert_array_equal(grad(x, model)[1], 0.0)
