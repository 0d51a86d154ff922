"""``bnjax-bench`` as a user meets it: a real ``python -m bnjax.timing`` on a module of tiny
models written next to it. Every user error is one line on stderr and exit status 2; no time
is asserted."""

import json
import subprocess
import sys
import textwrap

import pytest
from caches import fast_compile_env
from processes import one_device_env

MODELS = textwrap.dedent('''
    import flax.linen as nn
    import jax.numpy as jnp


    class DropNet(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
            return nn.Dense(3)(nn.Dropout(0.5, deterministic=not train)(x))


    class Keyed(nn.Module):  # the idiom of jax-resnet: the mode follows mutable batch_stats
        @nn.compact
        def __call__(self, x):
            train = self.is_mutable_collection("batch_stats")
            x = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
            return nn.Dense(3)(x)


    class Det(nn.Module):  # its keyword's True means inference
        @nn.compact
        def __call__(self, x, deterministic=False):
            x = nn.BatchNorm(use_running_average=deterministic)(nn.Dense(4)(x))
            return nn.Dense(3)(x)


    class Flat(nn.Module):  # takes examples of 8 values only
        @nn.compact
        def __call__(self, x, train):
            x = nn.BatchNorm(use_running_average=not train)(x.reshape((x.shape[0], 8)))
            return nn.Dense(3)(x)


    def make_model():
        return DropNet()


    def wide(width=4):
        return DropNet()


    def broken():
        raise RuntimeError("no weights for this size")
''')


def _bench(tmp_path, *args, timeout=300):
    (tmp_path / "tiny_models.py").write_text(MODELS)
    (tmp_path / "needs_missing.py").write_text("import not_installed_anywhere\n")
    return subprocess.run([sys.executable, "-m", "bnjax.timing", *args], cwd=tmp_path,
                          env=fast_compile_env(one_device_env()), capture_output=True,
                          text=True, timeout=timeout)


QUICK = ["--input-shape", "2", "--batch-size", "8", "--num-classes", "3", "--reps", "1",
         "--warmup", "0", "--dtypes", "float32"]


@pytest.mark.parametrize("args,message", [
    (["--model", "no_such_module:net"],
     "--model='no_such_module:net': no module 'no_such_module' can be imported from"),
    (["--model", "no_such_package.models:net"],
     "--model='no_such_package.models:net': no module 'no_such_package' can be imported from"),
    (["--model", "needs_missing:net"], "--model='needs_missing:net': importing needs_missing "
                                       "raised ModuleNotFoundError: No module named "
                                       "'not_installed_anywhere'"),
    (["--model", "tiny_models:Nope"], "--model='tiny_models:Nope': tiny_models has no attribute "
                                      "'Nope'."),
    (["--model", "tiny_models:broken"], "--model='tiny_models:broken': the factory broken(**{}) "
                                        "raised RuntimeError: no weights for this size"),
    (["--model", "tiny_models:wide", "--kwarg", "depth=2"],
     "--kwarg depth=...: wide takes no keyword argument 'depth' (it takes ['width'])."),
    (["--model", "tiny_models:DropNet", "--mode", "training"],
     "--mode='training': DropNet.__call__ takes no argument 'training' (its parameters: "
     "['x', 'train'])"),
    (["--model", "tiny_models:DropNet", "--batch-size", "0"],
     "--batch-size=0 must be an integer >= 1."),
    (["--model", "tiny_models:DropNet", "--num-classes", "0"],
     "--num-classes=0 must be an integer >= 1."),
    (["--model", "tiny_models:DropNet", "--dtypes", "float16"],
     "--dtypes='float16' must be a comma-separated list of float32, bfloat16."),
    (["--model", "tiny_models:Flat", "--input-shape", "5"],
     "Flat cannot take batch['x'] of shape (8, 5) (float32): TypeError: cannot reshape"),
    (["--model", "tiny_models:DropNet", "--num-classes", "7"],
     "batch['y'] holds labels from 0 to 6, but DropNet returns 3 logits per example"),
], ids=["module", "package", "missing-import", "attribute", "factory", "kwarg", "mode",
        "batch-size", "num-classes", "dtypes", "input-shape", "labels"])
def test_a_user_error_is_one_line_and_exit_2(tmp_path, args, message):
    flags = dict(zip(QUICK[::2], QUICK[1::2], strict=True))
    flags.update(zip(args[::2], args[1::2], strict=True))  # the case's flags win
    proc = _bench(tmp_path, *(a for kv in flags.items() for a in kv), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("bnjax-bench: error: ")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert message in proc.stderr, proc.stderr


@pytest.mark.parametrize("steps,message", [
    ("train,eval", "Det's eval step calls model.apply(variables, x, deterministic=False), which "
                   "leaves the batch norm at /BatchNorm_0 in training mode"),
    ("train", "Det's train step (flax BN, float32) updates no batch statistics: "
              "model.apply(variables, x, deterministic=True, mutable=['batch_stats']) leaves "
              "every batch norm on its moving statistics"),
], ids=["eval", "train"])
def test_a_mode_whose_true_means_inference_is_refused(tmp_path, steps, message):
    proc = _bench(tmp_path, "--model", "tiny_models:Det", "--mode", "deterministic",
                  "--steps", steps, *QUICK)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr and last.startswith("bnjax-bench: error: ")
    assert message in last, proc.stderr
    assert "--mode='deterministic' must name the keyword whose True switches training on" in last
    assert "flax.readthedocs.io" not in last  # Flax's link left out of the one line


def test_a_model_with_dropout_is_timed_and_named_after_it(tmp_path):
    """A generic factory name gives the class name; compiling is announced; the table has the
    quartiles and the device line reads like a device."""
    out = tmp_path / "r.json"
    proc = _bench(tmp_path, "--model", "tiny_models:make_model", *QUICK, "--reps", "3",
                  "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["model"]
    assert {r["model"] for r in rows} == {"DropNet"}
    assert [(r["step"], r["variant"]) for r in rows] == [
        (s, v) for s in ("train", "eval") for v in ("bnjax BN", "flax BN", "no norm")]
    for line in ("compiling DropNet (flax BN, train step, float32) ...",
                 "compiling DropNet (bnjax BN, eval step, float32) ...",
                 "compiling DropNet (no norm, train step, float32) ..."):
        assert line in proc.stderr.splitlines(), proc.stderr
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| step"))
    assert header.split(" | ")[2:4] == ["ms", "p25-p75 ms"]
    first = next(line for line in proc.stdout.splitlines() if line.startswith("| DropNet"))
    r = rows[0]
    low, high = first.split(" | ")[3].split("-")
    assert float(low) == pytest.approx(r["p25_ms"], rel=0.01, abs=1e-3)
    assert float(high) == pytest.approx(r["p75_ms"], rel=0.01, abs=1e-3)
    assert "\ncpu (1 device); jax " in proc.stdout
    assert json.loads(out.read_text())["meta"]["environment"]["device"] == "cpu (1 device)"


def test_a_model_that_trains_when_batch_stats_is_mutable_is_timed(tmp_path):
    out = tmp_path / "r.json"
    proc = _bench(tmp_path, "--model", "tiny_models:Keyed", *QUICK, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["model"]
    assert {(r["model"], r["step"]) for r in rows} == {("Keyed", "train"), ("Keyed", "eval")}


def test_help_shows_the_defaults(tmp_path):
    proc = _bench(tmp_path, "--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for default in ("(default: 128)", "(default: 10)", "(default: float32,bfloat16)",
                    "(default: train,eval)", "(default: 20)", "(default: 2)",
                    "(default: bnjax_bench.json)"):
        assert default in text, default
