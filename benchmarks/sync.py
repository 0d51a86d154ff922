"""Train-step time with synchronized vs per-device (local) batch statistics on 8 CPU devices.

Command (from the repository root)::

    python -m benchmarks sync                 # cnn1d, 8 x 16 examples, 30 steps
    python -m benchmarks sync --steps 40 --out benchmarks/results/sync_bench.json
    python -m benchmarks sync --quick         # smoke test: few steps, meaningless

The model is the project's default MNIST-1D conv net (``create_model("cnn1d")``: 4 conv + 1
dense layer, each followed by ``bnjax.BatchNorm``). Both variants run the same data-parallel
train step (``bnjax.make_train_step(data_parallel=True)``: ``jax.pmap`` over 8 CPU devices,
gradients averaged with ``pmean``); they differ only in the model's BN layers:
``axis_name="batch"`` (synchronized: one all-gather per layer forward, one all-reduce per layer
backward) or ``axis_name=None`` (each device normalizes with its own 16 examples). Both are
compiled first, warmed up, then timed in one loop, interleaved (alternating which goes first),
for ``--steps`` steps each; the table gives median and quartiles, the ratio is sync median over
local median. The 8 devices are forced with ``--xla_force_host_platform_device_count=8`` (set by
``python -m benchmarks sync`` before JAX starts) and share the host's cores, so the figure is
the cost of the collectives on a CPU, not on accelerators.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np
import optax

import bnjax
from benchmarks.common import quantiles
from bnjax_train.models import create_model

__all__ = ["run"]


def _make(axis_name: str | None, x: np.ndarray, seed: int) -> tuple[Any, Any]:
    model = create_model("cnn1d", num_classes=10, axis_name=axis_name)
    v = model.init(jax.random.key(seed), x[0, :2], training=False)
    state = bnjax.TrainState.create(apply_fn=model.apply, params=v["params"],
                                    batch_stats=v["batch_stats"], tx=optax.sgd(0.01))
    return bnjax.replicate(state), bnjax.make_train_step(data_parallel=True)


def run(*, per_device: int = 16, length: int = 40, steps: int = 30, warmup: int = 3,
        seed: int = 0) -> dict[str, Any]:
    """Times both variants interleaved; returns the figures as a dict.

    Example:
      >>> r = run(per_device=2, steps=1, warmup=0)  # doctest: +SKIP
      >>> sorted(r["results"])  # doctest: +SKIP
      ['local', 'sync']
    """
    n = jax.local_device_count()
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, per_device, length)).astype(np.float32)
    y = rng.integers(0, 10, size=(n, per_device)).astype(np.int32)
    batch = {"x": x, "y": y}
    variants = {"sync": _make("batch", x, seed), "local": _make(None, x, seed)}
    states = {k: s for k, (s, _) in variants.items()}
    times: dict[str, list[float]] = {k: [] for k in variants}

    def step(name: str) -> float:
        train_step = variants[name][1]
        t0 = time.perf_counter()
        states[name], m = train_step(states[name], batch)
        jax.block_until_ready((states[name], m))
        return time.perf_counter() - t0

    for name in variants:  # compile
        step(name)
    for _ in range(warmup):
        for name in variants:
            step(name)
    order = list(variants)
    for i in range(steps):
        for name in (order if i % 2 == 0 else order[::-1]):
            times[name].append(step(name))
    stats = {k: quantiles(v) for k, v in times.items()}
    return {
        "benchmark": "sync_bench",
        "model": "cnn1d (4 conv + 1 dense, 5 bnjax.BatchNorm)",
        "devices": n,
        "per_device_batch": per_device,
        "global_batch": n * per_device,
        "length": length,
        "steps": steps,
        "warmup": warmup,
        "results": stats,
        "ratio_sync_over_local": stats["sync"]["median_ms"] / stats["local"]["median_ms"],
    }
