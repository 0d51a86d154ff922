"""``bnjax.nnx.BatchNorm``: the Keras-semantics batch-norm layer for Flax NNX.

The same arithmetic as ``bnjax.BatchNorm`` (``bnjax.functional.batch_norm``) in an
``flax.nnx.Module``: the parameters are ``nnx.Param`` attributes ``scale`` and ``bias``, the
moving statistics ``nnx.BatchStat`` attributes ``mean`` and ``var`` (plus ``std``,
``renorm_mean``, ``renorm_std`` and ``renorm_step`` for batch renormalization), the names
the linen layer uses in ``params`` and ``batch_stats``.

The mode follows NNX's convention: the ``use_running_average`` attribute, which
``model.train()`` sets to False and ``model.eval()`` to True (``nnx.view`` works too). A call
may override it with ``training=`` (Keras style) or ``use_running_average=``.

Keras weight regularization and constraints have NNX-style helpers here:
:func:`regularization_loss` (add it to the loss inside the function you differentiate) and
:func:`apply_constraints` (call it after the optimizer update).

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> import bnjax.nnx
  >>> bn = bnjax.nnx.BatchNorm(3)
  >>> y = bn(jnp.arange(12.0).reshape(4, 3))       # training mode: updates bn.mean, bn.var
  >>> bn.eval()
  >>> bn.use_running_average
  True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bnjax import functional as F
from bnjax import keras_compat as K
from bnjax.linen import resolve_training

Array = jax.Array
Initializer = Callable[..., Array]

__all__ = ["BatchNorm", "apply_constraints", "regularization_loss"]


class BatchNorm(nnx.Module):
    """Batch normalization (Ioffe and Szegedy, 2015) with Keras semantics for Flax NNX.

    Training mode normalizes with the batch statistics and updates the moving ones
    (``moving = momentum * moving + (1 - momentum) * batch``); inference mode uses the moving
    statistics. Arguments and defaults are those of ``bnjax.BatchNorm`` (momentum 0.99,
    epsilon 1e-3), except ``use_running_average``, which defaults to False as in
    ``flax.nnx.BatchNorm``: a new layer trains until ``model.eval()``.

    Args:
      num_features: size of the feature axis (or the feature shape, a tuple, for several
        feature axes).
      axis: feature axis or axes.
      momentum: weight on the old moving value.
      epsilon: added to the variance inside the square root.
      use_bias: learn ``bias`` (Keras ``center``).
      use_scale: learn ``scale`` (Keras ``scale``).
      bias_init: initializer of ``bias``.
      scale_init: initializer of ``scale``.
      mean_init: initializer of the moving mean.
      var_init: initializer of the moving variance.
      axis_name: named mapped axis for synchronized statistics.
      axis_index_groups: groups of ``axis_name`` synchronized separately.
      dtype: output dtype; defaults to the input's.
      param_dtype: dtype of the parameters and moving statistics.
      frozen: Keras ``trainable=False``: inference mode always, no updates, no penalties,
        no constraints.
      use_running_average: NNX-style mode (``model.train()`` / ``model.eval()`` set it).
      guard_non_finite: keep a feature's moving statistics when its batch statistics are
        not finite.
      renorm: batch renormalization (see ``bnjax.batch_norm``).
      renorm_clipping: ``{"rmin", "rmax", "dmax"}`` or a callable ``step -> mapping`` such as
        ``bnjax.renorm_schedule`` (the layer then counts steps in ``renorm_step``).
      renorm_momentum: weight on the old value of the renorm moving statistics.
      virtual_batch_size: ghost batch normalization over consecutive groups of axis 0.
      scale_regularizer: Keras ``gamma_regularizer`` (callable or ``"l1"``/``"l2"``).
      bias_regularizer: Keras ``beta_regularizer``.
      scale_constraint: Keras ``gamma_constraint`` (callable or a name such as
        ``"non_neg"``).
      bias_constraint: Keras ``beta_constraint``.
      rngs: random streams for the initializers; optional, as the default initializers
        are constant.

    Example:
      >>> import jax.numpy as jnp
      >>> bn = BatchNorm(2, epsilon=1e-6)
      >>> bn(jnp.array([[1.0, 2.0], [3.0, 6.0]])).round(3).tolist()
      [[-1.0, -1.0], [1.0, 1.0]]
      >>> [round(v, 4) for v in bn.mean[...].tolist()]
      [0.02, 0.04]
    """

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        axis: int | Sequence[int] = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = nnx.initializers.zeros,
        scale_init: Initializer = nnx.initializers.ones,
        mean_init: Initializer = nnx.initializers.zeros,
        var_init: Initializer = nnx.initializers.ones,
        axis_name: str | Sequence[str] | None = None,
        axis_index_groups: Any = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        frozen: bool = False,
        use_running_average: bool | None = False,
        guard_non_finite: bool = True,
        renorm: bool = False,
        renorm_clipping: Mapping[str, Any] | Callable[[Array], Mapping[str, Any]] | None = None,
        renorm_momentum: float = 0.99,
        virtual_batch_size: int | None = None,
        scale_regularizer: Callable[[Array], Array] | str | None = None,
        bias_regularizer: Callable[[Array], Array] | str | None = None,
        scale_constraint: Callable[[Array], Array] | str | None = None,
        bias_constraint: Callable[[Array], Array] | str | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> None:
        F._check_hparams(momentum, epsilon)
        if isinstance(num_features, int):
            feature_shape: tuple[int, ...] = (num_features,)
        else:
            feature_shape = tuple(int(n) for n in num_features)
        if not feature_shape or any(n < 1 for n in feature_shape):
            raise ValueError(
                f"num_features={num_features!r} must be a positive int (or a tuple of them, "
                "the feature shape for several feature axes)."
            )

        def key() -> Array:
            return rngs.params() if rngs is not None else jax.random.key(0)

        def make(init: Initializer) -> Array:
            return jnp.asarray(init(key(), feature_shape, param_dtype), param_dtype)

        self.scale = nnx.Param(make(scale_init)) if use_scale else nnx.data(None)
        self.bias = nnx.Param(make(bias_init)) if use_bias else nnx.data(None)
        self.mean = nnx.BatchStat(make(mean_init))
        self.var = nnx.BatchStat(make(var_init))
        if renorm:
            stats = F.init_renorm_stats({"mean": self.mean[...], "var": self.var[...]})
            self.std = nnx.BatchStat(stats["std"])
            self.renorm_mean = nnx.BatchStat(stats["renorm_mean"])
            self.renorm_std = nnx.BatchStat(stats["renorm_std"])
            if callable(renorm_clipping):
                self.renorm_step = nnx.BatchStat(jnp.zeros((), jnp.int32))
        K.get_regularizer(scale_regularizer, name="scale_regularizer")
        K.get_regularizer(bias_regularizer, name="bias_regularizer")
        K.get_constraint(scale_constraint, name="scale_constraint")
        K.get_constraint(bias_constraint, name="bias_constraint")

        self.num_features = num_features
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.frozen = frozen
        self.use_running_average = use_running_average
        self.guard_non_finite = guard_non_finite
        self.renorm = renorm
        self.renorm_clipping = (
            renorm_clipping if renorm_clipping is None or callable(renorm_clipping)
            else tuple(sorted(dict(renorm_clipping).items()))
        )
        self.renorm_momentum = renorm_momentum
        self.virtual_batch_size = virtual_batch_size
        self.scale_regularizer = scale_regularizer
        self.bias_regularizer = bias_regularizer
        self.scale_constraint = scale_constraint
        self.bias_constraint = bias_constraint

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
          training: Keras-style mode for this call; overrides the attribute.
          mask: optional boolean shaped like ``x`` without its feature axes (or like ``x``);
            masked-out values take no part in the statistics.
          use_running_average: NNX-style mode for this call; overrides the attribute.

        Returns:
          The normalized input, in ``self.dtype`` or the input's dtype.
        """
        if training is None and use_running_average is None:
            use_running_average = self.use_running_average
        train = resolve_training(training, use_running_average, frozen=self.frozen)
        stats = {"mean": self.mean[...], "var": self.var[...]}
        extra = ("std", "renorm_mean", "renorm_std") if self.renorm else ()
        for name in extra:
            stats[name] = getattr(self, name)[...]
        params = self.params()
        if not train:
            y, _ = F.batch_norm(x, stats, params, training=False, axis=self.axis,
                                momentum=self.momentum, epsilon=self.epsilon, mask=mask,
                                dtype=self.dtype)
            return y
        y, new = F.batch_norm(
            x, stats, params, training=True, axis=self.axis, momentum=self.momentum,
            epsilon=self.epsilon, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, mask=mask, dtype=self.dtype,
            guard_non_finite=self.guard_non_finite, renorm=self.renorm,
            renorm_clipping=self._clipping(), renorm_momentum=self.renorm_momentum,
            virtual_batch_size=self.virtual_batch_size,
        )
        for name in ("mean", "var", *extra):
            getattr(self, name)[...] = new[name]
        return y

    def params(self) -> dict[str, Array]:
        """The current ``{"scale", "bias"}`` values (absent ones left out).

        Example:
          >>> sorted(BatchNorm(3, use_bias=False).params())
          ['scale']
        """
        out = {}
        if self.scale is not None:
            out["scale"] = self.scale[...]
        if self.bias is not None:
            out["bias"] = self.bias[...]
        return out

    def _clipping(self) -> Mapping[str, Any] | None:
        if self.renorm_clipping is None:
            return None
        if not callable(self.renorm_clipping):
            return dict(self.renorm_clipping)
        clipping = self.renorm_clipping(self.renorm_step[...])
        self.renorm_step[...] = self.renorm_step[...] + 1
        return clipping

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view``: sets ``use_running_average`` when given.

        Example:
          >>> from flax import nnx
          >>> nnx.view(BatchNorm(3), use_running_average=True).use_running_average
          True
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


def _layers(model: nnx.Module) -> list[BatchNorm]:
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, BatchNorm) and not m.frozen]


def regularization_loss(model: nnx.Module) -> Array:
    """Sum of the Keras-style weight penalties of every (non-frozen) bnjax NNX BatchNorm.

    Call it inside the function you differentiate, so that the penalties reach the loss and
    their gradients reach ``scale`` and ``bias``.

    Args:
      model: any NNX module (searched recursively).

    Returns:
      A float32 scalar (0 when no layer has a regularizer).

    Example:
      >>> bn = BatchNorm(2, scale_regularizer="l2")
      >>> round(float(regularization_loss(bn)), 6)
      0.02
    """
    total = jnp.zeros((), jnp.float32)
    for bn in _layers(model):
        total = total + K.regularization_penalty(bn.params(), bn.scale_regularizer,
                                                 bn.bias_regularizer)
    return total


def apply_constraints(model: nnx.Module) -> None:
    """Projects ``scale`` and ``bias`` of every (non-frozen) constrained layer, in place.

    Call it after each optimizer update (Keras applies constraints there).

    Args:
      model: any NNX module (searched recursively).

    Example:
      >>> import jax.numpy as jnp
      >>> bn = BatchNorm(2, scale_constraint="non_neg")
      >>> bn.scale[...] = jnp.array([-1.0, 2.0])
      >>> apply_constraints(bn)
      >>> bn.scale[...].tolist()
      [0.0, 2.0]
    """
    for bn in _layers(model):
        for name in ("scale", "bias"):
            var = getattr(bn, name)
            fn = K.get_constraint(getattr(bn, f"{name}_constraint"), name=f"{name}_constraint")
            if fn is not None and var is not None:
                var[...] = fn(var[...]).astype(var.dtype)
