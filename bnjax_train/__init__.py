"""The training program around bnjax: datasets, model zoo, the loop, checkpoints, comparisons.

It uses the library (``import bnjax``) as any user would and is not part of it: ``pip install
-e ".[train]"`` brings its dependencies, and ``python train.py`` (at the repository root) runs
it. Modules, from the entry point down:

- :mod:`bnjax_train.train`: ``create_train_state`` and ``train_and_evaluate``, the loop that
  ``train.py`` runs; :mod:`bnjax_train.epochs`: ``train_epoch``, ``evaluate``, ``end_epoch``;
- :mod:`bnjax_train.loop_state`: where the loop is, its sums and the non-finite step count;
- :mod:`bnjax_train.workdir`: one run per workdir (an OS lock), the workdir checked before
  the first step, nothing left behind by a failed start-up;
- :mod:`bnjax_train.stopping`: SIGINT/SIGTERM finish the step, save and exit (130/143);
- :mod:`bnjax_train.checkpointing`: orbax checkpoints, checked on resume (a damaged newest one
  is skipped); :mod:`bnjax_train.resume`: where a run starts (fresh, resumed, finished) and
  which config changes a resume accepts; :mod:`bnjax_train.run_files`: ``config.json`` and
  ``metrics.jsonl`` (strict JSON);
- :mod:`bnjax_train.parallelism`: ``config.parallel`` (a device mesh under ``jax.jit`` or
  ``jax.shard_map``, or ``pmap``) and where the steps' arrays go;
- :mod:`bnjax_train.config_lib`: the config schema and its validation, ``load_config``;
  :mod:`bnjax_train.model_options`: each model's ``model_kwargs``;
  :mod:`bnjax_train.overrides`: ``--config.FIELD=VALUE`` on the command line;
- :mod:`bnjax_train.input_pipeline` and :mod:`bnjax_train.sources`: MNIST-1D, scikit-learn's
  digits and ``tfds:NAME`` sets, batches;
- :mod:`bnjax_train.models`: the model zoo with a pluggable norm;
- :mod:`bnjax_train.studies`: ``python -m bnjax_train.studies NAME``, nine claims about batch
  norm measured over seeds (vmapped training runs), with tables, figures and verdicts;
- :mod:`bnjax_train.reporting`: printed lines and ``curves.png``;
- :mod:`bnjax_train.compare`: the batch-norm ablation (``python -m bnjax_train.compare``).
"""
