"""The checks of :func:`bnjax.timing.compare`: what is timed is what its table says.

A model's mode keyword (or its ``mutable=["batch_stats"]`` idiom), the rng streams its training
call needs, an input or labels it cannot take, an eval call that trains and a train step that
does not are found here, before anything is timed, and refused with one-line messages.

Example:
  >>> call_text("train", True)
  "model.apply(variables, x, train=True, mutable=['batch_stats'])"
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = ["HINT", "MODES", "call_text", "check_train", "compile_step", "first_line",
           "mode_of", "probe"]

MODES = ("train", "training", "is_training")
HINT = ("name the keyword whose True switches training on (e.g. 'train'), not one whose True "
         "means inference (such as 'deterministic')")


def first_line(e: BaseException) -> str:
    r"""``Type: first line of the message``, without Flax's link to its error page.

    Example:
      >>> first_line(ValueError("bad layer (https://flax.readthedocs.io/x)\nmore"))
      'ValueError: bad layer'
    """
    import re

    text = str(e).strip().splitlines()
    line = re.sub(r"\s*\(https?://[^)]*\)", "", text[0] if text else "")
    return f"{type(e).__name__}: {line}".rstrip(": ")


def mode_of(model: Any, mode: str | None) -> str | None:
    """The keyword of ``model``'s call that switches training on (given, or found by name).

    None: the call takes none of :data:`MODES`, so the model chooses its mode from
    ``mutable=["batch_stats"]``. A given keyword the call lacks is refused.

    Example:
      >>> import flax.linen as nn
      >>> class Net(nn.Module):
      ...     def __call__(self, x, train):
      ...         return x
      >>> mode_of(Net(), None), mode_of(nn.Dense(2), None)
      ('train', None)
    """
    import inspect

    params = inspect.signature(type(model).__call__).parameters
    if mode is None:
        return next((name for name in MODES if name in params), None)
    if not isinstance(mode, str) or not mode.isidentifier():
        raise ValueError(f"mode={mode!r} must name the keyword argument of the model's call "
                         "that switches training on, e.g. 'train' or 'training'.")
    if mode not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ValueError(f"mode={mode!r}: {type(model).__name__}.__call__ takes no argument "
                         f"{mode!r} (its parameters: {[p for p in params if p != 'self']}); "
                         "name the one that switches training on, or none for a model that "
                         "trains when batch_stats is mutable.")
    return mode


def call_text(mode: str | None, training: bool) -> str:
    """The model call a step makes, as a user would write it.

    Example:
      >>> call_text(None, False)
      'model.apply(variables, x)'
    """
    if mode is None:
        return "model.apply(variables, x" + (", mutable=['batch_stats'])" if training else ")")
    return (f"model.apply(variables, x, {mode}={training}"
            + (", mutable=['batch_stats'])" if training else ")"))


def probe(model: Any, batch: Mapping[str, Any], mode: str | None,
           label: str) -> tuple[str, ...]:
    """The rng streams the model's training call asks for (Flax names each one it misses).

    A model that cannot take ``batch["x"]``, or whose logits the labels overrun, is refused.

    Example:
      >>> import flax.linen as nn
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train):
      ...         return nn.Dropout(0.5, deterministic=not train)(nn.Dense(3)(x))
      >>> probe(Net(), {"x": np.ones((4, 2), np.float32), "y": np.arange(4) % 3}, "train", "Net")
      ('dropout',)
    """
    import re

    import jax
    from flax import errors

    x, y, streams = batch["x"], np.asarray(batch["y"]), []
    kwargs = {} if mode is None else {mode: True}
    while True:
        keys = {s: jax.random.key(0) for s in streams}  # no "params": Flax falls back on it
        try:
            variables = jax.eval_shape(lambda k=keys: model.init(
                {**k, "params": jax.random.key(0)}, x, **kwargs))
            out, _ = jax.eval_shape(lambda v, k=keys: model.apply(  # the train step's call
                v, x, **kwargs, rngs=k, mutable=["batch_stats", "losses"]), variables)
            break
        except errors.InvalidRngError as e:
            found = re.search(r'needs PRNG for "([^"]+)"', str(e))
            if found is None or found.group(1) in streams:
                raise
            streams.append(found.group(1))
        except Exception as e:  # noqa: BLE001 - any failure of the model on this input
            raise ValueError(f"{label} cannot take batch['x'] of shape {tuple(x.shape)} "
                             f"({x.dtype}): {first_line(e)}") from e
    shape, n = tuple(getattr(out, "shape", ())), len(y)
    if len(shape) != 2 or shape[0] != n:
        what = f"an output of shape {shape}" if hasattr(out, "shape") else (
            f"a {type(out).__name__}")
        raise ValueError(f"{label} returns {what} for batch['x'] of shape "
                         f"{tuple(x.shape)}; the steps need logits of shape (batch, classes) "
                         f"= ({n}, number of classes).")
    classes = shape[1]
    if y.size and (y.min() < 0 or y.max() >= classes):
        raise ValueError(f"batch['y'] holds labels from {y.min()} to {y.max()}, but {label} "
                         f"returns {classes} logits per example (output shape "
                         f"{shape}): labels must lie in [0, {classes}) "
                         "(bnjax-bench: --num-classes at most the number of logits).")
    return tuple(streams)


def compile_step(fn: Callable[..., Any], state: Any, batch: Any, step: str, mode: str | None,
             label: str) -> Any:
    """``fn`` compiled; an eval call that puts a batch norm in training mode is refused.

    Example:
      >>> import jax
      >>> float(compile_step(jax.jit(lambda s, b: s + b), 1.0, 2.0, "eval", "train", "f")(1.0, 2.0))
      3.0
    """
    import re

    from flax import errors

    try:
        return fn.lower(state, batch).compile()
    except (errors.ModifyScopeVariableError, ValueError) as e:
        if step != "eval" or "batch_stats" not in str(e):
            raise
        where = re.search(r'in "(/[^"]*)"', str(e))
        layer = f"the batch norm at {where.group(1)}" if where else "a batch norm"
        hint = f"mode={mode!r} must {HINT}" if mode else (
            f"its call takes none of {list(MODES)}: pass mode='<the keyword that switches "
            "training on>'")
        raise ValueError(f"{label}'s eval step calls {call_text(mode, False)}, which leaves "
                         f"{layer} in training mode ({first_line(e)}); {hint}.") from e


def check_train(train: Callable[..., Any], state: Any, batch: Any, mode: str | None,
                 label: str, where: str) -> None:
    """Runs ``train`` once; refuses it if it skips its update or leaves the batch statistics.

    Either way its time would not be a train step's.

    Example:
      >>> from types import SimpleNamespace
      >>> state = SimpleNamespace(batch_stats={"mean": np.zeros(2)})
      >>> check_train(lambda s, b: (s, {"loss": 1.0, "skipped": 0.0}), state, None,
      ...             "deterministic", "Net", "flax BN")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: Net's train step (flax BN) updates no batch statistics: ...
    """
    import jax

    new, metrics = train(state, batch)
    loss = float(metrics["loss"])
    if float(metrics["skipped"]) or not np.isfinite(loss):
        raise ValueError(f"{label}'s train step ({where}) has a loss of {loss}, or non-finite "
                         "gradients: every step would be skipped (params and batch_stats left "
                         "as they were), so nothing that trains would be timed; check the "
                         "model's logits and batch['y'].")
    before, after = jax.tree.leaves(state.batch_stats), jax.tree.leaves(new.batch_stats)
    if before and all(np.array_equal(a, b) for a, b in zip(before, after, strict=True)):
        hint = f"mode={mode!r} must {HINT}" if mode else (
            f"its call takes none of {list(MODES)}: pass mode='<the keyword that switches "
            "training on>'")
        raise ValueError(f"{label}'s train step ({where}) updates no batch statistics: "
                         f"{call_text(mode, True)} leaves every batch norm on its moving "
                         f"statistics, so it would not time a train step; {hint}.")


