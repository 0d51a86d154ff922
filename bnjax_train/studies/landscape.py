"""The studies of why BN helps: internal covariate shift and the smoothness of the loss.

Both follow Santurkar et al. (2018), "How does batch normalization help optimization?", on
the study network, measuring after every epoch on fixed probe batches of the training set
(batch statistics, as in a training step), for every run at once (``jax.vmap``):

- :func:`run_covariate_shift`: BN, "noisy BN" (BN followed by noise whose mean and variance
  change at every step, :class:`~bnjax_train.studies.nets.NoisyShift`) and no BN. The shift
  is measured two ways: how far the distribution of the output layer's input moves from one
  epoch to the next (:func:`feature_shift`), and the paper's gradient change: the gradient of
  the output layer's kernel before and after every layer below it takes an SGD step of
  ``shift_step`` on the same batch (with noisy BN, also under the next step's noise), as a
  relative distance and a cosine.
- :func:`run_smoothness`: BN and no BN; at the current weights ``w`` and gradient ``g`` of a
  probe batch, the loss and gradient at ``w - eta * g`` for each step size ``eta`` of
  ``step_sizes``: the range of those losses (with the loss at ``w``), the largest change of
  the gradient, and the largest ``|g(w - eta g) - g(w)| / |eta g|`` (the "effective
  beta-smoothness").
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnjax_train.studies.engine import Data, train_runs
from bnjax_train.studies.training import Settings, make_model, make_recipe, records, timing

__all__ = ["feature_shift", "output_layer", "probe_batches", "run_covariate_shift",
           "run_smoothness", "shift_probe", "smoothness_probe"]


def output_layer(params: Any) -> str:
    """The name of the output layer in a study network's params: the last ``Dense_*``.

    Example:
      >>> output_layer({"Dense_0": {}, "Dense_1": {}, "PatchConv_0": {}})
      'Dense_1'
    """
    return max((k for k in params if k.startswith("Dense_")), key=lambda k: int(k[6:]))


def probe_batches(data: Data, settings: Settings) -> tuple[np.ndarray, np.ndarray]:
    """``probe_batches`` fixed training batches ``(B, batch, ...)`` and labels, from seed 0.

    Example:
      >>> from bnjax_train.studies.engine import toy_data
      >>> x, y = probe_batches(toy_data(), {"probe_batches": 2, "batch_size": 8})
      >>> x.shape, y.shape
      ((2, 8, 40), (2, 8))
    """
    b, size = int(settings["probe_batches"]), int(settings["batch_size"])
    idx = np.random.default_rng(0).permutation(len(data.x_train))[:b * size].reshape(b, size)
    return data.x_train[idx], data.y_train[idx]


def feature_shift(before: tuple[np.ndarray, np.ndarray],
                  after: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """How far per-unit ``(mean, std)`` ``(R, units)`` moved, relative to the spread before.

    ``(sum|mean' - mean| + sum|std' - std|) / sum std``, over the units, per run.

    Example:
      >>> m, s = np.zeros((1, 2)), np.ones((1, 2))
      >>> feature_shift((m, s), (m + 0.5, 2 * s)).tolist()
      [1.5]
    """
    (m0, s0), (m1, s1) = before, after
    moved = np.abs(m1 - m0).sum(-1) + np.abs(s1 - s0).sum(-1)
    return moved / np.maximum(s0.sum(-1), 1e-12)


def _loss_fn(model: nn.Module) -> Callable[..., Any]:
    """Training-mode loss on one batch and the output layer's input (``intermediates``)."""

    def loss(params, stats, x, y, key):
        logits, upd = model.apply({"params": params, "batch_stats": stats}, x, training=True,
                                  mutable=["batch_stats", "intermediates"],
                                  rngs={"dropout": key})
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ce, upd["intermediates"]["features"][0]

    return loss


def _norm(tree: Any) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in jax.tree.leaves(tree)))


def _toy_probe_inputs() -> tuple[nn.Module, Any, jax.Array, jax.Array]:
    """A two-layer network's stacked variables (2 runs) and 3 probe batches of 4, for examples."""
    from bnjax_train.studies.nets import StudyCNN1D

    model = StudyCNN1D(num_classes=3, features=(), pool_after=(), hidden=5, norm="none")
    xs = jax.random.normal(jax.random.key(0), (3, 4, 6))
    keys = jax.random.split(jax.random.key(1), 2)
    variables = jax.vmap(lambda k: model.init(k, xs[0], training=False))(keys)
    return model, variables["params"], xs, jnp.zeros((3, 4), jnp.int32)


@functools.lru_cache(maxsize=8)
def shift_probe(model: nn.Module, step: float) -> Callable[..., Any]:
    """The covariate-shift probe: ``fn(params, stats, xs, ys, keys)`` of stacked runs.

    For every run (leading axis of ``params``, ``stats`` and ``keys``) and probe batch
    (leading axis of ``xs`` and ``ys``): the output layer's kernel gradient ``G``, and ``G'``
    after every layer below takes the SGD step ``w - step * grad`` (noise: the next draw);
    returns ``gradient_change`` ``|G - G'| / |G|``, ``gradient_cosine`` and the output layer
    input's per-unit ``mean`` and ``std``, each ``(runs, batches, ...)``.

    Example:
      >>> model, params, xs, ys = _toy_probe_inputs()
      >>> out = shift_probe(model, 0.1)(params, {}, xs, ys, jax.random.split(
      ...     jax.random.key(2), 2))
      >>> out["gradient_change"].shape, out["mean"].shape
      ((2, 3), (2, 3, 5))
    """
    grad = jax.grad(_loss_fn(model), has_aux=True)

    def one(params, stats, x, y, key):
        out = output_layer(params)
        g, feats = grad(params, stats, x, y, jax.random.fold_in(key, 0))
        moved = {k: v if k == out else jax.tree.map(lambda p, d: p - step * d, v, g[k])
                 for k, v in params.items()}
        g1, _ = grad(moved, stats, x, y, jax.random.fold_in(key, 1))  # the next step's noise
        a, b = g[out]["kernel"], g1[out]["kernel"]
        return {"gradient_change": _norm(a - b) / jnp.maximum(_norm(a), 1e-30),
                "gradient_cosine": jnp.sum(a * b) / jnp.maximum(_norm(a) * _norm(b), 1e-30),
                "mean": feats.mean(0), "std": feats.std(0)}

    def per_run(params, stats, xs, ys, key):
        keys = jax.random.split(key, xs.shape[0])
        return jax.lax.map(lambda a: one(params, stats, *a), (xs, ys, keys))

    return jax.jit(jax.vmap(per_run, in_axes=(0, 0, None, None, 0)))


@functools.lru_cache(maxsize=8)
def smoothness_probe(model: nn.Module, step_sizes: tuple[float, ...]) -> Callable[..., Any]:
    """The smoothness probe: ``fn(params, stats, xs, ys)`` of stacked runs.

    For every run and probe batch, at ``w`` with gradient ``g``: ``loss_range`` (largest minus
    smallest loss among ``w`` and every ``w - eta * g``; infinite if one is not finite),
    ``gradient_change`` (largest ``|g(w - eta g) - g|``), ``beta`` (largest
    ``|g(w - eta g) - g| / |eta g|``) and ``gradient_norm`` ``|g|``, each ``(runs, batches)``.

    Example:
      >>> model, params, xs, ys = _toy_probe_inputs()
      >>> smoothness_probe(model, (0.1, 0.2))(params, {}, xs, ys)["beta"].shape
      (2, 3)
    """
    value_grad = jax.value_and_grad(_loss_fn(model), has_aux=True)

    def one(params, stats, x, y):
        key = jax.random.key(0)  # no noise in this study's networks: unused
        (loss0, _), g = value_grad(params, stats, x, y, key)
        gnorm = _norm(g)
        losses, changes, betas = [loss0], [], []
        for eta in step_sizes:
            moved = jax.tree.map(lambda p, d, eta=eta: p - eta * d, params, g)
            (loss, _), g1 = value_grad(moved, stats, x, y, key)
            change = _norm(jax.tree.map(jnp.subtract, g1, g))
            losses.append(loss)
            changes.append(change)
            betas.append(change / jnp.maximum(eta * gnorm, 1e-30))
        losses = jnp.stack(losses)
        finite = jnp.isfinite(losses).all()
        return {"loss_range": jnp.where(finite, losses.max() - losses.min(), jnp.inf),
                "gradient_change": jnp.stack(changes).max(), "beta": jnp.stack(betas).max(),
                "gradient_norm": gnorm}

    def per_run(params, stats, xs, ys):
        return jax.lax.map(lambda a: one(params, stats, *a), (xs, ys))

    return jax.jit(jax.vmap(per_run, in_axes=(0, 0, None, None)))


def _configs_runs(data: Data, settings: Settings, seeds: Sequence[int],
                  probe: Callable[[Any, Any, int], dict[str, np.ndarray]]) -> dict[str, Any]:
    """Trains each config of ``settings["configs"]`` (seeds together), probing every epoch."""
    out, all_runs = [], []
    for config in settings["configs"]:
        fields = {k: (tuple(v) if k == "noise" else v) for k, v in config.items()}
        model = make_model(settings, data.num_classes, **fields)
        runs = train_runs(model, data, make_recipe(settings), list(seeds),
                          [settings["learning_rate"]] * len(seeds),
                          on_epoch=lambda e, v, model=model: probe(model, v, e))
        all_runs.append(runs)
        out += records(runs, [config] * len(seeds), seeds)
    return {"runs": out, "steps_per_epoch": all_runs[0].steps_per_epoch, **timing(all_runs)}


def run_covariate_shift(data: Data, settings: Settings, seeds: Sequence[int]) -> dict[str, Any]:
    """BN, noisy BN and no BN: accuracy, feature shift and gradient change after each epoch.

    Example:
      >>> from bnjax_train.studies.engine import toy_data
      >>> settings = {"features": [2], "hidden": 4, "optimizer": "sgd", "learning_rate": 0.1,
      ...             "batch_size": 16, "epochs": 2, "probe_batches": 1, "shift_step": 0.1,
      ...             "configs": [{"norm": "batch", "noise": [1.0, 4.0]}]}
      >>> run = run_covariate_shift(toy_data(), settings, [0, 1])["runs"][0]
      >>> len(run["gradient_change"]), run["feature_shift"][0] is None
      (2, True)
    """
    xs, ys = map(jnp.asarray, probe_batches(data, settings))
    previous: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def probe(model: nn.Module, variables: Any, epoch: int) -> dict[str, np.ndarray]:
        fn = shift_probe(model, float(settings["shift_step"]))
        n = jax.tree.leaves(variables["params"])[0].shape[0]
        keys = jnp.stack([jax.random.key(1_000_003 * epoch + r) for r in range(n)])
        got = jax.tree.map(np.asarray, fn(variables["params"], variables.get(
            "batch_stats", {}), xs, ys, keys))
        stats = (got["mean"].mean(1), got["std"].mean(1))  # over the probe batches
        shift = (feature_shift(previous[id(model)], stats) if epoch
                 else np.full(n, np.nan))
        previous[id(model)] = stats
        return {"feature_shift": shift, "gradient_change": got["gradient_change"].mean(1),
                "gradient_cosine": got["gradient_cosine"].mean(1)}

    return _configs_runs(data, settings, seeds, probe)


def run_smoothness(data: Data, settings: Settings, seeds: Sequence[int]) -> dict[str, Any]:
    """BN and no BN: the loss and gradient along the gradient direction after each epoch.

    Example:
      >>> from bnjax_train.studies.engine import toy_data
      >>> settings = {"features": [2], "hidden": 4, "optimizer": "sgd", "learning_rate": 0.1,
      ...             "batch_size": 16, "epochs": 1, "probe_batches": 1,
      ...             "step_sizes": [0.1, 0.4], "configs": [{"norm": "none"}]}
      >>> run = run_smoothness(toy_data(), settings, [0])["runs"][0]
      >>> sorted(k for k in run if k in ("beta", "gradient_change", "loss_range"))
      ['beta', 'gradient_change', 'loss_range']
    """
    xs, ys = map(jnp.asarray, probe_batches(data, settings))
    steps = tuple(float(s) for s in settings["step_sizes"])

    def probe(model: nn.Module, variables: Any, epoch: int) -> dict[str, np.ndarray]:
        del epoch
        got = smoothness_probe(model, steps)(variables["params"], variables.get("batch_stats", {}),
                                       xs, ys)
        return {k: np.asarray(v).mean(1) for k, v in got.items()}

    return _configs_runs(data, settings, seeds, probe)
