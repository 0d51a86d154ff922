"""The program's parallel modes (config.parallel) on 8 CPU devices: same numbers as one device.

"mesh" (the default: jax.jit over a device mesh), "shard_map" (the same mesh under
jax.shard_map) and "pmap" give the per-step losses of one device with the same global batch
(within 1e-4 relative over the first 20 steps) and the same final metrics; a checkpoint written
in one mode resumes in another. The mesh run is ``python train.py`` itself (the default mode).
Every compilation of this module, its ``train.py`` children included, goes through one
persistent cache (tests/processes.py): a step compiled for one run is read back by the next.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from processes import xla_flags

from bnjax_train import config_lib, input_pipeline, train
from bnjax_train import models as models_lib
from bnjax_train.parallelism import Placement

# End-to-end runs of the program: `python -m pytest -m slow` (see pyproject.toml).
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ["mesh", "shard_map", "pmap"]
RTOL = 1e-4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The MNIST-1D cache (the same folder as test_train.py's, made once per session)."""
    path = str(tmp_path_factory.getbasetemp() / "bnjax_data")
    input_pipeline.load_dataset("mnist1d", data_dir=path)
    return path


def config_for(name, data_dir, **overrides):
    config = config_lib.load_config(name)
    config.data_dir = data_dir
    config.update(overrides)
    return config


def relative_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-12)))


def per_step_losses(config, placement, steps):
    """The training losses of the program's first ``steps`` steps, run as ``placement`` says
    (the program's data, model, initial state and steps)."""
    ds = input_pipeline.load_dataset(config.dataset, data_dir=config.data_dir)
    if config.max_train_examples:
        n = config.max_train_examples
        ds = dataclasses.replace(ds, train=input_pipeline.Split(x=ds.train.x[:n],
                                                                y=ds.train.y[:n], total=n))
    spe = input_pipeline.steps_per_epoch(ds, config.batch_size)
    model = models_lib.create_model(config.model, num_classes=ds.num_classes,
                                    axis_name=placement.model_axis_name,
                                    **dict(config.model_kwargs))
    state, _ = train.create_train_state(config, model, ds.normalize(ds.train.x[:1]), spe)
    state, step = placement.put_state(state), placement.train_step()
    losses = []
    for epoch in range(-(-steps // spe)):
        for batch in input_pipeline.train_batches(ds, batch_size=config.batch_size,
                                                  seed=config.seed, epoch=epoch,
                                                  num_local_devices=jax.local_device_count()):
            state, m = step(state, placement.feed(batch))
            losses.append(float(placement.fetch(m)["loss"]))
    return np.array(losses[:steps])


@pytest.mark.parametrize("name,overrides", [
    ("tiny", {}),
    # The default batch of 100 does not split over 8 devices: 96 does.
    ("default", {"batch_size": 96}),
])
def test_first_20_steps_have_the_losses_of_one_device(name, overrides, data_dir):
    one = per_step_losses(config_for(name, data_dir, **overrides), Placement("single"), 20)
    assert len(one) == 20 and np.all(np.isfinite(one))
    for mode in MODES:
        config = config_for(name, data_dir, parallel=mode, **overrides)
        placement = Placement.from_config(config)
        assert placement.mode == mode and placement.data_parallel
        got = per_step_losses(config, placement, 20)
        assert relative_error(got, one) <= RTOL, (mode, got, one)


# --------------------------------------------------------------------------------------------
# Whole runs of the tiny config.


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"} for line in f]


def assert_same_metrics(got, want):
    assert [(r["epoch"], r["step"]) for r in got] == [(r["epoch"], r["step"]) for r in want]
    for g, w in zip(got, want, strict=True):
        assert set(g) == set(w)
        for key in g:
            assert relative_error(g[key], w[key]) <= RTOL, (key, g[key], w[key])


def _train_py(workdir, data_dir, devices, *extra):
    env = dict(os.environ, XLA_FLAGS=xla_flags(devices),
               JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config",
           os.path.join(REPO, "configs", "tiny.py"), "--workdir", workdir,
           f"--config.data_dir={data_dir}", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def train_py_on_8_devices(data_dir, tmp_path_factory):
    """``python train.py`` of the tiny config on 8 CPU devices, no mode given: (workdir, stdout)."""
    workdir = str(tmp_path_factory.mktemp("tiny_train_py") / "eight")
    return workdir, _train_py(workdir, data_dir, 8)


@pytest.fixture(scope="module")
def tiny_runs(data_dir, train_py_on_8_devices, tmp_path_factory):
    """The tiny config run to the end in each mode: {mode: workdir}.

    "mesh" is the train.py run on 8 devices (the default mode, checked below); the two other
    modes run in this process.
    """
    out = {"mesh": train_py_on_8_devices[0]}
    for mode in MODES:
        if mode == "mesh":
            continue
        workdir = str(tmp_path_factory.mktemp(f"tiny_{mode}"))
        train.train_and_evaluate(config_for("tiny", data_dir, parallel=mode), workdir)
        out[mode] = workdir
    return out


def test_tiny_runs_end_with_the_same_metrics_in_every_mode(tiny_runs):
    pmap = read_metrics(tiny_runs["pmap"])
    assert len(pmap) == 2
    for mode in ("mesh", "shard_map"):
        assert_same_metrics(read_metrics(tiny_runs[mode]), pmap)


def test_a_checkpoint_written_in_one_mode_resumes_in_another(tiny_runs, data_dir, tmp_path):
    """Stopped in mesh mode after step 3, resumed in pmap mode to step 6, finished under
    shard_map: the metrics are those of the uninterrupted run."""
    workdir = str(tmp_path)
    for mode, stop in (("mesh", 3), ("pmap", 6), ("shard_map", 0)):
        result = train.train_and_evaluate(
            config_for("tiny", data_dir, parallel=mode, stop_after_steps=stop), workdir)
        assert result.get("interrupted", False) == bool(stop)
    assert_same_metrics(read_metrics(workdir), read_metrics(tiny_runs["pmap"]))


def test_train_py_runs_in_mesh_mode_by_default_with_the_metrics_of_pmap_and_one_device(
        train_py_on_8_devices, tiny_runs, data_dir, tmp_path):
    eight, out = train_py_on_8_devices
    assert "on 8 device(s) (data parallel: mesh, synchronized BN)" in out
    assert_same_metrics(read_metrics(eight), read_metrics(tiny_runs["pmap"]))
    out = _train_py(str(tmp_path / "one"), data_dir, 1)
    assert "on 1 device(s);" in out
    assert_same_metrics(read_metrics(str(tmp_path / "one")), read_metrics(tiny_runs["pmap"]))
