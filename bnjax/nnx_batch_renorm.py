"""CrossQ's batch renormalization as a ``flax.nnx`` layer, the NNX twin of ``bnjax.BatchRenorm``.

The arithmetic is :func:`bnjax.crossq_batch_renorm`; this module only holds the variables
(``scale``, ``bias`` as ``nnx.Param``; ``mean``, ``var``, ``r_max``, ``d_max``, ``steps`` as
``nnx.BatchStat``) and chooses the mode, as ``flax.nnx.BatchNorm`` does (the same draws from
``rngs``: one for ``scale``, then one for ``bias``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bnjax.batch_renorm import crossq_batch_renorm

Array = jax.Array

__all__ = ["BatchRenorm"]


class BatchRenorm(nnx.Module):
    """CrossQ's batch renormalization (``sbx.common.jax_layers.BatchRenorm``) for NNX.

    The fields and their defaults are those of ``bnjax.BatchRenorm`` (momentum 0.99,
    epsilon 1e-3, ``warmup_steps`` 100 000), the constructor that of ``flax.nnx.BatchNorm``
    (``num_features`` first, ``rngs`` last). ``r_max``, ``d_max`` and ``steps`` are int32
    arrays. ``use_running_average`` (the attribute, or the call's argument, which wins) picks
    inference; ``nnx.Module.eval()`` / ``train()`` set it.

    Args:
      num_features: the size of the feature axis (a tuple for several feature axes).
      use_running_average: running statistics (inference) instead of batch ones.
      axis: the feature axis or axes.
      momentum: weight on the old running value.
      epsilon: added to the variances inside the square roots.
      warmup_steps: training calls of plain batch norm before the correction starts.
      dtype: output dtype (default: the input's).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias: learn a bias.
      use_scale: learn a scale.
      bias_init: initializer of the bias.
      scale_init: initializer of the scale.
      axis_name: named mapped axis (or axes) for synchronized statistics.
      axis_index_groups: groups of that axis reduced separately.
      guard_non_finite: keep the running statistics of a feature whose batch statistics are
        not finite.
      rngs: the ``nnx.Rngs`` the initializers draw from.

    Example:
      >>> from flax import nnx
      >>> layer = BatchRenorm(3, warmup_steps=1, rngs=nnx.Rngs(0))
      >>> y = layer(jnp.arange(12.0).reshape(4, 3))
      >>> int(layer.steps.value), y.shape
      (1, (4, 3))
    """

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        use_running_average: bool = False,
        axis: int | Sequence[int] = -1,
        momentum: float = 0.99,
        epsilon: float = 0.001,
        warmup_steps: int = 100_000,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Callable[..., Array] = nnx.initializers.zeros,
        scale_init: Callable[..., Array] = nnx.initializers.ones,
        axis_name: str | Sequence[str] | None = None,
        axis_index_groups: Any = None,
        guard_non_finite: bool = True,
        rngs: nnx.Rngs,
    ) -> None:
        shape = (num_features,) if isinstance(num_features, int) else tuple(num_features)
        self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
        self.r_max = nnx.BatchStat(jnp.asarray(3, jnp.int32))
        self.d_max = nnx.BatchStat(jnp.asarray(5, jnp.int32))
        self.steps = nnx.BatchStat(jnp.asarray(0, jnp.int32))
        self.scale = (nnx.Param(scale_init(rngs.params(), shape, param_dtype))
                      if use_scale else None)
        self.bias = nnx.Param(bias_init(rngs.params(), shape, param_dtype)) if use_bias else None
        self.use_running_average = use_running_average
        self.axis, self.momentum, self.epsilon = axis, momentum, epsilon
        self.warmup_steps, self.dtype = warmup_steps, dtype
        self.axis_name, self.axis_index_groups = axis_name, axis_index_groups
        self.guard_non_finite = guard_non_finite

    def __call__(self, x: Array, use_running_average: bool | None = None, *,
                 mask: Array | None = None) -> Array:
        """Normalizes ``x``; updates the statistics in training.

        Args:
          x: the input.
          use_running_average: overrides the attribute for this call.
          mask: optional boolean mask (see :func:`bnjax.crossq_batch_renorm`).

        Returns:
          The normalized input, shaped like ``x``.
        """
        inference = (self.use_running_average if use_running_average is None
                     else use_running_average)
        names = ("mean", "var", "r_max", "d_max", "steps")
        stats = {k: getattr(self, k).value for k in names}
        params = {k: getattr(self, k).value for k in ("scale", "bias")
                  if getattr(self, k) is not None}
        y, new = crossq_batch_renorm(
            x, stats, params, training=not inference, warmup_steps=self.warmup_steps,
            axis=self.axis, momentum=self.momentum, epsilon=self.epsilon,
            axis_name=self.axis_name, axis_index_groups=self.axis_index_groups, mask=mask,
            dtype=self.dtype, guard_non_finite=self.guard_non_finite)
        if not inference:
            for k in ("mean", "var", "steps"):
                getattr(self, k).value = new[k]
        return y
