"""Folding batch norms into the preceding conv / dense layer, and exporting the result.

At inference a batch-norm layer is a fixed per-channel affine map: :func:`fold_batch_norm`
merges it into the convolution or dense layer before it, so the deployed model does no
normalization arithmetic at all, and :func:`export_folded_model` writes that model as a
serialized ``jax.export``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bnjax import functional as F
from bnjax.inference.collect import batch_input
from bnjax.inference.common import (
    Path,
    check_linen_model,
    copy_tree,
    copy_variables,
    delete_path,
    get_path,
    inference_call_kwargs,
    path_str,
    require_batch_stats,
    set_path,
)
from bnjax.inference.tracing import (
    BNCall,
    LayerCall,
    bn_producers,
    changed_names,
    intercept_layers,
    quiet_epsilon,
    trace_layers,
)

Array = jax.Array


class _FoldStep(NamedTuple):
    linear_path: Path
    bn_path: Path
    add_bias: bool  # the linear layer has no bias of its own: the folded model adds it
    out_dtype: str  # dtype of the batch norm's output (the identity casts to it)


class _Held:
    """Holds the wrapped model where Flax does not look for submodules.

    A module in a field of a module is adopted by it: its own submodule fields (an
    ``nn.Sequential``'s layers, an ``Outer(inner=Net())``'s ``inner``) would take paths under
    the wrapper's scope. Held here, the model is applied on its own, with its own paths.
    """

    __slots__ = ("model",)

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __repr__(self) -> str:
        return repr(self.model)


class FoldedModel(nn.Module):
    """A model whose foldable batch norms are merged into the preceding conv / dense layer.

    Built by :func:`fold_batch_norm`; call it like the original model (same arguments, same
    variable paths) with the folded variables. It applies the original model to its variables
    while an interceptor turns every folded batch-norm layer into the identity and adds the
    folded bias to linear layers that had none; the folded kernels and biases themselves are
    in the variables. The folded model is for inference only: a folded layer called in
    training mode raises an error, and nothing is mutable.

    Attributes:
      held: the original model (read it as ``model``).
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
      >>> folded.folded, sorted(fv), type(folded.model).__name__
      ((('Dense_0', 'BatchNorm_0'),), ['params'], 'Net')
    """

    held: _Held
    plan: tuple[_FoldStep, ...] = ()
    kept: tuple[tuple[str, str], ...] = ()

    @property
    def model(self) -> nn.Module:
        """The original model."""
        return self.held.model

    @property
    def folded(self) -> tuple[tuple[str, str], ...]:
        """``(linear layer path, batch-norm path)`` of every folded pair, '/'-joined."""
        return tuple((path_str(s.linear_path), path_str(s.bn_path)) for s in self.plan)

    def summary(self) -> str:
        """A readable report: which batch norms were folded where, which stayed and why."""
        lines = [f"folded {len(self.plan)} batch norm(s), kept {len(self.kept)}"]
        lines += [f"  folded {bn} into {lin}" for lin, bn in self.folded]
        lines += [f"  kept {bn}: {why}" for bn, why in self.kept]
        return "\n".join(lines)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Applies the original model to this module's variables, folded batch norms removed."""
        by_bn = {s.bn_path: s for s in self.plan}
        by_linear = {s.linear_path: s for s in self.plan if s.add_bias}

        def on_bn(call: BNCall, next_fun):
            path = call.module.scope.path
            if path not in by_bn:
                return call.run(next_fun)
            if call.training():
                raise ValueError(
                    f"batch-norm layer {path_str(path)} was folded into "
                    f"{path_str(by_bn[path].linear_path)}: the folded model is for inference "
                    "only; call it in inference mode (e.g. training=False)."
                )
            return call.x.astype(by_bn[path].out_dtype)

        def on_linear(module: nn.Module, y):
            if module.scope.path not in by_linear:
                return y
            return y + module.get_variable("params", "bias").astype(y.dtype)

        variables = self.scope.variables()
        with intercept_layers(on_bn, on_linear):
            return self.model.apply(variables, *args, **kwargs)


def _linear_out_axis(module: nn.Module) -> int:
    """The kernel axis that indexes output features."""
    if isinstance(module, nn.ConvTranspose) and module.transpose_kernel:
        return -2
    return -1


def _why_not(bn: LayerCall, lin: LayerCall, variables: Mapping[str, Any],
             counts: Counter) -> str | None:
    """Why the pair (linear layer, batch norm) cannot be folded, or None when it can."""
    module = lin.module
    if counts[lin.path] > 1:
        return (f"its input comes from {path_str(lin.path)}, which is called "
                f"{counts[lin.path]} times")
    if getattr(module, "conv_general_dilated", None) is not None or \
            getattr(module, "dot_general", None) is not None or \
            getattr(module, "dot_general_cls", None) is not None or \
            getattr(module, "conv_general_dilated_cls", None) is not None:
        return f"{path_str(lin.path)} uses a custom dot_general / conv_general_dilated"
    kernel = get_path(variables.get("params", {}), lin.path + ("kernel",))
    if kernel is None or tuple(np.shape(kernel)) != lin.in_shape:
        return (f"the variables of {path_str(lin.path)} do not match the kernel it uses "
                "(a lifted transform such as nn.scan or nn.vmap)")
    ndim = len(bn.in_shape)
    axes = F.canonicalize_axes(bn.module.axis, ndim)
    if axes != (ndim - 1,):
        return (f"it normalizes axis {axes} of its {ndim}-d input, not the output features "
                f"(last axis) of {path_str(lin.path)}")
    features = lin.in_shape[_linear_out_axis(module)]
    if bn.in_shape[-1] != features:
        return (f"its feature size {bn.in_shape[-1]} differs from {features} of "
                f"{path_str(lin.path)}")
    stats = get_path(variables["batch_stats"], bn.path)
    if not isinstance(stats, Mapping) or {"mean", "var"} - set(stats):
        return "its batch_stats (mean, var) are missing from variables"
    if tuple(np.shape(stats["mean"])) != (features,):
        return "its batch_stats do not have the feature shape (a lifted transform?)"
    return None


def _why_kept(bn: LayerCall, src: tuple, calls: list[LayerCall], variables: Mapping[str, Any],
              counts: Counter) -> str | None:
    """Why a traced batch norm stays, given what produced its input; None: it folds."""
    changed = changed_names(type(bn.module))
    if changed:
        return (f"{type(bn.module).__name__} is a subclass of a batch norm that defines "
                f"{changed}, which may change its arithmetic; only subclasses that add a "
                "__call__ and field defaults are folded")
    if counts[bn.path] > 1:
        return f"the layer is called {counts[bn.path]} times (shared weights)"
    if src[0] == "input":
        return ("its input is an input of the model" if src[1] else
                "its input enters a transformed sub-computation (jit, remat, scan, ...) "
                "where it cannot be traced back to a layer")
    if src[0] == "op":
        return f"its input comes from {src[1]}, not directly from a Conv/Dense"
    if src[0] == "shared":
        return (f"the output of {path_str(calls[src[1]].path)} also feeds {src[2]} other "
                "operation(s) (e.g. a residual branch), which folding would change")
    return _why_not(bn, calls[src[1]], variables, counts)


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
    or a pooling). A subclass of a batch norm (another call signature, e.g. ``norm(x,
    training=t)``) folds when it adds only a ``__call__`` and field defaults; one that defines
    any other method or property may compute something else and stays.

    The folded model (:class:`FoldedModel`) applies the original one (an ``nn.Sequential`` or a
    model with submodule fields included) and keeps its variable paths: folded batch norms
    become the identity while it runs, and a linear layer built without a bias gets the folded
    bias from ``params/<layer>/bias``. Its variables have no ``batch_stats`` for folded layers
    (none at all when everything folded).

    Args:
      model: a ``flax.linen`` module.
      variables: its variables, with ``params`` and ``batch_stats``.
      x: an example input (array, ``jax.ShapeDtypeStruct`` or a pytree of them); only shapes
        and dtypes are used.
      call_kwargs: keyword arguments that put the model in inference mode, used as given.
        Default: found from the model's ``__call__`` signature, each of its mode arguments
        with its inference value (``train=False``, ``training=False``,
        ``use_running_average=True``, ``deterministic=True``).

    Returns:
      ``(folded_model, folded_variables)``; call ``folded_model.apply(folded_variables, x,
      ...)`` with the model's arguments in inference mode. ``folded_model.folded`` lists the
      folded pairs, ``folded_model.kept`` the batch norms that stayed and why,
      ``folded_model.summary()`` both.

    Raises:
      TypeError: ``variables`` is not a mapping, ``model`` not a linen module.
      ValueError: no ``batch_stats`` in ``variables``, a batch norm runs in training mode, or
        no ``call_kwargs`` for a model without any of the mode arguments.

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
    check_linen_model(model, "fold_batch_norm")
    variables = copy_variables(variables)
    require_batch_stats(variables, "fold_batch_norm")
    call_kwargs = inference_call_kwargs(model, call_kwargs, "fold_batch_norm")
    calls, jaxpr = trace_layers(model, variables, x, call_kwargs, "fold_batch_norm")
    producers = bn_producers(jaxpr, calls)
    counts = Counter(c.path for c in calls)

    plan: list[_FoldStep] = []
    kept: list[tuple[str, str]] = []
    for index, call in enumerate(calls):
        if call.kind != "bn":
            continue
        src = producers.get(index, ("input", True))
        why = _why_kept(call, src, calls, variables, counts)
        if why is None:
            plan.append(_FoldStep(calls[src[1]].path, call.path,
                                  not calls[src[1]].module.use_bias,
                                  jnp.dtype(call.out_dtype).name))
        else:
            kept.append((path_str(call.path), why))

    folded_vars = copy_tree(variables)
    for step in plan:
        _fold_into(folded_vars, variables, step, calls)
    for step in plan:
        for collection in ("batch_stats", "params"):
            if collection in folded_vars:
                delete_path(folded_vars[collection], step.bn_path)
    if not folded_vars.get("batch_stats"):
        folded_vars.pop("batch_stats", None)
    return FoldedModel(_Held(model), tuple(plan), tuple(kept)), folded_vars


def _fold_into(out: dict[str, Any], variables: Mapping[str, Any], step: _FoldStep,
               calls: list[LayerCall]) -> None:
    """Writes the folded kernel and bias of one pair into ``out['params']``."""
    bn = next(c.module for c in calls if c.kind == "bn" and c.path == step.bn_path)
    lin = next(c.module for c in calls if c.kind == "linear" and c.path == step.linear_path)
    lin_params = get_path(variables["params"], step.linear_path)
    bn_params = get_path(variables.get("params", {}), step.bn_path) or {}
    stats = get_path(variables["batch_stats"], step.bn_path)
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
    set_path(out["params"], step.linear_path + ("kernel",), jnp.asarray(new_kernel, kernel.dtype))
    set_path(out["params"], step.linear_path + ("bias",), jnp.asarray(b, bias_dtype))


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
      call_kwargs: keyword arguments for inference mode; default: found from the model's
        signature, as in :func:`fold_batch_norm`.

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

    check_linen_model(model, "export_folded_model")
    x = batch_input(x, "x", "x")
    call_kwargs = inference_call_kwargs(model, call_kwargs, "export_folded_model")
    folded, folded_vars = fold_batch_norm(model, variables, x, call_kwargs=call_kwargs)
    fn = jax.jit(lambda inputs: folded.apply(folded_vars, inputs, **call_kwargs))
    dims = ", ".join(["batch", *map(str, x.shape[1:])])
    spec = jax.ShapeDtypeStruct(export.symbolic_shape(dims), x.dtype)
    with quiet_epsilon():
        data = export.export(fn)(spec).serialize()
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, EXPORT_FILE)
    with open(path, "wb") as f:
        f.write(data)
    with open(path, "rb") as f:
        reloaded = export.deserialize(bytearray(f.read()))
    check = x[:8]
    with quiet_epsilon():
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


