"""Train-step time with synchronized vs per-device (local) batch statistics on 8 CPU devices.

Usage (from the repository root):

    python benchmarks/sync_bench.py                          # cnn1d, 8 x 16 examples, 30 steps
    python benchmarks/sync_bench.py --steps 40 --out benchmarks/results/sync_bench.json
    python benchmarks/sync_bench.py --quick                  # smoke test: few steps, meaningless

The model is the project's default MNIST-1D conv net (``create_model("cnn1d")``: 4 conv + 1
dense layer, each followed by ``bnjax.BatchNorm``). Both variants run the same data-parallel
train step (``make_train_step(data_parallel=True)``: ``jax.pmap`` over 8 CPU devices, gradients
averaged with ``pmean``); they differ only in the model's BN layers: ``axis_name="batch"``
(synchronized: one all-gather per layer forward, one all-reduce per layer backward) or
``axis_name=None`` (each device normalizes with its own 16 examples). Both are compiled first,
warmed up, then timed in one loop, interleaved (alternating which goes first), for ``--steps``
steps each; the table gives median and quartiles, the ratio is sync median over local median.
The 8 devices are forced with ``--xla_force_host_platform_device_count=8`` and share the host's
cores, so the figure is the cost of the collectives on a CPU, not on accelerators.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from bnjax import training  # noqa: E402
from bnjax.models import create_model  # noqa: E402


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def _quantiles(ts: list[float]) -> dict[str, float]:
    q = np.percentile(ts, [25, 50, 75])
    return {"median_ms": 1e3 * float(q[1]), "p25_ms": 1e3 * float(q[0]),
            "p75_ms": 1e3 * float(q[2]), "min_ms": 1e3 * min(ts), "n": len(ts)}


def _make(axis_name: str | None, x: np.ndarray, seed: int) -> tuple[Any, Any]:
    model = create_model("cnn1d", num_classes=10, axis_name=axis_name)
    v = model.init(jax.random.key(seed), x[0, :2], training=False)
    state = training.TrainState.create(apply_fn=model.apply, params=v["params"],
                                       batch_stats=v["batch_stats"], tx=optax.sgd(0.01))
    return training.replicate(state), training.make_train_step(data_parallel=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, prints the table, writes JSON; returns the results."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per-device", type=int, default=16, help="examples per device")
    p.add_argument("--length", type=int, default=40, help="MNIST-1D sequence length")
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant (>= 20)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/sync_bench.json", help="JSON output path")
    p.add_argument("--quick", action="store_true", help="smoke test: 3 steps, meaningless")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 3, 1
    elif args.steps < 20:
        p.error(f"--steps={args.steps} must be >= 20 (medians of fewer runs are too noisy)")

    n = jax.local_device_count()
    rng = np.random.default_rng(args.seed)
    x = rng.normal(size=(n, args.per_device, args.length)).astype(np.float32)
    y = rng.integers(0, 10, size=(n, args.per_device)).astype(np.int32)
    batch = {"x": x, "y": y}
    variants = {"sync": _make("batch", x, args.seed), "local": _make(None, x, args.seed)}
    states = {k: s for k, (s, _) in variants.items()}
    times: dict[str, list[float]] = {k: [] for k in variants}

    def run(name: str) -> float:
        step = variants[name][1]
        t0 = time.perf_counter()
        states[name], m = step(states[name], batch)
        jax.block_until_ready((states[name], m))
        return time.perf_counter() - t0

    for name in variants:  # compile
        run(name)
    for _ in range(args.warmup):
        for name in variants:
            run(name)
    order = list(variants)
    for i in range(args.steps):
        for name in (order if i % 2 == 0 else order[::-1]):
            times[name].append(run(name))

    stats = {k: _quantiles(v) for k, v in times.items()}
    ratio = stats["sync"]["median_ms"] / stats["local"]["median_ms"]
    result = {
        "benchmark": "sync_bench",
        "model": "cnn1d (4 conv + 1 dense, 5 bnjax.BatchNorm)",
        "devices": n,
        "per_device_batch": args.per_device,
        "global_batch": n * args.per_device,
        "length": args.length,
        "steps": args.steps,
        "warmup": args.warmup,
        "quick": args.quick,
        "results": stats,
        "ratio_sync_over_local": ratio,
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "python": sys.version.split()[0],
                    "jax": jax.__version__, "platform": platform.platform()},
        "command": " ".join([os.path.basename(sys.executable), "benchmarks/sync_bench.py"]
                            + (argv if argv is not None else sys.argv[1:])),
    }
    print(f"cnn1d train step, {n} CPU devices x {args.per_device} examples, "
          f"{args.steps} steps each, interleaved ({result['machine']['cpu']}, "
          f"{result['machine']['cores']} cores)")
    print(f"{'variant':<8} {'median ms':>10} {'p25 ms':>8} {'p75 ms':>8} {'min ms':>8}")
    for k, s in stats.items():
        print(f"{k:<8} {s['median_ms']:>10.2f} {s['p25_ms']:>8.2f} {s['p75_ms']:>8.2f} "
              f"{s['min_ms']:>8.2f}")
    print(f"ratio sync / local (medians): {ratio:.3f}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
