"""Model-level benchmark: train steps of ResNet-20 and the default MNIST-1D net, and inference.

Timed by ``bnjax.timing.compare``, the timer of ``bnjax-bench``: the jitted
``bnjax.make_train_step()`` (forward, backward and the SGD-with-momentum update, softmax
cross-entropy, the non-finite guard) on two models of the zoo, ``resnet20`` (CIFAR shapes,
batch 128) and ``cnn1d`` (the default config's MNIST-1D net, batch 100), each built with
Flax's own layer (``norm="flax"``: ``flax.linen.BatchNorm`` with momentum 0.99 and epsilon
1e-3, :class:`bnjax_train.models.FlaxBatchNorm`) and run three ways: as built (``flax BN``),
with its batch norms swapped for bnjax's (``bnjax.replacing_flax_batch_norm``: ``bnjax BN``)
and removed (``bnjax.without_flax_batch_norm``: ``no norm``); in float32 and with bfloat16
compute (float32 master parameters and moving statistics, the forward and backward in
bfloat16). Each row gives the cost of batch norm over no normalization, in percent of the
no-norm step. Inference (float32, ResNet-20): the jitted ``bnjax.make_eval_step()`` of the
same three, and of the model with its batch norms folded into the convolutions by
``bnjax.fold_batch_norm``, interleaved with them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optax

import bnjax
from benchmarks.common import init_variables
from bnjax.timing import NORMS, compare
from bnjax_train import models

__all__ = ["MODELS", "NORMS", "run"]

#: The models of the train-step table: (zoo name, input shape without the batch, batch).
MODELS: dict[str, tuple[tuple[int, ...], int]] = {"resnet20": ((32, 32, 3), 128),
                                                  "cnn1d": ((40,), 100)}


def _zoo(name: str, batch: int, blocks: int) -> tuple[Any, dict[str, np.ndarray]]:
    """The zoo model with Flax's batch norm, and a batch of random inputs and labels."""
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(batch, *MODELS[name][0])).astype(np.float32),
            "y": rng.integers(0, 10, size=batch)}
    kw = {"blocks_per_stage": blocks} if name == "resnet20" else {}
    return models.create_model(name, num_classes=10, norm="flax", **kw), data


def _folded(model: Any, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """The compiled eval step of ``model`` with its batch norms folded, as an extra variant.

    A failure raises: a results file never holds a failed row (tests/test_rendered_tables.py).
    """
    folded, fv = bnjax.fold_batch_norm(model, init_variables(model, batch["x"]), batch["x"])
    state = bnjax.TrainState.create(
        apply_fn=lambda v, x, training: folded.apply(v, x, training=training),
        params=fv.get("params", {}), batch_stats=fv.get("batch_stats", {}), tx=optax.sgd(0.1))
    step = bnjax.make_eval_step().lower(state, batch).compile()
    return {"bnjax BN folded": (functools.partial(step, state, batch), step)}


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
      batch: examples per ResNet step (CIFAR images 32x32x3, 10 classes).
      blocks_per_stage: 3 is ResNet-20; ``--quick`` uses 0 (stem, head) to compile fast.
      reps: timed rounds (the figure is the median).
      warmup: untimed calls first.
      log: progress printer.
      models_: the models of the train-step table (names of :data:`MODELS`).
      infer: also time ResNet inference (and the folded model).

    Returns:
      The rows of ``bnjax.timing.compare`` (``"step"`` is ``"train"`` or ``"eval"``), the
      folded model's eval row among them.

    Example:
      >>> NORMS
      ('bnjax BN', 'flax BN', 'no norm')
      >>> rows = run(batch=2, blocks_per_stage=0, reps=1, log=print)  # doctest: +SKIP
    """
    label = {"resnet20": f"resnet{6 * blocks_per_stage + 2}", "cnn1d": "cnn1d"}
    rows: list[dict[str, Any]] = []
    for name in models_:
        model, data = _zoo(name, batch if name == "resnet20" else MODELS[name][1],
                           blocks_per_stage)
        rows += compare(model, data, name=label[name], mode="training", steps=("train",),
                        reps=reps, warmup=warmup, log=log)
    if not infer:
        return rows
    model, data = _zoo("resnet20", batch, blocks_per_stage)
    rows += compare(model, data, name=label["resnet20"], mode="training", steps=("eval",),
                    dtypes=("float32",), reps=reps, warmup=warmup,
                    extra_eval=_folded(model, data), log=log)
    return rows
