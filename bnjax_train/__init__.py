"""The training program around bnjax: datasets, model zoo, the loop, checkpoints, comparisons.

It uses the library (``import bnjax``) as any user would and is not part of it: ``pip install
-e ".[train]"`` brings its dependencies, and ``python train.py`` (at the repository root) runs
it. Modules, from the entry point down:

- :mod:`bnjax_train.train`: ``create_train_state``, ``train_epoch``, ``evaluate`` and
  ``train_and_evaluate``, the loop that ``train.py`` runs;
- :mod:`bnjax_train.loop_state`: where the loop is, its sums and the non-finite step count;
- :mod:`bnjax_train.parallelism`: ``config.parallel`` (a device mesh under ``jax.jit`` or
  ``jax.shard_map``, or ``pmap``) and where the steps' arrays go;
- :mod:`bnjax_train.checkpointing`: orbax checkpoints and the other files of a workdir;
- :mod:`bnjax_train.config_lib`: the config schema and its validation, ``load_config``;
- :mod:`bnjax_train.input_pipeline` and :mod:`bnjax_train.sources`: MNIST-1D and ``tfds:NAME``
  sets, batches;
- :mod:`bnjax_train.models`: the model zoo with a pluggable norm;
- :mod:`bnjax_train.reporting`: printed lines and ``curves.png``;
- :mod:`bnjax_train.compare`: the batch-norm ablation (``python -m bnjax_train.compare``).
"""
