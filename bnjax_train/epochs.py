"""One epoch of training and one evaluation: what the loop of :mod:`bnjax_train.train` runs.

:func:`train_epoch` runs the rest of an epoch (checkpointing on the way, stopping early for
``stop_after_steps`` or a SIGINT/SIGTERM), :func:`evaluate` averages over a split, and
:func:`end_epoch` writes the epoch's metrics line, ``curves.png`` and checkpoint. They work on
any run that has what :class:`LoopRun` lists (``bnjax_train.train.Run`` does).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, Protocol

import jax
import numpy as np

import bnjax
from bnjax_train import input_pipeline, reporting, run_files
from bnjax_train.loop_state import LoopState

__all__ = ["LoopRun", "end_epoch", "evaluate", "show_progress", "train_epoch"]


class LoopRun(Protocol):
    """What the epoch functions use of a run (see ``bnjax_train.train.Run``).

    Example:
      >>> sorted(LoopRun.__annotations__)[:4]
      ['config', 'ds', 'eval_step', 'process_count']
    """

    config: Any
    workdir: str
    ds: input_pipeline.Dataset
    steps_per_epoch: int
    train_step: Callable[..., Any]
    eval_step: Callable[..., Any]
    process_index: int
    process_count: int

    @property
    def is_main(self) -> bool: ...  # noqa: D102

    @property
    def metrics_path(self) -> str: ...  # noqa: D102

    def stopping(self) -> bool: ...  # noqa: D102

    def feed(self, batch: dict[str, np.ndarray]) -> Any: ...  # noqa: D102

    def first(self, tree: Any) -> Any: ...  # noqa: D102

    def save(self, state: bnjax.TrainState, loop: LoopState) -> None: ...  # noqa: D102


def show_progress(progress_bar: bool, is_main: bool) -> bool:
    """Whether to draw the progress bar: asked for, process 0, and someone watching.

    The bar (on stderr) is drawn only when stdout and stderr are both terminals, as tqdm
    users expect: a run whose output goes to a file or a pipe logs only its lines.

    Example:
      >>> show_progress(True, is_main=False)
      False
    """
    return bool(progress_bar) and is_main and sys.stdout.isatty() and sys.stderr.isatty()


def _count(run: LoopRun, loop: LoopState, pending: tuple[Any, int]) -> None:
    metrics, step = pending
    loop.count(run.first(metrics), step=step,
               max_consecutive_skips=run.config.max_consecutive_skips, workdir=run.workdir)


def train_epoch(run: LoopRun, state: bnjax.TrainState,
                loop: LoopState) -> tuple[bnjax.TrainState, bool]:
    """Runs the rest of epoch ``loop.epoch`` from ``loop.batch_in_epoch``.

    Saves a checkpoint every ``config.checkpoint_every_steps`` steps and stops early (saving
    one) at ``config.stop_after_steps`` or after the step in which a SIGINT/SIGTERM arrived.
    Each step's metrics are read one step late, so the host never waits for the device between
    steps.

    Returns:
      The new state and whether ``stop_after_steps`` or a signal interrupted the epoch.

    Example:
      >>> # run: the Run of bnjax_train.train.train_and_evaluate
      >>> state, interrupted = train_epoch(run, state, LoopState())  # doctest: +SKIP
    """
    from tqdm import tqdm

    config = run.config
    bar = tqdm(total=run.steps_per_epoch, initial=loop.batch_in_epoch,
               desc=f"epoch {loop.epoch + 1}/{config.num_epochs}",
               disable=not show_progress(config.progress_bar, run.is_main), leave=False,
               unit="step", dynamic_ncols=True)
    batches = input_pipeline.train_batches(
        run.ds, batch_size=config.batch_size, seed=config.seed, epoch=loop.epoch,
        start=loop.batch_in_epoch, num_local_devices=jax.local_device_count(),
        process_index=run.process_index, process_count=run.process_count,
        augment=config.augment)
    pending, interrupted = None, False
    for k, batch in enumerate(batches, start=loop.batch_in_epoch):
        state, metrics = run.train_step(state, run.feed(batch))
        if pending is not None:
            _count(run, loop, pending)
        loop.step += 1
        pending = (metrics, loop.step)
        bar.update(1)
        sums = loop.epoch_sums
        if (k + 1) % 10 == 0 and sums[3] > sums[2]:
            means = loop.epoch_means()
            bar.set_postfix(loss=f"{means['train_loss']:.4f}",
                            acc=f"{means['train_accuracy']:.4f}")
        end_of_epoch = k + 1 == run.steps_per_epoch
        stop = ((bool(config.stop_after_steps) and loop.step >= config.stop_after_steps)
                or run.stopping())
        periodic = (bool(config.checkpoint_every_steps)
                    and loop.step % config.checkpoint_every_steps == 0)
        if end_of_epoch or stop or periodic:
            _count(run, loop, pending)
            pending = None
        if end_of_epoch:
            break
        if stop or periodic:
            loop.batch_in_epoch = k + 1
            run.save(state, loop)
        if stop:
            interrupted = True
            break
    if pending is not None:
        _count(run, loop, pending)
    bar.close()
    return state, interrupted


def evaluate(run: LoopRun, state: bnjax.TrainState,
             split: input_pipeline.Split) -> dict[str, float]:
    """Mean loss and accuracy over every example of ``split`` (moving statistics).

    Every process runs the same padded batches; the sums are global.

    Example:
      >>> # run: the Run of bnjax_train.train.train_and_evaluate
      >>> evaluate(run, state, run.ds.test)  # doctest: +SKIP
      {'loss': 2.30..., 'accuracy': 0.1...}
    """
    sums = np.zeros(3)
    for batch in input_pipeline.eval_batches(
            run.ds, split, batch_size=run.config.eval_batch_size,
            num_local_devices=jax.local_device_count(), process_count=run.process_count):
        m = run.first(run.eval_step(state, run.feed(batch)))
        sums += [float(m["loss_sum"]), float(m["correct"]), float(m["count"])]
    count = max(sums[2], 1.0)
    return {"loss": sums[0] / count, "accuracy": sums[1] / count}


def end_epoch(run: LoopRun, state: bnjax.TrainState, loop: LoopState,
               records: list[dict[str, Any]]) -> None:
    """Evaluates, writes the epoch's metrics line, moves to the next epoch and checkpoints.

    The line holds the epoch's train means over the steps that ran (None if every step was
    skipped as non-finite), how many were skipped, and the loss and accuracy of each split.

    Example:
      >>> # run: the Run of bnjax_train.train.train_and_evaluate
      >>> end_epoch(run, state, loop, records)  # doctest: +SKIP
    """
    ds = run.ds
    record: dict[str, Any] = {
        "epoch": loop.epoch + 1, "step": loop.step, **loop.epoch_means(),
        "skipped_steps": int(loop.epoch_sums[2]), "total_skipped_steps": loop.total_skipped,
    }
    splits = [("test", ds.test)] + ([("val", ds.validation)] if ds.validation else [])
    for split_name, split in splits:
        for key, value in evaluate(run, state, split).items():
            record[f"{split_name}_{key}"] = value
    record["elapsed_s"] = round(loop.elapsed(), 3)
    records.append(record)
    if run.is_main:
        run_files.append_metrics(run.metrics_path, record)
        print(reporting.epoch_line(record, run.config.num_epochs, [s for s, _ in splits]),
              flush=True)
        # With each epoch's checkpoint: an interrupted run has its curves too.
        reporting.plot_curves(records, os.path.join(run.workdir, "curves.png"),
                              reporting.run_title(run.config))
    loop.next_epoch()
    run.save(state, loop)
