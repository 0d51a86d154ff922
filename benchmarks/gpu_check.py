"""One command for a machine with an NVIDIA GPU: the numerical tests that matter, then timings.

Command (from the repository root)::

    bash benchmarks/gpu_check.sh                 # on the GPU machine, under 8 minutes
    bash benchmarks/gpu_check.sh --dry-run       # anywhere: the same pipeline, tiny, on CPU
    PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --dry-run   # that interpreter

Steps, all written to one results JSON (default ``bench_results/gpu_check.json``):

1. the machine: devices, the NVIDIA driver (``nvidia-smi``), library versions;
2. the device's copy bandwidth: a jitted ``a + 1`` over a 512 MiB float32 array (read and
   write), the yardstick for the op table's GB/s;
3. the numerical tests that matter on the device (:data:`TESTS`: float64 and Flax parity,
   the fast path's forward and backward, masks, synchronized statistics with ``vmap`` on one
   device, folding), run by pytest in a subprocess; their counts and exit status are recorded;
4. the op benchmark (every shape, float32 and bfloat16) and the model benchmark (ResNet-20 and
   the MNIST-1D net, train steps in both dtypes, inference).

``--dry-run`` runs on the CPU: pytest only collects the tests (so a renamed test breaks it),
the benchmarks use their quick settings and the bandwidth probe a small array. It runs in CI,
so the script keeps working where no GPU is.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["TESTS", "copy_bandwidth", "device_facts", "run", "run_tests"]

#: The test selection of the GPU run: files and ``-k`` filters (tests that need 8 devices or
#: another library than jax, flax, optax, numpy, pytest and hypothesis are left out).
TESTS: tuple[tuple[str, str], ...] = (
    ("tests/test_functional.py", ""),
    ("tests/test_fastpath.py", "not across_devices"),
    ("tests/test_port_flax.py", ""),
    ("tests/test_masks.py", ""),
    ("tests/test_errors.py", ""),
    ("tests/test_sync.py", "vmap or large_mean or unbound"),
    ("tests/test_inference.py", "fold and not zoo and not export"),
)


def device_facts() -> dict[str, Any]:
    """The JAX devices and, where ``nvidia-smi`` exists, the GPU's name, driver and memory.

    Example:
      >>> sorted(device_facts())
      ['backend', 'devices', 'nvidia_smi']
    """
    facts: dict[str, Any] = {"backend": jax.default_backend(),
                             "devices": [str(d) for d in jax.devices()], "nvidia_smi": None}
    if shutil.which("nvidia-smi"):
        q = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        out = subprocess.run(q, capture_output=True, text=True, timeout=30)
        facts["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
    return facts


def copy_bandwidth(mib: int = 512, reps: int = 20) -> dict[str, float]:
    """GB/s of a jitted elementwise pass that reads and writes ``mib`` MiB of float32.

    Example:
      >>> sorted(copy_bandwidth(mib=1, reps=2))
      ['gbps', 'median_ms', 'mib']
    """
    a = jnp.zeros((mib * 2**20 // 4,), jnp.float32)
    f = jax.jit(lambda a: a + 1.0)
    jax.block_until_ready(f(a))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(a))
        times.append(time.perf_counter() - t)
    ms = sorted(times)[len(times) // 2] * 1e3
    return {"mib": mib, "median_ms": ms, "gbps": 2 * a.nbytes / (ms * 1e-3) / 1e9}


def run_tests(collect_only: bool = False) -> dict[str, Any]:
    """Runs (or only collects) :data:`TESTS` with pytest in a subprocess; returns its counts.

    Example:
      >>> run_tests  # doctest: +ELLIPSIS
      <function run_tests at ...>
    """
    if collect_only:  # one collection of every file checks that the selection exists
        cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider",
               "--collect-only", *sorted({p for p, _ in TESTS})]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
        tail = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-300:]
        return {"collect_only": True, "ok": out.returncode == 0,
                "files": [{"path": "all files", "keyword": "", "returncode": out.returncode,
                           "summary": tail, "counts": {}, "seconds": None}]}
    results = []
    for path, keyword in TESTS:
        cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider",
               path] + (["-k", keyword] if keyword else [])
        start = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
        tail = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-300:]
        counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|error|errors|skipped"
                                                    r"|tests? collected)", tail)}
        results.append({"path": path, "keyword": keyword, "returncode": out.returncode,
                        "summary": tail, "counts": counts,
                        "seconds": time.perf_counter() - start})
    return {"collect_only": collect_only, "files": results,
            "ok": all(r["returncode"] == 0 for r in results)}


def run(dry_run: bool, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole check; ``dry_run`` for its tiny CPU form.

    Example:
      >>> run  # doctest: +ELLIPSIS
      <function run at ...>
    """
    from benchmarks import model, op

    out: dict[str, Any] = {"dry_run": dry_run, "device": device_facts()}
    log(f"devices: {out['device']['devices']}")
    out["copy_bandwidth"] = copy_bandwidth(mib=4 if dry_run else 512, reps=3 if dry_run else 20)
    log(f"copy bandwidth: {out['copy_bandwidth']['gbps']:.1f} GB/s")
    out["tests"] = run_tests(collect_only=dry_run)
    log("tests: " + ("ok" if out["tests"]["ok"] else "FAILED") + " " + "; ".join(
        f"{r['path']}: {r['summary']}" for r in out["tests"]["files"]))
    shapes = op.QUICK_SHAPES if dry_run else op.SHAPES
    reps, warmup = (2, 1) if dry_run else (20, 2)
    out.update(op.run(shapes, op.DTYPES, reps=reps, warmup=warmup, log=log))
    if dry_run:
        out["model"] = model.run(batch=4, blocks_per_stage=0, reps=reps, warmup=warmup, log=log,
                                 models_=("resnet20",), infer=False)
    else:
        out["model"] = model.run(batch=128, reps=reps, warmup=warmup, log=log)
    return out


def main(argv: Sequence[str]) -> dict[str, Any]:
    """Entry point of ``python -m benchmarks gpu_check``: metadata plus :func:`run`.

    Example:
      >>> main  # doctest: +ELLIPSIS
      <function main at ...>
    """
    from benchmarks import common

    dry_run = "--dry-run" in argv
    if not dry_run and jax.default_backend() != "gpu":
        raise SystemExit("gpu_check: no GPU backend (jax.default_backend() is "
                         f"{jax.default_backend()!r}); use --dry-run to check the script on CPU.")
    meta = common.run_metadata("gpu_check", list(argv), quick=dry_run)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return {"meta": meta, **run(dry_run)}
