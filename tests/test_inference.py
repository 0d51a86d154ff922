"""Tests of bnjax.inference: folding, PreciseBN and Monte Carlo batch norm.

References are independent: the unfolded model's own eval output (flax / bnjax layers) for
folding, and float64 NumPy re-implementations of small models for the statistics tools.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import bnjax

# ---------------------------------------------------------------------------------------------
# Helpers.


class FlaxStyleBatchNorm(bnjax.BatchNorm):
    """``bnjax.BatchNorm`` called with Flax's convention: ``use_running_average`` second."""

    def __call__(self, x, use_running_average=None, *, training=None, mask=None):
        return super().__call__(x, training=training, use_running_average=use_running_average,
                                mask=mask)


def _bn(kind, training, **kw):
    """A batch-norm call of either library (or the Flax-style subclass), in mode ``training``."""
    if kind == "bnjax":
        return lambda y: bnjax.BatchNorm(**kw)(y, training=training)
    if kind == "flax_style":
        return lambda y: FlaxStyleBatchNorm(**kw)(y, not training)  # positional
    return lambda y: nn.BatchNorm(use_running_average=not training, **kw)(y)


def _init(model, x, seed, **call_kwargs):
    """Random variables of the right shapes, drawn in NumPy (no compiled ``init``).

    Kernels ~ N(0, 1/fan_in); biases ~ N(0, 0.25); batch-norm scale in [0.5, 2], bias and mean
    ~ N(0, 1), var in [0.2, 3], so folding is far from the identity. ``call_kwargs`` select
    inference mode (default ``training=False``).
    """
    rng = np.random.default_rng(seed)
    call_kwargs = call_kwargs or {"training": False}
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, **call_kwargs))

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        owner = path[-2].key if len(path) > 2 else ""
        if "BatchNorm" in owner and name == "scale":
            value = rng.uniform(0.5, 2.0, shape)
        elif "BatchNorm" in owner and name in ("bias", "mean"):
            value = rng.normal(0.0, 1.0, shape)
        elif name == "var":
            value = rng.uniform(0.2, 3.0, shape)
        elif name == "kernel":
            value = rng.normal(0.0, 1.0, shape) / np.sqrt(np.prod(shape[:-1]))
        else:
            value = rng.normal(0.0, 0.5, shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _ones_init(model, *args):
    """Variables of ``model.init(key, *args)`` holding ones (no initializer is compiled)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))
    return jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes)


def _normal(seed, shape, loc=0.0, scale=1.0):
    """A float32 input drawn with NumPy (``jax.random`` would compile anew for every shape)."""
    rng = np.random.default_rng(seed)
    return jnp.asarray((loc + scale * rng.normal(size=shape)).astype(np.float32))


def _apply(model, variables, x, **kw):
    return jax.jit(lambda v, x: model.apply(v, x, **kw))(variables, x)


def _assert_rel_close(actual, desired, rtol):
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    scale = np.abs(desired).max()
    assert scale > 0
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * scale)


# ---------------------------------------------------------------------------------------------
# Folding.


class HandNet(nn.Module):
    """Conv / Dense / BN / ReLU pieces: grouped, strided, dilated, padded, bias-free convs."""

    kind: str = "bnjax"

    @nn.compact
    def __call__(self, x, training):
        bn = lambda **kw: _bn(self.kind, training, **kw)  # noqa: E731
        x = nn.relu(bn()(nn.Conv(8, (3, 3), use_bias=False)(x)))                 # Conv_0/BN_0
        x = nn.Conv(8, (3, 3), strides=2, feature_group_count=4, padding="VALID")(x)
        x = nn.relu(bn(epsilon=1e-2)(x))                                         # Conv_1/BN_1
        x = nn.Conv(6, (3, 2), kernel_dilation=(2, 1), padding=((2, 1), (0, 3)),
                    use_bias=False)(x)
        x = nn.relu(bn(use_scale=False)(x))                                      # Conv_2/BN_2
        x = bn()(x)                                                # BN_3 after relu: kept
        x = bn(use_bias=False)(nn.ConvTranspose(6, (2, 2), strides=(2, 2))(x))   # BN_4
        r = nn.Conv(6, (1, 1))(x)
        x = nn.relu(bn()(r) + r)                            # BN_5: conv output reused: kept
        x = nn.Dense(10)(x.mean(axis=(1, 2)))
        x = nn.relu(bn()(x))                                                     # Dense_0/BN_6
        return nn.Dense(3)(x)


HAND_FOLDED = {("Conv_0", "BatchNorm_0"), ("Conv_1", "BatchNorm_1"), ("Conv_2", "BatchNorm_2"),
               ("ConvTranspose_0", "BatchNorm_4"), ("Dense_0", "BatchNorm_6")}


@pytest.mark.parametrize("kind", ["bnjax", "flax"])
def test_fold_hand_built_matches_unfolded(kind):
    model = HandNet(kind)
    x = _normal(1, (4, 13, 11, 3), 1.0, 2.0)
    variables = _init(model, x, 2)
    folded, fv = bnjax.fold_batch_norm(model, variables, x)
    assert set(folded.folded) == HAND_FOLDED
    kept = dict(folded.kept)
    assert set(kept) == {"BatchNorm_3", "BatchNorm_5"}
    assert "relu" in kept["BatchNorm_3"]
    assert "Conv_3" in kept["BatchNorm_5"] and "other" in kept["BatchNorm_5"]
    # Folded layers leave no statistics or BN parameters behind; kept ones keep theirs.
    assert set(fv["batch_stats"]) == {"BatchNorm_3", "BatchNorm_5"}
    assert not any(k in fv["params"] for k in ("BatchNorm_0", "BatchNorm_4", "BatchNorm_6"))
    assert "bias" in fv["params"]["Conv_0"]  # a bias-free conv gained the folded bias
    ref = _apply(model, variables, x, training=False)
    out = _apply(folded, fv, x, training=False)
    assert out.dtype == ref.dtype == jnp.float32
    _assert_rel_close(out, ref, 1e-5)
    # The folded model also runs on other shapes (it is not tied to the example input).
    x2 = _normal(3, (2, 9, 9, 3))
    _assert_rel_close(_apply(folded, fv, x2, training=False),
                      _apply(model, variables, x2, training=False), 1e-5)


class ChainNet(nn.Module):
    @nn.compact
    def __call__(self, x, training):
        x = nn.relu(bnjax.BatchNorm()(nn.Conv(8, (3, 3), strides=2, use_bias=False)(x),
                                      training=training))
        x = nn.relu(nn.BatchNorm(use_running_average=not training)(
            nn.Conv(8, (3, 3), feature_group_count=2, kernel_dilation=2)(x)))
        return bnjax.BatchNorm()(nn.Dense(4)(x.reshape((x.shape[0], -1))), training=training)


def _count_primitive(jaxpr, name):
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == name
        for v in eqn.params.values():
            for sub in v if isinstance(v, tuple | list) else (v,):
                if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    count += _count_primitive(sub.jaxpr, name)
                elif hasattr(sub, "eqns"):
                    count += _count_primitive(sub, name)
    return count


def test_folded_jaxpr_has_no_batch_norm_arithmetic():
    model = ChainNet()
    x = _normal(0, (2, 10, 10, 3))
    variables = _init(model, x, 3)
    folded, fv = bnjax.fold_batch_norm(model, variables, jax.ShapeDtypeStruct(x.shape, x.dtype))
    assert len(folded.folded) == 3 and folded.kept == ()
    assert "batch_stats" not in fv
    unfolded_jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, training=False))(variables, x)
    folded_jaxpr = jax.make_jaxpr(lambda v, x: folded.apply(v, x, training=False))(fv, x)
    assert _count_primitive(unfolded_jaxpr.jaxpr, "rsqrt") == 3
    assert _count_primitive(folded_jaxpr.jaxpr, "rsqrt") == 0
    assert _count_primitive(folded_jaxpr.jaxpr, "sqrt") == 0
    _assert_rel_close(_apply(folded, fv, x, training=False),
                      _apply(model, variables, x, training=False), 1e-5)


ZOO = [
    ("cnn1d", "batch", (3, 40), 5),
    ("cnn1d", "renorm", (3, 40), 5),  # batch renorm infers with mean/var like batch norm
    ("mlp", "batch", (3, 40), 3),
    ("resnet20", "batch", (2, 8, 8, 3), 19),
    ("kmnist_cnn", "batch", (2, 12, 12, 1), 0),
]


@pytest.mark.parametrize("name,norm,shape,num_folded", ZOO,
                         ids=[f"{z[0]}-{z[1]}" for z in ZOO])
def test_fold_model_zoo(name, norm, shape, num_folded):
    from bnjax_train import models
    model = models.create_model(name, num_classes=10, norm=norm)
    x = _normal(0, shape)
    variables = _init(model, x, 4)
    folded, fv = bnjax.fold_batch_norm(model, variables, x)
    num_bn = sum(1 for p in jax.tree_util.tree_flatten_with_path(variables["batch_stats"])[0]
                 if p[0][-1].key == "mean")
    assert len(folded.folded) == num_folded
    assert len(folded.kept) == num_bn - num_folded
    for _, reason in folded.kept:  # kmnist_cnn: every norm follows a relu or a pooling
        assert "not directly from a Conv/Dense" in reason
    _assert_rel_close(_apply(folded, fv, x, training=False),
                      _apply(model, variables, x, training=False), 1e-5)


def test_folded_model_nested_in_another_module():
    model = ChainNet()
    x = _normal(0, (2, 10, 10, 3))
    variables = _init(model, x, 5)
    folded, fv = bnjax.fold_batch_norm(model, variables, x)

    class Outer(nn.Module):
        @nn.compact
        def __call__(self, x):
            return folded.clone(parent=self, name="inner")(x, training=False) * 2.0

    out = Outer().apply({k: {"inner": v} for k, v in fv.items()}, x)
    _assert_rel_close(out, 2.0 * _apply(model, variables, x, training=False), 1e-5)


def test_fold_errors():
    model = ChainNet()
    x = jnp.ones((2, 10, 10, 3))
    variables = _init(model, x, 0)
    with pytest.raises(ValueError, match="batch_stats"):
        bnjax.fold_batch_norm(model, {"params": variables["params"]}, x)
    with pytest.raises(ValueError, match="training mode"):
        bnjax.fold_batch_norm(model, variables, x, call_kwargs={"training": True})
    with pytest.raises(TypeError, match="variables"):
        bnjax.fold_batch_norm(model, [variables], x)
    folded, fv = bnjax.fold_batch_norm(model, variables, x)
    with pytest.raises(ValueError, match="inference only"):
        folded.apply(fv, x, training=True, mutable=["batch_stats"])


# ---------------------------------------------------------------------------------------------
# PreciseBN against a float64 NumPy population reference.


def _stat_body(x, training, kinds):
    """StatNet's layers (inside a compact ``__call__``), batch norms of the given kinds."""
    x = nn.Dense(5)(x)                     # x: (B, 3, 4) -> (B, 3, 5)
    x = _bn(kinds[0], training, epsilon=1e-3, name="BatchNorm_0")(x)
    x = nn.relu(x)
    x = nn.Dense(4)(x)
    x = _bn(kinds[1], training, epsilon=1e-3, name="BatchNorm_1")(x)
    return nn.Dense(3)(jnp.tanh(x).reshape((x.shape[0], -1)))


class StatNet(nn.Module):
    kind: str = "bnjax"

    @nn.compact
    def __call__(self, x, training):
        return _stat_body(x, training, (self.kind, self.kind))


def _np_forward(p, bs, x, eps=1e-3, stats_from_batch=False):
    """Float64 NumPy forward pass of StatNet; returns (logits, [(mean, var, count) per BN])."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    seen = []

    def bn(z, name):
        red = tuple(range(z.ndim - 1))
        m, v, n = z.mean(red), z.var(red), np.prod([z.shape[i] for i in red])
        seen.append((m, v, n))
        if not stats_from_batch:
            m, v = np.asarray(bs[name]["mean"], np.float64), np.asarray(bs[name]["var"],
                                                                       np.float64)
        return (z - m) / np.sqrt(v + eps) * p[name]["scale"] + p[name]["bias"]

    z = np.asarray(x, np.float64) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    z = np.maximum(bn(z, "BatchNorm_0"), 0)
    z = z @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
    z = np.tanh(bn(z, "BatchNorm_1")).reshape((z.shape[0], -1))
    return z @ p["Dense_2"]["kernel"] + p["Dense_2"]["bias"], seen


def _np_precise(params, old_stats, xs, unbiased):
    """Population statistics layer after layer (later layers use the new earlier ones)."""
    new = {k: dict(v) for k, v in old_stats.items()}
    for i, name in enumerate(["BatchNorm_0", "BatchNorm_1"]):
        per_batch = [_np_forward(params, new, x)[1][i] for x in xs]
        means = np.stack([m for m, _, _ in per_batch])
        varis = np.stack([v for _, v, _ in per_batch])
        counts = np.array([n for _, _, n in per_batch], np.float64)[:, None]
        # The population: every value of every batch.
        mean = (counts * means).sum(0) / counts.sum()
        if unbiased:
            var = (counts * varis * counts / (counts - 1)).sum(0) / counts.sum()
        else:
            var = (counts * (varis + (means - mean) ** 2)).sum(0) / counts.sum()
        new[name] = {"mean": mean, "var": var}
    return new


def _stat_data(seed):
    sizes = [8, 8, 8, 5, 8]  # one short batch: counts weight the combination
    return [_normal((seed, i), (b, 3, 4), 40.0, 3.0) for i, b in enumerate(sizes)]


@pytest.mark.parametrize("kind", ["bnjax", "flax"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_precise_batch_stats_matches_numpy_population(kind, unbiased):
    model = StatNet(kind)
    xs = _stat_data(0)
    variables = _init(model, xs[0], 6)
    new = bnjax.precise_batch_stats(model, variables, iter(xs), num_batches=4,
                                    unbiased=unbiased)
    ref = _np_precise(variables["params"], variables["batch_stats"], xs[:4], unbiased)
    for name in ("BatchNorm_0", "BatchNorm_1"):
        for key in ("mean", "var"):
            got = new["batch_stats"][name][key]
            assert got.dtype == jnp.float32
            np.testing.assert_allclose(got, ref[name][key], rtol=1e-4)
    # Parameters are untouched; the input variables are not modified.
    assert new["params"] is not None
    np.testing.assert_array_equal(new["params"]["Dense_0"]["kernel"],
                                  variables["params"]["Dense_0"]["kernel"])
    assert not np.allclose(variables["batch_stats"]["BatchNorm_0"]["mean"],
                           ref["BatchNorm_0"]["mean"])


def test_precise_batch_stats_stacked_array_and_dict_batches():
    model = StatNet()
    xs = jnp.stack([x for x in _stat_data(1) if x.shape[0] == 8])
    variables = _init(model, xs[0], 7)
    a = bnjax.precise_batch_stats(model, variables, xs)
    b = bnjax.precise_batch_stats(model, variables, [{"x": x, "y": 0} for x in xs])
    ref = _np_precise(variables["params"], variables["batch_stats"], list(xs), False)
    for out in (a, b):
        np.testing.assert_allclose(out["batch_stats"]["BatchNorm_1"]["var"],
                                   ref["BatchNorm_1"]["var"], rtol=1e-4)


def test_precise_batch_stats_errors():
    model = StatNet()
    xs = _stat_data(2)
    variables = _init(model, xs[0], 0)
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="num_batches"):
            bnjax.precise_batch_stats(model, variables, xs, num_batches=bad)
    with pytest.raises(ValueError, match="empty"):
        bnjax.precise_batch_stats(model, variables, [])
    with pytest.raises(ValueError, match="per-example shape"):
        bnjax.precise_batch_stats(model, variables, [xs[0], jnp.ones((8, 3, 5))])
    with pytest.raises(ValueError, match="could not be run"):
        bnjax.precise_batch_stats(model, variables, [jnp.ones((8, 3, 7))])
    with pytest.raises(ValueError, match="stacked"):
        bnjax.precise_batch_stats(model, variables, jnp.ones((8,)))
    with pytest.raises(TypeError, match="batches"):
        bnjax.precise_batch_stats(model, variables, {"x": xs[0]})
    with pytest.raises(ValueError, match="no 'x'"):
        bnjax.precise_batch_stats(model, variables, [{"image": xs[0]}])
    with pytest.raises(ValueError, match="floating-point"):
        bnjax.precise_batch_stats(model, variables, [jnp.ones((8, 3, 4), jnp.int32)])
    with pytest.raises(ValueError, match="batch_stats"):
        bnjax.precise_batch_stats(model, {"params": variables["params"]}, xs)
    with pytest.raises(ValueError, match="training mode"):
        bnjax.precise_batch_stats(model, variables, xs, call_kwargs={"training": True})
    seq = nn.Sequential([nn.Dense(2), bnjax.BatchNorm(use_running_average=True)])
    seq_vars = _ones_init(seq, jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="more than one value"):
        bnjax.precise_batch_stats(seq, seq_vars, [jnp.ones((1, 3))], unbiased=True,
                                  call_kwargs={})


# ---------------------------------------------------------------------------------------------
# Monte Carlo batch norm.


def _np_mc(params, train, x):
    """Float64 Monte Carlo BN of StatNet with every training batch sampled once."""
    samples = []
    for b in train:
        _, seen = _np_forward(params, None, b, stats_from_batch=True)
        stats = {f"BatchNorm_{i}": {"mean": m, "var": v} for i, (m, v, _) in enumerate(seen)}
        logits, _ = _np_forward(params, stats, x)
        e = np.exp(logits - logits.max(-1, keepdims=True))
        samples.append(e / e.sum(-1, keepdims=True))
    samples = np.stack(samples)
    probs = samples.mean(0)
    entropy = -(probs * np.log(probs)).sum(-1)
    variance = samples.var(0).sum(-1)
    mi = entropy - (-(samples * np.log(samples)).sum(-1)).mean(0)
    return probs, entropy, variance, mi


def test_mc_batch_norm_matches_numpy_reference():
    model = StatNet()
    train = [_normal((3, i), (8, 3, 4), 1.0, 2.0) for i in range(6)]
    x = _normal(4, (7, 3, 4), 1.0, 2.0)
    variables = _init(model, x, 8)
    out = bnjax.mc_batch_norm_predict(model, variables, x, train, num_samples=6,
                                      rng=jax.random.key(5), batch_size=3)
    # Six batches, six samples: every batch once (the order does not change the averages).
    probs, entropy, variance, mi = _np_mc(variables["params"], train, x)
    np.testing.assert_allclose(out.probs, probs, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out.entropy, entropy, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out.variance, variance, rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(out.mutual_information, mi, rtol=1e-3, atol=1e-6)
    assert out.sample_probs.shape == (6, 7, 3)
    assert float(variance.max()) > 1e-4  # the samples really differ


def test_mc_batch_norm_errors():
    model = StatNet()
    train = _stat_data(3)
    variables = _init(model, train[0], 0)
    for bad in (0, -2, False):
        with pytest.raises(ValueError, match="num_samples"):
            bnjax.mc_batch_norm_predict(model, variables, train[0], train, num_samples=bad)
    with pytest.raises(ValueError, match="x has shape"):
        bnjax.mc_batch_norm_predict(model, variables, jnp.ones((4, 3, 5)), train)
    with pytest.raises(ValueError, match="empty"):
        bnjax.mc_batch_norm_predict(model, variables, train[0], [])
    with pytest.raises(ValueError, match="batch_stats"):
        bnjax.mc_batch_norm_predict(model, {"params": variables["params"]}, train[0], train)
    with pytest.raises(ValueError, match="training mode"):
        bnjax.mc_batch_norm_predict(model, variables, train[0], train,
                                    call_kwargs={"training": True})
    with pytest.raises(TypeError, match="rng"):
        bnjax.mc_batch_norm_predict(model, variables, train[0], train, rng="seed")
    with pytest.raises(ValueError, match="no batch-norm layer"):
        plain = nn.Dense(2)
        pv = _ones_init(plain, jnp.ones((2, 3)))
        bnjax.mc_batch_norm_predict(plain, {**pv, "batch_stats": {"x": jnp.ones(2)}},
                                    jnp.ones((2, 3)), [jnp.ones((2, 3))], call_kwargs={})


# ---------------------------------------------------------------------------------------------
# Export and the training program's switches.


def test_export_folded_model_round_trip(tmp_path):
    model = ChainNet()
    x = _normal(0, (3, 10, 10, 3))
    variables = _init(model, x, 9)
    report = bnjax.export_folded_model(model, variables, x, str(tmp_path))
    assert len(report["folded"]) == 3 and report["kept"] == []
    exported = jax.export.deserialize(bytearray((tmp_path / "folded_model.jax_export")
                                                .read_bytes()))
    x2 = _normal(1, (5, 10, 10, 3))  # another batch size
    _assert_rel_close(exported.call(x2), _apply(model, variables, x2, training=False), 1e-5)
    assert (tmp_path / "fold_report.json").exists()


def test_training_config_switches(tmp_path, tmp_path_factory):
    from bnjax_train import config_lib, train

    config = config_lib.load_config("tiny")
    # data_dir: this worker's MNIST-1D cache (as in test_train.py), made once per session.
    config.update(num_epochs=1, max_train_examples=128, batch_size=64, eval_batch_size=128,
                  data_dir=str(tmp_path_factory.getbasetemp() / "bnjax_data"))
    for field, bad in (("precise_bn_batches", -1), ("precise_bn_batches", 1.5),
                       ("export_folded", 1)):
        broken = ml_collections.ConfigDict({**config.to_dict(), field: bad})
        with pytest.raises(ValueError, match=f"config.{field}"):
            config_lib.validate_config(broken, num_devices=1)
    config.update(precise_bn_batches=1, export_folded=True)
    result = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert 0.0 <= result["test_accuracy_precise_bn"] <= 1.0
    assert np.isfinite(result["test_loss_precise_bn"])
    assert result["folded_export"].endswith("folded_model.jax_export")
    assert (tmp_path / "run" / "folded" / "fold_report.json").exists()


# ---------------------------------------------------------------------------------------------
# The model's mode keyword, found from its signature, and how batch-norm calls are read.
# Each model's default for its mode argument is the *training* value, so a tool that did not
# pass the inference value would run the batch norms in training mode.


class TrainNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        return _stat_body(x, train, ("bnjax", "flax"))


class TrainingNet(nn.Module):
    @nn.compact
    def __call__(self, x, training: bool = True):
        return _stat_body(x, training, ("flax", "bnjax"))


class RunningAverageNet(nn.Module):
    @nn.compact
    def __call__(self, x, use_running_average: bool = False):
        return _stat_body(x, not use_running_average, ("bnjax", "flax"))


class DeterministicNet(nn.Module):
    @nn.compact
    def __call__(self, x, *, deterministic: bool = False):
        return _stat_body(x, not deterministic, ("flax", "bnjax"))


MODE_NETS = {"train": (TrainNet, False), "training": (TrainingNet, False),
             "use_running_average": (RunningAverageNet, True),
             "deterministic": (DeterministicNet, True)}


@pytest.mark.parametrize("keyword", list(MODE_NETS))
def test_fold_finds_the_mode_keyword(keyword):
    cls, value = MODE_NETS[keyword]
    model, x = cls(), _stat_data(10)[0]
    variables = _init(model, x, 11, **{keyword: value})
    folded, fv = bnjax.fold_batch_norm(model, variables, x)  # no call_kwargs
    assert set(folded.folded) == {("Dense_0", "BatchNorm_0"), ("Dense_1", "BatchNorm_1")}
    ref, _ = _np_forward(variables["params"], variables["batch_stats"], x)
    out = _apply(folded, fv, x, **{keyword: value})
    _assert_rel_close(out, ref, 1e-5)
    _assert_rel_close(_apply(model, variables, x, **{keyword: value}), ref, 1e-5)


@pytest.mark.parametrize("keyword", list(MODE_NETS))
def test_statistics_tools_find_the_mode_keyword(keyword):
    cls, value = MODE_NETS[keyword]
    model, xs = cls(), _stat_data(12)
    variables = _init(model, xs[0], 13, **{keyword: value})
    new = bnjax.precise_batch_stats(model, variables, xs)  # no call_kwargs
    ref = _np_precise(variables["params"], variables["batch_stats"], xs, False)
    for name in ("BatchNorm_0", "BatchNorm_1"):
        for key in ("mean", "var"):
            np.testing.assert_allclose(new["batch_stats"][name][key], ref[name][key], rtol=1e-4)
    train = [x for x in xs if x.shape[0] == 8]
    out = bnjax.mc_batch_norm_predict(model, variables, xs[3], train, num_samples=len(train))
    probs, entropy, _, _ = _np_mc(variables["params"], train, xs[3])
    np.testing.assert_allclose(out.probs, probs, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out.entropy, entropy, rtol=1e-4, atol=1e-6)


def test_export_finds_the_mode_keyword(tmp_path):
    model, x = DeterministicNet(), _stat_data(14)[0]
    variables = _init(model, x, 15, deterministic=True)
    report = bnjax.export_folded_model(model, variables, x, str(tmp_path))
    assert len(report["folded"]) == 2
    exported = jax.export.deserialize(bytearray((tmp_path / "folded_model.jax_export")
                                                .read_bytes()))
    ref, _ = _np_forward(variables["params"], variables["batch_stats"], x)
    _assert_rel_close(exported.call(x), ref, 1e-5)


class TwoModeNet(nn.Module):
    """Both ``train`` and ``deterministic``: the tools pass the inference value of each."""

    @nn.compact
    def __call__(self, x, train: bool = True, deterministic: bool = False):
        x = _stat_body(x, train, ("bnjax", "bnjax"))
        return nn.Dropout(0.5)(x, deterministic=deterministic)  # needs an rng unless False


def test_fold_passes_every_mode_keyword():
    model, x = TwoModeNet(), _stat_data(16)[0]
    variables = _init(model, x, 17, train=False, deterministic=True)
    folded, fv = bnjax.fold_batch_norm(model, variables, x)
    assert len(folded.folded) == 2
    ref, _ = _np_forward(variables["params"], variables["batch_stats"], x)
    _assert_rel_close(_apply(folded, fv, x, train=False, deterministic=True), ref, 1e-5)


def test_explicit_call_kwargs_win():
    model, x = TrainNet(), _stat_data(18)[0]
    variables = _init(model, x, 19, train=False)
    # The found keyword would be train=False; explicit call_kwargs are used as given.
    with pytest.raises(ValueError, match="training mode"):
        bnjax.fold_batch_norm(model, variables, x, call_kwargs={"train": True})
    with pytest.raises(ValueError, match="training mode"):
        bnjax.precise_batch_stats(model, variables, [x], call_kwargs={})
    folded, fv = bnjax.fold_batch_norm(model, variables, x, call_kwargs={"train": False})
    ref, _ = _np_forward(variables["params"], variables["batch_stats"], x)
    _assert_rel_close(_apply(folded, fv, x, train=False), ref, 1e-5)


class OtherModeNet(nn.Module):
    @nn.compact
    def __call__(self, x, is_training: bool):
        return _stat_body(x, is_training, ("bnjax", "flax"))


def test_model_without_a_mode_keyword_needs_call_kwargs(tmp_path):
    model, xs = OtherModeNet(), _stat_data(20)
    variables = _init(model, xs[0], 21, is_training=False)
    tools = {
        "fold_batch_norm": lambda **kw: bnjax.fold_batch_norm(model, variables, xs[0], **kw),
        "export_folded_model": lambda **kw: bnjax.export_folded_model(
            model, variables, xs[0], str(tmp_path), **kw),
        "precise_batch_stats": lambda **kw: bnjax.precise_batch_stats(
            model, variables, xs, **kw),
        "mc_batch_norm_predict": lambda **kw: bnjax.mc_batch_norm_predict(
            model, variables, xs[0], xs, **kw),
    }
    for name, tool in tools.items():
        with pytest.raises(ValueError, match="call_kwargs") as info:
            tool()
        message = str(info.value)
        assert message.startswith(name) and "is_training" in message
        assert "train, training, use_running_average, deterministic" in message
    folded, fv = tools["fold_batch_norm"](call_kwargs={"is_training": False})
    ref, _ = _np_forward(variables["params"], variables["batch_stats"], xs[0])
    _assert_rel_close(_apply(folded, fv, xs[0], is_training=False), ref, 1e-5)
    with pytest.raises(TypeError, match="call_kwargs"):
        tools["fold_batch_norm"](call_kwargs=[("is_training", False)])


def _bn_call_training(layer, *args, **kwargs):
    """The mode the tools read off ``layer(x, *args, **kwargs)``."""
    from bnjax.inference.tracing import intercept_layers

    seen = []

    def on_bn(call, next_fun):
        seen.append(call.training())
        return call.run(next_fun)

    x = jnp.ones((2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bnjax.FlaxEpsilonWarning)
        variables = jax.eval_shape(lambda: layer.init(jax.random.key(0), x, *args, **kwargs))
    variables = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), variables)
    with warnings.catch_warnings(), intercept_layers(on_bn):
        warnings.simplefilter("ignore", bnjax.FlaxEpsilonWarning)
        layer.apply(variables, x, *args, mutable=["batch_stats"], **kwargs)
    assert len(seen) == 1  # a subclass's super().__call__ is its one call
    return seen[0]


def test_bn_calls_are_read_by_name_for_either_calling_convention():
    # Flax's layer: the second positional argument is use_running_average.
    assert _bn_call_training(nn.BatchNorm(), True) is False
    assert _bn_call_training(nn.BatchNorm(), False) is True
    assert _bn_call_training(nn.BatchNorm(), use_running_average=False) is True
    assert _bn_call_training(nn.BatchNorm(use_running_average=True)) is False
    # bnjax's layer by keyword (either convention), its attribute, and frozen.
    assert _bn_call_training(bnjax.BatchNorm(), training=True) is True
    assert _bn_call_training(bnjax.BatchNorm(), training=False) is False
    assert _bn_call_training(bnjax.BatchNorm(), use_running_average=False) is True
    assert _bn_call_training(bnjax.BatchNorm(use_running_average=True)) is False
    assert _bn_call_training(bnjax.BatchNorm(use_running_average=False)) is True
    assert _bn_call_training(bnjax.BatchNorm(frozen=True), training=True) is False
    # Flax's convention on bnjax's layer: use_running_average second, training keyword-only.
    assert _bn_call_training(FlaxStyleBatchNorm(), True) is False
    assert _bn_call_training(FlaxStyleBatchNorm(), False) is True
    assert _bn_call_training(FlaxStyleBatchNorm(), training=True) is True
    assert _bn_call_training(FlaxStyleBatchNorm(frozen=True), False) is False


def test_flax_style_subclass_called_positionally():
    # The subclass's super().__call__ is one call of the layer, not a second one.
    model = StatNet("flax_style")
    xs = _stat_data(22)
    variables = _init(model, xs[0], 23)
    new = bnjax.precise_batch_stats(model, variables, xs)
    ref = _np_precise(variables["params"], variables["batch_stats"], xs, False)
    for name in ("BatchNorm_0", "BatchNorm_1"):
        np.testing.assert_allclose(new["batch_stats"][name]["var"], ref[name]["var"], rtol=1e-4)
    # A subclass that only adds a __call__ computes its base's arithmetic: it folds.
    folded, fv = bnjax.fold_batch_norm(model, variables, xs[0])
    assert folded.folded == (("Dense_0", "BatchNorm_0"), ("Dense_1", "BatchNorm_1"))
    assert "batch_stats" not in fv
    ref_out, _ = _np_forward(variables["params"], variables["batch_stats"], xs[0])
    _assert_rel_close(_apply(folded, fv, xs[0], training=False), ref_out, 1e-5)
