"""Op-level benchmark: one batch-norm layer, bnjax against Flax and the memory floor.

Passes timed for each NHWC shape and dtype:

- ``train_fwd``: training-mode forward, ``x -> (y, new moving statistics)``;
- ``train_fwd_bwd``: that forward and its backward for a given ``dy``: ``y``, ``dx``, the
  gradients of scale and bias, and the new moving statistics;
- ``infer_fwd``: inference-mode forward with the moving statistics.

Implementations: ``bnjax`` (``bnjax.BatchNorm``), ``flax.linen`` (``flax.linen.BatchNorm``),
``flax.nnx`` (``flax.nnx.BatchNorm``), all with momentum 0.99, epsilon 1e-3 and output in the
input's dtype (Flax's ``dtype=`` set to it, since Flax would otherwise promote a bfloat16 input
to a float32 output), and ``floor``: an elementwise pass that moves exactly the minimal bytes
of the pass, from distinct buffers so that XLA cannot merge the reads.

Minimal bytes, with ``N`` the size of ``x`` in bytes: the forward reads ``x`` twice (statistics,
then normalization) and writes ``y`` (3N); the backward reads ``x`` and ``dy`` twice (the two
reductions, then ``dx``) and writes ``dx`` (5N), so forward+backward is 8N; the inference
forward reads ``x`` and writes ``y`` (2N). GB/s is those bytes over the median time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

import bnjax
from benchmarks.common import compile_fn, median_times, peak_memory

__all__ = ["DTYPES", "IMPLS", "MODES", "PASSES", "QUICK_SHAPES", "SHAPES", "run"]

#: NHWC shapes of the full run.
SHAPES: tuple[tuple[int, ...], ...] = ((128, 32, 32, 64), (256, 14, 14, 256), (32, 56, 56, 64))
#: Shapes of ``--quick`` (a smoke test only).
QUICK_SHAPES: tuple[tuple[int, ...], ...] = ((8, 8, 8, 16),)
DTYPES: tuple[str, ...] = ("float32", "bfloat16")
MODES: tuple[str, ...] = ("train_fwd", "train_fwd_bwd", "infer_fwd")
IMPLS: tuple[str, ...] = ("bnjax", "flax.linen", "flax.nnx", "floor")
#: Array-sized memory passes (reads + writes of an array of x's size) a pass needs at least.
PASSES: dict[str, int] = {"train_fwd": 3, "train_fwd_bwd": 8, "infer_fwd": 2}

MOMENTUM, EPSILON = 0.99, 1e-3

# An implementation: (params, stats, apply_train(params, stats, x) -> (y, new_stats),
#                     apply_infer(params, stats, x) -> y)
Impl = tuple[Any, Any, Callable[..., Any], Callable[..., Any]]


def _bnjax_impl(x: jax.Array) -> Impl:
    bn = bnjax.BatchNorm(momentum=MOMENTUM, epsilon=EPSILON)
    v = bn.init(jax.random.key(0), x, training=False)

    def train(p: Any, s: Any, x: jax.Array) -> Any:
        y, upd = bn.apply({"params": p, "batch_stats": s}, x, training=True,
                          mutable=["batch_stats"])
        return y, upd["batch_stats"]

    def infer(p: Any, s: Any, x: jax.Array) -> Any:
        return bn.apply({"params": p, "batch_stats": s}, x, training=False)

    return v["params"], v["batch_stats"], train, infer


def _linen_impl(x: jax.Array) -> Impl:
    bn = nn.BatchNorm(momentum=MOMENTUM, epsilon=EPSILON, dtype=x.dtype)
    v = bn.init(jax.random.key(0), x, use_running_average=True)

    def train(p: Any, s: Any, x: jax.Array) -> Any:
        y, upd = bn.apply({"params": p, "batch_stats": s}, x, use_running_average=False,
                          mutable=["batch_stats"])
        return y, upd["batch_stats"]

    def infer(p: Any, s: Any, x: jax.Array) -> Any:
        return bn.apply({"params": p, "batch_stats": s}, x, use_running_average=True)

    return v["params"], v["batch_stats"], train, infer


def _nnx_impl(x: jax.Array) -> Impl:
    bn = nnx.BatchNorm(x.shape[-1], momentum=MOMENTUM, epsilon=EPSILON, dtype=x.dtype,
                       rngs=nnx.Rngs(0))
    graphdef, params, stats = nnx.split(bn, nnx.Param, nnx.BatchStat)

    def train(p: Any, s: Any, x: jax.Array) -> Any:
        m = nnx.merge(graphdef, p, s)
        y = m(x, use_running_average=False)
        return y, nnx.state(m, nnx.BatchStat)

    def infer(p: Any, s: Any, x: jax.Array) -> Any:
        return nnx.merge(graphdef, p, s)(x, use_running_average=True)

    return params, stats, train, infer


_IMPLS: dict[str, Callable[[jax.Array], Impl]] = {
    "bnjax": _bnjax_impl, "flax.linen": _linen_impl, "flax.nnx": _nnx_impl,
}


def _bn_pass(impl: Impl, mode: str, x: jax.Array, dy: jax.Array) -> tuple[Callable, tuple]:
    params, stats, train, infer = impl
    if mode == "train_fwd":
        return train, (params, stats, x)
    if mode == "infer_fwd":
        return infer, (params, stats, x)

    def fwd_bwd(p: Any, s: Any, x: jax.Array, dy: jax.Array) -> Any:
        # The statistics go through vjp too (their cotangent is dropped): flax.nnx rebuilds
        # its module from them inside the differentiated function.
        y, vjp, new_stats = jax.vjp(lambda x, p, s: train(p, s, x), x, p, s, has_aux=True)
        dx, dp, _ = vjp(dy)
        return y, dx, dp, new_stats

    return fwd_bwd, (params, stats, x, dy)


def _floor_pass(mode: str, x: jax.Array) -> tuple[Callable, tuple]:
    """An elementwise pass over distinct buffers moving ``PASSES[mode]`` arrays of x's size."""
    dt = x.dtype
    c = x.shape[-1]
    a = jnp.linspace(0.5, 1.5, c, dtype=jnp.float32)
    b = jnp.linspace(-1.0, 1.0, c, dtype=jnp.float32)
    f32 = jnp.float32

    def axpb(u: jax.Array, v: jax.Array) -> jax.Array:
        return u.astype(f32) * a + v.astype(f32) * b

    if mode == "infer_fwd":  # read 1, write 1
        return (lambda x1, a, b: (x1.astype(f32) * a + b).astype(dt)), (x, a, b)
    copies = [jnp.array(x, copy=True) for _ in range(6)]
    if mode == "train_fwd":  # read 2, write 1
        return (lambda x1, x2: axpb(x1, x2).astype(dt)), tuple(copies[:2])

    def fwd_bwd(x1: jax.Array, x2: jax.Array, x3: jax.Array, x4: jax.Array,
                d1: jax.Array, d2: jax.Array) -> Any:  # read 6, write 2
        return axpb(x1, x2).astype(dt), (axpb(x3, x4) + axpb(d1, d2)).astype(dt)

    return fwd_bwd, tuple(copies)


def _inputs(shape: Sequence[int], dtype: str) -> tuple[jax.Array, jax.Array]:
    kx, kd = jax.random.split(jax.random.key(0))
    x = (jax.random.normal(kx, shape, jnp.float32) * 2.0 + 1.0).astype(dtype)
    dy = jax.random.normal(kd, shape, jnp.float32).astype(dtype)
    return x, dy


def run(
    shapes: Sequence[Sequence[int]] = SHAPES,
    dtypes: Sequence[str] = DTYPES,
    *,
    reps: int = 20,
    warmup: int = 2,
    log: Callable[[str], None] = print,
) -> dict[str, list[dict[str, Any]]]:
    """Times every pass, implementation, shape and dtype; measures peak memory.

    Args:
      shapes: NHWC input shapes.
      dtypes: input dtype names.
      reps: timed rounds per row (the figure is the median).
      warmup: untimed calls first.
      log: progress printer.

    Returns:
      ``{"op": [row, ...], "memory": [row, ...]}``: per (shape, dtype, mode, impl) the timing
      summary, ``bytes``, ``gbps`` and ``ratio_to_flax`` (median over flax.linen's median);
      per (shape, dtype, impl) the peak memory of the compiled forward+backward.

    Example:
      >>> PASSES["train_fwd_bwd"], IMPLS
      (8, ('bnjax', 'flax.linen', 'flax.nnx', 'floor'))
      >>> res = run([(2, 2, 2, 4)], ["float32"], reps=2, log=print)  # doctest: +SKIP
    """
    op_rows: list[dict[str, Any]] = []
    mem_rows: list[dict[str, Any]] = []
    for shape in shapes:
        shape = tuple(int(s) for s in shape)
        for dtype in dtypes:
            x, dy = _inputs(shape, dtype)
            impls = {name: make(x) for name, make in _IMPLS.items()}
            nbytes = x.size * x.dtype.itemsize
            for mode in MODES:
                calls = {}
                for name in IMPLS:
                    fn, args = (_floor_pass(mode, x) if name == "floor"
                                else _bn_pass(impls[name], mode, x, dy))
                    compiled = compile_fn(fn, *args)
                    calls[name] = (lambda c=compiled, a=args: c(*a))
                    if mode == "train_fwd_bwd" and name != "floor":
                        mem_rows.append({"shape": list(shape), "dtype": dtype, "impl": name,
                                         **peak_memory(compiled)})
                times = median_times(calls, reps=reps, warmup=warmup)
                flax_ms = times["flax.linen"]["median_ms"]
                moved = PASSES[mode] * nbytes
                for name in IMPLS:
                    t = times[name]
                    op_rows.append({
                        "shape": list(shape), "dtype": dtype, "mode": mode, "impl": name, **t,
                        "bytes": moved, "gbps": moved / (t["median_ms"] * 1e-3) / 1e9,
                        "ratio_to_flax": t["median_ms"] / flax_ms,
                    })
                log(f"  {shape} {dtype} {mode}: " + ", ".join(
                    f"{n} {times[n]['median_ms']:.2f} ms" for n in IMPLS))
            flax_peak = next(r["peak_bytes"] for r in mem_rows
                             if r["shape"] == list(shape) and r["dtype"] == dtype
                             and r["impl"] == "flax.linen")
            for r in mem_rows:
                if r["shape"] == list(shape) and r["dtype"] == dtype:
                    r["ratio_to_flax"] = r["peak_bytes"] / flax_peak
    return {"op": op_rows, "memory": mem_rows}
