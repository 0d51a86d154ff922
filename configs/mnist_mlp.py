"""The batch-norm paper's MNIST experiment (Ioffe and Szegedy, 2015, section 4.1, figure 1).

Three fully connected sigmoid hidden layers of 100 units, batch 60, 50000 steps of plain SGD
(50 epochs of the 60000 training images); batch norm before each sigmoid, or none.

Commands (MNIST must be prepared first, on a machine with network:
`pip install tensorflow && python -m bnjax_train.input_pipeline prepare tfds:mnist
--data_dir data`):

    python train.py --config configs/mnist_mlp.py --workdir runs/mnist_mlp_bn
    python train.py --config configs/mnist_mlp.py --config.with_bn=False \
        --workdir runs/mnist_mlp_nobn

Expected result (the paper's figure 1a, not measured here: this machine cannot download MNIST):
test accuracy about 0.98 with batch norm, reached much sooner; without it the sigmoid network
learns more slowly and ends lower (about 0.96-0.97).
"""

import os
import runpy

import ml_collections

# The default config, loaded by path so this file works wherever it is run from.
default = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))


def get_config() -> ml_collections.ConfigDict:
    config = default["get_config"]()
    config.dataset = "tfds:mnist"
    config.model = "mlp"
    config.with_bn = True  # False: the paper's baseline without batch norm (sets norm="none")
    config.batch_size = 60
    config.eval_batch_size = 1000
    config.num_epochs = 50
    config.optimizer = "sgd"
    config.learning_rate = 0.5
    config.schedule = "constant"
    config.warmup_epochs = 0.0
    config.weight_decay = 0.0
    return config
