"""``bnjax.BatchNorm``: a flax.linen batch-norm layer with Keras semantics, a Flax drop-in.

The layer holds variables and chooses the mode; the arithmetic is ``bnjax.functional``.
It takes every field of ``flax.linen.BatchNorm`` with its Flax meaning, the same calling
convention (``bn(x, use_running_average)``), and the same variable names
(``params/{scale,bias}`` and ``batch_stats/{mean,var}``), so replacing ``nn.BatchNorm`` by
``bnjax.BatchNorm`` is the whole port (with ``epsilon=1e-5`` where Flax's default was used:
bnjax's is Keras's 1e-3, and a Flax-style call that leaves it out warns once) and checkpoints
move between the two.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnjax import keras
from bnjax._checks import canonicalize_axes, check_input
from bnjax._layer import (
    DEFAULT_EPSILON,
    check_layer,
    layer_batch_norm,
    resolve_training,
    stats_dtype,
    warn_if_default_epsilon,
)
from bnjax.stats import moments

Array = jax.Array
Initializer = Callable[..., Array]

__all__ = ["BatchNorm", "make_constrain_fn", "resolve_training"]


class BatchNorm(nn.Module):
    """Batch normalization (Ioffe and Szegedy, 2015) with Keras semantics for flax.linen.

    Training mode normalizes with the batch mean and biased batch variance and updates
    ``moving = momentum * moving + (1 - momentum) * batch``; inference mode normalizes with the
    moving statistics. The mode comes from ``use_running_average`` (Flax style: the second
    positional argument of the call, or the field) or the keyword-only ``training`` (Keras
    style: ``training=True`` is ``use_running_average=False``). A call-time
    ``use_running_average`` overrides the field; ``training`` must agree with the field when
    both are set.

    A drop-in for ``flax.linen.BatchNorm``: every Flax field is accepted with its Flax
    meaning, and ``bn(x, not train)`` means what it means in Flax. The differences are
    bnjax's defaults and where it always does better:

    - ``momentum=0.99`` and ``epsilon=1e-3`` are Keras' defaults (Flax: 0.99 and 1e-5);
      pass ``epsilon=1e-5`` to keep a Flax model's numbers. A layer whose mode comes from
      ``use_running_average`` (a Flax-style call) with epsilon left out warns once
      (``bnjax.FlaxEpsilonWarning``); giving epsilon, either value, silences it.
    - ``use_fast_variance``: the variance is always computed from shifted sums, which are
      as fast as Flax's fast formula and stay exact where ``E[x^2] - E[x]^2`` loses every
      digit (large ``|mean| / std``); the flag changes nothing.
    - ``force_float32_reductions``: the batch statistics are always reduced in float32 (or
      float64 for float64 input). With False, the moving statistics are stored in
      ``param_dtype``, as Flax stores them; with True (default) in float32.
    - ``dtype=None`` gives the input's dtype (Flax promotes the input with the parameters:
      a bfloat16 input gives float32 there, bfloat16 here).

    A ``frozen=True`` layer follows the Keras ``trainable=False`` rule: it always runs in
    inference mode with the moving statistics and never updates them, whatever the mode
    says, and its ``scale`` and ``bias`` get zero gradients. Zero gradients alone do not
    keep them still under momentum, Adam or decoupled weight decay: ``bnjax.make_train_step``
    holds them bit-identical, and ``bnjax.keep_frozen(tx, bnjax.trainable_mask(model, ...))``
    does so in a loop of your own.

    Attributes:
      use_running_average: Flax-style mode (True: moving statistics), overridable at call.
      axis: feature axis or axes (int or tuple); every other axis is reduced.
      momentum: weight on the old moving value (Keras 0.99; PyTorch's 0.1 is 0.9 here).
      epsilon: added to the variance inside the square root; static, finite, > 0.
      dtype: output dtype; defaults to the input's.
      param_dtype: dtype of the parameters (a float dtype).
      use_bias: learn a per-feature offset (Keras ``center``).
      use_scale: learn a per-feature scale (Keras ``scale``).
      bias_init: initializer of the bias (Keras ``beta_initializer``).
      scale_init: initializer of the scale (Keras ``gamma_initializer``).
      axis_name: named mapped axis for synchronized (cross-device) statistics.
      axis_index_groups: groups of ``axis_name`` synchronized separately.
      use_fast_variance: Flax's switch; no effect (see above).
      force_float32_reductions: Flax's switch; False stores the moving statistics in
        ``param_dtype`` (see above).
      mean_init: initializer of the moving mean (Keras ``moving_mean_initializer``).
      var_init: initializer of the moving variance (Keras ``moving_variance_initializer``).
      frozen: Keras ``trainable=False``: inference mode always, no updates, zero gradients
        for ``scale`` and ``bias``.
      guard_non_finite: keep a feature's moving statistics unchanged when its batch
        statistics (or the updated ones) are not finite: a NaN or Inf batch never poisons
        them.
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
        ``bnjax.make_constrain_fn(model, ...)``.
      bias_constraint: Keras ``beta_constraint``, likewise.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> bn = BatchNorm(epsilon=1e-5)  # called as flax.linen.BatchNorm: give epsilon
      >>> x = jnp.arange(12.0).reshape(4, 3)
      >>> variables = bn.init(jax.random.key(0), x, use_running_average=True)
      >>> y, updates = bn.apply(variables, x, False, mutable=["batch_stats"])  # as in Flax
      >>> y.shape, updates["batch_stats"]["mean"].shape
      ((4, 3), (3,))
    """

    use_running_average: bool | None = None
    axis: int | Sequence[int] = -1
    momentum: float = 0.99
    epsilon: float = DEFAULT_EPSILON
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = nn.initializers.zeros
    scale_init: Initializer = nn.initializers.ones
    axis_name: str | Sequence[str] | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    mean_init: Initializer = nn.initializers.zeros
    var_init: Initializer = nn.initializers.ones
    frozen: bool = False
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
        use_running_average: bool | None = None,
        *,
        training: bool | None = None,
        mask: Array | None = None,
    ) -> Array:
        """Normalizes ``x``.

        Args:
          x: input ``(..., C)`` (feature axes ``self.axis``).
          use_running_average: Flax style, as in ``flax.linen.BatchNorm``: True for the
            moving statistics, False for batch statistics (and moving-statistics updates);
            overrides the field of the same name.
          training: Keras style, keyword only: True for batch statistics, False for the
            moving statistics.
          mask: optional boolean shaped like ``x`` without its feature axes, or
            broadcastable to ``x``; masked-out values take no part in anything (see
            ``bnjax.batch_norm``).

        Returns:
          The normalized input, in ``self.dtype`` or the input's dtype.
        """
        check_input(x)
        check_layer(self)
        if use_running_average is None:
            use_running_average = self.use_running_average
        train = resolve_training(training, use_running_average, frozen=self.frozen)
        if training is None and not self.frozen:  # the mode given as flax.linen's is
            warn_if_default_epsilon(self.epsilon, "is called as flax.linen.BatchNorm is "
                                    "(use_running_average)")
        axes = canonicalize_axes(self.axis, x.ndim)
        feature_shape = tuple(x.shape[a] for a in axes)
        stats = self._stats(feature_shape)
        params = {}
        if self.use_scale:
            params["scale"] = self.param("scale", self.scale_init, feature_shape,
                                         self.param_dtype)
        if self.use_bias:
            params["bias"] = self.param("bias", self.bias_init, feature_shape, self.param_dtype)
        step = None
        if self.renorm and callable(self.renorm_clipping):
            step = self.variable("batch_stats", "renorm_step", lambda: jnp.zeros((), jnp.int32))
        self._sow_penalties(params)
        current = {k: v.value for k, v in stats.items()}
        if train and self.is_initializing():
            # As flax.linen.BatchNorm: `init` in training mode normalizes with the statistics
            # of the local batch, updates nothing and runs no collective (so it works outside
            # pmap with `axis_name` set, and on a batch of one).
            batch = moments(x, self.axis, mask=mask)
            current = {**current, "mean": batch.mean, "var": batch.var}
            train = False
        if not train:
            y, _ = layer_batch_norm(self, x, current, params, training=False, mask=mask,
                                    clipping=None)
            return y
        if not self.is_mutable_collection("batch_stats"):
            raise ValueError(
                f'BatchNorm at "/{"/".join(self.scope.path)}" is in training mode, which '
                "updates the moving statistics, but the 'batch_stats' collection is not "
                "mutable. Pass mutable=['batch_stats'] to apply() with the model's own "
                "training argument, e.g. model.apply(variables, x, <training argument>, "
                "mutable=['batch_stats']) (for this layer alone: use_running_average=False), "
                "or run it with the moving statistics."
            )
        y, new = layer_batch_norm(self, x, current, params, training=True, mask=mask,
                                  clipping=self._clipping(step))
        for key, var in stats.items():
            var.value = new[key]
        return y

    def _stats(self, feature_shape: tuple[int, ...]) -> dict[str, Any]:
        """Declares the moving statistics (no random draws, as in Flax), checked in shape."""
        dtype = stats_dtype(self.param_dtype, self.force_float32_reductions)

        def make(init: Initializer) -> Callable[[], Array]:
            # A fixed key: drawing from the "params" stream would change the keys of the
            # parameters declared after it, unlike flax.linen.BatchNorm.
            return lambda: jnp.asarray(init(jax.random.key(0), feature_shape, dtype), dtype)

        out = {"mean": self.variable("batch_stats", "mean", make(self.mean_init)),
               "var": self.variable("batch_stats", "var", make(self.var_init))}
        if self.renorm:
            std = lambda: jnp.sqrt(out["var"].value)  # noqa: E731
            out["std"] = self.variable("batch_stats", "std", std)
            out["renorm_mean"] = self.variable("batch_stats", "renorm_mean",
                                               lambda: out["mean"].value)
            out["renorm_std"] = self.variable("batch_stats", "renorm_std", std)
        for name, v in out.items():
            if tuple(v.value.shape) != feature_shape:
                raise ValueError(
                    f"batch_stats['{name}'] has shape {tuple(v.value.shape)} but the input "
                    f"has feature shape {feature_shape} (axis={self.axis!r}); the layer was "
                    "built for another number of features."
                )
        return out

    def _clipping(self, step: Any) -> Mapping[str, Any] | None:
        """The renorm clipping for this step; a schedule counts steps in ``renorm_step``."""
        if step is None:
            return None if self.renorm_clipping is None else dict(self.renorm_clipping)
        clipping = self.renorm_clipping(step.value)
        step.value = step.value + 1
        return clipping

    def _sow_penalties(self, params: Mapping[str, Array]) -> None:
        """Keras weight regularization: sows the penalty into ``losses`` (once per layer)."""
        if self.frozen or self.is_initializing() or not self.is_mutable_collection("losses"):
            return
        if self.scale_regularizer is None and self.bias_regularizer is None:
            return
        penalty = keras.regularization_penalty(params, self.scale_regularizer,
                                               self.bias_regularizer)
        self.sow("losses", "regularization", penalty, init_fn=lambda: 0.0,
                 reduce_fn=lambda _, new: new)


def make_constrain_fn(model: Any, *example_args: Any, **example_kwargs: Any
                      ) -> Callable[[Any], Any]:
    """Builds ``constrain_fn(params) -> params`` for every constrained layer of a linen model.

    The model is traced once abstractly (``jax.eval_shape`` of ``model.init`` with the example
    arguments; nothing is computed) to find each layer with a ``scale_constraint`` or
    ``bias_constraint`` and its place in the params tree. Frozen layers are left alone, as
    Keras applies constraints only to the weights the optimizer updates.

    Args:
      model: a ``flax.linen`` module.
      *example_args: positional arguments for ``model.init`` after the key (e.g. an input).
      **example_kwargs: keyword arguments for ``model.init`` (e.g. ``training=False``).

    Returns:
      A pure function of the params tree, suitable for ``jax.jit`` and for
      ``bnjax.make_train_step(constrain_fn=...)``.

    Example:
      >>> import jax, jax.numpy as jnp, bnjax
      >>> bn = bnjax.BatchNorm(scale_constraint="non_neg")
      >>> fn = make_constrain_fn(bn, jnp.ones((2, 3)), training=False)
      >>> fn({"scale": jnp.array([-1.0, 1.0, 2.0]), "bias": jnp.zeros(3)})["scale"].tolist()
      [0.0, 1.0, 2.0]
    """
    rules: dict[tuple[str, ...], dict[str, keras.Constraint]] = {}

    def interceptor(next_fun: Callable, args: Any, kwargs: Any, context: Any) -> Any:
        mod = context.module
        if (context.method_name == "__call__" and isinstance(mod, BatchNorm)
                and not mod.frozen):
            found = {}
            for key, attr in (("scale", "scale_constraint"), ("bias", "bias_constraint")):
                if getattr(mod, attr) is not None and getattr(mod, f"use_{key}"):
                    found[key] = keras.get_constraint(getattr(mod, attr), name=attr)
            if found:
                rules[tuple(mod.path)] = found
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda: model.init(jax.random.key(0), *example_args, **example_kwargs))
    frozen_rules = {k: dict(v) for k, v in rules.items()}

    def constrain_fn(params: Any) -> Any:
        return keras.apply_constraints(params, frozen_rules)

    return constrain_fn
