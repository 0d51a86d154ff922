"""The training program end to end: files, resume == uninterrupted, SIGKILL, config errors."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tfds_fake
from processes import xla_flags

from bnjax_train import config_lib, input_pipeline, models, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = ("elapsed_s",)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One MNIST-1D cache for the session (shared with test_data.py)."""
    path = str(tmp_path_factory.getbasetemp() / "bnjax_data")
    input_pipeline.load_dataset("mnist1d", data_dir=path)
    return path


def tiny(data_dir, **overrides):
    config = config_lib.load_config("tiny")
    config.data_dir = data_dir
    config.update(overrides)
    return config


def _not_json(name):
    raise ValueError(f"{name} in metrics.jsonl: not strict JSON")


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line, parse_constant=_not_json) for line in f]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in lines]


def checkpoint_steps(workdir):
    root = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(root) if d.isdigit())


def restore(workdir, step):
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                               item_names=("state", "meta")) as mngr:
        out = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    return out.state, out.meta


@pytest.fixture(scope="module")
def tiny_run(data_dir, tmp_path_factory):
    """The uninterrupted tiny run on the 8 CPU devices (data parallel, synchronized BN)."""
    workdir = str(tmp_path_factory.mktemp("tiny_full"))
    config = tiny(data_dir)
    result = train.train_and_evaluate(config, workdir)
    return config, workdir, result


def test_tiny_end_to_end_on_8_devices_writes_its_files(tiny_run, data_dir):
    config, workdir, result = tiny_run
    assert jax.device_count() == 8
    assert sorted(os.listdir(workdir)) == ["checkpoints", "config.json", "curves.png",
                                           "metrics.jsonl"]
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f) == json.loads(json.dumps(config.to_dict(), default=list))
    metrics = read_metrics(workdir)
    assert [(r["epoch"], r["step"]) for r in metrics] == [(1, 4), (2, 8)]
    for r in metrics:
        assert set(r) >= {"train_loss", "train_accuracy", "test_loss", "test_accuracy",
                          "skipped_steps", "total_skipped_steps"}
        assert np.isfinite(r["train_loss"]) and np.isfinite(r["test_loss"])
        assert r["skipped_steps"] == 0
        assert round(r["test_accuracy"] * 1000) == pytest.approx(r["test_accuracy"] * 1000)
    assert {k: v for k, v in result.items() if k not in TIMING_KEYS} == metrics[-1]
    assert checkpoint_steps(workdir) == [4, 8]  # keep_checkpoints=2: each epoch's
    with open(os.path.join(workdir, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # The checkpoint holds everything needed to go on; its test accuracy, recomputed here
    # with a plain model.apply on all 1000 test examples, is the one in the metrics.
    state, meta = restore(workdir, 8)
    assert int(state["step"]) == 8
    assert set(state) == {"step", "params", "batch_stats", "opt_state", "rng"}
    assert meta["epoch"] == 2 and meta["batch_in_epoch"] == 0
    ds = input_pipeline.load_dataset("mnist1d", data_dir=data_dir)
    model = models.create_model("cnn1d", num_classes=10, **dict(config.model_kwargs))
    logits = jax.jit(lambda v, x: model.apply(v, x, training=False))(
        {"params": state["params"], "batch_stats": state["batch_stats"]},
        ds.normalize(ds.test.x))
    correct = int(np.sum(np.argmax(np.asarray(logits), -1) == ds.test.y))
    assert correct / 1000 == pytest.approx(metrics[-1]["test_accuracy"], abs=1e-12)


def test_interrupted_then_resumed_run_matches_uninterrupted(tiny_run, data_dir, tmp_path):
    _, full_dir, _ = tiny_run
    workdir = str(tmp_path)
    # Stop mid-epoch 1, then mid-epoch 2, then finish: three processes' worth of work.
    first = train.train_and_evaluate(tiny(data_dir, stop_after_steps=3), workdir)
    assert first["interrupted"] and checkpoint_steps(workdir) == [3]
    assert read_metrics(workdir) == []
    # The learning rate may change on resume (see test_train_hardening.py), the seed not.
    with pytest.raises(ValueError, match="config.seed: 0 there, 1 now"):
        train.train_and_evaluate(tiny(data_dir, seed=1), workdir)
    second = train.train_and_evaluate(tiny(data_dir, stop_after_steps=6), workdir)
    assert second["interrupted"] and checkpoint_steps(workdir) == [4, 6]
    train.train_and_evaluate(tiny(data_dir), workdir)
    assert read_metrics(workdir) == read_metrics(full_dir)
    resumed, _ = restore(workdir, 8)
    full, _ = restore(full_dir, 8)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(full), strict=True):
        np.testing.assert_array_equal(a, b)
    # Running a finished run again changes nothing.
    again = train.train_and_evaluate(tiny(data_dir), workdir)
    assert again["step"] == 8 and read_metrics(workdir) == read_metrics(full_dir)


def test_non_finite_steps_are_counted_and_stop_the_run(data_dir, tmp_path):
    # SGD with a huge learning rate: the first update blows the weights up, every later step
    # has a non-finite loss and is skipped (the weights stay as they were). The blow-up limit
    # would stop the run at its first checkpoint (test_train_recovery.py): off here.
    overrides = dict(optimizer="sgd", learning_rate=1e30, schedule="constant",
                     warmup_epochs=0.0, weight_decay=0.0, max_param_growth=0.0)
    result = train.train_and_evaluate(
        tiny(data_dir, max_consecutive_skips=100, **overrides), str(tmp_path / "a"))
    metrics = read_metrics(str(tmp_path / "a"))
    assert metrics[0]["skipped_steps"] >= 2 and metrics[1]["skipped_steps"] == 4
    # Means over the steps that ran: none in epoch 2 (null in metrics.jsonl, not 0.0 or NaN).
    assert metrics[1]["train_loss"] is None and metrics[1]["train_accuracy"] is None
    assert np.isfinite(metrics[0]["train_loss"])
    assert result["total_skipped_steps"] == sum(r["skipped_steps"] for r in metrics)
    state, _ = restore(str(tmp_path / "a"), 8)
    for leaf in jax.tree.leaves(state["batch_stats"]):
        assert np.all(np.isfinite(leaf))  # never poisoned
    with pytest.raises(train.NonFiniteTrainingError, match="max_consecutive_skips=2"):
        train.train_and_evaluate(tiny(data_dir, max_consecutive_skips=2, **overrides),
                                    str(tmp_path / "b"))


def test_tfds_dataset_end_to_end(tmp_path_factory, tmp_path):
    tfds_dir = str(tmp_path_factory.getbasetemp() / "bnjax_tfds")
    tfds_fake.build("bnjax_fake_gray", tfds_dir)
    config = config_lib.load_config("tiny")
    config.update(dataset="tfds:bnjax_fake_gray", data_dir=tfds_dir, model="mlp", norm="none",
                  max_train_examples=0, batch_size=8, eval_batch_size=16, num_epochs=3,
                  validation_split=0.25, learning_rate=0.03, schedule="constant",
                  warmup_epochs=0.0)
    config.model_kwargs = {"hidden": (16, 16)}
    result = train.train_and_evaluate(config, str(tmp_path))
    metrics = read_metrics(str(tmp_path))
    assert [r["step"] for r in metrics] == [9, 18, 27]  # 72 training examples, batch 8
    assert round(result["test_accuracy"] * 40) == pytest.approx(result["test_accuracy"] * 40)
    assert round(result["val_accuracy"] * 24) == pytest.approx(result["val_accuracy"] * 24)
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"] - 0.2  # it learns


BAD_FIELDS = [
    ("dataset", "mnist", "config.dataset='mnist': must be 'mnist1d', 'digits' or 'tfds:NAME'"),
    ("model", "vgg", "config.model='vgg': must be one of"),
    ("norm", "bogus", "config.norm='bogus': must be one of"),
    ("batch_size", 100, "config.batch_size=100: must be divisible by the 8 devices"),
    ("eval_batch_size", 12, "config.eval_batch_size=12: must be divisible by the 8 devices"),
    ("batch_size", 0, "config.batch_size=0: must be an integer >= 1"),
    ("learning_rate", -0.1, "config.learning_rate=-0.1: must be a finite number > 0"),
    ("learning_rate", float("nan"), "config.learning_rate=nan"),
    ("optimizer", "rmsprop", "config.optimizer='rmsprop': must be one of"),
    ("schedule", "step", "config.schedule='step'"),
    ("num_epochs", 0, "config.num_epochs=0: must be an integer >= 1"),
    ("validation_split", 1.5, "config.validation_split=1.5: must be a number in"),
    ("momentum", 1.0, "config.momentum=1.0"),
    ("weight_decay", -1.0, "config.weight_decay=-1.0"),
    ("max_consecutive_skips", 0, "config.max_consecutive_skips=0"),
    ("seed", -1, "config.seed=-1"),
    ("augment", "mixup", "config.augment='mixup'"),
    ("warmup_epochs", 5.0, "config.warmup_epochs=5.0: must be <= config.num_epochs=2"),
    ("model_kwargs", {"widht": 3}, "config.model_kwargs=.*widht"),
    ("lerning_rate", 0.1, "config.lerning_rate: unknown field"),
]


@pytest.mark.parametrize("field, value, match", BAD_FIELDS,
                         ids=[f"{f}={v}" for f, v, _ in BAD_FIELDS])
def test_bad_config_values_name_the_field(field, value, match):
    config = config_lib.load_config("tiny")
    config.unlock()
    config[field] = value
    with pytest.raises(ValueError, match=match):
        config_lib.validate_config(config, num_devices=8)


def test_misspelled_field_gets_a_suggestion_and_the_documented_fields():
    config = config_lib.load_config("tiny")
    config.unlock()
    config.lerning_rate, config.progres_bar, config.wibble = 0.1, False, 1
    with pytest.raises(ValueError) as info:
        config_lib.validate_config(config, num_devices=1)
    lines = str(info.value).splitlines()[1:]
    documented = sorted(config_lib.load_config("default").keys())  # configs/default.py
    assert "with_bn" not in documented
    for line, field, hint in zip(lines, ("lerning_rate", "progres_bar", "wibble"),
                                 (" did you mean 'learning_rate'?",
                                  " did you mean 'progress_bar'?", ""), strict=True):
        assert line == f"  config.{field}: unknown field;{hint} known fields: {documented}"


def test_with_bn_field_switches_the_norm():
    config = config_lib.load_config("mnist_mlp")
    assert config_lib.resolved_norm(config) == "batch"
    config.with_bn = False
    assert config_lib.resolved_norm(config) == "none"
    config_lib.validate_config(config, num_devices=1)
    config.with_bn, config.norm = True, "none"
    with pytest.raises(ValueError, match="config.with_bn=True contradicts config.norm='none'"):
        config_lib.validate_config(config, num_devices=1)


@pytest.mark.parametrize("name", ["default", "mnist1d_nobn", "mnist_mlp", "kmnist_cnn",
                                  "cifar10_resnet20", "tiny", "digits_keras_cnn",
                                  "digits_keras_cnn_nobn"])
def test_every_config_is_valid_and_documents_its_command(name):
    config = config_lib.load_config(name)
    config_lib.validate_config(config, num_devices=1)
    with open(os.path.join(REPO, "configs", f"{name}.py")) as f:
        doc = f.read()
    assert "python train.py" in doc and "Expected result" in doc


def test_digits_twin_is_the_keras_network_without_bn():
    with_bn, without = (config_lib.load_config(n) for n in ("digits_keras_cnn",
                                                            "digits_keras_cnn_nobn"))
    assert (with_bn.dataset, with_bn.model, with_bn.norm, without.norm) == (
        "digits", "kmnist_cnn", "batch", "none")
    without.norm = "batch"
    assert without.to_dict() == with_bn.to_dict()


# --------------------------------------------------------------------------------------------
# The real program, in subprocesses.


def _env(devices=1, **extra):
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(devices)
    env.update(extra)
    return env


def _train_cmd(workdir, data_dir, *extra):
    return [sys.executable, os.path.join(REPO, "train.py"),
            "--config", os.path.join(REPO, "configs", "tiny.py"), "--workdir", workdir,
            f"--config.data_dir={data_dir}", *extra]


def test_cli_rejects_bad_values_at_start_up(tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    proc = subprocess.run(
        _train_cmd(workdir, data_dir, "--config.learning_rate=-1", "--config.batch_size=30",
                   "--config.model=vgg"),
        env=_env(devices=8), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    for text in ("config.learning_rate=-1.0", "config.batch_size=30: must be divisible by the 8",
                 "config.model='vgg'"):
        assert text in proc.stderr
    assert not os.path.exists(workdir)  # failed before doing anything


def _run_until(cmd, env, should_kill, timeout=120):
    """Starts ``cmd``; SIGKILLs it as soon as ``should_kill()`` is true. True if killed."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if should_kill():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.001)
        assert proc.poll() == 0, proc.stderr.read().decode()[-3000:]
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_a_resumable_workdir(tmp_path, data_dir):
    # 2 epochs x 4 steps, a checkpoint after every step: most of the run is spent saving. The
    # steps are those of the other one-device tiny runs (compiled once for the session).
    extra = ("--config.checkpoint_every_steps=1",)
    env = _env()
    ref_dir = str(tmp_path / "ref")
    assert not _run_until(_train_cmd(ref_dir, data_dir, *extra), env, lambda: False)

    workdir = str(tmp_path / "run")
    cmd = _train_cmd(workdir, data_dir, *extra)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    metrics_path = os.path.join(workdir, "metrics.jsonl")

    def saving_steps():
        """Steps whose checkpoint is being written (orbax's temporary folders)."""
        try:
            names = os.listdir(ckpt_dir)
        except FileNotFoundError:
            return set()
        return {int(d.split(".")[0]) for d in names
                if "orbax-checkpoint-tmp" in d and d.split(".")[0].isdigit()}

    def steps():
        return checkpoint_steps(workdir) if os.path.isdir(ckpt_dir) else []

    def metric_lines():
        try:
            with open(metrics_path) as f:
                return f.read().count("\n")
        except FileNotFoundError:
            return 0

    # 1. During start-up, before the first checkpoint.
    t0 = time.monotonic()
    assert _run_until(cmd, env, lambda: time.monotonic() - t0 > 1.0)
    # 2. Right after the first epoch's metrics line, while its checkpoint is being written.
    assert _run_until(cmd, env, lambda: metric_lines() >= 1)
    # 3. In the middle of writing a checkpoint (seen by its temporary folder); retried until
    #    the kill lands before the save completes.
    mid_save = False
    for _ in range(5):
        # Saves newer than the last complete checkpoint and than any folder left by a kill.
        newest = max(steps() + sorted(saving_steps()) or [0])
        if not _run_until(cmd, env, lambda n=newest: any(s > n for s in saving_steps())):
            break  # the run finished first
        if {s for s in saving_steps() if s > newest} - set(steps()):
            mid_save = True
            break
    assert mid_save, "no kill landed while a checkpoint was being written"
    # The workdir now holds a half-written checkpoint; the run resumes from the last complete
    # one, drops metrics lines past it, and ends exactly like the uninterrupted run.
    assert not _run_until(cmd, env, lambda: False)
    assert read_metrics(workdir) == read_metrics(ref_dir)
    assert [r["step"] for r in read_metrics(workdir)] == [4, 8]
    got, _ = restore(workdir, 8)
    want, _ = restore(ref_dir, 8)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


def test_digits_config_trains_offline_from_any_folder(tmp_path):
    """The Keras tutorial network on digits: no data folder, no network, one short epoch."""
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), "--config",
         os.path.join(REPO, "configs", "digits_keras_cnn.py"), "--workdir", str(workdir),
         "--config.num_epochs=1", "--config.max_train_examples=256",
         "--config.progress_bar=False"],
        cwd=tmp_path, env=_env(devices=1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kmnist_cnn (norm=batch) on digits: 256 train / 360 test examples" in proc.stdout
    (record,) = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 8 and 0.0 <= record["test_accuracy"] <= 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no data/ made anywhere


def test_short_run_curves_have_integer_step_ticks_and_markers(tmp_path, monkeypatch):
    import matplotlib.figure

    from bnjax_train import reporting

    drawn = []
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: (drawn.append(fig), save(fig, *a, **k))[1])
    records = [{"step": s, "train_loss": 1.0 / s, "train_accuracy": 0.1 * s,
                "test_loss": 1.2 / s, "test_accuracy": 0.09 * s} for s in (4, 8)]
    reporting.plot_curves(records, str(tmp_path / "curves.png"), "tiny")
    (fig,) = drawn
    for ax in fig.axes:
        ticks = ax.get_xticks()
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
        assert [line.get_marker() for line in ax.get_lines()] == ["o", "o"]
        assert [list(line.get_xdata()) for line in ax.get_lines()] == [[4, 8], [4, 8]]
