"""Monte Carlo batch norm: predictive uncertainty from the statistics of sampled batches.

Teye, Azizpour and Smith, "Bayesian Uncertainty Estimation for Batch Normalized Deep
Networks" (2018): :func:`mc_batch_norm_predict` predicts with the batch statistics of sampled
training batches and averages the predictions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bnjax.inference.collect import batch_input, bn_layers, collect_batches, make_collector
from bnjax.inference.common import (
    check_count,
    check_linen_model,
    copy_variables,
    inference_call_kwargs,
    require_batch_stats,
)
from bnjax.inference.tracing import quiet_epsilon

Array = jax.Array


class MCBNPrediction(NamedTuple):
    """Output of :func:`mc_batch_norm_predict` (``N`` inputs, ``K`` classes, ``S`` samples).

    Attributes:
      probs: ``(N, K)`` mean of the sampled predictive distributions.
      entropy: ``(N,)`` predictive entropy of ``probs`` (nats).
      variance: ``(N,)`` variance of the sampled probability vectors, summed over classes.
      mutual_information: ``(N,)`` entropy of the mean minus the mean entropy of the samples
        (the part of the uncertainty due to the sampled statistics).
      sample_probs: ``(S, N, K)`` the sampled predictive distributions.
    """

    probs: Array
    entropy: Array
    variance: Array
    mutual_information: Array
    sample_probs: Array


def _entropy(p: Array) -> Array:
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)


def mc_batch_norm_predict(
    model: nn.Module,
    variables: Mapping[str, Any],
    x: Array,
    train_batches: Sequence[Any] | Array,
    num_samples: int = 16,
    *,
    rng: Any = None,
    call_kwargs: Mapping[str, Any] | None = None,
    input_key: str = "x",
    from_logits: bool = True,
    batch_size: int | None = None,
) -> MCBNPrediction:
    """Monte Carlo batch norm: predictive uncertainty from sampled batch statistics.

    Teye, Azizpour and Smith, "Bayesian Uncertainty Estimation for Batch Normalized Deep
    Networks" (2018). For each of ``num_samples`` samples a training batch is drawn; one
    forward pass over it gives every batch norm its statistics the way training mode does
    (each layer normalizes with the mean and biased variance of its own input in that batch,
    earlier layers included; the moving statistics play no part); then ``x`` is predicted in
    inference mode with those statistics. The samples' predictive distributions are averaged.

    Args:
      model: a ``flax.linen`` module with batch-norm layers, each called once per pass.
      variables: its variables, with ``params`` and ``batch_stats``.
      x: inputs to predict, ``(N, ...)`` with the training batches' per-example shape.
      train_batches: training batches to sample from: a sequence of arrays ``(B, ...)`` or of
        dicts holding the input under ``input_key``, or one array ``(num_batches, B, ...)``.
        Batches are drawn without replacement when there are at least ``num_samples``. A
        plain iterator (no length) contributes its next ``num_samples`` batches instead.
      num_samples: number of sampled batches, >= 1.
      rng: ``jax.random`` key (or int seed) for drawing the batches; default seed 0.
      call_kwargs: keyword arguments that put the model in inference mode, used as given.
        Default: found from the model's ``__call__`` signature, as in
        :func:`~bnjax.fold_batch_norm`. The sampled statistics are those of the batch-norm
        inputs with the model in inference mode (dropout off), so the tool never needs the
        training-mode value.
      input_key: key of the model input in dict batches.
      from_logits: the model outputs logits (softmax is applied); False: probabilities.
      batch_size: predict ``x`` in chunks of this many examples (default: all at once).

    Returns:
      :class:`MCBNPrediction` with the mean probabilities and per-example uncertainties.

    Raises:
      ValueError: ``num_samples`` < 1, no training batches, ``x`` or batches of the wrong
        shape, no ``batch_stats``, a batch norm in training mode, a model without batch norm,
        or no ``call_kwargs`` for a model without any of the mode arguments.
      TypeError: ``train_batches``, ``x`` or ``rng`` of the wrong type.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, bnjax
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, training):
      ...         return nn.Dense(3)(bnjax.BatchNorm()(nn.Dense(8)(x), training=training))
      >>> train = [jax.random.normal(jax.random.key(i), (16, 4)) for i in range(8)]
      >>> variables = Net().init(jax.random.key(0), train[0], training=False)
      >>> out = bnjax.mc_batch_norm_predict(Net(), variables, train[0], train, num_samples=4)
      >>> out.probs.shape, out.entropy.shape, out.variance.shape
      ((16, 3), (16,), (16,))
    """
    num_samples = check_count("num_samples", num_samples)
    if batch_size is not None:
        batch_size = check_count("batch_size", batch_size)
    check_linen_model(model, "mc_batch_norm_predict")
    variables = copy_variables(variables)
    require_batch_stats(variables, "mc_batch_norm_predict")
    call_kwargs = inference_call_kwargs(model, call_kwargs, "mc_batch_norm_predict")
    rng = _as_key(rng)
    # A sized collection is sampled from; a plain iterator gives its next num_samples batches.
    sized = hasattr(train_batches, "__len__") or hasattr(train_batches, "shape")
    pool = collect_batches(train_batches, math.inf if sized else num_samples, input_key,
                            "train_batches")
    x = batch_input(x, input_key, "x")
    if x.shape[1:] != pool[0].shape[1:]:
        raise ValueError(
            f"x has shape {tuple(x.shape)} but the training batches have per-example shape "
            f"{tuple(pool[0].shape[1:])}; x must be shaped (N, *{tuple(pool[0].shape[1:])})."
        )
    bn_layers(model, variables, pool[0], call_kwargs, "mc_batch_norm_predict")

    if sized:
        replace = len(pool) < num_samples
        picks = np.asarray(jax.random.choice(rng, len(pool), (num_samples,), replace=replace))
    else:
        picks = np.arange(len(pool))
    collect = make_collector(model, call_kwargs, None)

    @jax.jit
    def predict(variables, x):
        with quiet_epsilon():
            out = model.apply(variables, x, **call_kwargs)
        return jax.nn.softmax(out, axis=-1) if from_logits else out

    chunk = x.shape[0] if batch_size is None else batch_size
    samples = []
    for i in picks:
        current = {**variables, "batch_stats": collect(variables, pool[int(i)])}
        samples.append(jnp.concatenate([predict(current, x[j:j + chunk])
                                        for j in range(0, x.shape[0], chunk)]))
    return _summarize(jnp.stack(samples).astype(jnp.float32))


def _as_key(rng: Any) -> Array:
    if rng is None:
        return jax.random.key(0)
    if isinstance(rng, int | np.integer) and not isinstance(rng, bool):
        return jax.random.key(int(rng))
    if not isinstance(rng, jax.Array):
        raise TypeError(f"rng={rng!r} must be a jax.random key or an int seed.")
    return rng


def _summarize(sample_probs: Array) -> MCBNPrediction:
    """The mean prediction and its uncertainties from ``(S, N, K)`` sampled distributions."""
    probs = sample_probs.mean(axis=0)
    entropy = _entropy(probs)
    variance = jnp.sum(sample_probs.var(axis=0), axis=-1)
    mutual_information = jnp.maximum(entropy - _entropy(sample_probs).mean(axis=0), 0.0)
    return MCBNPrediction(probs, entropy, variance, mutual_information, sample_probs)
