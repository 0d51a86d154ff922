"""The training loop: ``create_train_state``, ``train_epoch``, ``evaluate``, ``train_and_evaluate``.

:func:`train_and_evaluate` (what ``train.py`` runs) uses every device: data parallel with
synchronized batch norm when there is more than one, on a device mesh or under ``pmap`` as
``config.parallel`` says (:mod:`bnjax_train.parallelism`), each process of a multi-host job
reading its own shard of the data. It evaluates with the moving statistics after each epoch,
checkpoints (:mod:`bnjax_train.checkpointing`) and resumes exactly where an interrupted run
stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import bnjax
from bnjax_train import checkpointing, input_pipeline, parallelism, reporting
from bnjax_train import models as models_lib
from bnjax_train.config_lib import config_dict, resolved_norm, validate_config
from bnjax_train.loop_state import LoopState, NonFiniteTrainingError
from bnjax_train.optimizers import make_optimizer

__all__ = [
    "NonFiniteTrainingError",
    "Run",
    "create_train_state",
    "evaluate",
    "train_and_evaluate",
    "train_epoch",
]


def create_train_state(config: Any, model: nn.Module, x0: Any,
                       steps_per_epoch: int) -> tuple[bnjax.TrainState, np.ndarray]:
    """The initial train state and the run's PRNG key data (saved in every checkpoint).

    Args:
      config: the training config (``seed`` and the optimizer fields are read).
      model: the flax module, called as ``model.init(key, x, training=False)``.
      x0: one normalized input batch, for the shapes.
      steps_per_epoch: train steps per epoch (for the learning-rate schedule).

    Example:
      >>> import numpy as np
      >>> from bnjax_train.config_lib import load_config
      >>> from bnjax_train.models import create_model
      >>> model = create_model("mlp", num_classes=3, hidden=(4,))
      >>> state, rng = create_train_state(load_config("tiny"), model, np.ones((1, 5)), 4)
      >>> int(state.step), sorted(state.batch_stats)
      (0, ['BatchNorm_0'])
    """
    init_rng, rng = jax.random.split(jax.random.key(config.seed))
    variables = jax.jit(lambda k, x: model.init(k, x, training=False))(init_rng, x0)
    state = bnjax.TrainState.create(
        apply_fn=model.apply, params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=make_optimizer(config, steps_per_epoch))
    return state, np.asarray(jax.random.key_data(rng))


@dataclasses.dataclass
class Run:
    """What stays fixed during a run: config, data, model, compiled steps, workdir, checkpoints.

    ``rng_data`` is the run's PRNG key data, taken from the checkpoint when the run resumes.
    """

    config: Any
    workdir: str
    ds: input_pipeline.Dataset
    model: nn.Module
    steps_per_epoch: int
    train_step: Callable[..., Any]
    eval_step: Callable[..., Any]
    checkpoints: checkpointing.Checkpoints
    rng_data: np.ndarray
    placement: parallelism.Placement = parallelism.Placement()
    process_index: int = 0
    process_count: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes the text files and prints (process 0)."""
        return self.process_index == 0

    @property
    def data_parallel(self) -> bool:
        """Whether the steps use several devices."""
        return self.placement.data_parallel

    @property
    def metrics_path(self) -> str:
        """``<workdir>/metrics.jsonl``."""
        return os.path.join(self.workdir, "metrics.jsonl")

    def feed(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A batch split as ``(local devices, per device, ...)`` as the step wants it."""
        return self.placement.feed(batch)

    def first(self, tree: Any) -> Any:
        """A step's output on the host (one copy when data parallel)."""
        return self.placement.fetch(tree)

    def save(self, state: bnjax.TrainState, loop: LoopState) -> None:
        """Checkpoints ``state`` and ``loop`` at ``loop.step``."""
        tree = self.placement.checkpoint_tree(state, self.rng_data)
        self.checkpoints.save(loop.step, tree, loop.meta())


def _load_data(config: Any, process_index: int, process_count: int) -> input_pipeline.Dataset:
    ds = input_pipeline.load_dataset(
        config.dataset, data_dir=config.data_dir, validation_split=config.validation_split,
        process_index=process_index, process_count=process_count)
    if config.max_train_examples:
        limit = min(config.max_train_examples, ds.train.total)
        keep = len(range(process_index, limit, process_count))
        ds = dataclasses.replace(ds, train=input_pipeline.Split(
            x=ds.train.x[:keep], y=ds.train.y[:keep], total=limit))
    return ds


def _setup(config: Any, workdir: str) -> tuple[Run, bnjax.TrainState]:
    """Data, model, initial state, compiled steps and checkpoint manager of a run."""
    process_index, process_count = jax.process_index(), jax.process_count()
    placement = parallelism.Placement.from_config(config)
    ds = _load_data(config, process_index, process_count)
    spe = input_pipeline.steps_per_epoch(ds, config.batch_size, process_count)
    if spe < 1:
        raise ValueError(
            f"config.batch_size={config.batch_size}: larger than the {ds.train.total} training "
            f"examples of {config.dataset!r}; use a batch size <= {ds.train.total}.")
    model = models_lib.create_model(
        config.model, num_classes=ds.num_classes, norm=resolved_norm(config),
        axis_name=placement.model_axis_name, **dict(config.model_kwargs))
    state, rng_data = create_train_state(config, model, ds.normalize(ds.train.x[:1]), spe)
    run = Run(config=config, workdir=workdir, ds=ds, model=model, steps_per_epoch=spe,
              train_step=placement.train_step(), eval_step=placement.eval_step(),
              checkpoints=checkpointing.Checkpoints(workdir,
                                                    max_to_keep=config.keep_checkpoints),
              rng_data=rng_data, placement=placement, process_index=process_index,
              process_count=process_count)
    return run, state


def _resume(run: Run, state: bnjax.TrainState) -> tuple[bnjax.TrainState, LoopState, list]:
    """Restores the workdir's newest checkpoint, if any; rewrites its text files to match."""
    cfg = config_dict(run.config)
    loop, latest = LoopState(), run.checkpoints.latest_step()
    if latest is not None:
        checkpointing.check_same_config(run.workdir, cfg)
        latest, tree, meta = run.checkpoints.restore_latest(
            run.placement.restore_target(checkpointing.state_tree(state, run.rng_data)))
        where = os.path.join(run.checkpoints.directory, str(latest))
        checkpointing.check_meta(meta, where)
        state = state.replace(step=jnp.asarray(tree["step"]), params=tree["params"],
                              batch_stats=tree["batch_stats"], opt_state=tree["opt_state"])
        run.rng_data = np.asarray(tree["rng"])
        loop = LoopState.from_meta(latest, meta)
        if run.is_main:
            print(f"Resuming from {where} (step {latest}, epoch {loop.epoch + 1}, batch "
                  f"{loop.batch_in_epoch})", flush=True)
    # Lines past the checkpoint come from a run killed after writing them: it redoes them.
    records = [r for r in checkpointing.read_metrics(run.metrics_path)
               if latest is not None and r.get("step", 0) <= latest]
    if run.is_main:
        checkpointing.write_atomic(os.path.join(run.workdir, "config.json"),
                                   json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        checkpointing.write_metrics(run.metrics_path, records)
    return state, loop, records


def _count(run: Run, loop: LoopState, pending: tuple[Any, int]) -> None:
    metrics, step = pending
    loop.count(run.first(metrics), step=step,
               max_consecutive_skips=run.config.max_consecutive_skips, workdir=run.workdir)


def train_epoch(run: Run, state: bnjax.TrainState,
                loop: LoopState) -> tuple[bnjax.TrainState, bool]:
    """Runs the rest of epoch ``loop.epoch`` from ``loop.batch_in_epoch``.

    Saves a checkpoint every ``config.checkpoint_every_steps`` steps and stops early (saving
    one) at ``config.stop_after_steps``. Each step's metrics are read one step late, so the host
    never waits for the device between steps.

    Returns:
      The new state and whether ``stop_after_steps`` interrupted the epoch.

    Example:
      >>> run, state = _setup(config, "runs/example")  # doctest: +SKIP
      >>> state, interrupted = train_epoch(run, state, LoopState())  # doctest: +SKIP
    """
    from tqdm import tqdm

    config = run.config
    bar = tqdm(total=run.steps_per_epoch, initial=loop.batch_in_epoch,
               desc=f"epoch {loop.epoch + 1}/{config.num_epochs}",
               disable=not (config.progress_bar and run.is_main), leave=False, unit="step",
               dynamic_ncols=True)
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
        stop = bool(config.stop_after_steps) and loop.step >= config.stop_after_steps
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


def evaluate(run: Run, state: bnjax.TrainState,
             split: input_pipeline.Split) -> dict[str, float]:
    """Mean loss and accuracy over every example of ``split`` (moving statistics).

    Every process runs the same padded batches; the sums are global.

    Example:
      >>> run, state = _setup(config, "runs/example")  # doctest: +SKIP
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


def _end_epoch(run: Run, state: bnjax.TrainState, loop: LoopState,
               records: list[dict[str, Any]]) -> None:
    """Evaluates, writes the epoch's metrics line, moves to the next epoch and checkpoints."""
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
        checkpointing.append_metrics(run.metrics_path, record)
        print(reporting.epoch_line(record, run.config.num_epochs, [s for s, _ in splits]),
              flush=True)
    loop.next_epoch()
    run.save(state, loop)


def _announce(run: Run) -> None:
    config, ds = run.config, run.ds
    how = ""
    if run.data_parallel:
        how = (f" (data parallel: {run.placement.mode}, synchronized BN)"
               if resolved_norm(config) == "batch" else f" (data parallel: {run.placement.mode})")
    print(f"Training {config.model} (norm={resolved_norm(config)}) on {config.dataset}: "
          f"{len(ds.train)} train / {len(ds.test)} test examples, "
          f"{config.num_epochs} epochs x {run.steps_per_epoch} steps, batch {config.batch_size} "
          f"on {jax.device_count()} device(s){how}; workdir {run.workdir}", flush=True)


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
    """Trains and evaluates a model as ``config`` says, resuming from ``workdir`` if possible.

    Uses every device (data parallel with synchronized batch norm when there is more than one,
    on a mesh or under ``pmap`` as ``config.parallel`` says), evaluates with the moving
    statistics after each epoch, and writes into
    ``workdir``: ``config.json`` (the resolved config), ``metrics.jsonl`` (one line per epoch),
    ``checkpoints/<step>/`` (orbax: params, batch_stats, optimizer state, step, RNG and the
    data position; each epoch, every ``checkpoint_every_steps`` and at the end) and
    ``curves.png``. Running it again on the same ``workdir`` continues from the last complete
    checkpoint and ends with the same metrics as an uninterrupted run.

    Args:
      config: the training config (see ``configs/default.py``); checked by
        :func:`bnjax_train.config_lib.validate_config` before anything else runs.
      workdir: output folder (created if needed).

    Returns:
      The last metrics line (``epoch``, ``step``, ``train_*``, ``test_*``, ...) plus
      ``"interrupted": True`` when ``stop_after_steps`` stopped the run early.

    Raises:
      ValueError: a bad config field (named in the message), or a ``workdir`` holding a run
        with another config.
      bnjax_train.input_pipeline.DatasetNotFoundError: the dataset is not on disk.
      NonFiniteTrainingError: ``max_consecutive_skips`` steps in a row were not finite.

    Example:
      >>> from bnjax_train.config_lib import load_config
      >>> config = load_config("tiny")
      >>> config.update(num_epochs=1, max_train_examples=200, batch_size=40)
      >>> result = train_and_evaluate(config, "runs/example")  # doctest: +SKIP
    """
    t_start = time.time()
    validate_config(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    run, state = _setup(config, workdir)
    state, loop, records = _resume(run, state)
    state = run.placement.put_state(state)
    if run.is_main:
        _announce(run)
    interrupted = False
    while loop.epoch < config.num_epochs and not interrupted:
        state, interrupted = train_epoch(run, state, loop)
        if interrupted:
            break
        _end_epoch(run, state, loop, records)
        if config.stop_after_steps and loop.step >= config.stop_after_steps:
            interrupted = loop.epoch < config.num_epochs
            break
    run.checkpoints.close()
    result: dict[str, Any] = dict(records[-1]) if records else {"step": loop.step}
    if interrupted:
        result["interrupted"] = True
        if run.is_main:
            print(f"Stopped after step {loop.step} (config.stop_after_steps); run the same "
                  "command again to resume.", flush=True)
        return result
    if run.is_main and records:
        reporting.plot_curves(records, os.path.join(workdir, "curves.png"),
                              f"{config.model} (norm={resolved_norm(config)}) on "
                              f"{config.dataset}")
        print(f"Final test accuracy: {result['test_accuracy']:.4f} (test loss "
              f"{result['test_loss']:.4f}) after {result['step']} steps; "
              f"{time.time() - t_start:.1f} s in this process; outputs in {workdir}",
              flush=True)
    return _inference_tools(run, state, result)


def _inference_tools(run: Run, state: bnjax.TrainState, result: dict[str, Any]) -> dict:
    """PreciseBN and the folded export on the final model, as the config asks (bnjax tools)."""
    config = run.config
    precise, export = config.get("precise_bn_batches", 0), config.get("export_folded", False)
    if not (precise or export):
        return result
    host = run.placement.fetch(state)
    variables = {"params": host.params, "batch_stats": host.batch_stats}
    if precise and host.batch_stats and run.process_count == 1:
        batches = (b["x"].reshape((-1,) + b["x"].shape[2:]) for b in input_pipeline.train_batches(
            run.ds, batch_size=config.batch_size, seed=config.seed, epoch=config.num_epochs,
            num_local_devices=jax.local_device_count()))
        variables = bnjax.precise_batch_stats(run.model, variables, batches, precise)
        bs = variables["batch_stats"]
        state = state.replace(batch_stats=run.placement.put_state(bs))
        result.update({f"test_{k}_precise_bn": v
                       for k, v in evaluate(run, state, run.ds.test).items()})
        print(f"PreciseBN ({precise} batches): test accuracy "
              f"{result['test_accuracy_precise_bn']:.4f} (moving averages: "
              f"{result['test_accuracy']:.4f})", flush=True)
    elif precise and host.batch_stats:
        print("config.precise_bn_batches: skipped (several processes)", flush=True)
    if export and run.is_main:
        report = bnjax.export_folded_model(run.model, variables,
                                           run.ds.normalize(run.ds.test.x[:8]),
                                           os.path.join(run.workdir, "folded"))
        result["folded_export"] = report["path"]
        print(f"Exported the folded model ({len(report['folded'])} batch norms folded, "
              f"{len(report['kept'])} kept) to {report['path']}", flush=True)
    return result
