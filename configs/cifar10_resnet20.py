"""ResNet-20 on CIFAR-10 with batch statistics synchronized across all local devices.

He et al. (2016)'s CIFAR ResNet-20 (identity shortcuts, 0.27M parameters); the last batch norm
of each residual block starts with a zero scale. SGD with momentum 0.9, batch 128, peak learning
rate 0.1 with a cosine schedule, weight decay 1e-4, random crops and flips, 160 epochs. The
global batch is split across every local device and each bnjax.BatchNorm layer computes the
statistics of the global batch (axis_name="batch").

Command (CIFAR-10 must be prepared first, on a machine with network:
`pip install tensorflow && python -m bnjax_train.input_pipeline prepare tfds:cifar10
--data_dir data`):

    python train.py --config configs/cifar10_resnet20.py --workdir runs/cifar10_resnet20

Expected result (the paper's figure, not measured here: this machine cannot download CIFAR-10,
and 160 epochs need an accelerator): test accuracy about 0.91-0.92 (He et al.: 91.25%).
"""

import os
import runpy

import ml_collections

# The default config, loaded by path so this file works wherever it is run from.
default = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))


def get_config() -> ml_collections.ConfigDict:
    config = default["get_config"]()
    config.dataset = "tfds:cifar10"
    config.model = "resnet20"
    config.augment = "crop_flip"
    config.batch_size = 128
    config.eval_batch_size = 1000
    config.num_epochs = 160
    config.optimizer = "momentum"
    config.learning_rate = 0.1
    config.schedule = "warmup_cosine"
    config.warmup_epochs = 2.0
    config.weight_decay = 1e-4
    config.momentum = 0.9
    return config
