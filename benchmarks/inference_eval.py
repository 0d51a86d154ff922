"""Inference tools on a trained model: PreciseBN, Monte Carlo batch norm, folding.

Usage (from the repository root):

    python benchmarks/inference_eval.py                  # configs/default.py (MNIST-1D)
    python benchmarks/inference_eval.py --config configs/default.py \
        --workdir runs/inference_eval --num_samples 32 --out benchmarks/results/inference_eval.json

Trains the config's model with ``bnjax.training.train_and_evaluate`` into ``--workdir`` (an
existing finished run there is reused), restores the final parameters and moving statistics
from its last checkpoint, and reports on the test set:

- accuracy with the moving-average statistics vs PreciseBN population statistics
  (``bnjax.precise_batch_stats`` over the whole training set, in batches of the training batch
  size; biased and unbiased variance);
- Monte Carlo batch norm (``bnjax.mc_batch_norm_predict``, statistics of sampled training
  batches): accuracy of the mean prediction vs plain inference, and how well its uncertainty
  ranks out-of-distribution inputs above the test inputs (AUROC). The out-of-distribution set
  is the test set with the positions of every sequence shuffled (a random permutation per
  example), which keeps each sequence's values and destroys its shape;
- the folded model (``bnjax.fold_batch_norm``): its accuracy and largest logit difference.

Prints a table and writes every figure to JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import rankdata

import bnjax
from bnjax import data as data_lib
from bnjax import models as models_lib
from bnjax import training


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve of scores ranking ``positive`` above ``negative`` (ties: 1/2).

    Example:
      >>> auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0])), auroc(np.ones(2), np.ones(3))
      (1.0, 0.5)
    """
    ranks = rankdata(np.concatenate([positive, negative]))
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def restore_variables(workdir: str) -> dict[str, Any]:
    """``{"params", "batch_stats"}`` of the last checkpoint that train.py wrote in ``workdir``."""
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 item_names=("state", "meta"))
    step = mngr.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {workdir!r}")
    tree = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    mngr.close()
    return {"params": tree["params"], "batch_stats": tree["batch_stats"]}


def _entropy(p: jax.Array) -> np.ndarray:
    return np.asarray(-jnp.sum(p * jnp.log(jnp.clip(p, 1e-30)), axis=-1))


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


def run(config_path: str, workdir: str, num_samples: int, seed: int,
        num_epochs: int = 0) -> dict[str, Any]:
    """Trains (or reuses) the run, then measures the inference tools; returns the figures."""
    config = training.load_config(config_path)
    config.progress_bar = False
    if num_epochs:
        config.num_epochs = num_epochs
        config.warmup_epochs = min(config.warmup_epochs, num_epochs)
    t0 = time.time()
    train_result = training.train_and_evaluate(config, workdir)
    train_s = time.time() - t0
    variables = jax.tree.map(jnp.asarray, restore_variables(workdir))

    ds = data_lib.load_dataset(config.dataset, data_dir=config.data_dir,
                               validation_split=config.validation_split)
    model = models_lib.create_model(config.model, num_classes=ds.num_classes,
                                    norm=training.resolved_norm(config),
                                    **dict(config.model_kwargs))
    x_test = jnp.asarray(ds.normalize(ds.test.x))
    y_test = np.asarray(ds.test.y)
    rng = np.random.default_rng(seed)
    x_train = ds.normalize(ds.train.x[rng.permutation(len(ds.train))])
    bs = config.batch_size
    train_batches = [jnp.asarray(x_train[i:i + bs]) for i in range(0, len(x_train) - bs + 1, bs)]
    # Out of distribution: every test sequence with its positions shuffled.
    x_ood = jnp.asarray(ds.normalize(rng.permuted(ds.test.x, axis=1)))

    apply = jax.jit(lambda v, x: model.apply(v, x, training=False))

    def accuracy(v: Any) -> float:
        return float(np.mean(np.argmax(np.asarray(apply(v, x_test)), -1) == y_test))

    out: dict[str, Any] = {
        "config": config_path, "workdir": workdir, "model": config.model,
        "num_epochs": config.num_epochs, "train_steps": train_result.get("step"),
        "dataset": config.dataset, "train_seconds": train_s,
        "train_result_test_accuracy": train_result.get("test_accuracy"),
        "num_train_batches": len(train_batches), "batch_size": bs,
    }
    out["test_accuracy_moving"] = accuracy(variables)

    # PreciseBN over the whole training set.
    for unbiased in (False, True):
        t = time.time()
        precise = bnjax.precise_batch_stats(model, variables, train_batches,
                                            num_batches=len(train_batches), unbiased=unbiased)
        key = "precise_unbiased" if unbiased else "precise"
        out[f"test_accuracy_{key}"] = accuracy(precise)
        out[f"{key}_seconds"] = time.time() - t
        if not unbiased:
            out["precise_vs_moving"] = _stat_differences(variables["batch_stats"],
                                                         precise["batch_stats"])

    # Monte Carlo batch norm, in and out of distribution (the same sampled batches).
    key = jax.random.key(seed)
    t = time.time()
    mc_in = bnjax.mc_batch_norm_predict(model, variables, x_test, train_batches, num_samples,
                                        rng=key)
    mc_out = bnjax.mc_batch_norm_predict(model, variables, x_ood, train_batches, num_samples,
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
        "plain_softmax_entropy": auroc(_entropy(plain_out), _entropy(plain_in)),
    }

    # Folding.
    folded, fvars = bnjax.fold_batch_norm(model, variables, x_test)
    f_logits = np.asarray(jax.jit(lambda v, x: folded.apply(v, x, training=False))(fvars,
                                                                                    x_test))
    logits = np.asarray(apply(variables, x_test))
    out["folded_pairs"] = len(folded.folded)
    out["folded_kept"] = [list(k) for k in folded.kept]
    out["test_accuracy_folded"] = float(np.mean(np.argmax(f_logits, -1) == y_test))
    out["folded_max_rel_logit_diff"] = float(np.abs(f_logits - logits).max()
                                             / np.abs(logits).max())
    out["environment"] = {"jax": jax.__version__, "backend": jax.default_backend(),
                          "devices": jax.device_count()}
    return out


def format_table(r: dict[str, Any]) -> str:
    """Markdown tables of one run."""
    pct = lambda v: f"{100 * v:.2f}%"  # noqa: E731
    rows = [
        ("moving-average statistics (plain inference)", pct(r["test_accuracy_moving"])),
        (f"PreciseBN, {r['num_train_batches']} batches of {r['batch_size']}",
         pct(r["test_accuracy_precise"])),
        ("PreciseBN, unbiased m/(m-1)", pct(r["test_accuracy_precise_unbiased"])),
        (f"MCBN mean of {r['mcbn_num_samples']} samples", pct(r["test_accuracy_mcbn"])),
        (f"folded ({r['folded_pairs']} BN folded, {len(r['folded_kept'])} kept)",
         pct(r["test_accuracy_folded"])),
    ]
    a = ["| statistics | test accuracy |", "|---|---|"] + [f"| {n} | {v} |" for n, v in rows]
    b = ["| uncertainty score | AUROC (shuffled vs test) |", "|---|---|"] + [
        f"| {k.replace('_', ' ')} | {v:.3f} |" for k, v in r["auroc"].items()]
    d = r["precise_vs_moving"]
    return (f"{r['model']} on {r['dataset']} ({r['config']}, {r['num_epochs']} epochs, "
            f"{r['train_steps']} steps):\n\n" + "\n".join(a) + "\n\n"
            + "moving vs precise statistics: variance differs by "
            f"{100 * d['var_rel_diff_median']:.2f}% "
            f"(median over channels; max {100 * d['var_rel_diff_max']:.1f}%), mean by "
            f"{d['mean_diff_in_std_median']:.3f} std (max {d['mean_diff_in_std_max']:.3f})\n\n"
            + "\n".join(b) + f"\n\nfolded vs unfolded logits: max relative difference "
            f"{r['folded_max_rel_logit_diff']:.1e}; plain accuracy on the shuffled inputs "
            f"{pct(r['ood_accuracy_plain'])}")


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/default.py")
    p.add_argument("--workdir", default="runs/inference_eval")
    p.add_argument("--num_samples", type=int, default=32, help="MCBN samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_epochs", type=int, default=0,
                   help="override the config's number of epochs (0: keep it)")
    p.add_argument("--out", default="benchmarks/results/inference_eval.json")
    a = p.parse_args(argv)
    r = run(a.config, a.workdir, a.num_samples, a.seed, a.num_epochs)
    print(format_table(r))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(r, f, indent=2)
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
