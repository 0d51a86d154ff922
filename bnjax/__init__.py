"""bnjax: batch normalization for JAX and Flax with Keras semantics.

Example:
  >>> import jax.numpy as jnp
  >>> import bnjax
  >>> y, stats = bnjax.batch_norm(jnp.ones((4, 3)), {"mean": jnp.zeros(3), "var": jnp.ones(3)},
  ...                             training=False)
  >>> y.shape
  (4, 3)
"""

from bnjax import convert as convert
from bnjax import keras as keras
from bnjax._checks import SingleValueWarning
from bnjax._layer import FlaxEpsilonWarning, resolve_training
from bnjax.batch_renorm import BatchRenorm, crossq_batch_renorm, init_crossq_stats
from bnjax.functional import (
    Moments,
    batch_norm,
    canonicalize_axes,
    init_renorm_stats,
    moments,
    normalize,
    renorm_schedule,
    update_moving_stats,
)
from bnjax.inference import (
    FoldedModel,
    MCBNPrediction,
    export_folded_model,
    fold_batch_norm,
    mc_batch_norm_predict,
    precise_batch_stats,
)
from bnjax.linen import BatchNorm, make_constrain_fn
from bnjax.parallel import (
    fetch_replicated,
    initialize_distributed,
    put_batch,
    put_replicated,
    replicate,
    shard_batch,
    unreplicate,
    validate_data_parallel,
)
from bnjax.steps import (
    TrainState,
    keep_frozen,
    make_eval_step,
    make_train_step,
    trainable_mask,
)
from bnjax.swap import (
    SwapReport,
    replace_nnx_batch_norm,
    replacing_flax_batch_norm,
    without_flax_batch_norm,
)

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BatchRenorm",
    "FlaxEpsilonWarning",
    "SingleValueWarning",
    "FoldedModel",
    "MCBNPrediction",
    "Moments",
    "SwapReport",
    "TrainState",
    "__version__",
    "batch_norm",
    "canonicalize_axes",
    "crossq_batch_renorm",
    "export_folded_model",
    "fetch_replicated",
    "fold_batch_norm",
    "init_crossq_stats",
    "init_renorm_stats",
    "initialize_distributed",
    "keep_frozen",
    "make_constrain_fn",
    "make_eval_step",
    "make_train_step",
    "mc_batch_norm_predict",
    "moments",
    "normalize",
    "precise_batch_stats",
    "put_batch",
    "put_replicated",
    "renorm_schedule",
    "replace_nnx_batch_norm",
    "replacing_flax_batch_norm",
    "replicate",
    "resolve_training",
    "shard_batch",
    "trainable_mask",
    "unreplicate",
    "update_moving_stats",
    "validate_data_parallel",
    "without_flax_batch_norm",
]


def __getattr__(name: str) -> object:
    """``bnjax.nnx`` is imported on first use (it loads flax.nnx, which the rest does not)."""
    if name == "nnx":
        import importlib

        return importlib.import_module("bnjax.nnx")
    raise AttributeError(f"module 'bnjax' has no attribute {name!r}")
