"""One process of the 2-process test in tests/test_multihost.py.

Usage: python multihost_worker.py PROCESS_ID PORT OUT_DIR.

Joins a 2-process JAX job on 127.0.0.1 (CPU, gloo collectives, 2 CPU devices per process set
by the parent through XLA_FLAGS) and, in each mode (pmap; jax.jit over a mesh of all 4
devices; the same mesh under jax.shard_map), feeds its own half of a fixed global batch to the
data-parallel train step and eval step; writes the outcomes to OUT/result_ID.npz, each key
prefixed with its mode ("mesh:metrics", ...). Every mode starts from the variables the parent
wrote to OUT/init.npz (``save_variables``), the ones its reference starts from.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

NUM_PROCESSES = 2
STEPS = 2
GLOBAL_BATCH = 16
LAYERS = 2
LR = 0.1
MODES = ("pmap", "mesh", "shard_map")


def save_variables(variables: dict, out: str) -> None:
    """Writes the initial ``{"params", "batch_stats"}`` for the workers to OUT/init.npz."""
    from flax import traverse_util

    np.savez(os.path.join(out, "init.npz"), **traverse_util.flatten_dict(variables, sep="/"))


def load_variables(out: str) -> dict:
    """The variables ``save_variables`` wrote, as nested dicts of NumPy arrays."""
    from flax import traverse_util

    with np.load(os.path.join(out, "init.npz")) as f:
        return traverse_util.unflatten_dict({k: f[k] for k in f.files}, sep="/")


def _run_mode(mode: str, process_id: int, v: dict) -> dict:
    """STEPS train steps and one eval step in ``mode``; this process's results, on the host."""
    import jax
    import optax
    from bn_reference import SyncMLP, make_data

    from bnjax.parallel import (
        fetch_replicated,
        host_first_replica,
        put_batch,
        put_replicated,
        replicate,
    )
    from bnjax.steps import TrainState, make_eval_step, make_train_step

    n_local = jax.local_device_count()
    per_process = GLOBAL_BATCH // NUM_PROCESSES
    lo, hi = process_id * per_process, (process_id + 1) * per_process
    # The mesh spans every process's devices; pmap maps each process's own.
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    kwargs = {"pmap": {"data_parallel": True}, "mesh": {"mesh": mesh},
              "shard_map": {"mesh": mesh, "shard_map": True}}[mode]
    model = SyncMLP(layers=LAYERS, axis_name={"pmap": "batch", "shard_map": "data"}.get(mode))
    state = TrainState.create(apply_fn=model.apply, params=v["params"],
                              batch_stats=v["batch_stats"], tx=optax.sgd(LR))
    if mode == "pmap":
        state = replicate(state)
        place = lambda b: {k: a.reshape((n_local, -1) + a.shape[1:]) for k, a in b.items()}  # noqa: E731
        fetch = host_first_replica
    else:
        state = put_replicated(state, mesh)
        place = lambda b: put_batch(b, mesh)  # noqa: E731
        fetch = fetch_replicated
    train_step, eval_step = make_train_step(**kwargs), make_eval_step(**kwargs)
    metrics = []
    for step in range(STEPS):
        x, y = make_data(GLOBAL_BATCH, seed=step)
        mask = np.arange(GLOBAL_BATCH) % 5 != 1  # some examples excluded from the loss
        state, m = train_step(state, place({"x": x[lo:hi], "y": y[lo:hi], "mask": mask[lo:hi]}))
        m = fetch(m)
        metrics.append([float(m[k]) for k in ("loss", "accuracy", "skipped")])
    x, y = make_data(GLOBAL_BATCH, seed=99)
    ev = fetch(eval_step(state, place({"x": x[lo:hi], "y": y[lo:hi]})))
    # Every local device holds the same replica.
    for a in jax.tree.leaves(state):
        shards = [np.asarray(s.data) for s in a.addressable_shards]
        assert all(np.array_equal(shards[0], s) for s in shards[1:])
    local = fetch({"params": state.params, "batch_stats": state.batch_stats})
    out = {f"{mode}:{jax.tree_util.keystr(k)}": np.asarray(a)
           for k, a in jax.tree_util.tree_leaves_with_path(local)}
    out[f"{mode}:metrics"] = np.array(metrics)
    out[f"{mode}:eval"] = np.array([float(ev["loss_sum"]), float(ev["correct"]),
                                    float(ev["count"])])
    return out


def main() -> None:
    process_id, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    from bnjax.parallel import initialize_distributed

    initialize_distributed(f"127.0.0.1:{port}", NUM_PROCESSES, process_id,
                           initialization_timeout=30)
    import jax

    assert jax.process_count() == NUM_PROCESSES and jax.local_device_count() == 2, (
        jax.process_count(), jax.local_device_count())
    variables = load_variables(out)
    results = {}
    for mode in MODES:
        results.update(_run_mode(mode, process_id, variables))
    np.savez(os.path.join(out, f"result_{process_id}.npz"), **results)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
