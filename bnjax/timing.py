"""Time your own model on bnjax: :func:`compare` and the ``bnjax-bench`` command.

:func:`compare` takes a ``flax.linen`` model written for ``flax.linen.BatchNorm`` and a batch,
and times its jitted train step (forward, backward and an optax update, via
``bnjax.make_train_step``) and eval step (``bnjax.make_eval_step``) three ways: with Flax's
layers as written, with bnjax's (``bnjax.replacing_flax_batch_norm``) and with no norm
(``bnjax.without_flax_batch_norm``); in float32 and with bfloat16 compute (float32 master
parameters and moving statistics, the forward and backward in bfloat16). The variants of one
step are interleaved, each figure the median of ``reps`` runs after ``warmup``, with the peak
memory of the compiled step where the backend reports it.

``bnjax-bench --model package.module:factory`` does the same from the command line: it prints
the table and writes a JSON with the device, library versions and the command (:func:`main`).
The repository's ``python -m benchmarks step`` times its model table with :func:`compare`.

Example:
  >>> NORMS, DTYPES
  (('bnjax BN', 'flax BN', 'no norm'), ('float32', 'bfloat16'))
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from bnjax._timing_checks import check_train, compile_step, first_line, mode_of, probe
from bnjax.benchmark import init_variables, median_times, peak_memory

__all__ = ["DTYPES", "NORMS", "compare", "main"]

#: The normalization variants of :func:`compare`, in print order.
NORMS: tuple[str, ...] = ("bnjax BN", "flax BN", "no norm")
#: The compute dtypes of :func:`compare` (bfloat16: float32 master parameters and statistics).
DTYPES: tuple[str, ...] = ("float32", "bfloat16")
_STEPS = ("train", "eval")
#: Factory names that say nothing of the model: its rows take the class name instead.
_GENERIC = ("model", "make_model", "create_model", "get_model", "build_model", "new_model",
            "factory", "make", "create", "build", "get_net", "make_net", "build_net")


def _compute_in(dtype: Any, apply_fn: Callable[..., Any]) -> Callable[..., Any]:
    """``apply_fn`` with its float parameters and input cast to ``dtype`` (mixed precision).

    The moving statistics stay float32; the logits come back in float32 for the loss.
    """
    import jax
    import jax.numpy as jnp

    if jnp.dtype(dtype) == jnp.float32:
        return apply_fn

    def cast(tree: Any) -> Any:
        return jax.tree.map(lambda a: a.astype(dtype) if a.dtype == jnp.float32 else a, tree)

    def apply(variables: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        variables = {**variables, "params": cast(variables["params"])}
        out = apply_fn(variables, cast(x), *args, **kwargs)
        if isinstance(out, tuple):
            return (out[0].astype(jnp.float32), *out[1:])
        return out.astype(jnp.float32)

    return apply


def _keyed(step: Callable[..., Any], streams: Sequence[str]) -> Callable[..., Any]:
    """``step`` with a key beside the input, folded from the step number.

    The model's apply splits it into one key per rng stream the model asks for.
    """
    import jax

    if not streams:
        return step

    def run(state: Any, batch: Mapping[str, Any]) -> Any:
        key = jax.random.fold_in(jax.random.key(0), state.step)
        return step(state, {**batch, "x": (batch["x"], key)})

    return jax.jit(run)


def _peak_bytes(compiled: Any) -> int | None:
    """:func:`peak_memory`'s peak, or None where the backend reports no memory analysis."""
    try:
        return peak_memory(compiled)["peak_bytes"]
    except (AttributeError, NotImplementedError, RuntimeError, TypeError):
        return None


def _build(model: Any, batch: Mapping[str, Any], norm: str, dtype: str, mode: str | None,
           tx: Any, steps: Sequence[str], streams: Sequence[str], label: str,
           log: Callable[[str], None]) -> tuple[Any, dict[str, Any]]:
    """The train state and the compiled steps of ``model`` with one normalization variant."""
    import contextlib

    import jax

    from bnjax.steps import TrainState, make_eval_step, make_train_step
    from bnjax.swap import SwapReport, replacing_flax_batch_norm, without_flax_batch_norm

    swap = {"bnjax BN": replacing_flax_batch_norm, "no norm": without_flax_batch_norm}.get(
        norm, lambda: contextlib.nullcontext(SwapReport()))
    with swap() as report:
        variables = init_variables(model, batch["x"], mode=mode, rngs=streams)

        def apply(v: Any, x: Any, training: bool, **kw: Any) -> Any:
            if streams:
                x, key = x
                kw["rngs"] = {s: jax.random.fold_in(key, i) for i, s in enumerate(streams)}
            return model.apply(v, x, **({} if mode is None else {mode: training}), **kw)

        state = TrainState.create(apply_fn=_compute_in(dtype, apply),
                                  params=variables.get("params", {}),
                                  batch_stats=variables.get("batch_stats", {}), tx=tx)
        makers = {"train": make_train_step, "eval": make_eval_step}
        compiled = {}
        for s in steps:
            log(f"compiling {label} ({norm}, {s} step, {dtype}) ...")
            compiled[s] = compile_step(_keyed(makers[s](), streams), state, batch, s, mode, label)
    if norm != "flax BN" and report.count == 0:
        raise ValueError(f"model {type(model).__name__} calls no flax.linen.BatchNorm, so there "
                         "is nothing to swap: compare times a model written for Flax's layer.")
    return state, compiled


def _rows(label: str, n: int, dtype: str, step: str, times: Mapping[str, Any],
          peaks: Mapping[str, int | None]) -> list[dict[str, Any]]:
    flax = times.get("flax BN", {}).get("median_ms")
    none = times.get("no norm", {}).get("median_ms")
    return [{"model": label, "batch": n, "dtype": dtype, "step": step, "variant": v, **t,
             "ratio_to_flax": t["median_ms"] / flax if flax else None,
             "bn_cost_pct": None if v == "no norm" or not none else
             100.0 * (t["median_ms"] - none) / none,
             "peak_bytes": peaks[v], "available": True, "note": ""} for v, t in times.items()]


def _check_choice(name: str, value: Sequence[str], accepted: Sequence[str]) -> None:
    if isinstance(value, str) or not value or not set(value) <= set(accepted):
        raise ValueError(f"{name}={value!r} must be a non-empty sequence of {list(accepted)}.")


def compare(
    model: Any,
    batch: Mapping[str, Any],
    *,
    name: str | None = None,
    mode: str | None = None,
    tx: Any = None,
    norms: Sequence[str] = NORMS,
    dtypes: Sequence[str] = DTYPES,
    steps: Sequence[str] = _STEPS,
    reps: int = 20,
    warmup: int = 2,
    extra_eval: Mapping[str, tuple[Callable[[], Any], Any]] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Times ``model``'s train and eval steps with Flax's batch norm, bnjax's and none.

    The model is built once; the variants are the swaps of its ``flax.linen.BatchNorm``
    layers. Its variables are drawn with NumPy (:func:`bnjax.benchmark.init_variables`); the
    train step is ``bnjax.make_train_step()`` (mean softmax cross-entropy of ``batch["y"]``,
    gradients, ``tx``'s update, the non-finite guard), the eval step ``bnjax.make_eval_step()``.
    Every rng stream the model's training call asks for (``dropout``, ...) gets a key, folded
    from the step number. Before it is timed, each variant's train step runs once and is
    refused if it skips its update (a non-finite loss) or updates no batch statistics: then
    the call is not what the table would call a train step.

    Args:
      model: a ``flax.linen`` module returning logits, called as
        ``model.apply(variables, x, **{mode: training})``, or, for a model that trains
        when ``batch_stats`` is mutable, as ``model.apply(variables, x)`` (eval) and
        ``model.apply(variables, x, mutable=["batch_stats"])`` (train).
      batch: ``{"x": input, "y": integer labels}`` (NumPy or JAX arrays); the labels must be
        below the number of logits.
      name: the model's name in the rows (default its class name).
      mode: the keyword of the model's call that switches training on (default: ``train``,
        ``training`` or ``is_training``, whichever its ``__call__`` has; none of them: the
        model chooses its mode from ``mutable=["batch_stats"]``).
      tx: the optax optimizer (default SGD with momentum 0.9, learning rate 0.1).
      norms: the variants to time, of :data:`NORMS`.
      dtypes: the compute dtypes, of :data:`DTYPES`.
      steps: ``"train"`` and/or ``"eval"``.
      reps: timed rounds; every figure is the median over them (quartiles beside it).
      warmup: untimed calls of each step first (after the checked call of a train step).
      extra_eval: more variants of the float32 eval step, timed interleaved with it:
        name -> (zero-argument call, its compiled function for the peak memory, or None).
      log: progress printer (a line before each compile, one per table group), or None.

    Returns:
      Rows ``{"model", "batch", "dtype", "step", "variant", "median_ms", "min_ms", "p25_ms",
      "p75_ms", "max_ms", "n", "ratio_to_flax", "bn_cost_pct", "peak_bytes", "available",
      "note"}``: ``ratio_to_flax`` over the flax BN row of the same step and dtype,
      ``bn_cost_pct`` the extra time over the no-norm row in percent;
      :func:`bnjax.benchmark.model_table` prints them.

    Raises:
      ValueError: a bad argument (named); a model that calls no ``flax.linen.BatchNorm``,
        cannot take ``batch["x"]`` (the shape named) or returns fewer logits than the labels
        need; a ``mode`` the call lacks; a train step that updates no batch statistics or
        whose loss is not finite; an eval step that leaves a batch norm in training mode.

    Example:
      >>> import flax.linen as nn
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train):
      ...         x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
      ...         x = nn.Dropout(0.1, deterministic=not train)(x)  # gets a "dropout" key
      ...         return nn.Dense(3)(nn.relu(x))
      >>> batch = {"x": np.ones((16, 4), np.float32), "y": np.arange(16) % 3}
      >>> rows = compare(Net(), batch, dtypes=["float32"], steps=["train"], reps=2, warmup=1)
      >>> [(r["variant"], r["n"], r["p25_ms"] <= r["median_ms"] <= r["p75_ms"]) for r in rows]
      [('bnjax BN', 2, True), ('flax BN', 2, True), ('no norm', 2, True)]
    """
    import jax
    import optax

    if not isinstance(batch, Mapping) or not {"x", "y"} <= set(batch):
        raise ValueError("batch must be a mapping with 'x' (the model's input) and 'y' (integer "
                         f"labels); got {type(batch).__name__} "
                         f"{sorted(batch) if isinstance(batch, Mapping) else ''}".rstrip() + ".")
    _check_choice("norms", norms, NORMS)
    _check_choice("dtypes", dtypes, DTYPES)
    _check_choice("steps", steps, _STEPS)
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"reps={reps!r} must be an integer >= 1.")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup={warmup!r} must be an integer >= 0.")
    mode = mode_of(model, mode)
    tx = optax.sgd(0.1, momentum=0.9) if tx is None else tx
    batch = jax.device_put(dict(batch))
    label, n, rows = name or type(model).__name__, int(np.shape(batch["x"])[0]), []
    log = log or (lambda _: None)
    streams = probe(model, batch, mode, label)
    order = sorted(norms, key=lambda v: v != "flax BN")  # Flax's errors name the layer
    for dtype in dtypes:
        built = {}
        for v in order:
            built[v] = state, compiled = _build(model, batch, v, dtype, mode, tx, steps,
                                                streams, label, log)
            if "train" in steps and v != "no norm":
                check_train(compiled["train"], state, batch, mode, label, f"{v}, {dtype}")
        built = {v: built[v] for v in norms}
        for step in steps:
            calls = {v: functools.partial(c[step], s, batch) for v, (s, c) in built.items()}
            peaks = {v: _peak_bytes(c[step]) for v, (_, c) in built.items()}
            if step == "eval" and dtype == "float32":
                for v, (fn, compiled) in (extra_eval or {}).items():
                    calls[v], peaks[v] = fn, None if compiled is None else _peak_bytes(compiled)
            times = median_times(calls, reps=reps, warmup=warmup)
            rows += _rows(label, n, dtype, step, times, peaks)
            log(f"  {label} {step} ({dtype}): " + ", ".join(
                f"{v} {t['median_ms']:.1f} ms (p25-p75 {t['p25_ms']:.1f}-{t['p75_ms']:.1f})"
                for v, t in times.items()))
    return rows


def _import(spec: str) -> tuple[Any, str]:
    """The object ``package.module:attr`` names (imported from the working directory)."""
    import importlib
    import os
    import sys

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model={spec!r} must be package.module:factory, e.g. "
                         "bnjax_train.models:ResNet20.")
    if os.getcwd() not in sys.path:  # as `python -m` finds the working directory's packages
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - the user's module is missing or fails to import
        name = getattr(e, "name", None) or ""
        if isinstance(e, ModuleNotFoundError) and f"{module_name}.".startswith(f"{name}."):
            raise ValueError(f"--model={spec!r}: no module {name!r} can be imported from "
                             f"{os.getcwd()} or the installed packages.") from e
        raise ValueError(f"--model={spec!r}: importing {module_name} raised "
                         f"{first_line(e)}") from e
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            owner = ".".join([module_name, *attr.split(".")[:i]])
            raise ValueError(f"--model={spec!r}: {owner} has no attribute {part!r}.")
        obj = getattr(obj, part)
    return obj, attr.split(".")[-1]


def _factory_model(spec: str, kwargs: Mapping[str, Any]) -> tuple[Any, str]:
    """Calls ``package.module:factory`` with ``kwargs``: the model and its name for the rows.

    The name is the factory's, or the model's class name for a generic factory name such as
    ``make_model``.
    """
    import inspect

    import flax.linen as nn

    factory, name = _import(spec)
    if not callable(factory):
        raise ValueError(f"--model={spec!r} is a {type(factory).__name__}, not a callable "
                         "returning a flax.linen Module.")
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = None
    if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        for key in kwargs:
            if key not in params or params[key].kind is inspect.Parameter.POSITIONAL_ONLY:
                raise ValueError(f"--kwarg {key}=...: {name} takes no keyword argument "
                                 f"{key!r} (it takes {[p for p in params if p != 'self']}).")
    try:
        model = factory(**kwargs)
    except Exception as e:  # noqa: BLE001 - reported as the factory's, in one line
        raise ValueError(f"--model={spec!r}: the factory {name}(**{dict(kwargs)!r}) raised "
                         f"{first_line(e)}") from e
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model={spec!r} returned a {type(model).__name__}; it must return "
                         "a flax.linen Module.")
    generic = name.startswith("<") or name.lower().strip("_") in _GENERIC
    return model, type(model).__name__ if generic else name


def _value(text: str) -> Any:
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _kwargs(pairs: Sequence[str]) -> dict[str, Any]:
    bad = [kv for kv in pairs if "=" not in kv or not kv.split("=", 1)[0].isidentifier()]
    if bad:
        raise ValueError(f"--kwarg {bad[0]!r} must be KEY=VALUE, e.g. norm=flax.")
    return {k: _value(v) for k, v in (kv.split("=", 1) for kv in pairs)}


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise ValueError(f"--input-shape={text!r} must be positive integers separated by "
                         "commas, e.g. 32,32,3.")
    return shape


def _check_args(args: Any) -> None:
    """The numeric and list flags, each named with its value and what it accepts."""
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--num-classes",
                             args.num_classes, 1), ("--reps", args.reps, 1),
                             ("--warmup", args.warmup, 0)):
        if value < low:
            raise ValueError(f"{flag}={value} must be an integer >= {low}.")
    for flag, value, accepted in (("--dtypes", args.dtypes, DTYPES),
                                  ("--steps", args.steps, _STEPS)):
        if not value or not set(value.split(",")) <= set(accepted):
            raise ValueError(f"{flag}={value!r} must be a comma-separated list of "
                             f"{', '.join(accepted)}.")


def _parser() -> Any:
    import argparse

    p = argparse.ArgumentParser(
        prog="bnjax-bench", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Time a Flax model's train and eval steps with its flax.linen.BatchNorm "
                    "layers, with bnjax's and with none (float32, bfloat16); print the table "
                    "and write the JSON.")
    p.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                   help="a callable returning the linen model, imported from the working "
                        "directory (e.g. bnjax_train.models:ResNet20)")
    p.add_argument("--kwarg", action="append", default=[], metavar="KEY=VALUE",
                   help="a keyword argument of the factory (VALUE read as JSON, else as a "
                        "string); repeatable")
    p.add_argument("--input-shape", required=True, metavar="D1,D2,...",
                   help="the shape of one example, e.g. 32,32,3")
    p.add_argument("--batch-size", type=int, default=128, help="examples per step")
    p.add_argument("--num-classes", type=int, default=10,
                   help="labels are drawn below it (at most the model's number of logits)")
    p.add_argument("--mode", default=None, help="the keyword of the model's call that "
                   "switches training on (None: train, training or is_training, whichever "
                   "the call takes; none of them: the model trains when batch_stats is "
                   "mutable)")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated compute dtypes")
    p.add_argument("--steps", default=",".join(_STEPS), help="comma-separated: train, eval")
    p.add_argument("--reps", type=int, default=20,
                   help="timed runs per figure (median and quartiles)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    p.add_argument("--out", default="bnjax_bench.json", metavar="FILE", help="the JSON")
    return p


def _fail(message: str) -> None:
    """A user error: one line on stderr and exit status 2 (argparse's for a bad flag)."""
    import sys

    print(f"bnjax-bench: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> int:
    """``bnjax-bench``: times a model of yours, prints the table, writes the JSON.

    The JSON holds the rows of :func:`compare` under ``"model"`` and, under ``"meta"``, the
    command, the working directory's git commit, the settings, the seconds it took and the
    environment (:func:`bnjax.benchmark.environment`: device, versions, load average). A
    line on stderr announces each compile. A user error (a module, attribute, factory,
    ``--kwarg``, ``--mode`` or input shape that does not fit, a flag out of range, a train
    step that would not train) is one line on stderr and exit status 2.

    Args:
      argv: command-line arguments (default ``sys.argv[1:]``), e.g. ``["--model",
        "bnjax_train.models:ResNet20", "--kwarg", "norm=flax", "--input-shape", "32,32,3"]``.

    Returns:
      The exit status (0).

    Example:
      >>> main(["--help"])  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      SystemExit: 0
    """
    import datetime
    import re
    import shlex
    import sys
    import time

    from bnjax.benchmark import environment, git_commit, model_table, write_json

    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S%z")
    env = environment()  # the load at the start (write_json records it at the end)
    t0 = time.perf_counter()
    try:
        _check_args(args)
        kwargs, shape = _kwargs(args.kwarg), _shape(args.input_shape)
        model, label = _factory_model(args.model, kwargs)
        rng = np.random.default_rng(0)
        batch = {"x": rng.normal(size=(args.batch_size, *shape)).astype(np.float32),
                 "y": rng.integers(0, args.num_classes, size=args.batch_size)}
        rows = compare(model, batch, name=label, mode=args.mode, reps=args.reps,
                       warmup=args.warmup, dtypes=args.dtypes.split(","),
                       steps=args.steps.split(","),
                       log=lambda m: print(m, file=sys.stderr, flush=True))
    except ValueError as e:
        _fail(re.sub(r"(?<![\w-])mode=", "--mode=", str(e)))  # compare's mode is --mode
    git = git_commit()
    meta = {"benchmark": "compare", "command": shlex.join(["bnjax-bench", *argv]),
            "git_commit": git["commit"], "git_dirty": git["dirty"], "started": started,
            "model": args.model, "kwargs": kwargs, "input_shape": list(shape),
            "reps": args.reps, "warmup": args.warmup,
            "seconds": round(time.perf_counter() - t0, 1), "environment": env}
    print(model_table(rows, spread=True))
    print(f"\n{env['device']}; jax {env['jax']}, flax {env['flax']}, bnjax {env['bnjax']}; "
          f"load average {'/'.join(map(str, env['load_average']))}; median and quartiles of "
          f"{args.reps} interleaved runs after {args.warmup} warm-up runs; "
          f"{meta['seconds']} s.")
    write_json({"meta": meta, "model": rows}, args.out)
    return 0


if __name__ == "__main__":  # python -m bnjax.timing, the same as bnjax-bench
    raise SystemExit(main())
