"""The GPU check keeps working where there is no GPU: its dry run goes through every step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from caches import fast_compile_env

from benchmarks import report

REPO = Path(__file__).resolve().parents[1]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(REPO)
    return env


@pytest.mark.slow
def test_dry_run_goes_through_every_step(tmp_path):
    out = tmp_path / "gpu_check.json"
    # PYTHON: this interpreter, whether or not its environment is activated (on PATH).
    env = {**fast_compile_env(_env()), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "benchmarks/gpu_check.sh"), "--dry-run",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["dry_run"] and data["meta"]["benchmark"] == "gpu_check"
    assert data["tests"]["ok"], data["tests"]
    assert "collected" in data["tests"]["files"][0]["summary"]
    assert data["copy_bandwidth"]["gbps"] > 0
    assert {r["mode"] for r in data["op"]} == {"train_fwd", "train_fwd_bwd", "infer_fwd"}
    assert {(r["dtype"], r["variant"]) for r in data["model"]} == {
        (d, v) for d in ("float32", "bfloat16") for v in ("bnjax BN", "flax BN", "no norm")}
    table = report.render(out, "checks")
    assert "Copy bandwidth" in table and "all files" in table


def test_without_a_gpu_the_real_run_refuses():
    env = _env()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "gpu_check", "--out",
                           os.devnull], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "no GPU backend" in proc.stderr and "--dry-run" in proc.stderr
