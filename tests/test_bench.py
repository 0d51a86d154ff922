"""`python -m benchmarks step --quick` runs and writes well-formed JSON (no time is asserted)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from caches import fast_compile_env
from processes import one_device_env

from benchmarks import op
from benchmarks.report import render_all

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "step", "--quick", "--out", str(out)],
        cwd=out.parent, env=fast_compile_env(one_device_env()),
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    def no_nan(token):
        raise AssertionError(f"JSON holds {token}")

    with open(out) as f:
        result = json.load(f, parse_constant=no_nan)
    return proc.stdout, result


def _positive(v):
    return isinstance(v, int | float) and math.isfinite(v) and v > 0


def test_header_names_machine_and_versions(quick_run):
    stdout, result = quick_run
    meta = result["meta"]
    assert meta["quick"] is True and meta["reps"] >= 1
    assert meta["command"].startswith("python -m benchmarks step --quick")
    assert meta["benchmark"] == "step" and meta["parts"] == ["op", "model"]
    assert len(meta["git_commit"]) == 40 and isinstance(meta["git_dirty"], bool)
    env = meta["environment"]
    for key in ("device", "jax", "jaxlib", "flax", "optax", "numpy", "cpu", "cores",
                "load_average"):
        assert key in env, key
    assert len(env["load_average"]) == len(meta["load_average_end"]) == 3
    assert meta["git_commit"][:12] in stdout and env["jax"] in stdout
    # What was printed is the report of the JSON.
    assert render_all(result) in stdout


def test_op_rows_cover_every_shape_dtype_pass_and_impl(quick_run):
    stdout, result = quick_run
    rows = result["op"]
    keys = {(tuple(r["shape"]), r["dtype"], r["mode"], r["impl"]) for r in rows}
    expected = {(s, d, m, i) for s in op.QUICK_SHAPES for d in op.DTYPES for m in op.MODES
                for i in op.IMPLS}
    assert keys == expected and len(rows) == len(expected)
    n = math.prod(op.QUICK_SHAPES[0])
    for r in rows:
        assert r["n"] == result["meta"]["reps"]
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert all(_positive(r[k]) for k in ("median_ms", "gbps", "ratio_to_flax"))
        itemsize = 4 if r["dtype"] == "float32" else 2
        assert r["bytes"] == op.PASSES[r["mode"]] * n * itemsize
        if r["impl"] == "flax.linen":
            assert r["ratio_to_flax"] == 1.0
    assert "| shape (NHWC) | pass | bnjax ms |" in stdout


def test_memory_rows(quick_run):
    _, result = quick_run
    rows = result["memory"]
    assert {(r["dtype"], r["impl"]) for r in rows} == {
        (d, i) for d in op.DTYPES for i in ("bnjax", "flax.linen", "flax.nnx")}
    for r in rows:
        # Arguments x, dy (and the small parameters) and outputs y, dx at least.
        assert r["peak_bytes"] >= r["argument_bytes"] + r["output_bytes"] > 0
        assert _positive(r["ratio_to_flax"])


def test_model_rows(quick_run):
    stdout, result = quick_run
    rows = result["model"]
    assert {(r["step"], r["variant"]) for r in rows} == {
        ("train", "bnjax BN"), ("train", "flax BN"), ("train", "no norm"),
        ("eval", "bnjax BN"), ("eval", "flax BN"), ("eval", "no norm"),
        ("eval", "bnjax BN folded")}
    assert {r["dtype"] for r in rows if r["step"] == "train"} == {"float32", "bfloat16"}
    for r in rows:
        if r["step"] == "train" and r["variant"] != "no norm":
            assert r["bn_cost_pct"] is not None
    for r in rows:
        if r["available"]:
            assert _positive(r["median_ms"]) and _positive(r["ratio_to_flax"])
        else:  # only folding may be missing, and then the row says why
            assert r["variant"] == "bnjax BN folded" and r["note"]
            assert r["note"] in stdout
