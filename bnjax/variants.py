"""Variants of batch normalization: batch renormalization and ghost batches.

Batch renormalization (Ioffe, 2017), Keras 3 semantics: the training output is corrected by
``r = sigma_B / renorm_std`` and ``d = (mean_B - renorm_mean) / renorm_std`` (clipped,
gradients stopped), so that it depends less on the particular batch; the extra moving
statistics are created by :func:`init_renorm_stats` and updated by :func:`update_renorm_stats`.
:func:`renorm_schedule` gives the paper's clipping ramps.

Ghost batches (Hoffer et al., 2017): the batch is cut into consecutive groups normalized
separately; :func:`average_ghost_moments` turns their statistics into one moving update.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bnjax.stats import Moments

Array = jax.Array

__all__ = [
    "RENORM_KEYS",
    "average_ghost_moments",
    "guarded",
    "init_renorm_stats",
    "renorm_correction",
    "renorm_schedule",
    "update_renorm_stats",
]

#: The moving statistics batch renormalization keeps besides ``mean`` and ``var``.
RENORM_KEYS = ("std", "renorm_mean", "renorm_std")


def guarded(ok: Array, new: Array, old: Array, guard: bool) -> Array:
    """``new`` where ``ok`` and ``new`` is finite, else ``old`` (just ``new`` without guard).

    The check covers the *new* value too, so a NaN momentum or an overflow in the update
    cannot poison the moving statistics any more than a NaN batch can.

    Example:
      >>> guarded(jnp.array([True, True, False]), jnp.array([1.0, jnp.nan, 3.0]),
      ...         jnp.zeros(3), True).tolist()
      [1.0, 0.0, 0.0]
    """
    if not guard:
        return new.astype(old.dtype)
    return jnp.where(ok & jnp.isfinite(new), new, old).astype(old.dtype)


def init_renorm_stats(stats: Mapping[str, Array]) -> dict[str, Array]:
    """Adds the extra moving statistics batch renormalization keeps, initialized as Keras does.

    ``std`` is the moving standard deviation for inference (``var`` is derived from it after
    every renorm update, ``var = max(std**2 - epsilon, 0)``); ``renorm_mean`` and
    ``renorm_std`` are the moving statistics that the corrections ``r`` and ``d`` are taken
    against, updated with ``renorm_momentum``. Keras starts both standard deviations at
    ``sqrt(var)`` and ``renorm_mean`` at ``mean``.

    Args:
      stats: ``{"mean", "var"}`` moving statistics.

    Returns:
      A new dict with ``mean``, ``var``, ``std``, ``renorm_mean`` and ``renorm_std``.

    Example:
      >>> import jax.numpy as jnp
      >>> s = init_renorm_stats({"mean": jnp.zeros(2), "var": jnp.full(2, 4.0)})
      >>> sorted(s), s["std"].tolist()
      (['mean', 'renorm_mean', 'renorm_std', 'std', 'var'], [2.0, 2.0])
    """
    std = jnp.sqrt(stats["var"])
    return {**stats, "std": std, "renorm_mean": stats["mean"], "renorm_std": std}


def renorm_schedule(
    step: int | Array,
    *,
    rmax: float = 3.0,
    dmax: float = 5.0,
    warmup_steps: int = 5000,
    rmax_steps: int = 40000,
    dmax_steps: int = 25000,
) -> dict[str, Array]:
    """Clipping limits of batch renormalization at a training step, as in Ioffe (2017).

    The paper trains as plain batch norm (``rmax = 1``, ``dmax = 0``) for ``warmup_steps``,
    then relaxes the limits, reaching ``rmax`` at ``rmax_steps`` and ``dmax`` at
    ``dmax_steps`` (3 at 40k and 5 at 25k steps there). The relaxation here is linear;
    ``rmin = 1 / rmax`` throughout. ``step`` may be traced, so the limits can change inside a
    jitted train step; ``bnjax.BatchNorm(renorm=True, renorm_clipping=renorm_schedule)``
    counts the steps itself.

    Args:
      step: number of training steps taken.
      rmax: final upper limit of ``r`` (>= 1).
      dmax: final limit of ``|d|`` (>= 0).
      warmup_steps: steps run as plain batch norm.
      rmax_steps: step at which ``rmax`` is reached (> ``warmup_steps``).
      dmax_steps: step at which ``dmax`` is reached (> ``warmup_steps``).

    Returns:
      ``{"rmin", "rmax", "dmax"}`` as float32 scalars, a ``renorm_clipping`` mapping.

    Example:
      >>> c = renorm_schedule(22500)
      >>> round(float(c["rmax"]), 3), round(float(c["dmax"]), 3), round(float(c["rmin"]), 3)
      (2.0, 4.375, 0.5)
    """
    if not float(rmax) >= 1.0:
        raise ValueError(f"rmax={rmax!r} must be >= 1 (r is clipped to [1/rmax, rmax]).")
    if not float(dmax) >= 0.0:
        raise ValueError(f"dmax={dmax!r} must be >= 0 (d is clipped to [-dmax, dmax]).")
    for name, end in (("rmax_steps", rmax_steps), ("dmax_steps", dmax_steps)):
        if not end > warmup_steps:
            raise ValueError(
                f"{name}={end!r} must be greater than warmup_steps={warmup_steps!r}: it is the "
                "step at which the limit is fully relaxed."
            )
    step = jnp.asarray(step, jnp.float32)

    def ramp(end: int) -> Array:
        return jnp.clip((step - warmup_steps) / (end - warmup_steps), 0.0, 1.0)

    r_hi = 1.0 + (rmax - 1.0) * ramp(rmax_steps)
    return {"rmin": 1.0 / r_hi, "rmax": r_hi, "dmax": dmax * ramp(dmax_steps)}



def renorm_correction(
    batch: Moments, stats: Mapping[str, Array], epsilon: float, clipping: Mapping[str, Any]
) -> tuple[Array, Array]:
    """Keras' ``r`` and ``d`` against the renorm moving statistics, clipped, gradient-free.

    Example:
      >>> batch = Moments(jnp.array([2.0]), jnp.array([16.0]), jnp.array([8.0]))
      >>> ref = {"renorm_mean": jnp.array([0.0]), "renorm_std": jnp.array([2.0])}
      >>> r, d = renorm_correction(batch, ref, 0.0, {"rmax": 1.5})
      >>> r.tolist(), d.tolist()
      ([1.5], [1.0])
    """
    dt = batch.mean.dtype
    std = jnp.sqrt(batch.var + epsilon)
    ref_std = jnp.maximum(stats["renorm_std"].astype(dt), np.sqrt(epsilon).astype(dt))
    r = std / ref_std
    d = (batch.mean - stats["renorm_mean"].astype(dt)) / ref_std
    if clipping.get("rmin") is not None:
        r = jnp.maximum(r, jnp.asarray(clipping["rmin"], dt))
    if clipping.get("rmax") is not None:
        r = jnp.minimum(r, jnp.asarray(clipping["rmax"], dt))
    if clipping.get("dmax") is not None:
        dmax = jnp.asarray(clipping["dmax"], dt)
        d = jnp.clip(d, -dmax, dmax)
    return lax.stop_gradient(r), lax.stop_gradient(d)


def update_renorm_stats(
    stats: Mapping[str, Array],
    batch: Moments,
    momentum: float | Array,
    renorm_momentum: float | Array,
    epsilon: float,
    guard: bool,
) -> dict[str, Array]:
    """Keras 3's renorm updates: EMAs of the batch mean and std, ``var`` derived from ``std``.

    Example:
      >>> s = init_renorm_stats({"mean": jnp.zeros(1), "var": jnp.ones(1)})
      >>> new = update_renorm_stats(s, Moments(jnp.ones(1), jnp.full(1, 9.0), jnp.ones(1)),
      ...                           0.5, 0.5, 0.0, True)
      >>> new["mean"].tolist(), new["std"].tolist(), new["var"].tolist()
      ([0.5], [2.0], [4.0])
    """
    ok = (batch.count > 0) & jnp.isfinite(batch.mean) & jnp.isfinite(batch.var)
    std = jnp.sqrt(batch.var + epsilon)

    def ema(key: str, value: Array, mom: float | Array) -> Array:
        old = stats[key]
        return guarded(ok, mom * old + (1 - mom) * value.astype(old.dtype), old, guard)

    out = dict(stats)
    out["renorm_mean"] = ema("renorm_mean", batch.mean, renorm_momentum)
    out["renorm_std"] = ema("renorm_std", std, renorm_momentum)
    out["mean"] = ema("mean", batch.mean, momentum)
    out["std"] = ema("std", std, momentum)
    var = jnp.maximum(jnp.square(out["std"]) - epsilon, 0)
    out["var"] = guarded(ok, var, stats["var"], guard)
    return out


def average_ghost_moments(batch: Moments) -> Moments:
    """Mean over the ghost batches (leading axis) of their means and variances.

    Ghost batches without any value (all masked) are left out of the average.

    Example:
      >>> m = average_ghost_moments(Moments(jnp.array([[1.0], [3.0], [9.0]]),
      ...                                   jnp.array([[1.0], [3.0], [9.0]]),
      ...                                   jnp.array([[4.0], [4.0], [0.0]])))
      >>> m.mean.tolist(), m.var.tolist(), m.count.tolist()
      ([2.0], [2.0], [8.0])
    """
    has = batch.count > 0
    k = jnp.maximum(jnp.sum(has, axis=0), 1).astype(batch.mean.dtype)
    mean = jnp.sum(jnp.where(has, batch.mean, 0), axis=0) / k
    var = jnp.sum(jnp.where(has, batch.var, 0), axis=0) / k
    return Moments(mean, var, jnp.sum(batch.count, axis=0))
