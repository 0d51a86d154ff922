"""train.py against what a second process, a signal, a damaged checkpoint or a typo can do.

Real ``python train.py`` runs of ``configs/tiny.py`` on one CPU device (2 epochs x 4 steps, a
few seconds each), checked against one uninterrupted reference run: metrics lines (strict JSON,
no NaN) and the final checkpoint's arrays must be equal.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from processes import run_processes, xla_flags

from bnjax_train import (
    checkpointing,
    config_lib,
    input_pipeline,
    loop_state,
    models,
    overrides,
    reporting,
    run_files,
)
from bnjax_train import workdir as workdir_lib

# End-to-end runs of the program: `python -m pytest -m slow` (see pyproject.toml).
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 60


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The MNIST-1D cache (the same folder as test_train.py's)."""
    path = str(tmp_path_factory.getbasetemp() / "bnjax_data")
    input_pipeline.load_dataset("mnist1d", data_dir=path)
    return path


@pytest.fixture(scope="module")
def env():
    """One CPU device; the session's compilation cache comes with os.environ (conftest.py)."""
    out = dict(os.environ)
    out.update(XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    return out


def cmd(workdir, data_dir, *extra, config="tiny"):
    return [sys.executable, os.path.join(REPO, "train.py"), "--config", config,
            "--workdir", str(workdir), f"--config.data_dir={data_dir}", *extra]


def run(argv, env, timeout=TIMEOUT):
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


def _no_constant(name):
    raise ValueError(f"{name} in metrics.jsonl: not strict JSON")


def metrics(workdir):
    """Every line of metrics.jsonl, parsed as strict JSON (NaN or Infinity fail)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line, parse_constant=_no_constant) for line in f]


def epochs(workdir):
    """The epoch lines, without timing."""
    return [{k: v for k, v in r.items() if k != "elapsed_s"}
            for r in metrics(workdir) if "event" not in r]


def steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                  if d.isdigit())


def arrays(workdir, step):
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                               item_names=("state", "meta")) as mngr:
        return mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore())).state


def assert_same_run(workdir, ref):
    assert epochs(workdir) == epochs(ref)
    assert [r["step"] for r in epochs(workdir)] == [4, 8]
    got, want = arrays(workdir, 8), arrays(ref, 8)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


def assert_one_line_error(proc, *texts):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for text in texts:
        assert text in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def reference(data_dir, env, tmp_path_factory):
    """The uninterrupted tiny run."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    proc = run(cmd(workdir, data_dir), env)
    assert proc.returncode == 0, proc.stderr
    return str(workdir)


@pytest.fixture(scope="module")
def stopped(data_dir, env, tmp_path_factory):
    """The tiny run stopped after step 6: checkpoints 4 (end of epoch 1) and 6.

    It asks for a progress bar; its output (pipes, no terminal) is kept in ``../output.txt``.
    """
    workdir = tmp_path_factory.mktemp("stopped") / "run"
    proc = run(cmd(workdir, data_dir, "--config.stop_after_steps=6",
                   "--config.progress_bar=True"), env)
    assert proc.returncode == 0, proc.stderr
    assert steps(workdir) == [4, 6]
    (workdir.parent / "output.txt").write_text(proc.stdout + proc.stderr)
    return str(workdir)


def test_stopped_run_has_its_curves_and_logs_no_progress_bar(stopped):
    # Asked for, the bar is still not drawn into output that goes to pipes; the run stopped
    # mid-epoch 2 has epoch 1's curves (drawn with its checkpoint).
    with open(os.path.join(os.path.dirname(stopped), "output.txt")) as f:
        output = f.read()
    assert "Stopped after step 6" in output
    assert "%|" not in output and "step/s" not in output, output
    assert sorted(os.listdir(stopped)) == ["checkpoints", "config.json", "curves.png",
                                           "metrics.jsonl"]
    with open(os.path.join(stopped, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def copy_of(stopped, folder):
    workdir = str(folder / "run")
    shutil.copytree(stopped, workdir)
    return workdir


# --------------------------------------------------------------------------------------------
# One run per workdir.


def _wait_for(proc, ready, what):
    deadline = time.monotonic() + TIMEOUT
    while not ready():
        assert proc.poll() is None, (what, proc.communicate())
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


def _checkpoint_names(workdir):
    folder = os.path.join(workdir, "checkpoints")
    return os.listdir(folder) if os.path.isdir(folder) else []


def test_a_second_process_on_a_running_workdir_is_refused(data_dir, env, reference, tmp_path):
    workdir = str(tmp_path / "run")
    first = subprocess.Popen(cmd(workdir, data_dir, "--config.checkpoint_every_steps=1"),
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(first, lambda: "1" in _checkpoint_names(workdir), "first checkpoint")
        first.send_signal(signal.SIGSTOP)  # held mid-run, lock and all, while the second tries
        try:
            second = run(cmd(workdir, data_dir, "--config.checkpoint_every_steps=1"), env)
        finally:
            first.send_signal(signal.SIGCONT)
        out, err = first.communicate(timeout=TIMEOUT)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err
    assert_one_line_error(second, f"--workdir {workdir} is in use by process {first.pid}")
    assert_same_run(workdir, reference)  # no duplicated or interleaved lines


def test_two_processes_started_together_one_runs_one_is_refused(data_dir, env, reference,
                                                                tmp_path):
    workdir = str(tmp_path / "run")
    codes, texts = run_processes([(cmd(workdir, data_dir), env)] * 2, tmp_path, TIMEOUT)
    assert sorted(codes) == [0, 2], texts
    loser = texts[codes.index(2)]
    assert f"--workdir {workdir} is in use by process" in loser and "Traceback" not in loser
    assert_same_run(workdir, reference)
    assert sorted(os.listdir(workdir)) == ["checkpoints", "config.json", "curves.png",
                                           "metrics.jsonl"]  # the lock file is gone too


# --------------------------------------------------------------------------------------------
# SIGINT and SIGTERM.


class _Stderr:
    """Collects a process's stderr lines in a thread."""

    def __init__(self, proc):
        self.lines = []
        self._thread = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        self._thread.start()

    def _read(self, stream):
        for line in stream:
            self.lines.append(line)

    def text(self):
        self._thread.join(TIMEOUT)
        return "".join(self.lines)


def _signal_while_saving(argv, env, workdir, step, signals):
    """Runs ``argv``; while checkpoint ``step`` is being written, sends ``signals`` in turn.

    The process is frozen (SIGSTOP) while the first signal is sent, so that it lands during
    that save; each later one is sent once the process has said it got the one before.
    Returns (exit code, stdout, stderr).
    """
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    err = _Stderr(proc)
    try:
        _wait_for(proc, lambda: any(n == str(step) or n.startswith(f"{step}.")
                                    for n in _checkpoint_names(workdir)), f"save {step}")
        proc.send_signal(signal.SIGSTOP)
        proc.send_signal(signals[0])
        proc.send_signal(signal.SIGCONT)
        for s in signals[1:]:
            _wait_for(proc, lambda: any("stopping after the current step" in line
                                        for line in err.lines), "first signal seen")
            proc.send_signal(s)
        out = proc.stdout.read()
        proc.wait(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err.text()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_epoch_saves_then_the_run_resumes_exactly(sig, data_dir, env, reference,
                                                             tmp_path):
    workdir = str(tmp_path / "run")
    # Checkpoints at 4 (epoch 1), 5 (every 5 steps) and 8: the signal comes while 5 is saved,
    # so the run stops in the middle of epoch 2, at a step that has no checkpoint of its own.
    argv = cmd(workdir, data_dir, "--config.checkpoint_every_steps=5")
    rc, out, err = _signal_while_saving(argv, env, workdir, 5, [sig])
    assert rc == 128 + sig, out + err
    assert "Traceback" not in err
    stopped_at = int(out.split("interrupted at step ")[1].split(";")[0])
    assert stopped_at in (6, 7)
    assert f"interrupted at step {stopped_at}; saved; run the same command to resume" in out
    assert steps(workdir)[-1] == stopped_at
    proc = run(argv, env)
    assert proc.returncode == 0, proc.stderr
    assert f"Resuming from {workdir}/checkpoints/{stopped_at} at step {stopped_at}: epoch 2 " \
           f"of 2, batch {stopped_at - 3} of 4 next" in proc.stdout
    assert_same_run(workdir, reference)


def test_a_second_ctrl_c_exits_at_once_and_the_run_still_resumes(data_dir, env, reference,
                                                                 tmp_path):
    for attempt in range(3):  # the second signal must land before the graceful exit ends
        workdir = str(tmp_path / f"run{attempt}")
        argv = cmd(workdir, data_dir, "--config.checkpoint_every_steps=5")
        rc, out, err = _signal_while_saving(argv, env, workdir, 5, [signal.SIGINT] * 2)
        assert rc == 130 and "Traceback" not in err, out + err
        if "SIGINT again: exiting now" in err:
            break
    else:
        pytest.fail("the second SIGINT never arrived before the run had stopped")
    assert "interrupted at step" not in out  # it did not wait to save
    assert run(argv, env).returncode == 0
    assert_same_run(workdir, reference)


# --------------------------------------------------------------------------------------------
# Damaged checkpoints.


def _data_file(checkpoint):
    folder = os.path.join(checkpoint, "state", "ocdbt.process_0", "d")
    return max((os.path.join(folder, f) for f in os.listdir(folder)), key=os.path.getsize)


def _truncate(c):
    path = _data_file(c)
    os.truncate(path, os.path.getsize(path) // 2)


def _garbage(c):
    path = _data_file(c)
    with open(path, "r+b") as f:
        f.write(np.random.default_rng(0).bytes(os.path.getsize(path)))


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _edit_meta(c, **changes):
    path = os.path.join(c, "meta", "metadata")
    with open(path) as f:
        meta = json.load(f)
    _write(path, json.dumps({**meta, **changes}))


def _empty(c):
    shutil.rmtree(c)
    os.mkdir(c)


DAMAGE = {
    "truncated data file": (_truncate, 6, 4, "OUT_OF_RANGE"),
    "garbage data file": (_garbage, 6, 4, "Error reading"),
    "garbage meta": (lambda c: _write(os.path.join(c, "meta", "metadata"), "{garbage"), 6, 4,
                     "JSONDecodeError"),
    "missing meta": (lambda c: os.remove(os.path.join(c, "meta", "metadata")), 6, 4,
                     "not found"),
    "emptied step folder": (_empty, 6, 4, "not found in the checkpoint"),
    "stray empty checkpoints/7": (os.mkdir, 7, 6, "not found in the checkpoint"),
    "hand-edited meta epoch 99": (lambda c: _edit_meta(c, epoch=99), 6, 4,
                                  "meta says epoch 99, batch 2 (step 398 at 4 steps per "
                                  "epoch), not step 6"),
}


def test_each_damage_to_the_newest_checkpoint_falls_back_and_ends_like_an_uninterrupted_run(
        data_dir, env, reference, stopped, tmp_path):
    workdirs = {}
    for i, (kind, (damage, damaged, _, _)) in enumerate(DAMAGE.items()):
        workdirs[kind] = copy_of(stopped, tmp_path / str(i))
        damage(os.path.join(workdirs[kind], "checkpoints", str(damaged)))
    # The resumes side by side (each is a separate workdir).
    codes, texts = run_processes([(cmd(w, data_dir), env) for w in workdirs.values()],
                                 tmp_path, 2 * TIMEOUT)
    for (kind, (_, damaged, intact, why)), code, text in zip(DAMAGE.items(), codes, texts,
                                                             strict=True):
        workdir = workdirs[kind]
        assert code == 0 and "Traceback" not in text, (kind, text)
        warning = f"warning: skipped checkpoint {damaged} ("
        assert warning in text and why in text.split(warning)[1].split("\n")[0], (kind, text)
        assert f"resuming from {intact}" in text, (kind, text)
        assert os.listdir(os.path.join(workdir, "damaged_checkpoints")) == [str(damaged)]
        assert_same_run(workdir, reference)


def test_no_intact_checkpoint_fails_naming_the_folder_and_how_to_start_over(
        data_dir, env, stopped, tmp_path):
    workdir = copy_of(stopped, tmp_path)
    for step in (4, 6):
        _truncate(os.path.join(workdir, "checkpoints", str(step)))
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    proc = run(cmd(workdir, data_dir), env)
    assert_one_line_error(proc, f"no intact checkpoint in {workdir}/checkpoints: 6: ",
                          "; 4: ", f"To start this run over, delete or move {workdir}")
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before  # left as is


def test_a_workdir_with_metrics_but_no_checkpoint_is_not_started_over(data_dir, env, stopped,
                                                                      tmp_path):
    workdir = copy_of(stopped, tmp_path)
    shutil.copy(os.path.join(REPO, "README.md"), os.path.join(workdir, "notes.md"))
    shutil.rmtree(os.path.join(workdir, "checkpoints"))
    proc = run(cmd(workdir, data_dir), env)
    assert_one_line_error(proc, f"--workdir {workdir} holds a run (metrics up to step 4",
                          "but no checkpoint")
    assert sorted(os.listdir(workdir)) == ["config.json", "curves.png", "metrics.jsonl",
                                           "notes.md"]


# --------------------------------------------------------------------------------------------
# Resuming with another config; a finished run.


def test_resume_with_a_lower_learning_rate_is_logged_other_changes_refused(
        data_dir, env, reference, stopped, tmp_path):
    workdir = copy_of(stopped, tmp_path)
    refused = run(cmd(workdir, data_dir, "--config.seed=1", "--config.batch_size=32"), env)
    assert_one_line_error(refused, "config.batch_size: 64 there, 32 now",
                          "config.seed: 0 there, 1 now", "learning_rate")
    proc = run(cmd(workdir, data_dir, "--config.learning_rate=0.001"), env)
    assert proc.returncode == 0, proc.stderr
    assert "config changed on resume: learning_rate 0.003 -> 0.001" in proc.stdout
    lines = metrics(workdir)
    assert [r.get("event") for r in lines] == [None, "config_change", None]
    assert lines[1] == {"event": "config_change", "step": 6,
                        "changes": {"learning_rate": [0.003, 0.001]}}
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["learning_rate"] == 0.001
    assert epochs(workdir)[0] == epochs(reference)[0]
    assert epochs(workdir)[1]["train_loss"] != epochs(reference)[1]["train_loss"]


def _snapshot(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[path] = (os.stat(path).st_mtime_ns, f.read())
    return out


def test_a_finished_run_run_again_prints_its_result_and_writes_nothing(data_dir, env,
                                                                       reference, tmp_path):
    before = _snapshot(reference)
    # With the default compilation cache: a per-user folder (here XDG_CACHE_HOME).
    env = {k: v for k, v in env.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    proc = run(cmd(reference, data_dir, "--config.learning_rate=0.001"),
               {**env, "XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(tmp_path / "xdg" / "bnjax" / "jax_cache")
    last = epochs(reference)[-1]
    assert (f"Finished run in {reference}: final test accuracy {last['test_accuracy']:.4f}"
            in proc.stdout)
    assert "epoch 3" not in proc.stdout and "Resuming" not in proc.stdout
    assert _snapshot(reference) == before


# --------------------------------------------------------------------------------------------
# Bad command lines, config files and workdirs: exit code 2, one message, no traceback.


def _config_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_bad_overrides_config_files_and_flags_exit_2_naming_them(data_dir, env, tmp_path):
    w = tmp_path / "run"
    cases = [
        (cmd(w, data_dir, "--config.unknown_field=3", "--config.learning_rate=abc",
             "--config.num_epochs=2.5", "--config.progress_bar=maybe",
             "--config.model_kwargs.features=(8,0)"),
         ["config.unknown_field: unknown field; known fields: [",
          "config.learning_rate='abc': must be a finite number > 0",
          "config.num_epochs=2.5: must be an integer >= 1",
          "config.progress_bar='maybe': must be True or False",
          "config.model_kwargs.features=(8, 0): must be a non-empty sequence of integers"]),
        (cmd(w, data_dir, config=str(tmp_path / "nope.py")),
         [f"config file '{tmp_path / 'nope.py'}' not found"]),
        (cmd(w, data_dir, config=_config_file(tmp_path, "no_get.py", "x = 1\n")),
         ["no_get.py' has no get_config() function"]),
        (cmd(w, data_dir, "--wokdir=x"), ["Unknown command line flag 'wokdir'"]),
    ]
    codes, texts = run_processes([(argv, env) for argv, _ in cases], tmp_path, TIMEOUT)
    for (argv, wanted), code, text in zip(cases, codes, texts, strict=True):
        assert code == 2, (argv, text)
        assert "Traceback" not in text and text.startswith("train.py: error: "), text
        for want in wanted:
            assert want in text, (want, text)
    assert not w.exists()


def _make_read_only(path):
    """Makes ``path`` unwritable, even for root (chattr +i); an undo function, or None."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        return lambda: os.chmod(path, 0o755)
    proc = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    if proc.returncode != 0:
        return None
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


def test_bad_workdirs_exit_2_before_the_first_step(data_dir, env, reference, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    ckpt_file = tmp_path / "ckpt_file"
    ckpt_file.mkdir()
    (ckpt_file / "checkpoints").write_text("")
    cases = [
        (a_file, f"--workdir {a_file}: is a file, not a folder"),
        (a_file / "sub", f"--workdir {a_file / 'sub'}: cannot be created: {a_file} is a file"),
        (ckpt_file, f"{ckpt_file / 'checkpoints'} is a file; a run keeps its checkpoints in a "
                    "folder there"),
    ]
    codes, texts = run_processes([(cmd(w, data_dir), env) for w, _ in cases], tmp_path,
                                 TIMEOUT)
    for (w, want), code, text in zip(cases, codes, texts, strict=True):
        assert code == 2 and want in text and "Traceback" not in text, (w, text)
        assert "Training" not in text  # found before anything ran
    # A read-only workdir: a fresh run is refused; a finished run still shows its result.
    empty, finished = tmp_path / "empty", tmp_path / "finished"
    empty.mkdir()
    shutil.copytree(reference, finished)
    undo = [_make_read_only(empty), _make_read_only(finished)]
    if None in undo:
        pytest.skip("cannot make a folder read-only here")
    try:
        proc = run(cmd(empty, data_dir), env)
        assert_one_line_error(proc, f"--workdir {empty} is not writable")
        proc = run(cmd(finished, data_dir), env)
        assert proc.returncode == 0 and "Finished run in" in proc.stdout, proc.stderr
    finally:
        for u in undo:
            u()


def test_a_run_that_fails_at_start_up_leaves_nothing_behind(env, tmp_path):
    """A dataset that is not prepared fails fast and says how to prepare it."""
    workdir = tmp_path / "new" / "run"
    t0 = time.monotonic()
    proc = run(cmd(workdir, str(tmp_path / "data"), "--config.dataset=tfds:kmnist"),
               {**env, "HOME": str(tmp_path / "home"), "TFDS_DATA_DIR": ""})
    assert time.monotonic() - t0 < 30  # the bound, start-up included
    assert_one_line_error(proc, "dataset 'tfds:kmnist' is not prepared", str(tmp_path / "data"),
                          "python -m bnjax_train.input_pipeline prepare tfds:kmnist")
    assert not (tmp_path / "new").exists()


# --------------------------------------------------------------------------------------------
# The pieces, in process.


@pytest.mark.parametrize("text, match", [
    ("def get_config(:\n", r"'{path}' is not valid Python \(line 1"),
    ("def get_config():\n    return 1 / 0\n",
     r"'{path}': get_config\(\) raised ZeroDivisionError: division by zero \(line 2\)"),
    ("import nope_no_such_module\n", r"'{path}' failed to run: ModuleNotFoundError: .*line 1"),
    ("x = 1\n", r"'{path}' has no get_config\(\) function"),
    ("def get_config():\n    return 3\n", r"get_config\(\) returned a int, not an ml_coll"),
], ids=["syntax", "raises", "import", "no get_config", "not a config"])
def test_config_file_errors_name_the_file(tmp_path, text, match):
    path = _config_file(tmp_path, "c.py", text)
    with pytest.raises(config_lib.ConfigFileError, match=match.format(path=re.escape(path))):
        config_lib.load_config(path)


def test_a_missing_config_file_is_a_file_not_found_error_too(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file 'nope' not found"):
        config_lib.load_config("nope")


def test_split_overrides_takes_every_form_in_any_order():
    rest, found = overrides.split_overrides(
        ["train.py", "--config.seed=3", "--config", "c.py", "--config.num_epochs", "4",
         "--config.progress_bar", "--workdir=w", "--config.model_kwargs.features=(8,8)"])
    assert rest == ["train.py", "--config", "c.py", "--workdir=w"]
    assert found == [("seed", "3"), ("num_epochs", "4"), ("progress_bar", None),
                     ("model_kwargs.features", "(8,8)")]


@pytest.mark.parametrize("text, current, want", [
    ("1e-3", 0.1, 0.001), ("3", 0.1, 3.0), ("abc", 0.1, "abc"), ("nan", 0.1, "nan"),
    ("4", 2, 4), ("2.5", 2, 2.5), ("True", False, True), ("no", True, False),
    ("maybe", True, "maybe"), ("runs/x", "data", "runs/x"), ("'quoted'", "x", "quoted"),
    ("12", "x", "12"), ("(8, 8)", (4,), (8, 8)), ("[1]", None, [1]), ("x y", None, "x y"),
])
def test_parse_value_reads_the_type_of_the_field(text, current, want):
    got = overrides.parse_value(text, current)
    if want == "nan":
        assert isinstance(got, float) and np.isnan(got)
    else:
        assert got == want and type(got) is type(want)


def test_apply_overrides_sets_nested_fields_and_reports_bad_paths():
    config = config_lib.load_config("tiny")
    new = overrides.apply_overrides(config, [
        ("learning_rate", "1e-2"), ("progress_bar", None),
        ("model_kwargs.norm_kwargs.ghost.virtual_batch_size", "8"),
        ("model_kwargs.hidden", "32")])
    assert (new.learning_rate, new.progress_bar, new.model_kwargs.hidden) == (0.01, True, 32)
    assert new.model_kwargs.norm_kwargs.ghost.virtual_batch_size == 8
    assert config.learning_rate == 0.003  # the loaded config is left as it was
    config_lib.validate_config(new, num_devices=1)
    with pytest.raises(ValueError) as info:
        overrides.apply_overrides(config, [("seed", None), ("seed.x", "1"), ("a..b", "1")])
    assert str(info.value).splitlines()[1:] == [
        "  --config.seed: needs a value (--config.seed=VALUE)",
        "  --config.seed.x: config.seed is 0, not a mapping; set it with --config.seed=VALUE",
        "  --config.a..b: not a field path (e.g. --config.model_kwargs.features=(8,8))"]


def test_model_options_name_the_bad_option():
    config = overrides.apply_overrides(config_lib.load_config("tiny"), [
        ("model_kwargs.norm_kwargs.ghost.virtual_batch_sz", "3"),
        ("model_kwargs.norm_kwargs.group", "3"), ("model_kwargs.norm_kwargs.bogus", "{}"),
        ("model_kwargs.kernel_size", "0"), ("model_kwargs.pool_after", "1")])
    with pytest.raises(ValueError) as info:
        config_lib.validate_config(config, num_devices=1)
    lines = str(info.value).splitlines()[1:]  # the norms in name order
    assert lines[1].startswith("  config.model_kwargs.norm_kwargs.ghost: unknown attribute(s) "
                               "['virtual_batch_sz']; the 'ghost' layer takes [")
    assert lines[:1] + lines[2:] == [
        "  config.model_kwargs.norm_kwargs.bogus: unknown norm; accepted: "
        f"{list(models.NORMS)}",
        "  config.model_kwargs.norm_kwargs.group=3: must be a mapping of layer attributes",
        "  config.model_kwargs.kernel_size=0: must be an integer >= 1 (model 'cnn1d')",
        "  config.model_kwargs.pool_after=1: must be a sequence of integers >= 0, e.g. "
        "(32, 64) (model 'cnn1d')"]


def test_model_options_cover_every_model_attribute():
    for name, cls in models.MODELS.items():
        attributes = set(cls.__dataclass_fields__) - {"parent", "name", "num_classes", "norm",
                                                     "axis_name", "norm_kwargs"}
        assert set(config_lib.MODEL_OPTIONS[name]) == attributes, name


def test_check_workdir_finds_entries_of_the_wrong_kind(tmp_path):
    (tmp_path / "metrics.jsonl").mkdir()
    with pytest.raises(workdir_lib.WorkdirError, match="metrics.jsonl is a folder; a run keeps"):
        workdir_lib.check_workdir(str(tmp_path))


def test_workdir_lock_is_exclusive_and_a_stale_lock_file_is_taken(tmp_path):
    (tmp_path / ".lock").write_text("12345 on elsewhere\n")  # left by a killed run
    first = workdir_lib.WorkdirLock(str(tmp_path))
    first.acquire()
    assert (tmp_path / ".lock").read_text() == f"{os.getpid()} on {socket.gethostname()}\n"
    with pytest.raises(workdir_lib.WorkdirBusyError, match=f"in use by process {os.getpid()}"):
        workdir_lib.WorkdirLock(str(tmp_path)).acquire()
    other = workdir_lib.WorkdirLock(str(tmp_path), process_index=1)  # another host's process
    other.acquire()
    other.release()
    first.release()
    assert not (tmp_path / ".lock").exists()
    again = workdir_lib.WorkdirLock(str(tmp_path))
    again.acquire()
    again.release()


def _meta(**changes):
    return {"epoch": 1, "batch_in_epoch": 2, "epoch_sums": [1.0, 0.5, 0, 2],
            "consecutive_skips": 0, "total_skipped": 0, "elapsed_s": 1.0, **changes}


@pytest.mark.parametrize("step, tree, meta, want", [
    (6, {"step": 6, "w": np.zeros(3)}, _meta(), None),
    (6, {"step": 5, "w": np.zeros(3)}, _meta(), "its step array says 5, its folder 6"),
    (6, {"step": 6, "w": np.zeros(4)}, _meta(), "array ['w'] has shape (4,) float64, not (3,)"),
    (6, {"step": 6, "w": np.zeros(3)}, _meta(epoch=2), "meta says epoch 2, batch 2 (step 10"),
    (6, {"step": 6, "w": np.zeros(3)}, _meta(epoch=0, batch_in_epoch=6), "meta says epoch 0"),
    (6, {"step": 6, "w": np.zeros(3)}, _meta(epoch="1"), "has bad meta values {'epoch': '1'}"),
    (6, {"step": 6, "w": np.zeros(3)}, {"epoch": 1}, "lacks ['batch_in_epoch'"),
])
def test_restored_problem_checks_meta_step_and_shapes(step, tree, meta, want):
    target = {"step": 0, "w": np.ones(3)}
    got = checkpointing.restored_problem(step, tree, meta, target, steps_per_epoch=4)
    assert got == want if want is None else want in got


def test_metrics_lines_are_strict_json_and_changes_sorted_in_two(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    run_files.append_metrics(path, {"step": 4, "train_loss": float("nan"),
                                    "test_loss": float("inf"), "acc": [1.0, float("-inf")]})
    assert metrics(tmp_path) == [{"step": 4, "train_loss": None, "test_loss": None,
                                  "acc": [1.0, None]}]
    refused, changed = run_files.config_changes(
        {"learning_rate": 0.1, "num_epochs": 2, "seed": 0, "stop_after_steps": 3},
        {"learning_rate": 0.01, "num_epochs": 4, "seed": 1, "stop_after_steps": 0})
    assert refused == ["config.seed: 0 there, 1 now"]
    assert changed == {"learning_rate": [0.1, 0.01], "num_epochs": [2, 4]}


def test_an_epoch_whose_steps_were_all_skipped_reports_no_mean():
    loop = loop_state.LoopState()
    for step in range(1, 4):
        loop.count({"loss": float("nan"), "accuracy": 0.0, "skipped": 1.0}, step=step,
                   max_consecutive_skips=10, workdir="w")
    assert loop.epoch_means() == {"train_loss": None, "train_accuracy": None}
    record = {"epoch": 2, "step": 8, **loop.epoch_means(), "test_loss": 2.0,
              "test_accuracy": 0.5, "skipped_steps": 3, "total_skipped_steps": 5,
              "elapsed_s": 1.0}
    assert reporting.epoch_line(record, 2, ["test"]) == (
        "epoch 2/2 step 8: train loss n/a acc n/a | test loss 2.0000 acc 0.5000 | skipped 3, "
        "every step of the epoch (total 5; train means over the steps that ran) | 1.0 s")
