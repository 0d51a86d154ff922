"""Where a run starts: a fresh workdir, the newest intact checkpoint, or a finished run.

:func:`check_config` runs before any data is read: a workdir holding a run with another config
is refused (naming the fields), and a read-only workdir without checkpoints too.
:func:`find_resume_point` picks the checkpoint to resume from
(:meth:`bnjax_train.checkpointing.Checkpoints.restore_intact`) and the ``metrics.jsonl`` lines
up to it, and says whether the run is already finished; a workdir that holds a run but no
checkpoint at all is never silently started over. :func:`commit` then makes the workdir match:
damaged checkpoints set aside, ``config.json`` rewritten, metrics lines past the checkpoint
dropped (a killed run redoes them), unreadable lines left out (the file as it was moved to
``damaged_metrics/``, with a warning) and a config change logged -- nothing of which happens
for a finished run, which writes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from bnjax_train import checkpointing, reporting, run_files
from bnjax_train.loop_state import LoopState
from bnjax_train.workdir import WorkdirError

__all__ = ["ResumePoint", "check_config", "commit", "find_resume_point", "report_finished"]


def check_config(workdir: str, config: Mapping[str, Any], *,
                 read_only: bool) -> dict[str, list[Any]]:
    """Checks a new config against the run in ``workdir``; the changes it may make.

    Args:
      workdir: the run's folder.
      config: the new config as JSON data (``config_lib.config_dict``).
      read_only: the workdir cannot be written (it can only show a finished run).

    Returns:
      ``{FIELD: [OLD, NEW]}`` of the resume-changeable fields that differ.

    Raises:
      ValueError: another field differs (:func:`bnjax_train.run_files.check_same_config`).
      WorkdirError: a read-only workdir without checkpoints.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     check_config(d, {"seed": 0}, read_only=False)
      {}
    """
    changes = run_files.check_same_config(workdir, config)
    checkpoints = os.path.join(workdir, "checkpoints")
    if read_only and not (os.path.isdir(checkpoints) and os.listdir(checkpoints)):
        raise WorkdirError(f"--workdir {workdir} is not writable; make it writable or use "
                           "another --workdir.")
    return changes


@dataclasses.dataclass
class ResumePoint:
    """Where a run goes on from.

    Attributes:
      restored: the checkpoint (None for a fresh run).
      loop: the loop's position and sums there.
      lines: the ``metrics.jsonl`` lines up to that step (epoch and event lines).
      finished: the checkpoint is at the end of the last epoch of ``config.num_epochs``.
      damaged_lines: numbers (from 1) of the unreadable lines of ``metrics.jsonl``.
    """

    restored: checkpointing.Restored | None
    loop: LoopState
    lines: list[dict[str, Any]]
    finished: bool
    damaged_lines: list[int] = dataclasses.field(default_factory=list)

    @property
    def records(self) -> list[dict[str, Any]]:
        """The epoch lines among :attr:`lines`."""
        return run_files.epoch_records(self.lines)


def find_resume_point(checkpoints: checkpointing.Checkpoints, target: Any, *,
                      steps_per_epoch: int, num_epochs: int,
                      metrics_path: str) -> ResumePoint:
    """The newest intact checkpoint of a workdir and the metrics lines up to it.

    Raises:
      bnjax_train.checkpointing.NoIntactCheckpointError: checkpoints, none intact.
      bnjax_train.checkpointing.StateMismatchError: checkpoints of another model or
        optimizer (the message says when ``config.json`` is missing).
      WorkdirError: ``metrics.jsonl`` has epoch lines but there is no checkpoint.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     ckpt = checkpointing.Checkpoints(d, max_to_keep=2)
      ...     point = find_resume_point(ckpt, {}, steps_per_epoch=4, num_epochs=2,
      ...                               metrics_path=os.path.join(d, "metrics.jsonl"))
      ...     ckpt.close()
      >>> point.restored, point.loop.step, point.finished
      (None, 0, False)
    """
    try:
        restored = checkpoints.restore_intact(target, steps_per_epoch=steps_per_epoch)
    except checkpointing.StateMismatchError as e:
        config_json = os.path.join(os.path.dirname(metrics_path), "config.json")
        if os.path.exists(config_json):
            raise
        raise checkpointing.StateMismatchError(
            f"{e} {config_json}, the record of the run's config that names a changed field, "
            "is missing.") from None
    damaged: list[int] = []
    lines = run_files.read_metrics(metrics_path, damaged)
    if restored is None:
        done = run_files.epoch_records(lines)
        if done:
            workdir = os.path.dirname(metrics_path)
            raise WorkdirError(
                f"--workdir {workdir} holds a run (metrics up to step {done[-1].get('step')} "
                f"in {metrics_path}) but no checkpoint in {checkpoints.directory}; it cannot "
                f"resume. To start over, delete or move {workdir} (or use a new --workdir).")
        return ResumePoint(None, LoopState(), [], False, damaged)
    loop = LoopState.from_meta(restored.step, restored.meta)
    # Lines past the checkpoint come from a run killed after writing them: it redoes them.
    lines = [r for r in lines if r.get("step", 0) <= restored.step]
    return ResumePoint(restored, loop, lines, loop.epoch >= num_epochs, damaged)


def _damaged_lines_line(point: ResumePoint, moved: str | None) -> str:
    """The one warning line about unreadable lines of ``metrics.jsonl``."""
    numbers = point.damaged_lines
    shown = ", ".join(map(str, numbers[:10])) + (", ..." if len(numbers) > 10 else "")
    where = (f"the file moved as it was to {moved}" if moved
             else "left as they are (the run is finished)")
    return (f"warning: {len(numbers)} unreadable line(s) of metrics.jsonl (line {shown}) "
            f"left out, {where}; kept its {len(point.lines)} readable line(s) up to step "
            f"{point.loop.step}.")


def _set_aside(checkpoints: checkpointing.Checkpoints, steps: list[int], is_main: bool,
               process_count: int) -> list[str]:
    """Moves the damaged checkpoints away (process 0), the others waiting for it."""
    moved = checkpoints.set_aside(steps) if is_main else []
    if process_count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("bnjax_train.resume.set_aside")
        checkpoints.reload()
    return moved


def commit(point: ResumePoint, *, checkpoints: checkpointing.Checkpoints, workdir: str,
           config: Mapping[str, Any], changes: Mapping[str, list[Any]], num_epochs: int,
           steps_per_epoch: int, is_main: bool, process_count: int = 1) -> None:
    """Makes the workdir match the resume point and says where the run goes on from.

    Prints the skipped checkpoints (a warning) and the resume line; sets the skipped ones
    aside; rewrites ``config.json`` and ``metrics.jsonl`` (the lines up to the checkpoint, then
    a ``config_change`` event if ``changes``). Call it for a run that is not finished.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     ckpt = checkpointing.Checkpoints(d, max_to_keep=2)
      ...     commit(ResumePoint(None, LoopState(), [], False), checkpoints=ckpt, workdir=d,
      ...            config={"seed": 0}, changes={}, num_epochs=2, steps_per_epoch=4,
      ...            is_main=True)
      ...     ckpt.close()
      ...     sorted(os.listdir(d))
      ['checkpoints', 'config.json', 'metrics.jsonl']
    """
    restored = point.restored
    if restored is not None and restored.skipped:
        moved = _set_aside(checkpoints, [s for s, _ in restored.skipped], is_main,
                           process_count)
        if is_main:
            print(reporting.checkpoint_warning(restored.skipped, restored.step, moved),
                  flush=True)
    if restored is not None and is_main:
        print(reporting.resume_line(os.path.join(checkpoints.directory, str(restored.step)),
                                    restored.step, point.loop.epoch,
                                    point.loop.batch_in_epoch, num_epochs, steps_per_epoch),
              flush=True)
    if not is_main:
        return
    if point.damaged_lines:
        moved = run_files.set_aside_metrics(workdir)
        print(_damaged_lines_line(point, moved), flush=True)
    if changes:
        point.lines.append({"event": "config_change", "step": point.loop.step,
                            "changes": dict(changes)})
        print("config changed on resume: " + ", ".join(
            f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()), flush=True)
    run_files.write_atomic(os.path.join(workdir, "config.json"),
                           json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    run_files.write_metrics(os.path.join(workdir, "metrics.jsonl"), point.lines)


def report_finished(point: ResumePoint, workdir: str, *, is_main: bool,
                    read_only: bool = False, applying: str = "") -> dict[str, Any]:
    """A finished run's result (its last epoch line), printed; nothing is written.

    ``applying`` names the inference tools the caller runs next on the final checkpoint
    (:func:`bnjax_train.reporting.finished_line`).

    Raises:
      WorkdirError: ``read_only`` and the run is not finished (it cannot go on).

    Example:
      >>> last = {"epoch": 2, "step": 8, "test_accuracy": 0.5, "test_loss": 1.25}
      >>> point = ResumePoint(None, LoopState(step=8, epoch=2), [last], True)
      >>> report_finished(point, "runs/x", is_main=True)["step"]  # doctest: +ELLIPSIS
      Finished run in runs/x: final test accuracy 0.5000 (test loss 1.2500) after 8 steps, ...
      8
    """
    if not point.finished:
        if read_only:
            raise WorkdirError(f"--workdir {workdir} is not writable and its run is not "
                               "finished; make it writable or use another --workdir.")
        raise ValueError(f"the run in {workdir} is not finished")
    records = point.records
    result = dict(records[-1]) if records else {"step": point.loop.step,
                                                "epoch": point.loop.epoch}
    if is_main:
        restored = point.restored
        if restored is not None and restored.skipped:
            print(reporting.checkpoint_warning(restored.skipped, restored.step, []), flush=True)
        if point.damaged_lines:
            print(_damaged_lines_line(point, None), flush=True)
        print(reporting.finished_line(result, workdir, applying), flush=True)
    return result
