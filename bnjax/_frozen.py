"""Frozen batch norms under an optimizer: which parameters are frozen, and holding them.

A ``frozen=True`` layer's ``scale`` and ``bias`` get zero gradients, but a zero gradient does
not leave a parameter alone under most optimizers: momentum and Adam's moments keep moving it,
and decoupled weight decay shrinks it whatever its gradient. Keras does not update the weights
of a ``trainable=False`` layer at all, nor their optimizer slots. :func:`frozen_layers` finds
the frozen ``bnjax.BatchNorm`` layers of a linen model as it runs (``nn.intercept_methods``),
:func:`trainable_tree` turns their paths into a params-shaped tree of bools, and
:func:`hold_frozen` undoes an optimizer step for the frozen leaves: their updates become
``-0.0`` (``p + -0.0`` is ``p``, bit for bit, even for ``p = -0.0``) and their entries of the
optimizer state keep their old values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bnjax.linen import BatchNorm

__all__ = ["frozen_layers", "hold_frozen", "trainable_tree"]


@contextlib.contextmanager
def frozen_layers() -> Iterator[list[tuple[str, ...]]]:
    """Within the context, records the path of every frozen ``bnjax.BatchNorm`` that runs.

    Yields:
      The module paths (filled as the layers run; a layer called twice appears once).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> with frozen_layers() as paths:
      ...     _ = BatchNorm(frozen=True).init(jax.random.key(0), jnp.ones((2, 3)),
      ...                                     training=False)
      >>> paths
      [()]
    """
    paths: list[tuple[str, ...]] = []

    def interceptor(next_fun, args, kwargs, context):  # noqa: ANN001, ANN202
        module = context.module
        if (context.method_name == "__call__" and isinstance(module, BatchNorm)
                and module.frozen and tuple(module.path) not in paths):
            paths.append(tuple(module.path))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield paths


def trainable_tree(params: Any, frozen: list[tuple[str, ...]]) -> Any:
    """``params`` with each leaf replaced by False inside a frozen path, True elsewhere.

    Example:
      >>> trainable_tree({"Dense_0": {"kernel": 0}, "BatchNorm_0": {"scale": 0}},
      ...                [("BatchNorm_0",)])
      {'BatchNorm_0': {'scale': False}, 'Dense_0': {'kernel': True}}
    """
    def one(key_path: Any, _: Any) -> bool:
        keys = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)
        return not any(keys[:len(p)] == p for p in frozen)

    return jax.tree_util.tree_map_with_path(one, params)


def _state_flags(tx: optax.GradientTransformation, state: Any, trainable: Any) -> Any | None:
    """A tree shaped like ``state``: each leaf's trainable flag (True off the params trees).

    ``optax.tree_map_params`` finds the copies of the params tree inside the state (momentum,
    Adam's moments, accumulated gradients). None where it cannot match them
    (``optax.masked`` and ``optax.multi_transform`` keep placeholders, L-BFGS keeps histories).
    """
    try:
        return optax.tree_utils.tree_map_params(
            tx, lambda _, t: t, state, trainable, transform_non_params=lambda v: True)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError):
        return None


def hold_frozen(tx: optax.GradientTransformation, trainable: Any, updates: Any,
                new_state: Any, old_state: Any) -> tuple[Any, Any]:
    """``(updates, state)`` of one ``tx.update`` with the non-trainable leaves held.

    The updates of a leaf whose flag in ``trainable`` is False become ``-0.0`` (so
    ``optax.apply_updates`` returns the parameter unchanged, bit for bit); its entries in the
    optimizer state keep ``old_state``'s values where the state holds copies of the params
    tree. The flags are Python bools: the choice is made once, when the step is traced.

    Raises:
      ValueError: ``trainable`` does not have the structure of ``updates``.

    Example:
      >>> import optax
      >>> tx = optax.sgd(0.1, momentum=0.9)
      >>> p = {"a": jnp.ones(1), "b": jnp.ones(1)}
      >>> s0 = tx.init(p)
      >>> u, s1 = tx.update({"a": jnp.ones(1), "b": jnp.ones(1)}, s0)
      >>> u, s1 = hold_frozen(tx, {"a": True, "b": False}, u, s1, s0)
      >>> optax.apply_updates(p, u)["b"].tolist(), s1[0].trace["b"].tolist()
      ([1.0], [0.0])
    """
    if jax.tree.structure(trainable) != jax.tree.structure(updates):
        raise ValueError(
            f"trainable has the tree structure {jax.tree.structure(trainable)} but the updates "
            f"(the params) have {jax.tree.structure(updates)}; it must hold one bool per "
            "parameter: build it with bnjax.trainable_mask(model, ...) for this model.")
    updates = jax.tree.map(lambda t, u: u if t else jnp.full_like(u, -0.0), trainable, updates)
    flags = _state_flags(tx, new_state, trainable)
    if flags is not None:
        new_state = jax.tree.map(lambda t, n, o: n if t else o, flags, new_state, old_state)
    return updates, new_state
