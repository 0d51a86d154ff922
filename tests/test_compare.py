"""`python -m bnjax_train.compare` on the tiny config: both runs, the figure, the table."""

import json
import pathlib
import subprocess
import sys

from processes import one_device_env

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _first_step(records, key, ok):
    return next((r["step"] for r in records if ok(r[key])), None)


def test_compare_runs_both_variants_and_reports_steps_to_target(tmp_path):
    target = 0.105
    env = one_device_env()
    proc = subprocess.run(
        [sys.executable, "-m", "bnjax_train.compare", "--config", str(ROOT / "configs" / "tiny.py"),
         "--workdir", str(tmp_path), "--target", str(target), "--loss_target", "2.35"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = json.loads((tmp_path / "compare.json").read_text())
    for variant in ("batch", "none"):
        lines = (tmp_path / variant / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        got = table[variant]
        assert got["steps"] == records[-1]["step"]
        assert got["final_test_accuracy"] == records[-1]["test_accuracy"]
        assert got["steps_to_accuracy"][str(target)] == _first_step(
            records, "test_accuracy", lambda a: a >= target)
        assert got["steps_to_train_loss"] == _first_step(
            records, "train_loss", lambda v: v <= 2.35)
    config = json.loads((tmp_path / "none" / "config.json").read_text())
    assert config["norm"] == "none"
