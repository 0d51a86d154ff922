"""The Keras tutorial's KMNIST model: Conv32-BN-Pool-BN-Conv64-BN-Pool-BN-Dense256-BN-Dense10.

Adam, batch 250, 25 epochs, 20% of the training set held out for validation (the metrics hold
`val_accuracy` as well as `test_accuracy`).

Command (KMNIST must be prepared first, on a machine with network:
`pip install tensorflow && python -m bnjax_train.input_pipeline prepare tfds:kmnist
--data_dir data`):

    python train.py --config configs/kmnist_cnn.py --workdir runs/kmnist_cnn

Expected result (not measured here: this machine cannot download KMNIST): validation accuracy
about 0.99 and test accuracy about 0.95.
"""

import os
import runpy

import ml_collections

# The default config, loaded by path so this file works wherever it is run from.
default = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))


def get_config() -> ml_collections.ConfigDict:
    config = default["get_config"]()
    config.dataset = "tfds:kmnist"
    config.model = "kmnist_cnn"
    config.validation_split = 0.2
    config.batch_size = 250
    config.eval_batch_size = 1000
    config.num_epochs = 25
    config.optimizer = "adam"
    config.learning_rate = 1e-3
    config.schedule = "constant"
    config.warmup_epochs = 0.0
    config.weight_decay = 0.0
    return config
