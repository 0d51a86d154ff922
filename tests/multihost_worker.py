"""One process of the 2-process test in tests/test_multihost.py.

Usage: python multihost_worker.py PROCESS_ID PORT OUT_DIR.

Joins a 2-process JAX job on 127.0.0.1 (CPU, gloo collectives, 2 CPU devices per process set
by the parent through XLA_FLAGS), feeds its own half of a fixed global batch to the
data-parallel train step and eval step, and writes the outcome to OUT/result_ID.npz.
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


def main() -> None:
    process_id, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    from bnjax.parallel import initialize_distributed

    initialize_distributed(f"127.0.0.1:{port}", NUM_PROCESSES, process_id,
                           initialization_timeout=30)
    import jax
    import optax
    from bn_reference import SyncMLP, init_variables, make_data

    from bnjax.parallel import replicate
    from bnjax.steps import TrainState, make_eval_step, make_train_step

    assert jax.process_count() == NUM_PROCESSES and jax.local_device_count() == 2, (
        jax.process_count(), jax.local_device_count())
    n_local = jax.local_device_count()
    per_process = GLOBAL_BATCH // NUM_PROCESSES
    model = SyncMLP(layers=LAYERS, axis_name="batch")
    v = init_variables(layers=LAYERS)
    state = replicate(TrainState.create(apply_fn=model.apply, params=v["params"],
                                        batch_stats=v["batch_stats"], tx=optax.sgd(LR)))
    train_step = make_train_step(data_parallel=True)
    eval_step = make_eval_step(data_parallel=True)
    metrics = []
    for step in range(STEPS):
        x, y = make_data(GLOBAL_BATCH, seed=step)
        lo, hi = process_id * per_process, (process_id + 1) * per_process
        mask = np.arange(GLOBAL_BATCH) % 5 != 1  # some examples excluded from the loss
        batch = {"x": x[lo:hi], "y": y[lo:hi], "mask": mask[lo:hi]}
        batch = {k: a.reshape((n_local, -1) + a.shape[1:]) for k, a in batch.items()}
        state, m = train_step(state, batch)
        metrics.append([float(np.asarray(m[k].addressable_data(0)).reshape(-1)[0])
                        for k in ("loss", "accuracy", "skipped")])
    x, y = make_data(GLOBAL_BATCH, seed=99)
    lo, hi = process_id * per_process, (process_id + 1) * per_process
    ev = eval_step(state, {"x": x[lo:hi].reshape(n_local, -1, x.shape[1]),
                           "y": y[lo:hi].reshape(n_local, -1)})
    ev = {k: float(np.asarray(a.addressable_data(0)).reshape(-1)[0]) for k, a in ev.items()}
    local = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), state)
    # Every local device holds the same replica.
    for a in jax.tree.leaves(state):
        shards = [np.asarray(s.data) for s in a.addressable_shards]
        assert all(np.array_equal(shards[0], s) for s in shards[1:])
    flat = {jax.tree_util.keystr(k): np.asarray(a) for k, a in
            jax.tree_util.tree_leaves_with_path({"params": local.params,
                                                 "batch_stats": local.batch_stats})}
    np.savez(os.path.join(out, f"result_{process_id}.npz"), metrics=np.array(metrics),
             eval=np.array([ev["loss_sum"], ev["correct"], ev["count"]]), **flat)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
