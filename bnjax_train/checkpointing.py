"""Checkpoints and the files of a workdir: orbax set-up, save, resume, and checks of what resumes.

A workdir holds ``config.json`` (the resolved config), ``metrics.jsonl`` (one line per epoch)
and ``checkpoints/<step>/`` (orbax, two items: ``state``, the arrays -- step, params,
batch_stats, optimizer state, RNG -- and ``meta``, JSON: where the loop is in the data and what
the current epoch has summed so far). orbax writes each checkpoint into a temporary folder and
renames it when complete, and the text files are replaced atomically or appended line by line
with ``fsync``, so a process killed at any moment leaves a workdir that resumes from its last
complete checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp

from bnjax.parallel import host_first_replica
from bnjax_train.config_lib import RESUME_FREE_FIELDS

__all__ = [
    "META_KEYS",
    "Checkpoints",
    "append_metrics",
    "check_meta",
    "check_same_config",
    "read_metrics",
    "restore_variables",
    "state_tree",
    "write_atomic",
    "write_metrics",
]

#: The keys of a checkpoint's ``meta`` item (see ``bnjax_train.train.LoopState``).
META_KEYS = ("epoch", "batch_in_epoch", "epoch_sums", "consecutive_skips", "total_skipped",
             "elapsed_s")


def state_tree(state: Any, rng_data: Any, *, replicated: bool = False) -> dict[str, Any]:
    """The arrays a checkpoint holds, on the host: step, params, batch_stats, opt_state, rng.

    Args:
      state: a ``bnjax.TrainState`` (replicated over the local devices if ``replicated``).
      rng_data: the run's PRNG key data (``jax.random.key_data``).
      replicated: take the first local replica of every leaf.

    Example:
      >>> import numpy as np, optax, bnjax
      >>> s = bnjax.TrainState.create(apply_fn=None, params={"w": np.ones(2)}, batch_stats={},
      ...                             tx=optax.sgd(0.1))
      >>> sorted(state_tree(s, np.zeros(2, np.uint32)))
      ['batch_stats', 'opt_state', 'params', 'rng', 'step']
    """
    tree = {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state}
    tree = host_first_replica(tree) if replicated else jax.device_get(tree)
    return {**tree, "rng": rng_data}


class Checkpoints:
    """The checkpoints of a workdir (``<workdir>/checkpoints``), saved synchronously.

    Args:
      workdir: the run's folder.
      max_to_keep: how many of the newest checkpoints to keep.

    Example:
      >>> import tempfile, numpy as np
      >>> with tempfile.TemporaryDirectory() as d:
      ...     ckpt = Checkpoints(d, max_to_keep=2)
      ...     ckpt.save(3, {"w": np.arange(2.0)}, {"epoch": 0})
      ...     step, tree, meta = ckpt.restore_latest({"w": np.zeros(2)})
      ...     ckpt.close()
      >>> step, tree["w"].tolist(), meta
      (3, [0.0, 1.0], {'epoch': 0})
    """

    def __init__(self, workdir: str, *, max_to_keep: int) -> None:
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=False),
            item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def save(self, step: int, tree: Any, meta: Mapping[str, Any]) -> None:
        """Writes checkpoint ``step`` (arrays ``tree``, JSON ``meta``) and waits until done."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(dict(meta))))
        self._manager.wait_until_finished()

    def restore_latest(self, target: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """``(step, tree, meta)`` of the newest checkpoint, restored like ``target``; or None."""
        step = self.latest_step()
        if step is None:
            return None
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return step, restored.state, dict(restored.meta)

    def close(self) -> None:
        """Releases the manager."""
        self._manager.close()


def check_meta(meta: Mapping[str, Any], where: str) -> None:
    """Raises a ``ValueError`` if a restored ``meta`` item lacks a key the loop needs.

    Example:
      >>> check_meta({"epoch": 1}, "ckpt/4")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: checkpoint ckpt/4 has meta keys ['epoch'] ...
    """
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ValueError(
            f"checkpoint {where} has meta keys {sorted(meta)} but lacks {missing}; it was not "
            "written by this program. Use a new --workdir.")


def check_same_config(workdir: str, config: Mapping[str, Any]) -> None:
    """Raises a ``ValueError`` if ``workdir`` holds a run whose config differs from ``config``.

    Fields in ``RESUME_FREE_FIELDS`` may differ (they do not change the numbers a run
    produces); a workdir without ``config.json`` passes.

    Args:
      workdir: the run's folder.
      config: the new run's config as JSON data (``config_lib.config_dict``).

    Example:
      >>> import json, os, tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     write_atomic(os.path.join(d, "config.json"), json.dumps({"seed": 0}))
      ...     check_same_config(d, {"seed": 1})  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: workdir ... holds a run with another config (fields config.seed: 0 there, ...
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)
    diff = sorted(k for k in set(old) | set(config) if k not in RESUME_FREE_FIELDS
                  and old.get(k) != config.get(k))
    if diff:
        raise ValueError(
            f"workdir {workdir!r} holds a run with another config (fields "
            + ", ".join(f"config.{k}: {old.get(k)!r} there, {config.get(k)!r} now"
                        for k in diff)
            + "); resume it with the same config or use a new --workdir.")


def write_atomic(path: str, text: str) -> None:
    r"""Writes ``text`` to ``path`` through a temporary file and a rename: never half a file.

    Example:
      >>> import os, tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     write_atomic(os.path.join(d, "a.txt"), "hi\n")
      ...     os.listdir(d)
      ['a.txt']
    """
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_metrics(path: str) -> list[dict[str, Any]]:
    r"""The complete lines of ``metrics.jsonl`` (a torn last line is dropped).

    Example:
      >>> import os, tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     path = os.path.join(d, "metrics.jsonl")
      ...     write_atomic(path, '{"step": 4}\n{"step": 8')
      ...     read_metrics(path)
      [{'step': 4}]
    """
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


def append_metrics(path: str, record: Mapping[str, Any]) -> None:
    """Appends one JSON line to ``metrics.jsonl`` and flushes it to disk.

    Example:
      >>> import os, tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     append_metrics(os.path.join(d, "m.jsonl"), {"step": 1})
      ...     read_metrics(os.path.join(d, "m.jsonl"))
      [{'step': 1}]
    """
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_metrics(path: str, records: Sequence[Mapping[str, Any]]) -> None:
    """Replaces ``metrics.jsonl`` with ``records`` (atomically).

    Example:
      >>> import os, tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     write_metrics(os.path.join(d, "m.jsonl"), [{"step": 4}, {"step": 8}])
      ...     read_metrics(os.path.join(d, "m.jsonl"))
      [{'step': 4}, {'step': 8}]
    """
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def restore_variables(workdir: str) -> dict[str, Any]:
    """``{"params", "batch_stats"}`` of the last checkpoint that train.py wrote in ``workdir``.

    Raises:
      FileNotFoundError: no checkpoint in ``workdir``.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     restore_variables(d)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      FileNotFoundError: no checkpoint in ...
    """
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint in {workdir!r}")
    mngr = ocp.CheckpointManager(directory, item_names=("state", "meta"))
    try:
        step = mngr.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {workdir!r}")
        tree = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore())).state
    finally:
        mngr.close()
    return {"params": tree["params"], "batch_stats": tree["batch_stats"]}
