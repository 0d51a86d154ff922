"""CrossQ's batch renormalization (bnjax.BatchRenorm) against the published SBX layer.

The reference is ``sbx.common.jax_layers.BatchRenorm`` vendored unedited in
tests/fixtures/sbx_jax_layers.py, and CrossQ's ``Critic`` / ``VectorCritic`` in
tests/fixtures/sbx_crossq_critic.py; the bnjax critic is that file with its one BatchRenorm
import line replaced. The published layer computes its variance as ``E[x^2] - E[x]^2``; for
parity to float32 rounding it is run with Flax's two-pass variance (``exact_reference``), and
its fast variance is compared with bnjax's against float64 NumPy separately.
"""

import functools
import importlib.util
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.linen import normalization as flax_norm
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import bnjax
from bnjax.batch_renorm import crossq_batch_renorm, init_crossq_stats

FIXTURES = Path(__file__).resolve().parent / "fixtures"
IMPORT_LINE = "from sbx.common.jax_layers import BatchRenorm, SimbaResidualBlock\n"
EPS = 1e-3


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _module_from_text(name, text):
    module = types.ModuleType(name)
    exec(compile(text, str(FIXTURES / "sbx_crossq_critic.py"), "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module")
def sbx():
    """The published layer (as ``sbx.common.jax_layers``) and both critic modules."""
    saved = {k: sys.modules.get(k) for k in ("sbx", "sbx.common", "sbx.common.jax_layers")}
    layers = _load("sbx.common.jax_layers", FIXTURES / "sbx_jax_layers.py")
    sys.modules.update({"sbx": types.ModuleType("sbx"),
                        "sbx.common": types.ModuleType("sbx.common"),
                        "sbx.common.jax_layers": layers})
    text = (FIXTURES / "sbx_crossq_critic.py").read_text()
    assert text.count(IMPORT_LINE) == 1
    ours_text = text.replace(IMPORT_LINE, "from bnjax import BatchRenorm\n")
    assert [a for a, b in zip(text.splitlines(), ours_text.splitlines(), strict=True)
            if a != b] == [IMPORT_LINE.strip()]
    ns = types.SimpleNamespace(layers=layers, ref=_module_from_text("ref_critic", text),
                               ours=_module_from_text("bnjax_critic", ours_text))
    yield ns
    for k, v in saved.items():
        if v is None:
            sys.modules.pop(k, None)
        else:
            sys.modules[k] = v


@pytest.fixture
def exact_reference(sbx, monkeypatch):
    """The published layer with Flax's two-pass variance instead of ``E[x^2] - E[x]^2``."""
    monkeypatch.setattr(sbx.layers, "_compute_stats", functools.partial(
        flax_norm._compute_stats, use_fast_variance=False))
    return sbx.layers.BatchRenorm


def close(a, b, rtol=2e-5, atol=1e-5):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u, np.float64), np.asarray(v, np.float64),
                                   rtol=rtol, atol=atol)


def np_crossq(x, mean, var, scale, bias, warm, eps=EPS, r_max=3.0, d_max=5.0, momentum=0.99):
    """Float64 NumPy of the published arithmetic, channels last: (y, new mean, new var)."""
    x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    mu, v = x.mean(0), x.var(0)
    ra_std = np.sqrt(np.asarray(var, np.float64) + eps)
    r = np.clip(np.sqrt(v + eps) / ra_std, 1 / r_max, r_max)
    d = np.clip((mu - mean) / ra_std, -d_max, d_max)
    m, s = (mu - d * np.sqrt(v) / r, v / r**2) if warm else (mu, v)
    y = (x - m) / np.sqrt(s + eps) * scale + bias
    return y, momentum * mean + (1 - momentum) * mu, momentum * var + (1 - momentum) * v


def _xs(n, shape=(32, 5), seed=0):
    keys = jax.random.split(jax.random.key(seed), n)
    return [jax.random.normal(k, shape) * (1.5 + i) + 0.5 * i for i, k in enumerate(keys)]


# ---------------------------------------------------------------- the layer against the reference


@pytest.mark.parametrize("warmup", [0, 2, 100])
def test_layer_matches_the_published_layer_during_and_after_warm_up(exact_reference, warmup):
    ours, ref = bnjax.BatchRenorm(use_running_average=False, warmup_steps=warmup), \
        exact_reference(use_running_average=False, warmup_steps=warmup)
    xs = _xs(5)
    v_ours, v_ref = ours.init(jax.random.key(1), xs[0]), ref.init(jax.random.key(1), xs[0])
    assert jax.tree.structure(v_ours) == jax.tree.structure(v_ref)
    close(v_ours, v_ref, 0, 0)
    w = jnp.linspace(-1, 2, 5)

    def loss(module, variables, params, x):
        y, upd = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y) * w), (y, upd)

    for x in xs:
        got = jax.value_and_grad(functools.partial(loss, ours, v_ours), (0, 1), has_aux=True)(
            v_ours["params"], x)
        want = jax.value_and_grad(functools.partial(loss, ref, v_ref), (0, 1), has_aux=True)(
            v_ref["params"], x)
        close(got, want)
        v_ours = {**v_ours, **got[0][1][1]}
        v_ref = {**v_ref, **want[0][1][1]}
    assert v_ours["batch_stats"]["steps"] == v_ref["batch_stats"]["steps"] == len(xs)
    for x in xs[:2]:  # inference: the running statistics, nothing updated
        close(bnjax.BatchRenorm(use_running_average=True).apply(v_ours, x),
              exact_reference(use_running_average=True).apply(v_ref, x))


@pytest.mark.parametrize("warmup", [0, 3])
def test_layer_matches_float64_numpy(warmup):
    layer = bnjax.BatchRenorm(use_running_average=False, warmup_steps=warmup)
    xs = _xs(6, (64, 4), seed=3)
    v = layer.init(jax.random.key(0), xs[0])
    mean, var = np.zeros(4), np.ones(4)
    for i, x in enumerate(xs):
        y, upd = layer.apply(v, x, mutable=["batch_stats"])
        want, mean, var = np_crossq(x, mean, var, 1.0, 0.0, warm=i >= warmup)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=2e-5)
        np.testing.assert_allclose(upd["batch_stats"]["mean"], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(upd["batch_stats"]["var"], var, rtol=1e-5, atol=1e-6)
        v = {**v, **upd}


def test_the_correction_reads_r_max_and_d_max_from_the_statistics():
    x = _xs(1, (64, 3), seed=4)[0] * 20 + 50  # far from the running (0, 1): both clip
    stats = {**init_crossq_stats(3), "r_max": 2.0, "d_max": 1.5}
    y, _ = crossq_batch_renorm(x, stats, training=True, warmup_steps=0)
    want, _, _ = np_crossq(x, np.zeros(3), np.ones(3), 1.0, 0.0, True, r_max=2.0, d_max=1.5)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-4)


def test_fast_variance_of_the_published_layer_loses_digits_where_bnjax_does_not(sbx):
    """Large mean, unit spread: E[x^2] - E[x]^2 cancels in float32; bnjax's sums do not."""
    x = jax.random.normal(jax.random.key(5), (256, 4)) + 3000.0
    want = np.asarray(x, np.float64).var(0)
    ours = bnjax.moments(x).var
    ref = flax_norm._compute_stats(x, (0,), None)[1]  # what the published layer calls
    np.testing.assert_allclose(ours, want, rtol=1e-4)
    assert np.max(np.abs(np.asarray(ref) - want) / want) > 1e-2


def test_a_constant_feature_gets_a_finite_gradient(sbx):
    """The published layer's gradient is NaN there (d sqrt(v)/dv at v = 0), even in warm-up."""
    x = _xs(1)[0].at[:, 0].set(0.0)
    grads = []
    for cls in (bnjax.BatchRenorm, sbx.layers.BatchRenorm):
        layer = cls(use_running_average=False, warmup_steps=5)
        v = layer.init(jax.random.key(0), x)
        grads.append(np.asarray(jax.grad(
            lambda x, layer=layer, v=v: jnp.sum(layer.apply(v, x, mutable=["batch_stats"])[0]
                                                ** 3))(x)))
    assert np.isfinite(grads[0]).all()
    assert np.isnan(grads[1]).any()
    np.testing.assert_allclose(grads[0][:, 1:], grads[1][:, 1:], rtol=1e-4, atol=1e-5)


def test_the_output_keeps_the_input_dtype_unless_dtype_says_otherwise():
    x = _xs(1)[0].astype(jnp.bfloat16)
    for dtype, want in ((None, jnp.bfloat16), (jnp.float32, jnp.float32)):
        layer = bnjax.BatchRenorm(use_running_average=False, warmup_steps=0, dtype=dtype)
        v = layer.init(jax.random.key(0), x)
        y, upd = layer.apply(v, x, mutable=["batch_stats"])
        assert y.dtype == want and upd["batch_stats"]["mean"].dtype == jnp.float32


# ---------------------------------------------------------------- CrossQ's critic and its patterns


def _critic(module, **kw):
    return module.VectorCritic(net_arch=[32, 32], n_critics=2, renorm_warmup_steps=100, **kw)


def test_crossq_critic_with_only_the_import_changed_has_the_reference_variable_tree(sbx):
    obs, act = jnp.ones((1, 6)), jnp.ones((1, 2))
    keys = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    v_ref = _critic(sbx.ref).init(keys, obs, act)
    v_ours = _critic(sbx.ours).init(keys, obs, act)
    assert jax.tree.structure(v_ours) == jax.tree.structure(v_ref)
    assert jax.tree.map(lambda a: (np.shape(a), jnp.result_type(a)), v_ours) == \
        jax.tree.map(lambda a: (np.shape(a), jnp.result_type(a)), v_ref)
    close(v_ours, v_ref, 0, 0)
    assert set(v_ours["batch_stats"]["VmapCritic_0"]["BatchRenorm_0"]) == {
        "mean", "var", "r_max", "d_max", "steps"}


def _transitions(key, n, batch=32):
    k = jax.random.split(key, 6)
    obs, next_obs = (jax.random.normal(k[i], (n, batch, 6)) for i in (0, 2))
    act, next_act = (jax.random.uniform(k[i], (n, batch, 2), minval=-1) for i in (1, 3))
    done = (jax.random.uniform(k[5], (n, batch)) < 0.1) * 1.0
    return obs, act, next_obs, next_act, jax.random.normal(k[4], (n, batch)), done


def _crossq_updates(critic, variables, data, gamma=0.99):
    """CrossQ's critic loss (sbx/crossq/crossq.py, without the actor: random next actions)."""
    tx = optax.adam(1e-3)

    def mse_loss(params, batch_stats, obs, act, next_obs, next_act, rew, done):
        q, upd = critic.apply({"params": params, "batch_stats": batch_stats},
                              jnp.concatenate([obs, next_obs]), jnp.concatenate([act, next_act]),
                              mutable=["batch_stats"], train=True)
        current_q, next_q = jnp.split(q, 2, axis=1)
        next_q = jnp.min(next_q, axis=0)
        target = rew[:, None] + (1 - done[:, None]) * gamma * next_q
        loss = 0.5 * ((jax.lax.stop_gradient(target) - current_q) ** 2).mean(axis=1).sum()
        return loss, upd

    @jax.jit
    def step(carry, batch):
        params, stats, opt = carry
        (loss, upd), g = jax.value_and_grad(mse_loss, has_aux=True)(params, stats, *batch)
        updates, opt = tx.update(g, opt, params)
        return (optax.apply_updates(params, updates), upd["batch_stats"], opt), (loss, upd)

    carry = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
    return jax.lax.scan(step, carry, data)


def test_200_crossq_critic_updates_match_the_reference(sbx, exact_reference):
    """Warm-up of 100, then 100 renormalized updates: losses and statistics to float32."""
    obs, act = jnp.ones((1, 6)), jnp.ones((1, 2))
    keys = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    data = _transitions(jax.random.key(2), 200)
    out = {}
    for name, module in (("ref", sbx.ref), ("ours", sbx.ours)):
        critic = _critic(module)
        out[name] = _crossq_updates(critic, critic.init(keys, obs, act), data)
    (p_ref, s_ref, _), (loss_ref, upd_ref) = out["ref"]
    (p_ours, s_ours, _), (loss_ours, upd_ours) = out["ours"]
    assert int(s_ours["VmapCritic_0"]["BatchRenorm_0"]["steps"][0]) == 200
    np.testing.assert_allclose(loss_ours, loss_ref, rtol=1e-5)
    close(upd_ours, upd_ref, rtol=1e-5, atol=1e-6)  # every batch_stats entry, every step
    close(p_ours, p_ref, rtol=1e-5, atol=1e-6)


def test_ensemble_members_keep_their_own_statistics(sbx):
    """nn.vmap with variable_axes batch_stats 0: each member is the plain Critic on its slice."""
    critic = _critic(sbx.ours)
    obs, act = _xs(1, (16, 6))[0], _xs(1, (16, 2), seed=1)[0]
    v = critic.init(jax.random.key(0), obs, act)
    q, upd = critic.apply(v, obs, act, train=True, mutable=["batch_stats"])
    single = sbx.ours.Critic(net_arch=[32, 32], renorm_warmup_steps=100)
    for i in range(2):
        member = jax.tree.map(lambda a, i=i: a[i], {
            "params": v["params"]["VmapCritic_0"], "batch_stats": v["batch_stats"]["VmapCritic_0"]})
        q_i, upd_i = single.apply(member, obs, act, train=True, mutable=["batch_stats"])
        close(q[i], q_i)
        close(jax.tree.map(lambda a, i=i: a[i], upd["batch_stats"]["VmapCritic_0"]),
              upd_i["batch_stats"])
    last = upd["batch_stats"]["VmapCritic_0"]["BatchRenorm_2"]["mean"]
    assert not np.allclose(last[0], last[1])


@pytest.mark.parametrize("warmup", [0, 100])
def test_joint_batch_shares_the_statistics_of_both_halves(warmup):
    """(s, a) and (s', a') concatenated: one set of statistics, that of the mixture."""
    layer = bnjax.BatchRenorm(use_running_average=False, warmup_steps=warmup)
    cur, nxt = _xs(2, (16, 3), seed=6)
    v = layer.init(jax.random.key(0), cur)
    v = {**v, "batch_stats": {**v["batch_stats"], "mean": jnp.full(3, 0.2),
                              "var": jnp.full(3, 1.5)}}
    y, upd = layer.apply(v, jnp.concatenate([cur, nxt]), mutable=["batch_stats"])
    y_cur, y_next = jnp.split(y, 2)
    joint = np.concatenate([cur, nxt]).astype(np.float64)
    want, mean, var = np_crossq(joint, np.full(3, 0.2), np.full(3, 1.5), 1.0, 0.0, warmup == 0)
    np.testing.assert_allclose(y_cur, want[:16], rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(y_next, want[16:], rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], var, rtol=1e-5, atol=1e-6)
    # In warm-up (plain batch norm) a forward of (s, a) alone would normalize differently;
    # after it, unclipped r and d make the output nearly that of the running statistics.
    alone, _, _ = np_crossq(cur, np.full(3, 0.2), np.full(3, 1.5), 1.0, 0.0, warmup == 0)
    assert np.allclose(y_cur, alone, atol=1e-3) == (warmup == 0)


def test_target_statistics_are_kept_beside_the_online_ones(sbx):
    """Eval-mode targets read their own statistics and never change them."""
    critic = _critic(sbx.ours)
    obs, act = _xs(1, (16, 6))[0], _xs(1, (16, 2), seed=1)[0]
    online = critic.init(jax.random.key(0), obs, act)
    _, upd = critic.apply(online, obs * 3 + 1, act, train=True, mutable=["batch_stats"])
    online = {**online, **upd}
    target = jax.tree.map(lambda a: a, critic.init(jax.random.key(0), obs, act))
    target = optax.incremental_update(online, target, 0.005)  # Polyak, statistics included
    q_target, mutated = critic.apply(target, obs, act, train=False, mutable=["batch_stats"])
    close(mutated["batch_stats"], target["batch_stats"], 0, 0)
    q_online = critic.apply(online, obs, act, train=False)
    assert not np.allclose(q_target, q_online)
    bn = target["batch_stats"]["VmapCritic_0"]["BatchRenorm_0"]
    x = np.concatenate([obs, act], -1).astype(np.float64)
    want = (x - np.asarray(bn["mean"][0])) / np.sqrt(np.asarray(bn["var"][0]) + EPS)
    first = bnjax.BatchRenorm(use_running_average=True).apply(
        {"params": jax.tree.map(lambda a: a[0], target["params"]["VmapCritic_0"]["BatchRenorm_0"]),
         "batch_stats": jax.tree.map(lambda a: a[0], bn)}, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(first, want, rtol=1e-5, atol=1e-5)


def test_the_warm_up_switch_happens_inside_one_jitted_step():
    layer = bnjax.BatchRenorm(use_running_average=False, warmup_steps=2)
    xs = _xs(4, (32, 3), seed=7)
    v = layer.init(jax.random.key(0), xs[0])
    traces = []

    @jax.jit
    def step(v, x):
        traces.append(1)
        y, upd = layer.apply(v, x, mutable=["batch_stats"])
        return y, {**v, **upd}

    mean, var = np.zeros(3), np.ones(3)
    for i, x in enumerate(xs):
        y, v = step(v, x)
        want, mean, var = np_crossq(x, mean, var, 1.0, 0.0, warm=i >= 2)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=2e-5)
    assert int(v["batch_stats"]["steps"]) == 4
    assert len(traces) <= 2  # Python int steps at first, then a traced int32: no per-step trace


# ---------------------------------------------------------------- masks, sync, transformations


def test_masked_values_take_no_part(tmp_path):
    layer = bnjax.BatchRenorm(use_running_average=False, warmup_steps=0)
    x = np.asarray(_xs(1, (24, 3), seed=8)[0])
    mask = np.arange(24) % 3 != 0
    poisoned = jnp.asarray(np.where(mask[:, None], x, np.nan), jnp.float32)
    v = layer.init(jax.random.key(0), x)
    v = {**v, "batch_stats": {**v["batch_stats"], "mean": jnp.full(3, 0.1),
                              "var": jnp.full(3, 0.8)}}

    def loss(x):
        y, upd = layer.apply(v, x, mask=jnp.asarray(mask), mutable=["batch_stats"])
        return jnp.sum(jnp.where(mask[:, None], y, 0) ** 2), (y, upd)

    (_, (y, upd)), g = jax.value_and_grad(loss, has_aux=True)(poisoned)
    want, mean, var = np_crossq(x[mask], np.full(3, 0.1), np.full(3, 0.8), 1.0, 0.0, True)
    np.testing.assert_allclose(np.asarray(y)[mask], want, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], var, rtol=1e-5, atol=1e-6)
    assert np.isfinite(np.asarray(g)).all() and not np.asarray(g)[~mask].any()


def test_axis_name_under_shard_map_equals_the_global_batch():
    d = len(jax.devices())
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sync = bnjax.BatchRenorm(use_running_average=False, warmup_steps=1, axis_name="data")
    plain = bnjax.BatchRenorm(use_running_average=False, warmup_steps=1)
    xs = _xs(3, (d * 4, 3), seed=9)
    v = plain.init(jax.random.key(0), xs[0])
    w = jnp.linspace(0.5, 1.5, 3)

    def loss(module, params, stats, x):
        y, upd = module.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y) * w), (y, upd["batch_stats"])

    def body(params, stats, x):
        (_, (y, new)), (gp, gx) = jax.value_and_grad(
            functools.partial(loss, sync), (0, 2), has_aux=True)(params, stats, x)
        return y, new, jax.lax.psum(gp, "data"), gx

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P("data")),
                              out_specs=(P("data"), P(), P(), P("data")), check_vma=False))
    s_sync = s_plain = v["batch_stats"]
    for x in xs:
        y, s_sync, gp, gx = f(v["params"], s_sync, x)
        (_, (y_w, s_plain)), (gp_w, gx_w) = jax.value_and_grad(
            functools.partial(loss, plain), (0, 2), has_aux=True)(v["params"], s_plain, x)
        close((y, gx), (y_w, gx_w))
        close(gp, gp_w, rtol=1e-4, atol=1e-5)
        close(s_sync, s_plain)


def test_forward_mode_equals_reverse_mode():
    layer = bnjax.BatchRenorm(use_running_average=False, warmup_steps=0)
    x = _xs(1, (8, 3), seed=10)[0]
    v = layer.init(jax.random.key(0), x)
    v = {**v, "batch_stats": {**v["batch_stats"], "mean": jnp.full(3, 0.3),
                              "var": jnp.full(3, 2.0)}}

    def f(x):
        return layer.apply(v, x, mutable=["batch_stats"])[0]

    close(jax.jacfwd(f)(x), jax.jacrev(f)(x), rtol=1e-5, atol=1e-6)
    y, lin = jax.linearize(f, x)
    dx = jnp.cos(x)
    _, t = jax.jvp(f, (x,), (dx,))
    close(lin(dx), t)
    # Against a float64 central difference of the published formula, r and d held at their
    # values at x (their gradients are stopped).
    xd, td = np.asarray(x, np.float64), np.asarray(dx, np.float64)
    mu, var = xd.mean(0), xd.var(0)
    r = np.clip(np.sqrt(var + EPS) / np.sqrt(2.0 + EPS), 1 / 3, 3)
    d = np.clip((mu - 0.3) / np.sqrt(2.0 + EPS), -5, 5)

    def g(x):
        mu, var = x.mean(0), x.var(0)
        return (x - (mu - d * np.sqrt(var) / r)) / np.sqrt(var / r**2 + EPS)

    h = 1e-5
    np.testing.assert_allclose(t, (g(xd + h * td) - g(xd - h * td)) / (2 * h), rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("train", [False, True])
def test_jit_vmap_eval_shape_and_export(exact_reference, train):
    ours = bnjax.BatchRenorm(use_running_average=not train, warmup_steps=0)
    ref = exact_reference(use_running_average=not train, warmup_steps=0)
    xs = jnp.stack(_xs(2, (6, 3), seed=11))
    v = ours.init(jax.random.key(0), xs[0])
    v = {**v, "batch_stats": {**v["batch_stats"], "mean": jnp.full(3, 0.3),
                              "var": jnp.full(3, 2.0), "steps": jnp.asarray(0)}}

    def apply(module, v, x):
        return module.apply(v, x, mutable=["batch_stats"])

    close(jax.jit(functools.partial(apply, ours))(v, xs[0]), apply(ref, v, xs[0]))
    close(jax.vmap(functools.partial(apply, ours), (None, 0))(v, xs),
          jax.vmap(functools.partial(apply, ref), (None, 0))(v, xs))
    assert jax.tree.map(lambda a: (a.shape, a.dtype),
                        jax.eval_shape(functools.partial(apply, ours), v, xs[0])) == \
        jax.tree.map(lambda a: (a.shape, a.dtype), jax.eval_shape(functools.partial(apply, ref),
                                                                  v, xs[0]))
    (b,) = jax.export.symbolic_shape("b")
    exported = jax.export.export(jax.jit(functools.partial(apply, ours)))(
        v, jax.ShapeDtypeStruct((b, 3), jnp.float32))
    for rows in (6, 4):
        close(exported.call(v, xs[0][:rows]), apply(ref, v, xs[0][:rows]))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("value,error,match", [
    (-1, ValueError, "warmup_steps is -1"),
    (2.5, TypeError, "warmup_steps is 2.5"),
    (True, TypeError, "warmup_steps is True"),
])
def test_bad_warmup_steps_is_named(value, error, match):
    with pytest.raises(error, match=match):
        crossq_batch_renorm(jnp.ones((4, 2)), init_crossq_stats(2), training=True,
                            warmup_steps=value)


def test_warmup_steps_may_be_a_numpy_int_or_traced():
    x = _xs(1, (16, 2))[0]
    want, _ = crossq_batch_renorm(x, init_crossq_stats(2), training=True, warmup_steps=0)
    for w in (np.int64(0), jnp.asarray(0)):
        close(crossq_batch_renorm(x, init_crossq_stats(2), training=True, warmup_steps=w)[0],
              want, 0, 0)


def test_missing_statistics_are_named():
    stats = {"mean": jnp.zeros(2), "var": jnp.ones(2)}
    with pytest.raises(ValueError, match="needs 'r_max'"):
        crossq_batch_renorm(jnp.ones((4, 2)), stats, training=True)
    with pytest.raises(ValueError, match=r"stats\['mean'\]"):
        crossq_batch_renorm(jnp.ones((4, 3)), init_crossq_stats(2), training=False)

