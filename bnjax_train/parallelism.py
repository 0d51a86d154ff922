"""How the program spreads the train and eval steps over the devices: a mesh, pmap, or one device.

``config.parallel`` chooses, when there is more than one device (every process's together):

- ``"mesh"`` (the default): ``jax.jit`` over a one-axis mesh of every device (axis
  ``"batch"``); the model's batch norms have ``axis_name=None`` and XLA makes their statistics
  those of the global batch.
- ``"shard_map"``: the same mesh, the step under ``jax.shard_map``; the batch norms have
  ``axis_name="batch"`` and synchronize with bnjax's one collective per layer.
- ``"pmap"``: ``jax.pmap`` over each process's devices, batch norms with ``axis_name="batch"``.

On one device all three are the same single-device step. A checkpoint holds the state once,
without any device axis, in every mode, so a run stopped in one mode resumes in another: every
mode saves a host copy; the mesh modes restore it straight onto the mesh (orbax with
shardings), the others to the host, then place it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax
from bnjax import parallel
from bnjax.spmd import automatic_mesh

__all__ = ["AXIS", "MODES", "Placement"]

#: The values of ``config.parallel``.
MODES = ("mesh", "shard_map", "pmap")
#: The name of the data axis (mesh axis, pmap axis, batch norms' ``axis_name``).
AXIS = "batch"


@dataclasses.dataclass(frozen=True)
class Placement:
    """One way to run the steps, with the placement of their inputs and outputs.

    ``mode`` is ``"single"``, ``"mesh"``, ``"shard_map"`` or ``"pmap"``; ``mesh`` is the device
    mesh of the two mesh modes.

    Example:
      >>> p = Placement("single")
      >>> p.model_axis_name is None, p.feed({"x": np.zeros((1, 4, 2))})["x"].shape
      (True, (4, 2))
    """

    mode: str = "single"
    mesh: jax.sharding.Mesh | None = None

    @classmethod
    def from_config(cls, config: Any) -> Placement:
        """``config.parallel`` (default ``"mesh"``) on every device; one device: ``"single"``.

        Example:
          >>> import ml_collections
          >>> Placement.from_config(ml_collections.ConfigDict({"parallel": "pmap"})).mode in (
          ...     "pmap", "single")
          True
        """
        mode = config.get("parallel", "mesh")
        if mode not in MODES:
            raise ValueError(f"config.parallel={mode!r}: must be one of {list(MODES)}")
        if jax.device_count() == 1:
            return cls("single")
        if mode == "pmap":
            return cls("pmap")
        return cls(mode, jax.make_mesh((jax.device_count(),), (AXIS,)))

    @property
    def data_parallel(self) -> bool:
        """Whether the steps use several devices."""
        return self.mode != "single"

    @property
    def model_axis_name(self) -> str | None:
        """The ``axis_name`` the model's batch norms need in this mode."""
        return AXIS if self.mode in ("shard_map", "pmap") else None

    def _step_kwargs(self) -> dict[str, Any]:
        if self.mode == "pmap":
            return {"data_parallel": True}
        if self.mesh is not None:
            return {"mesh": self.mesh, "shard_map": self.mode == "shard_map"}
        return {}

    def train_step(self, constrain_fn: Callable[[Any], Any] | None = None) -> Any:
        """``bnjax.make_train_step`` for this mode."""
        return bnjax.make_train_step(constrain_fn=constrain_fn, **self._step_kwargs())

    def eval_step(self) -> Any:
        """``bnjax.make_eval_step`` for this mode."""
        return bnjax.make_eval_step(**self._step_kwargs())

    def put_state(self, tree: Any) -> Any:
        """A host (or single-device) state, or part of one, placed as the steps want it."""
        if self.mode == "pmap":
            return bnjax.replicate(tree)
        if self.mesh is not None:
            return parallel.put_replicated(tree, self.mesh)
        return tree

    def feed(self, batch: dict[str, np.ndarray]) -> Any:
        """An input-pipeline batch ``(local devices, per device, ...)`` as the step wants it."""
        if self.mode == "pmap":
            return batch
        flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}
        return parallel.put_batch(flat, self.mesh) if self.mesh is not None else flat

    def fetch(self, tree: Any) -> Any:
        """A step's output (metrics, state) on the host, as NumPy, one copy."""
        if self.mode == "pmap":
            return parallel.host_first_replica(tree)
        if self.mesh is not None:
            return parallel.fetch_replicated(tree)
        return jax.device_get(tree)

    def checkpoint_tree(self, state: bnjax.TrainState, rng_data: Any) -> dict[str, Any]:
        """The arrays a checkpoint holds, on the host: step, params, batch_stats, opt_state, rng.

        One copy without any device axis in every mode (host copies: orbax would compile a
        slice per device and array to write replicated global arrays, seconds on 8 CPU
        devices).
        """
        tree = {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
                "opt_state": state.opt_state}
        return {**self.fetch(tree), "rng": np.asarray(rng_data)}

    def restore_target(self, tree: dict[str, Any]) -> dict[str, Any]:
        """What orbax restores a checkpoint like, given its host arrays ``tree``.

        ``tree`` itself, or on a mesh the shapes of its state placed replicated on the mesh
        (orbax restores straight onto the devices; the rng stays on the host).
        """
        if self.mesh is None:
            return tree
        sharding = NamedSharding(automatic_mesh(self.mesh), P())
        state = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(np.shape(a), np.result_type(a), sharding=sharding),
            {k: v for k, v in tree.items() if k != "rng"})
        return {**state, "rng": tree["rng"]}
