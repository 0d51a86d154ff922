"""bnjax: batch normalization for JAX and Flax with Keras semantics.

Example:
  >>> import jax.numpy as jnp
  >>> import bnjax
  >>> y, stats = bnjax.batch_norm(jnp.ones((4, 3)), {"mean": jnp.zeros(3), "var": jnp.ones(3)},
  ...                             training=False)
  >>> y.shape
  (4, 3)
"""

from bnjax.functional import (
    Moments,
    batch_norm,
    canonicalize_axes,
    moments,
    normalize,
    update_moving_stats,
)
from bnjax.inference import (
    FoldedModel,
    MCBNPrediction,
    fold_batch_norm,
    mc_batch_norm_predict,
    precise_batch_stats,
)
from bnjax.linen import BatchNorm, resolve_training

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "FoldedModel",
    "MCBNPrediction",
    "Moments",
    "__version__",
    "batch_norm",
    "canonicalize_axes",
    "fold_batch_norm",
    "mc_batch_norm_predict",
    "moments",
    "normalize",
    "precise_batch_stats",
    "resolve_training",
    "update_moving_stats",
]
