"""configs/digits_keras_cnn.py without batch norm: the same network, data and training.

Conv2D 32 - MaxPool - Conv2D 64 - MaxPool - Flatten - Dense 256 - Dense 10 (the zoo's
``kmnist_cnn`` with ``norm="none"``); everything else is configs/digits_keras_cnn.py.

Command (no network, no preparation):

    python train.py --config configs/digits_keras_cnn_nobn.py --workdir runs/digits_keras_cnn_nobn

Expected result: about the BN network's final test accuracy, reached in more steps
(measured: benchmarks/results/train_digits.json, rendered in docs/training.md).
"""

import os
import runpy

import ml_collections

# The BN config, loaded by path so this file works wherever it is run from.
with_bn = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                      "digits_keras_cnn.py"))


def get_config() -> ml_collections.ConfigDict:
    config = with_bn["get_config"]()
    config.norm = "none"
    return config
