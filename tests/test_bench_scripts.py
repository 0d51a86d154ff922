"""`python -m benchmarks fold|sync --quick` run and write well-formed JSON where they should.

Times are never asserted: only that the benchmarks work and report what the docs quote.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script,keys", [
    ("fold", ["folded_pairs", "kept", "max_rel_err_folded_vs_unfolded",
              "speedup_paired_median", "results"]),
    ("sync", ["devices", "ratio_sync_over_local", "results"]),
])
def test_benchmark_script_quick_run_writes_json(tmp_path, script, keys):
    # fold writes to its default --out (under bench_results/ of the current directory).
    out = tmp_path / ("bench_results/fold.json" if script == "fold" else "out.json")
    extra = [] if script == "fold" else ["--out", str(out)]
    proc = subprocess.run([sys.executable, "-m", "benchmarks", script, "--quick", *extra],
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)),
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
