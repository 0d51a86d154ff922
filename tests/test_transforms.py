"""The transformation matrix: every JAX and Flax transformation, bnjax beside Flax.

Each cell runs one transformation on ``bnjax.BatchNorm`` and on ``flax.linen.BatchNorm`` (or
``bnjax.nnx.BatchNorm`` and ``flax.nnx.BatchNorm``) with the same settings and variables, in
training and in inference mode, and compares everything the transformation returns: outputs,
gradients or tangents, and the updated statistics. Flax is the reference (the arithmetic is
the same; ``use_fast_variance=False`` so that its variance is the exact two-pass one). Both
libraries run inside one ``jax.jit`` per cell, so each cell compiles once.
docs/guarantees.md shows this matrix as a table.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import bnjax
import bnjax.nnx as bnnx

MOM, EPS = 0.9, 1e-3
RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(6, 3)) * 2 + 1, jnp.float32)
TX = jnp.asarray(RNG.normal(size=(6, 3)), jnp.float32)  # a tangent / weights of the loss
PARAMS = {"scale": jnp.asarray(RNG.uniform(0.5, 1.5, 3), jnp.float32),
          "bias": jnp.asarray(RNG.normal(size=3), jnp.float32)}
STATS = {"mean": jnp.asarray(RNG.normal(size=3), jnp.float32),
         "var": jnp.asarray(RNG.uniform(0.5, 2.0, 3), jnp.float32)}
VARS = {"params": PARAMS, "batch_stats": STATS}
TP = jax.tree.map(lambda p: jnp.asarray(RNG.normal(size=p.shape), p.dtype), PARAMS)

LINEN = {"bnjax": bnjax.BatchNorm, "flax": functools.partial(nn.BatchNorm,
                                                              use_fast_variance=False)}
NNX = {"bnjax": bnnx.BatchNorm, "flax": functools.partial(nnx.BatchNorm,
                                                           use_fast_variance=False)}
MODES = pytest.mark.parametrize("train", [True, False], ids=["training", "inference"])


def close(a: Any, b: Any, rtol: float = 2e-4, atol: float = 2e-5) -> None:
    """Every leaf of ``a`` matches ``b`` (same tree, shapes and dtypes)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert u.shape == v.shape and u.dtype == v.dtype, (u.shape, v.shape, u.dtype, v.dtype)
        np.testing.assert_allclose(np.asarray(u, np.float64), np.asarray(v, np.float64),
                                   rtol=rtol, atol=atol)


def layer(lib: str, **kw: Any) -> nn.Module:
    return LINEN[lib](momentum=MOM, epsilon=EPS, **kw)


def apply(module: nn.Module, variables: Any, x: jax.Array, train: bool) -> tuple[Any, Any]:
    """``(y, batch_stats after the call)``, as a Flax user calls the layer."""
    if train:
        y, upd = module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
        return y, upd["batch_stats"]
    return module.apply(variables, x, use_running_average=True), variables["batch_stats"]


def loss_fn(module: nn.Module, train: bool):
    """``(params, x) -> (weighted sum of squares of y, new statistics)``."""
    def loss(params, x):
        y, stats = apply(module, {"params": params, "batch_stats": STATS}, x, train)
        return jnp.sum(TX * y * y), stats
    return loss


# Cells on a linen layer: f(module, train) -> everything the transformation returns.
def _jit(m, train):
    return apply(m, VARS, X, train)


def _grad(m, train):
    return jax.grad(loss_fn(m, train), argnums=(0, 1), has_aux=True)(PARAMS, X)


def _jvp(m, train):
    return jax.jvp(lambda p, x: apply(m, {"params": p, "batch_stats": STATS}, x, train),
                   (PARAMS, X), (TP, TX))


def _jacfwd(m, train):
    return jax.jacfwd(lambda x: apply(m, VARS, x, train)[0])(X)


def _jacrev(m, train):
    return jax.jacrev(lambda x: apply(m, VARS, x, train)[0])(X)


def _hessian(m, train):
    return jax.hessian(lambda x: loss_fn(m, train)(PARAMS, x)[0])(X)


def _linearize(m, train):
    y, f_jvp = jax.linearize(lambda x: apply(m, VARS, x, train)[0], X)
    return y, f_jvp(TX)


def _checkpoint(m, train):
    # Rematerialized in the backward pass: the statistics are still updated once.
    return jax.grad(jax.checkpoint(loss_fn(m, train)), has_aux=True)(PARAMS, X)


def _eval_shape(m, train):
    out = jax.eval_shape(lambda x: apply(m, VARS, x, train), X)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out)


def _lax_scan(m, train):
    def step(stats, x):
        y, new = apply(m, {"params": PARAMS, "batch_stats": stats}, x, train)
        return new, y
    return jax.lax.scan(step, STATS, jnp.stack([X, X * 0.5 - 1, TX]))


def _vmap_nested(m, train):
    # Statistics synchronized over both named axes of a nested vmap: (2, 2) groups of 6 rows.
    xs = jnp.stack([X, TX, X * TX, X - TX]).reshape(2, 2, 6, 3)
    sync = m.clone(axis_name=("outer", "inner"))
    inner = jax.vmap(lambda x: apply(sync, VARS, x, train), axis_name="inner")
    return jax.vmap(inner, axis_name="outer")(xs)


LINEN_CELLS = {"jit": _jit, "grad": _grad, "jvp": _jvp, "jacfwd": _jacfwd, "jacrev": _jacrev,
               "hessian": _hessian, "linearize": _linearize, "checkpoint": _checkpoint,
               "eval_shape": _eval_shape, "lax.scan": _lax_scan, "vmap (nested)": _vmap_nested}


@MODES
@pytest.mark.parametrize("cell", list(LINEN_CELLS))
def test_linen_layer_under_transformation_matches_flax(cell, train):
    fn = LINEN_CELLS[cell]
    ours, flax_out = jax.jit(lambda: (fn(layer("bnjax"), train), fn(layer("flax"), train)))()
    close(ours, flax_out)


# Flax's lifted transformations, on a model that holds the layer.
class Net(nn.Module):
    """The layer inside a model, called as Flax examples call it."""

    lib: str
    train: bool

    @nn.compact
    def __call__(self, x):
        return layer(self.lib)(x, use_running_average=not self.train)


class Cell(nn.Module):
    """One step of ``nn.scan``: normalize the step's input; the carry counts the steps."""

    lib: str
    train: bool

    @nn.compact
    def __call__(self, carry, x):
        return carry + 1, layer(self.lib)(x, use_running_average=not self.train)


def _run_model(model: nn.Module, x: jax.Array, train: bool, params: Any, stats: Any,
               *call: Any) -> Any:
    variables = {"params": params, "batch_stats": stats}

    def loss(p):
        # batch_stats mutable in both modes (nn.scan carries it); inference leaves it as is.
        out, upd = model.apply({**variables, "params": p}, *call, x, mutable=["batch_stats"])
        y = out[-1] if isinstance(out, tuple) else out
        return jnp.sum(y * y * jnp.broadcast_to(TX, y.shape)), (out, upd)

    return jax.grad(loss, has_aux=True)(params)


def _nn_scan(lib, train):
    model = nn.scan(Cell, variable_broadcast="params", variable_carry="batch_stats",
                    split_rngs={"params": False}, length=3)(lib, train)
    xs = jnp.stack([X, X * 0.5 - 1, TX])
    params = {"BatchNorm_0": PARAMS}
    return _run_model(model, xs, train, params, {"BatchNorm_0": STATS}, jnp.zeros(()))


def _nn_vmap(lib, train):
    model = nn.vmap(Net, variable_axes={"params": 0, "batch_stats": 0},
                    split_rngs={"params": True}, in_axes=0, out_axes=0)(lib, train)
    stack = lambda t: jax.tree.map(lambda a: jnp.stack([a, a * 0.5 + 0.25]), t)  # noqa: E731
    return _run_model(model, jnp.stack([X, TX]), train, {"BatchNorm_0": stack(PARAMS)},
                      {"BatchNorm_0": stack(STATS)})


def _nn_remat(lib, train):
    model = nn.remat(Net)(lib, train)
    return _run_model(model, X, train, {"BatchNorm_0": PARAMS}, {"BatchNorm_0": STATS})


LIFTED_CELLS = {"nn.scan": _nn_scan, "nn.vmap": _nn_vmap, "nn.remat": _nn_remat}


@MODES
@pytest.mark.parametrize("cell", list(LIFTED_CELLS))
def test_flax_lifted_transformation_matches_flax(cell, train):
    fn = LIFTED_CELLS[cell]
    ours, flax_out = jax.jit(lambda: (fn("bnjax", train), fn("flax", train)))()
    close(ours, flax_out)


@MODES
def test_export_with_a_symbolic_batch_matches_flax(train):
    (b,) = jax.export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((b, 3), jnp.float32)
    def export(lib):
        module = layer(lib)
        return jax.export.export(jax.jit(lambda v, x: apply(module, v, x, train)))(VARS, spec)

    exported = {lib: export(lib) for lib in LINEN}
    for rows in (6, 4):
        x = jnp.concatenate([X, TX])[:rows]
        close(exported["bnjax"].call(VARS, x), exported["flax"].call(VARS, x))


@MODES
def test_pmap_and_shard_map_with_synchronized_statistics_match_flax(train):
    xs = jnp.stack([X, TX])  # two devices, 6 rows each

    def step(m):
        def f(params, x):
            return jax.grad(loss_fn(m, train), has_aux=True)(params, x)
        return f

    def sync(lib):
        return layer(lib, axis_name="data")

    pm = {lib: jax.pmap(step(sync(lib)), axis_name="data", in_axes=(None, 0))(PARAMS, xs)
          for lib in LINEN}
    close(pm["bnjax"], pm["flax"])
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sm = {lib: jax.jit(jax.shard_map(
        lambda p, x, lib=lib: jax.tree.map(lambda a: a[None], step(sync(lib))(p, x[0])),
        mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data")))(PARAMS, xs)
          for lib in LINEN}
    close(sm["bnjax"], sm["flax"])


# NNX: the layer objects and NNX's own transformations.
def nnx_layer(lib: str, train: bool) -> nnx.Module:
    m = NNX[lib](3, momentum=MOM, epsilon=EPS, rngs=nnx.Rngs(0))
    m.scale[...], m.bias[...] = PARAMS["scale"], PARAMS["bias"]
    m.mean[...], m.var[...] = STATS["mean"], STATS["var"]
    m.train() if train else m.eval()
    return m


def nnx_stats(m: nnx.Module) -> tuple[jax.Array, jax.Array]:
    return m.mean[...], m.var[...]


def _nnx_jit(m):
    y = nnx.jit(lambda m, x: m(x))(m, X)
    return y, nnx_stats(m)


def _nnx_grad(m):
    def loss(m, x):
        return jnp.sum(TX * m(x) ** 2)
    grads = nnx.grad(loss)(m, X)
    return (grads.scale[...], grads.bias[...]), nnx_stats(m)


def _nnx_forward_mode(m):
    graphdef, state = nnx.split(m)

    def f(x):
        module = nnx.merge(graphdef, state, copy=True)
        return module(x), nnx.state(module, nnx.BatchStat)

    y_t = jax.jvp(f, (X,), (TX,))
    jac = jax.jacfwd(lambda x: f(x)[0])(X)
    lin = jax.linearize(lambda x: f(x)[0], X)[1](TX)
    return y_t, jac, lin


def _nnx_remat(m):
    def loss(m, x):
        return jnp.sum(TX * nnx.remat(lambda m, x: m(x))(m, x) ** 2)
    grads = nnx.grad(loss)(m, X)
    return (grads.scale[...], grads.bias[...]), nnx_stats(m)


def _nnx_scan(m):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    def run(m, x):
        return m, m(x)

    _, ys = run(m, jnp.stack([X, X * 0.5 - 1, TX]))
    return ys, nnx_stats(m)


def _nnx_vmap(m):
    # An ensemble of two layers, made and run under nnx.vmap.
    train = m.use_running_average is False
    lib = "bnjax" if isinstance(m, bnnx.BatchNorm) else "flax"

    @nnx.vmap(in_axes=0, out_axes=0)
    def make(scale):
        e = nnx_layer(lib, train)
        e.scale[...] = scale
        return e

    ensemble = make(jnp.stack([PARAMS["scale"], PARAMS["scale"] * 2]))
    ys = nnx.vmap(lambda e, x: e(x), in_axes=(0, 0))(ensemble, jnp.stack([X, TX]))
    return ys, nnx_stats(ensemble)


NNX_CELLS = {"nnx.jit": _nnx_jit, "nnx.grad": _nnx_grad, "jvp/jacfwd/linearize":
             _nnx_forward_mode, "nnx.remat": _nnx_remat, "nnx.scan": _nnx_scan,
             "nnx.vmap": _nnx_vmap}


@MODES
@pytest.mark.parametrize("cell", list(NNX_CELLS))
def test_nnx_layer_under_transformation_matches_flax(cell, train):
    fn = nnx.jit(NNX_CELLS[cell])
    close(fn(nnx_layer("bnjax", train)), fn(nnx_layer("flax", train)))


def test_nnx_eval_shape_matches_flax():
    shapes = {lib: nnx.state(nnx.eval_shape(lambda lib=lib: NNX[lib](3, rngs=nnx.Rngs(0))))
              for lib in NNX}
    as_arrays = lambda s: jax.tree.map(lambda v: jnp.zeros(v.shape, v.dtype), s)  # noqa: E731
    close(as_arrays(shapes["bnjax"]), as_arrays(shapes["flax"]))


@pytest.mark.parametrize("rows", [6, 1])
def test_init_with_output_in_training_mode_matches_flax(rows):
    """Flax normalizes with the batch statistics at init and leaves the statistics as made."""
    out = {lib: layer(lib).init_with_output(jax.random.key(0), X[:rows],
                                            use_running_average=False) for lib in LINEN}
    close(out["bnjax"], out["flax"])
    np.testing.assert_allclose(out["bnjax"][1]["batch_stats"]["mean"], np.zeros(3))
    if rows > 1:
        np.testing.assert_allclose(np.std(np.asarray(out["bnjax"][0], np.float64), axis=0),
                                   np.ones(3), rtol=1e-3)


def test_functional_forward_mode_matches_float64():
    """``bnjax.batch_norm``'s jvp against the derivative of a float64 NumPy formula."""
    def f(x):
        y, new = bnjax.batch_norm(x, STATS, PARAMS, training=True, momentum=MOM, epsilon=EPS)
        return y, new["var"]

    (y, var), (dy, dvar) = jax.jvp(f, (X,), (TX,))
    x, t = np.asarray(X, np.float64), np.asarray(TX, np.float64)
    h = 1e-6  # central difference of the float64 formula

    def ref(x):
        m, v = x.mean(0), x.var(0)
        g, b = np.asarray(PARAMS["scale"], np.float64), np.asarray(PARAMS["bias"], np.float64)
        return (x - m) / np.sqrt(v + EPS) * g + b, MOM * np.asarray(STATS["var"]) + (1 - MOM) * v

    (y_plus, v_plus), (y_minus, v_minus) = ref(x + h * t), ref(x - h * t)
    np.testing.assert_allclose(y, ref(x)[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dy, (y_plus - y_minus) / (2 * h), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dvar, (v_plus - v_minus) / (2 * h), rtol=1e-4, atol=1e-5)
