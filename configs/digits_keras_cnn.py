"""The Keras tutorial's BN network on scikit-learn's handwritten digits (offline, 8x8 images).

Conv2D 32 - BN - MaxPool - BN - Conv2D 64 - BN - MaxPool - BN - Flatten - Dense 256 - BN -
Dense 10 (the zoo's ``kmnist_cnn``: 3x3 convolutions with ReLU, 2x2 max pooling), on the
``"digits"`` dataset: the 1,797 8x8 digits that ship inside scikit-learn, 1,437 for training
and 360 for testing (a fixed split). Adapted to 8x8 by the "SAME" padding of the
convolutions, so the two poolings take 8x8 to 4x4 to 2x2 and the dense layer sees 2x2x64 =
256 values (28x28 inputs give it 7x7x64); nothing else changes. Keras's defaults otherwise:
Adam at 1e-3, constant, batch 32, no weight decay; 20 epochs of 44 steps.

Command (no network, no preparation):

    python train.py --config configs/digits_keras_cnn.py --workdir runs/digits_keras_cnn

Expected result: test accuracy about 0.99, reached in fewer steps than without batch norm
(measured beside the same network without it, configs/digits_keras_cnn_nobn.py:
benchmarks/results/train_digits.json, rendered in docs/training.md).
"""

import os
import runpy

import ml_collections

# The default config, loaded by path so this file works wherever it is run from.
default = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))


def get_config() -> ml_collections.ConfigDict:
    config = default["get_config"]()
    config.dataset = "digits"
    config.model = "kmnist_cnn"
    config.batch_size = 32
    config.eval_batch_size = 360
    config.num_epochs = 20
    config.optimizer = "adam"
    config.learning_rate = 1e-3
    config.schedule = "constant"
    config.warmup_epochs = 0.0
    config.weight_decay = 0.0
    return config
