"""The optimizer of a training config: optax, its learning-rate schedule and weight decay."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax

__all__ = ["make_optimizer"]


def make_optimizer(config: Any, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optax optimizer a config asks for, with its learning-rate schedule.

    Weight decay applies to kernels only (no decay of biases and norm parameters): decoupled
    for ``"adamw"``, added to the gradient for the others.

    Example:
      >>> from bnjax_train.config_lib import load_config
      >>> isinstance(make_optimizer(load_config("tiny"), 4), optax.GradientTransformation)
      True
    """
    total = config.num_epochs * steps_per_epoch
    warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total - 1)
    lr = float(config.learning_rate)
    if config.schedule == "constant":
        schedule = optax.constant_schedule(lr)
        if warmup > 0:
            schedule = optax.join_schedules(
                [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    elif config.schedule == "cosine" or warmup <= 0:
        schedule = optax.cosine_decay_schedule(lr, total)
    else:
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total)

    def decay_mask(params: Any) -> Any:  # kernels only: no decay of biases and norm params
        return jax.tree.map(lambda p: np.ndim(p) > 1, params)

    wd = float(config.weight_decay)
    if config.optimizer == "adamw":
        return optax.adamw(schedule, weight_decay=wd, mask=decay_mask)
    base = {
        "adam": lambda: optax.adam(schedule),
        "sgd": lambda: optax.sgd(schedule),
        "momentum": lambda: optax.sgd(schedule, momentum=float(config.momentum)),
    }[config.optimizer]()
    if wd:
        return optax.chain(optax.add_decayed_weights(wd, mask=decay_mask), base)
    return base
