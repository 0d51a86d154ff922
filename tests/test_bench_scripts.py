"""The fold and sync benchmark scripts run (``--quick``) and write well-formed JSON.

Times are never asserted: only that the scripts work and report what the README quotes.
"""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script,keys", [
    ("fold_bench.py", ["folded_pairs", "kept", "max_rel_err_folded_vs_unfolded",
                       "speedup_paired_median", "results"]),
    ("sync_bench.py", ["devices", "ratio_sync_over_local", "results"]),
])
def test_benchmark_script_quick_run_writes_json(tmp_path, script, keys):
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick",
                           "--out", str(out)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["quick"] is True
    for key in keys:
        assert key in data, f"{script} JSON lacks {key!r}"
    assert data["results"], f"{script} recorded no timings"
    if script == "fold_bench.py":
        assert data["max_rel_err_folded_vs_unfolded"] < 1e-5
        assert data["folded_pairs"] == 19 and not data["kept"]  # every BN of ResNet-20
    else:
        assert data["devices"] == 8
