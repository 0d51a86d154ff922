"""`python -m bnjax_train.studies`: every study's quick mode writes JSON, PNG and markdown whose
table equals the one recomputed here from the JSON (float64 NumPy), and says it decides
nothing (no verdict); the vmapped training engine trains each run as a plain loop would (L2
included); the studies' network computes what the zoo's CNN1D computes; the verdicts follow
the numbers (those of the last three studies: tests/test_landscape.py)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from caches import fast_compile_env, shared_folder

from benchmarks import report
from bnjax_train.models import CNN1D, create_model
from bnjax_train.studies import metrics, render
from bnjax_train.studies.cli import parse_args
from bnjax_train.studies.engine import Data, Recipe, train_runs
from bnjax_train.studies.nets import NoisyShift, StudyCNN1D

REPO = Path(__file__).resolve().parents[1]
STUDIES = ["learning_rate", "placement", "dropout", "batch_size", "momentum", "mcbn",
           "covariate_shift", "smoothness", "regularization"]
ON_DIGITS = ["covariate_shift", "smoothness", "regularization"]
STATUS = re.compile(r"^Verdict: (confirmed|partly confirmed|not confirmed|neither order|"
                    r"conv-ReLU-BN is better|conv-BN-ReLU is better)\b")
# What only a verdict says: none of it may appear in a quick run's output.
VERDICT_WORDS = re.compile(r"Verdict:|confirmed|neither order|conv-ReLU-BN is better|"
                           r"conv-BN-ReLU is better")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """All nine studies with --quick, in one process (one JAX start, one MNIST-1D), once per
    session: tests of this module on other xdist workers read the same files."""
    with shared_folder(tmp_path_factory, "bnjax_studies_quick") as out:
        record = out / "process.json"
        if not record.exists():
            out.mkdir(exist_ok=True)
            proc = subprocess.run(
                [sys.executable, "-m", "bnjax_train.studies", "all", "--quick", "--out",
                 str(out), "--data_dir", str(tmp_path_factory.getbasetemp() / "bnjax_data")],
                cwd=REPO, env=fast_compile_env(dict(os.environ, PYTHONPATH=str(REPO))),
                capture_output=True, text=True, timeout=600)
            record.write_text(json.dumps({"returncode": proc.returncode,
                                          "stdout": proc.stdout, "stderr": proc.stderr}))
        proc = json.loads(record.read_text())
    assert proc["returncode"] == 0, proc["stderr"][-3000:]
    return out, proc["stdout"]


def _mean_std(values):
    v = np.asarray(values, np.float64)
    return v.mean(), (v.std(ddof=1) if v.size > 1 else 0.0)


def _table(markdown):
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    split = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return split[0], split[2:]


def _check(cell, values, digits=3):
    """A ``mean ± std`` cell against the float64 mean and sample std of ``values``."""
    if not len(values):
        assert cell in ("-", "not reached"), cell
        return
    m = re.fullmatch(r"(-?[\d.]+) ± ([\d.]+)(?: \((\d+)/(\d+)\))?", cell)
    assert m, cell
    mean, std = _mean_std(values)
    tol = 0.51 * 10.0**-digits + 1e-9
    assert abs(float(m[1]) - mean) <= tol and abs(float(m[2]) - std) <= tol, (cell, values)


def _runs(data, **config):
    return [r for r in data["results"]["runs"]
            if all(r["config"].get(k) == v for k, v in config.items())]


def _steps(runs, target, spe):
    out = []
    for r in runs:
        hits = [i for i, a in enumerate(r["test_accuracy"]) if a >= target]
        if hits:
            out.append((hits[0] + 1) * spe)
    return out


def _check_steps(cell, runs, target, spe):
    steps = _steps(runs, target, spe)
    if not steps:
        assert cell == "not reached"
        return
    _check(cell, steps, digits=0)
    if len(steps) < len(runs):
        assert cell.endswith(f"({len(steps)}/{len(runs)})")


LABELS = {"batch": "BN", "none": "no norm", "renorm": "renorm", "ghost": "ghost BN",
          "group": "group norm", "group1": "layer norm (per example)",
          "layer": "layer norm (per position)"}


def _expect_learning_rate(data, header, rows):
    s, spe = data["meta"]["settings"], data["results"]["steps_per_epoch"]
    assert [r[0] for r in rows] == [f"{lr:g}" for lr in s["learning_rates"]]
    assert len(header) == 1 + len(s["norms"]) * (2 + len(s["targets"]))
    for lr, row in zip(s["learning_rates"], rows, strict=True):
        cells = dict(zip(header, row, strict=True))
        for norm in s["norms"]:
            runs, name = _runs(data, norm=norm, learning_rate=lr), LABELS[norm]
            _check(cells[f"{name} final accuracy"], [r["test_accuracy"][-1] for r in runs])
            for t in s["targets"]:
                _check_steps(cells[f"{name} steps to {t}"], runs, t, spe)
            bad = sum(r["nonfinite"] or r["test_accuracy"][-1] < 0.2 for r in runs)
            assert cells[f"{name} diverged"] == f"{bad}/{len(runs)}"


def _expect_configs(data, header, rows):
    s, spe = data["meta"]["settings"], data["results"]["steps_per_epoch"]
    assert len(rows) == len(s["configs"])
    for config, row in zip(s["configs"], rows, strict=True):
        cells = dict(zip(header, row, strict=True))
        runs = _runs(data, **config)
        test = [r["test_accuracy"][-1] for r in runs]
        _check(cells["final test accuracy"], test)
        if "training accuracy" in header:
            train = [r["train_accuracy"] for r in runs]
            _check(cells["training accuracy"], train)
            _check(cells["train - test gap"], np.subtract(train, test))
        for t in s["targets"]:
            _check_steps(cells[f"steps to {t}"], runs, t, spe)
        _check(cells["final training loss"],
               [r["train_loss"][-1] for r in runs if r["train_loss"][-1] is not None], digits=4)


def _expect_batch_size(data, header, rows):
    s = data["meta"]["settings"]
    assert header == ["batch size"] + [LABELS[n] for n in s["norms"]]
    for b, row in zip(s["batch_sizes"], rows, strict=True):
        for norm, cell in zip(s["norms"], row[1:], strict=True):
            runs = _runs(data, norm=norm, batch_size=b)
            if runs:
                _check(cell, [r["test_accuracy"][-1] for r in runs])
            else:
                assert cell == "n/a" and {"norm": norm, "batch_size": b} in (
                    data["results"]["skipped"])


def _expect_momentum(data, header, rows):
    momenta = data["meta"]["settings"]["momenta"]
    for e, row in enumerate(rows):
        assert row[0] == str(e + 1)
        cells = iter(row[1:])
        for m in momenta:
            for key in ("test_accuracy", "test_accuracy_precise"):
                _check(next(cells), [r[key][e] for r in _runs(data, momentum=m)])


def _expect_mcbn(data, header, rows):
    ev = data["results"]["evaluations"]
    keys = ["accuracy", "nll", "ece", "auroc_entropy", "auroc_mutual_information",
            "mutual_information_test", "mutual_information_ood"]
    groups = [[e for e in ev if e["config"]["inference"] == "plain"]] + [
        [e for e in ev if e["config"].get("mc_batch_size") == b]
        for b in data["meta"]["settings"]["mc_batch_sizes"]]
    assert len(rows) == len(groups)
    for group, row in zip(groups, rows, strict=True):
        assert len(group) == len(data["meta"]["seeds"])
        for key, cell in zip(keys, row[1:], strict=True):
            if key in group[0]:
                _check(cell, [e[key] for e in group])
            else:
                assert cell == "-"


def _probe_mean(run, key):
    """A probe curve's mean over its defined, finite epochs (None when it has none)."""
    vals = [v for v in run[key] if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def _check_probe(cell, runs, key, digits=3):
    vals = [m for m in (_probe_mean(r, key) for r in runs) if m is not None]
    if len(vals) < len(runs) and vals:
        assert cell.endswith(f"({len(vals)}/{len(runs)})"), cell
        cell = cell.rsplit(" (", 1)[0]
    _check(cell, vals, digits)


def _exact(data, config):
    return [r for r in data["results"]["runs"] if r["config"] == config]


def _net_name(config):
    if config["norm"] == "none":
        return "no BN"
    return ("noisy BN (mean ±{:g}, variance 1-{:g})".format(*config["noise"])
            if config.get("noise") else "BN")


def _expect_probes(columns):
    def expect(data, header, rows):
        configs = data["meta"]["settings"]["configs"]
        assert [row[0] for row in rows] == [_net_name(c) for c in configs]
        for config, row in zip(configs, rows, strict=True):
            cells, runs = dict(zip(header, row, strict=True)), _exact(data, config)
            assert len(runs) == len(data["meta"]["seeds"])
            _check(cells["final test accuracy"], [r["test_accuracy"][-1] for r in runs])
            for column, (key, digits) in columns.items():
                _check_probe(cells[column], runs, key, digits)
    return expect


def _expect_regularization(data, header, rows):
    s, spe = data["meta"]["settings"], data["results"]["steps_per_epoch"]
    for config, row in zip(s["configs"], rows, strict=True):
        cells, runs = dict(zip(header, row, strict=True)), _exact(data, config)
        parts = (["BN"] if config["norm"] == "batch" else []) + (
            [f"dropout {config['dropout']:g}"] if config["dropout"] else []) + (
            [f"L2 {config['l2']:g}"] if config["l2"] else [])
        assert row[0] == (" + ".join(parts) or "no regularizer")
        test, train = ([r["test_accuracy"][-1] for r in runs],
                       [r["train_accuracy"] for r in runs])
        _check(cells["final test accuracy"], test)
        _check(cells["training accuracy"], train)
        _check(cells["train - test gap"], np.subtract(train, test))
        for t in s["targets"]:
            _check_steps(cells[f"steps to {t}"], runs, t, spe)


EXPECT = {"learning_rate": _expect_learning_rate, "placement": _expect_configs,
          "dropout": _expect_configs, "batch_size": _expect_batch_size,
          "momentum": _expect_momentum, "mcbn": _expect_mcbn,
          "covariate_shift": _expect_probes({
              "feature shift per epoch": ("feature_shift", 3),
              "gradient change (relative)": ("gradient_change", 3),
              "gradient cosine": ("gradient_cosine", 3)}),
          "smoothness": _expect_probes({
              "loss range along the gradient": ("loss_range", 4),
              "largest gradient change": ("gradient_change", 4),
              "effective beta-smoothness": ("beta", 3),
              "gradient norm": ("gradient_norm", 4)}),
          "regularization": _expect_regularization}


@pytest.mark.slow
@pytest.mark.parametrize("name", STUDIES)
def test_quick_study_writes_json_png_and_markdown(quick, name):
    out, stdout = quick
    data = json.loads((out / f"{name}.json").read_text())
    meta = data["meta"]
    assert meta["benchmark"] == "study" and meta["study"] == name and meta["quick"] is True
    assert meta["command"].startswith("python -m bnjax_train.studies all --quick")
    assert meta["git_commit"] and meta["seeds"] == [0, 1] and meta["seconds"] > 0
    assert {"cpu", "cores", "jax", "flax", "load_average"} <= set(meta["environment"])
    assert len(meta["load_average_end"]) == 3
    assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / f"{name}.md").read_text()
    assert markdown.endswith(f"<!-- rendered: {(out / f'{name}.json').resolve()} table -->\n"
                             + report.render(out / f"{name}.json", "table")
                             + "\n<!-- end rendered -->\n")
    assert f"Claim: {render.CLAIMS[name]}" in markdown and "QUICK RUN" in markdown
    header, rows = _table(markdown)
    EXPECT[name](data, header, rows)


@pytest.mark.slow
def test_quick_runs_decide_nothing(quick):
    """A quick run's tables, files and printed output carry no verdict, and say so."""
    out, stdout = quick
    for name in STUDIES:
        markdown = (out / f"{name}.md").read_text()
        assert "No verdict: a quick run" in markdown, name
        assert not VERDICT_WORDS.search(markdown), (name, VERDICT_WORDS.search(markdown))
    assert not VERDICT_WORDS.search(stdout), VERDICT_WORDS.search(stdout)


def test_docs_page_shows_the_full_runs():
    page = (REPO / "docs" / "studies.md").read_text()
    regions = {(m["path"], m["table"]) for m in report.MARKER.finditer(page)}
    files = STUDIES + [f"{name}_digits" for name in ON_DIGITS]
    assert regions == {(f"docs/studies/{name}.json", "table") for name in files}
    for name in files:
        data = json.loads((REPO / "docs" / "studies" / f"{name}.json").read_text())
        assert not data["meta"]["quick"] and len(data["meta"]["seeds"]) >= 5
        assert data["meta"]["settings"]["dataset"] == (
            "digits" if name.endswith("_digits") else "mnist1d")
        assert f"](studies/{name}.png)" in page
        assert (REPO / "docs" / "studies" / f"{name}.png").stat().st_size > 10_000
        assert STATUS.match(f"Verdict: {render.verdict(data)}")
        assert f"Verdict: {render.verdict(data)}" in page


def test_bad_recipe_and_noise_are_named():
    with pytest.raises(ValueError, match=r"l2=-0.1 must be a finite number >= 0"):
        Recipe(l2=-0.1)
    with pytest.raises(ValueError, match=r"NoisyShift\(mean=1.0, var=0.5\): need"):
        NoisyShift(1.0, 0.5).apply({}, jnp.ones((2, 3)), False)


def test_cli_arguments():
    assert parse_args(["all"]).names == STUDIES and parse_args(["all"]).seeds == 5
    assert parse_args(["all", "--dataset", "digits"]).names == ON_DIGITS
    with pytest.raises(SystemExit):
        parse_args(["mcbn", "--dataset", "digits"])
    with pytest.raises(SystemExit):
        parse_args(["placement", "--seeds", "0"])
    with pytest.raises(SystemExit):
        parse_args(["nope"])


def test_metrics_against_float64_references():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=200)
    labels = rng.integers(0, 4, 200)
    nll = -np.mean([np.log(p[y]) for p, y in zip(probs, labels, strict=True)])
    assert metrics.negative_log_likelihood(probs, labels) == pytest.approx(nll, rel=1e-12)
    conf, pred = probs.max(1), probs.argmax(1)
    ece = 0.0
    for lo in np.arange(15) / 15:  # bins (lo, lo + 1/15]
        b = (conf > lo) & (conf <= lo + 1 / 15)
        if b.any():
            ece += b.mean() * abs((pred[b] == labels[b]).mean() - conf[b].mean())
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(ece, rel=1e-9)
    a, b = [0.9, 0.95, 0.93], [0.8, 0.85]
    se = np.sqrt(np.var(a, ddof=1) / 3 + np.var(b, ddof=1) / 2)
    d, z = metrics.compare(a, b)
    assert d == pytest.approx(np.mean(a) - np.mean(b)) and z == pytest.approx(d / se)


def test_study_network_computes_what_the_zoo_cnn1d_computes():
    kw = {"features": (4, 6, 8), "pool_after": (1,), "hidden": 5}
    x = np.random.default_rng(0).normal(size=(6, 20)).astype(np.float32)
    zoo, study = CNN1D(**kw), StudyCNN1D(**kw)
    rename = lambda tree: {k.replace("Conv_", "PatchConv_"): v for k, v in tree.items()}  # noqa: E731
    shapes = jax.eval_shape(lambda: zoo.init(jax.random.key(1), x, training=False))
    # The same variables (names aside), shapes and dtypes.
    assert jax.eval_shape(lambda: study.init(jax.random.key(1), x, training=False)) == {
        k: rename(v) for k, v in shapes.items()}
    rng = np.random.default_rng(1)  # any values (variances positive): the same function

    def draw(path, a):
        low = 0.5 if jax.tree_util.keystr(path).endswith("['var']") else -1.0
        return rng.uniform(low, 2.0, size=a.shape).astype(a.dtype)

    variables = jax.tree_util.tree_map_with_path(draw, shapes)
    ours = {k: rename(v) for k, v in variables.items()}

    def both_modes(model):  # one compiled program per network
        return jax.jit(lambda v, x: [model.apply(v, x, training=t, mutable=["batch_stats"])
                                     for t in (False, True)])

    for got, want in zip(both_modes(study)(ours, x), both_modes(zoo)(variables, x), strict=True):
        assert np.isfinite(want[0]).all()
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
        assert jax.tree.structure(got[1]) == jax.tree.structure(want[1])
        for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("l2", [0.0, 0.01])
def test_vmapped_runs_train_as_a_plain_loop_would(l2):
    # The model, recipe and training shapes of engine.train_runs's example: in one process
    # both train with the same compiled epoch.
    n, rng = 32, np.random.default_rng(0)
    data = Data(rng.normal(size=(n, 40)).astype(np.float32), rng.integers(0, 10, n),
                rng.normal(size=(20, 40)).astype(np.float32), rng.integers(0, 10, 20), 10)
    model = create_model("mlp", num_classes=10, hidden=(4,))
    seeds, lrs, epochs, batch = [3, 7], [0.05, 0.5], 2, 16
    runs = train_runs(model, data, Recipe(optimizer="momentum", batch_size=batch,
                                          epochs=epochs, l2=l2), seeds, lrs)
    total = epochs * (n // batch)

    def sgd(lr):  # the run's own optimizer, its learning rate a traced value in `step`
        return optax.sgd(lambda t: lr * 0.5 * (1 + jnp.cos(jnp.pi * t / total)), momentum=0.9)

    @jax.jit  # one step of one run: compiled once, for both runs
    def step(params, stats, opt, x, y, lr):
        def loss(p):
            logits, upd = model.apply({"params": p, "batch_stats": stats}, x, training=True,
                                      mutable=["batch_stats"])
            penalty = sum(jnp.sum(layer["kernel"] ** 2) for layer in p.values()
                          if "kernel" in layer)  # Keras's l2(l2) on every kernel
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + (
                l2 * penalty), upd["batch_stats"]

        (_, stats), g = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt = sgd(lr).update(g, opt, params)
        return optax.apply_updates(params, updates), stats, opt

    init = jax.jit(lambda key: model.init(key, jnp.asarray(data.x_train[:batch]),
                                          training=False))
    for r, (seed, lr) in enumerate(zip(seeds, lrs, strict=True)):
        v = init(jax.random.key(seed))
        params, stats = v["params"], v["batch_stats"]
        opt = sgd(lr).init(params)
        for e in range(epochs):
            perm = np.random.default_rng([seed, e]).permutation(n)
            for k in range(n // batch):
                idx = perm[k * batch:(k + 1) * batch]
                params, stats, opt = step(params, stats, opt, data.x_train[idx],
                                          data.y_train[idx], lr)
        got = jax.tree.map(lambda a, r=r: a[r], runs.variables)
        want = {"params": params, "batch_stats": stats}
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
        logits = model.apply({"params": params, "batch_stats": stats}, data.x_test,
                             training=False)
        want_acc = np.mean(np.argmax(logits, -1) == data.y_test)
        assert abs(runs.test_accuracy[r, -1] - want_acc) <= 0.051  # one of 20 may flip


def _lr_data(bn_curves, none_curves, nonfinite_none=False):
    runs = []
    for norm, curves in (("batch", bn_curves), ("none", none_curves)):
        for lr, per_seed in curves.items():
            for seed, curve in enumerate(per_seed):
                runs.append({"config": {"norm": norm, "learning_rate": lr}, "seed": seed,
                             "test_accuracy": curve, "train_loss": [1.0] * len(curve),
                             "nonfinite": nonfinite_none and norm == "none" and lr == 1.0})
    return {"meta": {"study": "learning_rate", "settings": {
        "norms": ["batch", "none"], "learning_rates": [0.1, 1.0], "targets": [0.9]}},
        "results": {"runs": runs, "steps_per_epoch": 10, "num_classes": 10}}


def test_learning_rate_verdict_follows_the_numbers():
    fast, slow = [[0.95, 0.96], [0.93, 0.96]], [[0.5, 0.91], [0.6, 0.92]]
    confirmed = render.verdict(_lr_data({0.1: fast, 1.0: fast},
                                        {0.1: slow, 1.0: [[0.1, 0.1], [0.1, 0.1]]}, True))
    assert confirmed.startswith("confirmed: ") and (
        "to 0.9, 10 steps with BN (at 0.1) vs 20 without (at 0.1), 2.00x" in confirmed)
    assert "no norm trains without divergence up to 0.1 and diverges at 1 in 2/2" in confirmed
    same = render.verdict(_lr_data({0.1: slow, 1.0: slow}, {0.1: slow, 1.0: slow}))
    assert same.startswith("not confirmed on this data")
    # Faster, never diverging either: only two of the three parts hold.
    partly = render.verdict(_lr_data({0.1: fast, 1.0: fast}, {0.1: slow, 1.0: slow}))
    assert partly.startswith("partly confirmed (faster at equal learning rates, faster at its "
                             "best learning rate; but not stable at larger learning rates)")
