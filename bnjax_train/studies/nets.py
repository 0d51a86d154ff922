"""The studies' network: the zoo's CNN1D, with the layer order and dropout as options.

:class:`StudyCNN1D` computes what :class:`bnjax_train.models.CNN1D` computes (same layers,
same parameter shapes and initializers, the same ``make_norm`` norms), with two differences:

- its convolutions are written as a product of the input's patches with the kernel
  (:class:`PatchConv`). Under ``jax.vmap`` over runs a ``flax.linen.Conv`` with a kernel per
  run becomes a grouped convolution, which XLA runs on CPU tens of times slower than the
  batched matrix product this gives; one run alone is as fast either way;
- ``placement`` puts the norm before the activation (conv-BN-ReLU, the zoo's and the paper's
  order) or after it (conv-ReLU-BN), and ``dropout`` adds dropout before the dense layers.

Images ``(batch, height, width, channels)`` (the ``"digits"`` set) get 2D convolutions and
2x2 pooling, the same layers otherwise. ``noise`` makes "noisy BN" (:class:`NoisyShift` after
every norm), and the input of the output layer is sown as ``intermediates/features``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnjax_train.models import make_norm

Array = jax.Array

__all__ = ["PLACEMENTS", "NoisyShift", "PatchConv", "StudyCNN1D"]

#: Where the norm goes: ``"before"`` the activation (conv-BN-ReLU) or ``"after"`` it.
PLACEMENTS: tuple[str, ...] = ("before", "after")


class PatchConv(nn.Module):
    """A 1D or 2D convolution (``"SAME"`` padding, stride 1) as one matrix product of patches.

    The same function and parameters (``kernel (size, in, out)``, ``bias (out,)``, LeCun
    normal initialization) as ``flax.linen.Conv(features, (kernel_size,), padding="SAME")``;
    on images ``(batch, h, w, in)`` those of ``Conv(features, (kernel_size, kernel_size))``
    (``kernel (size, size, in, out)``).

    Attributes:
      features: output channels.
      kernel_size: kernel width.
      use_bias: add a learned bias.

    Example:
      >>> x = jnp.sin(jnp.arange(18.0)).reshape(2, 9, 1)
      >>> conv = nn.Conv(2, (5,), padding="SAME")
      >>> v = conv.init(jax.random.key(1), x)
      >>> bool(jnp.allclose(PatchConv(2, 5).apply(v, x), conv.apply(v, x), atol=1e-5))
      True
      >>> images = jnp.cos(jnp.arange(50.0)).reshape(2, 5, 5, 1)
      >>> conv2d = nn.Conv(2, (3, 3), padding="SAME")
      >>> v = conv2d.init(jax.random.key(1), images)
      >>> bool(jnp.allclose(PatchConv(2, 3).apply(v, images), conv2d.apply(v, images),
      ...                   atol=1e-5))
      True
    """

    features: int
    kernel_size: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Convolves ``x`` of shape ``(batch, length, channels)`` or ``(batch, h, w, channels)``."""
        k, spatial = self.kernel_size, x.shape[1:-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (k,) * len(spatial) + (x.shape[-1], self.features))
        left = (k - 1) // 2
        padded = jnp.pad(x, ((0, 0),) + ((left, k - 1 - left),) * len(spatial) + ((0, 0),))
        if len(spatial) == 1:
            patches = jnp.stack([padded[:, i:i + spatial[0]] for i in range(k)], axis=2)
        else:  # offsets row-major, as the kernel's (k, k) axes flatten
            h, w = spatial
            patches = jnp.stack([padded[:, i:i + h, j:j + w] for i in range(k)
                                 for j in range(k)], axis=3)
        y = jnp.einsum("...kc,kcf->...f", patches, kernel.reshape(-1, *kernel.shape[-2:]))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,))
        return y


class NoisyShift(nn.Module):
    """"Noisy BN"'s noise: in training, ``y = s * x + m`` per channel, redrawn at every step.

    ``m ~ U(-mean, mean)`` and ``s**2 ~ U(1, var)`` for each channel, drawn from the
    ``"dropout"`` stream (a new draw at every training step): after a batch norm the layer
    that follows sees inputs whose mean and variance jump at every step (Santurkar et al.,
    2018, section 2.1). Inference: ``y = E[s] * x``, the noise's expectation (as dropout
    scales at inference), so that training and inference see inputs of the same size.

    Attributes:
      mean: half-width of the shift's distribution.
      var: upper end of the squared scale's distribution (>= 1).

    Example:
      >>> x = jnp.zeros((4, 3)) + jnp.arange(3.0)
      >>> noisy = NoisyShift(1.0, 4.0).apply({}, x, True, rngs={"dropout": jax.random.key(0)})
      >>> clean = NoisyShift(1.0, 4.0).apply({}, x, False)  # E[s] = 14/9 for var 4
      >>> bool((noisy != x).all()), [round(v, 4) for v in clean[0].tolist()]
      (True, [0.0, 1.5556, 3.1111])
    """

    mean: float = 1.0
    var: float = 4.0

    @nn.compact
    def __call__(self, x: Array, training: bool) -> Array:
        """The noisy ``x`` in training, ``E[s] * x`` in inference."""
        if not (0.0 <= self.mean < float("inf") and 1.0 <= self.var < float("inf")):
            raise ValueError(f"NoisyShift(mean={self.mean!r}, var={self.var!r}): need a finite "
                             "mean >= 0 and a finite var >= 1.")
        if not training:  # E[sqrt(u)] for u ~ U(1, var)
            var = max(float(self.var), 1.0 + 1e-6)
            return x * (2.0 / 3.0) * (var ** 1.5 - 1.0) / (var - 1.0)
        k_mean, k_var = jax.random.split(self.make_rng("dropout"))
        shape = (x.shape[-1],)
        m = jax.random.uniform(k_mean, shape, x.dtype, -self.mean, self.mean)
        s = jnp.sqrt(jax.random.uniform(k_var, shape, x.dtype, 1.0, self.var))
        return s * x + m


class StudyCNN1D(nn.Module):
    """The zoo's CNN1D (conv blocks, max pooling, a dense layer) with placement and dropout.

    Attributes:
      num_classes: number of output logits.
      features: channels of each conv layer.
      kernel_size: conv kernel width.
      pool_after: indices of the conv layers followed by a max-pool of 2.
      hidden: width of the dense layer before the output (0: none).
      norm: normalization name (see :func:`bnjax_train.models.make_norm`).
      norm_kwargs: arguments of ``make_norm`` for every norm layer (e.g. ``momentum``).
      placement: ``"before"`` (conv-norm-ReLU) or ``"after"`` (conv-ReLU-norm).
      dropout: dropout rate before each dense layer (0: none); draws from ``"dropout"``.
      noise: ``(mean, var)`` of :class:`NoisyShift` after every norm ("noisy BN"); None: none.

    Example:
      >>> model = StudyCNN1D(features=(2,), hidden=4, placement="after")
      >>> x = jnp.ones((3, 40))
      >>> v = model.init(jax.random.key(0), x, training=False)
      >>> model.apply(v, x, training=False).shape
      (3, 10)
    """

    num_classes: int = 10
    features: Sequence[int] = (32, 32, 64, 64)
    kernel_size: int = 5
    pool_after: Sequence[int] = (1, 3)
    hidden: int = 128
    norm: str = "batch"
    norm_kwargs: Mapping[str, Any] | None = None
    placement: str = "before"
    dropout: float = 0.0
    noise: tuple[float, float] | None = None

    def _norm(self, x: Array, training: bool) -> Array:
        x = make_norm(self.norm, **dict(self.norm_kwargs or {}))(x, training=training)
        return NoisyShift(*self.noise)(x, training) if self.noise else x

    def _block(self, x: Array, training: bool) -> Array:
        if self.placement == "before":
            return nn.relu(self._norm(x, training))
        return self._norm(nn.relu(x), training)

    @nn.compact
    def __call__(self, x: Array, training: bool) -> Array:
        """Logits for ``(batch, length)``, ``(batch, length, channels)`` or images."""
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement={self.placement!r}; accepted: {list(PLACEMENTS)}.")
        if x.ndim == 2:
            x = x[..., None]
        # A bias before a norm that subtracts the mean is wasted (the zoo's rule); after the
        # activation the norm no longer follows the linear layer, which then needs one.
        use_bias = self.norm == "none" or self.placement == "after"
        for i, f in enumerate(self.features):
            x = self._block(PatchConv(f, self.kernel_size, use_bias)(x), training)
            if i in self.pool_after:
                window = (2,) * (x.ndim - 2)
                x = nn.max_pool(x, window, strides=window)
        x = x.reshape((x.shape[0], -1))
        if self.hidden:
            x = nn.Dropout(self.dropout, deterministic=not training)(x)
            x = self._block(nn.Dense(self.hidden, use_bias=use_bias)(x), training)
        x = nn.Dropout(self.dropout, deterministic=not training)(x)
        if not self.is_initializing():  # the output layer's input (kept only when asked for)
            self.sow("intermediates", "features", x)
        return nn.Dense(self.num_classes)(x)
