"""The studies of the statistics used at inference: momentum (with PreciseBN) and MC batch norm.

- :func:`run_momentum`: batch-norm networks with moving-average momentum 0.9, 0.99 and 0.999;
  after every epoch the test accuracy with the moving statistics and with PreciseBN
  population statistics (``bnjax.precise_batch_stats``) of the same weights.
- :func:`run_mcbn`: batch-norm networks evaluated with plain inference (moving statistics) and
  with Monte Carlo batch norm (``bnjax.mc_batch_norm_predict``) whose statistics come from
  random training batches of several sizes: accuracy, negative log-likelihood, expected
  calibration error on the test set, and AUROC of the uncertainty between the test set and an
  out-of-distribution set (the test set with the positions of every sequence shuffled, as
  ``python -m benchmarks inference_eval`` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import bnjax
from bnjax_train.studies import metrics
from bnjax_train.studies.engine import Data, accuracy, predict, train_runs
from bnjax_train.studies.metrics import auroc, entropy
from bnjax_train.studies.training import Settings, make_model, make_recipe, records, timing

__all__ = ["run_mcbn", "run_momentum", "uncertainty_scores"]


def _run(variables: Any, r: int) -> Any:
    return jax.tree.map(lambda a: a[r], variables)


def run_momentum(data: Data, settings: Settings, seeds: Sequence[int]) -> dict[str, Any]:
    """Moving vs PreciseBN statistics after every epoch, for each momentum; seeds together.

    Example:
      >>> from bnjax_train.studies.engine import toy_data
      >>> settings = {"features": [2], "hidden": 4, "optimizer": "adam", "learning_rate": 1e-3,
      ...             "batch_size": 16, "epochs": 1,
      ...             "momenta": [0.9], "precise_batches": 1}
      >>> out = run_momentum(toy_data(), settings, [0, 1])
      >>> len(out["runs"][0]["test_accuracy_precise"])
      1
    """
    n, batch = len(data.x_train), int(settings["batch_size"])
    order = np.random.default_rng(0).permutation(n)[:settings["precise_batches"] * batch]
    batches = [jnp.asarray(data.x_train[order[i:i + batch]]) for i in range(0, len(order), batch)]
    out, all_runs = [], []
    for momentum in settings["momenta"]:
        model = make_model(settings, data.num_classes, norm="batch",
                           norm_kwargs={"momentum": momentum})

        def precise(epoch: int, variables: Any, model: Any = model) -> dict[str, np.ndarray]:
            del epoch
            new = [bnjax.precise_batch_stats(model, _run(variables, r), batches,
                                             num_batches=len(batches))
                   for r in range(len(seeds))]
            stacked = jax.tree.map(lambda *a: jnp.stack(a), *new)
            return {"test_accuracy_precise": accuracy(predict(model, stacked, data.x_test),
                                                      data.y_test)}

        runs = train_runs(model, data, make_recipe(settings), list(seeds),
                          [settings["learning_rate"]] * len(seeds), on_epoch=precise)
        all_runs.append(runs)
        out += records(runs, [{"momentum": momentum}] * len(seeds), seeds)
    return {"runs": out, "steps_per_epoch": all_runs[0].steps_per_epoch, **timing(all_runs)}


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def uncertainty_scores(probs: np.ndarray, labels: np.ndarray,
                       mutual_information: np.ndarray | None = None) -> dict[str, Any]:
    """Calibration and out-of-distribution scores of predictions on test + OOD inputs.

    Args:
      probs: ``(2n, classes)``: the ``n`` test inputs, then the ``n`` out-of-distribution ones.
      labels: ``(n,)`` test labels.
      mutual_information: ``(2n,)`` MC batch norm's mutual information, if any.

    Returns:
      Test ``accuracy``, ``nll``, ``ece``; ``auroc_entropy`` (predictive entropy ranking the
      OOD inputs above the test inputs); with ``mutual_information`` also its AUROC and its
      mean on each set.

    Example:
      >>> p = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
      >>> s = uncertainty_scores(p, np.array([0, 1]))
      >>> s["accuracy"], s["auroc_entropy"]
      (1.0, 1.0)
    """
    n = len(labels)
    test, ood = probs[:n], probs[n:]
    out: dict[str, Any] = {
        "accuracy": float(np.mean(test.argmax(-1) == labels)),
        "nll": metrics.negative_log_likelihood(test, labels),
        "ece": metrics.expected_calibration_error(test, labels),
        "auroc_entropy": auroc(entropy(ood), entropy(test)),
    }
    if mutual_information is not None:
        mi = np.asarray(mutual_information, np.float64)
        out.update(auroc_mutual_information=auroc(mi[n:], mi[:n]),
                   mutual_information_test=float(mi[:n].mean()),
                   mutual_information_ood=float(mi[n:].mean()))
    return out


def run_mcbn(data: Data, settings: Settings, seeds: Sequence[int]) -> dict[str, Any]:
    """Trains BN networks (seeds together), then plain inference vs MCBN per MC batch size.

    Example:
      >>> from bnjax_train.studies.engine import toy_data
      >>> settings = {"features": [2], "hidden": 4, "optimizer": "adam", "learning_rate": 1e-3,
      ...             "batch_size": 16, "epochs": 1,
      ...             "mc_batch_sizes": [4], "num_samples": 2}
      >>> out = run_mcbn(toy_data(), settings, [0, 1])
      >>> [e["config"]["inference"] for e in out["evaluations"]]
      ['plain', 'plain', 'mcbn', 'mcbn']
    """
    model = make_model(settings, data.num_classes, norm="batch")
    runs = train_runs(model, data, make_recipe(settings), list(seeds),
                      [settings["learning_rate"]] * len(seeds))
    rng = np.random.default_rng(0)
    # Out of distribution: every test sequence with its positions shuffled.
    x_all = np.concatenate([data.x_test, rng.permuted(data.x_test, axis=1)])
    plain = _softmax(predict(model, runs.variables, x_all))
    evaluations = []
    for r, seed in enumerate(seeds):
        evaluations.append({"config": {"inference": "plain"}, "seed": int(seed),
                            **uncertainty_scores(plain[r], data.y_test)})
    n, samples = len(data.x_train), int(settings["num_samples"])
    for batch in settings["mc_batch_sizes"]:
        for r, seed in enumerate(seeds):
            draw = np.random.default_rng([int(seed), int(batch)])
            pool = [jnp.asarray(data.x_train[draw.choice(n, batch, replace=False)])
                    for _ in range(samples)]
            mc = bnjax.mc_batch_norm_predict(model, _run(runs.variables, r), jnp.asarray(x_all),
                                             pool, samples, rng=int(seed), batch_size=1000)
            evaluations.append({
                "config": {"inference": "mcbn", "mc_batch_size": int(batch)}, "seed": int(seed),
                **uncertainty_scores(np.asarray(mc.probs, np.float64), data.y_test,
                                     np.asarray(mc.mutual_information))})
    return {"runs": records(runs, [{"norm": "batch"}] * len(seeds), seeds),
            "evaluations": evaluations, "steps_per_epoch": runs.steps_per_epoch,
            **timing([runs])}
