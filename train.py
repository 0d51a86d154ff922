"""Trains a model with bnjax.BatchNorm; the default is a 1D conv net on MNIST-1D (no network).

Usage (from the repository root, after ``pip install -e ".[train]"``):

    python train.py                                   # configs/default.py -> runs/default
    python train.py --config configs/tiny.py --workdir /tmp/tiny
    python train.py --config configs/default.py --config.learning_rate=1e-3 --config.norm=none

Running the same command again on the same ``--workdir`` resumes from the last checkpoint.
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
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))

config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "default.py"),
    "Training config file (Python, get_config()); override fields with --config.FIELD=VALUE.",
    lock_config=True)
flags.DEFINE_string("workdir", None,
                    "Output folder (checkpoints, metrics.jsonl, config.json, curves.png); "
                    "default: runs/<config file name>.")
flags.DEFINE_string("coordinator_address", os.environ.get("BNJAX_COORDINATOR_ADDRESS"),
                    "Multi-host: host:port of process 0 (env BNJAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", int(os.environ.get("BNJAX_NUM_PROCESSES", "1")),
                     "Multi-host: number of processes (env BNJAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", int(os.environ.get("BNJAX_PROCESS_ID", "0")),
                     "Multi-host: this process's index (env BNJAX_PROCESS_ID).")
flags.DEFINE_string("jax_cache_dir",
                    os.environ.get("JAX_COMPILATION_CACHE_DIR",
                                   os.path.join(_HERE, "runs", ".jax_cache")),
                    "Persistent XLA compilation cache: a resumed or repeated run skips "
                    "recompiling; empty to disable.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> int:
    """Validates the config, then trains (``bnjax_train.train.train_and_evaluate``)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; see --helpfull.")
    if "--verbosity" not in " ".join(sys.argv) and "-v" not in sys.argv:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    # Imported here so that --help answers without starting JAX.
    import bnjax
    from bnjax_train import input_pipeline, train

    if FLAGS.jax_cache_dir:
        import jax

        jax.config.update("jax_compilation_cache_dir", FLAGS.jax_cache_dir)
    if FLAGS.num_processes > 1:
        if not FLAGS.coordinator_address:
            raise app.UsageError("--num_processes > 1 needs --coordinator_address=HOST:PORT "
                                 "(or BNJAX_COORDINATOR_ADDRESS).")
        bnjax.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                     FLAGS.process_id)
    workdir = FLAGS.workdir
    if not workdir:
        name = os.path.splitext(os.path.basename(FLAGS["config"].config_filename))[0]
        workdir = os.path.join("runs", name)
    try:
        train.train_and_evaluate(FLAGS.config, workdir)
    except (ValueError, input_pipeline.DatasetNotFoundError, train.NonFiniteTrainingError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(main)
