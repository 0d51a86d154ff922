"""A Flax model and its port to bnjax, trained side by side: float32 drift, the float64 check.

Command (from the repository root)::

    python -m benchmarks port --out benchmarks/results/port_drift.json

The model is a conv block like the porting page's (conv, batch norm, relu, strided conv, batch
norm, relu, mean, dense), written with ``flax.linen.BatchNorm(momentum=0.9, epsilon=1e-5)`` and
with that text replaced by ``bnjax.BatchNorm``. Both start from the same variables and take the
same SGD steps on the same batches (inputs of mean 2 and standard deviation 1, random labels),
once in float32 and once in float64 (``jax_enable_x64``, set by this benchmark's process). At
each recorded step it takes the largest absolute difference, over every parameter and moving
statistic, between each float32 run and its float64 run (the rounding drift of each), between
the two float32 runs (what comparing them in float32 shows), and between the two float64 runs
(the port's check: the same arithmetic, equal to float64 rounding).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["RECORD_STEPS", "SEEDS", "run"]

#: The steps at which the runs are compared, and the seeds (data and initial variables).
RECORD_STEPS = (1, 10, 100, 300, 1000)
SEEDS = (0, 1, 2)
_LR, _BATCH, _POOL = 0.05, 32, 16


def _block(norm: Any) -> Any:
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x: Any, train: bool) -> Any:
            bn = functools.partial(norm, use_running_average=not train, momentum=0.9,
                                   epsilon=1e-5)
            x = nn.relu(bn()(nn.Conv(8, (3, 3), use_bias=False)(x)))
            x = nn.relu(bn()(nn.Conv(8, (3, 3), strides=2)(x)))
            return nn.Dense(10)(x.mean((1, 2)))

    return Block()


@functools.cache
def _step(norm: Any) -> Any:
    """The jitted SGD step of the block with ``norm`` (compiled once per dtype)."""
    import jax
    import optax

    model = _block(norm)

    def loss_fn(p: Any, s: Any, x: Any, y: Any) -> Any:
        logits, upd = model.apply({"params": p, "batch_stats": s}, x, True,
                                  mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

    @jax.jit
    def step(p: Any, s: Any, x: Any, y: Any) -> Any:
        (_, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(p, s, x, y)
        return jax.tree.map(lambda a, b: a - _LR * b, p, g), upd["batch_stats"]

    return step


def _train(norm: Any, variables: Any, batches: Sequence[Any], dtype: Any,
           record: Sequence[int]) -> dict[int, list[np.ndarray]]:
    """SGD from ``variables`` in ``dtype``; every leaf (float64) at each step of ``record``."""
    import jax
    import jax.numpy as jnp

    step = _step(norm)
    v = jax.tree.map(lambda a: jnp.asarray(a, dtype), variables)
    params, stats = v["params"], v["batch_stats"]
    out = {}
    for k in range(1, max(record) + 1):
        x, y = batches[(k - 1) % len(batches)]
        params, stats = step(params, stats, jnp.asarray(x, dtype), y)
        if k in record:
            out[k] = [np.asarray(a, np.float64) for a in jax.tree.leaves((params, stats))]
    return out


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(max(np.max(np.abs(u - v)) for u, v in zip(a, b, strict=True)))


def _compare(seed: int, record: Sequence[int]) -> list[dict[str, Any]]:
    """The four runs of one seed, compared at each step of ``record``."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    import bnjax

    rng = np.random.default_rng(seed)
    batches = [(rng.normal(2.0, 1.0, (_BATCH, 8, 8, 3)), rng.integers(0, 10, _BATCH))
               for _ in range(_POOL)]
    variables = _block(nn.BatchNorm).init(jax.random.key(seed),
                                          jnp.asarray(batches[0][0], jnp.float32), False)
    runs = {(name, bits): _train(norm, variables, batches, dtype, record)
            for name, norm in (("flax", nn.BatchNorm), ("bnjax", bnjax.BatchNorm))
            for bits, dtype in (("f32", jnp.float32), ("f64", jnp.float64))}
    pairs = {"flax_f32_vs_f64": (("flax", "f32"), ("flax", "f64")),
             "bnjax_f32_vs_f64": (("bnjax", "f32"), ("bnjax", "f64")),
             "bnjax_vs_flax_f32": (("bnjax", "f32"), ("flax", "f32")),
             "bnjax_vs_flax_f64": (("bnjax", "f64"), ("flax", "f64"))}
    return [{"seed": seed, "step": k,
             **{key: _max_diff(runs[a][k], runs[b][k]) for key, (a, b) in pairs.items()}}
            for k in record]


def run(record: Sequence[int] = RECORD_STEPS, seeds: Sequence[int] = SEEDS) -> dict[str, Any]:
    """Trains the four runs for each seed and compares them at the steps of ``record``.

    Returns:
      ``{"rows": [{"seed", "step", "flax_f32_vs_f64", "bnjax_f32_vs_f64",
      "bnjax_vs_flax_f32", "bnjax_vs_flax_f64"}, ...], "setup": str}``: the largest absolute
      difference over every parameter and moving statistic, per seed and step.

    Example:
      >>> r = run(record=(1, 2), seeds=(0,))  # doctest: +SKIP
      >>> r["rows"][-1]["bnjax_vs_flax_f64"] < 1e-12  # doctest: +SKIP
      True
    """
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    if jnp.zeros(1, jnp.float64).dtype != jnp.float64:
        raise RuntimeError("the float64 runs need jax_enable_x64, which did not take effect")
    rows = [row for seed in seeds for row in _compare(seed, record)]
    setup = (f"a conv block (conv, batch norm, relu, strided conv, batch norm, relu, mean, "
             f"dense; batch norm momentum 0.9, epsilon 1e-5), "
             f"SGD with learning rate {_LR}, batches of {_BATCH} 8x8x3 inputs of mean 2 and "
             f"standard deviation 1 and random labels ({_POOL} batches in turn)")
    return {"rows": rows, "setup": setup, "seeds": list(seeds), "steps": list(record)}
