"""Shared pieces of the benchmarks: the provenance of a run.

The timing, initial variables, JSON and tables come from :mod:`bnjax.benchmark` (re-exported
here), so that the repository's benchmarks and a user's own timing share one implementation.
Nothing here starts JAX's backends at import: ``python -m benchmarks sync`` must set the
device count first.
"""

from __future__ import annotations

import datetime
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bnjax.benchmark import (
    compile_fn,
    cpu_model,
    environment,
    fmt,
    git_commit,
    init_variables,
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
