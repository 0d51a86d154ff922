"""PreciseBN: exact population statistics in place of the moving averages.

Wu and Johnson, "Rethinking 'Batch' in BatchNorm" (2021): after training, every batch norm's
mean and variance are recomputed over many batches with the final weights
(:func:`precise_batch_stats`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bnjax import functional as F
from bnjax.inference.collect import bn_layers, collect_batches, make_collector
from bnjax.inference.common import (
    Path,
    check_count,
    check_linen_model,
    copy_tree,
    copy_variables,
    get_path,
    inference_call_kwargs,
    path_str,
    require_batch_stats,
    set_path,
)
from bnjax.stats import combine_sums

Array = jax.Array


def precise_batch_stats(
    model: nn.Module,
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    num_batches: int = 200,
    *,
    unbiased: bool = False,
    call_kwargs: Mapping[str, Any] | None = None,
    input_key: str = "x",
) -> dict[str, Any]:
    """Replaces every batch norm's moving statistics by exact population statistics.

    PreciseBN (Wu and Johnson, "Rethinking 'Batch' in BatchNorm", 2021): the moving average
    mixes statistics of weights from many past steps; after training, the population mean and
    variance of each layer's input are recomputed exactly over ``num_batches`` batches with the
    final weights.

    Layer after layer: the batch norms are processed in the order the model calls them, and
    the inputs of layer ``k`` are computed with the model in inference mode, every earlier
    batch norm already normalizing with its *recomputed* statistics (and later ones with
    their old statistics, which do not affect layer ``k``). So the result is exactly the
    population statistics the final inference model sees. This costs one pass over the batches
    per layer (each pass stops, after XLA's dead-code elimination, at that layer), and the
    batches are held in memory between passes.

    Per batch, ``bnjax.functional.moments`` gives the mean, biased variance and count of each
    feature; the batches are combined with the exact parallel-variance formula of
    ``bnjax.functional`` into the mean and biased variance of all values of all batches
    (``unbiased=False``). With ``unbiased=True`` the variance is the batch-norm paper's
    estimator ``Var[x] = m / (m - 1) * E_B[var_B]`` (Ioffe and Szegedy, 2015, Alg. 2): each
    batch's variance with the ``m/(m-1)`` correction, ``m`` its number of values per feature,
    averaged over the batches weighted by ``m``. The means are the same in both cases.

    Args:
      model: a ``flax.linen`` module with ``bnjax.BatchNorm`` / ``nn.BatchNorm`` layers
        (subclasses included), each called once per forward pass.
      variables: its variables, with ``params`` and ``batch_stats``.
      batches: an iterable of batches (arrays ``(batch_size, ...)`` or dicts holding the input
        under ``input_key``), e.g. a training-data iterator, or one array of stacked batches
        ``(num_batches, batch_size, ...)``. Batches must not contain padding examples.
      num_batches: how many batches to use (the first ``num_batches``; fewer if the iterable
        ends earlier), >= 1.
      unbiased: apply the batch-norm paper's ``m/(m-1)`` correction (see above).
      call_kwargs: keyword arguments that put the model in inference mode, used as given.
        Default: found from the model's ``__call__`` signature, as in
        :func:`~bnjax.fold_batch_norm` (``training=False``, ``train=False``,
        ``use_running_average=True``, ``deterministic=True``). The layer inputs are
        computed in inference mode (see above; dropout off), so the tool never needs the
        training-mode value.
      input_key: key of the model input in dict batches.

    Returns:
      A copy of ``variables`` whose ``batch_stats`` hold the population statistics of every
      recognised batch-norm layer (others are left unchanged, with a warning). Only ``mean``
      and ``var`` are replaced, the statistics inference uses; other statistics a layer keeps
      (batch renormalization's ``std``, ``renorm_mean``, ``renorm_std``) stay as they are.

    Raises:
      ValueError: ``num_batches`` < 1, no batches, batches of differing or unusable shapes,
        no ``batch_stats``, a batch norm in training mode, a model without batch norm, or
        ``unbiased=True`` with a batch of one value per feature, or no ``call_kwargs`` for a
        model without any of the mode arguments.
      TypeError: ``batches`` or a batch of the wrong type.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, bnjax
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, training):
      ...         return bnjax.BatchNorm()(nn.Dense(2)(x), training=training)
      >>> batches = [jax.random.normal(jax.random.key(i), (16, 3)) for i in range(4)]
      >>> variables = Net().init(jax.random.key(0), batches[0], training=False)
      >>> new = bnjax.precise_batch_stats(Net(), variables, batches)
      >>> z = nn.Dense(2).apply({"params": variables["params"]["Dense_0"]},
      ...                       jnp.concatenate(batches))
      >>> bool(jnp.allclose(new["batch_stats"]["BatchNorm_0"]["var"], z.var(0), rtol=1e-5))
      True
    """
    num_batches = check_count("num_batches", num_batches)
    if not isinstance(unbiased, bool | np.bool_):
        raise TypeError(f"unbiased={unbiased!r} must be a bool.")
    check_linen_model(model, "precise_batch_stats")
    variables = copy_variables(variables)
    require_batch_stats(variables, "precise_batch_stats")
    call_kwargs = inference_call_kwargs(model, call_kwargs, "precise_batch_stats")
    xs = collect_batches(batches, num_batches, input_key, "batches")
    layers = bn_layers(model, variables, xs[0], call_kwargs, "precise_batch_stats")

    stats = copy_tree(variables["batch_stats"])
    for layer in layers:
        collect = make_collector(model, call_kwargs, layer.path)
        current = {**variables, "batch_stats": stats}
        parts = [collect(current, x) for x in xs]
        new_mean, new_var = _population(parts, unbiased, layer.path)
        old = get_path(stats, layer.path)
        set_path(stats, layer.path, {**old, "mean": new_mean.astype(old["mean"].dtype),
                                     "var": new_var.astype(old["var"].dtype)})
    return {**variables, "batch_stats": stats}


def _population(parts: list[F.Moments], unbiased: bool, path: Path) -> tuple[Array, Array]:
    """The population mean and variance of one layer's input from its per-batch moments."""
    count = jnp.stack([p.count for p in parts])
    mean = jnp.stack([p.mean for p in parts])
    var = jnp.stack([p.var for p in parts])
    if unbiased:
        if bool(jnp.any(count <= 1)):
            raise ValueError(
                f"precise_batch_stats: unbiased=True needs more than one value per feature "
                f"in every batch, but layer {path_str(path)} sees a batch with "
                f"{int(jnp.min(count))}; use unbiased=False or larger batches."
            )
        total = jnp.sum(count, axis=0)
        return (jnp.sum(count * mean, axis=0) / total,
                jnp.sum(count * var * count / (count - 1), axis=0) / total)
    # Each batch's (mean, biased var, count) as sums [count, shift, s1, s2] for the
    # exact parallel combination in bnjax.functional.
    sums = jnp.stack([count, mean, jnp.zeros_like(mean), var * count], axis=1)
    pop = combine_sums(sums)
    return pop.mean, pop.var
