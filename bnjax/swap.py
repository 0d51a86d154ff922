"""Run a Flax model you did not write on bnjax: swap its batch norms without editing it.

Linen: inside :func:`replacing_flax_batch_norm` every call of ``flax.linen.BatchNorm`` (or of
a subclass that reaches it through ``super().__call__``) runs ``bnjax.BatchNorm`` instead,
with that module's own fields, at that module's place in the variable tree: the same
``params/{scale,bias}`` and ``batch_stats/{mean,var}``, so the model's checkpoints need
nothing. It is built on ``flax.linen.intercept_methods``, Flax's documented hook.
:func:`without_flax_batch_norm` makes them the identity instead (the no-norm ablation).

NNX: :func:`replace_nnx_batch_norm` replaces every ``flax.nnx.BatchNorm`` of a module graph
in place by a ``bnjax.nnx.BatchNorm`` that holds the same variables.

Both run bnjax's arithmetic (``bnjax.functional.batch_norm``) through bnjax's layers; they
differ from the module they replace only in what bnjax always does (the exact variance,
statistics in float32, masked-out outputs carry no gradient in training mode) and in the
options: Keras' epsilon (1e-3) instead of the module's own, and the non-finite guard (on by
default, as in bnjax's layers). A linen call is read as Flax reads it: what Flax's call
refuses raises Flax's error, an integer input is cast to float32, a mask broadcasts to the
input. Any error raised under the swap names the module's path.

Scope (linen): a swap acts in the thread that entered it, from ``with`` to its end, and the
innermost active one decides (``without_flax_batch_norm()`` inside
``replacing_flax_batch_norm()`` removes the layers, and the outer one decides again after
it). Its settings are part of the key of jax's caches (``jax.make_user_context``), so a
function jitted once is traced again where the swap differs: traced inside and called
outside, it runs Flax's layer; traced outside and called inside, bnjax's. A
``jax.stages.Lowered`` or ``Compiled`` object keeps what it was traced with. The report lists
the layers met while tracing or running inside; a trace reused from an earlier swap of the
same settings adds nothing to it.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> class Net(nn.Module):  # written for Flax's layer
  ...     @nn.compact
  ...     def __call__(self, x, train):
  ...         return nn.BatchNorm(use_running_average=not train, name="bn")(nn.Dense(3)(x))
  >>> x = jnp.arange(8.0).reshape(4, 2)
  >>> variables = Net().init(jax.random.key(0), x, train=False)
  >>> with replacing_flax_batch_norm() as report:
  ...     y, updates = Net().apply(variables, x, train=True, mutable=["batch_stats"])
  >>> report.replaced, sorted(updates["batch_stats"]["bn"])
  (['bn'], ['mean', 'var'])
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import threading
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bnjax._checks import check_epsilon, check_mode
from bnjax._layer import check_layer
from bnjax.linen import BatchNorm

__all__ = [
    "SwapReport",
    "replace_nnx_batch_norm",
    "replacing_flax_batch_norm",
    "without_flax_batch_norm",
]

#: ``flax.linen.BatchNorm.__call__`` as Flax defined it (below Flax's method wrapper).
_FLAX_CALL = nn.BatchNorm.__call__.__wrapped__
_FLAX_SIGNATURE = inspect.signature(_FLAX_CALL)
#: The active swap's settings, part of the key of jax's tracing and compilation caches: a
#: function traced under one swap (or none) is traced again under another.
_SWAP_KEY = jax.make_user_context(None)
#: This thread's active swaps, innermost last (each one's identity).
_ACTIVE = threading.local()
_KERAS_EPSILON = 1e-3
#: The attributes of a ``flax.nnx.BatchNorm``: its settings, then its variables.
_NNX_SETTINGS = ("num_features", "use_running_average", "axis", "momentum", "epsilon", "dtype",
                 "param_dtype", "use_bias", "use_scale", "axis_name", "axis_index_groups",
                 "use_fast_variance", "promote_dtype")
_NNX_VARIABLES = ("mean", "var", "scale", "bias")


@dataclasses.dataclass
class SwapReport:
    """Which batch-norm layers a swap replaced: their paths, each once, in the order met.

    Attributes:
      replaced: the module paths (``"ResNetBlock_0/BatchNorm_1"``; ``"<root>"`` for the
        model itself).

    Example:
      >>> report = SwapReport(["bn_init", "block/bn"])
      >>> report.count
      2
    """

    replaced: list[str] = dataclasses.field(default_factory=list)

    @property
    def count(self) -> int:
        """The number of layers replaced."""
        return len(self.replaced)

    def _add(self, path: str) -> None:
        if path not in self.replaced:
            self.replaced.append(path)


def _resolve_epsilon(epsilon: float | str) -> float | None:
    """None for the module's own epsilon, else the one to use (``"keras"``: 1e-3)."""
    if epsilon == "module":
        return None
    if epsilon == "keras":
        return _KERAS_EPSILON
    if isinstance(epsilon, str):
        raise ValueError(f"epsilon={epsilon!r} is not accepted; pass 'module' (each layer's "
                         "own), 'keras' (1e-3) or a number > 0.")
    return check_epsilon(epsilon)


def _where(path: Any) -> str:
    return "/".join(str(p) for p in path) or "<root>"


def _flax_output_dtype(module: nn.BatchNorm, x: jax.Array) -> Any:
    """The output dtype of ``flax.linen.BatchNorm`` with ``dtype=None``.

    Flax promotes the input with the scale and bias: the values it is applied with, or
    ``param_dtype`` before they exist.
    """
    dtypes = [x.dtype]
    for name, used in (("scale", module.use_scale), ("bias", module.use_bias)):
        if not used:
            continue
        if module.force_float32_reductions and module.has_variable("params", name):
            dtypes.append(module.get_variable("params", name).dtype)
        else:
            dtypes.append(jnp.dtype(module.param_dtype))
    dtype = jnp.result_type(*dtypes)
    return dtype if jnp.issubdtype(dtype, jnp.inexact) else jnp.promote_types(jnp.float32, dtype)


def _linen_layer(module: nn.BatchNorm, x: jax.Array, epsilon: float | None,
                 guard_non_finite: bool) -> BatchNorm:
    """``bnjax.BatchNorm`` with ``module``'s fields, bound to ``module``'s own scope."""
    where = _where(module.path)
    names = [f.name for f in dataclasses.fields(nn.BatchNorm) if f.name not in ("parent", "name")]
    ours = {f.name for f in dataclasses.fields(BatchNorm)}
    unknown = sorted(set(names) - ours)
    if unknown:
        raise ValueError(f"flax.linen.BatchNorm at {where!r}: field(s) {unknown} of this Flax "
                         "version have no bnjax counterpart; bnjax.BatchNorm takes "
                         f"{sorted(ours - {'parent', 'name'})}.")
    fields = {name: getattr(module, name) for name in names}
    if fields["dtype"] is None:
        fields["dtype"] = _flax_output_dtype(module, x)
    if epsilon is not None:
        fields["epsilon"] = epsilon
    layer = BatchNorm(**fields, guard_non_finite=guard_non_finite, parent=module.scope)
    try:
        check_layer(layer)
    except (TypeError, ValueError) as e:
        raise type(e)(f"flax.linen.BatchNorm at {where!r} cannot run on bnjax: {e}") from None
    return layer


def _active() -> list[object]:
    if not hasattr(_ACTIVE, "stack"):
        _ACTIVE.stack = []
    return _ACTIVE.stack


def _flax_arguments(module: nn.BatchNorm, args: Any, kwargs: Any,
                    where: str) -> tuple[Any, bool, Any]:
    """``(x, use_running_average, mask)`` as Flax's call reads them; refused where Flax's is.

    The arguments are bound to ``flax.linen.BatchNorm.__call__``'s signature and the mode is
    merged with the field by Flax's own ``nn.merge_param``, so a call Flax refuses raises
    Flax's error (with the module's path) instead of running on bnjax.
    """
    try:
        bound = _FLAX_SIGNATURE.bind(module, *args, **kwargs)
    except TypeError as e:
        raise TypeError(f"flax.linen.BatchNorm at {where!r}: {e}; flax.linen.BatchNorm's call "
                        "takes (x, use_running_average=None, *, mask=None).") from None
    bound.apply_defaults()
    a = bound.arguments
    try:
        mode = nn.merge_param("use_running_average", module.use_running_average,
                              a["use_running_average"])
    except ValueError as e:
        raise ValueError(f"flax.linen.BatchNorm at {where!r}: {e}") from None
    return a["x"], mode, a["mask"]


@contextlib.contextmanager
def _intercepting(key: tuple[Any, ...], run: Callable[..., Any]) -> Iterator[SwapReport]:
    """Calls ``run(module, x, use_running_average, mask)`` for each ``flax.linen.BatchNorm``.

    Only the innermost active swap of this thread acts (an outer one passes the call on), and
    ``key`` (the swap's settings) is part of jax's cache key while it is active.
    """
    report, me = SwapReport(), object()

    def interceptor(next_fun: Callable[..., Any], args: Any, kwargs: Any, context: Any) -> Any:
        if (context.method_name != "__call__" or not isinstance(context.module, nn.BatchNorm)
                or getattr(context.orig_method, "func", None) is not _FLAX_CALL
                or _active()[-1] is not me):
            return next_fun(*args, **kwargs)
        where = _where(context.module.path)
        out = run(context.module, *_flax_arguments(context.module, args, kwargs, where))
        report._add(where)
        return out

    stack = _active()
    stack.append(me)
    try:
        with _SWAP_KEY(key), nn.intercept_methods(interceptor):
            yield report
    finally:
        stack.remove(me)


def _as_flax_reads(x: Any, mode: bool, mask: Any, where: str) -> tuple[Any, Any]:
    """The input and mask as ``flax.linen.BatchNorm`` reads them.

    An integer or boolean input is cast to float32 (Flax computes in
    ``promote_types(x.dtype, float32)``); the mask is ignored with the moving statistics (as
    Flax ignores it), else cast to bool and broadcast as NumPy broadcasts it to the input.
    """
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.inexact):
        x = jnp.asarray(x, jnp.promote_types(dtype, jnp.float32))
    if mask is None or mode:
        return x, None
    mask, shape = jnp.asarray(mask, bool), tuple(jnp.shape(x))
    try:
        ok = mask.ndim <= len(shape) and np.broadcast_shapes(mask.shape, shape) == shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"flax.linen.BatchNorm at {where!r}: mask has shape {mask.shape}, "
                         f"which does not broadcast to the input's shape {shape}; Flax's "
                         "layer takes a mask broadcastable to its input.")
    return x, mask.reshape((1,) * (len(shape) - mask.ndim) + mask.shape)


def replacing_flax_batch_norm(
    *, epsilon: float | str = "module", guard_non_finite: bool = True
) -> contextlib.AbstractContextManager[SwapReport]:
    """While active, every ``flax.linen.BatchNorm`` call runs ``bnjax.BatchNorm``.

    Each replaced call builds ``bnjax.BatchNorm`` with the module's own fields (momentum,
    epsilon, axis, dtypes, initializers, ``axis_name``, ...; ``dtype=None`` keeps Flax's
    promotion of the input with the parameters) in the module's own scope, and calls it with
    the module's arguments (``x``, ``use_running_average``, ``mask``) read as Flax reads them:
    a call Flax refuses (``use_running_average`` at construction and at call, or at neither;
    an argument Flax's call does not take) raises Flax's error, an integer or boolean input
    is cast to float32, a mask is cast to bool and broadcast to the input (and ignored with
    the moving statistics, as Flax ignores it). Variables keep their names and places, so
    ``init``, ``apply`` and checkpoints work unchanged.

    The swap acts in this thread until the ``with`` ends, and only where it is the innermost
    active swap; its settings are part of jax's cache key, so a jitted function runs what
    the swap active at the call says (see the module docstring).

    Args:
      epsilon: ``"module"`` (each layer's own), ``"keras"`` (1e-3) or a number > 0 for all.
      guard_non_finite: keep a feature's moving statistics when its batch statistics are
        not finite (bnjax's guard); False updates them as Flax does.

    Returns:
      A context manager; ``with ... as report`` gives a :class:`SwapReport` that lists the
      layers replaced while it was active.

    Raises:
      ValueError: an option is not accepted; or, when a layer is called, a field of that
        layer bnjax cannot honour, a call Flax refuses, or any other error of the call
        (the message names the module path).
      TypeError: ``guard_non_finite`` is not a bool; or a call with arguments Flax's call
        does not take (named with the module path).

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> bn = nn.BatchNorm(use_running_average=False, epsilon=0.0)  # Flax accepts 0
      >>> with replacing_flax_batch_norm():
      ...     bn.init(jax.random.key(0), jnp.ones((2, 3)))
      Traceback (most recent call last):
      ...
      ValueError: flax.linen.BatchNorm at '<root>' cannot run on bnjax: epsilon=0.0 must be ...
    """
    eps = _resolve_epsilon(epsilon)
    check_mode("guard_non_finite", guard_non_finite, optional=False)

    def run(module: nn.BatchNorm, x: Any, mode: bool, mask: Any) -> Any:
        where = _where(module.path)
        layer = _linen_layer(module, x, eps, guard_non_finite)
        x, mask = _as_flax_reads(x, mode, mask, where)
        try:
            return layer(x, mode, mask=mask)
        except (TypeError, ValueError) as e:
            if type(e) not in (TypeError, ValueError):  # jax's own subclasses, as they are
                raise
            raise type(e)(f"flax.linen.BatchNorm at {where!r} cannot run on bnjax: {e}") from e

    return _intercepting(("bnjax", eps, bool(guard_non_finite)), run)


def without_flax_batch_norm() -> contextlib.AbstractContextManager[SwapReport]:
    """While active, every ``flax.linen.BatchNorm`` returns its input: the no-norm ablation.

    The layers declare no variables (a model initialized inside has no ``batch_stats``);
    the output is cast to a layer's ``dtype`` when it sets one. A call Flax refuses raises
    Flax's error, as under :func:`replacing_flax_batch_norm`, and the scope is the same: this
    thread, the innermost active swap, part of jax's cache key.

    Returns:
      A context manager giving a :class:`SwapReport` of the layers removed.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> with without_flax_batch_norm() as report:
      ...     v = nn.BatchNorm(use_running_average=True).init(jax.random.key(0), jnp.ones(3))
      >>> v, report.count
      ({}, 1)
    """
    def run(module: nn.BatchNorm, x: Any, mode: bool, mask: Any) -> Any:
        return x if module.dtype is None else jnp.asarray(x, module.dtype)

    return _intercepting(("identity",), run)


def _children(node: Any) -> list[tuple[Any, Any]]:
    from flax import nnx

    if isinstance(node, nnx.Module):
        return [(k, v) for k, v in vars(node).items() if not k.startswith("_")]
    if isinstance(node, list | tuple):
        return list(enumerate(node))
    if isinstance(node, dict):
        return list(node.items())
    return []


def _set_child(node: Any, key: Any, value: Any, where: str) -> None:
    from flax import nnx

    if isinstance(node, nnx.Module):
        setattr(node, key, value)
    elif isinstance(node, list | dict):
        node[key] = value
    else:
        raise TypeError(f"flax.nnx.BatchNorm at {where!r} sits in a {type(node).__name__}, "
                        "which cannot be changed in place; hold it in an attribute, an "
                        "nnx.List or an nnx.Dict.")


def _nnx_layer(old: Any, where: str, epsilon: float | None, guard_non_finite: bool) -> Any:
    """``bnjax.nnx.BatchNorm`` with ``old``'s settings, holding ``old``'s own variables."""
    from flax import nnx

    from bnjax.nnx import BatchNorm as NNXBatchNorm

    if type(old).__call__ is not nnx.BatchNorm.__call__:
        raise TypeError(f"flax.nnx.BatchNorm at {where!r} is a {type(old).__name__}, which "
                        "overrides __call__; only flax.nnx.BatchNorm's own call is replaced.")
    attrs = {k: v for k, v in vars(old).items() if not k.startswith("_")}
    unknown = sorted(set(attrs) - set(_NNX_SETTINGS) - set(_NNX_VARIABLES))
    if unknown:
        raise ValueError(f"flax.nnx.BatchNorm at {where!r}: attribute(s) {unknown} have no "
                         f"bnjax counterpart; bnjax.nnx.BatchNorm takes {list(_NNX_SETTINGS)}.")
    settings = {k: attrs[k] for k in _NNX_SETTINGS}
    if epsilon is not None:
        settings["epsilon"] = epsilon
    try:
        layer = NNXBatchNorm(**settings, guard_non_finite=guard_non_finite)
    except (TypeError, ValueError) as e:
        raise type(e)(f"flax.nnx.BatchNorm at {where!r} cannot run on bnjax: {e}") from None
    for name in _NNX_VARIABLES:
        if attrs[name] is not None:
            setattr(layer, name, attrs[name])  # the same Variable objects
    return layer


def replace_nnx_batch_norm(
    model: Any, *, epsilon: float | str = "module", guard_non_finite: bool = True
) -> SwapReport:
    """Replaces every ``flax.nnx.BatchNorm`` of ``model``'s graph by ``bnjax.nnx.BatchNorm``.

    In place: each layer is replaced where it sits (an attribute, an ``nnx.List`` or
    ``nnx.Dict`` entry, a list or dict), every reference to a shared layer by the same new
    layer. The new layer takes the old one's settings (``promote_dtype`` included, so dtypes
    follow Flax) and holds the old one's ``nnx.Param`` and ``nnx.BatchStat`` objects, so
    ``nnx.state(model)`` keeps its paths and values.

    The model itself changes (for every thread), so a function given the model, ``nnx.jit``
    included, runs bnjax from then on. A graphdef taken before (``nnx.split(model)``) still
    describes Flax's layer: ``nnx.merge`` of it rebuilds ``flax.nnx.BatchNorm``; split the
    model again after the replacement.

    Args:
      model: an NNX module (searched recursively).
      epsilon: ``"module"`` (each layer's own), ``"keras"`` (1e-3) or a number > 0 for all.
      guard_non_finite: bnjax's non-finite guard of the moving statistics.

    Returns:
      A :class:`SwapReport` of the paths replaced.

    Raises:
      ValueError: an option is not accepted, ``model`` is itself a ``flax.nnx.BatchNorm``,
        or a layer has a setting bnjax cannot honour (the message names its path).
      TypeError: a layer overrides ``__call__`` or sits in a tuple.

    Example:
      >>> from flax import nnx
      >>> class Net(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.bn = nnx.BatchNorm(3, rngs=rngs)
      >>> net = Net(nnx.Rngs(0))
      >>> mean = net.bn.mean
      >>> replace_nnx_batch_norm(net).replaced, type(net.bn).__module__, net.bn.mean is mean
      (['bn'], 'bnjax.nnx', True)
    """
    from flax import nnx

    eps = _resolve_epsilon(epsilon)
    check_mode("guard_non_finite", guard_non_finite, optional=False)
    if isinstance(model, nnx.BatchNorm):
        raise ValueError("model is itself a flax.nnx.BatchNorm, which cannot be replaced in "
                         "place; build a bnjax.nnx.BatchNorm instead.")
    report, new = SwapReport(), {}
    for path, node in list(nnx.iter_graph(model)):
        for key, child in _children(node):
            if isinstance(child, nnx.BatchNorm):
                where = _where((*path, key))
                if id(child) not in new:
                    new[id(child)] = _nnx_layer(child, where, eps, guard_non_finite)
                    report._add(where)
                _set_child(node, key, new[id(child)], where)
    return report
