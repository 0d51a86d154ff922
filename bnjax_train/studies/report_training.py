"""Tables and verdicts of the training studies: learning rate, placement, dropout, batch size.

Each ``*_table(data)`` returns ``(header, rows)`` of cells (strings) and each
``*_verdict(data)`` one line, both from a results JSON alone. Cells are ``mean ± std`` over the
seeds (sample standard deviation).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bnjax_train.studies import metrics
from bnjax_train.studies.summary import (
    SIGNIFICANT,
    difference,
    diverged_runs,
    finals,
    label,
    reached,
    select,
    steps_cell,
)

__all__ = [
    "batch_size_table",
    "batch_size_verdict",
    "dropout_table",
    "dropout_verdict",
    "learning_rate_table",
    "learning_rate_verdict",
    "placement_table",
    "placement_verdict",
]

Data = Mapping[str, Any]
Table = tuple[list[str], list[list[str]]]


def _parts(data: Data) -> tuple[dict[str, Any], dict[str, Any]]:
    return data["meta"]["settings"], data["results"]


def learning_rate_table(data: Data) -> Table:
    """Final accuracy, steps to the target and diverged runs, per learning rate and norm."""
    s, res = _parts(data)
    norms, spe = s["norms"], res["steps_per_epoch"]
    header = (["learning rate"] + [f"{label({'norm': n})} final accuracy" for n in norms]
              + [f"{label({'norm': n})} steps to {s['target']}" for n in norms]
              + [f"{label({'norm': n})} diverged" for n in norms])
    rows = []
    for lr in s["learning_rates"]:
        runs = {n: select(res["runs"], norm=n, learning_rate=lr) for n in norms}
        rows.append([f"{lr:g}"] + [metrics.cell(finals(runs[n])) for n in norms]
                    + [steps_cell(runs[n], s["target"], spe) for n in norms]
                    + [f"{diverged_runs(runs[n], res['num_classes'])}/{len(runs[n])}"
                       for n in norms])
    return header, rows


def _fastest(data: Data, norm: str) -> tuple[float, float] | None:
    """(mean steps to the target, learning rate) of the fastest rate all of whose runs reach it."""
    s, res = _parts(data)
    best = None
    for lr in s["learning_rates"]:
        runs = select(res["runs"], norm=norm, learning_rate=lr)
        steps = reached(runs, s["target"], res["steps_per_epoch"])
        if runs and len(steps) == len(runs):
            mean = metrics.mean_std(steps)[0]
            if best is None or mean < best[0]:
                best = (mean, lr)
    return best


def _stability(data: Data, norm: str) -> tuple[float | None, tuple[float, int, int] | None]:
    """The largest rate with no diverged run, and (rate, diverged, runs) of the first that has."""
    s, res = _parts(data)
    stable, first = None, None
    for lr in s["learning_rates"]:
        runs = select(res["runs"], norm=norm, learning_rate=lr)
        k = diverged_runs(runs, res["num_classes"])
        if k == 0:
            stable = lr if first is None else stable
        elif first is None:
            first = (lr, k, len(runs))
    return stable, first


def learning_rate_verdict(data: Data) -> str:
    """Faster to the target with BN, and stable at larger learning rates with BN?"""
    s, _ = _parts(data)
    fast = {n: _fastest(data, n) for n in ("batch", "none")}
    parts, faster = [], False
    if fast["batch"] and fast["none"]:
        ratio = fast["none"][0] / fast["batch"][0]
        faster = ratio > 1
        parts.append(f"BN reaches {s['target']} in {fast['batch'][0]:.0f} steps (its fastest "
                     f"learning rate, {fast['batch'][1]:g}) vs {fast['none'][0]:.0f} without "
                     f"(at {fast['none'][1]:g}), {ratio:.1f}x {'fewer' if faster else 'more'}")
    elif fast["batch"] or fast["none"]:
        who = "batch" if fast["batch"] else "none"
        faster = who == "batch"
        parts.append(f"only {label({'norm': who})} reaches {s['target']} in every seed at some "
                     f"learning rate ({fast[who][0]:.0f} steps at {fast[who][1]:g})")
    else:
        parts.append(f"neither reaches {s['target']} in every seed at any learning rate")
    stable = {n: _stability(data, n) for n in ("batch", "none")}
    for n in ("batch", "none"):
        top, first = stable[n]
        what = (f"{label({'norm': n})} trains without divergence up to {top:g}" if top
                else f"{label({'norm': n})} diverges at every learning rate")
        if first:
            what += f" and diverges at {first[0]:g} in {first[1]}/{first[2]} seeds"
        parts.append(what)
    higher = (stable["batch"][0] or 0) > (stable["none"][0] or 0)
    status = {(True, True): "confirmed", (False, False): "not confirmed on this data",
              (True, False): "partly confirmed (faster, but no larger stable learning rate)",
              (False, True): "partly confirmed (larger stable learning rate, but not faster)",
              }[(faster, higher)]
    return f"{status}: " + "; ".join(parts) + "."


def _config_rows(data: Data, extra: bool) -> Table:
    s, res = _parts(data)
    header = ["layout", "final test accuracy", f"steps to {s['target']}", "final training loss"]
    if extra:
        header[2:2] = ["training accuracy", "train - test gap"]
    rows = []
    for config in s["configs"]:
        runs = select(res["runs"], **config)
        row = [label(config), metrics.cell(finals(runs)),
               steps_cell(runs, s["target"], res["steps_per_epoch"]),
               metrics.cell([v for v in finals(runs, "train_loss") if v is not None])]
        if extra:
            gaps = [r["train_accuracy"] - r["test_accuracy"][-1] for r in runs]
            row[2:2] = [metrics.cell([r["train_accuracy"] for r in runs]), metrics.cell(gaps)]
        rows.append(row)
    return header, rows


def placement_table(data: Data) -> Table:
    """Final test accuracy, steps to the target and final training loss per layout."""
    return _config_rows(data, extra=False)


def placement_verdict(data: Data) -> str:
    """conv-BN-ReLU vs conv-ReLU-BN on final test accuracy (and both vs no BN)."""
    res = data["results"]["runs"]
    before = finals(select(res, norm="batch", placement="before"))
    after = finals(select(res, norm="batch", placement="after"))
    plain = finals(select(res, norm="none"))
    text, z = difference(after, before)
    m = {k: metrics.mean_std(v)[0] for k, v in (("b", before), ("a", after), ("n", plain))}
    if abs(z) < SIGNIFICANT:
        head = "neither order is better on this data"
    else:
        head = f"{'conv-ReLU-BN' if z > 0 else 'conv-BN-ReLU'} is better"
    beats = {name: metrics.compare(v, plain)[1] >= SIGNIFICANT
             for name, v in (("conv-BN-ReLU", before), ("conv-ReLU-BN", after))}
    tail = ", ".join(f"{name} {'beats' if b else 'does not beat'} no BN"
                     for name, b in beats.items())
    return (f"{head}: final test accuracy {m['a']:.3f} (conv-ReLU-BN) vs {m['b']:.3f} "
            f"(conv-BN-ReLU), {text}; {tail} ({m['n']:.3f}).")


def dropout_table(data: Data) -> Table:
    """Test and training accuracy, their gap, steps to the target and training loss."""
    return _config_rows(data, extra=True)


def dropout_verdict(data: Data) -> str:
    """Does BN without dropout learn faster than BN with it, without losing test accuracy?"""
    s, res = _parts(data)
    runs, rate = res["runs"], max(c["dropout"] for c in s["configs"])
    bn, bn_d = select(runs, norm="batch", dropout=0.0), select(runs, norm="batch", dropout=rate)
    spe, target = res["steps_per_epoch"], s["target"]
    s_bn, s_d = reached(bn, target, spe), reached(bn_d, target, spe)
    if len(s_bn) == len(bn) and len(s_d) == len(bn_d):
        ratio = metrics.mean_std(s_d)[0] / metrics.mean_std(s_bn)[0]
        faster = metrics.compare(s_d, s_bn)[1] >= SIGNIFICANT
        speed = f"BN alone reaches {target} in {ratio:.2f}x fewer steps than BN with dropout"
    else:
        faster = len(s_bn) > len(s_d)
        speed = (f"{len(s_bn)}/{len(bn)} BN runs and {len(s_d)}/{len(bn_d)} BN + dropout runs "
                 f"reach {target}")
    text, z = difference(finals(bn), finals(bn_d))
    kept = z > -SIGNIFICANT
    acc = f"test accuracy without dropout vs with it: {text}"
    plain, plain_d = select(runs, norm="none", dropout=0.0), select(runs, norm="none",
                                                                      dropout=rate)
    helps = difference(finals(plain_d), finals(plain))
    status = {(True, True): "confirmed", (False, False): "not confirmed on this data",
              (True, False): "partly confirmed (faster, but less accurate without dropout)",
              (False, True): "partly confirmed (no loss without dropout, but not faster)",
              }[(faster, kept)]
    gap = {label(r[0]["config"]): metrics.mean_std(
        [x["train_accuracy"] - x["test_accuracy"][-1] for x in r])[0]
        for r in (bn, bn_d, plain_d, plain)}
    return (f"{status}: {speed}; {acc}; without BN, dropout {rate:g} changes test accuracy by "
            f"{helps[0].removeprefix('difference ')}; train - test gaps "
            + ", ".join(f"{k} {v:.3f}" for k, v in gap.items()) + ".")


def batch_size_table(data: Data) -> Table:
    """Final test accuracy per batch size (rows) and norm (columns)."""
    s, res = _parts(data)
    header = ["batch size"] + [label({"norm": n}) for n in s["norms"]]
    rows = []
    for b in s["batch_sizes"]:
        row = [str(b)]
        for n in s["norms"]:
            runs = select(res["runs"], norm=n, batch_size=b)
            row.append(metrics.cell(finals(runs)) if runs else "n/a")
        rows.append(row)
    return header, rows


def batch_size_verdict(data: Data) -> str:
    """At the smallest batch, does an alternative beat BN (and not at the largest)?"""
    s, res = _parts(data)
    small, large = min(s["batch_sizes"]), max(s["batch_sizes"])
    others = [n for n in s["norms"] if n not in ("batch", "none")]

    def acc(norm: str, batch: int) -> list[float]:
        return finals(select(res["runs"], norm=norm, batch_size=batch))

    def mean(norm: str, batch: int) -> float:
        return metrics.mean_std(acc(norm, batch))[0]

    def best_other(batch: int) -> str:
        return max((n for n in others if acc(n, batch)), key=lambda n: mean(n, batch))

    win_small, win_large = best_other(small), best_other(large)
    z_small = metrics.compare(acc(win_small, small), acc("batch", small))[1]
    z_large = metrics.compare(acc(win_large, large), acc("batch", large))[1]
    beaten = [label({"norm": n}) for n in others if acc(n, small)
              and metrics.compare(acc(n, small), acc("batch", small))[1] >= SIGNIFICANT]
    fails = z_small >= SIGNIFICANT
    status = ("confirmed" if fails and z_large < SIGNIFICANT
              else "partly confirmed (BN is beaten at every size)" if fails
              else "not confirmed on this data")
    return (f"{status}: at batch {small} BN reaches {mean('batch', small):.3f} vs "
            f"{mean(win_small, small):.3f} for {label({'norm': win_small})} ({z_small:.1f} "
            f"standard errors; beaten by {', '.join(beaten) or 'none'}); at batch {large} BN "
            f"{mean('batch', large):.3f} vs {mean(win_large, large):.3f} for "
            f"{label({'norm': win_large})} ({z_large:.1f}); BN's best is "
            f"{max(mean('batch', b) for b in s['batch_sizes']):.3f}.")
