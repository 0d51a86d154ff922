"""Small helpers the inference tools share: argument checks, variable trees, the model's mode.

The variable trees here are nested dicts (Flax's ``{'params': ..., 'batch_stats': ...}``),
addressed by a *path*: the tuple of names from the root, as in ``module.scope.path``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import numpy as np
from flax import nnx

Path = tuple[str, ...]

#: The mode arguments a model's ``__call__`` is searched for, with their inference values.
MODE_KEYWORDS: Mapping[str, bool] = {
    "train": False,
    "training": False,
    "use_running_average": True,
    "deterministic": True,
}


def path_str(path: Path) -> str:
    """A readable layer path for messages: names joined by '/', ``<root>`` for the model.

    Example:
      >>> path_str(("Block_0", "BatchNorm_1")), path_str(())
      ('Block_0/BatchNorm_1', '<root>')
    """
    return "/".join(path) if path else "<root>"


def copy_tree(tree: Any) -> Any:
    """A copy of the nested mappings of ``tree`` as plain dicts (the leaves are shared).

    Example:
      >>> tree = {"a": {"b": 1}}
      >>> copy = copy_tree(tree)
      >>> copy["a"]["b"] = 2
      >>> tree, copy
      ({'a': {'b': 1}}, {'a': {'b': 2}})
    """
    if isinstance(tree, Mapping):
        return {k: copy_tree(v) for k, v in tree.items()}
    return tree


def check_linen_model(model: Any, fn: str) -> None:
    """Raises a ``TypeError`` naming ``fn`` unless ``model`` is a ``flax.linen`` module.

    The inference tools read a linen model's variables and intercept its layer calls. An NNX
    module, or an NNX module bridged to linen (``flax.nnx.bridge.to_linen``, whose layers run
    inside NNX where no linen interceptor sees them), is refused by name rather than
    processed with nothing found.

    Example:
      >>> from flax import nnx
      >>> check_linen_model(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), "fold_batch_norm")
      Traceback (most recent call last):
      ...
      TypeError: fold_batch_norm takes a flax.linen model; Linear is a flax.nnx.Module. ...
    """
    name = type(model).__name__
    if isinstance(model, nnx.Module):
        raise TypeError(
            f"{fn} takes a flax.linen model; {name} is a flax.nnx.Module. bnjax's inference "
            "tools (fold_batch_norm, export_folded_model, precise_batch_stats, "
            "mc_batch_norm_predict) read a linen model's variables and layer calls; for an NNX "
            "model, write it with flax.linen and bnjax.BatchNorm (the same fields as "
            "bnjax.nnx.BatchNorm)."
        )
    if isinstance(model, nnx.bridge.ToLinen):
        raise TypeError(bridged_message(fn, name))
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn} takes a flax.linen model (an nn.Module); got {name}.")


def bridged_message(fn: str, where: str) -> str:
    """The error for an NNX module bridged to linen, met as the model or inside it.

    Example:
      >>> bridged_message("fold_batch_norm", "layer 'ToLinen_0'").split(" (")[0]
      "fold_batch_norm: layer 'ToLinen_0' is an NNX module bridged to linen"
    """
    return (
        f"{fn}: {where} is an NNX module bridged to linen (flax.nnx.bridge.to_linen); its "
        "layers run inside NNX, where the inference tools cannot see them, so they would "
        "silently do nothing there. Write that part with flax.linen and bnjax.BatchNorm."
    )


def copy_variables(variables: Any, name: str = "variables") -> dict[str, Any]:
    """A plain-dict copy of a model's variables, which the caller may then modify.

    Args:
      variables: the model's variables, a mapping of collections.
      name: the argument's name, for the error message.

    Raises:
      TypeError: ``variables`` is not a mapping.

    Example:
      >>> copy_variables({"params": {"w": 1.0}})
      {'params': {'w': 1.0}}
    """
    if not isinstance(variables, Mapping):
        raise TypeError(
            f"{name} has type {type(variables).__name__}; pass the model's variables, the dict "
            "returned by model.init(...) with 'params' and 'batch_stats' collections."
        )
    return copy_tree(variables)


def require_batch_stats(variables: Mapping[str, Any], fn: str) -> None:
    """Raises a ``ValueError`` naming ``fn`` when ``variables`` has no or empty ``batch_stats``.

    Example:
      >>> require_batch_stats({"params": {}}, "fold_batch_norm")
      Traceback (most recent call last):
      ...
      ValueError: fold_batch_norm: variables has collections ['params'] but no 'batch_stats'; ...
      >>> require_batch_stats({"params": {}, "batch_stats": {}}, "precise_batch_stats")
      Traceback (most recent call last):
      ...
      ValueError: precise_batch_stats: variables['batch_stats'] is empty ({}): ...
    """
    if "batch_stats" in variables and not variables["batch_stats"]:
        raise ValueError(
            f"{fn}: variables['batch_stats'] is empty ({variables['batch_stats']!r}): the "
            "model has no batch statistics to use or recompute. Pass the variables of a model "
            "with batch-norm layers, as returned by model.init(...) (or {'params': "
            "state.params, 'batch_stats': state.batch_stats}); a model without batch norm "
            "needs none of these tools."
        )
    if "batch_stats" not in variables:
        raise ValueError(
            f"{fn}: variables has collections {sorted(variables)} but no 'batch_stats'; pass "
            "the variables of a model with batch-norm layers, as returned by model.init(...) "
            "(or {'params': state.params, 'batch_stats': state.batch_stats})."
        )


def get_path(tree: Mapping[str, Any], path: Path) -> Any:
    """``tree[path[0]][path[1]]...``, or None when a key on the way is missing.

    Example:
      >>> get_path({"a": {"b": 1}}, ("a", "b")), get_path({"a": {"b": 1}}, ("a", "c"))
      (1, None)
    """
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def set_path(tree: dict[str, Any], path: Path, value: Any) -> None:
    """Sets ``tree[path] = value``, creating the dicts on the way.

    Example:
      >>> tree = {}
      >>> set_path(tree, ("a", "b"), 1)
      >>> tree
      {'a': {'b': 1}}
    """
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def delete_path(tree: dict[str, Any], path: Path) -> None:
    """Deletes ``tree[path]`` and then every dict left empty on the way up.

    Example:
      >>> tree = {"a": {"b": {"c": 1}}, "d": 2}
      >>> delete_path(tree, ("a", "b", "c"))
      >>> tree
      {'d': 2}
    """
    if not path:
        return
    parent = get_path(tree, path[:-1])
    if isinstance(parent, dict) and path[-1] in parent:
        del parent[path[-1]]
        if not parent:
            delete_path(tree, path[:-1])


def check_count(name: str, value: Any) -> int:
    """``value`` as an int when it is an integer >= 1; else a ``ValueError`` naming ``name``.

    Example:
      >>> check_count("num_batches", 3)
      3
      >>> check_count("num_batches", 0)
      Traceback (most recent call last):
      ...
      ValueError: num_batches=0 must be an integer >= 1.
    """
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1.")
    return int(value)


def mode_keywords(model: Any) -> list[str]:
    """The arguments of ``model.__call__`` named like a mode (see :data:`MODE_KEYWORDS`).

    Only arguments that can be passed by keyword count.

    Example:
      >>> import flax.linen as nn
      >>> class Net(nn.Module):
      ...     def __call__(self, x, train: bool, *, deterministic: bool = True):
      ...         return x
      >>> mode_keywords(Net())
      ['train', 'deterministic']
    """
    return [name for name in _keyword_params(model) if name in MODE_KEYWORDS]


def _keyword_params(model: Any) -> list[str]:
    """The arguments of ``type(model).__call__`` after ``self`` that a keyword can pass."""
    try:
        signature = inspect.signature(type(model).__call__)
    except (TypeError, ValueError):  # not a Python callable: no names to read
        return []
    by_keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [name for name, p in list(signature.parameters.items())[1:] if p.kind in by_keyword]


def inference_call_kwargs(model: Any, call_kwargs: Mapping[str, Any] | None,
                          fn: str) -> dict[str, Any]:
    """The keyword arguments that call ``model`` in inference mode.

    Explicit ``call_kwargs`` are used as given. Without them, every mode argument of the
    model's ``__call__`` (``train``, ``training``, ``use_running_average``,
    ``deterministic``) gets its inference value: ``train=False``, ``training=False``,
    ``use_running_average=True``, ``deterministic=True``.

    Args:
      model: the model (a ``flax.linen`` module).
      call_kwargs: the caller's keyword arguments, or None to find them.
      fn: the calling tool's name, for messages.

    Raises:
      TypeError: ``call_kwargs`` is not a mapping.
      ValueError: ``call_kwargs`` is None and the model has none of the mode arguments.

    Example:
      >>> import flax.linen as nn
      >>> class Net(nn.Module):
      ...     def __call__(self, x, use_running_average: bool):
      ...         return x
      >>> inference_call_kwargs(Net(), None, "fold_batch_norm")
      {'use_running_average': True}
      >>> inference_call_kwargs(Net(), {"use_running_average": False}, "fold_batch_norm")
      {'use_running_average': False}
    """
    if call_kwargs is not None:
        if not isinstance(call_kwargs, Mapping):
            raise TypeError(
                f"call_kwargs={call_kwargs!r} must be a dict of keyword arguments for the model "
                "call, e.g. {'training': False} or {'train': False}."
            )
        return dict(call_kwargs)
    found = mode_keywords(model)
    if found:
        return {name: MODE_KEYWORDS[name] for name in found}
    params = _keyword_params(model)[1:]  # after the input
    example = f", e.g. call_kwargs={{{params[0]!r}: False}}" if params else ""
    raise ValueError(
        f"{fn}: {type(model).__name__}.__call__ has none of the mode arguments "
        f"{', '.join(MODE_KEYWORDS)} (its arguments after the input: {params}), so the tool "
        "cannot put the model in inference mode by itself. Pass call_kwargs with the keyword "
        f"arguments that do{example}, or call_kwargs={{}} when the model needs none (its batch "
        "norms built with use_running_average=True)."
    )
