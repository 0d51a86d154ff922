"""Inference tools for batch norm: folding, precise population statistics, Monte Carlo BN.

At inference a batch-norm layer is a fixed per-channel affine map. This package

- folds it into the preceding convolution or dense layer (:func:`fold_batch_norm`, in
  ``folding``), so the deployed model does no normalization arithmetic at all, and exports
  the result (:func:`export_folded_model`);
- replaces the moving averages by exact population statistics over many batches
  (:func:`precise_batch_stats`, in ``precise``; PreciseBN of Wu and Johnson, 2021);
- uses the statistics of sampled training batches as a source of randomness for predictive
  uncertainty (:func:`mc_batch_norm_predict`, in ``mcbn``; Monte Carlo batch norm of Teye et
  al., 2018).

All three work on any ``flax.linen`` model, not only on the model zoo: they run the model and
watch its layers with :func:`flax.linen.intercept_methods` (``tracing``). Layers recognised as
batch norm are ``bnjax.BatchNorm`` and ``flax.linen.BatchNorm`` and their subclasses (read at
the base layer's own ``__call__``, so a subclass may have any call signature); layers recognised
as linear are ``flax.linen.Conv``, ``flax.linen.ConvTranspose`` and ``flax.linen.Dense``. The
arithmetic of the statistics is ``bnjax.functional``'s. Without ``call_kwargs`` the tools put
the model in inference mode through the mode argument its ``__call__`` has (``train``,
``training``, ``use_running_average`` or ``deterministic``; ``common``).

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> from bnjax.inference import fold_batch_norm
  >>> class Net(nn.Module):
  ...     @nn.compact
  ...     def __call__(self, x, train: bool):
  ...         return nn.BatchNorm(use_running_average=not train)(nn.Dense(3)(x))
  >>> variables = Net().init(jax.random.key(0), jnp.ones((2, 4)), train=False)
  >>> folded, fv = fold_batch_norm(Net(), variables, jnp.ones((2, 4)))   # finds train=False
  >>> folded.folded
  (('Dense_0', 'BatchNorm_0'),)
"""

from bnjax.inference.folding import FoldedModel, export_folded_model, fold_batch_norm
from bnjax.inference.mcbn import MCBNPrediction, mc_batch_norm_predict
from bnjax.inference.precise import precise_batch_stats

__all__ = [
    "FoldedModel",
    "MCBNPrediction",
    "export_folded_model",
    "fold_batch_norm",
    "mc_batch_norm_predict",
    "precise_batch_stats",
]
