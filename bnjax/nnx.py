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
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bnjax import keras as K
from bnjax._checks import check_input, check_mode
from bnjax._layer import (
    DEFAULT_EPSILON,
    check_layer,
    layer_batch_norm,
    resolve_training,
    stats_dtype,
    warn_if_default_epsilon,
)
from bnjax.nnx_batch_renorm import BatchRenorm
from bnjax.variants import init_renorm_stats

Array = jax.Array
Initializer = Callable[..., Array]

__all__ = ["BatchNorm", "BatchRenorm", "apply_constraints", "regularization_loss"]


class BatchNorm(nnx.Module):
    """Batch normalization (Ioffe and Szegedy, 2015) with Keras semantics for Flax NNX.

    Training mode normalizes with the batch statistics and updates the moving ones
    (``moving = momentum * moving + (1 - momentum) * batch``); inference mode uses the moving
    statistics. A drop-in for ``flax.nnx.BatchNorm``: the same constructor arguments with
    their Flax meaning, ``use_running_average`` (default False: a new layer trains until
    ``model.eval()``), the same call ``bn(x, use_running_average)``, and the same draws from
    ``rngs`` (one ``rngs.params()`` for ``scale`` and one for ``bias``, none for the
    statistics), so swapping the layer leaves every other layer's initialization unchanged.
    The defaults are Keras' (momentum 0.99, epsilon 1e-3; pass ``epsilon=1e-5`` to keep a
    Flax model's numbers: a layer built with ``rngs`` and no epsilon, as a port of
    ``flax.nnx.BatchNorm`` is, warns once), and ``use_fast_variance`` changes nothing: the
    variance is always computed the exact way (see ``bnjax.BatchNorm``). With
    ``promote_dtype`` left at None the output has the input's dtype; a given function is
    applied as Flax applies it.

    Args:
      num_features: size of the feature axis (or the feature shape, a tuple, for several
        feature axes).
      use_running_average: NNX-style mode (``model.train()`` / ``model.eval()`` set it).
      axis: feature axis or axes.
      momentum: weight on the old moving value.
      epsilon: added to the variance inside the square root.
      dtype: output dtype; defaults to the input's.
      param_dtype: dtype of the parameters (the moving statistics are float32 or wider).
      use_bias: learn ``bias`` (Keras ``center``).
      use_scale: learn ``scale`` (Keras ``scale``).
      bias_init: initializer of ``bias``.
      scale_init: initializer of ``scale``.
      axis_name: named mapped axis for synchronized statistics.
      axis_index_groups: groups of ``axis_name`` synchronized separately.
      use_fast_variance: Flax's switch; no effect.
      promote_dtype: None (bnjax's dtypes), or Flax's hook
        ``fn((x, mean, var, scale, bias), dtype=dtype) -> tuple`` applied before normalizing.
      rngs: random streams for the initializers; optional, as the default initializers
        are constant.
      bias_metadata: metadata of the ``bias`` ``nnx.Param``.
      scale_metadata: metadata of the ``scale`` ``nnx.Param``.
      mean_init: initializer of the moving mean (called with a fixed key).
      var_init: initializer of the moving variance (called with a fixed key).
      frozen: Keras ``trainable=False``: inference mode always, no updates, zero gradients
        for ``scale`` and ``bias``, no penalties, no constraints.
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
        use_running_average: bool | None = False,
        axis: int | Sequence[int] = -1,
        momentum: float = 0.99,
        epsilon: float = DEFAULT_EPSILON,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = nnx.initializers.zeros,
        scale_init: Initializer = nnx.initializers.ones,
        axis_name: str | Sequence[str] | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Callable[..., Any] | None = None,
        rngs: nnx.Rngs | None = None,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        mean_init: Initializer = nnx.initializers.zeros,
        var_init: Initializer = nnx.initializers.ones,
        frozen: bool = False,
        guard_non_finite: bool = True,
        renorm: bool = False,
        renorm_clipping: Mapping[str, Any] | Callable[[Array], Mapping[str, Any]] | None = None,
        renorm_momentum: float = 0.99,
        virtual_batch_size: int | None = None,
        scale_regularizer: Callable[[Array], Array] | str | None = None,
        bias_regularizer: Callable[[Array], Array] | str | None = None,
        scale_constraint: Callable[[Array], Array] | str | None = None,
        bias_constraint: Callable[[Array], Array] | str | None = None,
    ) -> None:
        if isinstance(num_features, int) and not isinstance(num_features, bool):
            feature_shape: tuple[int, ...] = (num_features,)
        elif isinstance(num_features, Sequence) and all(
                isinstance(n, int) and not isinstance(n, bool) for n in num_features):
            feature_shape = tuple(int(n) for n in num_features)
        else:
            feature_shape = ()
        if not feature_shape or any(n < 1 for n in feature_shape):
            raise ValueError(
                f"num_features={num_features!r} must be a positive int (or a tuple of them, "
                "the feature shape for several feature axes)."
            )
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.frozen = frozen
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
        check_layer(self)
        check_mode("use_running_average", use_running_average)
        if rngs is not None:  # built as flax.nnx.BatchNorm must be
            warn_if_default_epsilon(epsilon, "is built as flax.nnx.BatchNorm is (with rngs)")

        def draw(init: Initializer, metadata: Mapping[str, Any]) -> Any:
            # One draw per parameter, as flax.nnx.BatchNorm makes (none without rngs).
            key = rngs.params() if rngs is not None else jax.random.key(0)
            return nnx.Param(jnp.asarray(init(key, feature_shape, param_dtype), param_dtype),
                             **metadata)

        def stat(init: Initializer) -> Any:
            dt = stats_dtype(param_dtype)
            return nnx.BatchStat(jnp.asarray(init(jax.random.key(0), feature_shape, dt), dt))

        self.mean = stat(mean_init)
        self.var = stat(var_init)
        self.scale = draw(scale_init, scale_metadata) if use_scale else nnx.data(None)
        self.bias = draw(bias_init, bias_metadata) if use_bias else nnx.data(None)
        if renorm:
            stats = init_renorm_stats({"mean": self.mean[...], "var": self.var[...]})
            self.std = nnx.BatchStat(stats["std"])
            self.renorm_mean = nnx.BatchStat(stats["renorm_mean"])
            self.renorm_std = nnx.BatchStat(stats["renorm_std"])
            if callable(renorm_clipping):
                self.renorm_step = nnx.BatchStat(jnp.zeros((), jnp.int32))

    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        training: bool | None = None,
        mask: Array | None = None,
    ) -> Array:
        """Normalizes ``x``.

        Args:
          x: input ``(..., C)`` (feature axes ``self.axis``).
          use_running_average: Flax style, as in ``flax.nnx.BatchNorm``; overrides the
            attribute.
          training: Keras style, keyword only; overrides the attribute.
          mask: optional boolean shaped like ``x`` without its feature axes, or
            broadcastable to ``x``; masked-out values take no part in anything.

        Returns:
          The normalized input, in ``self.dtype`` or the input's dtype.
        """
        check_input(x)
        if training is None and use_running_average is None:
            use_running_average = self.use_running_average
        train = resolve_training(training, use_running_average, frozen=self.frozen)
        names = ("mean", "var", *(("std", "renorm_mean", "renorm_std") if self.renorm else ()))
        stats = {name: getattr(self, name)[...] for name in names}
        params = self.params()
        if self.promote_dtype is not None:
            x, stats["mean"], stats["var"], scale, bias = self.promote_dtype(
                (x, stats["mean"], stats["var"], params.get("scale"), params.get("bias")),
                dtype=self.dtype)
            params = {k: v for k, v in (("scale", scale), ("bias", bias)) if v is not None}
        y, new = layer_batch_norm(self, x, stats, params, training=train, mask=mask,
                                  clipping=self._clipping() if train else None)
        if train:
            # As flax.nnx.BatchNorm: no gradient flows into statistics held in array refs.
            stop = any(getattr(getattr(self, n), "_can_update", False) for n in names)
            for name in names:
                value, dtype = new[name], getattr(self, name)[...].dtype
                if jnp.iscomplexobj(value) and not jnp.issubdtype(dtype, jnp.complexfloating):
                    value = jnp.real(value)  # as flax.nnx.BatchNorm's real array keeps it
                value = value.astype(dtype)
                getattr(self, name)[...] = jax.lax.stop_gradient(value) if stop else value
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
