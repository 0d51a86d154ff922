"""Small batches (8 examples): how the norm choices compare where batch statistics are noisy.

Command (one run per norm; only ``--config.norm`` changes):

    python train.py --config configs/mnist1d_small_batch.py --workdir runs/sb_renorm
    python train.py --config configs/mnist1d_small_batch.py --config.norm=batch \\
        --workdir runs/sb_batch
    # ... and --config.norm=ghost, group, layer, none

``norm`` picks the layer of every conv and dense block (``bnjax_train.models.make_norm``):
``"batch"`` (plain batch norm over the 8 examples), ``"renorm"`` (batch renormalization,
Ioffe 2017, with the clipping ramp of ``bnjax_train.models.NORM_DEFAULTS``: plain BN for 500 steps,
then rmax -> 3 by step 4000 and dmax -> 5 by step 2500), ``"ghost"`` (ghost batches of 4: even
noisier statistics, a regularizer), ``"group"`` / ``"layer"`` (statistics per example, so the
batch size does not matter) and ``"none"``. Per-norm options live in
``model_kwargs.norm_kwargs`` below, keyed by norm name, so switching ``norm`` alone is enough.

Expected result: the test accuracies of the six runs side by side (the batch-size study,
`python -m bnjax_train.studies batch_size`, measures the same question over several batch
sizes and seeds; docs/studies.md). 6 epochs of 500 steps, a few minutes per run on 2 CPU
cores.
"""

import os
import runpy

import ml_collections

# The default config, loaded by path so this file works wherever it is run from.
default = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))


def get_config() -> ml_collections.ConfigDict:
    config = default["get_config"]()
    config.norm = "renorm"  # "batch", "renorm", "ghost", "group", "layer", "none"
    config.batch_size = 8
    config.num_epochs = 6
    config.learning_rate = 1e-3
    config.model_kwargs = ml_collections.ConfigDict({
        "norm_kwargs": {
            "ghost": {"virtual_batch_size": 4},
            "group": {"num_groups": 8},
        },
    })
    config.progress_bar = False
    return config
