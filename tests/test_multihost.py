"""Two processes on 127.0.0.1 (CPU, gloo, 2 devices each) run the data-parallel train step.

Each process feeds its own half of the global batch; both must end with the state a
single-process float64 reference (flax.linen.BatchNorm, hand-written loss and SGD) reaches on
the whole batch. The children are bounded in time and always killed.
"""

import os
import sys
from pathlib import Path

import jax
import multihost_worker as worker
import numpy as np
import pytest
from bn_reference import init_variables, make_data, ref_train_step
from processes import free_port, run_processes

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 90


def _run_workers(out: Path) -> list[str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    port = free_port()
    commands = [([sys.executable, str(HERE / "multihost_worker.py"), str(pid), str(port),
                  str(out)], env) for pid in range(worker.NUM_PROCESSES)]
    codes, texts = run_processes(commands, out, TIMEOUT_S)
    if any(c != 0 for c in codes):
        pytest.fail(f"workers exited with {codes} (timeout {TIMEOUT_S}s):\n" +
                    "\n----\n".join(t[-3000:] for t in texts))
    return texts


def test_two_processes_match_single_process_reference(tmp_path):
    _run_workers(tmp_path)
    results = [np.load(tmp_path / f"result_{p}.npz") for p in range(worker.NUM_PROCESSES)]

    variables = init_variables(layers=worker.LAYERS)
    ref_metrics = []
    for step in range(worker.STEPS):
        x, y = make_data(worker.GLOBAL_BATCH, seed=step)
        mask = np.arange(worker.GLOBAL_BATCH) % 5 != 1
        variables, loss, acc = ref_train_step(variables, {"x": x, "y": y, "mask": mask},
                                              layers=worker.LAYERS, lr=worker.LR)
        ref_metrics.append([loss, acc, 0.0])

    # Eval of the final state on new data: inference-mode BN with the moving statistics.
    x, y = make_data(worker.GLOBAL_BATCH, seed=99)
    logits = _ref_logits(variables, x)
    top = logits.max(1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
    ref_eval = [-logp[np.arange(len(y)), y].sum(), float((logits.argmax(1) == y).sum()),
                float(len(y))]

    flat = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
        flat[jax.tree_util.keystr(path)] = leaf
    for res in results:
        np.testing.assert_allclose(res["metrics"], np.array(ref_metrics), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(res["eval"], np.array(ref_eval), rtol=1e-5)
        for key, ref in flat.items():
            got = res[key][0]
            err = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
            assert err < 1e-5, (key, err)


def _ref_logits(variables, x):
    """Float64 NumPy inference of RefMLP: Dense -> BN (moving stats) -> relu, then Dense."""
    p, s = variables["params"], variables["batch_stats"]
    h = np.asarray(x, np.float64)
    for i in range(worker.LAYERS):
        h = h @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
        bn, st = p[f"BatchNorm_{i}"], s[f"BatchNorm_{i}"]
        h = (h - st["mean"]) / np.sqrt(st["var"] + 1e-3) * bn["scale"] + bn["bias"]
        h = np.maximum(h, 0)
    last = p[f"Dense_{worker.LAYERS}"]
    return h @ last["kernel"] + last["bias"]
