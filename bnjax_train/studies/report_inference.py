"""Tables and verdicts of the inference studies: momentum (with PreciseBN) and MC batch norm.

As in :mod:`bnjax_train.studies.report_training`: ``(header, rows)`` and one line each,
from a results JSON alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bnjax_train.studies import metrics
from bnjax_train.studies.summary import SIGNIFICANT, difference, select

__all__ = ["mcbn_table", "mcbn_verdict", "momentum_table", "momentum_verdict"]

Data = Mapping[str, Any]
Table = tuple[list[str], list[list[str]]]


def _at(data: Data, momentum: float, key: str, epoch: int) -> list[float]:
    return [r[key][epoch] for r in select(data["results"]["runs"], momentum=momentum)]


def momentum_table(data: Data) -> Table:
    """Test accuracy after each epoch: moving statistics and PreciseBN, per momentum.

    Example:
      >>> from bnjax_train.studies.summary import committed
      >>> header, rows = momentum_table(committed("momentum"))
      >>> header[:3], len(rows)
      (['epoch', '0.9 moving', '0.9 PreciseBN'], 10)
    """
    momenta = data["meta"]["settings"]["momenta"]
    header = ["epoch"] + [f"{m:g} {what}" for m in momenta for what in ("moving", "PreciseBN")]
    epochs = len(data["results"]["runs"][0]["test_accuracy"])
    rows = [[str(e + 1)] + [metrics.cell(_at(data, m, key, e)) for m in momenta
                            for key in ("test_accuracy", "test_accuracy_precise")]
            for e in range(epochs)]
    return header, rows


def momentum_verdict(data: Data) -> str:
    """Do the momenta differ after the first epoch, less at the end, and does PreciseBN fix it?

    Example:
      >>> from bnjax_train.studies.summary import committed
      >>> momentum_verdict(committed("momentum")).startswith(
      ...     ("confirmed", "partly confirmed", "not confirmed"))
      True
    """
    momenta = data["meta"]["settings"]["momenta"]

    def mean(m: float, key: str, e: int) -> float:
        return metrics.mean_std(_at(data, m, key, e))[0]

    def spread(key: str, e: int) -> tuple[float, float, float, float]:
        lo = min(momenta, key=lambda m: mean(m, key, e))
        hi = max(momenta, key=lambda m: mean(m, key, e))
        return lo, hi, mean(hi, key, e) - mean(lo, key, e), metrics.compare(
            _at(data, hi, key, e), _at(data, lo, key, e))[1]

    lo, hi, gap0, z0 = spread("test_accuracy", 0)
    *_, gap_end, z_end = spread("test_accuracy", -1)
    *_, pgap0, pz0 = spread("test_accuracy_precise", 0)
    fixed, z_fix = difference(_at(data, lo, "test_accuracy_precise", 0),
                              _at(data, hi, "test_accuracy", 0))
    facts = {"the momenta differ after the first epoch": z0 >= SIGNIFICANT,
             "PreciseBN removes the difference": pz0 < SIGNIFICANT and z_fix > -SIGNIFICANT}
    if all(facts.values()):
        status = "confirmed"
    elif not any(facts.values()):
        status = "not confirmed on this data"
    else:
        status = f"partly confirmed ({next(k for k, v in facts.items() if v)} only)"
    return (f"{status}: after epoch 1 the moving statistics give "
            f"{mean(lo, 'test_accuracy', 0):.3f} (momentum {lo:g}) to "
            f"{mean(hi, 'test_accuracy', 0):.3f} ({hi:g}), {z0:.1f} standard errors apart, and "
            f"after the last epoch still {gap_end:.3f} apart ({z_end:.1f} standard errors); "
            f"PreciseBN statistics of the same weights give {pgap0:.3f} spread across momenta "
            f"after epoch 1, and at momentum {lo:g} "
            f"{mean(lo, 'test_accuracy_precise', 0):.3f} vs the best moving statistics' "
            f"{mean(hi, 'test_accuracy', 0):.3f} ({fixed}).")


_MCBN_COLUMNS = (("accuracy", "test accuracy"), ("nll", "NLL"), ("ece", "ECE"),
                 ("auroc_entropy", "OOD AUROC (entropy)"),
                 ("auroc_mutual_information", "OOD AUROC (mutual information)"),
                 ("mutual_information_test", "mean MI, test"),
                 ("mutual_information_ood", "mean MI, OOD"))


def _evaluations(data: Data) -> list[tuple[str, list[Mapping[str, Any]]]]:
    ev = data["results"]["evaluations"]
    out = [("plain (moving statistics)", select(ev, inference="plain"))]
    for b in data["meta"]["settings"]["mc_batch_sizes"]:
        out.append((f"MCBN, batches of {b}", select(ev, inference="mcbn", mc_batch_size=b)))
    return out


def mcbn_table(data: Data) -> Table:
    """Calibration and out-of-distribution AUROC of plain inference and MCBN per batch size.

    Example:
      >>> from bnjax_train.studies.summary import committed
      >>> header, rows = mcbn_table(committed("mcbn"))
      >>> header[:3], rows[0][0]
      (['inference', 'test accuracy', 'NLL'], 'plain (moving statistics)')
    """
    header = ["inference"] + [name for _, name in _MCBN_COLUMNS]
    rows = []
    for name, ev in _evaluations(data):
        rows.append([name] + [metrics.cell([e[k] for e in ev]) if k in ev[0] else "-"
                              for k, _ in _MCBN_COLUMNS])
    return header, rows


def mcbn_verdict(data: Data) -> str:
    """Is MCBN's uncertainty better than plain inference's, and worse at large batches?

    Example:
      >>> from bnjax_train.studies.summary import committed
      >>> mcbn_verdict(committed("mcbn")).startswith(
      ...     ("confirmed", "partly confirmed", "not confirmed"))
      True
    """
    (_, plain), *mc = _evaluations(data)

    def vals(ev: list[Mapping[str, Any]], key: str) -> list[float]:
        return [e[key] for e in ev]

    def mean(ev: list[Mapping[str, Any]], key: str) -> float:
        return metrics.mean_std(vals(ev, key))[0]

    best_name, best = max(mc, key=lambda kv: mean(kv[1], "auroc_entropy"))
    text, z_auroc = difference(vals(best, "auroc_entropy"), vals(plain, "auroc_entropy"))
    z_nll = metrics.compare(vals(plain, "nll"), vals(best, "nll"))[1]
    useful = z_auroc >= SIGNIFICANT or z_nll >= SIGNIFICANT
    (small_name, small), (large_name, large) = mc[0], mc[-1]
    text_mi, z_mi = difference(vals(small, "auroc_mutual_information"),
                               vals(large, "auroc_mutual_information"))
    shrinks = mean(large, "mutual_information_ood") / max(mean(small, "mutual_information_ood"),
                                                          1e-300)
    fails = z_mi >= SIGNIFICANT
    status = {(True, True): "confirmed", (False, False): "not confirmed on this data",
              (True, False): "partly confirmed (useful, but no worse with larger batches)",
              (False, True): "partly confirmed (worse with larger batches, but not better "
                             "than plain inference)"}[(useful, fails)]
    return (f"{status}: best MCBN ({best_name.removeprefix('MCBN, ')}) OOD AUROC "
            f"{mean(best, 'auroc_entropy'):.3f} vs plain {mean(plain, 'auroc_entropy'):.3f} "
            f"({text}); NLL {mean(best, 'nll'):.3f} vs {mean(plain, 'nll'):.3f}, ECE "
            f"{mean(best, 'ece'):.3f} vs {mean(plain, 'ece'):.3f}; the mutual information's AUROC"
            f" is {mean(small, 'auroc_mutual_information'):.3f} with "
            f"{small_name.removeprefix('MCBN, ')} vs {mean(large, 'auroc_mutual_information'):.3f}"
            f" with {large_name.removeprefix('MCBN, ')} ({text_mi}), and its mean on OOD inputs"
            f" is {shrinks:.2f}x as large.")
