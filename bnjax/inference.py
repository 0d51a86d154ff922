"""Inference tools for batch norm: folding, precise population statistics, Monte Carlo BN.

At inference a batch-norm layer is a fixed per-channel affine map. This module

- folds it into the preceding convolution or dense layer (:func:`fold_batch_norm`), so the
  deployed model does no normalization arithmetic at all;
- replaces the moving averages by exact population statistics over many batches
  (:func:`precise_batch_stats`, PreciseBN of Wu and Johnson, 2021);
- uses the statistics of sampled training batches as a source of randomness for predictive
  uncertainty (:func:`mc_batch_norm_predict`, Monte Carlo batch norm of Teye et al., 2018).

All three work on any ``flax.linen`` model, not only on the model zoo: they run the model and
watch its layers with :func:`flax.linen.intercept_methods`. Layers recognised as batch norm are
``bnjax.BatchNorm`` and ``flax.linen.BatchNorm`` (and, for the statistics tools, their
subclasses); layers recognised as linear are ``flax.linen.Conv``, ``flax.linen.ConvTranspose``
and ``flax.linen.Dense``. The arithmetic of the statistics is ``bnjax.functional``'s.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore
from jax.interpreters import ad, batching, mlir

from bnjax import functional as F
from bnjax.linen import BatchNorm, resolve_training
from bnjax.stats import combine_sums

Array = jax.Array
Path = tuple[str, ...]

__all__ = [
    "FoldedModel",
    "MCBNPrediction",
    "export_folded_model",
    "fold_batch_norm",
    "mc_batch_norm_predict",
    "precise_batch_stats",
]

#: Layers whose statistics the tools recompute (subclasses included).
_BN_TYPES = (BatchNorm, nn.BatchNorm)
#: Layers folded into a preceding linear layer (exact types: a subclass may compute more).
_FOLDABLE_BN_TYPES = (BatchNorm, nn.BatchNorm)
#: Linear layers a batch norm can be folded into (exact types).
_LINEAR_TYPES = (nn.Conv, nn.ConvTranspose, nn.Dense)

_DEFAULT_CALL_KWARGS: Mapping[str, Any] = {"training": False}


# --------------------------------------------------------------------------------------------
# A marker primitive: an identity that tags a value in a traced jaxpr. It is only ever traced
# (never compiled into a model that runs), so the data flow between the tagged outputs of
# linear layers and the tagged inputs of batch-norm layers can be read off the jaxpr.

_mark_p = jcore.Primitive("bnjax_inference_mark")
_mark_p.def_impl(lambda x, *, tag: x)
_mark_p.def_abstract_eval(lambda x, *, tag: x)
mlir.register_lowering(_mark_p, lambda ctx, x, *, tag: [x])
batching.primitive_batchers[_mark_p] = lambda args, dims, *, tag: (
    _mark_p.bind(args[0], tag=tag), dims[0])
ad.primitive_jvps[_mark_p] = lambda primals, tangents, *, tag: (
    _mark_p.bind(primals[0], tag=tag), tangents[0])


# --------------------------------------------------------------------------------------------
# Small helpers: argument checks, variable trees, how a batch-norm layer was called.


def _fmt(path: Path) -> str:
    return "/".join(path) if path else "<root>"


def _as_dict(variables: Any, name: str = "variables") -> dict[str, Any]:
    if not isinstance(variables, Mapping):
        raise TypeError(
            f"{name} has type {type(variables).__name__}; pass the model's variables, the dict "
            "returned by model.init(...) with 'params' and 'batch_stats' collections."
        )
    return _copy_tree(variables)


def _copy_tree(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _copy_tree(v) for k, v in tree.items()}
    return tree


def _require_batch_stats(variables: Mapping[str, Any], fn: str) -> None:
    if "batch_stats" not in variables or not variables["batch_stats"]:
        raise ValueError(
            f"{fn}: variables has collections {sorted(variables)} but no 'batch_stats'; pass "
            "the variables of a model with batch-norm layers, as returned by model.init(...) "
            "(or {'params': state.params, 'batch_stats': state.batch_stats})."
        )


def _get(tree: Mapping[str, Any], path: Path) -> Any:
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _set(tree: dict[str, Any], path: Path, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _delete(tree: dict[str, Any], path: Path) -> None:
    """Deletes ``tree[path]`` and then every dict left empty on the way up."""
    if not path:
        return
    parent = _get(tree, path[:-1])
    if isinstance(parent, dict) and path[-1] in parent:
        del parent[path[-1]]
        if not parent:
            _delete(tree, path[:-1])


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1.")
    return int(value)


def _call_kwargs(call_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    if call_kwargs is None:
        return dict(_DEFAULT_CALL_KWARGS)
    if not isinstance(call_kwargs, Mapping):
        raise TypeError(
            f"call_kwargs={call_kwargs!r} must be a dict of keyword arguments for the model "
            "call, e.g. {'training': False} (the default) or {'train': False}."
        )
    return dict(call_kwargs)


def _bn_input(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    return args[0] if args else kwargs["x"]


def _with_bn_input(x: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "x": x}


def _bn_training(module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    """The mode a batch-norm call resolves to (True: batch statistics)."""
    if isinstance(module, BatchNorm):
        training = args[1] if len(args) > 1 else kwargs.get("training")
        ura = kwargs.get("use_running_average")
        ura = module.use_running_average if ura is None else ura
        return resolve_training(training, ura, frozen=module.frozen)
    ura = args[1] if len(args) > 1 else kwargs.get("use_running_average")
    return not nn.merge_param("use_running_average", module.use_running_average, ura)


def _training_mode_error(fn: str, path: Path, call_kwargs: Mapping[str, Any]) -> ValueError:
    return ValueError(
        f"{fn}: batch-norm layer {_fmt(path)} runs in training mode (batch statistics) with "
        f"call_kwargs={dict(call_kwargs)!r}; the inference tools need the model in inference "
        "mode. Pass call_kwargs that select it, e.g. {'training': False} (the default) or "
        "{'train': False} for a model with that argument."
    )


# --------------------------------------------------------------------------------------------
# Tracing a model: which layers it calls, in which order, and how data flows between them.


class _Call(NamedTuple):
    """One intercepted call of a batch-norm or linear layer during the analysis trace."""

    kind: str  # "bn" or "linear"
    path: Path  # scope path of the layer, relative to the model
    module: nn.Module  # the layer (its attributes are read, never called again)
    in_shape: tuple[int, ...]  # bn: input shape; linear: kernel shape the layer used
    out_dtype: Any  # dtype of the layer's output


def _trace(
    model: nn.Module, variables: Mapping[str, Any], x: Any, call_kwargs: Mapping[str, Any],
    fn: str,
) -> tuple[list[_Call], Any]:
    """Traces ``model.apply(variables, x, **call_kwargs)`` to a jaxpr with tagged layers.

    Every output of a linear layer and every input of a batch-norm layer passes through the
    marker primitive, tagged with the index of the call in the returned list.
    """
    calls: list[_Call] = []

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if isinstance(module, _BN_TYPES):
            path = module.scope.path
            if _bn_training(module, args, kwargs):
                raise _training_mode_error(fn, path, call_kwargs)
            xin = _bn_input(args, kwargs)
            index = len(calls)
            calls.append(_Call("bn", path, module, tuple(xin.shape), None))
            args, kwargs = _with_bn_input(_mark_p.bind(xin, tag=index), args, kwargs)
            out = next_fun(*args, **kwargs)
            calls[index] = calls[index]._replace(out_dtype=jnp.result_type(out))
            return out
        if type(module) in _LINEAR_TYPES:
            out = next_fun(*args, **kwargs)
            kernel = module.get_variable("params", "kernel")
            index = len(calls)
            kshape = () if kernel is None else tuple(kernel.shape)
            calls.append(_Call("linear", module.scope.path, module, kshape,
                               jnp.result_type(out)))
            return _mark_p.bind(out, tag=index)
        return next_fun(*args, **kwargs)

    leaves, treedef = jax.tree.flatten(x)
    traced = [hasattr(v, "shape") and hasattr(v, "dtype") for v in leaves]

    def run(variables, arrays):
        it = iter(arrays)
        xs = jax.tree.unflatten(
            treedef, [next(it) if t else v for v, t in zip(leaves, traced, strict=True)])
        with nn.intercept_methods(interceptor):
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


def _bn_producers(jaxpr: Any, calls: list[_Call], top: bool = True) -> dict[int, tuple]:
    """For each traced batch-norm call: what produced its input.

    Returns ``{bn_index: ("linear", linear_index) | ("shared", linear_index, n_other_uses) |
    ("op", name) | ("input", top_level)}``, read off the jaxpr (and its sub-jaxprs).
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
            result.update(_bn_producers(sub, calls, top=False))
        if eqn.primitive is not _mark_p or calls[eqn.params["tag"]].kind != "bn":
            continue
        src = eqn.invars[0]
        prod = producers.get(src) if isinstance(src, jcore.Var) else None
        if prod is None:
            result[eqn.params["tag"]] = ("input", top)
        elif prod.primitive is _mark_p and calls[prod.params["tag"]].kind == "linear":
            if uses[src] == 1:
                result[eqn.params["tag"]] = ("linear", prod.params["tag"])
            else:
                result[eqn.params["tag"]] = ("shared", prod.params["tag"], uses[src] - 1)
        else:
            result[eqn.params["tag"]] = ("op", _op_name(prod))
    return result


# --------------------------------------------------------------------------------------------
# Folding.


class _FoldStep(NamedTuple):
    linear_path: Path
    bn_path: Path
    add_bias: bool  # the linear layer has no bias of its own: the folded model adds it
    out_dtype: str  # dtype of the batch norm's output (the identity casts to it)


class FoldedModel(nn.Module):
    """A model whose foldable batch norms are merged into the preceding conv / dense layer.

    Built by :func:`fold_batch_norm`; call it like the original model (same arguments, same
    variable paths) with the folded variables. While it runs, an interceptor turns every folded
    batch-norm layer into the identity and adds the folded bias to linear layers that had none;
    the folded kernels and biases themselves are in the variables. The folded model is for
    inference only: a folded layer called in training mode raises an error.

    Attributes:
      model: the original model (its submodules share this module's scope).
      plan: the folded (linear layer, batch norm) pairs.
      kept: ``(batch-norm path, reason)`` for every batch norm that was not folded.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, bnjax
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, training):
      ...         return bnjax.BatchNorm()(nn.Dense(3)(x), training=training)
      >>> variables = Net().init(jax.random.key(0), jnp.ones((2, 4)), training=False)
      >>> folded, fv = bnjax.fold_batch_norm(Net(), variables, jnp.ones((2, 4)))
      >>> folded.folded, sorted(fv)
      ((('Dense_0', 'BatchNorm_0'),), ['params'])
    """

    model: nn.Module
    plan: tuple[_FoldStep, ...] = ()
    kept: tuple[tuple[str, str], ...] = ()

    @property
    def folded(self) -> tuple[tuple[str, str], ...]:
        """``(linear layer path, batch-norm path)`` of every folded pair, '/'-joined."""
        return tuple((_fmt(s.linear_path), _fmt(s.bn_path)) for s in self.plan)

    def summary(self) -> str:
        """A readable report: which batch norms were folded where, which stayed and why."""
        lines = [f"folded {len(self.plan)} batch norm(s), kept {len(self.kept)}"]
        lines += [f"  folded {bn} into {lin}" for lin, bn in self.folded]
        lines += [f"  kept {bn}: {why}" for bn, why in self.kept]
        return "\n".join(lines)

    def setup(self) -> None:
        """Shares this module's scope with the wrapped model, so variable paths are unchanged."""
        nn.share_scope(self, self.model)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the wrapped model with the folded batch norms removed."""
        prefix = self.scope.path
        by_bn = {s.bn_path: s for s in self.plan}
        by_linear = {s.linear_path: s for s in self.plan if s.add_bias}

        def interceptor(next_fun, iargs, ikwargs, context):
            module = context.module
            path = module.scope.path
            if context.method_name != "__call__" or path[: len(prefix)] != prefix:
                return next_fun(*iargs, **ikwargs)
            rel = path[len(prefix):]
            if rel in by_bn and isinstance(module, _BN_TYPES):
                if _bn_training(module, iargs, ikwargs):
                    raise ValueError(
                        f"batch-norm layer {_fmt(rel)} was folded into "
                        f"{_fmt(by_bn[rel].linear_path)}: the folded model is for inference "
                        "only; call it in inference mode (e.g. training=False)."
                    )
                return _bn_input(iargs, ikwargs).astype(by_bn[rel].out_dtype)
            if rel in by_linear and type(module) in _LINEAR_TYPES:
                y = next_fun(*iargs, **ikwargs)
                return y + module.get_variable("params", "bias").astype(y.dtype)
            return next_fun(*iargs, **ikwargs)

        with nn.intercept_methods(interceptor):
            return self.model(*args, **kwargs)


def _linear_out_axis(module: nn.Module) -> int:
    """The kernel axis that indexes output features."""
    if isinstance(module, nn.ConvTranspose) and module.transpose_kernel:
        return -2
    return -1


def _why_not(bn: _Call, lin: _Call, variables: Mapping[str, Any], counts: Counter) -> str | None:
    """Why the pair (linear layer, batch norm) cannot be folded, or None when it can."""
    module = lin.module
    if counts[lin.path] > 1:
        return f"its input comes from {_fmt(lin.path)}, which is called {counts[lin.path]} times"
    if getattr(module, "conv_general_dilated", None) is not None or \
            getattr(module, "dot_general", None) is not None or \
            getattr(module, "dot_general_cls", None) is not None or \
            getattr(module, "conv_general_dilated_cls", None) is not None:
        return f"{_fmt(lin.path)} uses a custom dot_general / conv_general_dilated"
    kernel = _get(variables.get("params", {}), lin.path + ("kernel",))
    if kernel is None or tuple(np.shape(kernel)) != lin.in_shape:
        return (f"the variables of {_fmt(lin.path)} do not match the kernel it uses "
                "(a lifted transform such as nn.scan or nn.vmap)")
    ndim = len(bn.in_shape)
    axes = F.canonicalize_axes(bn.module.axis, ndim)
    if axes != (ndim - 1,):
        return (f"it normalizes axis {axes} of its {ndim}-d input, not the output features "
                f"(last axis) of {_fmt(lin.path)}")
    features = lin.in_shape[_linear_out_axis(module)]
    if bn.in_shape[-1] != features:
        return f"its feature size {bn.in_shape[-1]} differs from {features} of {_fmt(lin.path)}"
    stats = _get(variables["batch_stats"], bn.path)
    if not isinstance(stats, Mapping) or {"mean", "var"} - set(stats):
        return "its batch_stats (mean, var) are missing from variables"
    if tuple(np.shape(stats["mean"])) != (features,):
        return "its batch_stats do not have the feature shape (a lifted transform?)"
    return None


def fold_batch_norm(
    model: nn.Module,
    variables: Mapping[str, Any],
    x: Any,
    *,
    call_kwargs: Mapping[str, Any] | None = None,
) -> tuple[FoldedModel, dict[str, Any]]:
    """Merges every batch norm that directly follows a conv / dense layer into that layer.

    At inference a batch norm computes ``y = (z - mean) * s + bias`` with
    ``s = scale / sqrt(var + epsilon)`` per channel. When ``z = conv(x, W) + b`` feeds nothing
    but that batch norm, ``y = conv(x, W * s) + (b - mean) * s + bias``: the kernel is scaled
    per output channel (the last kernel axis, so grouped, strided, dilated and padded
    convolutions are all the same case) and the bias absorbs the rest. The folded weights are
    computed in float64 and cast to the parameters' dtype.

    How pairs are found, for any linen model: the model is traced once in inference mode with
    :func:`flax.linen.intercept_methods`, marking the output of every ``nn.Conv`` /
    ``nn.ConvTranspose`` / ``nn.Dense`` call and the input of every ``bnjax.BatchNorm`` /
    ``nn.BatchNorm`` call with an identity primitive. In the resulting jaxpr a batch norm is
    foldable when its input *is* the marked output of a linear layer (no operation in between)
    and that output has no other consumer (folding would otherwise change the other use, e.g. a
    residual branch), each layer is called once, the layer has no custom ``dot_general`` /
    ``conv_general_dilated``, and the batch norm normalizes the last axis. Every other batch
    norm stays, with the reason in ``folded_model.kept`` (e.g. its input comes from a ``relu``
    or a pooling, or it is a subclass such as a batch-renorm variant whose inference formula
    may differ).

    The folded model (:class:`FoldedModel`) wraps the original one and keeps its variable
    paths: folded batch norms become the identity while it runs, and a linear layer built
    without a bias gets the folded bias from ``params/<layer>/bias``. Its variables have no
    ``batch_stats`` for folded layers (none at all when everything folded).

    Args:
      model: a ``flax.linen`` module.
      variables: its variables, with ``params`` and ``batch_stats``.
      x: an example input (array, ``jax.ShapeDtypeStruct`` or a pytree of them); only shapes
        and dtypes are used.
      call_kwargs: keyword arguments that put the model in inference mode; default
        ``{"training": False}``.

    Returns:
      ``(folded_model, folded_variables)``; call ``folded_model.apply(folded_variables, x,
      **call_kwargs)``. ``folded_model.folded`` lists the folded pairs, ``folded_model.kept``
      the batch norms that stayed and why, ``folded_model.summary()`` both.

    Raises:
      TypeError: ``variables`` is not a mapping, ``model`` not a linen module.
      ValueError: no ``batch_stats`` in ``variables``, or a batch norm runs in training mode.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, bnjax
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, training):
      ...         x = nn.Conv(8, (3, 3), use_bias=False)(x)
      ...         x = nn.relu(bnjax.BatchNorm()(x, training=training))
      ...         return bnjax.BatchNorm()(x, training=training)     # after a relu: stays
      >>> x = jnp.ones((2, 8, 8, 3))
      >>> variables = Net().init(jax.random.key(0), x, training=False)
      >>> folded, fv = bnjax.fold_batch_norm(Net(), variables, x)
      >>> print(folded.summary())
      folded 1 batch norm(s), kept 1
        folded BatchNorm_0 into Conv_0
        kept BatchNorm_1: its input comes from relu, not directly from a Conv/Dense
      >>> y = folded.apply(fv, x, training=False)
      >>> bool(jnp.allclose(y, Net().apply(variables, x, training=False), atol=1e-5))
      True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model has type {type(model).__name__}; pass a flax.linen Module.")
    variables = _as_dict(variables)
    _require_batch_stats(variables, "fold_batch_norm")
    call_kwargs = _call_kwargs(call_kwargs)
    calls, jaxpr = _trace(model, variables, x, call_kwargs, "fold_batch_norm")
    producers = _bn_producers(jaxpr, calls)
    counts = Counter(c.path for c in calls)

    plan: list[_FoldStep] = []
    kept: list[tuple[str, str]] = []
    for index, call in enumerate(calls):
        if call.kind != "bn":
            continue
        src = producers.get(index, ("input", True))
        why = None
        if type(call.module) not in _FOLDABLE_BN_TYPES:
            why = (f"{type(call.module).__name__} is a subclass of a batch norm; only "
                   "bnjax.BatchNorm and flax.linen.BatchNorm are folded")
        elif counts[call.path] > 1:
            why = f"the layer is called {counts[call.path]} times (shared weights)"
        elif src[0] == "input":
            why = ("its input is an input of the model" if src[1] else
                   "its input enters a transformed sub-computation (jit, remat, scan, ...) "
                   "where it cannot be traced back to a layer")
        elif src[0] == "op":
            why = f"its input comes from {src[1]}, not directly from a Conv/Dense"
        elif src[0] == "shared":
            why = (f"the output of {_fmt(calls[src[1]].path)} also feeds {src[2]} other "
                   "operation(s) (e.g. a residual branch), which folding would change")
        else:
            why = _why_not(call, calls[src[1]], variables, counts)
        if why is None:
            plan.append(_FoldStep(calls[src[1]].path, call.path,
                                  not calls[src[1]].module.use_bias,
                                  jnp.dtype(call.out_dtype).name))
        else:
            kept.append((_fmt(call.path), why))

    folded_vars = _copy_tree(variables)
    for step in plan:
        _fold_into(folded_vars, variables, step, calls)
    for step in plan:
        for collection in ("batch_stats", "params"):
            if collection in folded_vars:
                _delete(folded_vars[collection], step.bn_path)
    if not folded_vars.get("batch_stats"):
        folded_vars.pop("batch_stats", None)
    return FoldedModel(model, tuple(plan), tuple(kept)), folded_vars


def _fold_into(out: dict[str, Any], variables: Mapping[str, Any], step: _FoldStep,
               calls: list[_Call]) -> None:
    """Writes the folded kernel and bias of one pair into ``out['params']``."""
    bn = next(c.module for c in calls if c.kind == "bn" and c.path == step.bn_path)
    lin = next(c.module for c in calls if c.kind == "linear" and c.path == step.linear_path)
    lin_params = _get(variables["params"], step.linear_path)
    bn_params = _get(variables.get("params", {}), step.bn_path) or {}
    stats = _get(variables["batch_stats"], step.bn_path)
    kernel = lin_params["kernel"]
    var = np.asarray(stats["var"], np.float64)
    s = 1.0 / np.sqrt(var + float(bn.epsilon))
    if bn.use_scale:
        s = s * np.asarray(bn_params["scale"], np.float64)
    b = np.asarray(lin_params["bias"], np.float64) if lin.use_bias else 0.0
    b = (b - np.asarray(stats["mean"], np.float64)) * s
    if bn.use_bias:
        b = b + np.asarray(bn_params["bias"], np.float64)
    axis = _linear_out_axis(lin)
    shape = [1] * np.ndim(kernel)
    shape[axis] = -1
    new_kernel = np.asarray(kernel, np.float64) * s.reshape(shape)
    bias_dtype = lin_params["bias"].dtype if lin.use_bias else kernel.dtype
    _set(out["params"], step.linear_path + ("kernel",), jnp.asarray(new_kernel, kernel.dtype))
    _set(out["params"], step.linear_path + ("bias",), jnp.asarray(b, bias_dtype))


EXPORT_FILE = "folded_model.jax_export"
REPORT_FILE = "fold_report.json"


def export_folded_model(
    model: nn.Module,
    variables: Mapping[str, Any],
    x: Array,
    directory: str,
    *,
    call_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Folds the batch norms and writes the inference function as a serialized ``jax.export``.

    The file ``<directory>/folded_model.jax_export`` holds the folded model's inference
    computation (StableHLO, weights included, any batch size): load and run it without the
    model's Python code with ``jax.export.deserialize(open(path, "rb").read()).call(x)``.
    ``<directory>/fold_report.json`` lists the folded pairs, the batch norms that stayed and
    why, the input shape and the largest relative difference between the exported function
    and the unfolded model on ``x`` (checked after a round trip through the file).

    Args:
      model: a ``flax.linen`` module.
      variables: its variables, with ``params`` and ``batch_stats``.
      x: example input ``(batch, ...)``; its per-example shape and dtype are those of the
        exported function, whose batch size is free.
      directory: output folder (created if needed).
      call_kwargs: keyword arguments for inference mode; default ``{"training": False}``.

    Returns:
      The report written to ``fold_report.json``.

    Raises:
      ValueError, TypeError: as :func:`fold_batch_norm`, or ``x`` is not an array with a batch
        axis.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, flax.linen as nn, bnjax
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, training):
      ...         return bnjax.BatchNorm()(nn.Dense(3)(x), training=training)
      >>> x = jnp.ones((2, 4))
      >>> variables = Net().init(jax.random.key(0), x, training=False)
      >>> d = tempfile.mkdtemp()
      >>> report = bnjax.export_folded_model(Net(), variables, x, d)
      >>> report["folded"], report["max_rel_diff"] < 1e-5
      ([['Dense_0', 'BatchNorm_0']], True)
      >>> f = jax.export.deserialize(open(report["path"], "rb").read())
      >>> f.call(jnp.ones((5, 4))).shape
      (5, 3)
    """
    from jax import export

    x = _batch_input(x, "x", "x")
    call_kwargs = _call_kwargs(call_kwargs)
    folded, folded_vars = fold_batch_norm(model, variables, x, call_kwargs=call_kwargs)
    fn = jax.jit(lambda inputs: folded.apply(folded_vars, inputs, **call_kwargs))
    dims = ", ".join(["batch", *map(str, x.shape[1:])])
    spec = jax.ShapeDtypeStruct(export.symbolic_shape(dims), x.dtype)
    data = export.export(fn)(spec).serialize()
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, EXPORT_FILE)
    with open(path, "wb") as f:
        f.write(data)
    with open(path, "rb") as f:
        reloaded = export.deserialize(bytearray(f.read()))
    check = x[:8]
    want = np.asarray(model.apply(variables, check, **call_kwargs), np.float64)
    got = np.asarray(reloaded.call(check), np.float64)
    report = {
        "path": path,
        "input_shape": ["batch", *x.shape[1:]],
        "input_dtype": jnp.dtype(x.dtype).name,
        "folded": [list(p) for p in folded.folded],
        "kept": [list(k) for k in folded.kept],
        "max_rel_diff": float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)),
        "bytes": len(data),
    }
    with open(os.path.join(directory, REPORT_FILE), "w") as f:
        json.dump(report, f, indent=2)
    return report


# --------------------------------------------------------------------------------------------
# Batches and batch-norm layers for the statistics tools.


def _batch_input(batch: Any, input_key: str, where: str) -> Array:
    if isinstance(batch, Mapping):
        if input_key not in batch:
            raise ValueError(
                f"{where} is a dict with keys {sorted(batch)} but no {input_key!r}; pass "
                f"batches as arrays or dicts holding the model input under input_key="
                f"{input_key!r}."
            )
        batch = batch[input_key]
    if isinstance(batch, str) or not hasattr(batch, "shape"):
        raise TypeError(
            f"{where} has type {type(batch).__name__}; each batch must be an array shaped "
            "(batch_size, ...) or a dict holding one (e.g. {'x': ..., 'y': ...})."
        )
    batch = jnp.asarray(batch)
    if not jnp.issubdtype(batch.dtype, jnp.floating) or batch.ndim < 1 or batch.shape[0] < 1:
        raise ValueError(
            f"{where} has shape {tuple(batch.shape)} and dtype {batch.dtype}; a batch must be "
            "a floating-point array shaped (batch_size >= 1, ...)."
        )
    return batch


def _collect_batches(batches: Any, limit: float, input_key: str, name: str) -> list[Array]:
    """Up to ``limit`` model inputs, checked to share one per-example shape."""
    if hasattr(batches, "shape") and not isinstance(batches, Mapping):
        if len(batches.shape) < 2:
            raise ValueError(
                f"{name} is one array of shape {tuple(batches.shape)}; an array of batches "
                "must be stacked as (num_batches, batch_size, ...)."
            )
    elif isinstance(batches, Mapping | str) or not isinstance(batches, Iterable):
        raise TypeError(
            f"{name} has type {type(batches).__name__}; pass an iterable of batches (arrays "
            "shaped (batch_size, ...) or dicts with the input under input_key), or one array "
            "of stacked batches shaped (num_batches, batch_size, ...)."
        )
    out: list[Array] = []
    for i, batch in enumerate(batches):
        if i >= limit:
            break
        x = _batch_input(batch, input_key, f"{name}[{i}]")
        if out and x.shape[1:] != out[0].shape[1:]:
            raise ValueError(
                f"{name}[{i}] has shape {tuple(x.shape)} but {name}[0] has shape "
                f"{tuple(out[0].shape)}; every batch must have the same per-example shape "
                f"{tuple(out[0].shape[1:])} (only the batch size may differ)."
            )
        out.append(x)
    if not out:
        raise ValueError(f"{name} is empty; pass at least one batch.")
    return out


def _bn_layers(model: nn.Module, variables: Mapping[str, Any], x: Array,
               call_kwargs: Mapping[str, Any], fn: str) -> list[_Call]:
    """The batch-norm layers the model calls, in call order, checked for the statistics tools."""
    try:
        calls, _ = _trace(model, variables, x, call_kwargs, fn)
    except Exception as e:
        if isinstance(e, ValueError) and str(e).startswith(fn):
            raise
        raise ValueError(
            f"{fn}: the model could not be run on inputs of shape {tuple(x.shape)} with "
            f"call_kwargs={dict(call_kwargs)!r}: {e}"
        ) from e
    bns = [c for c in calls if c.kind == "bn"]
    if not bns:
        raise ValueError(
            f"{fn}: the model calls no batch-norm layer (bnjax.BatchNorm or "
            "flax.linen.BatchNorm); there are no statistics to compute."
        )
    counts = Counter(c.path for c in bns)
    for c in bns:
        if counts[c.path] > 1:
            raise ValueError(
                f"{fn}: batch-norm layer {_fmt(c.path)} is called {counts[c.path]} times in "
                "one forward pass; its statistics would mix several inputs, which these tools "
                "do not support. Use one layer per call."
            )
        stats = _get(variables["batch_stats"], c.path)
        feature_shape = tuple(c.in_shape[a] for a in
                              F.canonicalize_axes(c.module.axis, len(c.in_shape)))
        if not isinstance(stats, Mapping) or tuple(np.shape(stats.get("mean"))) != \
                feature_shape:
            raise ValueError(
                f"{fn}: batch_stats of layer {_fmt(c.path)} are missing or do not have the "
                f"feature shape {feature_shape} (a layer inside nn.scan / nn.vmap is not "
                "supported)."
            )
    known = {c.path for c in bns}
    others = [_fmt(p[:-1]) for p, _ in flax.traverse_util.flatten_dict(
        variables["batch_stats"]).items() if p[:-1] not in known]
    if others:
        warnings.warn(
            f"{fn}: batch_stats of {sorted(set(others))} do not belong to a recognised "
            "batch-norm layer and are left unchanged.", stacklevel=3)
    return bns


def _make_collector(model: nn.Module, call_kwargs: Mapping[str, Any],
                    record: Path | None) -> Any:
    """A jitted ``f(variables, x)`` over the model in inference mode.

    With ``record`` a path: returns the ``Moments`` of that batch norm's input (every other
    layer normalizes with the statistics in ``variables``). With ``record=None``: every batch
    norm normalizes with the moments of its own input (training-mode statistics without the
    moving-average update) and ``f`` returns those moments as a ``batch_stats`` tree.
    """

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, _BN_TYPES):
            return next_fun(*args, **kwargs)
        xin = _bn_input(args, kwargs)
        if record is not None and module.scope.path != record:
            return next_fun(*args, **kwargs)
        m = F.moments(xin, module.axis, mask=kwargs.get("mask"))
        if record is not None:
            found.append(m)
        else:
            for key, value in (("mean", m.mean), ("var", m.var)):
                old = module.get_variable("batch_stats", key)
                module.put_variable("batch_stats", key, value.astype(old.dtype))
        return next_fun(*args, **kwargs)

    found: list[F.Moments] = []

    @jax.jit
    def collect(variables, x):
        found.clear()
        with nn.intercept_methods(interceptor):
            if record is not None:
                model.apply(variables, x, **call_kwargs)
                return found[0]
            _, updates = model.apply(variables, x, mutable=["batch_stats"], **call_kwargs)
            return updates["batch_stats"]

    return collect


# --------------------------------------------------------------------------------------------
# PreciseBN.


def precise_batch_stats(
    model: nn.Module,
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    num_batches: int = 200,
    *,
    unbiased: bool = False,
    call_kwargs: Mapping[str, Any] | None = None,
    input_key: str = "x",
) -> dict[str, Any]:
    """Replaces every batch norm's moving statistics by exact population statistics.

    PreciseBN (Wu and Johnson, "Rethinking 'Batch' in BatchNorm", 2021): the moving average
    mixes statistics of weights from many past steps; after training, the population mean and
    variance of each layer's input are recomputed exactly over ``num_batches`` batches with the
    final weights.

    Layer after layer: the batch norms are processed in the order the model calls them, and
    the inputs of layer ``k`` are computed with the model in inference mode, every earlier
    batch norm already normalizing with its *recomputed* statistics (and later ones with
    their old statistics, which do not affect layer ``k``). So the result is exactly the
    population statistics the final inference model sees. This costs one pass over the batches
    per layer (each pass stops, after XLA's dead-code elimination, at that layer), and the
    batches are held in memory between passes.

    Per batch, ``bnjax.functional.moments`` gives the mean, biased variance and count of each
    feature; the batches are combined with the exact parallel-variance formula of
    ``bnjax.functional`` into the mean and biased variance of all values of all batches
    (``unbiased=False``). With ``unbiased=True`` the variance is the batch-norm paper's
    estimator ``Var[x] = m / (m - 1) * E_B[var_B]`` (Ioffe and Szegedy, 2015, Alg. 2): each
    batch's variance with the ``m/(m-1)`` correction, ``m`` its number of values per feature,
    averaged over the batches weighted by ``m``. The means are the same in both cases.

    Args:
      model: a ``flax.linen`` module with ``bnjax.BatchNorm`` / ``nn.BatchNorm`` layers
        (subclasses included), each called once per forward pass.
      variables: its variables, with ``params`` and ``batch_stats``.
      batches: an iterable of batches (arrays ``(batch_size, ...)`` or dicts holding the input
        under ``input_key``), e.g. a training-data iterator, or one array of stacked batches
        ``(num_batches, batch_size, ...)``. Batches must not contain padding examples.
      num_batches: how many batches to use (the first ``num_batches``; fewer if the iterable
        ends earlier), >= 1.
      unbiased: apply the batch-norm paper's ``m/(m-1)`` correction (see above).
      call_kwargs: keyword arguments that put the model in inference mode; default
        ``{"training": False}``.
      input_key: key of the model input in dict batches.

    Returns:
      A copy of ``variables`` whose ``batch_stats`` hold the population statistics of every
      recognised batch-norm layer (others are left unchanged, with a warning). Only ``mean``
      and ``var`` are replaced, the statistics inference uses; other statistics a layer keeps
      (batch renormalization's ``std``, ``renorm_mean``, ``renorm_std``) stay as they are.

    Raises:
      ValueError: ``num_batches`` < 1, no batches, batches of differing or unusable shapes,
        no ``batch_stats``, a batch norm in training mode, a model without batch norm, or
        ``unbiased=True`` with a batch of one value per feature.
      TypeError: ``batches`` or a batch of the wrong type.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, bnjax
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, training):
      ...         return bnjax.BatchNorm()(nn.Dense(2)(x), training=training)
      >>> batches = [jax.random.normal(jax.random.key(i), (16, 3)) for i in range(4)]
      >>> variables = Net().init(jax.random.key(0), batches[0], training=False)
      >>> new = bnjax.precise_batch_stats(Net(), variables, batches)
      >>> z = nn.Dense(2).apply({"params": variables["params"]["Dense_0"]},
      ...                       jnp.concatenate(batches))
      >>> bool(jnp.allclose(new["batch_stats"]["BatchNorm_0"]["var"], z.var(0), rtol=1e-5))
      True
    """
    num_batches = _check_count("num_batches", num_batches)
    if not isinstance(unbiased, bool | np.bool_):
        raise TypeError(f"unbiased={unbiased!r} must be a bool.")
    variables = _as_dict(variables)
    _require_batch_stats(variables, "precise_batch_stats")
    call_kwargs = _call_kwargs(call_kwargs)
    xs = _collect_batches(batches, num_batches, input_key, "batches")
    layers = _bn_layers(model, variables, xs[0], call_kwargs, "precise_batch_stats")

    stats = _copy_tree(variables["batch_stats"])
    for layer in layers:
        collect = _make_collector(model, call_kwargs, layer.path)
        current = {**variables, "batch_stats": stats}
        parts = [collect(current, x) for x in xs]
        count = jnp.stack([p.count for p in parts])
        mean = jnp.stack([p.mean for p in parts])
        var = jnp.stack([p.var for p in parts])
        if unbiased:
            if bool(jnp.any(count <= 1)):
                raise ValueError(
                    f"precise_batch_stats: unbiased=True needs more than one value per feature "
                    f"in every batch, but layer {_fmt(layer.path)} sees a batch with "
                    f"{int(jnp.min(count))}; use unbiased=False or larger batches."
                )
            total = jnp.sum(count, axis=0)
            new_mean = jnp.sum(count * mean, axis=0) / total
            new_var = jnp.sum(count * var * count / (count - 1), axis=0) / total
        else:
            # Each batch's (mean, biased var, count) as sums [count, shift, s1, s2] for the
            # exact parallel combination in bnjax.functional.
            sums = jnp.stack([count, mean, jnp.zeros_like(mean), var * count], axis=1)
            pop = combine_sums(sums)
            new_mean, new_var = pop.mean, pop.var
        old = _get(stats, layer.path)
        _set(stats, layer.path, {**old, "mean": new_mean.astype(old["mean"].dtype),
                                 "var": new_var.astype(old["var"].dtype)})
    return {**variables, "batch_stats": stats}


# --------------------------------------------------------------------------------------------
# Monte Carlo batch norm.


class MCBNPrediction(NamedTuple):
    """Output of :func:`mc_batch_norm_predict` (``N`` inputs, ``K`` classes, ``S`` samples).

    Attributes:
      probs: ``(N, K)`` mean of the sampled predictive distributions.
      entropy: ``(N,)`` predictive entropy of ``probs`` (nats).
      variance: ``(N,)`` variance of the sampled probability vectors, summed over classes.
      mutual_information: ``(N,)`` entropy of the mean minus the mean entropy of the samples
        (the part of the uncertainty due to the sampled statistics).
      sample_probs: ``(S, N, K)`` the sampled predictive distributions.
    """

    probs: Array
    entropy: Array
    variance: Array
    mutual_information: Array
    sample_probs: Array


def _entropy(p: Array) -> Array:
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)


def mc_batch_norm_predict(
    model: nn.Module,
    variables: Mapping[str, Any],
    x: Array,
    train_batches: Sequence[Any] | Array,
    num_samples: int = 16,
    *,
    rng: Any = None,
    call_kwargs: Mapping[str, Any] | None = None,
    input_key: str = "x",
    from_logits: bool = True,
    batch_size: int | None = None,
) -> MCBNPrediction:
    """Monte Carlo batch norm: predictive uncertainty from sampled batch statistics.

    Teye, Azizpour and Smith, "Bayesian Uncertainty Estimation for Batch Normalized Deep
    Networks" (2018). For each of ``num_samples`` samples a training batch is drawn; one
    forward pass over it gives every batch norm its statistics the way training mode does
    (each layer normalizes with the mean and biased variance of its own input in that batch,
    earlier layers included; the moving statistics play no part); then ``x`` is predicted in
    inference mode with those statistics. The samples' predictive distributions are averaged.

    Args:
      model: a ``flax.linen`` module with batch-norm layers, each called once per pass.
      variables: its variables, with ``params`` and ``batch_stats``.
      x: inputs to predict, ``(N, ...)`` with the training batches' per-example shape.
      train_batches: training batches to sample from: a sequence of arrays ``(B, ...)`` or of
        dicts holding the input under ``input_key``, or one array ``(num_batches, B, ...)``.
        Batches are drawn without replacement when there are at least ``num_samples``. A
        plain iterator (no length) contributes its next ``num_samples`` batches instead.
      num_samples: number of sampled batches, >= 1.
      rng: ``jax.random`` key (or int seed) for drawing the batches; default seed 0.
      call_kwargs: keyword arguments that put the model in inference mode; default
        ``{"training": False}``.
      input_key: key of the model input in dict batches.
      from_logits: the model outputs logits (softmax is applied); False: probabilities.
      batch_size: predict ``x`` in chunks of this many examples (default: all at once).

    Returns:
      :class:`MCBNPrediction` with the mean probabilities and per-example uncertainties.

    Raises:
      ValueError: ``num_samples`` < 1, no training batches, ``x`` or batches of the wrong
        shape, no ``batch_stats``, a batch norm in training mode, a model without batch norm.
      TypeError: ``train_batches``, ``x`` or ``rng`` of the wrong type.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, bnjax
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, training):
      ...         return nn.Dense(3)(bnjax.BatchNorm()(nn.Dense(8)(x), training=training))
      >>> train = [jax.random.normal(jax.random.key(i), (16, 4)) for i in range(8)]
      >>> variables = Net().init(jax.random.key(0), train[0], training=False)
      >>> out = bnjax.mc_batch_norm_predict(Net(), variables, train[0], train, num_samples=4)
      >>> out.probs.shape, out.entropy.shape, out.variance.shape
      ((16, 3), (16,), (16,))
    """
    num_samples = _check_count("num_samples", num_samples)
    if batch_size is not None:
        batch_size = _check_count("batch_size", batch_size)
    variables = _as_dict(variables)
    _require_batch_stats(variables, "mc_batch_norm_predict")
    call_kwargs = _call_kwargs(call_kwargs)
    if rng is None:
        rng = jax.random.key(0)
    elif isinstance(rng, int | np.integer) and not isinstance(rng, bool):
        rng = jax.random.key(int(rng))
    elif not isinstance(rng, jax.Array):
        raise TypeError(f"rng={rng!r} must be a jax.random key or an int seed.")
    # A sized collection is sampled from; a plain iterator gives its next num_samples batches.
    sized = hasattr(train_batches, "__len__") or hasattr(train_batches, "shape")
    pool = _collect_batches(train_batches, math.inf if sized else num_samples, input_key,
                            "train_batches")
    x = _batch_input(x, input_key, "x")
    if x.shape[1:] != pool[0].shape[1:]:
        raise ValueError(
            f"x has shape {tuple(x.shape)} but the training batches have per-example shape "
            f"{tuple(pool[0].shape[1:])}; x must be shaped (N, *{tuple(pool[0].shape[1:])})."
        )
    _bn_layers(model, variables, pool[0], call_kwargs, "mc_batch_norm_predict")

    if sized:
        replace = len(pool) < num_samples
        picks = np.asarray(jax.random.choice(rng, len(pool), (num_samples,), replace=replace))
    else:
        picks = np.arange(len(pool))
    collect = _make_collector(model, call_kwargs, None)

    @jax.jit
    def predict(variables, x):
        out = model.apply(variables, x, **call_kwargs)
        return jax.nn.softmax(out, axis=-1) if from_logits else out

    chunk = x.shape[0] if batch_size is None else batch_size
    samples = []
    for i in picks:
        current = {**variables, "batch_stats": collect(variables, pool[int(i)])}
        samples.append(jnp.concatenate([predict(current, x[j:j + chunk])
                                        for j in range(0, x.shape[0], chunk)]))
    sample_probs = jnp.stack(samples).astype(jnp.float32)
    probs = sample_probs.mean(axis=0)
    entropy = _entropy(probs)
    variance = jnp.sum(sample_probs.var(axis=0), axis=-1)
    mutual_information = jnp.maximum(entropy - _entropy(sample_probs).mean(axis=0), 0.0)
    return MCBNPrediction(probs, entropy, variance, mutual_information, sample_probs)
