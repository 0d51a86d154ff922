"""Timing your own model: ``bnjax.timing.compare`` and ``bnjax-bench`` (no time is asserted)."""

import json
import math
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from caches import fast_compile_env
from processes import one_device_env

from bnjax.benchmark import device_label, environment, model_table
from bnjax.timing import DTYPES, NORMS, compare

REPO = Path(__file__).resolve().parents[1]
# The zoo's ResNet built with Flax's layer, reduced to its stem and head (compiles fast; the
# shapes of `python -m benchmarks step --quick`, whose compiled steps the session cache holds).
ARGS = ["--model", "bnjax_train.models:ResNet20", "--kwarg", "norm=flax",
        "--kwarg", "blocks_per_stage=0", "--input-shape", "32,32,3", "--batch-size", "4",
        "--reps", "2", "--warmup", "1"]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "r.json"
    proc = subprocess.run([sys.executable, "-m", "bnjax.timing", *ARGS, "--out", str(out)],
                          cwd=REPO, env=fast_compile_env(one_device_env()),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_bench_command_prints_the_table_of_its_json(bench_run):
    stdout, result = bench_run
    rows, meta = result["model"], result["meta"]
    assert stdout.startswith(model_table(rows, spread=True))
    assert meta["benchmark"] == "compare"
    assert meta["command"].startswith("bnjax-bench " + " ".join(ARGS) + " --out ")
    assert meta["kwargs"] == {"norm": "flax", "blocks_per_stage": 0}
    assert meta["input_shape"] == [32, 32, 3] and meta["reps"] == 2
    assert len(meta["git_commit"]) == 40 and meta["seconds"] > 0
    for key in ("device", "jax", "flax", "optax", "bnjax", "load_average"):
        assert key in meta["environment"], key


def test_bench_rows_cover_every_variant_dtype_and_step(bench_run):
    _, result = bench_run
    rows = result["model"]
    assert [(r["dtype"], r["step"], r["variant"]) for r in rows] == [
        (d, s, v) for d in DTYPES for s in ("train", "eval") for v in NORMS]
    for r in rows:
        same = {(q["dtype"], q["step"], q["variant"]): q for q in rows}
        flax, none = (same[(r["dtype"], r["step"], v)]["median_ms"] for v in ("flax BN",
                                                                              "no norm"))
        assert r["n"] == 2 and r["batch"] == 4 and r["model"] == "ResNet20"
        assert 0 < r["min_ms"] <= r["p25_ms"] <= r["median_ms"] <= r["p75_ms"] <= r["max_ms"]
        assert math.isclose(r["ratio_to_flax"], r["median_ms"] / flax)
        if r["variant"] == "no norm":
            assert r["bn_cost_pct"] is None
        else:
            assert math.isclose(r["bn_cost_pct"], 100 * (r["median_ms"] - none) / none)
        assert r["peak_bytes"] > 0  # XLA:CPU reports its memory analysis


def test_bench_command_errors_name_the_flag(tmp_path):
    env = one_device_env()
    for args, message in (
            (["--model", "bnjax_train.models", "--input-shape", "4"],
             "--model='bnjax_train.models' must be package.module:factory"),
            (["--model", "m:f", "--input-shape", "4,x"], "--input-shape='4,x' must be"),
            (["--model", "m:f", "--input-shape", "4", "--kwarg", "norm"],
             "--kwarg 'norm' must be KEY=VALUE")):
        proc = subprocess.run([sys.executable, "-m", "bnjax.timing", *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


class _Net(nn.Module):
    norm: bool = True

    @nn.compact
    def __call__(self, x, is_training):
        x = nn.Dense(4)(x)
        if self.norm:
            x = nn.BatchNorm(use_running_average=not is_training)(x)
        return nn.Dense(3)(x)


def test_compare_errors_name_the_argument():
    batch = {"x": np.ones((4, 2), np.float32), "y": np.zeros(4, np.int32)}
    with pytest.raises(ValueError, match=r"batch must be a mapping with 'x' .* got dict \['x'\]"):
        compare(_Net(), {"x": batch["x"]})
    with pytest.raises(ValueError, match=r"norms=\['flax'\] must be a non-empty sequence of"):
        compare(_Net(), batch, norms=["flax"])
    with pytest.raises(ValueError, match=r"dtypes='float32' must be a non-empty sequence"):
        compare(_Net(), batch, dtypes="float32")
    with pytest.raises(ValueError, match=r"reps=0 must be an integer >= 1"):
        compare(_Net(), batch, reps=0)
    with pytest.raises(ValueError, match=r"mode='train': _Net.__call__ takes no argument "
                                         r"'train' \(its parameters: \['x', 'is_training'\]\)"):
        compare(_Net(), batch, mode="train")
    with pytest.raises(ValueError, match="model _Net calls no flax.linen.BatchNorm"):
        compare(_Net(norm=False), batch, steps=["eval"], dtypes=["float32"], reps=1)


_BATCH = {"x": np.random.default_rng(0).normal(size=(8, 2)).astype(np.float32),
          "y": np.arange(8) % 3}
_ONE = {"norms": ["flax BN"], "dtypes": ["float32"], "steps": ["train"], "reps": 1,
        "warmup": 0}


class _Noisy(nn.Module):
    """Dropout and a stream of its own: each needs a key in the train step."""

    @nn.compact
    def __call__(self, x, train):
        x = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
        if train:
            x = x + 0.1 * jax.random.normal(self.make_rng("noise"), x.shape)
        return nn.Dense(3)(nn.Dropout(0.5, deterministic=not train)(x))


class _NaN(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
        return nn.Dense(3)(x) * jnp.nan


def test_compare_supplies_every_rng_stream_the_model_asks_for():
    rows = compare(_Noisy(), _BATCH, **{**_ONE, "steps": ["train", "eval"]})
    assert [(r["step"], r["variant"], r["n"]) for r in rows] == [
        ("train", "flax BN", 1), ("eval", "flax BN", 1)]


def test_compare_refuses_what_would_not_be_a_train_step():
    with pytest.raises(ValueError, match=r"^_NaN's train step \(flax BN, float32\) has a loss of "
                                         r"nan, .* every step would be skipped"):
        compare(_NaN(), _BATCH, **_ONE)
    x3 = {"x": np.ones((8, 5, 2), np.float32), "y": _BATCH["y"]}
    with pytest.raises(ValueError, match=r"_Net returns an output of shape \(8, 5, 3\) for "
                                         r"batch\['x'\] of shape \(8, 5, 2\)"):
        compare(_Net(), x3, **_ONE)


def test_the_device_label_reads_like_a_device():
    n = jax.device_count()  # the suite's forced CPU devices
    assert device_label() == environment()["device"] == f"cpu ({n} device{'s' * (n > 1)})"


def test_the_model_table_shows_the_quartiles_beside_the_median():
    new = {"model": "net", "step": "train", "batch": 8, "dtype": "float32",
           "variant": "flax BN", "median_ms": 2.0, "p25_ms": 1.5, "p75_ms": 2.25,
           "ratio_to_flax": 1.0, "bn_cost_pct": 25.0, "peak_bytes": 2**20, "available": True}
    old = {k: v for k, v in new.items() if k not in ("p25_ms", "p75_ms")}  # an older JSON
    lines = model_table([new, old], spread=True).splitlines()
    assert lines[2] == ("| step | normalization | ms | p25-p75 ms | ratio to flax BN | "
                        "BN cost over no norm | peak MiB |")
    assert lines[4:] == ["| net train, batch 8, float32 | flax BN | 2 | 1.5-2.25 | 1 | +25 % | 1 |",
                         "| net train, batch 8, float32 | flax BN | 2 | - | 1 | +25 % | 1 |"]
    assert model_table([new]).splitlines()[2:] == [  # without spread: the rendered pages' table
        "| step | normalization | ms | ratio to flax BN | BN cost over no norm | peak MiB |",
        "|---|---|---|---|---|---|",
        "| net train, batch 8, float32 | flax BN | 2 | 1 | +25 % | 1 |"]


def test_the_wheel_ships_the_swap_and_the_timing_command(tmp_path):
    """``pip install .``: the wheel holds bnjax.swap, bnjax.timing and ``bnjax-bench``, and
    they import from it, outside the repository, with the library's dependencies only."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "bnjax", src / "bnjax", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "-q", "-w", str(tmp_path), str(src)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = tmp_path.glob("bnjax-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert {"bnjax/swap.py", "bnjax/timing.py", "bnjax/benchmark.py"} <= names
    assert "bnjax-bench = bnjax.timing:main" in entry_points
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)  # what pip install puts in site-packages
    code = ("import sys, bnjax, bnjax.timing, bnjax.swap\n"
            "assert bnjax.__file__.startswith(sys.argv[1]), bnjax.__file__\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'bnjax_train', "
            "'benchmarks', 'orbax', 'tensorflow_datasets', 'ml_collections', 'matplotlib'}))\n"
            "bnjax.timing.main(['--help'])")
    proc = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path,
                          env={**one_device_env(), "PYTHONPATH": str(site)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("[]\nusage: bnjax-bench [-h] --model MODULE:FACTORY")
