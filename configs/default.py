"""Default: a 1D conv net with bnjax.BatchNorm on MNIST-1D (generated locally, no network).

Command (from the repository root):

    python train.py

or, equivalently, ``python train.py --config configs/default.py --workdir runs/default``.

Expected result: a final test accuracy of about 0.97 after 20 epochs (the MNIST-1D paper's
CNN: 0.94), in well under a minute on 2 CPU cores; the last line printed is
"Final test accuracy: ...". The measured figures (accuracy, steps to each accuracy, wall time,
with and without batch norm) are in benchmarks/results/train_default.json, made by
`python -m benchmarks train --out benchmarks/results/train_default.json` and rendered in
docs/training.md.
Every field below is checked at start-up (a bad one: exit code 2 and a message naming it); set
any with --config.FIELD=VALUE (--config.model_kwargs.OPTION=VALUE for the model's options);
`python train.py --helpfull` lists the other flags. Running the same command again resumes
the run in its workdir from the newest intact checkpoint; Ctrl-C or SIGTERM saves first.
A resumed run may change learning_rate, schedule, warmup_epochs, num_epochs, eval_batch_size,
checkpoint_every_steps, keep_checkpoints, max_consecutive_skips, max_param_growth,
precise_bn_batches and export_folded (the change is logged in metrics.jsonl), and data_dir,
progress_bar and stop_after_steps; any other change is refused, naming the fields.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Data.
    config.dataset = "mnist1d"  # "mnist1d" or "tfds:NAME" (mnist, kmnist, fashion_mnist, cifar10)
    config.data_dir = "data"  # MNIST-1D cache; first folder searched for prepared tfds sets
    config.validation_split = 0.0  # fraction of the training set held out for validation
    config.max_train_examples = 0  # use only the first N training examples (0: all)
    config.augment = "none"  # "none" or "crop_flip" (images)

    # Model.
    config.model = "cnn1d"  # "cnn1d", "mlp", "kmnist_cnn", "resnet20"
    config.norm = "batch"  # "batch" (bnjax.BatchNorm) or "none"
    config.model_kwargs = ml_collections.ConfigDict()  # extra model attributes

    # Optimization.
    config.seed = 0
    config.num_epochs = 20  # more on resume: a finished run trains on
    config.batch_size = 100  # global batch, split across all devices
    config.eval_batch_size = 1000
    config.optimizer = "adamw"  # "adam", "adamw", "sgd", "momentum"
    config.learning_rate = 3e-3  # peak learning rate
    config.schedule = "warmup_cosine"  # "constant", "cosine", "warmup_cosine"
    config.warmup_epochs = 1.0
    config.weight_decay = 1e-4  # decoupled (adamw) or added to the gradient (sgd, momentum)
    config.momentum = 0.9  # for "momentum"
    config.max_consecutive_skips = 20  # stop after this many non-finite steps in a row
    # Stop, without saving them, when the parameters' norm is over this many times its initial
    # value (they blew up: no resume could use them); 0: no limit.
    config.max_param_growth = 1000.0

    # Devices: with more than one, "mesh" (jax.jit over a device mesh), "shard_map" (the same
    # mesh under jax.shard_map) or "pmap"; a run may resume in another mode.
    config.parallel = "mesh"

    # Checkpoints, logging.
    config.checkpoint_every_steps = 0  # also save every N steps (0: each epoch and the end)
    config.keep_checkpoints = 2  # the newest K; a damaged newest one is skipped on resume
    config.progress_bar = True  # drawn only when stdout and stderr are terminals
    config.stop_after_steps = 0  # stop (as if interrupted) after N steps; 0: never

    # Inference tools at the end of training (bnjax.inference).
    config.precise_bn_batches = 0  # > 0: PreciseBN population statistics over N train batches
    config.export_folded = False  # write <workdir>/folded/ (BN folded, serialized jax.export)
    return config
