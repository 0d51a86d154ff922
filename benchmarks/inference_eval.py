r"""Inference tools on a trained model: PreciseBN, Monte Carlo batch norm, folding.

Command (from the repository root)::

    python -m benchmarks inference_eval                  # configs/default.py (MNIST-1D)
    python -m benchmarks inference_eval --num_epochs 2   # its own workdir and output
    python -m benchmarks inference_eval --config configs/default.py --num_samples 32 \
        --out benchmarks/results/inference_eval.json

Trains the config's model with ``bnjax_train.train.train_and_evaluate`` into ``--workdir``
(default ``runs/inference_eval/<config name>[_<N>ep]``, one per training configuration; a
finished run there is reused), restores the final parameters and moving statistics from its last
checkpoint, and reports on the test set:

- accuracy with the moving-average statistics vs PreciseBN population statistics
  (``bnjax.precise_batch_stats`` over the whole training set, in batches of the training batch
  size; biased and unbiased variance);
- Monte Carlo batch norm (``bnjax.mc_batch_norm_predict``, statistics of sampled training
  batches): accuracy of the mean prediction vs plain inference, and how well its uncertainty
  ranks out-of-distribution inputs above the test inputs (AUROC). The out-of-distribution set
  is the test set with the positions of every sequence shuffled (a random permutation per
  example), which keeps each sequence's values and destroys its shape;
- the folded model (``bnjax.fold_batch_norm``): its accuracy and largest logit difference.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import bnjax
from bnjax_train import checkpointing, config_lib, input_pipeline, train
from bnjax_train import models as models_lib
from bnjax_train.studies.metrics import auroc, entropy

__all__ = ["default_workdir", "run"]


def default_workdir(config_path: str, num_epochs: int = 0) -> str:
    """The workdir of one training configuration: ``runs/inference_eval/<name>[_<N>ep]``.

    Example:
      >>> default_workdir("configs/default.py"), default_workdir("configs/default.py", 2)
      ('runs/inference_eval/default', 'runs/inference_eval/default_2ep')
    """
    name = Path(config_path).stem + (f"_{num_epochs}ep" if num_epochs else "")
    return os.path.join("runs", "inference_eval", name)


def _stat_differences(moving: Any, precise: Any) -> dict[str, float]:
    """How far the moving statistics are from the population ones, over all channels."""
    from flax.traverse_util import flatten_dict

    def gather(tree: Any) -> dict[str, np.ndarray]:
        flat = flatten_dict(tree)
        return {k: np.concatenate([np.ravel(v) for p, v in sorted(flat.items()) if p[-1] == k])
                for k in ("mean", "var")}

    m, p = gather(moving), gather(precise)
    var_rel = np.abs(p["var"] - m["var"]) / p["var"]
    mean_std = np.abs(p["mean"] - m["mean"]) / np.sqrt(p["var"])
    return {"var_rel_diff_median": float(np.median(var_rel)),
            "var_rel_diff_max": float(var_rel.max()),
            "mean_diff_in_std_median": float(np.median(mean_std)),
            "mean_diff_in_std_max": float(mean_std.max())}


def _precise_bn(ctx: dict[str, Any], out: dict[str, Any]) -> None:
    """PreciseBN over the whole training set, biased and unbiased variance."""
    for unbiased in (False, True):
        t = time.time()
        precise = bnjax.precise_batch_stats(ctx["model"], ctx["variables"], ctx["batches"],
                                            num_batches=len(ctx["batches"]), unbiased=unbiased)
        key = "precise_unbiased" if unbiased else "precise"
        out[f"test_accuracy_{key}"] = ctx["accuracy"](precise)
        out[f"{key}_seconds"] = time.time() - t
        if not unbiased:
            out["precise_vs_moving"] = _stat_differences(ctx["variables"]["batch_stats"],
                                                         precise["batch_stats"])


def _mc_batch_norm(ctx: dict[str, Any], out: dict[str, Any], num_samples: int,
                   seed: int) -> None:
    """Monte Carlo batch norm, in and out of distribution (the same sampled batches)."""
    model, variables, apply = ctx["model"], ctx["variables"], ctx["apply"]
    x_test, x_ood, y_test = ctx["x_test"], ctx["x_ood"], ctx["y_test"]
    key = jax.random.key(seed)
    t = time.time()
    mc_in = bnjax.mc_batch_norm_predict(model, variables, x_test, ctx["batches"], num_samples,
                                        rng=key)
    mc_out = bnjax.mc_batch_norm_predict(model, variables, x_ood, ctx["batches"], num_samples,
                                         rng=key)
    out["mcbn_seconds"] = time.time() - t
    out["mcbn_num_samples"] = num_samples
    out["test_accuracy_mcbn"] = float(np.mean(np.argmax(np.asarray(mc_in.probs), -1) == y_test))
    plain_in = jax.nn.softmax(apply(variables, x_test))
    plain_out = jax.nn.softmax(apply(variables, x_ood))
    out["ood_accuracy_plain"] = float(np.mean(np.argmax(np.asarray(plain_out), -1) == y_test))
    out["auroc"] = {
        "mcbn_entropy": auroc(np.asarray(mc_out.entropy), np.asarray(mc_in.entropy)),
        "mcbn_mutual_information": auroc(np.asarray(mc_out.mutual_information),
                                         np.asarray(mc_in.mutual_information)),
        "mcbn_variance": auroc(np.asarray(mc_out.variance), np.asarray(mc_in.variance)),
        "plain_softmax_entropy": auroc(entropy(plain_out), entropy(plain_in)),
    }


def _folding(ctx: dict[str, Any], out: dict[str, Any]) -> None:
    model, variables, x_test = ctx["model"], ctx["variables"], ctx["x_test"]
    folded, fvars = bnjax.fold_batch_norm(model, variables, x_test)
    f_logits = np.asarray(jax.jit(lambda v, x: folded.apply(v, x, training=False))(fvars,
                                                                                    x_test))
    logits = np.asarray(ctx["apply"](variables, x_test))
    out["folded_pairs"] = len(folded.folded)
    out["folded_kept"] = [list(k) for k in folded.kept]
    out["test_accuracy_folded"] = float(np.mean(np.argmax(f_logits, -1) == ctx["y_test"]))
    out["folded_max_rel_logit_diff"] = float(np.abs(f_logits - logits).max()
                                             / np.abs(logits).max())


def _context(config: Any, workdir: str, seed: int) -> dict[str, Any]:
    """The trained model, its variables, the test, out-of-distribution and training inputs."""
    variables = jax.tree.map(jnp.asarray, checkpointing.restore_variables(workdir))
    ds = input_pipeline.load_dataset(config.dataset, data_dir=config.data_dir,
                                     validation_split=config.validation_split)
    model = models_lib.create_model(config.model, num_classes=ds.num_classes,
                                    norm=config_lib.resolved_norm(config),
                                    **dict(config.model_kwargs))
    rng = np.random.default_rng(seed)
    x_train = ds.normalize(ds.train.x[rng.permutation(len(ds.train))])
    bs = config.batch_size
    apply = jax.jit(lambda v, x: model.apply(v, x, training=False))
    x_test, y_test = jnp.asarray(ds.normalize(ds.test.x)), np.asarray(ds.test.y)

    def accuracy(v: Any) -> float:
        return float(np.mean(np.argmax(np.asarray(apply(v, x_test)), -1) == y_test))

    return {
        "model": model, "variables": variables, "apply": apply, "accuracy": accuracy,
        "x_test": x_test, "y_test": y_test,
        "batches": [jnp.asarray(x_train[i:i + bs]) for i in range(0, len(x_train) - bs + 1, bs)],
        # Out of distribution: every test sequence with its positions shuffled.
        "x_ood": jnp.asarray(ds.normalize(rng.permuted(ds.test.x, axis=1))),
    }


def run(config_path: str, workdir: str, num_samples: int, seed: int,
        num_epochs: int = 0) -> dict[str, Any]:
    """Trains (or reuses) the run, then measures the inference tools; returns the figures.

    Example:
      >>> r = run("configs/tiny.py", "runs/ie_tiny", num_samples=2, seed=0)  # doctest: +SKIP
    """
    config = config_lib.load_config(config_path)
    config.progress_bar = False
    if num_epochs:
        config.num_epochs = num_epochs
        config.warmup_epochs = min(config.warmup_epochs, num_epochs)
    t0 = time.time()
    train_result = train.train_and_evaluate(config, workdir)
    train_s = time.time() - t0
    ctx = _context(config, workdir, seed)
    out: dict[str, Any] = {
        "config": config_path, "workdir": workdir, "model": config.model,
        "num_epochs": config.num_epochs, "train_steps": train_result.get("step"),
        "dataset": config.dataset, "train_seconds": train_s,
        "train_result_test_accuracy": train_result.get("test_accuracy"),
        "num_train_batches": len(ctx["batches"]), "batch_size": config.batch_size,
        "test_accuracy_moving": ctx["accuracy"](ctx["variables"]),
    }
    _precise_bn(ctx, out)
    _mc_batch_norm(ctx, out, num_samples, seed)
    _folding(ctx, out)
    return out
