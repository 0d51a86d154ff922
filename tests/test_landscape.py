"""The studies of why BN helps: the covariate-shift and smoothness probes compute what float64
NumPy computes, noisy BN's noise is what its docstring says, and the three verdicts
(covariate_shift, smoothness, regularization) follow the numbers."""

import jax
import jax.numpy as jnp
import numpy as np

from bnjax_train.studies import landscape, render
from bnjax_train.studies.nets import NoisyShift, StudyCNN1D


def _mlp_numpy(params, x, y):
    """Loss and gradients of x -> Dense -> ReLU -> Dense -> softmax cross-entropy, float64."""
    w0, b0 = (np.asarray(params["Dense_0"][k], np.float64) for k in ("kernel", "bias"))
    w1, b1 = (np.asarray(params["Dense_1"][k], np.float64) for k in ("kernel", "bias"))
    h = x @ w0 + b0
    a = np.maximum(h, 0.0)
    z = a @ w1 + b1
    z = z - z.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    loss = -np.mean(np.log(p[np.arange(len(y)), y]))
    dz = (p - np.eye(p.shape[1])[y]) / len(y)
    dh = (dz @ w1.T) * (h > 0)
    grads = {"Dense_0": {"kernel": x.T @ dh, "bias": dh.sum(0)},
             "Dense_1": {"kernel": a.T @ dz, "bias": dz.sum(0)}}
    return loss, grads, a


def _flat(tree):
    return np.concatenate([np.ravel(tree[k][n]) for k in sorted(tree) for n in sorted(tree[k])])


def _step(params, grads, eta, layers):
    return {k: {n: np.asarray(v, np.float64) - (eta * grads[k][n] if k in layers else 0.0)
                for n, v in params[k].items()} for k in params}


def test_landscape_probes_compute_what_float64_numpy_does():
    # A study network with no conv layer and no norm: input -> Dense_0 -> ReLU -> Dense_1.
    model = StudyCNN1D(num_classes=3, features=(), pool_after=(), hidden=5, norm="none")
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(2, 8, 6)).astype(np.float32)
    ys = rng.integers(0, 3, size=(2, 8)).astype(np.int32)
    keys = jax.random.split(jax.random.key(0), 2)
    params = jax.vmap(lambda k: model.init(k, jnp.asarray(xs[0]), training=False))(keys)[
        "params"]
    shift = landscape.shift_probe(model, 0.5)(params, {}, xs, ys, keys)
    smooth = landscape.smoothness_probe(model, (0.3, 1.0))(params, {}, xs, ys)
    for r in range(2):
        p = jax.tree.map(lambda a, r=r: np.asarray(a[r], np.float64), params)
        for b in range(2):
            x, y = xs[b].astype(np.float64), ys[b]
            loss, g, feats = _mlp_numpy(p, x, y)
            moved = _mlp_numpy(_step(p, g, 0.5, {"Dense_0"}), x, y)[1]
            a, c = g["Dense_1"]["kernel"], moved["Dense_1"]["kernel"]
            np.testing.assert_allclose(shift["gradient_change"][r, b],
                                       np.linalg.norm(a - c) / np.linalg.norm(a), rtol=1e-4)
            np.testing.assert_allclose(shift["gradient_cosine"][r, b], np.sum(a * c) / (
                np.linalg.norm(a) * np.linalg.norm(c)), rtol=1e-4)
            np.testing.assert_allclose(shift["mean"][r, b], feats.mean(0), rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(shift["std"][r, b], feats.std(0), rtol=1e-4, atol=1e-6)
            losses, changes, betas = [loss], [], []
            for eta in (0.3, 1.0):
                loss_eta, g_eta, _ = _mlp_numpy(_step(p, g, eta, set(p)), x, y)
                change = np.linalg.norm(_flat(g_eta) - _flat(g))
                losses.append(loss_eta)
                changes.append(change)
                betas.append(change / (eta * np.linalg.norm(_flat(g))))
            for key, want in (("loss_range", max(losses) - min(losses)),
                              ("gradient_change", max(changes)), ("beta", max(betas)),
                              ("gradient_norm", np.linalg.norm(_flat(g)))):
                np.testing.assert_allclose(smooth[key][r, b], want, rtol=2e-4, err_msg=key)
    # The shift between epochs: the per-unit moves of mean and std over the summed std.
    m0, s0, m1, s1 = rng.uniform(0.1, 1.0, size=(4, 2, 5))
    want = (np.abs(m1 - m0).sum(1) + np.abs(s1 - s0).sum(1)) / s0.sum(1)
    np.testing.assert_allclose(landscape.feature_shift((m0, s0), (m1, s1)), want, rtol=1e-12)


def test_noisy_bn_noise_is_per_channel_redrawn_each_step_and_its_mean_at_inference():
    x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    noise = NoisyShift(mean=1.0, var=4.0)
    draws = [np.asarray(noise.apply({}, x, True, rngs={"dropout": jax.random.key(k)}))
             for k in range(200)]
    scales, shifts = [], []
    for y in draws:  # y = s * x + m per channel: recover s and m from two examples
        s = (y[1] - y[0]) / (x[1] - x[0])
        m = y[0] - s * x[0]
        np.testing.assert_allclose(y, s * x + m, rtol=1e-4, atol=1e-4)
        scales.append(s)
        shifts.append(m)
    scales, shifts = np.array(scales), np.array(shifts)
    assert (scales >= 1.0 - 1e-5).all() and (scales <= 2.0 + 1e-5).all()
    assert (np.abs(shifts) <= 1.0 + 1e-5).all() and shifts.std() > 0.3
    assert len({tuple(np.round(s, 5)) for s in scales}) == 200  # a new draw every step
    # s**2 ~ U(1, 4): E[s] = (2/3)(4**1.5 - 1)/(4 - 1) = 14/9, which inference multiplies by.
    assert abs(scales.mean() - 14 / 9) < 0.05
    np.testing.assert_allclose(noise.apply({}, x, False), x * 14 / 9, rtol=1e-6)


def _shift_data(shift, accuracy):
    """A covariate_shift JSON: per network, every seed's feature shift and final accuracy."""
    configs = [{"norm": "batch"}, {"norm": "batch", "noise": [1.0, 4.0]}, {"norm": "none"}]
    runs = [{"config": c, "seed": s, "test_accuracy": [0.5, accuracy[i] + 0.001 * s],
             "train_loss": [1.0, 0.5], "feature_shift": [None, shift[i] + 0.01 * s],
             "gradient_change": [shift[i] + 0.01 * s] * 2, "gradient_cosine": [0.9, 0.9],
             "nonfinite": False} for i, c in enumerate(configs) for s in range(3)]
    return {"meta": {"study": "covariate_shift", "settings": {"configs": configs}},
            "results": {"runs": runs, "steps_per_epoch": 10, "num_classes": 10}}


def test_covariate_shift_verdict_follows_the_numbers():
    # BN shifts least; noisy BN shifts most yet keeps BN's accuracy: the mechanism fails.
    kept = render.verdict(_shift_data([0.1, 0.9, 0.5], [0.95, 0.95, 0.90]))
    assert kept.startswith("partly confirmed (BN reduces the shift; but not BN shifted more "
                           "(noisy BN) loses accuracy)"), kept
    lost = render.verdict(_shift_data([0.1, 0.9, 0.5], [0.95, 0.90, 0.90]))
    assert lost.startswith("confirmed: feature shift per epoch 0.110 with BN vs 0.510 without")
    assert render.verdict(_shift_data([0.5, 0.9, 0.1], [0.95, 0.95, 0.9])).startswith(
        "not confirmed on this data")


def _smooth_data(bn, none):
    configs = [{"norm": "batch"}, {"norm": "none"}]
    runs = [{"config": c, "seed": s, "test_accuracy": [0.9], "train_loss": [0.1],
             "nonfinite": False, **{k: [v[j] * (1 + 0.01 * s), None]
                                    for j, k in enumerate(("loss_range", "gradient_change",
                                                           "beta", "gradient_norm"))}}
            for c, v in zip(configs, (bn, none), strict=True) for s in range(3)]
    return {"meta": {"study": "smoothness", "settings": {"configs": configs}},
            "results": {"runs": runs, "steps_per_epoch": 10, "num_classes": 10}}


def test_smoothness_verdict_follows_the_numbers():
    assert render.verdict(_smooth_data([0.1, 1.0, 2.0, 1.0], [1.0, 5.0, 9.0, 1.0])).startswith(
        "confirmed: loss range 0.101 with BN vs 1.01 without")
    partly = render.verdict(_smooth_data([0.1, 5.0, 2.0, 1.0], [1.0, 5.0, 9.0, 1.0]))
    assert partly.startswith("partly confirmed (smaller loss range with BN, smaller effective "
                             "beta with BN; but not smaller gradient change with BN)"), partly


def _regularization_data(test, train, steps_to=None):
    configs = [{"norm": "none", "dropout": 0.0, "l2": 0.0},
               {"norm": "batch", "dropout": 0.0, "l2": 0.0},
               {"norm": "none", "dropout": 0.3, "l2": 0.0}]
    runs = []
    for i, c in enumerate(configs):
        for s in range(3):
            curve = [0.5] * steps_to[i] + [test[i] + 0.002 * s] if steps_to else [test[i]]
            runs.append({"config": c, "seed": s, "test_accuracy": curve,
                         "train_loss": [0.1] * len(curve), "nonfinite": False,
                         "train_accuracy": train[i] + 0.001 * s})
    return {"meta": {"study": "regularization", "settings": {
        "configs": configs, "targets": [0.8], "little": 0.01}},
        "results": {"runs": runs, "steps_per_epoch": 10, "num_classes": 10}}


def test_regularization_verdict_follows_the_numbers():
    # BN: a smaller gap, the target two epochs sooner, 0.005 more accuracy: all three parts.
    yes = render.verdict(_regularization_data([0.850, 0.855, 0.87], [1.0, 0.95, 0.9],
                                              steps_to=[3, 1, 2]))
    assert yes.startswith("confirmed: BN vs no regularizer: train - test gap smaller by "
                          "+0.055"), yes
    assert "20 vs 40 steps to 0.8" in yes and "dropout 0.3 +0.020" in yes
    big = render.verdict(_regularization_data([0.80, 0.90, 0.87], [1.0, 1.0, 0.9]))
    assert big.startswith("partly confirmed (BN narrows the train-test gap; but not BN speeds "
                          "training, BN adds little accuracy (under 0.01))"), big
