"""Where the training loop is, and what the current epoch has summed: saved with each checkpoint.

:class:`LoopState` counts the steps, the epoch and the batch in it (so a resumed run continues
with the very next batch), the running loss and accuracy sums of the epoch, and the non-finite
steps the train step skipped; too many skipped in a row stop the run with
:class:`NonFiniteTrainingError`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

__all__ = ["BLOW_UP_FACTOR", "LoopState", "NonFiniteTrainingError", "ParametersBlewUpError",
           "check_not_blown_up", "param_norm"]


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive train steps had a non-finite loss or gradient."""


class ParametersBlewUpError(NonFiniteTrainingError):
    """The parameters grew far past where they started; they were not checkpointed."""


#: The default ``config.max_param_growth``: a checkpoint is refused when the parameters' norm
#: is over this many times the initial one (or not finite): resuming from it could only fail
#: again, whatever the learning rate.
BLOW_UP_FACTOR = 1e3


def param_norm(params: Any) -> float:
    """The global L2 norm of a tree of host arrays, in float64.

    Example:
      >>> import numpy as np
      >>> param_norm({"w": np.array([3.0, 0.0]), "b": np.array([4.0])})
      5.0
    """
    leaves = [np.asarray(a, np.float64) for a in jax.tree.leaves(params)]
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.sqrt(sum(float(np.sum(a * a)) for a in leaves)))


def check_not_blown_up(norm: float, initial: float, *, step: int, latest_step: int | None,
                       workdir: str, factor: float = BLOW_UP_FACTOR) -> None:
    """Refuses to checkpoint parameters whose norm left ``factor`` times the initial one.

    Args:
      norm: the parameters' norm at ``step`` (:func:`param_norm`).
      initial: their norm at initialization (the same seed gives it on every resume).
      factor: ``config.max_param_growth``; 0 checks nothing.
      step: the step about to be checkpointed.
      latest_step: the newest checkpoint already saved (None if none).
      workdir: the run's folder (for the message).

    Raises:
      ParametersBlewUpError: saying which checkpoint to resume from, or to start over.

    Example:
      >>> check_not_blown_up(3e4, 7.5, step=8, latest_step=6, workdir="runs/x")
      Traceback (most recent call last):
      ...
      bnjax_train.loop_state.ParametersBlewUpError: the parameters blew up: their norm ...
    """
    if not factor or norm <= factor * max(initial, 1.0):  # False for a NaN norm
        return
    if latest_step is None:
        then = (f"No checkpoint predates it: start over with a lower learning rate "
                f"(--config.learning_rate=...) after deleting or moving {workdir}, or in a "
                "new --workdir.")
    else:
        then = (f"Checkpoint {latest_step}, the newest, predates it: run the same command "
                "with a lower learning rate (--config.learning_rate=...) to resume from it.")
    raise ParametersBlewUpError(
        f"the parameters blew up: their norm is {norm:.3g} at step {step}, over "
        f"{factor:g} times the {initial:.3g} they started from (config.max_param_growth); "
        "stopping without "
        f"saving them (a resume from them would fail the same way). {then}")


def _zero_sums() -> list[float]:
    return [0.0, 0.0, 0.0, 0]


@dataclasses.dataclass
class LoopState:
    """The loop's position and the running sums of the current epoch.

    Attributes:
      step: train steps taken (batches consumed), skipped ones included.
      epoch: the current epoch (0-based).
      batch_in_epoch: the first batch of the epoch still to run (to resume mid-epoch).
      epoch_sums: loss, accuracy, skipped steps and steps of the current epoch so far (loss
        and accuracy over the steps that were not skipped).
      consecutive_skips: non-finite steps in a row up to now.
      total_skipped: non-finite steps of the whole run.
      elapsed_offset: training seconds of earlier processes minus this one's start time:
        ``elapsed_offset + time.time()`` is the run's training time so far.

    Example:
      >>> loop = LoopState()
      >>> loop.count({"loss": 2.0, "accuracy": 0.5, "skipped": 0.0}, step=1,
      ...            max_consecutive_skips=3, workdir="runs/x")
      >>> loop.epoch_means()
      {'train_loss': 2.0, 'train_accuracy': 0.5}
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    epoch_sums: list[float] = dataclasses.field(default_factory=_zero_sums)
    consecutive_skips: int = 0
    total_skipped: int = 0
    elapsed_offset: float = dataclasses.field(default_factory=lambda: -time.time())

    @classmethod
    def from_meta(cls, step: int, meta: Mapping[str, Any]) -> LoopState:
        """The state saved as a checkpoint's ``meta`` (see :meth:`meta`) at ``step``.

        Example:
          >>> LoopState.from_meta(6, LoopState(epoch=1, batch_in_epoch=2).meta()).epoch
          1
        """
        return cls(step=int(step), epoch=int(meta["epoch"]),
                   batch_in_epoch=int(meta["batch_in_epoch"]),
                   epoch_sums=list(meta["epoch_sums"]),
                   consecutive_skips=int(meta["consecutive_skips"]),
                   total_skipped=int(meta["total_skipped"]),
                   elapsed_offset=float(meta["elapsed_s"]) - time.time())

    def elapsed(self) -> float:
        """Training seconds of the run so far, over every process that worked on it."""
        return self.elapsed_offset + time.time()

    def meta(self) -> dict[str, Any]:
        """The JSON a checkpoint saves (the step is the checkpoint's own number).

        Example:
          >>> sorted(LoopState().meta())  # doctest: +NORMALIZE_WHITESPACE
          ['batch_in_epoch', 'consecutive_skips', 'elapsed_s', 'epoch', 'epoch_sums',
           'total_skipped']
        """
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "epoch_sums": list(self.epoch_sums),
                "consecutive_skips": self.consecutive_skips,
                "total_skipped": self.total_skipped, "elapsed_s": self.elapsed()}

    def count(self, metrics: Mapping[str, Any], *, step: int, max_consecutive_skips: int,
              workdir: str) -> None:
        """Adds one step's metrics (on the host) to the sums; counts it if it was skipped.

        Args:
          metrics: ``{"loss", "accuracy", "skipped"}`` of the train step.
          step: that step's number (for the error message).
          max_consecutive_skips: how many skipped steps in a row stop the run.
          workdir: the run's folder (for the error message).

        Raises:
          NonFiniteTrainingError: ``max_consecutive_skips`` steps in a row were skipped.

        Example:
          >>> loop = LoopState()
          >>> loop.count({"loss": float("nan"), "accuracy": 0.0, "skipped": 1.0}, step=1,
          ...            max_consecutive_skips=1, workdir="runs/x")  # doctest: +ELLIPSIS
          Traceback (most recent call last):
          ...
          bnjax_train.loop_state.NonFiniteTrainingError: 1 consecutive training steps ...
        """
        sums = self.epoch_sums
        skipped = float(metrics["skipped"]) > 0
        sums[2] += float(skipped)
        sums[3] += 1
        if skipped:
            self.consecutive_skips += 1
            self.total_skipped += 1
        else:
            self.consecutive_skips = 0
            sums[0] += float(metrics["loss"])
            sums[1] += float(metrics["accuracy"])
        if self.consecutive_skips >= max_consecutive_skips:
            raise NonFiniteTrainingError(
                f"{self.consecutive_skips} consecutive training steps (up to step {step}) had "
                "a non-finite loss or gradient and were skipped (config.max_consecutive_skips="
                f"{max_consecutive_skips}); stopping. The parameters and moving statistics "
                "are unchanged by those steps. The last complete checkpoint in "
                f"{workdir} is intact: run the same command with a lower learning rate "
                "(--config.learning_rate=...) to resume from it, or check the data.")

    def epoch_means(self) -> dict[str, float | None]:
        """Mean training loss and accuracy of the epoch so far, over the steps not skipped.

        None when every step so far was skipped (there is no mean to report).

        Example:
          >>> LoopState(epoch_sums=[0.0, 0.0, 4, 4]).epoch_means()
          {'train_loss': None, 'train_accuracy': None}
        """
        n_ok = self.epoch_sums[3] - self.epoch_sums[2]
        if n_ok <= 0:
            return {"train_loss": None, "train_accuracy": None}
        return {"train_loss": self.epoch_sums[0] / n_ok,
                "train_accuracy": self.epoch_sums[1] / n_ok}

    def next_epoch(self) -> None:
        """Moves to the first batch of the next epoch, with fresh sums."""
        self.epoch += 1
        self.batch_in_epoch = 0
        self.epoch_sums = _zero_sums()
