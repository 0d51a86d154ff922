"""Shared pieces of the benchmarks: the provenance of a run and initial variables.

The timing, JSON and tables come from :mod:`bnjax.benchmark` (re-exported here), so that the
repository's benchmarks and a user's own timing share one implementation. Nothing here starts
JAX's backends at import: ``python -m benchmarks sync`` must set the device count first.
"""

from __future__ import annotations

import datetime
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bnjax.benchmark import (
    compile_fn,
    cpu_model,
    environment,
    fmt,
    git_commit,
    markdown_table,
    median_times,
    peak_memory,
    quantiles,
    write_json,
)

__all__ = [
    "REPO",
    "RESULTS_DIR",
    "compile_fn",
    "cpu_model",
    "environment",
    "fmt",
    "git_commit",
    "init_variables",
    "markdown_table",
    "median_times",
    "peak_memory",
    "quantiles",
    "run_metadata",
    "write_json",
]

#: The repository this package sits in.
REPO = Path(__file__).resolve().parents[1]
#: Where results go by default: outside the tracked files (``bench_results/`` is ignored).
RESULTS_DIR = Path("bench_results")












def run_metadata(benchmark: str, argv: Sequence[str], **fields: Any) -> dict[str, Any]:
    """The ``meta`` of a results JSON: what ran, where, with what, and the load at its start.

    Args:
      benchmark: the subcommand (``"step"``, ``"fold"``, ``"sync"``, ``"inference_eval"``).
      argv: the command-line arguments of ``python -m benchmarks``, subcommand first.
      **fields: settings of the run to record as well (repetitions, ``quick``, ...).

    Example:
      >>> meta = run_metadata("fold", ["fold", "--quick"], quick=True)
      >>> meta["command"], sorted(k for k in meta if k.startswith("git"))
      ('python -m benchmarks fold --quick', ['git_commit', 'git_dirty'])
    """
    git = git_commit(REPO)
    return {
        "benchmark": benchmark,
        "command": shlex.join(["python", "-m", "benchmarks", *argv]),
        "git_commit": git["commit"],
        "git_dirty": git["dirty"],
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S%z"),
        **fields,
        "environment": environment(),
    }








def init_variables(model: Any, x: Any) -> Any:
    """He-normal kernels, unit scales and variances, zero biases and means.

    ``model.init`` would compile the initializers' random-number code, op by op, which takes
    longer than compiling the train step; values drawn with NumPy into the shapes that
    ``jax.eval_shape`` reports serve the timing as well, identically for every variant.

    Args:
      model: a Flax module called as ``model.apply(variables, x, training=False)``.
      x: an example input (only its shape and dtype are used).

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

    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, training=False))
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








