"""`python -m benchmarks fold|sync|parallel --quick` run and write well-formed JSON where they
should.

Times are never asserted: only that the benchmarks work and report what the docs quote.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from caches import fast_compile_env
from processes import one_device_env

# End-to-end runs of the program: `python -m pytest -m slow` (see pyproject.toml).
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
DONE = "=== command done ==="
#: Runs each argument list of ``argv[1]`` (JSON) as ``python -m benchmarks`` would.
RUN_COMMANDS = f"""
import json, sys
from benchmarks.cli import main
for argv in json.loads(sys.argv[1]):
    if main(argv):
        sys.exit(f"python -m benchmarks {{' '.join(argv)}} failed")
    print({DONE!r}, flush=True)
"""


@pytest.mark.parametrize("script,keys", [
    ("fold", ["folded_pairs", "kept", "max_rel_err_folded_vs_unfolded",
              "speedup_paired_median", "results"]),
    ("sync", ["devices", "ratio_sync_over_local", "results"]),
    ("parallel", ["devices", "ratio_to_pmap_sync", "results"]),
])
def test_benchmark_script_quick_run_writes_json(tmp_path, script, keys):
    # fold writes to its default --out (under bench_results/ of the current directory).
    out = tmp_path / ("bench_results/fold.json" if script == "fold" else "out.json")
    extra = [] if script == "fold" else ["--out", str(out)]
    env = fast_compile_env(dict(os.environ, PYTHONPATH=str(ROOT))
                         if script == "sync" else one_device_env())
    proc = subprocess.run([sys.executable, "-m", "benchmarks", script, "--quick", *extra],
                          cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["quick"] is True
    meta = data["meta"]
    assert meta["benchmark"] == script and meta["command"].startswith(
        f"python -m benchmarks {script} --quick")
    assert meta["git_commit"] and {"cpu", "cores", "jax", "flax", "load_average"} <= set(
        meta["environment"])
    for key in keys:
        assert key in data, f"{script} JSON lacks {key!r}"
    assert data["results"], f"{script} recorded no timings"
    if script == "fold":
        assert data["max_rel_err_folded_vs_unfolded"] < 1e-5
        assert data["folded_pairs"] == 19 and not data["kept"]  # every BN of ResNet-20
    else:
        assert data["devices"] == 8


def test_inference_eval_gives_each_configuration_its_own_workdir_and_output(
        tmp_path, tmp_path_factory):
    # The config's data_dir "data": this worker's MNIST-1D cache (as in test_train.py).
    data = tmp_path_factory.getbasetemp() / "bnjax_data"
    data.mkdir(exist_ok=True)
    (tmp_path / "data").symlink_to(data, target_is_directory=True)
    # Both commands in one process (what `python -m benchmarks` runs, twice): one start-up.
    base = ["inference_eval", "--config", "configs/tiny.py", "--num_samples", "2"]
    commands = [base, base + ["--num_epochs", "1"]]  # the second after the default run
    proc = subprocess.run(
        [sys.executable, "-c", RUN_COMMANDS, json.dumps(commands)], cwd=tmp_path,
        env=fast_compile_env(one_device_env()), capture_output=True,
        text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stdout = proc.stdout.split(DONE)
    assert len(stdout) == 3 and "| statistics | test accuracy |" in stdout[1]  # no collision
    runs = tmp_path / "runs" / "inference_eval"
    assert sorted(p.name for p in runs.iterdir()) == ["tiny", "tiny_1ep"]
    for name, epochs, steps in (("tiny", 2, 8), ("tiny_1ep", 1, 4)):
        lines = (runs / name / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines][-1] == steps
        data = json.loads((tmp_path / "bench_results" / f"inference_eval_{name}.json")
                          .read_text())
        assert data["num_epochs"] == epochs and data["train_steps"] == steps
        assert data["meta"]["benchmark"] == "inference_eval"
        assert 0.0 <= min(data["auroc"].values()) <= max(data["auroc"].values()) <= 1.0
        assert data["folded_max_rel_logit_diff"] < 1e-5


def test_port_quick_run_agrees_with_flax_to_float64_rounding(tmp_path):
    # The Flax model and its bnjax port, five SGD steps in float32 and in float64: in float64
    # they agree to rounding (the same arithmetic, step after step); in float32 each differs
    # from its float64 run by float32 rounding, visible but small.
    out = tmp_path / "port.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "port", "--quick", "--out",
                           str(out)], cwd=tmp_path, env=fast_compile_env(one_device_env()),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["meta"]["benchmark"] == "port" and data["quick"] is True
    assert [(r["seed"], r["step"]) for r in data["rows"]] == [(0, 1), (0, 5)]
    for r in data["rows"]:
        assert r["bnjax_vs_flax_f64"] < 1e-12, r
        for key in ("flax_f32_vs_f64", "bnjax_f32_vs_f64", "bnjax_vs_flax_f32"):
            assert 1e-9 < r[key] < 1e-4, (key, r)
    from benchmarks.report import render_all

    assert render_all(data) in proc.stdout
