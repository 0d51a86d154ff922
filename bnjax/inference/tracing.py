"""Watching a model's layers: intercepted batch-norm calls, and a jaxpr with tagged layers.

The inference tools run any ``flax.linen`` model under :func:`flax.linen.intercept_methods`
(:func:`intercept_layers`), which hands them every call of a batch-norm layer (as a
:class:`BNCall`: the layer and its arguments bound to its ``__call__`` signature) and every
output of a linear layer. :func:`trace_layers` uses that to trace the model to a jaxpr in
which every linear output and every batch-norm input passes through a marker primitive, so
the data flow between them can be read off the jaxpr (:func:`bn_producers`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core as jcore
from jax.interpreters import ad, batching, mlir

from bnjax._layer import FlaxEpsilonWarning
from bnjax.inference.common import Path, bridged_message, path_str
from bnjax.linen import BatchNorm, resolve_training

#: Batch-norm layers the tools recognise (subclasses included: see :func:`intercept_layers`).
BN_TYPES = (BatchNorm, nn.BatchNorm)
#: The base layers whose own ``__call__`` the tools intercept and whose arithmetic they know.
FOLDABLE_BN_TYPES = (BatchNorm, nn.BatchNorm)
#: The base layers' own ``__call__`` functions (unwrapped), as Flax's interceptors see them.
_BASE_CALLS = {cls.__call__.__wrapped__: cls for cls in FOLDABLE_BN_TYPES}
#: Names a subclass defines without changing its base layer's arithmetic.
_NEUTRAL_NAMES = frozenset({
    "__call__", "__init__", "__eq__", "__hash__", "__repr__", "__doc__", "__module__",
    "__annotations__", "__match_args__", "__dataclass_params__", "__dataclass_fields__",
    "__qualname__", "__firstlineno__", "__static_attributes__", "__orig_bases__",
    "__parameters__", "parent", "name", "scope", "_state", "_parent_ref",
    "_compact_name_scope_methods",
})
#: Linear layers a batch norm can be folded into (exact types).
LINEAR_TYPES = (nn.Conv, nn.ConvTranspose, nn.Dense)


# --------------------------------------------------------------------------------------------
# A marker primitive: an identity that tags a value in a traced jaxpr. It is only ever traced
# (never compiled into a model that runs), so the data flow between the tagged outputs of
# linear layers and the tagged inputs of batch-norm layers can be read off the jaxpr.

mark_p = jcore.Primitive("bnjax_inference_mark")
mark_p.def_impl(lambda x, *, tag: x)
mark_p.def_abstract_eval(lambda x, *, tag: x)
mlir.register_lowering(mark_p, lambda ctx, x, *, tag: [x])
batching.primitive_batchers[mark_p] = lambda args, dims, *, tag: (
    mark_p.bind(args[0], tag=tag), dims[0])
ad.primitive_jvps[mark_p] = lambda primals, tangents, *, tag: (
    mark_p.bind(primals[0], tag=tag), tangents[0])


# --------------------------------------------------------------------------------------------
# How a batch-norm layer was called.


@functools.cache
def _call_signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.__call__)


def changed_names(cls: type) -> list[str]:
    """What a batch-norm subclass defines besides fields and its own ``__call__``.

    A subclass that only adds a ``__call__`` (another signature) and field defaults computes
    its base layer's arithmetic, which is what folding replaces; any other method or
    property it defines could change it.

    Example:
      >>> import flax.linen as nn
      >>> class Sub(nn.BatchNorm):
      ...     epsilon: float = 1e-3
      ...     def __call__(self, x, training=None):
      ...         return super().__call__(x, not training)
      >>> changed_names(Sub), changed_names(nn.BatchNorm)
      ([], [])
    """
    fields = getattr(cls, "__dataclass_fields__", {})
    names = []
    for klass in cls.__mro__:
        if klass in FOLDABLE_BN_TYPES:
            break
        names += [n for n in vars(klass) if n not in _NEUTRAL_NAMES and n not in fields]
    return sorted(set(names))


@contextlib.contextmanager
def quiet_epsilon() -> Iterator[None]:
    """Silences ``FlaxEpsilonWarning`` in the tools' own runs of a model.

    The warning is for a user's call of a layer; the tools call the user's model many times
    (traces, collectors, checks), where it would only repeat itself from inside bnjax.

    Example:
      >>> with quiet_epsilon():
      ...     pass
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FlaxEpsilonWarning)
        yield


class BNCall(NamedTuple):
    """One call of a batch-norm layer, its arguments bound to the layer's ``__call__``.

    The arguments are those of the base layer's own ``__call__`` (``bnjax.BatchNorm``'s or
    ``flax.linen.BatchNorm``'s, for a subclass the ``super().__call__`` inside its own), bound
    to that signature, so they are read by name whatever their position.

    Attributes:
      module: the layer.
      bound: the call's arguments, ``self`` included.
    """

    module: nn.Module
    bound: inspect.BoundArguments

    @classmethod
    def bind(cls, module: nn.Module, base: type, args: tuple[Any, ...],
             kwargs: Mapping[str, Any]) -> BNCall:
        """Binds a call of ``base.__call__`` on ``module`` to that signature."""
        return cls(module, _call_signature(base).bind(module, *args, **kwargs))

    @property
    def x(self) -> Any:
        """The layer's input (the first argument after ``self``)."""
        return self.bound.args[1]

    @property
    def mask(self) -> Any:
        """The ``mask`` argument, or None."""
        return self.bound.arguments.get("mask")

    def training(self) -> bool:
        """The mode the call resolves to: True for batch statistics.

        Reads ``training`` and ``use_running_average`` from the call, then the layer's
        ``use_running_average`` attribute and (``bnjax.BatchNorm``) its ``frozen`` flag.
        """
        arguments = self.bound.arguments
        ura = arguments.get("use_running_average")
        if isinstance(self.module, BatchNorm):
            ura = self.module.use_running_average if ura is None else ura
            return resolve_training(arguments.get("training"), ura, frozen=self.module.frozen)
        return not nn.merge_param("use_running_average", self.module.use_running_average, ura)

    def run(self, next_fun: Callable[..., Any], x: Any = None) -> Any:
        """Calls ``next_fun`` with this call's arguments, the input replaced by ``x`` if given."""
        args = list(self.bound.args[1:])
        if x is not None:
            args[0] = x
        return next_fun(*args, **self.bound.kwargs)


def intercept_layers(
    on_bn: Callable[[BNCall, Callable[..., Any]], Any],
    on_linear: Callable[[nn.Module, Any], Any] | None = None,
) -> Any:
    """A context in which batch-norm calls and linear outputs pass through the given functions.

    ``on_bn(call, next_fun)`` replaces every call of a base layer's own ``__call__``
    (``bnjax.BatchNorm``'s or ``flax.linen.BatchNorm``'s): for a subclass with its own
    ``__call__`` (another signature, e.g. ``norm(x, training=t)``), the subclass's code runs
    as it is and ``on_bn`` gets the ``super().__call__`` inside it, whose arguments have the
    base layer's meaning. It returns the layer's output, e.g. ``call.run(next_fun)``. A
    subclass whose ``__call__`` never reaches its base's is not seen as a batch norm.
    ``on_linear(module, y)`` gets the output ``y`` of every
    ``nn.Conv`` / ``nn.ConvTranspose`` / ``nn.Dense`` call and returns what the layer returns.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, bnjax
      >>> model = nn.Sequential([nn.Dense(2),
      ...                        bnjax.BatchNorm(use_running_average=True, epsilon=1e-3)])
      >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
      >>> seen = []
      >>> def on_bn(call, next_fun):
      ...     seen.append((call.module.name, call.x.shape, call.training()))
      ...     return call.run(next_fun)
      >>> with intercept_layers(on_bn):
      ...     _ = model.apply(variables, jnp.ones((4, 3)))
      >>> seen
      [('layers_1', (4, 2), False)]
    """
    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if isinstance(module, nnx.bridge.ToLinen):
            raise TypeError(bridged_message("the inference tool", f"layer {module.path!r}"))
        base = _BASE_CALLS.get(getattr(context.orig_method, "func", None))
        if base is not None and isinstance(module, BN_TYPES):
            return on_bn(BNCall.bind(module, base, args, kwargs), next_fun)
        if on_linear is not None and type(module) in LINEAR_TYPES:
            return on_linear(module, next_fun(*args, **kwargs))
        return next_fun(*args, **kwargs)

    return nn.intercept_methods(interceptor)


def _training_mode_error(fn: str, path: Path, call_kwargs: Mapping[str, Any]) -> ValueError:
    return ValueError(
        f"{fn}: batch-norm layer {path_str(path)} runs in training mode (batch statistics) with "
        f"call_kwargs={dict(call_kwargs)!r}; the inference tools need the model in inference "
        "mode. Pass call_kwargs that select it, e.g. {'training': False} or {'train': False} "
        "for a model with that argument."
    )


# --------------------------------------------------------------------------------------------
# Tracing a model: which layers it calls, in which order, and how data flows between them.


class LayerCall(NamedTuple):
    """One intercepted call of a batch-norm or linear layer during the analysis trace."""

    kind: str  # "bn" or "linear"
    path: Path  # scope path of the layer, relative to the model
    module: nn.Module  # the layer (its attributes are read, never called again)
    in_shape: tuple[int, ...]  # bn: input shape; linear: kernel shape the layer used
    out_dtype: Any  # dtype of the layer's output


def trace_layers(
    model: nn.Module, variables: Mapping[str, Any], x: Any, call_kwargs: Mapping[str, Any],
    fn: str,
) -> tuple[list[LayerCall], Any]:
    """Traces ``model.apply(variables, x, **call_kwargs)`` to a jaxpr with tagged layers.

    Every output of a linear layer and every input of a batch-norm layer passes through the
    marker primitive :data:`mark_p`, tagged with the index of the call in the returned list.

    Raises:
      ValueError: a batch-norm layer runs in training mode (its message starts with ``fn``).

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, bnjax
      >>> model = nn.Sequential([nn.Dense(2),
      ...                        bnjax.BatchNorm(use_running_average=True, epsilon=1e-3)])
      >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
      >>> calls, jaxpr = trace_layers(model, variables, jnp.ones((4, 3)), {}, "example")
      >>> [(c.kind, c.path, c.in_shape) for c in calls]
      [('linear', ('layers_0',), (3, 2)), ('bn', ('layers_1',), (4, 2))]
    """
    calls: list[LayerCall] = []

    def on_bn(call: BNCall, next_fun):
        path = call.module.scope.path
        if call.training():
            raise _training_mode_error(fn, path, call_kwargs)
        index = len(calls)
        calls.append(LayerCall("bn", path, call.module, tuple(call.x.shape), None))
        out = call.run(next_fun, mark_p.bind(call.x, tag=index))
        calls[index] = calls[index]._replace(out_dtype=jnp.result_type(out))
        return out

    def on_linear(module: nn.Module, out):
        kernel = module.get_variable("params", "kernel")
        kshape = () if kernel is None else tuple(kernel.shape)
        calls.append(LayerCall("linear", module.scope.path, module, kshape,
                               jnp.result_type(out)))
        return mark_p.bind(out, tag=len(calls) - 1)

    leaves, treedef = jax.tree.flatten(x)
    traced = [hasattr(v, "shape") and hasattr(v, "dtype") for v in leaves]

    def run(variables, arrays):
        it = iter(arrays)
        xs = jax.tree.unflatten(
            treedef, [next(it) if t else v for v, t in zip(leaves, traced, strict=True)])
        with quiet_epsilon(), intercept_layers(on_bn, on_linear):
            return model.apply(variables, xs, **call_kwargs)

    specs = [jax.ShapeDtypeStruct(tuple(v.shape), v.dtype)
             for v, t in zip(leaves, traced, strict=True) if t]
    vspecs = jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), jnp.result_type(v)),
                          variables)
    closed = jax.make_jaxpr(run)(vspecs, specs)
    return calls, closed.jaxpr


def _subjaxprs(eqn: Any) -> list[Any]:
    out = []
    for v in eqn.params.values():
        for item in v if isinstance(v, tuple | list) else (v,):
            if hasattr(item, "eqns"):
                out.append(item)
            elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
                out.append(item.jaxpr)
    return out


def _op_name(eqn: Any) -> str:
    """A readable name of an operation: a named call's name (``relu``) or the primitive's."""
    name = eqn.params.get("name")
    if name is not None:
        return str(getattr(name, "__name__", name))
    subs = _subjaxprs(eqn)
    if len(subs) == 1 and len(subs[0].eqns) == 1:
        return _op_name(subs[0].eqns[0])
    return eqn.primitive.name


def bn_producers(jaxpr: Any, calls: list[LayerCall], top: bool = True) -> dict[int, tuple]:
    """For each traced batch-norm call: what produced its input.

    Returns ``{bn_index: ("linear", linear_index) | ("shared", linear_index, n_other_uses) |
    ("op", name) | ("input", top_level)}``, read off the jaxpr (and its sub-jaxprs).

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, bnjax
      >>> model = nn.Sequential([nn.Dense(2), nn.relu,
      ...                        bnjax.BatchNorm(use_running_average=True, epsilon=1e-3)])
      >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
      >>> calls, jaxpr = trace_layers(model, variables, jnp.ones((4, 3)), {}, "example")
      >>> bn_producers(jaxpr, calls)
      {1: ('op', 'relu')}
    """
    producers: dict[Any, Any] = {}
    uses: Counter = Counter()
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            producers[v] = eqn
        for v in eqn.invars:
            if isinstance(v, jcore.Var):
                uses[v] += 1
    for v in jaxpr.outvars:
        if isinstance(v, jcore.Var):
            uses[v] += 1
    result: dict[int, tuple] = {}
    for eqn in jaxpr.eqns:
        for sub in _subjaxprs(eqn):
            result.update(bn_producers(sub, calls, top=False))
        if eqn.primitive is not mark_p or calls[eqn.params["tag"]].kind != "bn":
            continue
        src = eqn.invars[0]
        prod = producers.get(src) if isinstance(src, jcore.Var) else None
        if prod is None:
            result[eqn.params["tag"]] = ("input", top)
        elif prod.primitive is mark_p and calls[prod.params["tag"]].kind == "linear":
            if uses[src] == 1:
                result[eqn.params["tag"]] = ("linear", prod.params["tag"])
            else:
                result[eqn.params["tag"]] = ("shared", prod.params["tag"], uses[src] - 1)
        else:
            result[eqn.params["tag"]] = ("op", _op_name(prod))
    return result
