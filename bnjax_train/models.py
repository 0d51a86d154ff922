"""A small model zoo with a pluggable normalization layer.

Every model is a ``flax.linen`` module called as ``model(x, training)``; its normalization
layers come from one factory, :func:`make_norm`, so a config switches batch norm off (or to
another norm) with one field. :func:`create_model` builds a model by name:

- ``"cnn1d"``: a 1D conv net for MNIST-1D (inputs ``(batch, length)`` or
  ``(batch, length, channels)``).
- ``"mlp"``: the batch-norm paper's MNIST network, three sigmoid hidden layers of 100 units
  with the norm between each dense layer and its nonlinearity.
- ``"kmnist_cnn"``: Conv32-BN-Pool-BN-Conv64-BN-Pool-BN-Dense256-BN-Dense10.
- ``"resnet20"``: the CIFAR ResNet-20 of He et al. (2016) with identity (zero-padded)
  shortcuts; the last norm of each residual block starts with a zero scale.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnjax import BatchNorm, renorm_schedule

Array = jax.Array

__all__ = [
    "CNN1D",
    "MLP",
    "FlaxBatchNorm",
    "MODELS",
    "NORMS",
    "NORM_DEFAULTS",
    "BatchFreeNorm",
    "Identity",
    "KMNISTCNN",
    "ResNet20",
    "create_model",
    "make_norm",
]

#: Names accepted by :func:`make_norm` (and by the ``norm`` config field).
NORMS: tuple[str, ...] = ("batch", "renorm", "ghost", "group", "layer", "none", "flax")

#: Defaults of the variant norms (the models' ``norm_kwargs`` override them).
NORM_DEFAULTS: dict[str, dict[str, Any]] = {
    # Ioffe (2017)'s clipping ramp, on a ~10x shorter time scale than the paper's ImageNet runs.
    "renorm": {"renorm": True, "renorm_momentum": 0.99, "renorm_clipping": functools.partial(
        renorm_schedule, warmup_steps=500, rmax_steps=4000, dmax_steps=2500)},
    "ghost": {"virtual_batch_size": 16},
    "group": {"num_groups": 8},
    "layer": {},
}


class BatchFreeNorm(nn.Module):
    """Group or layer normalization (statistics per example), called like the batch norms.

    ``"group"``: ``flax.linen.GroupNorm`` with ``gcd(num_groups, C)`` groups (so any channel
    count works: 100 features get 4 groups of 25); ``"layer"``: ``flax.linen.LayerNorm`` over
    the last axis. ``training`` is accepted and ignored: these norms behave the same in
    training and inference, whatever the batch size.

    Attributes:
      kind: ``"group"`` or ``"layer"``.
      num_groups: groups for ``"group"`` (at most; see above).
      epsilon: added to the variance (1e-3, the Keras default).
      scale_init: initializer of the scale.
      bias_init: initializer of the bias.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> norm = BatchFreeNorm("group", num_groups=2)
      >>> x = jnp.arange(8.0).reshape(2, 4)
      >>> variables = norm.init(jax.random.key(0), x, training=True)
      >>> [[round(v, 2) for v in row] for row in norm.apply(variables, x).tolist()]
      [[-1.0, 1.0, -1.0, 1.0], [-1.0, 1.0, -1.0, 1.0]]
    """

    kind: str = "group"
    num_groups: int = 8
    epsilon: float = 1e-3
    scale_init: Callable[..., Array] = nn.initializers.ones
    bias_init: Callable[..., Array] = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Array, training: bool | None = None, **kwargs: Any) -> Array:
        """Normalizes each example of ``x`` (channels last); ``training`` is ignored."""
        del training, kwargs
        if self.kind == "layer":
            return nn.LayerNorm(epsilon=self.epsilon, scale_init=self.scale_init,
                                bias_init=self.bias_init)(x)
        groups = math.gcd(int(self.num_groups), x.shape[-1])
        return nn.GroupNorm(num_groups=groups, epsilon=self.epsilon,
                            scale_init=self.scale_init, bias_init=self.bias_init)(x)


class FlaxBatchNorm(nn.BatchNorm):
    """``flax.linen.BatchNorm`` itself, called like the zoo's other norms: ``norm(x, training=t)``.

    ``make_norm("flax")``: Flax's layer with Keras' momentum and epsilon (0.99, 1e-3), as the
    zoo's bnjax layers have them. The baseline of the benchmarks, and a model for
    ``bnjax.replacing_flax_batch_norm`` to swap (it replaces the ``super().__call__``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = FlaxBatchNorm()
      >>> x = jnp.array([[0.0], [2.0]])
      >>> v = layer.init(jax.random.key(0), x, training=False)
      >>> y, upd = layer.apply(v, x, training=True, mutable=["batch_stats"])
      >>> [round(float(a), 4) for a in y.ravel()], round(float(upd["batch_stats"]["mean"][0]), 4)
      ([-0.9995, 0.9995], 0.01)
    """

    epsilon: float = 1e-3

    def __call__(self, x: Array, use_running_average: bool | None = None, *,
                 training: bool | None = None, mask: Array | None = None) -> Array:
        """Flax's call; ``training=True`` is ``use_running_average=False``."""
        if training is not None:
            use_running_average = not training
        return super().__call__(x, use_running_average, mask=mask)


class Identity(nn.Module):
    """A norm that does nothing: ``make_norm("none")``; accepts and ignores ``training``.

    Example:
      >>> import jax.numpy as jnp
      >>> Identity().apply({}, jnp.ones(3), training=True).tolist()
      [1.0, 1.0, 1.0]
    """

    @nn.compact
    def __call__(self, x: Array, training: bool | None = None, **kwargs: Any) -> Array:
        """Returns ``x`` unchanged."""
        del training, kwargs
        return x


def make_norm(norm: str, *, axis_name: str | None = None, **kw: Any) -> nn.Module:
    """Builds the normalization layer named by ``norm``.

    The layer is called as ``layer(x, training=...)`` and normalizes over the last axis.

    Args:
      norm: one of ``NORMS``: ``"batch"`` (``bnjax.BatchNorm``), ``"renorm"`` (batch
        renormalization with a clipping ramp), ``"ghost"`` (ghost batches of 16 examples:
        the per-device batch must be a multiple), ``"group"`` / ``"layer"``
        (:class:`BatchFreeNorm`, no batch statistics at all), ``"none"`` (identity) or
        ``"flax"`` (:class:`FlaxBatchNorm`, Flax's own layer, the benchmarks' baseline). The
        variants start from ``NORM_DEFAULTS``; ``kw`` overrides them.
      axis_name: mapped axis for synchronized statistics (the batch norms under ``pmap``;
        ignored by group and layer norm, which need none).
      **kw: passed to the layer (e.g. ``momentum``, ``virtual_batch_size``, ``num_groups``,
        ``scale_init``, ``name``); ``"none"`` ignores all but ``name``.

    Returns:
      An unbound flax module.

    Raises:
      ValueError: ``norm`` is not one of ``NORMS``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = make_norm("batch", momentum=0.9)
      >>> variables = layer.init(jax.random.key(0), jnp.ones((4, 3)), training=False)
      >>> sorted(variables)
      ['batch_stats', 'params']
    """
    if norm == "batch":
        return BatchNorm(axis_name=axis_name, **kw)
    if norm in ("renorm", "ghost"):
        return BatchNorm(axis_name=axis_name, **{**NORM_DEFAULTS[norm], **kw})
    if norm in ("group", "layer"):
        return BatchFreeNorm(kind=norm, **{**NORM_DEFAULTS[norm], **kw})
    if norm == "none":
        return Identity(name=kw.get("name"))
    if norm == "flax":
        return FlaxBatchNorm(axis_name=axis_name, **kw)
    raise ValueError(f"norm={norm!r} is not a known normalization; accepted: {list(NORMS)}.")


def _norm(model: nn.Module, **kw: Any) -> nn.Module:
    """The norm layer a zoo model asks for: its ``norm``, ``axis_name`` and ``norm_kwargs``."""
    options = dict((model.norm_kwargs or {}).get(model.norm, {}))
    return make_norm(model.norm, axis_name=model.axis_name, **{**kw, **options})


class CNN1D(nn.Module):
    """A 1D conv net for MNIST-1D: conv blocks (conv, norm, relu), max pooling, a dense head.

    Attributes:
      num_classes: number of output logits.
      features: channels of each conv layer.
      kernel_size: conv kernel width.
      pool_after: indices of the conv layers followed by a max-pool of 2.
      hidden: width of the dense layer before the output (0: none).
      norm: normalization name (see :func:`make_norm`).
      axis_name: mapped axis for synchronized batch statistics.
      norm_kwargs: per-norm arguments of :func:`make_norm`, ``{norm name: kwargs}`` (e.g.
        ``{"ghost": {"virtual_batch_size": 8}, "group": {"num_groups": 4}}``); only the
        entry of ``norm`` is used, so a config can switch ``norm`` alone.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = CNN1D(num_classes=10)
      >>> x = jax.ShapeDtypeStruct((2, 40), jnp.float32)  # shapes only: nothing runs
      >>> variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, training=False),
      ...                            x)
      >>> jax.eval_shape(lambda v, x: model.apply(v, x, training=False), variables, x).shape
      (2, 10)
    """

    num_classes: int = 10
    features: Sequence[int] = (32, 32, 64, 64)
    kernel_size: int = 5
    pool_after: Sequence[int] = (1, 3)
    hidden: int = 128
    norm: str = "batch"
    axis_name: str | None = None
    norm_kwargs: Mapping[str, Any] | None = None

    @nn.compact
    def __call__(self, x: Array, training: bool) -> Array:
        """Logits for inputs ``(batch, length)`` or ``(batch, length, channels)``."""
        if x.ndim == 2:
            x = x[..., None]
        use_bias = self.norm == "none"
        for i, f in enumerate(self.features):
            x = nn.Conv(f, (self.kernel_size,), padding="SAME", use_bias=use_bias)(x)
            x = _norm(self)(x, training=training)
            x = nn.relu(x)
            if i in self.pool_after:
                x = nn.max_pool(x, (2,), strides=(2,))
        x = x.reshape((x.shape[0], -1))
        if self.hidden:
            x = nn.Dense(self.hidden, use_bias=use_bias)(x)
            x = _norm(self)(x, training=training)
            x = nn.relu(x)
        return nn.Dense(self.num_classes)(x)


class MLP(nn.Module):
    """The batch-norm paper's MNIST network: dense, norm, sigmoid, three times, then logits.

    Attributes:
      num_classes: number of output logits.
      hidden: widths of the hidden layers.
      norm: normalization name (see :func:`make_norm`); ``"none"`` is the paper's baseline.
      axis_name: mapped axis for synchronized batch statistics.
      norm_kwargs: per-norm arguments of :func:`make_norm`, ``{norm name: kwargs}`` (e.g.
        ``{"ghost": {"virtual_batch_size": 8}, "group": {"num_groups": 4}}``); only the
        entry of ``norm`` is used, so a config can switch ``norm`` alone.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = MLP(num_classes=10, norm="none")
      >>> x = jnp.zeros((2, 28, 28, 1))
      >>> variables = model.init(jax.random.key(0), x, training=False)
      >>> model.apply(variables, x, training=False).shape
      (2, 10)
    """

    num_classes: int = 10
    hidden: Sequence[int] = (100, 100, 100)
    norm: str = "batch"
    axis_name: str | None = None
    norm_kwargs: Mapping[str, Any] | None = None

    @nn.compact
    def __call__(self, x: Array, training: bool) -> Array:
        """Logits for inputs of any shape ``(batch, ...)`` (flattened)."""
        x = x.reshape((x.shape[0], -1))
        for h in self.hidden:
            x = nn.Dense(h, use_bias=self.norm == "none")(x)
            x = _norm(self)(x, training=training)
            x = nn.sigmoid(x)
        return nn.Dense(self.num_classes)(x)


class KMNISTCNN(nn.Module):
    """Conv32-BN-Pool-BN-Conv64-BN-Pool-BN-Dense256-BN-Dense10 (ReLU after conv and dense).

    Attributes:
      num_classes: number of output logits.
      norm: normalization name (see :func:`make_norm`).
      axis_name: mapped axis for synchronized batch statistics.
      norm_kwargs: per-norm arguments of :func:`make_norm`, ``{norm name: kwargs}`` (e.g.
        ``{"ghost": {"virtual_batch_size": 8}, "group": {"num_groups": 4}}``); only the
        entry of ``norm`` is used, so a config can switch ``norm`` alone.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = KMNISTCNN(num_classes=10)
      >>> x = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)  # shapes only: nothing runs
      >>> variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, training=False),
      ...                            x)
      >>> jax.eval_shape(lambda v, x: model.apply(v, x, training=False), variables, x).shape
      (2, 10)
    """

    num_classes: int = 10
    norm: str = "batch"
    axis_name: str | None = None
    norm_kwargs: Mapping[str, Any] | None = None

    @nn.compact
    def __call__(self, x: Array, training: bool) -> Array:
        """Logits for images ``(batch, height, width, channels)``."""
        if x.ndim == 3:
            x = x[..., None]

        def norm(y: Array) -> Array:
            return _norm(self)(y, training=training)

        x = norm(nn.relu(nn.Conv(32, (3, 3), padding="SAME")(x)))
        x = norm(nn.max_pool(x, (2, 2), strides=(2, 2)))
        x = norm(nn.relu(nn.Conv(64, (3, 3), padding="SAME")(x)))
        x = norm(nn.max_pool(x, (2, 2), strides=(2, 2)))
        x = x.reshape((x.shape[0], -1))
        x = norm(nn.relu(nn.Dense(256)(x)))
        return nn.Dense(self.num_classes)(x)


class _ResidualBlock(nn.Module):
    """conv3x3-norm-relu-conv3x3-norm (zero-initialized scale) plus shortcut, then relu."""

    features: int
    strides: int
    norm: str
    axis_name: str | None
    norm_kwargs: Mapping[str, Any] | None = None

    @nn.compact
    def __call__(self, x: Array, training: bool) -> Array:
        conv = lambda f, s: nn.Conv(  # noqa: E731
            f, (3, 3), strides=(s, s), padding="SAME", use_bias=False,
            kernel_init=nn.initializers.kaiming_normal())
        y = conv(self.features, self.strides)(x)
        y = _norm(self)(y, training=training)
        y = nn.relu(y)
        y = conv(self.features, 1)(y)
        y = _norm(self, scale_init=nn.initializers.zeros)(y, training=training)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            # He et al.'s option A: subsample, then zero-pad the new channels.
            shortcut = x[:, :: self.strides, :: self.strides, :]
            pad = self.features - x.shape[-1]
            shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (pad // 2, pad - pad // 2)))
        return nn.relu(y + shortcut)


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al., 2016): 3 stages of 3 residual blocks, 16/32/64 channels.

    The last norm of each residual block is built with a zero scale, so every block starts as
    the identity (Goyal et al., 2017).

    Attributes:
      num_classes: number of output logits.
      norm: normalization name (see :func:`make_norm`).
      axis_name: mapped axis for synchronized batch statistics.
      norm_kwargs: per-norm arguments of :func:`make_norm`, ``{norm name: kwargs}`` (e.g.
        ``{"ghost": {"virtual_batch_size": 8}, "group": {"num_groups": 4}}``); only the
        entry of ``norm`` is used, so a config can switch ``norm`` alone.
      blocks_per_stage: residual blocks per stage (3 for ResNet-20, 5 for ResNet-32).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = ResNet20(num_classes=10)
      >>> x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)  # shapes only: nothing runs
      >>> variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, training=False),
      ...                            x)
      >>> jax.eval_shape(lambda v, x: model.apply(v, x, training=False), variables, x).shape
      (2, 10)
    """

    num_classes: int = 10
    norm: str = "batch"
    axis_name: str | None = None
    blocks_per_stage: int = 3
    norm_kwargs: Mapping[str, Any] | None = None

    @nn.compact
    def __call__(self, x: Array, training: bool) -> Array:
        """Logits for images ``(batch, height, width, channels)``."""
        if x.ndim == 3:
            x = x[..., None]
        x = nn.Conv(16, (3, 3), padding="SAME", use_bias=False,
                    kernel_init=nn.initializers.kaiming_normal())(x)
        x = nn.relu(_norm(self)(x, training=training))
        for stage, features in enumerate((16, 32, 64)):
            for block in range(self.blocks_per_stage):
                strides = 2 if stage > 0 and block == 0 else 1
                x = _ResidualBlock(features, strides, self.norm, self.axis_name,
                                   self.norm_kwargs)(x, training)
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


#: Model constructors by name (see :func:`create_model`).
MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn1d": CNN1D,
    "mlp": MLP,
    "kmnist_cnn": KMNISTCNN,
    "resnet20": ResNet20,
}


def create_model(
    name: str,
    *,
    num_classes: int,
    norm: str = "batch",
    axis_name: str | None = None,
    **kw: Any,
) -> nn.Module:
    """Builds a model of the zoo by name.

    Args:
      name: one of ``MODELS``: ``"cnn1d"``, ``"mlp"``, ``"kmnist_cnn"``, ``"resnet20"``.
      num_classes: number of output logits (>= 2).
      norm: normalization name, one of ``NORMS``.
      axis_name: mapped axis for synchronized batch statistics (``"batch"`` in the
        data-parallel train step); None outside ``pmap``.
      **kw: model-specific attributes (e.g. ``features`` for ``"cnn1d"``).

    Returns:
      The flax module; call it as ``model.apply(variables, x, training=...)``.

    Raises:
      ValueError: unknown ``name`` or ``norm``, or ``num_classes`` < 2.
      TypeError: an attribute in ``kw`` that the model does not have.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = create_model("mlp", num_classes=10, norm="none")
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 40)), training=False)
      >>> model.apply(variables, jnp.zeros((3, 40)), training=False).shape
      (3, 10)
    """
    if name not in MODELS:
        raise ValueError(f"model={name!r} is not a known model; accepted: {sorted(MODELS)}.")
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not a known normalization; accepted: {list(NORMS)}.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r} must be an integer >= 2.")
    cls = MODELS[name]
    fields = set(cls.__dataclass_fields__) - {"parent", "name"}
    unknown = sorted(set(kw) - fields)
    if unknown:
        raise TypeError(
            f"model {name!r} has no attribute(s) {unknown}; its attributes are "
            f"{sorted(fields - {'num_classes', 'norm', 'axis_name'})}."
        )
    return cls(num_classes=num_classes, norm=norm, axis_name=axis_name, **kw)
