"""Eval throughput of ResNet-20 with and without its batch norms folded into the convolutions.

Command (from the repository root)::

    python -m benchmarks fold                  # batch 256, 32x32x3, 20 runs
    python -m benchmarks fold --eager --out benchmarks/results/fold_bench.json
    python -m benchmarks fold --quick          # smoke test: tiny shapes, meaningless

Both variants are jitted and compiled ahead of time; then the two are timed in one loop,
interleaved (alternating which goes first), for ``--reps`` runs after ``--warmup`` runs each.
The table gives the median, quartiles and images per second; the ratio is the unfolded median
over the folded one. Runs on the CPU unless ``JAX_PLATFORMS`` says otherwise.

``--quick`` draws the input and the variables with NumPy (``common.init_variables``): compiling
JAX's random-number code for ResNet-20's initializers takes longer than the rest of the smoke
test.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import bnjax
from benchmarks.common import init_variables, quantiles
from bnjax_train.models import create_model

__all__ = ["run"]


def _random_variables(model: Any, x: jax.Array, seed: int, quick: bool) -> dict[str, Any]:
    """Initialized variables with random (trained-looking) batch-norm statistics and affine."""
    if quick:
        variables = init_variables(model, x)
    else:
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


def run(batch: int, size: int, reps: int, warmup: int, seed: int = 0,
        eager: bool = False, quick: bool = False) -> dict[str, Any]:
    """Builds, folds, checks and times ResNet-20; returns the results as a dict.

    ``quick`` draws the input and the variables with NumPy (see the module docstring).

    Example:
      >>> r = run(batch=2, size=8, reps=1, warmup=0)  # doctest: +SKIP
      >>> r["folded_pairs"]  # doctest: +SKIP
      19
    """
    model = create_model("resnet20", num_classes=10)
    shape = (batch, size, size, 3)
    if quick:
        x = jnp.asarray(np.random.default_rng(seed + 1).normal(size=shape), jnp.float32)
    else:
        x = jax.random.normal(jax.random.key(seed + 1), shape, jnp.float32)
    variables = _random_variables(model, x, seed, quick)
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
    results = {k: {**quantiles(ts), "images_per_s": batch / statistics.median(ts)}
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
    }
