"""Synchronized (cross-device) batch statistics under every way of mapping over devices.

8 CPU devices (tests/conftest.py). The reference is float64 NumPy BN over the global batch
(bn_reference.np_bn), itself checked against central differences below. Tolerance: max error
<= 1e-5 times the largest reference magnitude of that array ("1e-5 relative").
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from bn_reference import SyncMLP, init_variables, make_data, np_bn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax

D = 8  # devices
C = 3  # features
AXIS = "i"
GROUPS = [[0, 1], [2, 3], [4, 5], [6, 7]]


def close(got, ref, rtol=1e-5):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    scale = max(np.max(np.abs(ref)), 1e-30)
    err = np.max(np.abs(got - ref)) / scale
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


def make_inputs(per_device, seed=0, offset=0.0):
    rng = np.random.RandomState(seed)
    x = (rng.randn(D, per_device, C) * [1.0, 3.0, 0.5] + [0.5, -2.0, 4.0] + offset)
    return {
        "x": x.astype(np.float32),
        "dy": rng.randn(D, per_device, C).astype(np.float32),
        "scale": (1 + 0.3 * rng.randn(C)).astype(np.float32),
        "bias": (0.2 * rng.randn(C)).astype(np.float32),
        "mean": (0.1 * rng.randn(C)).astype(np.float32),
        "var": (1 + 0.1 * rng.rand(C)).astype(np.float32),
    }


def per_device_mask(per_device):
    """Device i has its first i rows valid (device 0 none)."""
    return np.arange(per_device)[None, :] < np.arange(D)[:, None]


def device_fn(x, dy, scale, bias, mean, var, mask=None, axis_name=AXIS, groups=None):
    """BN on one device's shard; gradients of sum(y * dy) w.r.t. x, scale and bias."""

    def loss(x, scale, bias):
        y, new = bnjax.batch_norm(x, {"mean": mean, "var": var}, {"scale": scale, "bias": bias},
                                  training=True, axis_name=axis_name, axis_index_groups=groups,
                                  mask=mask)
        return jnp.sum(y * dy), (y, new)

    (_, (y, new)), (dx, dscale, dbias) = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(
        x, scale, bias)
    return y, new["mean"], new["var"], dx, dscale, dbias


def reference(inp, mask=None, groups=None):
    """Float64 NumPy BN of each group's rows (all devices when groups is None)."""
    x, dy = inp["x"], inp["dy"]
    groups = groups or [list(range(D))]
    y, dx = np.zeros(x.shape), np.zeros(x.shape)
    out_stats, dparams = {}, {}
    for g in groups:
        m = None if mask is None else mask[g].reshape(-1)
        r = np_bn(x[g].reshape(-1, C), m, inp["scale"], inp["bias"], inp["mean"], inp["var"],
                  dy[g].reshape(-1, C))
        y[g] = r[0].reshape(len(g), -1, C)
        dx[g] = r[3].reshape(len(g), -1, C)
        for d in g:
            out_stats[d] = (r[1], r[2])
            dparams[d] = (r[4], r[5])
    return y, out_stats, dx, dparams


def check_against_reference(out, inp, mask=None, groups=None, params_summed=False):
    """``out`` = (y, mean, var, dx, dscale, dbias) with a leading device axis (or not for
    dscale/dbias when ``params_summed``, i.e. already the global gradient)."""
    y, mean, var, dx, dscale, dbias = (np.asarray(a) for a in out)
    ry, rstats, rdx, rdp = reference(inp, mask, groups)
    close(y, ry)
    close(dx, rdx)
    for d in range(D):
        close(mean[d], rstats[d][0])
        close(var[d], rstats[d][1])
    if params_summed:
        close(dscale, rdp[0][0])
        close(dbias, rdp[0][1])
    else:
        # Per-device parameter gradients are the device's share: their sum over the devices of
        # a group is the group's gradient.
        for g in groups or [list(range(D))]:
            close(dscale[g].sum(0), rdp[g[0]][0])
            close(dbias[g].sum(0), rdp[g[0]][1])


def test_reference_matches_central_differences():
    inp = make_inputs(2, seed=3)
    x = inp["x"].reshape(-1, C).astype(np.float64)
    mask = per_device_mask(2).reshape(-1)
    # The loss reads valid rows only (masked-out outputs carry no gradient).
    dy = inp["dy"].reshape(-1, C).astype(np.float64) * mask[:, None]
    args = (inp["scale"].astype(np.float64), inp["bias"].astype(np.float64), inp["mean"],
            inp["var"])
    _, _, _, dx, dscale, _ = np_bn(x, mask, *args, dy)

    def f(xx, scale=args[0]):
        return np.sum(np_bn(xx, mask, scale, *args[1:], dy)[0] * dy)

    h = 1e-6
    num = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        num[idx] = (f(x + e) - f(x - e)) / (2 * h)
    np.testing.assert_allclose(dx, num, rtol=1e-5, atol=1e-7)
    num_s = [(f(x, args[0] + h * np.eye(C)[c]) - f(x, args[0] - h * np.eye(C)[c])) / (2 * h)
             for c in range(C)]
    np.testing.assert_allclose(dscale, num_s, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# pmap: plain, masked (device i has i valid rows of 8), and groups of pairs.


@pytest.mark.parametrize("case", ["plain", "masked", "pairs"])
def test_pmap_equals_one_device_with_the_global_batch(case):
    per_device = 8 if case == "masked" else 4  # device i has i valid rows: needs 8 rows
    inp = make_inputs(per_device, seed=1)
    mask = per_device_mask(per_device) if case == "masked" else None
    groups = GROUPS if case == "pairs" else None
    fn = functools.partial(device_fn, groups=groups)
    keys = ("x", "dy", "scale", "bias", "mean", "var")
    in_axes = (0, 0, None, None, None, None) + ((0,) if mask is not None else ())
    args = [inp[k] for k in keys] + ([mask] if mask is not None else [])
    out = jax.pmap(fn, axis_name=AXIS, in_axes=in_axes)(*args)
    check_against_reference(out, inp, mask, groups)


@pytest.mark.parametrize("masked", [False, True])
def test_shard_map_equals_one_device(masked):
    per_device = 8 if masked else 4
    inp = make_inputs(per_device, seed=2)
    mask = per_device_mask(per_device) if masked else np.ones((D, per_device), bool)
    mesh = Mesh(np.array(jax.devices()), (AXIS,))

    def body(x, dy, scale, bias, mean, var, m):
        y, mu, v, dx, ds, db = device_fn(x[0], dy[0], scale, bias, mean, var,
                                         m[0] if masked else None)
        return y[None], mu, v, dx[None], ds, db

    f = jax.jit(jax.shard_map(
        body, mesh=mesh, in_specs=(P(AXIS), P(AXIS), P(), P(), P(), P(), P(AXIS)),
        out_specs=(P(AXIS), P(), P(), P(AXIS), P(), P())))
    y, mu, v, dx, ds, db = f(*(inp[k] for k in ("x", "dy", "scale", "bias", "mean", "var")),
                             mask)
    # shard_map types the replicated scale/bias as invariant: their gradients come back summed.
    out = (y, np.broadcast_to(mu, (D, C)), np.broadcast_to(v, (D, C)), dx, ds, db)
    check_against_reference(out, inp, mask if masked else None, params_summed=True)


def test_vmap_with_axis_name_equals_one_device():
    inp = make_inputs(4, seed=4)
    out = jax.vmap(device_fn, in_axes=(0, 0, None, None, None, None), axis_name=AXIS)(
        *(inp[k] for k in ("x", "dy", "scale", "bias", "mean", "var")))
    check_against_reference(out, inp)


def test_flax_linen_vmap_equals_one_device():
    inp = make_inputs(4, seed=5)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            vbn = nn.vmap(bnjax.BatchNorm, in_axes=(0, None), out_axes=0, axis_name=AXIS,
                          variable_axes={"params": None, "batch_stats": None},
                          split_rngs={"params": False})
            return vbn(axis_name=AXIS, name="bn")(x, False)  # use_running_average (Flax order)

    variables = {"params": {"bn": {"scale": inp["scale"], "bias": inp["bias"]}},
                 "batch_stats": {"bn": {"mean": inp["mean"], "var": inp["var"]}}}

    def loss(params, x):
        y, upd = Net().apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(y * inp["dy"]), (y, upd["batch_stats"]["bn"])

    (_, (y, stats)), (dparams, dx) = jax.value_and_grad(loss, (0, 1), has_aux=True)(
        variables["params"], jnp.asarray(inp["x"]))
    out = (y, np.broadcast_to(stats["mean"], (D, C)), np.broadcast_to(stats["var"], (D, C)),
           dx, dparams["bn"]["scale"], dparams["bn"]["bias"])
    check_against_reference(out, inp, params_summed=True)


def test_jit_over_sharded_batch_gives_global_statistics():
    """No axis name: plain jax.jit over a batch sharded on a mesh; XLA makes the sums global."""
    inp = make_inputs(4, seed=6)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = NamedSharding(mesh, P("data"))
    x = jax.device_put(inp["x"].reshape(D * 4, C), sharded)
    dy = jax.device_put(inp["dy"].reshape(D * 4, C), sharded)
    assert len(x.sharding.device_set) == D and x.addressable_shards[0].data.shape == (4, C)
    f = jax.jit(functools.partial(device_fn, axis_name=None))
    args = (x, dy, inp["scale"], inp["bias"], inp["mean"], inp["var"])
    hlo = f.lower(*args).compile().as_text()
    assert re.search(r"all-reduce|all-gather|reduce-scatter", hlo), "no cross-device op"
    y, mu, v, dx, ds, db = f(*args)
    out = (np.asarray(y).reshape(D, 4, C), np.broadcast_to(mu, (D, C)),
           np.broadcast_to(v, (D, C)), np.asarray(dx).reshape(D, 4, C), ds, db)
    check_against_reference(out, inp, params_summed=True)


def test_large_mean_across_devices_is_accurate():
    """|mean| / std = 1e4 in float32: the shifted sums keep the variance exact."""
    rng = np.random.RandomState(0)
    x = (1e4 + rng.randn(D, 4, C)).astype(np.float32)
    m = jax.pmap(lambda x: bnjax.moments(x, axis_name=AXIS), axis_name=AXIS)(x)
    x64 = x.reshape(-1, C).astype(np.float64)
    close(m.var[3], x64.var(0), rtol=1e-5)
    close(m.mean[3], x64.mean(0), rtol=1e-7)


# --------------------------------------------------------------------------------------------
# Errors before anything runs.


def test_unbound_axis_name_is_a_clear_error():
    x = np.ones((D, 4, C), np.float32)
    stats = {"mean": np.zeros(C, np.float32), "var": np.ones(C, np.float32)}
    with pytest.raises(ValueError, match=r"axis_name='wrong' is not bound"):
        jax.pmap(lambda x: bnjax.batch_norm(x, stats, training=True, axis_name="wrong")[0],
                 axis_name=AXIS)(x)


@pytest.mark.parametrize("groups", [[[0, 1], [2, 3]], [[0, 1, 2], [3, 4, 5, 6, 7]],
                                    [[0, 1], [1, 2], [3, 4], [5, 6, 7, 0]]])
def test_groups_that_do_not_partition_the_devices_are_a_clear_error(groups):
    x = np.ones((D, 4, C), np.float32)
    stats = {"mean": np.zeros(C, np.float32), "var": np.ones(C, np.float32)}
    with pytest.raises(ValueError, match="does not partition"):
        jax.pmap(lambda x: bnjax.batch_norm(x, stats, training=True, axis_name=AXIS,
                                            axis_index_groups=groups)[0], axis_name=AXIS)(x)


# --------------------------------------------------------------------------------------------
# Collectives in the compiled train step.


def _count(hlo, op):
    # Instructions look like "%name = f32[...] all-reduce(...)" (also "-start" async forms).
    return len(re.findall(rf"\s{op}(?:-start)?\(", hlo))


@pytest.mark.parametrize("layers", [1, 3])
def test_compiled_train_step_has_one_collective_per_bn_layer(layers):
    """Synchronized BN adds exactly one all-gather per layer in the forward (the sums) and one
    all-reduce per layer in the backward (the gradient sums); everything else in the step
    (gradient pmean, metric psums) is the same as with per-device BN, so
    all-gathers(sync) - all-gathers(local) == L and all-reduces(sync) - all-reduces(local) == L.
    """
    counts = {}
    for axis_name in ("batch", None):
        model = SyncMLP(layers=layers, axis_name=axis_name)
        v = init_variables(layers=layers)
        state = bnjax.replicate(bnjax.TrainState.create(
            apply_fn=model.apply, params=v["params"], batch_stats=v["batch_stats"],
            tx=optax.sgd(0.1)))
        x, y = make_data(D * 4)
        batch = bnjax.shard_batch({"x": x, "y": y})
        step = bnjax.make_train_step(data_parallel=True)
        hlo = step.lower(state, batch).compile().as_text()
        counts[axis_name] = (_count(hlo, "all-gather"), _count(hlo, "all-reduce"))
    (ag_sync, ar_sync), (ag_local, ar_local) = counts["batch"], counts[None]
    assert ag_local == 0
    assert ag_sync - ag_local == layers, counts
    assert ar_sync - ar_local == layers, counts
