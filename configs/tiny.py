"""A few steps of a very small net on part of MNIST-1D: for tests and quick checks.

Command:

    python train.py --config configs/tiny.py --workdir /tmp/bnjax_tiny

Expected result: finishes in seconds (2 epochs of 4 steps); the accuracy is meaningless.
Running it again prints "Finished run in /tmp/bnjax_tiny: ..." and writes nothing; Ctrl-C
during the run prints "interrupted at step N; saved; run the same command to resume" (exit
code 130). The tests of the program's robustness (tests/test_train_hardening.py) run this.
"""

import os
import runpy

import ml_collections

# The default config, loaded by path so this file works wherever it is run from.
default = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))


def get_config() -> ml_collections.ConfigDict:
    config = default["get_config"]()
    config.max_train_examples = 256
    config.batch_size = 64
    config.eval_batch_size = 256
    config.num_epochs = 2
    # One conv block and the dense hidden layer, each with batch norm: the smallest net with
    # every kind of layer of the default one (each layer more is more to compile, in every test).
    config.model_kwargs = ml_collections.ConfigDict(
        {"features": (8,), "pool_after": (0,), "hidden": 16})
    config.progress_bar = False
    return config
