"""The default MNIST-1D conv net without batch norm (the ablation's baseline).

Command:

    python train.py --config configs/mnist1d_nobn.py --workdir runs/mnist1d_nobn

Expected result: a lower final test accuracy than with batch norm, learned more slowly
(compare both with `python -m bnjax_train.compare`; measured figures of both in
benchmarks/results/train_default.json, rendered in docs/training.md). The conv and dense
layers get biases in place of the batch-norm offsets; everything else is the default config.
"""

import os
import runpy

import ml_collections

# The default config, loaded by path so this file works wherever it is run from.
default = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))


def get_config() -> ml_collections.ConfigDict:
    config = default["get_config"]()
    config.norm = "none"
    return config
