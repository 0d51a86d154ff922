"""Eval throughput of ResNet-20 with and without its batch norms folded into the convolutions.

Usage (from the repository root):

    python benchmarks/fold_bench.py                       # batch 256, 32x32x3, 20 runs
    python benchmarks/fold_bench.py --reps 40 --out benchmarks/results/fold_bench.json
    python benchmarks/fold_bench.py --quick               # smoke test: tiny shapes, meaningless

Both variants are jitted and compiled ahead of time; then the two are timed in one loop,
interleaved (alternating which goes first), for ``--reps`` runs after ``--warmup`` runs each.
The table gives the median, quartiles and images per second; the ratio is the unfolded median
over the folded one. Everything is written to JSON as well. Runs on the CPU unless
``JAX_PLATFORMS`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bnjax  # noqa: E402
from bnjax.models import create_model  # noqa: E402


def _random_variables(model: Any, x: jax.Array, seed: int) -> dict[str, Any]:
    """Initialized variables with random (trained-looking) batch-norm statistics and affine."""
    variables = jax.jit(lambda k: model.init(k, x, training=False))(jax.random.key(seed))
    rng = np.random.default_rng(seed)

    def draw(path: Any, leaf: jax.Array) -> jax.Array:
        name = path[-1].key
        if name == "mean":
            return jnp.asarray(rng.normal(0, 0.5, leaf.shape), leaf.dtype)
        if name == "var":
            return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), leaf.dtype)
        if name == "scale":
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(draw, variables)


def _quantiles(ts: list[float]) -> dict[str, float]:
    q = np.percentile(ts, [25, 50, 75])
    return {"median_ms": 1e3 * float(q[1]), "p25_ms": 1e3 * float(q[0]),
            "p75_ms": 1e3 * float(q[2]), "min_ms": 1e3 * min(ts), "n": len(ts)}


def run(batch: int, size: int, reps: int, warmup: int, seed: int = 0,
        eager: bool = False) -> dict[str, Any]:
    """Builds, folds, checks and times ResNet-20; returns the results as a dict."""
    model = create_model("resnet20", num_classes=10)
    x = jax.random.normal(jax.random.key(seed + 1), (batch, size, size, 3), jnp.float32)
    variables = _random_variables(model, x, seed)
    t0 = time.perf_counter()
    folded, fvars = bnjax.fold_batch_norm(model, variables, x)
    fold_s = time.perf_counter() - t0

    def compile_eval(m: Any, v: Any) -> Any:
        return jax.jit(lambda v, x: m.apply(v, x, training=False)).lower(v, x).compile()

    fns = {"unfolded": (compile_eval(model, variables), variables),
           "folded": (compile_eval(folded, fvars), fvars)}
    if eager:
        # Op by op (no jit): nothing fuses the batch-norm arithmetic into the convolutions.
        fns["unfolded, op by op"] = (lambda v, x: model.apply(v, x, training=False), variables)
        fns["folded, op by op"] = (lambda v, x: folded.apply(v, x, training=False), fvars)
    outs = {k: np.asarray(f(v, x)) for k, (f, v) in fns.items()}
    rel_err = float(np.abs(outs["folded"] - outs["unfolded"]).max()
                    / np.abs(outs["unfolded"]).max())

    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for i in range(warmup + reps):
        for name in order if i % 2 == 0 else order[::-1]:
            f, v = fns[name]
            t = time.perf_counter()
            f(v, x).block_until_ready()
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    results = {k: {**_quantiles(ts), "images_per_s": batch / statistics.median(ts)}
               for k, ts in times.items()}
    paired = [u / f for u, f in zip(times["unfolded"], times["folded"], strict=True)]
    return {
        "benchmark": "ResNet-20 eval, batch norms folded vs unfolded",
        "input_shape": [batch, size, size, 3],
        "dtype": "float32",
        "reps": reps,
        "warmup": warmup,
        "folded_pairs": len(folded.folded),
        "kept": [list(k) for k in folded.kept],
        "fold_seconds": fold_s,
        "max_rel_err_folded_vs_unfolded": rel_err,
        "results": results,
        "speedup_median_ratio": results["unfolded"]["median_ms"] / results["folded"]["median_ms"],
        "speedup_paired_median": statistics.median(paired),
        "op_by_op_speedup_median_ratio": (
            results["unfolded, op by op"]["median_ms"] / results["folded, op by op"]["median_ms"]
            if eager else None),
        "environment": {
            "jax": jax.__version__, "backend": jax.default_backend(),
            "device": str(jax.devices()[0].device_kind), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "machine": platform.machine(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        },
    }


def format_table(r: dict[str, Any]) -> str:
    """Markdown table of one run."""
    lines = ["| variant | median ms | p25 ms | p75 ms | images/s |", "|---|---|---|---|---|"]
    for name, v in r["results"].items():
        lines.append(f"| {name} | {v['median_ms']:.1f} | {v['p25_ms']:.1f} | "
                     f"{v['p75_ms']:.1f} | {v['images_per_s']:.0f} |")
    shape = "x".join(map(str, r["input_shape"]))
    eager = r["op_by_op_speedup_median_ratio"]
    return (f"ResNet-20 eval, input {shape} {r['dtype']}, {r['environment']['backend']} "
            f"({r['environment']['cpu_count']} cores), median of {r['reps']} interleaved runs\n\n"
            + "\n".join(lines)
            + f"\n\nfolded {r['folded_pairs']} batch norms ({len(r['kept'])} kept); "
            f"speedup (unfolded / folded median) {r['speedup_median_ratio']:.2f}x, "
            f"median of paired ratios {r['speedup_paired_median']:.2f}x"
            + (f"; op by op (no jit) {eager:.2f}x" if eager else "")
            + "; max relative difference of the outputs "
            f"{r['max_rel_err_folded_vs_unfolded']:.1e}")


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=32, help="image height and width (CIFAR: 32)")
    p.add_argument("--reps", type=int, default=20, help="timed runs per variant (>= 20)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/fold_bench.json", help="JSON output file")
    p.add_argument("--quick", action="store_true", help="tiny smoke test; figures meaningless")
    p.add_argument("--eager", action="store_true",
                   help="also time op-by-op execution (no jit) of both variants")
    a = p.parse_args(argv)
    if a.quick:
        a.batch, a.size, a.reps, a.warmup = 8, 8, 3, 1
    elif a.reps < 20:
        p.error(f"--reps={a.reps}: use at least 20 runs (or --quick for a smoke test)")
    r = run(a.batch, a.size, a.reps, a.warmup, eager=a.eager)
    r["quick"] = a.quick
    print(format_table(r))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(r, f, indent=2)
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
