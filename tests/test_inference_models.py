"""The inference tools on models of any shape: batch-norm subclasses, Sequential, module fields.

References: the unfolded model's own output computed by plain Flax (``flax.linen.BatchNorm``
and its subclass defined here run Flax's arithmetic, not bnjax's) and float64 NumPy written
here. The models are defined in this file, so these tests need the library only.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnjax
import bnjax.nnx

EPS = 1e-3


class KerasCallFlaxBN(nn.BatchNorm):
    """Flax's layer called as the zoo calls its norms, ``norm(x, training=t)``."""

    epsilon: float = EPS

    def __call__(self, x, use_running_average=None, *, training=None, mask=None):
        if training is not None:
            use_running_average = not training
        return super().__call__(x, use_running_average, mask=mask)


class ChangedFlaxBN(KerasCallFlaxBN):
    """A subclass that defines a method besides ``__call__``: it may compute something else."""

    def extra_scale(self):
        return 2.0


class SubclassConvNet(nn.Module):
    norm: type = KerasCallFlaxBN

    @nn.compact
    def __call__(self, x, training: bool):
        x = nn.Conv(6, (3, 3))(x)
        x = nn.relu(self.norm()(x, training=training))
        x = nn.Conv(5, (3, 3), strides=2, use_bias=False)(x)
        x = self.norm()(x, training=training)
        return nn.Dense(4)(x.mean(axis=(1, 2)))


class DenseSubclassNet(nn.Module):
    """Dense -> subclass BN -> tanh -> Dense: one batch norm, easy to write in NumPy."""

    @nn.compact
    def __call__(self, x, training: bool):
        z = KerasCallFlaxBN()(nn.Dense(5)(x), training=training)
        return nn.Dense(3)(jnp.tanh(z))


class Inner(nn.Module):
    @nn.compact
    def __call__(self, x, training: bool):
        x = nn.BatchNorm(epsilon=EPS)(nn.Conv(4, (3, 3))(x), use_running_average=not training)
        return bnjax.BatchNorm(epsilon=EPS)(nn.Dense(3)(nn.relu(x)), training=training)


class Outer(nn.Module):
    """A model that receives its body as a field (as jax-resnet's ResNets do)."""

    inner: nn.Module

    def __call__(self, x, train: bool):
        return self.inner(x, training=train).sum(axis=(1, 2))


class FlaxStyleCallNet(nn.Module):
    """Calls bnjax's layer the way Flax's is called (so the layer warns about epsilon)."""

    @nn.compact
    def __call__(self, x):
        return bnjax.BatchNorm(use_running_average=True)(nn.Dense(4)(x))  # the warned line


def _sequential():
    return nn.Sequential([nn.Conv(4, (3, 3)), nn.BatchNorm(use_running_average=True,
                                                           epsilon=EPS), nn.relu])


def _variables(model, x, seed, **call_kwargs):
    """Variables of the model's shapes drawn in NumPy, so folding is far from the identity."""
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():  # FlaxStyleCallNet's warning is tested below
        warnings.simplefilter("ignore", bnjax.FlaxEpsilonWarning)
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, **call_kwargs))

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "scale":
            value = rng.uniform(0.5, 2.0, shape)
        elif name == "var":
            value = rng.uniform(0.2, 3.0, shape)
        elif name == "kernel":
            value = rng.normal(0.0, 1.0, shape) / np.sqrt(np.prod(shape[:-1]))
        else:  # biases, means
            value = rng.normal(0.0, 0.7, shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _assert_close(got, want, rtol=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= rtol * np.abs(want).max(), np.abs(got - want).max()


def _export_round_trip(model, variables, x, directory, call_kwargs, want_folded):
    report = bnjax.export_folded_model(model, variables, x, str(directory),
                                       call_kwargs=call_kwargs)
    assert len(report["folded"]) == want_folded
    exported = jax.export.deserialize(bytearray((directory / "folded_model.jax_export")
                                                .read_bytes()))
    x2 = _normal(99, (5, *x.shape[1:]))  # another batch size
    _assert_close(exported.call(x2), model.apply(variables, x2, **call_kwargs))


# ---------------------------------------------------------------------------------------------
# A subclass of flax.linen.BatchNorm with its own call signature.


def test_fold_flax_subclass_with_its_own_signature(tmp_path):
    model, x = SubclassConvNet(), _normal(0, (3, 9, 9, 2))
    variables = _variables(model, x, 1, training=False)
    folded, fv = bnjax.fold_batch_norm(model, variables, x)
    assert folded.folded == (("Conv_0", "KerasCallFlaxBN_0"), ("Conv_1", "KerasCallFlaxBN_1"))
    assert folded.kept == () and "batch_stats" not in fv
    # The reference is Flax's own eval of the unfolded model.
    _assert_close(folded.apply(fv, x, training=False), model.apply(variables, x, training=False))
    _export_round_trip(model, variables, x, tmp_path, {"training": False}, 2)


def test_subclass_that_defines_more_is_kept_and_named():
    model, x = SubclassConvNet(norm=ChangedFlaxBN), _normal(2, (2, 9, 9, 2))
    variables = _variables(model, x, 3, training=False)
    folded, fv = bnjax.fold_batch_norm(model, variables, x)
    assert folded.folded == () and len(folded.kept) == 2
    assert all("ChangedFlaxBN" in why and "extra_scale" in why for _, why in folded.kept)
    _assert_close(folded.apply(fv, x, training=False), model.apply(variables, x, training=False))


def _np_dense_net(p, mean, var, x):
    """Float64 NumPy forward of DenseSubclassNet with the given statistics: (logits, z)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    z = np.asarray(x, np.float64) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    bn = p["KerasCallFlaxBN_0"]
    y = (z - mean) / np.sqrt(var + EPS) * bn["scale"] + bn["bias"]
    return np.tanh(y) @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"], z


def test_precise_batch_stats_on_flax_subclass():
    model = DenseSubclassNet()
    batches = [_normal(10 + i, (7 + i, 4)) for i in range(3)]  # uneven batch sizes
    variables = _variables(model, batches[0], 4, training=False)
    new = bnjax.precise_batch_stats(model, variables, batches)
    bs = variables["batch_stats"]["KerasCallFlaxBN_0"]
    _, z = _np_dense_net(variables["params"], bs["mean"], bs["var"], np.concatenate(batches))
    got = new["batch_stats"]["KerasCallFlaxBN_0"]
    np.testing.assert_allclose(got["mean"], z.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["var"], z.var(0), rtol=1e-5)


def test_mc_batch_norm_on_flax_subclass():
    model = DenseSubclassNet()
    train, x = _normal(20, (16, 4)), _normal(21, (6, 4))
    variables = _variables(model, x, 5, training=False)
    out = bnjax.mc_batch_norm_predict(model, variables, x, [train], num_samples=2)
    _, z_train = _np_dense_net(variables["params"], 0.0, 1.0, train)  # z does not use stats
    logits, _ = _np_dense_net(variables["params"], z_train.mean(0), z_train.var(0), x)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(out.probs, probs, rtol=1e-4, atol=1e-6)


def test_swap_runs_bnjax_in_a_flax_subclass():
    # replacing_flax_batch_norm replaces the subclass's super().__call__ (Flax's own call):
    # the training step gives bnjax's (Keras's) update of the moving statistics.
    x = _normal(30, (8, 3))
    layer = KerasCallFlaxBN(momentum=0.9)
    variables = _variables(layer, x, 6, training=False)
    with bnjax.replacing_flax_batch_norm() as report:
        y, upd = layer.apply(variables, x, training=True, mutable=["batch_stats"])
    assert report.count == 1
    x64 = np.asarray(x, np.float64)
    m, v = x64.mean(0), x64.var(0)
    p, s = variables["params"], variables["batch_stats"]
    np.testing.assert_allclose(y, (x64 - m) / np.sqrt(v + EPS) * p["scale"] + p["bias"],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.9 * s["mean"] + 0.1 * m, rtol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 * s["var"] + 0.1 * v, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Models whose layers are fields: nn.Sequential, a submodule handed in.


def test_fold_sequential_runs_and_equals_the_model(tmp_path):
    model, x = _sequential(), _normal(40, (2, 6, 6, 3))
    variables = _variables(model, x, 7)
    folded, fv = bnjax.fold_batch_norm(model, variables, x, call_kwargs={})
    assert folded.folded == (("layers_0", "layers_1"),)
    _assert_close(folded.apply(fv, x), model.apply(variables, x))
    _export_round_trip(model, variables, x, tmp_path, {}, 1)


def test_fold_model_with_a_submodule_field(tmp_path):
    model, x = Outer(inner=Inner()), _normal(41, (2, 6, 6, 3))
    variables = _variables(model, x, 8, train=False)
    folded, fv = bnjax.fold_batch_norm(model, variables, x)
    assert folded.folded == (("inner/Conv_0", "inner/BatchNorm_0"),
                             ("inner/Dense_0", "inner/BatchNorm_1"))
    _assert_close(folded.apply(fv, x, train=False), model.apply(variables, x, train=False))
    _export_round_trip(model, variables, x, tmp_path, {"train": False}, 2)


# ---------------------------------------------------------------------------------------------
# FlaxEpsilonWarning: never from the tools' own runs; at the user's line otherwise.


def _epsilon_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [w for w in caught if issubclass(w.category, bnjax.FlaxEpsilonWarning)]


def test_tools_do_not_emit_the_epsilon_warning(tmp_path):
    model, x = FlaxStyleCallNet(), _normal(50, (4, 3))
    variables = _variables(model, x, 9)
    kw = {"call_kwargs": {}}
    assert _epsilon_warnings(lambda: bnjax.fold_batch_norm(model, variables, x, **kw)) == []
    assert _epsilon_warnings(
        lambda: bnjax.export_folded_model(model, variables, x, str(tmp_path), **kw)) == []
    assert _epsilon_warnings(lambda: bnjax.precise_batch_stats(model, variables, [x], **kw)) == []
    assert _epsilon_warnings(
        lambda: bnjax.mc_batch_norm_predict(model, variables, x, [x], 2, **kw)) == []


def test_epsilon_warning_points_at_the_users_line():
    model, x = FlaxStyleCallNet(), _normal(51, (4, 3))
    caught = _epsilon_warnings(lambda: model.init(jax.random.key(0), x))
    assert len(caught) == 1 and caught[0].filename == __file__
    with open(__file__) as f:
        assert "the warned line" in f.readlines()[caught[0].lineno - 1]
    caught = _epsilon_warnings(lambda: bnjax.nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
    assert len(caught) == 1 and caught[0].filename == __file__


# ---------------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize("tool", ["fold", "precise", "mcbn"])
def test_empty_batch_stats_is_named(tool):
    model, x = DenseSubclassNet(), _normal(60, (4, 4))
    variables = {"params": _variables(model, x, 10, training=False)["params"],
                 "batch_stats": {}}
    run = {"fold": lambda: bnjax.fold_batch_norm(model, variables, x),
           "precise": lambda: bnjax.precise_batch_stats(model, variables, [x]),
           "mcbn": lambda: bnjax.mc_batch_norm_predict(model, variables, x, [x], 2)}[tool]
    with pytest.raises(ValueError, match=r"variables\['batch_stats'\] is empty \(\{\}\)"):
        run()
