"""Two processes on 127.0.0.1 (CPU, gloo, 2 devices each) run the data-parallel steps.

Library: in each mode (pmap; jax.jit over a mesh of all 4 devices; the same mesh under
jax.shard_map) each process feeds its own half of the global batch; both must end with the
state a single-process float64 reference (flax.linen.BatchNorm, hand-written loss and SGD)
reaches on the whole batch. Program: train.py on the mesh of both processes, stopped and
resumed (in another mode), ends like an uninterrupted run. The children are bounded in time
and always killed.
"""

import json
import os
import sys
from pathlib import Path

import jax
import multihost_worker as worker
import numpy as np
import pytest
from bn_reference import init_variables, make_data, ref_train_step
from processes import free_port, run_processes, xla_flags

# End-to-end runs of the program: `python -m pytest -m slow` (see pyproject.toml).
pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 90


def _run_workers(out: Path) -> list[str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(2)
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
    variables = init_variables(layers=worker.LAYERS)
    worker.save_variables(variables, str(tmp_path))  # the workers start from these too
    _run_workers(tmp_path)
    results = [np.load(tmp_path / f"result_{p}.npz") for p in range(worker.NUM_PROCESSES)]

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
        for mode in worker.MODES:
            np.testing.assert_allclose(res[f"{mode}:metrics"], np.array(ref_metrics), rtol=1e-5,
                                       atol=1e-6, err_msg=mode)
            np.testing.assert_allclose(res[f"{mode}:eval"], np.array(ref_eval), rtol=1e-5,
                                       err_msg=mode)
            for key, ref in flat.items():
                got = res[f"{mode}:{key}"]
                err = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
                assert err < 1e-5, (mode, key, err)


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


# --------------------------------------------------------------------------------------------
# The program on the mesh of both processes.


def _train_py(workdir: str, data_dir: str, log_dir: Path, *extra: str) -> list[str]:
    """train.py on 2 processes x 2 CPU devices (the documented environment variables)."""
    port = free_port()
    commands = []
    for pid in range(2):
        env = dict(os.environ, XLA_FLAGS=xla_flags(2),
                   JAX_PLATFORMS="cpu", BNJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   BNJAX_NUM_PROCESSES="2", BNJAX_PROCESS_ID=str(pid),
                   PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH",
                                                                                  "")]))
        commands.append(([sys.executable, str(HERE.parent / "train.py"), "--config",
                          str(HERE.parent / "configs" / "tiny.py"), "--workdir", workdir,
                          f"--config.data_dir={data_dir}", *extra], env))
    log_dir.mkdir()
    codes, texts = run_processes(commands, log_dir, 150)
    assert codes == [0, 0], "\n".join(t[-3000:] for t in texts)
    return texts


def _metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"} for line in f]


def _checkpoint_steps(workdir: str) -> list[int]:
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                  if d.isdigit())


def test_train_py_on_a_two_process_mesh_stops_and_resumes_in_another_mode(tmp_path):
    from bnjax_train import input_pipeline

    data_dir = str(tmp_path / "data")
    input_pipeline.load_dataset("mnist1d", data_dir=data_dir)
    resumed, full = str(tmp_path / "resumed"), str(tmp_path / "full")
    first = _train_py(resumed, data_dir, tmp_path / "a", "--config.stop_after_steps=3")
    assert "on 4 device(s) (data parallel: mesh, synchronized BN)" in first[0]
    assert "128 train" in first[0]  # each process reads half
    assert _checkpoint_steps(resumed) == [3]
    second = _train_py(resumed, data_dir, tmp_path / "b", "--config.parallel=pmap")
    assert "Resuming from" in second[0] and "(data parallel: pmap" in second[0]
    assert "Final test accuracy" in second[0]
    assert _checkpoint_steps(resumed) == [4, 8]
    _train_py(full, data_dir, tmp_path / "c", "--config.parallel=shard_map")
    got, want = _metrics(resumed), _metrics(full)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [4, 8]
    for g, w in zip(got, want, strict=True):
        assert set(g) == set(w)
        for key in g:
            np.testing.assert_allclose(g[key], w[key], rtol=1e-4, err_msg=key)
