"""Model-level benchmark: train steps of ResNet-20 and the default MNIST-1D net, and inference.

Train step: ``bnjax.make_train_step()`` (jitted; forward, backward and the SGD-with-momentum
update, softmax cross-entropy, the non-finite guard) on two models of the zoo,
``resnet20`` (CIFAR shapes, batch 128) and ``cnn1d`` (the default config's MNIST-1D net, batch
100), each built three ways: ``bnjax`` batch norm, Flax's ``flax.linen.BatchNorm`` in the same
places (same momentum 0.99 and epsilon 1e-3), and no normalization; in float32 and with
bfloat16 compute (float32 master parameters and moving statistics, the forward and backward
in bfloat16: the parameters and the input are cast inside the step). Each row gives the
cost of batch norm over no normalization, in percent of the no-norm step. Inference (float32,
ResNet-20): the jitted ``apply`` with ``training=False`` for the same three models, and the
bnjax model with its batch norms folded into the convolutions by ``bnjax.fold_batch_norm``.

The Flax variant swaps the model zoo's norm factory (``bnjax_train.models.make_norm``) for one
that returns ``flax.linen.BatchNorm`` while the model is built, initialized and traced;
nothing else changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import bnjax
from benchmarks.common import compile_fn, init_variables, median_times, peak_memory
from bnjax_train import models

__all__ = ["MODELS", "NORMS", "run"]

#: Normalization variants of the model table, in print order.
NORMS: tuple[str, ...] = ("bnjax BN", "flax BN", "no norm")


class _FlaxBatchNorm(nn.Module):
    """``flax.linen.BatchNorm`` behind the model zoo's ``norm(x, training=...)`` call."""

    axis_name: str | None = None
    scale_init: Callable[..., Any] = nn.initializers.ones

    @nn.compact
    def __call__(self, x: jax.Array, training: bool | None = None) -> jax.Array:
        """Normalizes ``x`` with Flax's batch norm (batch statistics when ``training``).

        The output keeps the input's dtype, as bnjax's does (Flax would promote a bfloat16
        input to float32 with float32 parameters).
        """
        return nn.BatchNorm(use_running_average=not training, momentum=0.99, epsilon=1e-3,
                            axis_name=self.axis_name, scale_init=self.scale_init,
                            dtype=x.dtype)(x)


@contextlib.contextmanager
def _flax_norm() -> Iterator[None]:
    """While active, the model zoo's ``"batch"`` norm is ``flax.linen.BatchNorm``."""
    original = models.make_norm

    def make_norm(norm: str, *, axis_name: str | None = None, **kw: Any) -> nn.Module:
        if norm != "batch":
            return original(norm, axis_name=axis_name, **kw)
        return _FlaxBatchNorm(axis_name=axis_name,
                              scale_init=kw.get("scale_init", nn.initializers.ones),
                              name=kw.get("name"))

    models.make_norm = make_norm
    try:
        yield
    finally:
        models.make_norm = original


#: The models of the train-step table: (zoo name, input shape without the batch, batch).
MODELS: dict[str, tuple[tuple[int, ...], int]] = {"resnet20": ((32, 32, 3), 128),
                                                  "cnn1d": ((40,), 100)}


def _compute_in(dtype: Any, apply_fn: Callable[..., Any]) -> Callable[..., Any]:
    """``apply_fn`` with its float parameters and input cast to ``dtype`` (mixed precision).

    The moving statistics stay float32; the logits come back in float32 for the loss.
    """
    if dtype == jnp.float32:
        return apply_fn

    def cast(tree: Any) -> Any:
        return jax.tree.map(lambda a: a.astype(dtype) if a.dtype == jnp.float32 else a, tree)

    def apply(variables: Any, x: jax.Array, *args: Any, **kwargs: Any) -> Any:
        variables = {**variables, "params": cast(variables["params"])}
        out = apply_fn(variables, x.astype(dtype), *args, **kwargs)
        if isinstance(out, tuple):
            return (out[0].astype(jnp.float32), *out[1:])
        return out.astype(jnp.float32)

    return apply


def _build(variant: str, name: str, batch: int, blocks: int, dtype: Any = jnp.float32,
           infer: bool = False) -> dict[str, Any]:
    """Model, variables, compiled train (and eval) steps for one normalization variant."""
    norm = "none" if variant == "no norm" else "batch"
    ctx = _flax_norm() if variant == "flax BN" else contextlib.nullcontext()
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (batch, *MODELS[name][0]), jnp.float32)
    y = jax.random.randint(ky, (batch,), 0, 10)
    kw = {"blocks_per_stage": blocks} if name == "resnet20" else {}
    with ctx:
        model = models.create_model(name, num_classes=10, norm=norm, **kw)
        variables = init_variables(model, x)
        state = bnjax.TrainState.create(
            apply_fn=_compute_in(dtype, model.apply), params=variables["params"],
            batch_stats=variables.get("batch_stats", {}), tx=optax.sgd(0.1, momentum=0.9))
        batch_ = {"x": x, "y": y}
        step = bnjax.make_train_step().lower(state, batch_).compile()
        fn = None
        if infer:
            fn = compile_fn(lambda v, x: model.apply(v, x, training=False), variables, x)
    return {"model": model, "variables": variables, "x": x, "state": state, "batch": batch_,
            "step": step, "infer": fn}


def _fold(built: dict[str, Any]) -> tuple[Any, str]:
    """Compiled folded inference of the bnjax model, or (None, why not)."""
    fold = getattr(bnjax, "fold_batch_norm", None)
    if fold is None:
        return None, "not available: bnjax.fold_batch_norm has not landed"
    try:
        folded, fv = fold(built["model"], built["variables"], built["x"])
        fn = compile_fn(lambda v, x: folded.apply(v, x, training=False), fv, built["x"])
    except Exception as e:  # report, do not abort the other tables
        return None, f"failed: {type(e).__name__}: {e}"
    return (fn, fv), ""


def _train_rows(name: str, batch: int, blocks: int, dtype: Any, reps: int, warmup: int,
                log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Times one model's train step for every variant (interleaved) in one dtype."""
    built = {v: _build(v, name, batch, blocks, dtype) for v in NORMS}
    calls = {v: (lambda b=b: b["step"](b["state"], b["batch"])) for v, b in built.items()}
    times = median_times(calls, reps=reps, warmup=warmup)
    label = f"resnet{6 * blocks + 2}" if name == "resnet20" else name
    dname = jnp.dtype(dtype).name
    none_ms = times["no norm"]["median_ms"]
    log(f"  {label} train ({dname}): " + ", ".join(
        f"{v} {times[v]['median_ms']:.1f} ms" for v in NORMS))
    return [{"model": label, "batch": batch, "dtype": dname, "step": "train", "variant": v,
             **times[v], "ratio_to_flax": times[v]["median_ms"] / times["flax BN"]["median_ms"],
             "bn_cost_pct": None if v == "no norm" else
             100.0 * (times[v]["median_ms"] - none_ms) / none_ms,
             "peak_bytes": peak_memory(built[v]["step"])["peak_bytes"], "available": True,
             "note": ""} for v in NORMS]


def run(
    *,
    batch: int = 128,
    blocks_per_stage: int = 3,
    reps: int = 20,
    warmup: int = 2,
    log: Callable[[str], None] = print,
    models_: Sequence[str] = tuple(MODELS),
    infer: bool = True,
) -> list[dict[str, Any]]:
    """Times the train steps (both models, both dtypes) and inference for every variant.

    Args:
      batch: examples per step (CIFAR images 32x32x3, 10 classes).
      blocks_per_stage: 3 is ResNet-20; ``--quick`` uses 0 (stem, head) to compile fast.
      reps: timed rounds (the figure is the median).
      warmup: untimed calls first.
      log: progress printer.
      models_: the models of the train-step table (names of :data:`MODELS`).
      infer: also time ResNet inference (and the folded model).

    Returns:
      Rows ``{"model", "batch", "dtype", "step": "train"|"eval", "variant", "median_ms", ...,
      "ratio_to_flax", "bn_cost_pct", "peak_bytes", "available", "note"}``;
      ``ratio_to_flax`` is over the flax BN row of the same step, ``bn_cost_pct`` the extra
      time over the no-norm row in percent.

    Example:
      >>> NORMS
      ('bnjax BN', 'flax BN', 'no norm')
      >>> rows = run(batch=2, blocks_per_stage=0, reps=1, log=print)  # doctest: +SKIP
    """
    rows: list[dict[str, Any]] = []
    for name in models_:
        for dtype in (jnp.float32, jnp.bfloat16):
            rows += _train_rows(name, batch if name == "resnet20" else MODELS[name][1],
                                blocks_per_stage, dtype, reps, warmup, log)
    if not infer:
        return rows
    built = {v: _build(v, "resnet20", batch, blocks_per_stage, infer=True) for v in NORMS}
    folded, why = _fold(built["bnjax BN"])
    common = {"model": f"resnet{6 * blocks_per_stage + 2}", "batch": batch, "dtype": "float32"}
    eval_calls = {v: (lambda b=b: b["infer"](b["variables"], b["x"])) for v, b in built.items()}
    if folded is not None:
        fn, fv = folded
        x = built["bnjax BN"]["x"]
        eval_calls["bnjax BN folded"] = lambda: fn(fv, x)
    peaks = {v: peak_memory(b["infer"])["peak_bytes"] for v, b in built.items()}
    if folded is not None:
        peaks["bnjax BN folded"] = peak_memory(folded[0])["peak_bytes"]
    times = median_times(eval_calls, reps=reps, warmup=warmup)
    for v in (*NORMS, "bnjax BN folded"):
        if v in times:
            rows.append({**common, "step": "eval", "variant": v, **times[v],
                         "ratio_to_flax": times[v]["median_ms"] / times["flax BN"]["median_ms"],
                         "bn_cost_pct": None, "peak_bytes": peaks[v], "available": True,
                         "note": ""})
        else:
            rows.append({**common, "step": "eval", "variant": v, "median_ms": None,
                         "ratio_to_flax": None, "bn_cost_pct": None, "peak_bytes": None,
                         "available": False, "note": why})
    log("  eval: " + ", ".join(f"{v} {times[v]['median_ms']:.1f} ms" for v in times))
    return rows
