"""The program on a finished workdir: PreciseBN and the folded export applied afterwards.

The docs (training.md, inference.md) say a second run with ``precise_bn_batches`` or
``export_folded`` set applies them to the final checkpoint without retraining. References:
the first run's own metrics (its test accuracy from ``metrics.jsonl``, computed by the
program's eval loop with the moving statistics) and the files of the workdir before the
second run (checkpoints, ``metrics.jsonl``, ``config.json``), which must not change.
"""

import hashlib
import json
import os

import jax
import numpy as np
import pytest

from bnjax_train import config_lib, input_pipeline, train

# End-to-end runs of the program: `python -m pytest -m slow` (see pyproject.toml).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The MNIST-1D cache (the same folder as test_train.py's, made once per session)."""
    path = str(tmp_path_factory.getbasetemp() / "bnjax_data")
    input_pipeline.load_dataset("mnist1d", data_dir=path)
    return path


def _config(data_dir, **overrides):
    config = config_lib.load_config("tiny")
    config.update(num_epochs=1, max_train_examples=128, batch_size=64, eval_batch_size=128,
                  data_dir=data_dir, **overrides)
    return config


def _digest(workdir):
    """Bytes of every file of the run except the tools' output folder ``folded/``."""
    out = {}
    for root, _, files in os.walk(workdir):
        if os.path.relpath(root, workdir).split(os.sep)[0] == "folded":
            continue
        for name in files:
            path = os.path.join(root, name)
            if name == "curves.png" or name.endswith(".lock"):
                continue
            with open(path, "rb") as f:
                out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _exported_accuracy(workdir, data_dir):
    """The test accuracy of ``<workdir>/folded/folded_model.jax_export``, loaded from the file."""
    with open(os.path.join(workdir, "folded", "folded_model.jax_export"), "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    ds = input_pipeline.load_dataset("mnist1d", data_dir=data_dir)
    logits = np.asarray(exported.call(ds.normalize(ds.test.x)))
    return float((logits.argmax(-1) == ds.test.y).mean()), 1.0 / len(ds.test.y)


def test_finished_run_applies_precise_bn_and_export_to_its_final_checkpoint(
        data_dir, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    first = train.train_and_evaluate(_config(data_dir), workdir)
    assert "test_accuracy_precise_bn" not in first and "folded_export" not in first
    before = _digest(workdir)
    assert any(k.startswith("checkpoints") for k in before) and "metrics.jsonl" in before
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        last = [m for m in map(json.loads, f) if "test_accuracy" in m][-1]
    capsys.readouterr()

    # The export alone: the folded model of the final checkpoint, whose test accuracy is the
    # one the first run measured with its own eval loop (moving statistics).
    second = train.train_and_evaluate(_config(data_dir, export_folded=True), workdir)
    printed = capsys.readouterr().out
    assert "applying the folded export to its final checkpoint" in printed
    assert "nothing to do" not in printed
    assert second["step"] == first["step"] and second["test_accuracy"] == first["test_accuracy"]
    assert second["folded_export"] == os.path.join(workdir, "folded", "folded_model.jax_export")
    accuracy, one = _exported_accuracy(workdir, data_dir)
    assert abs(accuracy - last["test_accuracy"]) <= one
    assert _digest(workdir) == before  # the checkpoint and the run's files are untouched

    # Both: PreciseBN's statistics, then the export of the model with them.
    tools = {"precise_bn_batches": 2, "export_folded": True}
    third = train.train_and_evaluate(_config(data_dir, **tools), workdir)
    assert "applying PreciseBN and the folded export" in capsys.readouterr().out
    assert 0.0 <= third["test_accuracy_precise_bn"] <= 1.0
    assert np.isfinite(third["test_loss_precise_bn"])
    accuracy, one = _exported_accuracy(workdir, data_dir)
    assert abs(accuracy - third["test_accuracy_precise_bn"]) <= one
    assert _digest(workdir) == before

    # Again with the same settings: the same numbers, and nothing else changes.
    fourth = train.train_and_evaluate(_config(data_dir, **tools), workdir)
    assert fourth["test_accuracy_precise_bn"] == third["test_accuracy_precise_bn"]
    assert fourth["test_loss_precise_bn"] == third["test_loss_precise_bn"]
    assert _digest(workdir) == before

    # Without the tools, a finished run still has nothing to do.
    capsys.readouterr()
    train.train_and_evaluate(_config(data_dir), workdir)
    assert "nothing to do" in capsys.readouterr().out
