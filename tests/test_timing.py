"""Timing your own model: ``bnjax.timing.compare`` and ``bnjax-bench`` (no time is asserted)."""

import json
import math
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import flax.linen as nn
import numpy as np
import pytest
from caches import fast_compile_env
from processes import one_device_env

from bnjax.benchmark import model_table
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
    assert stdout.startswith(model_table(rows))
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
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"]
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
    with pytest.raises(ValueError, match=r"mode=None: Dense.__call__ takes none of \['train'"):
        compare(nn.Dense(3), batch)
    with pytest.raises(ValueError, match="model _Net calls no flax.linen.BatchNorm"):
        compare(_Net(norm=False), batch, steps=["eval"], dtypes=["float32"], reps=1)


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
