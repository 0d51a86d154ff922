"""Timing and reporting a step: interleaved medians, peak memory, provenance, JSON, tables.

These are the pieces every bnjax timing shares, in the wheel so that a user can time their own
model the way the repository's benchmarks time theirs (:func:`bnjax.timing.compare` and
``bnjax-bench`` are built on them). Nothing here imports JAX at module level (a caller may
still have to set ``XLA_FLAGS`` before JAX starts).

Example:
  >>> t = median_times({"a": lambda: 1}, reps=3, warmup=0)
  >>> print(markdown_table(["name", "timed"], [["a", t["a"]["n"]]]))
  | name | timed |
  |---|---|
  | a | 3 |
"""

from __future__ import annotations

import gc
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "compile_fn",
    "cpu_model",
    "device_label",
    "environment",
    "fmt",
    "git_commit",
    "init_variables",
    "markdown_table",
    "median_times",
    "model_table",
    "peak_memory",
    "quantiles",
    "write_json",
]

_VERSIONED = ("jax", "jaxlib", "flax", "optax", "numpy", "bnjax")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` says elsewhere.

    Example:
      >>> isinstance(cpu_model(), str)
      True
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Describes the machine and the software that the figures were measured with.

    Returns:
      A JSON-ready dict: device, library versions (JAX, jaxlib, Flax, optax, NumPy, bnjax),
      CPU model, core counts, memory, ``XLA_FLAGS``, the glibc ``MALLOC_*`` settings and the
      load average (1, 5, 15 min) at the time of the call.

    Example:
      >>> env = environment()
      >>> {"device", "jax", "flax", "cpu", "cores", "load_average"} <= set(env)
      True
    """
    import jax

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "device": device_label(),
        "num_devices": jax.device_count(),
        **{name: _version(name) for name in _VERSIONED},
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "malloc_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")},
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def device_label() -> str:
    """The first device's kind as a person names it, with the count where it helps.

    ``cpu (1 device)`` or ``cpu (8 devices)`` on the host platform; the accelerator's kind
    (``NVIDIA H100 80GB HBM3``, ``TPU v5 lite``), with ``(N devices)`` after it when there
    are several.

    Example:
      >>> import jax
      >>> label = device_label()
      >>> label.startswith("cpu (") if jax.default_backend() == "cpu" else bool(label)
      True
    """
    import jax

    dev, n = jax.devices()[0], jax.device_count()
    count = f"({n} device{'s' if n > 1 else ''})"
    kind = str(dev.device_kind)
    if kind.lower() == dev.platform.lower():
        return f"{dev.platform} {count}"
    return kind if n == 1 else f"{kind} {count}"


def git_commit(repo: str | os.PathLike | None = None) -> dict[str, Any]:
    """The commit of the git repository at ``repo`` and whether its tracked files changed.

    ``repo`` defaults to the working directory; outside a repository both values are None.

    Example:
      >>> sorted(git_commit())
      ['commit', 'dirty']
    """
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def write_json(result: Mapping[str, Any], out: str | os.PathLike) -> None:
    """Writes ``result`` to ``out`` (folders created), after recording the load at the end.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     write_json({"meta": {}}, Path(d) / "new" / "r.json")
      ...     sorted(json.loads((Path(d) / "new" / "r.json").read_text())["meta"])
      ['load_average_end']
    """
    meta = result.get("meta")
    if isinstance(meta, dict):
        meta["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, allow_nan=False)
        f.write("\n")
    print(f"wrote {path}", file=sys.stderr, flush=True)


def quantiles(seconds: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and minimum of times given in seconds, in milliseconds.

    Example:
      >>> quantiles([0.001, 0.002, 0.003])["median_ms"]
      2.0
    """
    q = np.percentile(seconds, [25, 50, 75])
    return {"median_ms": 1e3 * float(q[1]), "p25_ms": 1e3 * float(q[0]),
            "p75_ms": 1e3 * float(q[2]), "min_ms": 1e3 * min(seconds), "n": len(seconds)}


def compile_fn(fn: Callable[..., Any], *args: Any) -> Any:
    """Jits, lowers and compiles ``fn`` for ``args`` (the compiled object is called directly).

    Example:
      >>> import jax.numpy as jnp
      >>> compile_fn(lambda x: x + 1, jnp.ones(2))(jnp.ones(2)).tolist()
      [2.0, 2.0]
    """
    import jax

    return jax.jit(fn).lower(*args).compile()


def peak_memory(compiled: Any) -> dict[str, int]:
    """Peak, temporary, argument and output bytes of a compiled function (XLA's analysis).

    ``peak_bytes`` is arguments + outputs + temporaries - aliased bytes: everything the
    executable holds at once at most. (XLA's own ``peak_memory_in_bytes``, kept as
    ``xla_peak_bytes``, leaves out the temporaries on CPU.)

    Example:
      >>> import jax.numpy as jnp
      >>> peak_memory(compile_fn(lambda x: x * 2, jnp.ones(4)))["argument_bytes"]
      16
    """
    m = compiled.memory_analysis()
    args, out = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
    temp, alias = int(m.temp_size_in_bytes), int(m.alias_size_in_bytes)
    xla_peak = getattr(m, "peak_memory_in_bytes", None)
    return {"peak_bytes": args + out + temp - alias, "temp_bytes": temp,
            "argument_bytes": args, "output_bytes": out,
            "xla_peak_bytes": None if xla_peak is None else int(xla_peak)}


def median_times(
    fns: Mapping[str, Callable[[], Any]], *, reps: int = 20, warmup: int = 2
) -> dict[str, dict[str, float]]:
    """Times zero-argument callables interleaved; summary statistics in milliseconds.

    Each callable is run ``warmup`` times, then ``reps`` rounds run every callable once, in an
    order rotated from round to round, each call ending with ``jax.block_until_ready`` on its
    result. Garbage collection is paused while timing.

    Args:
      fns: name -> callable returning JAX arrays (or anything ``block_until_ready`` accepts).
      reps: timed rounds (every figure is the median over them).
      warmup: untimed calls of each callable first.

    Returns:
      name -> ``{"median_ms", "min_ms", "p25_ms", "p75_ms", "max_ms", "n"}``.

    Example:
      >>> t = median_times({"a": lambda: 1, "b": lambda: 2}, reps=3, warmup=0)
      >>> t["a"]["n"], t["b"]["median_ms"] >= 0
      (3, True)
    """
    import jax

    names = list(fns)
    for name in names:
        for _ in range(warmup):
            jax.block_until_ready(fns[name]())
    samples: dict[str, list[float]] = {name: [] for name in names}
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(reps):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                fn = fns[name]
                t0 = time.perf_counter()
                jax.block_until_ready(fn())
                samples[name].append((time.perf_counter() - t0) * 1e3)
    finally:
        if enabled:
            gc.enable()
    out = {}
    for name, s in samples.items():
        q25, q75 = np.percentile(s, [25, 75]) if s else (float("nan"), float("nan"))
        out[name] = {
            "median_ms": statistics.median(s) if s else float("nan"),
            "min_ms": min(s, default=float("nan")),
            "p25_ms": float(q25),
            "p75_ms": float(q75),
            "max_ms": max(s, default=float("nan")),
            "n": len(s),
        }
    return out


def fmt(v: Any) -> str:
    """A table cell: floats with 3 significant digits (1 decimal from 10 up), None as ``-``.

    Example:
      >>> fmt(0.12345), fmt(123.456), fmt(None), fmt(float("nan")), fmt("x")
      ('0.123', '123.5', '-', '-', 'x')
    """
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:  # NaN
            return "-"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats get 3 significant digits (1 decimal from 10 up).

    Example:
      >>> print(markdown_table(["a", "b"], [[1, 0.12345]]))
      | a | b |
      |---|---|
      | 1 | 0.123 |
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def model_table(rows: Sequence[Mapping[str, Any]], *, spread: bool = False) -> str:
    """The markdown table of ``bnjax.timing.compare``'s rows (``python -m benchmarks step``'s).

    Args:
      rows: the rows (``model``, ``step``, ``batch``, ``variant``, ``median_ms``, ...).
      spread: add a ``p25-p75 ms`` column beside the median (the interquartile range of the
        timed runs; ``-`` for a row that has none, as in files written before it was kept).

    Example:
      >>> row = {"model": "net", "step": "train", "batch": 8, "dtype": "float32",
      ...        "variant": "flax BN", "median_ms": 2.0, "ratio_to_flax": 1.0,
      ...        "bn_cost_pct": 25.0, "peak_bytes": 2**20, "available": True}
      >>> print(model_table([row]).splitlines()[-1])
      | net train, batch 8, float32 | flax BN | 2 | 1 | +25 % | 1 |
      >>> print(model_table([{**row, "p25_ms": 1.5, "p75_ms": 2.25}], spread=True).splitlines()[-1])
      | net train, batch 8, float32 | flax BN | 2 | 1.5-2.25 | 1 | +25 % | 1 |
    """
    table = []
    for r in rows:
        name = f"{r['model']} {r['step']}, batch {r['batch']}, {r.get('dtype', 'float32')}"
        cost = r.get("bn_cost_pct")
        cost = "-" if cost is None else f"{cost:+.0f} %"
        q = (r.get("p25_ms"), r.get("p75_ms"))
        iqr = [f"{fmt(q[0])}-{fmt(q[1])}" if None not in q and r["available"] else "-"]
        if r["available"]:
            peak = None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20
            table.append([name, r["variant"], r["median_ms"], *iqr[:spread],
                          r["ratio_to_flax"], cost, peak])
        else:
            table.append([name, r["variant"], r["note"], *iqr[:spread], "-", "-", "-"])
    header = ["step", "normalization", "ms", *["p25-p75 ms"][:spread], "ratio to flax BN",
              "BN cost over no norm", "peak MiB"]
    return ("Model level (median ms of the jitted step; train = forward, backward and update):"
            "\n\n" + markdown_table(header, table))


def init_variables(model: Any, x: Any, *, mode: str | None = "training",
                   rngs: Sequence[str] = ()) -> Any:
    """He-normal kernels, unit scales and variances, zero biases and means.

    ``model.init`` would compile the initializers' random-number code, op by op, which takes
    longer than compiling the train step; values drawn with NumPy into the shapes that
    ``jax.eval_shape`` reports serve the timing as well, identically for every variant.

    Args:
      model: a Flax module called as ``model.apply(variables, x, **{mode: False})``.
      x: an example input (only its shape and dtype are used).
      mode: the keyword of the model's call that switches training on (None: no keyword).
      rngs: rng streams besides ``params`` that the model's init asks for (``dropout``, ...).

    Example:
      >>> import flax.linen as nn, jax.numpy as jnp
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, training):
      ...         return nn.Dense(3)(x)
      >>> v = init_variables(Net(), jnp.ones((2, 4)))
      >>> v["params"]["Dense_0"]["kernel"].shape, float(v["params"]["Dense_0"]["bias"].sum())
      ((4, 3), 0.0)
    """
    import jax
    import jax.numpy as jnp

    kwargs = {} if mode is None else {mode: False}
    keys = {name: jax.random.key(0) for name in ("params", *rngs)}
    shapes = jax.eval_shape(lambda: model.init(keys, x, **kwargs))
    rng = np.random.default_rng(0)

    def fill(path: Any, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        name = getattr(path[-1], "key", str(path[-1]))
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in), leaf.dtype)
        if name in ("scale", "var"):
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.zeros(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)

