"""Checkpoints of a workdir: orbax set-up, save, and a resume that survives damaged ones.

A workdir keeps ``checkpoints/<step>/`` (orbax, two items: ``state``, the arrays -- step, params,
batch_stats, optimizer state, RNG -- and ``meta``, JSON: where the loop is in the data and what
the current epoch has summed so far), the last ``keep_checkpoints`` of them. orbax writes each
checkpoint into a temporary folder and renames it when complete, so a process killed at any
moment leaves a workdir that resumes from its last complete checkpoint.

A checkpoint can still be damaged afterwards (a full disk, a copy cut short, a hand edit).
:meth:`Checkpoints.restore_intact` therefore checks the newest before resuming from it -- its
``meta`` (every key, of the right type), its step against its folder name and against the
epoch and batch that ``meta`` gives, every array read back with the shape and dtype of the
run's state -- and falls back to the newest intact one, naming what it skipped and why
(:meth:`Checkpoints.set_aside` then moves those to ``damaged_checkpoints/``). With none
intact it raises :class:`NoIntactCheckpointError` naming the folder and how to start over.
The text files of a workdir are :mod:`bnjax_train.run_files`'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from bnjax.parallel import host_first_replica
from bnjax_train.workdir import disk_full_error, is_disk_full

__all__ = [
    "META_KEYS",
    "Checkpoints",
    "NoIntactCheckpointError",
    "Restored",
    "StateMismatchError",
    "check_meta",
    "restore_variables",
    "restored_problem",
    "state_tree",
]

#: The keys of a checkpoint's ``meta`` item (see ``bnjax_train.loop_state.LoopState``).
META_KEYS = ("epoch", "batch_in_epoch", "epoch_sums", "consecutive_skips", "total_skipped",
             "elapsed_s")


class NoIntactCheckpointError(ValueError):
    """A workdir holds checkpoints, none of them intact."""


class StateMismatchError(ValueError):
    """A workdir's checkpoints are readable but hold another state than the config builds."""


#: How :func:`restored_problem` and orbax say that a checkpoint holds another state (another
#: model or optimizer), which is not damage.
_MISMATCH = ("its arrays are not those of this run's state", "tree structures do not match")


def _is_mismatch(problem: str) -> bool:
    return problem.startswith("array ") or any(m in problem for m in _MISMATCH)


@dataclasses.dataclass
class Restored:
    """The checkpoint a run resumes from, and the newer ones skipped as damaged.

    Attributes:
      step: its step (the folder's name).
      tree: the arrays, restored like the target (see :func:`state_tree`).
      meta: the loop's position and sums (:data:`META_KEYS`).
      skipped: ``(step, why)`` of each newer checkpoint that was not intact, newest first.
    """

    step: int
    tree: Any
    meta: dict[str, Any]
    skipped: list[tuple[int, str]]


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
        with _quiet_orbax():  # it logs each damaged step it lists; restore_intact says why
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                     enable_async_checkpointing=False),
                item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def save(self, step: int, tree: Any, meta: Mapping[str, Any]) -> None:
        """Writes checkpoint ``step`` (arrays ``tree``, JSON ``meta``) and waits until done.

        Raises:
          bnjax_train.workdir.DiskFullError: the disk is full; the message names the folder
            and the space a checkpoint needs (the half-written one is left to orbax, which
            never takes it for a checkpoint).
        """
        _quiet_closed_loop_reads()  # what a failed write's pending I/O would print
        verbose = logging.getLogger("absl").getEffectiveLevel() < logging.WARNING
        try:
            # A failed write logs each of its threads' errors (kept with --verbosity).
            with contextlib.nullcontext() if verbose else _quiet_orbax():
                self._manager.save(step, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(dict(meta))))
                self._manager.wait_until_finished()
        except Exception as e:
            if not is_disk_full(e):
                raise
            needed = max(self.checkpoint_bytes(),
                         sum(np.asarray(a).nbytes for a in jax.tree.leaves(tree)))
            raise disk_full_error(self.directory, needed) from None

    def newest_on_disk(self) -> int | None:
        """The newest step folder (orbax names one only once complete); works closed too."""
        if not os.path.isdir(self.directory):
            return None
        return max((int(d) for d in os.listdir(self.directory) if d.isdigit()), default=None)

    def checkpoint_bytes(self) -> int:
        """Bytes the newest complete checkpoint takes on disk (0 without one)."""
        step = self.newest_on_disk()
        total = 0
        for root, _, files in os.walk(os.path.join(self.directory, str(step))):
            for name in files:
                st = os.stat(os.path.join(root, name))
                total += max(st.st_size, st.st_blocks * 512)
        return total if step is not None else 0

    def all_steps(self) -> list[int]:
        """The steps of every checkpoint folder, complete or not, oldest first."""
        return sorted(self._manager.all_steps())

    def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
        """``(tree, meta)`` of checkpoint ``step``, restored like ``target`` (unchecked)."""
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return restored.state, dict(restored.meta)

    def restore_latest(self, target: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """``(step, tree, meta)`` of the newest checkpoint, restored like ``target``; or None."""
        step = self.latest_step()
        if step is None:
            return None
        tree, meta = self.restore(step, target)
        return step, tree, meta

    def restore_intact(self, target: Any, *, steps_per_epoch: int) -> Restored | None:
        """The newest checkpoint that passes every check, and the newer ones that did not.

        Args:
          target: the run's fresh state as :func:`state_tree` gives it (structure, shapes
            and dtypes every checkpoint must have).
          steps_per_epoch: train steps per epoch (a checkpoint's step must be ``epoch *
            steps_per_epoch + batch_in_epoch`` of its ``meta``).

        Returns:
          The :class:`Restored` checkpoint, or None if there are no checkpoints at all.

        Raises:
          NoIntactCheckpointError: there are checkpoints, none intact; the message names
            each, why it was rejected, and how to start over.
          StateMismatchError: every checkpoint holds another state than ``target`` (another
            model or optimizer: not damage).
        """
        skipped: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            try:
                with _quiet_orbax():  # its own log lines about the damage; ours says it all
                    tree, meta = self.restore(step, target)
                problem = restored_problem(step, tree, meta, target, steps_per_epoch)
            except Exception as e:  # noqa: BLE001 -- any failure to read is damage
                tree, meta, problem = None, {}, _one_line(e)
                _quiet_closed_loop_reads()
            if problem is None:
                return Restored(step, tree, meta, skipped)
            skipped.append((step, problem))
        if not skipped:
            return None
        workdir = os.path.dirname(self.directory)
        if all(_is_mismatch(why) for _, why in skipped):
            raise StateMismatchError(
                f"the checkpoints in {self.directory} (steps "
                f"{', '.join(str(step) for step, _ in skipped)}) are readable but hold the "
                "state of another model or optimizer than this config builds (newest: "
                f"{skipped[0][1]}); they are left as they are. Resume with the config the run "
                "was started with, or use a new --workdir.")
        raise NoIntactCheckpointError(
            f"no intact checkpoint in {self.directory}: "
            + "; ".join(f"{step}: {why}" for step, why in skipped)
            + f". To start this run over, delete or move {workdir} (or use a new --workdir); "
            "to keep trying, restore a copy of the checkpoints folder first.")

    def set_aside(self, steps: list[int]) -> list[str]:
        """Moves checkpoints ``steps`` to ``<workdir>/damaged_checkpoints/``; their new paths.

        A resumed run would otherwise meet them again when it reaches their steps.
        """
        aside = os.path.join(os.path.dirname(self.directory), "damaged_checkpoints")
        os.makedirs(aside, exist_ok=True)
        moved = []
        for step in steps:
            dest, k = os.path.join(aside, str(step)), 1
            while os.path.lexists(dest):
                k += 1
                dest = os.path.join(aside, f"{step}-{k}")
            os.replace(os.path.join(self.directory, str(step)), dest)
            moved.append(dest)
        self.reload()
        return moved

    def reload(self) -> None:
        """Reads the folder's list of checkpoints again (after another process changed it)."""
        with _quiet_orbax():
            self._manager.reload()

    def close(self) -> None:
        """Releases the manager (again: nothing)."""
        if self._manager is not None:
            self._manager.close()
            self._manager = None


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _quiet_closed_loop_reads() -> None:
    """Drops the "Event loop is closed" errors of I/O left over from a failed restore or save.

    When orbax gives up on a damaged checkpoint (or a write to a full disk), tensorstore still
    finishes the other reads and writes and reports into orbax's closed event loop; Python
    prints each as an unraisable error.
    """
    def closed_loop(error: BaseException | None) -> bool:
        return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"

    for module, name in ((sys, "unraisablehook"), (threading, "excepthook")):
        previous = getattr(module, name)
        if getattr(previous, "bnjax_quiet", False):
            continue

        def hook(info: Any, previous: Any = previous) -> None:
            if not closed_loop(info.exc_value):
                previous(info)

        hook.bnjax_quiet = True  # type: ignore[attr-defined]
        setattr(module, name, hook)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or "(no message)"
    return f"{type(error).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of an array, a ``jax.ShapeDtypeStruct`` or a Python number."""
    dtype = getattr(x, "dtype", None)
    return tuple(getattr(x, "shape", np.shape(x))), np.dtype(dtype or np.result_type(x))


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def check_meta(meta: Mapping[str, Any], where: str) -> None:
    """Raises a ``ValueError`` if a restored ``meta`` item lacks a key or has a bad value.

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
    sums = meta["epoch_sums"]
    bad = [k for k in ("epoch", "batch_in_epoch", "consecutive_skips", "total_skipped")
           if not _is_count(meta[k])]
    if not (isinstance(sums, list) and len(sums) == 4
            and all(isinstance(v, int | float) and np.isfinite(v) for v in sums)):
        bad.append("epoch_sums")
    if not (isinstance(meta["elapsed_s"], int | float) and np.isfinite(meta["elapsed_s"])):
        bad.append("elapsed_s")
    if bad:
        raise ValueError(f"checkpoint {where} has bad meta values "
                         f"{ {k: meta[k] for k in bad} }")


def restored_problem(step: int, tree: Any, meta: Mapping[str, Any], target: Any,
                     steps_per_epoch: int) -> str | None:
    """Why a restored checkpoint cannot be resumed from, or None if it can.

    Checked: ``meta`` (:func:`check_meta`); the arrays have the structure, shapes and dtypes
    of ``target``; the ``step`` array, the folder's ``step`` and the position in ``meta``
    (``epoch * steps_per_epoch + batch_in_epoch``) agree.

    Example:
      >>> import numpy as np
      >>> meta = {"epoch": 99, "batch_in_epoch": 0, "epoch_sums": [0.0, 0.0, 0, 0],
      ...         "consecutive_skips": 0, "total_skipped": 0, "elapsed_s": 1.0}
      >>> tree = {"step": np.int32(8)}
      >>> restored_problem(8, tree, meta, tree, steps_per_epoch=4)
      'meta says epoch 99, batch 0 (step 396 at 4 steps per epoch), not step 8'
    """
    try:
        check_meta(meta, str(step))
    except ValueError as e:
        return str(e).split(f"checkpoint {step} ", 1)[-1]
    if jax.tree.structure(tree) != jax.tree.structure(target):
        return "its arrays are not those of this run's state (another model or optimizer?)"
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(tree)[0],
                                 jax.tree.leaves(target), strict=True):
        if _shape_dtype(got) != _shape_dtype(want):
            return (f"array {jax.tree_util.keystr(path)} has shape %s %s, not %s %s"
                    % (*_shape_dtype(got), *_shape_dtype(want)))
    if int(np.asarray(tree["step"])) != step:
        return f"its step array says {int(np.asarray(tree['step']))}, its folder {step}"
    position = meta["epoch"] * steps_per_epoch + meta["batch_in_epoch"]
    if position != step or meta["batch_in_epoch"] >= steps_per_epoch:
        return (f"meta says epoch {meta['epoch']}, batch {meta['batch_in_epoch']} (step "
                f"{position} at {steps_per_epoch} steps per epoch), not step {step}")
    return None


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
