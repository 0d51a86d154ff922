"""What the linen and NNX layers share: the mode, the checks of their settings, and the call.

Both layers hold variables and choose the mode; :func:`layer_batch_norm` is their one call
into ``bnjax.functional.batch_norm``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from bnjax import _checks as C
from bnjax import keras
from bnjax.functional import batch_norm

Array = jax.Array

__all__ = ["DEFAULT_EPSILON", "FlaxEpsilonWarning", "check_layer", "layer_batch_norm",
           "resolve_training", "stats_dtype", "warn_if_default_epsilon"]


class _DefaultEpsilon(float):
    """Keras's epsilon 1e-3 as a layer's default: a float, marked as not given by the user."""

    __slots__ = ()


#: The layers' default ``epsilon`` (Keras's 1e-3); ``epsilon=1e-3`` passed explicitly is not it.
DEFAULT_EPSILON = _DefaultEpsilon(1e-3)


class FlaxEpsilonWarning(UserWarning):
    """A layer used the way its Flax counterpart is has kept bnjax's (Keras's) epsilon 1e-3."""


def warn_if_default_epsilon(epsilon: float, used_as: str) -> None:
    """Warns (once: Python's default warning filter) if ``epsilon`` is the unchanged default.

    A Flax model ported by replacing ``nn.BatchNorm`` with ``bnjax.BatchNorm`` keeps every
    field but the defaults: Flax's epsilon is 1e-5, bnjax's Keras's 1e-3, which changes the
    model's numbers. Giving ``epsilon`` (either value) says which one is meant.

    Example:
      >>> warn_if_default_epsilon(1e-3, "called as flax.linen.BatchNorm")  # given: no warning
    """
    if type(epsilon) is _DefaultEpsilon:
        warnings.warn(
            f"bnjax's BatchNorm {used_as}, with epsilon left at bnjax's default 1e-3 (Keras's); "
            "Flax's default is 1e-5, so a Flax model ported by replacing the class name "
            "computes other numbers. Pass epsilon=1e-5 to keep Flax's numbers, or "
            "epsilon=1e-3 to keep Keras's (either one silences this warning).",
            FlaxEpsilonWarning, stacklevel=C.user_stacklevel())


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
      TypeError: a flag is not a bool (a string such as ``"False"``, an array, a tracer).
      ValueError: neither argument is given (and the layer is not frozen), or both are
        given and contradict each other.

    Example:
      >>> resolve_training(True, None), resolve_training(None, True)
      (True, False)
    """
    C.check_mode("training", training)
    C.check_mode("use_running_average", use_running_average)
    C.check_mode("frozen", frozen, optional=False)
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
        "BatchNorm needs a mode: pass use_running_average (Flax style: "
        "bn(x, use_running_average=not train), or at construction) or training (Keras "
        "style: bn(x, training=True) uses and updates the batch statistics)."
    )


def check_layer(layer: Any) -> None:
    """Checks the settings both layers have, naming the field (before any computation).

    Example:
      >>> import types
      >>> check_layer(types.SimpleNamespace(momentum=0.99, epsilon=1e-3, dtype=None,
      ...     param_dtype=jnp.float32, use_fast_variance=True, frozen=False,
      ...     guard_non_finite=True, renorm=False, renorm_momentum=0.99, axis_name=None,
      ...     axis_index_groups=None, scale_regularizer=None, bias_regularizer=None,
      ...     scale_constraint=None, bias_constraint=None))
    """
    C.check_momentum(layer.momentum)
    C.check_epsilon(layer.epsilon)
    C.check_dtype("dtype", layer.dtype, allow_complex=True)
    C.check_dtype("param_dtype", layer.param_dtype, optional=False)
    for name in ("use_fast_variance", "frozen", "guard_non_finite", "renorm"):
        C.check_mode(name, getattr(layer, name), optional=False)
    if layer.renorm:
        C.check_momentum(layer.renorm_momentum, "renorm_momentum")
    C.freeze_groups(layer.axis_index_groups, layer.axis_name)
    keras.get_regularizer(layer.scale_regularizer, name="scale_regularizer")
    keras.get_regularizer(layer.bias_regularizer, name="bias_regularizer")
    keras.get_constraint(layer.scale_constraint, name="scale_constraint")
    keras.get_constraint(layer.bias_constraint, name="bias_constraint")


def stats_dtype(param_dtype: Any, force_float32_reductions: bool = True) -> Any:
    """The dtype of the moving statistics: float32 or wider, as Flax keeps them.

    With ``force_float32_reductions=False`` (a ``flax.linen.BatchNorm`` field) Flax stores
    them in ``param_dtype``; so does bnjax. The batch statistics themselves are always
    computed in float32 or wider.

    Example:
      >>> stats_dtype(jnp.bfloat16), stats_dtype(jnp.bfloat16, False)
      (dtype('float32'), dtype(bfloat16))
    """
    C.check_mode("force_float32_reductions", force_float32_reductions, optional=False)
    if force_float32_reductions:
        return jnp.promote_types(param_dtype, jnp.float32)
    return jnp.dtype(param_dtype)


def layer_batch_norm(
    layer: Any,
    x: Array,
    stats: Mapping[str, Array],
    params: Mapping[str, Array],
    *,
    training: bool,
    mask: Array | None,
    clipping: Mapping[str, Any] | None,
) -> tuple[Array, Mapping[str, Array]]:
    """``bnjax.batch_norm`` with a layer's settings (its attributes of the same names).

    A frozen layer's ``scale`` and ``bias`` are constants here (``lax.stop_gradient``): their
    gradients are zero, as Keras computes none for the weights of a ``trainable=False`` layer.

    Example:
      >>> import types
      >>> layer = types.SimpleNamespace(axis=-1, momentum=0.5, epsilon=1e-6, axis_name=None,
      ...     axis_index_groups=None, dtype=None, guard_non_finite=True, renorm=False,
      ...     renorm_momentum=0.99, virtual_batch_size=None, frozen=False)
      >>> y, new = layer_batch_norm(layer, jnp.array([[1.0], [3.0]]),
      ...     {"mean": jnp.zeros(1), "var": jnp.ones(1)}, {}, training=True, mask=None,
      ...     clipping=None)
      >>> y.ravel().round(3).tolist(), new["mean"].tolist()
      ([-1.0, 1.0], [1.0])
    """
    if layer.frozen:
        params = jax.lax.stop_gradient(dict(params))
    return batch_norm(
        x, stats, params, training=training, axis=layer.axis, momentum=layer.momentum,
        epsilon=layer.epsilon, axis_name=layer.axis_name if training else None,
        axis_index_groups=layer.axis_index_groups if training else None, mask=mask,
        dtype=layer.dtype, guard_non_finite=layer.guard_non_finite, renorm=layer.renorm,
        renorm_clipping=clipping, renorm_momentum=layer.renorm_momentum,
        virtual_batch_size=layer.virtual_batch_size,
    )
