"""The training loop: ``create_train_state``, ``train_epoch``, ``evaluate``, ``train_and_evaluate``.

:func:`train_and_evaluate` (what ``train.py`` runs) uses every device: data parallel with
synchronized batch norm when there is more than one, on a device mesh or under ``pmap`` as
``config.parallel`` says (:mod:`bnjax_train.parallelism`), each process of a multi-host job
reading its own shard of the data. It evaluates with the moving statistics after each epoch,
checkpoints (:mod:`bnjax_train.checkpointing`) and resumes exactly where an interrupted run
stopped.

Around the loop: one run per workdir (an OS lock, :mod:`bnjax_train.workdir`); SIGINT and
SIGTERM finish the current step, save and return (:mod:`bnjax_train.stopping`); a resume skips
damaged checkpoints and may change the fields that leave the arrays' shapes alone
(:mod:`bnjax_train.resume`); a run that fails during start-up leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import bnjax
from bnjax_train import checkpointing, input_pipeline, parallelism, reporting, resume, run_files
from bnjax_train import models as models_lib
from bnjax_train.config_lib import check_model_builds, config_dict, resolved_norm, validate_config
from bnjax_train.epochs import end_epoch, evaluate, train_epoch
from bnjax_train.loop_state import (
    BLOW_UP_FACTOR,
    LoopState,
    NonFiniteTrainingError,
    check_not_blown_up,
    param_norm,
)
from bnjax_train.optimizers import make_optimizer
from bnjax_train.stopping import StopSignals
from bnjax_train.workdir import (
    Claim,
    DiskFullError,
    claim_workdir,
    disk_full_error,
    is_disk_full,
)

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
    stop: StopSignals | None = None
    initial_param_norm: float = 0.0

    def stopping(self) -> bool:
        """Whether a SIGINT/SIGTERM asks the run to stop (agreed by every process)."""
        return self.stop is not None and self.stop.agreed(self.process_count)

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
        """Checkpoints ``state`` and ``loop`` at ``loop.step``, unless the parameters blew up.

        Raises:
          ParametersBlewUpError: their norm is far past the initial one (nothing is saved,
            so the newest checkpoint is one a resume with a lower learning rate can use).
        """
        tree = self.placement.checkpoint_tree(state, self.rng_data)
        check_not_blown_up(param_norm(tree["params"]), self.initial_param_norm,
                           step=loop.step, latest_step=self.checkpoints.latest_step(),
                           workdir=self.workdir,
                           factor=self.config.get("max_param_growth", BLOW_UP_FACTOR))
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
    check_model_builds(config, ds.normalize(ds.train.x[:1]), ds.num_classes,
                       config.batch_size // jax.device_count())
    model = models_lib.create_model(
        config.model, num_classes=ds.num_classes, norm=resolved_norm(config),
        axis_name=placement.model_axis_name, **dict(config.model_kwargs))
    state, rng_data = create_train_state(config, model, ds.normalize(ds.train.x[:1]), spe)
    run = Run(config=config, workdir=workdir, ds=ds, model=model, steps_per_epoch=spe,
              train_step=placement.train_step(), eval_step=placement.eval_step(),
              checkpoints=checkpointing.Checkpoints(workdir,
                                                    max_to_keep=config.keep_checkpoints),
              rng_data=rng_data, placement=placement, process_index=process_index,
              process_count=process_count,
              initial_param_norm=param_norm(jax.device_get(state.params)))
    return run, state


def _resume(run: Run, state: bnjax.TrainState) -> tuple[bnjax.TrainState, resume.ResumePoint]:
    """Restores the workdir's newest intact checkpoint, if any (see :mod:`bnjax_train.resume`)."""
    point = resume.find_resume_point(
        run.checkpoints,
        run.placement.restore_target(checkpointing.state_tree(state, run.rng_data)),
        steps_per_epoch=run.steps_per_epoch, num_epochs=run.config.num_epochs,
        metrics_path=run.metrics_path)
    if point.restored is not None:
        tree = point.restored.tree
        state = state.replace(step=jnp.asarray(tree["step"]), params=tree["params"],
                              batch_stats=tree["batch_stats"], opt_state=tree["opt_state"])
        run.rng_data = np.asarray(tree["rng"])
    return state, point


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
    ``workdir``: ``config.json`` (the resolved config), ``metrics.jsonl`` (one strict JSON line
    per epoch), ``checkpoints/<step>/`` (orbax: params, batch_stats, optimizer state, step, RNG
    and the data position; each epoch, every ``checkpoint_every_steps`` and at the end; the
    last ``keep_checkpoints``) and ``curves.png``. Running it again on the same ``workdir``
    continues from the newest intact checkpoint and ends with the same metrics as an
    uninterrupted run; on a finished run it prints the result and writes nothing (with
    ``precise_bn_batches`` or ``export_folded`` set it applies them to the final checkpoint,
    which stays as it is). The workdir
    is locked for the run and checked before anything is computed; a run that fails during
    start-up leaves nothing behind; SIGINT or SIGTERM finishes the step, saves and returns.

    Args:
      config: the training config (see ``configs/default.py``); checked by
        :func:`bnjax_train.config_lib.validate_config` before anything else runs.
      workdir: output folder (created if needed).

    Returns:
      The last metrics line (``epoch``, ``step``, ``train_*``, ``test_*``, ...) plus
      ``"interrupted": True`` when ``stop_after_steps`` or a signal stopped the run early
      (and ``"signal": "SIGINT"`` or ``"SIGTERM"``).

    Raises:
      ValueError: a bad config field (named in the message), a ``workdir`` holding a run
        with another config, a workdir that cannot be used or is in use
        (:class:`bnjax_train.workdir.WorkdirError`), checkpoints none of which is intact
        (:class:`bnjax_train.checkpointing.NoIntactCheckpointError`).
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
    index = jax.process_index()
    with (StopSignals() as stop,
          claim_workdir(workdir, process_index=index, is_main=index == 0) as claim):
        changes = resume.check_config(workdir, config_dict(config), read_only=claim.read_only)
        run, state = _setup(config, workdir)
        run.stop = stop
        try:
            return _run(run, state, claim, changes, t_start)
        except Exception as e:
            if not (isinstance(e, DiskFullError) or is_disk_full(e)):
                raise
            if run.is_main:  # what a resume would drop: the lines past the last checkpoint
                run_files.drop_lines_after(run.metrics_path, run.checkpoints.newest_on_disk())
            if isinstance(e, DiskFullError):  # a checkpoint's (named by Checkpoints.save)
                raise
            raise disk_full_error(workdir, run.checkpoints.checkpoint_bytes() + 2**20) from None
        finally:
            run.checkpoints.close()


def _run(run: Run, state: bnjax.TrainState, claim: Claim, changes: dict[str, list[Any]],
         t_start: float) -> dict[str, Any]:
    """Resumes (or shows a finished run), trains to the end or to a stop, reports."""
    config = run.config
    state, point = _resume(run, state)
    loop, records = point.loop, point.records
    if point.finished or claim.read_only:
        # A finished run trains nothing; the inference tools the config asks for run on its
        # final checkpoint (which they do not change). A read-only workdir writes nothing.
        applying = "" if claim.read_only else _tools_named(config)
        result = resume.report_finished(point, run.workdir, is_main=run.is_main,
                                        read_only=claim.read_only, applying=applying)
        if not applying:
            return result
        claim.start()
        return _inference_tools(run, run.placement.put_state(state), result)
    if run.stopping():  # a signal during start-up: nothing trained yet
        run.checkpoints.close()
        claim.discard_new()
        return _interrupted(run, loop, {"step": loop.step}, saved=point.restored is not None)
    resume.commit(point, checkpoints=run.checkpoints, workdir=run.workdir,
                  config=config_dict(config), changes=changes, num_epochs=config.num_epochs,
                  steps_per_epoch=run.steps_per_epoch, is_main=run.is_main,
                  process_count=run.process_count)
    claim.start()
    state = run.placement.put_state(state)
    if run.is_main:
        _announce(run)
    interrupted = False
    while loop.epoch < config.num_epochs and not interrupted:
        interrupted = run.stopping()
        if interrupted:
            break
        state, interrupted = train_epoch(run, state, loop)
        if interrupted:
            break
        end_epoch(run, state, loop, records)
        if config.stop_after_steps and loop.step >= config.stop_after_steps:
            interrupted = loop.epoch < config.num_epochs
            break
    saved = run.checkpoints.latest_step() == loop.step
    run.checkpoints.close()
    result: dict[str, Any] = dict(records[-1]) if records else {"step": loop.step}
    if interrupted:
        return _interrupted(run, loop, result, saved=saved)
    if run.is_main and records:  # curves.png is drawn at each epoch's end (end_epoch)
        print(reporting.final_line(result, time.time() - t_start, run.workdir), flush=True)
    return _inference_tools(run, state, result)


def _interrupted(run: Run, loop: LoopState, result: dict[str, Any],
                 saved: bool) -> dict[str, Any]:
    """The result of a run stopped early (``stop_after_steps`` or a signal), reported."""
    signal_name = run.stop.name if run.stop is not None else None
    result.update(interrupted=True, **({"signal": signal_name} if signal_name else {}))
    if run.is_main:
        print(reporting.stopped_line(loop.step, signal_name, saved), flush=True)
    return result


def _tools_named(config: Any) -> str:
    """The inference tools ``config`` asks for, named for the finished-run line ("" if none)."""
    names = (["PreciseBN"] if config.get("precise_bn_batches", 0) else []) + (
        ["the folded export"] if config.get("export_folded", False) else [])
    return " and ".join(names)


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
