"""``bnjax.BatchNorm``: a flax.linen batch-norm layer with Keras semantics.

The layer holds variables and chooses the mode; the arithmetic is ``bnjax.functional``.
Variables have the names ``flax.linen.BatchNorm`` uses (``params/{scale,bias}`` and
``batch_stats/{mean,var}``), so a model can swap one layer for the other and keep its
checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnjax import functional as F
from bnjax import keras_compat as K

Array = jax.Array
Initializer = Callable[..., Array]

__all__ = ["BatchNorm", "resolve_training"]


def resolve_training(
    training: bool | None, use_running_average: bool | None, *, frozen: bool = False
) -> bool:
    """Turns the Keras-style and Flax-style mode arguments into one ``training`` flag.

    Args:
      training: Keras style; True uses (and updates) batch statistics.
      use_running_average: Flax style; True uses the moving statistics.
      frozen: a frozen layer is always in inference mode.

    Returns:
      True for training mode (batch statistics), False for inference mode.

    Raises:
      ValueError: neither argument is given (and the layer is not frozen), or both are
        given and contradict each other.

    Example:
      >>> resolve_training(True, None), resolve_training(None, True)
      (True, False)
    """
    if training is not None and use_running_average is not None:
        if bool(training) == bool(use_running_average):
            raise ValueError(
                f"training={training!r} and use_running_average={use_running_average!r} "
                "contradict each other (training=True means use_running_average=False); "
                "pass only one of them."
            )
    if frozen:
        return False
    if training is not None:
        return bool(training)
    if use_running_average is not None:
        return not bool(use_running_average)
    raise ValueError(
        "BatchNorm needs a mode: pass training=True (batch statistics, updates the moving "
        "ones) or training=False (moving statistics) when calling the layer, or set "
        "use_running_average at construction or call time (Flax style)."
    )


class BatchNorm(nn.Module):
    """Batch normalization (Ioffe and Szegedy, 2015) with Keras semantics for flax.linen.

    Training mode normalizes with the batch mean and biased batch variance and updates
    ``moving = momentum * moving + (1 - momentum) * batch``; inference mode normalizes with the
    moving statistics. The mode comes from ``training`` at call time (Keras style) or
    ``use_running_average`` (Flax style, at construction or call time).

    Note:
      ``flax.linen.BatchNorm.__call__``'s second positional argument is
      ``use_running_average``; here it is ``training``, its opposite. Pass the mode by keyword
      when porting Flax code.

    A ``frozen=True`` layer follows the Keras ``trainable=False`` rule: it always runs in
    inference mode with the moving statistics and never updates them, whatever ``training``
    says. To also keep its scale and bias fixed, mask them out of the optimizer, e.g.
    ``optax.multi_transform({"train": optax.adam(1e-3), "freeze": optax.set_to_zero()},
    labels)`` with ``labels`` mapping the frozen layer's params to ``"freeze"``.

    Attributes:
      axis: feature axis or axes (int or tuple); every other axis is reduced.
      momentum: weight on the old moving value (Keras 0.99; PyTorch's 0.1 is 0.9 here).
      epsilon: added to the variance inside the square root.
      use_bias: learn a per-feature offset (Keras ``center``).
      use_scale: learn a per-feature scale (Keras ``scale``).
      bias_init: initializer of the bias (Keras ``beta_initializer``).
      scale_init: initializer of the scale (Keras ``gamma_initializer``).
      mean_init: initializer of the moving mean (Keras ``moving_mean_initializer``).
      var_init: initializer of the moving variance (Keras ``moving_variance_initializer``).
      axis_name: named mapped axis for synchronized (cross-device) statistics.
      axis_index_groups: groups of ``axis_name`` synchronized separately.
      dtype: output dtype; defaults to the input's.
      param_dtype: dtype of the parameters and moving statistics.
      frozen: Keras ``trainable=False``: inference mode always, no updates.
      use_running_average: Flax-style mode, overridable at call time.
      guard_non_finite: keep a feature's moving statistics unchanged when its batch
        statistics are not finite (a NaN or Inf batch never poisons them).
      renorm: batch renormalization (Ioffe, 2017), Keras 3 semantics (see
        ``bnjax.batch_norm``); adds ``batch_stats/{std,renorm_mean,renorm_std}``.
      renorm_clipping: ``{"rmin", "rmax", "dmax"}`` (any subset), or a callable
        ``step -> mapping`` such as ``bnjax.renorm_schedule``; with a callable the layer
        counts its training steps in ``batch_stats/renorm_step``.
      renorm_momentum: weight on the old value of the renorm moving statistics.
      virtual_batch_size: ghost batch normalization: consecutive groups of this many
        examples along axis 0 are normalized separately in training (see
        ``bnjax.batch_norm``).
      scale_regularizer: Keras ``gamma_regularizer`` (a callable or ``"l1"``/``"l2"``); its
        penalty is sown into the ``"losses"`` collection when that is mutable.
      bias_regularizer: Keras ``beta_regularizer``, likewise.
      scale_constraint: Keras ``gamma_constraint``; applied after each optimizer update by
        ``bnjax.keras_compat.make_constrain_fn(model, ...)``.
      bias_constraint: Keras ``beta_constraint``, likewise.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> bn = BatchNorm()
      >>> x = jnp.arange(12.0).reshape(4, 3)
      >>> variables = bn.init(jax.random.key(0), x, training=False)
      >>> y, updates = bn.apply(variables, x, training=True, mutable=["batch_stats"])
      >>> y.shape, updates["batch_stats"]["mean"].shape
      ((4, 3), (3,))
    """

    axis: int | Sequence[int] = -1
    momentum: float = 0.99
    epsilon: float = 1e-3
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = nn.initializers.zeros
    scale_init: Initializer = nn.initializers.ones
    mean_init: Initializer = nn.initializers.zeros
    var_init: Initializer = nn.initializers.ones
    axis_name: str | Sequence[str] | None = None
    axis_index_groups: Any = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    frozen: bool = False
    use_running_average: bool | None = None
    guard_non_finite: bool = True
    renorm: bool = False
    renorm_clipping: Mapping[str, Any] | Callable[[Array], Mapping[str, Any]] | None = None
    renorm_momentum: float = 0.99
    virtual_batch_size: int | None = None
    scale_regularizer: Callable[[Array], Array] | str | None = None
    bias_regularizer: Callable[[Array], Array] | str | None = None
    scale_constraint: Callable[[Array], Array] | str | None = None
    bias_constraint: Callable[[Array], Array] | str | None = None

    @nn.compact
    def __call__(
        self,
        x: Array,
        training: bool | None = None,
        *,
        mask: Array | None = None,
        use_running_average: bool | None = None,
    ) -> Array:
        """Normalizes ``x``.

        Args:
          x: input ``(..., C)`` (feature axes ``self.axis``).
          training: True for batch statistics (and moving-statistics updates), False for the
            moving statistics.
          mask: optional boolean shaped like ``x`` without its feature axes (or like ``x``);
            masked-out values take no part in the statistics.
          use_running_average: Flax-style mode; overrides the attribute of the same name.

        Returns:
          The normalized input, in ``self.dtype`` or the input's dtype.
        """
        F._check_input(x)
        F._check_hparams(self.momentum, self.epsilon)
        ura = self.use_running_average if use_running_average is None else use_running_average
        train = resolve_training(training, ura, frozen=self.frozen)
        axes = F.canonicalize_axes(self.axis, x.ndim)
        feature_shape = tuple(x.shape[a] for a in axes)

        mean = self._stat("mean", self.mean_init, feature_shape)
        var = self._stat("var", self.var_init, feature_shape)
        params = {}
        if self.use_scale:
            params["scale"] = self.param("scale", self.scale_init, feature_shape,
                                         self.param_dtype)
        if self.use_bias:
            params["bias"] = self.param("bias", self.bias_init, feature_shape, self.param_dtype)

        stats = {"mean": mean.value, "var": var.value}
        extra = {}
        if self.renorm:
            extra = {
                "std": self._stat("std", lambda *_: jnp.sqrt(var.value), feature_shape),
                "renorm_mean": self._stat("renorm_mean", lambda *_: mean.value, feature_shape),
                "renorm_std": self._stat("renorm_std", lambda *_: jnp.sqrt(var.value),
                                         feature_shape),
            }
            stats.update({k: v.value for k, v in extra.items()})
        step = None
        if self.renorm and callable(self.renorm_clipping):
            step = self.variable("batch_stats", "renorm_step", lambda: jnp.zeros((), jnp.int32))
        self._sow_penalties(params)
        # Initialization uses the moving statistics: it neither updates them nor runs a
        # collective, so `init` works outside pmap even with `axis_name` set.
        if train and not self.is_initializing():
            if not self.is_mutable_collection("batch_stats"):
                raise ValueError(
                    "BatchNorm is in training mode, which updates the moving statistics, but "
                    "the 'batch_stats' collection is not mutable. Pass "
                    "mutable=['batch_stats'] to apply(), e.g. "
                    "model.apply(variables, x, training=True, mutable=['batch_stats']), "
                    "or call with training=False."
                )
            y, new = F.batch_norm(
                x, stats, params, training=True, axis=axes, momentum=self.momentum,
                epsilon=self.epsilon, axis_name=self.axis_name,
                axis_index_groups=self.axis_index_groups, mask=mask, dtype=self.dtype,
                guard_non_finite=self.guard_non_finite, renorm=self.renorm,
                renorm_clipping=self._clipping(step), renorm_momentum=self.renorm_momentum,
                virtual_batch_size=self.virtual_batch_size,
            )
            mean.value, var.value = new["mean"], new["var"]
            for key, v in extra.items():
                v.value = new[key]
            return y
        y, _ = F.batch_norm(x, stats, params, training=False, axis=axes,
                            momentum=self.momentum, epsilon=self.epsilon, mask=mask,
                            dtype=self.dtype)
        return y

    def _clipping(self, step: Any) -> Mapping[str, Any] | None:
        """The renorm clipping for this step; a schedule counts steps in ``renorm_step``."""
        if step is None:
            return None if self.renorm_clipping is None else dict(self.renorm_clipping)
        clipping = self.renorm_clipping(step.value)
        step.value = step.value + 1
        return clipping

    def _sow_penalties(self, params: Mapping[str, Array]) -> None:
        """Keras weight regularization: sows the penalty into ``losses`` (once per layer)."""
        K.get_regularizer(self.scale_regularizer, name="scale_regularizer")
        K.get_regularizer(self.bias_regularizer, name="bias_regularizer")
        if self.frozen or self.is_initializing() or not self.is_mutable_collection("losses"):
            return
        if self.scale_regularizer is None and self.bias_regularizer is None:
            return
        penalty = K.regularization_penalty(params, self.scale_regularizer,
                                           self.bias_regularizer)
        self.sow("losses", "regularization", penalty, init_fn=lambda: 0.0,
                 reduce_fn=lambda _, new: new)

    def _stat(self, name: str, init: Initializer, feature_shape: tuple[int, ...]) -> Any:
        """Declares a moving statistic and checks it against the input's feature shape."""

        def make() -> Array:
            key = self.make_rng("params") if self.has_rng("params") else jax.random.key(0)
            return jnp.asarray(init(key, feature_shape, self.param_dtype), self.param_dtype)

        v = self.variable("batch_stats", name, make)
        if tuple(v.value.shape) != feature_shape:
            raise ValueError(
                f"batch_stats['{name}'] has shape {tuple(v.value.shape)} but the input has "
                f"feature shape {feature_shape} (axis={self.axis!r}); the layer was built for "
                "another number of features."
            )
        return v
