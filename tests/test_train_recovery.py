"""train.py after damage that is not a checkpoint's: its metrics file, a full disk, a blow-up.

Real ``python train.py`` runs of ``configs/tiny.py`` on one CPU device, as in
test_train_hardening.py (whose helpers and fixtures this file uses): a damaged
``metrics.jsonl`` keeps every readable line, a full disk (a small tmpfs this test mounts) is
one message and a resume after freeing space ends like the uninterrupted run, parameters that
blow up are never checkpointed (so the advice to resume with a lower learning rate works), and
checkpoints of another optimizer are not called damaged when ``config.json`` is gone.
"""

import os
import shutil
import subprocess

import pytest
import test_train_hardening as hardening
from processes import run_processes
from test_train_hardening import (
    TIMEOUT,
    assert_one_line_error,
    assert_same_run,
    cmd,
    copy_of,
    epochs,
    metrics,
    run,
    steps,
)

from bnjax_train import loop_state, run_files

# End-to-end runs of the program: `python -m pytest -m slow` (see pyproject.toml).
pytestmark = pytest.mark.slow

# The fixtures of test_train_hardening.py (MNIST-1D cache, environment, the reference run and
# the run stopped after step 6), computed again for this module.
data_dir, env, reference, stopped = (hardening.data_dir, hardening.env, hardening.reference,
                                     hardening.stopped)


def _read(path):
    with open(path) as f:
        return f.read()


def test_unreadable_metrics_lines_are_moved_aside_and_every_readable_one_kept(
        data_dir, env, reference, stopped, tmp_path):
    workdir = copy_of(stopped, tmp_path)
    path = os.path.join(workdir, "metrics.jsonl")
    (epoch_1,) = _read(path).splitlines(keepends=True)
    damaged = ("not json at all\n" + epoch_1 + '{"epoch": 2, "step":\n'
               + '{"event": "note", "step": 5}\n')
    run_files.write_atomic(path, damaged)
    proc = run(cmd(workdir, data_dir), env)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    warning = [line for line in proc.stdout.splitlines() if line.startswith("warning:")]
    assert warning == [
        "warning: 2 unreadable line(s) of metrics.jsonl (line 1, 3) left out, the file moved "
        f"as it was to {workdir}/damaged_metrics/metrics.jsonl; kept its 2 readable line(s) "
        "up to step 6."], proc.stdout
    assert _read(os.path.join(workdir, "damaged_metrics", "metrics.jsonl")) == damaged
    assert [r.get("event") for r in metrics(workdir)] == [None, "note", None]
    assert epochs(workdir) == epochs(reference)
    assert_same_run(workdir, reference)


# --------------------------------------------------------------------------------------------
# A full disk.


def _allocated(folder):
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            st = os.stat(os.path.join(root, name))
            total += max(st.st_size, st.st_blocks * 512)
    return total


def _mount_tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs of {size} bytes at {path} (needs root): "
                    f"{proc.stderr.strip()}")


def _resize(path, size):
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


@pytest.fixture
def small_disks(reference, tmp_path):
    """Two tmpfs: room for less than one checkpoint, and for one but not two."""
    checkpoint = _allocated(os.path.join(reference, "checkpoints", "4"))
    sizes = {"first checkpoint": checkpoint // 2, "second checkpoint": checkpoint * 3 // 2}
    mounts = {}
    try:
        for i, (case, size) in enumerate(sizes.items()):
            mounts[case] = tmp_path / f"disk{i}"
            _mount_tmpfs(mounts[case], size)
        yield mounts, checkpoint
    finally:
        for path in mounts.values():
            subprocess.run(["umount", str(path)], capture_output=True)


def test_a_full_disk_is_one_message_and_the_resume_after_freeing_space_is_exact(
        data_dir, env, reference, small_disks, tmp_path):
    mounts, checkpoint = small_disks
    workdirs = [str(path / "run") for path in mounts.values()]
    argvs = [(cmd(w, data_dir), env) for w in workdirs]
    codes, texts = run_processes(argvs, tmp_path, 2 * TIMEOUT)
    for case, workdir, code, text in zip(mounts, workdirs, codes, texts, strict=True):
        errors = [line for line in text.splitlines() if line.startswith("train.py: error:")]
        assert code == 2 and len(errors) == 1, (case, text)
        assert errors[0].startswith(
            f"train.py: error: no space left on the disk of {workdir}"), (case, text)
        assert "the run needs about" in errors[0] and "free" in errors[0], (case, text)
        assert "Traceback" not in text and "Event loop is closed" not in text, (case, text)
        assert len(text.splitlines()) <= 5, (case, text)  # start line, epoch lines, the error
    for path in mounts.values():
        _resize(path, 8 * checkpoint + 2**20)  # the space freed
    codes, texts = run_processes(argvs, tmp_path, 2 * TIMEOUT)
    for case, workdir, code, text in zip(mounts, workdirs, codes, texts, strict=True):
        assert code == 0 and "Traceback" not in text, (case, text)
        assert_same_run(workdir, reference)


# --------------------------------------------------------------------------------------------
# Parameters that blow up; checkpoints of another optimizer.


def test_parameters_that_blow_up_are_not_checkpointed_so_a_lower_learning_rate_resumes(
        data_dir, env, reference, stopped, tmp_path):
    workdir = copy_of(stopped, tmp_path)
    # The loss stays finite (batch norm undoes the weights' scale) while they grow by 1e6.
    proc = run(cmd(workdir, data_dir, "--config.learning_rate=1e6"), env)
    assert_one_line_error(proc, "the parameters blew up: their norm is ", " at step 8, over "
                          "1000 times the ", "Checkpoint 6, the newest, predates it: run the "
                          "same command with a lower learning rate")
    assert steps(workdir) == [4, 6]
    proc = run(cmd(workdir, data_dir), env)  # the advice: the first learning rate again
    assert proc.returncode == 0, proc.stderr
    assert "Resuming from" in proc.stdout and "/checkpoints/6 at step 6" in proc.stdout
    assert_same_run(workdir, reference)


def test_the_blow_up_bound_refuses_non_finite_norms_and_says_when_to_start_over():
    loop_state.check_not_blown_up(7e3, 7.5, step=4, latest_step=None, workdir="w")  # < 1000x
    for norm in (float("nan"), float("inf"), 8e3):
        with pytest.raises(loop_state.ParametersBlewUpError,
                           match="No checkpoint predates it: start over"):
            loop_state.check_not_blown_up(norm, 7.5, step=4, latest_step=None, workdir="w")


def test_without_config_json_another_optimizer_is_named_not_called_damage(data_dir, env,
                                                                          stopped, tmp_path):
    workdir = copy_of(stopped, tmp_path)
    os.remove(os.path.join(workdir, "config.json"))
    before = sorted(os.listdir(workdir))
    proc = run(cmd(workdir, data_dir, "--config.optimizer=sgd"), env)
    assert_one_line_error(proc, f"the checkpoints in {workdir}/checkpoints (steps 6, 4) are "
                          "readable but hold the state of another model or optimizer",
                          "Resume with the config the run was started with",
                          f"{workdir}/config.json, the record of the run's config")
    assert "no intact checkpoint" not in proc.stderr
    assert sorted(os.listdir(workdir)) == before and steps(workdir) == [4, 6]
    shutil.rmtree(workdir)
