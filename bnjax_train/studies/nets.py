"""The studies' network: the zoo's CNN1D, with the layer order and dropout as options.

:class:`StudyCNN1D` computes what :class:`bnjax_train.models.CNN1D` computes (same layers,
same parameter shapes and initializers, the same ``make_norm`` norms), with two differences:

- its convolutions are written as a product of the input's patches with the kernel
  (:class:`PatchConv`). Under ``jax.vmap`` over runs a ``flax.linen.Conv`` with a kernel per
  run becomes a grouped convolution, which XLA runs on CPU tens of times slower than the
  batched matrix product this gives; one run alone is as fast either way;
- ``placement`` puts the norm before the activation (conv-BN-ReLU, the zoo's and the paper's
  order) or after it (conv-ReLU-BN), and ``dropout`` adds dropout before the dense layers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnjax_train.models import make_norm

Array = jax.Array

__all__ = ["PLACEMENTS", "PatchConv", "StudyCNN1D"]

#: Where the norm goes: ``"before"`` the activation (conv-BN-ReLU) or ``"after"`` it.
PLACEMENTS: tuple[str, ...] = ("before", "after")


class PatchConv(nn.Module):
    """A 1D convolution (``"SAME"`` padding, stride 1) as one matrix product of patches.

    The same function and parameters (``kernel (size, in, out)``, ``bias (out,)``, LeCun
    normal initialization) as ``flax.linen.Conv(features, (kernel_size,), padding="SAME")``.

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
    """

    features: int
    kernel_size: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Convolves ``x`` of shape ``(batch, length, channels)``."""
        k, length = self.kernel_size, x.shape[1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (k, x.shape[-1], self.features))
        left = (k - 1) // 2
        padded = jnp.pad(x, ((0, 0), (left, k - 1 - left), (0, 0)))
        patches = jnp.stack([padded[:, i:i + length] for i in range(k)], axis=2)
        y = jnp.einsum("blkc,kcf->blf", patches, kernel)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,))
        return y


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

    def _block(self, x: Array, training: bool) -> Array:
        norm = make_norm(self.norm, **dict(self.norm_kwargs or {}))
        if self.placement == "before":
            return nn.relu(norm(x, training=training))
        return norm(nn.relu(x), training=training)

    @nn.compact
    def __call__(self, x: Array, training: bool) -> Array:
        """Logits for inputs ``(batch, length)`` or ``(batch, length, channels)``."""
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
                x = nn.max_pool(x, (2,), strides=(2,))
        x = x.reshape((x.shape[0], -1))
        if self.hidden:
            x = nn.Dropout(self.dropout, deterministic=not training)(x)
            x = self._block(nn.Dense(self.hidden, use_bias=use_bias)(x), training)
        x = nn.Dropout(self.dropout, deterministic=not training)(x)
        return nn.Dense(self.num_classes)(x)
