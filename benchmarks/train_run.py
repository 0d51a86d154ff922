"""The training program's result: ``python train.py``'s config with batch norm and without.

Command (from the repository root)::

    python -m benchmarks train                               # configs/default.py (MNIST-1D)
    python -m benchmarks train --out benchmarks/results/train_default.json

Runs ``bnjax_train.compare.compare_norms`` on the config in a fresh workdir (default
``runs/benchmarks_train/<config name>``, emptied first): the config as it is (``norm="batch"``)
and with ``norm="none"``, the same seed and data. The results JSON holds each variant's final
and best test accuracy, the steps it took to reach test accuracies 0.90, 0.95 and 0.97 and a
training loss of 0.01, and the wall time of both runs.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

__all__ = ["default_workdir", "run"]


def default_workdir(config: str) -> str:
    """The fresh workdir of a config's runs.

    Example:
      >>> default_workdir("configs/default.py")
      'runs/benchmarks_train/default'
    """
    return os.path.join("runs", "benchmarks_train", Path(config).stem)


def run(config_path: str, workdir: str) -> dict[str, Any]:
    """Trains the config with and without batch norm; returns the summary and wall time.

    Example:
      >>> r = run("configs/default.py", "/tmp/w")  # doctest: +SKIP
    """
    from bnjax_train import compare, config_lib

    config = config_lib.load_config(config_path)
    shutil.rmtree(workdir, ignore_errors=True)
    start = time.perf_counter()
    summary = compare.compare_norms(config, workdir)
    seconds = time.perf_counter() - start
    for s in summary.values():
        s.pop("workdir", None)
    return {"config": str(config_path), "model": config.model, "dataset": config.dataset,
            "variants": summary, "wall_seconds_both_runs": seconds}
