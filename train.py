"""Trains a model with bnjax.BatchNorm; the default is a 1D conv net on MNIST-1D (no network).

Usage (from the repository root, after ``pip install -e ".[train]"``):

    python train.py                                   # configs/default.py -> runs/default
    python train.py --config configs/tiny.py --workdir /tmp/tiny
    python train.py --config configs/default.py --config.learning_rate=1e-3 --config.norm=none

Running the same command again on the same ``--workdir`` resumes from the newest intact
checkpoint (damaged ones are skipped with a warning); on a finished run it prints the result
and writes nothing. ``--config.FIELD=VALUE`` sets any field of the config (in any order with
``--config``; ``--config.model_kwargs.features=(16,16)`` for the model's options); every field
is checked before anything runs, and a bad one, a bad flag, config file or workdir ends the
program with exit code 2 and one message naming it; so does a full disk (naming the folder
and the space a checkpoint needs: the same command resumes once space is freed). When a run
resumes, the learning rate and its schedule, the number of epochs, the evaluation and
checkpoint cadence and the skip and blow-up limits may change (the change is logged in
``metrics.jsonl``); other changes are refused.

One run per workdir: a second ``train.py`` on a workdir in use exits at once (code 2) naming
the running process. Ctrl-C (SIGINT) or SIGTERM finishes the current step, saves a checkpoint
and exits with code 130 / 143 (``interrupted at step N; saved; run the same command to
resume``); a second Ctrl-C exits at once (the last complete checkpoint still resumes).

The config files are Python (``get_config()``), executed as code by design: run only configs
you trust. The program itself is the ``bnjax_train`` package next to this file
(``bnjax_train.train.train_and_evaluate``).

Multi-host (several processes, e.g. one per machine), on every process:

    python train.py --coordinator_address=HOST0:1234 --num_processes=N --process_id=I ...

or the environment variables ``BNJAX_COORDINATOR_ADDRESS``, ``BNJAX_NUM_PROCESSES`` and
``BNJAX_PROCESS_ID``; these call ``jax.distributed.initialize`` (through
``bnjax.initialize_distributed``) before anything else, and each process then reads its own
shard of the data.
"""

import os
import signal
import sys

from absl import app, flags, logging

from bnjax_train.overrides import split_overrides

_HERE = os.path.dirname(os.path.abspath(__file__))
_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                      "bnjax", "jax_cache")

flags.DEFINE_string(
    "config", os.path.join(_HERE, "configs", "default.py"),
    "Training config file (Python, get_config()); set any field with --config.FIELD=VALUE "
    "(see configs/default.py for every field).")
flags.DEFINE_string("workdir", None,
                    "Output folder (checkpoints, metrics.jsonl, config.json, curves.png); "
                    "default: runs/<config file name>.")
flags.DEFINE_string("coordinator_address", os.environ.get("BNJAX_COORDINATOR_ADDRESS"),
                    "Multi-host: host:port of process 0 (env BNJAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", int(os.environ.get("BNJAX_NUM_PROCESSES", "1")),
                     "Multi-host: number of processes (env BNJAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", int(os.environ.get("BNJAX_PROCESS_ID", "0")),
                     "Multi-host: this process's index (env BNJAX_PROCESS_ID).")
flags.DEFINE_string("jax_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR", _CACHE),
                    "Persistent XLA compilation cache, so that a resumed or repeated run skips "
                    "recompiling: a folder ('{workdir}' stands for the run's workdir, e.g. "
                    "'{workdir}/jax_cache'), or empty to disable. Default: "
                    "$JAX_COMPILATION_CACHE_DIR, else a per-user cache folder "
                    "($XDG_CACHE_HOME or ~/.cache, then bnjax/jax_cache).")
FLAGS = flags.FLAGS

#: The ``--config.FIELD=VALUE`` arguments, taken out of argv before absl parses it.
_OVERRIDES: list[tuple[str, str | None]] = []


def _fail(message: object) -> int:
    print(f"train.py: error: {message}", file=sys.stderr)
    return 2


def _parse_flags(argv: list[str]) -> list[str]:
    """Parses the flags as absl does, with a bad flag reported in one line (exit code 2)."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        sys.exit(_fail(f"{e} (see --helpfull)"))


def _load_config() -> object:
    from bnjax_train.config_lib import load_config
    from bnjax_train.overrides import apply_overrides

    return apply_overrides(load_config(FLAGS.config), _OVERRIDES)


def _start_jax(workdir: str) -> None:
    """Compilation cache and multi-host initialization, before anything else uses JAX."""
    import jax

    import bnjax

    if FLAGS.jax_cache_dir:
        jax.config.update("jax_compilation_cache_dir",
                          FLAGS.jax_cache_dir.replace("{workdir}", workdir))
    if FLAGS.num_processes > 1:
        if not FLAGS.coordinator_address:
            raise ValueError("--num_processes > 1 needs --coordinator_address=HOST:PORT (or "
                             "BNJAX_COORDINATOR_ADDRESS).")
        bnjax.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                     FLAGS.process_id)


def main(argv: list[str]) -> int:
    """Loads and checks the config, then trains (``bnjax_train.train.train_and_evaluate``)."""
    if len(argv) > 1:
        return _fail(f"unexpected arguments {argv[1:]}; see --helpfull.")
    if "--verbosity" not in " ".join(sys.argv) and "-v" not in sys.argv:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    # Imported here so that --help answers without starting JAX.
    from bnjax_train import input_pipeline, train

    try:
        config = _load_config()
    except ValueError as e:  # ConfigFileError (a FileNotFoundError too) is one
        return _fail(e)
    workdir = FLAGS.workdir
    if not workdir:
        name = os.path.splitext(os.path.basename(FLAGS.config))[0]
        workdir = os.path.join("runs", name)
    try:
        _start_jax(os.path.abspath(workdir))
        result = train.train_and_evaluate(config, workdir)
    except (ValueError, input_pipeline.DatasetNotFoundError, train.NonFiniteTrainingError) as e:
        return _fail(e)
    if result.get("signal"):
        return 128 + signal.Signals[result["signal"]]
    return 0


if __name__ == "__main__":
    _ARGV, _OVERRIDES[:] = split_overrides(sys.argv)
    app.run(main, argv=_ARGV, flags_parser=_parse_flags)
