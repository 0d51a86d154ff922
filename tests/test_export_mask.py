"""Masked calls export with a symbolic batch (``jax.export``), as padded batches need.

Each mask shape bnjax reads (``(b, 1)``, ``(b,)`` and ``(b, C)``), in training and inference
mode, and a mask built inside the function from ``jnp.arange(x.shape[0]) < n``: exported once
with the batch size symbolic, then called on batches of 6 and 4 rows, the result equals the
direct call and a float64 NumPy reference of the masked statistics.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import bnjax

C = 3
EPS = 1e-3
MOMENTUM = 0.99
STATS = {"mean": np.array([0.5, -1.0, 2.0], np.float32),
         "var": np.array([2.0, 0.5, 1.5], np.float32)}
PARAMS = {"scale": np.array([1.5, 0.5, -1.0], np.float32),
          "bias": np.array([0.1, 0.2, -0.3], np.float32)}


def batch(n, kind):
    rng = np.random.default_rng(n)
    x = (rng.normal(size=(n, C)) * 3 + 1).astype(np.float32)
    rows = np.arange(n) % 3 != 1  # rows 1 and 4 are padding
    x[~rows] = 1e3
    if kind == "(b, 1)":
        return x, rows[:, None]
    if kind == "(b,)":
        return x, rows
    values = rows[:, None] & (rng.uniform(size=(n, C)) > 0.2)
    values[0] = True  # every feature keeps a valid value
    return x, values


def reference(x, mask, training):
    """float64 NumPy: batch norm over the valid values of each feature."""
    x = x.astype(np.float64)
    valid = np.broadcast_to(mask.reshape(mask.shape + (1,) * (2 - mask.ndim)), x.shape)
    mean, var = STATS["mean"].astype(np.float64), STATS["var"].astype(np.float64)
    new = STATS
    if training:
        count = valid.sum(0)
        mean = np.where(valid, x, 0).sum(0) / count
        var = np.where(valid, (x - mean) ** 2, 0).sum(0) / count
        new = {"mean": MOMENTUM * STATS["mean"] + (1 - MOMENTUM) * mean,
               "var": MOMENTUM * STATS["var"] + (1 - MOMENTUM) * var}
    y = (x - mean) / np.sqrt(var + EPS) * PARAMS["scale"] + PARAMS["bias"]
    return y, valid, new


def masked_bn(training):
    def f(x, mask):
        return bnjax.batch_norm(x, STATS, PARAMS, training=training, mask=mask,
                                momentum=MOMENTUM, epsilon=EPS)

    return f


def symbolic(kind):
    (b,) = export.symbolic_shape("b")
    mask_shape = {"(b, 1)": (b, 1), "(b,)": (b,), "(b, C)": (b, C)}[kind]
    return (jax.ShapeDtypeStruct((b, C), jnp.float32),
            jax.ShapeDtypeStruct(mask_shape, jnp.bool_))


def check(got, direct, ref):
    (y, new), (y_direct, new_direct), (y_ref, valid, new_ref) = got, direct, ref
    np.testing.assert_allclose(y, y_direct, rtol=1e-6, atol=1e-6)
    for key in ("mean", "var"):
        np.testing.assert_allclose(new[key], new_direct[key], rtol=1e-6)
        np.testing.assert_allclose(new[key], new_ref[key], rtol=1e-5)
    np.testing.assert_allclose(np.where(valid, y, 0), np.where(valid, y_ref, 0), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("kind", ["(b, 1)", "(b,)", "(b, C)"])
def test_masked_batch_norm_exports_with_a_symbolic_batch(kind, training):
    f = masked_bn(training)
    exported = export.export(jax.jit(f))(*symbolic(kind))
    for n in (6, 4):
        x, mask = batch(n, kind)
        check(exported.call(x, mask), f(x, mask), reference(x, mask, training))


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_a_mask_built_inside_from_the_symbolic_batch_size_exports(training):
    def f(x, n):
        mask = jnp.arange(x.shape[0]) < n  # the first n rows are valid
        return masked_bn(training)(x, mask)

    (b,) = export.symbolic_shape("b")
    exported = export.export(jax.jit(f))(jax.ShapeDtypeStruct((b, C), jnp.float32),
                                         jax.ShapeDtypeStruct((), jnp.int32))
    for n in (6, 4):
        x, _ = batch(n, "(b,)")
        valid = np.arange(n) < n - 2
        x[~valid] = np.nan  # padding reaches nothing
        check(exported.call(x, np.int32(n - 2)), f(x, n - 2), reference(x, valid, training))


def test_the_linen_layer_exports_a_masked_call_as_flax_does():
    """``(b, 1)`` mask, training: bnjax.BatchNorm and flax.linen.BatchNorm, both exported."""
    ours = bnjax.BatchNorm(momentum=MOMENTUM, epsilon=EPS)
    theirs = nn.BatchNorm(momentum=MOMENTUM, epsilon=EPS)
    x0 = jnp.ones((2, C))
    v_ours = ours.init(jax.random.key(0), x0, training=False)
    v_theirs = theirs.init(jax.random.key(0), x0, use_running_average=True)

    def run_ours(x, mask):
        return ours.apply(v_ours, x, training=True, mask=mask, mutable=["batch_stats"])

    def run_theirs(x, mask):
        return theirs.apply(v_theirs, x, use_running_average=False, mask=mask,
                            mutable=["batch_stats"])

    specs = symbolic("(b, 1)")
    e_ours, e_theirs = (export.export(jax.jit(f))(*specs) for f in (run_ours, run_theirs))
    for n in (6, 4):
        x, mask = batch(n, "(b, 1)")
        (y, new), (y_flax, new_flax) = e_ours.call(x, mask), e_theirs.call(x, mask)
        rows = mask[:, 0]
        np.testing.assert_allclose(y[rows], y_flax[rows], rtol=1e-4, atol=1e-4)
        for key in ("mean", "var"):
            np.testing.assert_allclose(new["batch_stats"][key], new_flax["batch_stats"][key],
                                       rtol=1e-4, atol=1e-6)


def test_ghost_batches_export_with_a_batch_known_to_be_a_multiple():
    """A symbolic batch ``2*k`` is a multiple of the ghost batch size 2: it exports."""
    def f(x, mask):
        return bnjax.batch_norm(x, STATS, training=True, mask=mask, virtual_batch_size=2)

    (b,) = export.symbolic_shape("2*k")
    exported = export.export(jax.jit(f))(jax.ShapeDtypeStruct((b, C), jnp.float32),
                                         jax.ShapeDtypeStruct((b, 1), jnp.bool_))
    for n in (6, 4):
        x, mask = batch(n, "(b, 1)")
        got, direct = exported.call(x, mask), f(x, mask)
        for a, d in zip(jax.tree.leaves(got), jax.tree.leaves(direct), strict=True):
            np.testing.assert_allclose(a, d, rtol=1e-6, atol=1e-6)


def test_ghost_batches_with_a_symbolic_batch_say_that_it_is_symbolic():
    def f(x):
        return bnjax.batch_norm(x, STATS, training=True, virtual_batch_size=2)

    (b,) = export.symbolic_shape("b")
    with pytest.raises(ValueError, match=r"virtual_batch_size=2.*batch size b is symbolic.*"
                                         r"2\*k"):
        export.export(jax.jit(f))(jax.ShapeDtypeStruct((b, C), jnp.float32))
