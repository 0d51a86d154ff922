"""Train-step time of synchronized batch norm on 8 CPU devices: sync vs local, mesh vs pmap.

Commands (from the repository root)::

    python -m benchmarks sync                 # pmap: cnn1d, 8 x 16 examples, 30 steps
    python -m benchmarks sync --steps 40 --out benchmarks/results/sync_bench.json
    python -m benchmarks parallel             # mesh (jit, shard_map) and pmap, sync and local
    python -m benchmarks sync --quick         # smoke test: tiny net, few steps, meaningless

The model is the project's default MNIST-1D conv net (``create_model("cnn1d")``: 4 conv + 1
dense layer, each followed by ``bnjax.BatchNorm``), 16 examples of length 40 per device.

``sync`` runs the data-parallel train step of ``bnjax.make_train_step(data_parallel=True)``
(``jax.pmap`` over 8 CPU devices, gradients averaged with ``pmean``) with the model's BN layers
``axis_name="batch"`` (synchronized: one all-gather per layer forward, one all-reduce per layer
backward) or ``axis_name=None`` (each device normalizes with its own 16 examples).

``parallel`` times the same train step in every way bnjax runs it on the 8 devices: on a
device mesh under plain ``jax.jit`` (``make_train_step(mesh=...)``; BN layers without
``axis_name``, XLA makes the statistics global), on the mesh under ``jax.shard_map``
(``shard_map=True``) with synchronized or per-device BN, and under ``jax.pmap`` with
synchronized or per-device BN. The state and the batch are placed on the devices once, so only
the step is timed.

Every variant is compiled first, warmed up, then timed in one loop, interleaved (the order
rotates from one round to the next), for ``--steps`` steps each, by the timer every bnjax
timing shares (``bnjax.benchmark.median_times``); the tables give median and quartiles. The
8 devices are forced with ``--xla_force_host_platform_device_count=8`` (set by ``python -m
benchmarks`` before JAX starts) and share the host's cores, so the figures are the cost of
the collectives on a CPU, not on accelerators.

``--quick`` runs every variant on a tiny net (:data:`QUICK_MODEL`: one conv and one dense
layer of 8 channels) with variables drawn by NumPy (``common.init_variables``), so that the
smoke test compiles in seconds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax
from benchmarks.common import init_variables, median_times
from bnjax_train.models import create_model

__all__ = ["PARALLEL_VARIANTS", "QUICK_MODEL", "run", "run_parallel"]

MODEL = "cnn1d (4 conv + 1 dense, 5 bnjax.BatchNorm)"
#: The net of ``--quick``: its description and its ``create_model("cnn1d", ...)`` arguments.
QUICK_MODEL = ("cnn1d, quick: 1 conv + 1 dense of 8 channels, 2 bnjax.BatchNorm",
               {"features": (8,), "pool_after": (), "hidden": 8})
#: The variants of ``python -m benchmarks parallel``: name -> (BN axis_name, step kwargs).
PARALLEL_VARIANTS: dict[str, tuple[str | None, str]] = {
    "mesh, jax.jit (global BN)": (None, "mesh"),
    "mesh, shard_map, sync BN": ("batch", "shard_map"),
    "mesh, shard_map, per-device BN": (None, "shard_map"),
    "pmap, sync BN": ("batch", "pmap"),
    "pmap, per-device BN": (None, "pmap"),
}


def _state(axis_name: str | None, x: np.ndarray, seed: int, quick: bool) -> bnjax.TrainState:
    if quick:
        model = create_model("cnn1d", num_classes=10, axis_name=axis_name, **QUICK_MODEL[1])
        v = init_variables(model, x[:2])
    else:
        model = create_model("cnn1d", num_classes=10, axis_name=axis_name)
        v = model.init(jax.random.key(seed), x[:2], training=False)
    return bnjax.TrainState.create(apply_fn=model.apply, params=v["params"],
                                   batch_stats=v["batch_stats"], tx=optax.sgd(0.01))


def _advance(variant: list[Any]) -> Any:
    """One train step of a ``[state, step, batch]`` variant; the new state is kept."""
    variant[0], metrics = variant[1](variant[0], variant[2])
    return variant[0], metrics


def _time_interleaved(variants: dict[str, list[Any]], steps: int,
                      warmup: int) -> dict[str, dict[str, float]]:
    """Times ``[state, step, batch]`` variants with ``bnjax.benchmark.median_times``.

    Interleaved, median after warm-up (one more untimed step first: the compilation); each
    step's state is kept, as in training.
    """
    calls = {name: functools.partial(_advance, v) for name, v in variants.items()}
    return median_times(calls, reps=steps, warmup=warmup + 1)


def _data(per_device: int, length: int, seed: int) -> dict[str, np.ndarray]:
    n = jax.local_device_count()
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, per_device, length)).astype(np.float32),
            "y": rng.integers(0, 10, size=(n, per_device)).astype(np.int32)}


def _facts(per_device: int, length: int, steps: int, warmup: int,
           quick: bool) -> dict[str, Any]:
    n = jax.local_device_count()
    return {"model": QUICK_MODEL[0] if quick else MODEL, "devices": n,
            "per_device_batch": per_device, "global_batch": n * per_device, "length": length,
            "steps": steps, "warmup": warmup}


def run(*, per_device: int = 16, length: int = 40, steps: int = 30, warmup: int = 3,
        seed: int = 0, quick: bool = False) -> dict[str, Any]:
    """Times pmap steps with synchronized and local BN, interleaved; the figures as a dict.

    ``quick`` times the tiny net of :data:`QUICK_MODEL` instead (a smoke test).

    Example:
      >>> r = run(per_device=2, steps=1, warmup=0)  # doctest: +SKIP
      >>> sorted(r["results"])  # doctest: +SKIP
      ['local', 'sync']
    """
    batch = _data(per_device, length, seed)
    variants = {name: [bnjax.replicate(_state(axis, batch["x"][0], seed, quick)),
                       bnjax.make_train_step(data_parallel=True), batch]
                for name, axis in (("sync", "batch"), ("local", None))}
    stats = _time_interleaved(variants, steps, warmup)
    return {"benchmark": "sync_bench", **_facts(per_device, length, steps, warmup, quick),
            "results": stats,
            "ratio_sync_over_local": stats["sync"]["median_ms"] / stats["local"]["median_ms"]}


def _placed(kind: str, axis_name: str | None, batch: dict[str, np.ndarray], seed: int,
            mesh: jax.sharding.Mesh, quick: bool) -> list[Any]:
    """``[state, step, batch]`` of one variant, the state and the batch on the devices."""
    state = _state(axis_name, batch["x"][0], seed, quick)
    if kind == "pmap":
        devices = jax.sharding.Mesh(np.array(jax.local_devices()), ("devices",))
        split = NamedSharding(devices, P("devices"))
        return [bnjax.replicate(state), bnjax.make_train_step(data_parallel=True),
                jax.device_put(batch, split)]
    flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}
    step: Callable[..., Any] = bnjax.make_train_step(mesh=mesh, shard_map=kind == "shard_map")
    return [bnjax.put_replicated(state, mesh), step, bnjax.put_batch(flat, mesh)]


def run_parallel(*, per_device: int = 16, length: int = 40, steps: int = 30, warmup: int = 3,
                 seed: int = 0, quick: bool = False) -> dict[str, Any]:
    """Times the train step on a mesh (jit, shard_map) and under pmap, interleaved.

    ``quick`` times the tiny net of :data:`QUICK_MODEL` instead (a smoke test).

    Returns:
      The figures as a dict; ``results`` maps each of :data:`PARALLEL_VARIANTS` to its
      timing summary, ``ratio_to_pmap_sync`` to its median over the synchronized pmap step's.

    Example:
      >>> r = run_parallel(per_device=2, steps=1, warmup=0)  # doctest: +SKIP
      >>> list(r["results"]) == list(PARALLEL_VARIANTS)  # doctest: +SKIP
      True
    """
    batch = _data(per_device, length, seed)
    mesh = jax.make_mesh((jax.device_count(),), ("batch",))
    variants = {name: _placed(kind, axis, batch, seed, mesh, quick)
                for name, (axis, kind) in PARALLEL_VARIANTS.items()}
    stats = _time_interleaved(variants, steps, warmup)
    base = stats["pmap, sync BN"]["median_ms"]
    return {**_facts(per_device, length, steps, warmup, quick), "results": stats,
            "ratio_to_pmap_sync": {k: s["median_ms"] / base for k, s in stats.items()}}
