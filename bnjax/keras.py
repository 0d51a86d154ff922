"""Keras-style regularizers and constraints for the scale (gamma) and bias (beta) of BN layers.

Keras lets a ``BatchNormalization`` layer carry ``gamma_regularizer``, ``beta_regularizer``,
``gamma_constraint`` and ``beta_constraint``. bnjax keeps the same behaviour with JAX's
functional style:

- Regularizers: ``bnjax.BatchNorm(scale_regularizer=..., bias_regularizer=...)`` sows its
  penalty into the ``"losses"`` collection whenever that collection is mutable (not at
  ``init``, and not for a ``frozen`` layer, whose weights Keras does not regularize either).
  The train step of ``bnjax.make_train_step`` applies the model with
  ``mutable=["batch_stats", "losses"]`` and adds the sum of every leaf of ``"losses"`` to the
  loss. Each layer overwrites its own entry, so a layer called twice is penalized once, as
  Keras counts a weight's penalty once.
- Constraints: ``bnjax.BatchNorm(scale_constraint=..., bias_constraint=...)`` records the
  projection; ``bnjax.make_constrain_fn`` finds every constrained layer of a model and returns
  ``constrain_fn(params) -> params``, which the train step applies after each optimizer
  update (``bnjax.make_train_step(constrain_fn=...)``), as Keras' optimizers do.

Regularizers and constraints are any callables (``array -> scalar`` and ``array -> array``),
Keras 3 objects included when Keras runs on the JAX backend, or one of the names below, which
build the small frozen dataclasses of this module with Keras' defaults:

==========================  =============================  =================================
name                        object                         value
==========================  =============================  =================================
``"l1"``                    ``L1(0.01)``                   ``l1 * sum(|w|)``
``"l2"``                    ``L2(0.01)``                   ``l2 * sum(w**2)`` (no 1/2)
``"non_neg"``               ``NonNeg()``                   ``max(w, 0)``
``"max_norm"``              ``MaxNorm(2.0)``               ``w * clip(n, 0, m) / (1e-7 + n)``
``"unit_norm"``             ``UnitNorm()``                 ``w / (1e-7 + n)``
``"min_max_norm"``          ``MinMaxNorm(0.0, 1.0)``       see :class:`MinMaxNorm`
==========================  =============================  =================================

(``n`` is the L2 norm of the whole per-feature vector: Keras' ``axis=0`` on a ``(C,)``
weight.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
Regularizer = Callable[[Array], Array]
Constraint = Callable[[Array], Array]

__all__ = [
    "L1",
    "L1L2",
    "L2",
    "MaxNorm",
    "MinMaxNorm",
    "NonNeg",
    "UnitNorm",
    "apply_constraints",
    "get_constraint",
    "get_regularizer",
    "regularization_penalty",
]

_KERAS_EPSILON = 1e-7  # keras.config.epsilon(), used by the norm constraints


@dataclasses.dataclass(frozen=True)
class L1L2:
    """Keras ``L1L2``: ``l1 * sum(|w|) + l2 * sum(w**2)``.

    Example:
      >>> import jax.numpy as jnp
      >>> float(L1L2(l1=0.5, l2=0.25)(jnp.array([1.0, -2.0])))
      2.75
    """

    l1: float = 0.0
    l2: float = 0.0

    def __call__(self, w: Array) -> Array:
        """Returns the penalty of ``w``."""
        w = jnp.asarray(w)
        return self.l1 * jnp.sum(jnp.abs(w)) + self.l2 * jnp.sum(jnp.square(w))


@dataclasses.dataclass(frozen=True)
class L1:
    """Keras ``L1``: ``l1 * sum(|w|)`` (default ``l1=0.01``).

    Example:
      >>> import jax.numpy as jnp
      >>> float(L1(0.5)(jnp.array([1.0, -2.0])))
      1.5
    """

    l1: float = 0.01

    def __call__(self, w: Array) -> Array:
        """Returns the penalty of ``w``."""
        return self.l1 * jnp.sum(jnp.abs(jnp.asarray(w)))


@dataclasses.dataclass(frozen=True)
class L2:
    """Keras ``L2``: ``l2 * sum(w**2)``, without a factor 1/2 (default ``l2=0.01``).

    Example:
      >>> import jax.numpy as jnp
      >>> float(L2(0.5)(jnp.array([1.0, -2.0])))
      2.5
    """

    l2: float = 0.01

    def __call__(self, w: Array) -> Array:
        """Returns the penalty of ``w``."""
        return self.l2 * jnp.sum(jnp.square(jnp.asarray(w)))


def _norm(w: Array, axis: int | Sequence[int]) -> Array:
    return jnp.sqrt(jnp.sum(jnp.square(w), axis=axis, keepdims=True))


@dataclasses.dataclass(frozen=True)
class NonNeg:
    """Keras ``NonNeg``: ``max(w, 0)``.

    Example:
      >>> import jax.numpy as jnp
      >>> NonNeg()(jnp.array([-1.0, 2.0])).tolist()
      [0.0, 2.0]
    """

    def __call__(self, w: Array) -> Array:
        """Returns ``w`` projected onto the constraint set."""
        return jnp.maximum(jnp.asarray(w), 0)


@dataclasses.dataclass(frozen=True)
class MaxNorm:
    """Keras ``MaxNorm``: rescales ``w`` so that its L2 norm is at most ``max_value``.

    Example:
      >>> import jax.numpy as jnp
      >>> [round(v, 4) for v in MaxNorm(1.0)(jnp.array([3.0, 4.0])).tolist()]
      [0.6, 0.8]
    """

    max_value: float = 2.0
    axis: int | tuple[int, ...] = 0

    def __call__(self, w: Array) -> Array:
        """Returns ``w`` projected onto the constraint set."""
        w = jnp.asarray(w)
        n = _norm(w, self.axis)
        return w * (jnp.clip(n, 0, self.max_value) / (_KERAS_EPSILON + n))


@dataclasses.dataclass(frozen=True)
class MinMaxNorm:
    """Keras ``MinMaxNorm``: moves the norm ``n`` to ``rate * clip(n, min, max) + (1-rate) n``.

    Example:
      >>> import jax.numpy as jnp
      >>> [round(v, 4) for v in MinMaxNorm(2.0, 3.0)(jnp.array([0.6, 0.8])).tolist()]
      [1.2, 1.6]
    """

    min_value: float = 0.0
    max_value: float = 1.0
    rate: float = 1.0
    axis: int | tuple[int, ...] = 0

    def __call__(self, w: Array) -> Array:
        """Returns ``w`` projected onto the constraint set."""
        w = jnp.asarray(w)
        n = _norm(w, self.axis)
        desired = self.rate * jnp.clip(n, self.min_value, self.max_value) + (1 - self.rate) * n
        return w * (desired / (_KERAS_EPSILON + n))


@dataclasses.dataclass(frozen=True)
class UnitNorm:
    """Keras ``UnitNorm``: ``w / (1e-7 + ||w||)``.

    Example:
      >>> import jax.numpy as jnp
      >>> [round(v, 4) for v in UnitNorm()(jnp.array([3.0, 4.0])).tolist()]
      [0.6, 0.8]
    """

    axis: int | tuple[int, ...] = 0

    def __call__(self, w: Array) -> Array:
        """Returns ``w`` projected onto the constraint set."""
        w = jnp.asarray(w)
        return w / (_KERAS_EPSILON + _norm(w, self.axis))


_REGULARIZERS: dict[str, Callable[[], Regularizer]] = {"l1": L1, "l2": L2}
_CONSTRAINTS: dict[str, Callable[[], Constraint]] = {
    "non_neg": NonNeg, "max_norm": MaxNorm, "unit_norm": UnitNorm, "min_max_norm": MinMaxNorm,
}


def get_regularizer(spec: str | Regularizer | None, *, name: str = "regularizer"
                    ) -> Regularizer | None:
    """Resolves a regularizer given by name (Keras defaults) or as a callable.

    Args:
      spec: ``None``, ``"l1"``, ``"l2"`` or a callable ``array -> scalar``.
      name: the argument's name, for error messages.

    Returns:
      The callable, or None.

    Example:
      >>> get_regularizer("l2")
      L2(l2=0.01)
    """
    if spec is None or (callable(spec) and not isinstance(spec, str)):
        return spec
    if isinstance(spec, str) and spec.lower() in _REGULARIZERS:
        return _REGULARIZERS[spec.lower()]()
    raise ValueError(
        f"{name}={spec!r} is not a regularizer; accepted: None, a callable array -> scalar "
        f"(e.g. bnjax.keras.L2(1e-4) or a keras.regularizers object), or one of "
        f"{sorted(_REGULARIZERS)}."
    )


def get_constraint(spec: str | Constraint | None, *, name: str = "constraint"
                   ) -> Constraint | None:
    """Resolves a constraint given by name (Keras defaults) or as a callable.

    Args:
      spec: ``None``, one of ``"non_neg"``, ``"max_norm"``, ``"unit_norm"``,
        ``"min_max_norm"``, or a callable ``array -> array``.
      name: the argument's name, for error messages.

    Returns:
      The callable, or None.

    Example:
      >>> get_constraint("non_neg")
      NonNeg()
    """
    if spec is None or (callable(spec) and not isinstance(spec, str)):
        return spec
    if isinstance(spec, str) and spec.lower() in _CONSTRAINTS:
        return _CONSTRAINTS[spec.lower()]()
    raise ValueError(
        f"{name}={spec!r} is not a constraint; accepted: None, a callable array -> array "
        f"(e.g. bnjax.keras.NonNeg() or a keras.constraints object), or one of "
        f"{sorted(_CONSTRAINTS)}."
    )


def regularization_penalty(
    params: Mapping[str, Array],
    scale_regularizer: str | Regularizer | None = None,
    bias_regularizer: str | Regularizer | None = None,
) -> Array:
    """Sum of the penalties of a BN layer's ``scale`` and ``bias`` (absent ones count 0).

    Args:
      params: the layer's ``{"scale", "bias"}`` (either may be missing).
      scale_regularizer: Keras ``gamma_regularizer``.
      bias_regularizer: Keras ``beta_regularizer``.

    Returns:
      A float32 scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"scale": jnp.array([1.0, 2.0]), "bias": jnp.array([-1.0, 1.0])}
      >>> round(float(regularization_penalty(p, "l2", L1(0.5))), 6)
      1.05
    """
    total = jnp.zeros((), jnp.float32)
    for key, spec, arg in (("scale", scale_regularizer, "scale_regularizer"),
                           ("bias", bias_regularizer, "bias_regularizer")):
        reg = get_regularizer(spec, name=arg)
        if reg is not None and params.get(key) is not None:
            total = total + jnp.asarray(reg(params[key]), jnp.float32)
    return total


def apply_constraints(params: Any, rules: Mapping[tuple[str, ...], Mapping[str, Constraint]]
                      ) -> Any:
    """Applies constraints to the leaves of a params tree named by path.

    Args:
      params: a nested mapping of parameters (``variables["params"]``).
      rules: ``{module path: {"scale": fn, "bias": fn}}``, the path a tuple of names from
        the root, e.g. ``("Block_0", "BatchNorm_0")``.

    Returns:
      A new tree with ``fn(leaf)`` in place of each named leaf; everything else is shared.

    Raises:
      KeyError: a path or leaf name is not in ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"bn": {"scale": jnp.array([-1.0, 2.0]), "bias": jnp.zeros(2)}}
      >>> apply_constraints(p, {("bn",): {"scale": NonNeg()}})["bn"]["scale"].tolist()
      [0.0, 2.0]
    """

    def visit(tree: Any, path: tuple[str, ...]) -> Any:
        out = dict(tree)
        here = rules.get(path, {})
        for key, fn in here.items():
            if key not in out:
                raise KeyError(f"params at {'/'.join(path) or '<root>'} have no '{key}' "
                               f"(keys: {sorted(out)}).")
            out[key] = fn(out[key]).astype(jnp.result_type(out[key]))
        for key, child in tree.items():
            if isinstance(child, Mapping) and any(
                    p[: len(path) + 1] == (*path, key) for p in rules):
                out[key] = visit(child, (*path, key))
        return type(tree)(out)

    for path in rules:
        node = params
        for name in path:
            if not isinstance(node, Mapping) or name not in node:
                raise KeyError(f"no parameters at path {'/'.join(path)} (missing {name!r}).")
            node = node[name]
    return visit(params, ())
