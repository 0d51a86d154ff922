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
    speed,
    status,
    steps_cell,
)

__all__ = [
    "BATCH_FREE",
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
    """Final accuracy, steps to each target and diverged runs, per learning rate and norm.

    Example:
      >>> from bnjax_train.studies.summary import committed
      >>> header, rows = learning_rate_table(committed("learning_rate"))
      >>> header[:3], rows[0][0]
      (['learning rate', 'BN final accuracy', 'no norm final accuracy'], '0.003')
    """
    s, res = _parts(data)
    norms, spe = s["norms"], res["steps_per_epoch"]
    names = {n: label({"norm": n}) for n in norms}
    header = (["learning rate"] + [f"{names[n]} final accuracy" for n in norms]
              + [f"{names[n]} steps to {t}" for t in s["targets"] for n in norms]
              + [f"{names[n]} diverged" for n in norms])
    rows = []
    for lr in s["learning_rates"]:
        runs = {n: select(res["runs"], norm=n, learning_rate=lr) for n in norms}
        rows.append([f"{lr:g}"] + [metrics.cell(finals(runs[n])) for n in norms]
                    + [steps_cell(runs[n], t, spe) for t in s["targets"] for n in norms]
                    + [f"{diverged_runs(runs[n], res['num_classes'])}/{len(runs[n])}"
                       for n in norms])
    return header, rows


def _fastest(data: Data, norm: str, target: float) -> tuple[float, list[Any]]:
    """The learning rate whose runs all reach ``target`` in the fewest steps (mean), its runs."""
    s, res = _parts(data)
    best: tuple[float, float, list[Any]] | None = None
    for lr in s["learning_rates"]:
        runs = select(res["runs"], norm=norm, learning_rate=lr)
        steps = reached(runs, target, res["steps_per_epoch"])
        if runs and len(steps) == len(runs):
            mean = metrics.mean_std(steps)[0]
            if best is None or mean < best[0]:
                best = (mean, lr, runs)
    return (best[1], best[2]) if best else (float("nan"), [])


def _stability(data: Data, norm: str) -> tuple[float | None, tuple[float, int, int] | None]:
    """The largest rate up to which no run diverged; (rate, diverged, runs) where some first do."""
    s, res = _parts(data)
    stable, first = None, None
    for lr in s["learning_rates"]:
        runs = select(res["runs"], norm=norm, learning_rate=lr)
        k = diverged_runs(runs, res["num_classes"])
        if k == 0 and first is None:
            stable = lr
        elif k and first is None:
            first = (lr, k, len(runs))
    return stable, first


def _speed_phrase(data: Data, target: float) -> tuple[str, int]:
    """Steps to ``target`` of BN and no BN, each at its fastest rate; +1: BN faster, -1: slower."""
    spe = data["results"]["steps_per_epoch"]
    (lr_bn, bn), (lr_none, none) = _fastest(data, "batch", target), _fastest(data, "none",
                                                                              target)
    m_bn, m_none, z = speed(bn, none, target, spe)
    sign = 1 if z >= SIGNIFICANT else -1 if z <= -SIGNIFICANT else 0
    if m_bn is not None and m_none is not None:
        return (f"to {target}, {m_bn:.0f} steps with BN (at {lr_bn:g}) vs {m_none:.0f} without "
                f"(at {lr_none:g}), {m_none / m_bn:.2f}x, {abs(z):.1f} standard errors"), sign
    if m_bn is not None or m_none is not None:
        who, m, lr = ("BN", m_bn, lr_bn) if m_bn is not None else ("no norm", m_none, lr_none)
        return (f"to {target}, only {who} gets there in every seed at some learning rate "
                f"({m:.0f} steps at {lr:g})"), sign
    return f"to {target}, neither gets there in every seed at any learning rate", 0


def _same_rate(data: Data, target: float) -> tuple[int, int, int]:
    """At how many shared learning rates BN is faster / slower to ``target``, of how many."""
    s, res = _parts(data)
    faster = slower = counted = 0
    for lr in s["learning_rates"]:
        bn, none = (select(res["runs"], norm=n, learning_rate=lr) for n in ("batch", "none"))
        m_bn, m_none, z = speed(bn, none, target, res["steps_per_epoch"])
        if m_bn is None and m_none is None:
            continue
        counted += 1
        faster += z >= SIGNIFICANT
        slower += z <= -SIGNIFICANT
    return faster, slower, counted


def learning_rate_verdict(data: Data) -> str:
    """Faster to the targets with BN, and stable at larger learning rates with BN?

    Example:
      >>> from bnjax_train.studies.summary import committed
      >>> learning_rate_verdict(committed("learning_rate")).startswith(
      ...     ("confirmed", "partly confirmed", "not confirmed"))
      True
    """
    s, res = _parts(data)
    speeds = [_speed_phrase(data, t) for t in s["targets"]]
    same = _same_rate(data, s["targets"][0])
    parts = [f"at equal learning rates BN gets to {s['targets'][0]} significantly sooner at "
             f"{same[0]} and later at {same[1]} of the {same[2]} rates where either gets there",
             "at each norm's fastest learning rate " + "; ".join(p for p, _ in speeds)]
    best = {}
    for n in ("batch", "none"):
        top, first = _stability(data, n)
        what = (f"{label({'norm': n})} trains without divergence up to {top:g}" if top
                else f"{label({'norm': n})} diverges at {s['learning_rates'][0]:g} already")
        parts.append(what + (f" and diverges at {first[0]:g} in {first[1]}/{first[2]} seeds"
                             if first else ""))
        best[n] = max((metrics.mean_std(finals(select(res["runs"], norm=n, learning_rate=lr)))[0],
                       lr) for lr in s["learning_rates"])
    parts.append(f"best final accuracy {best['batch'][0]:.3f} with BN (at {best['batch'][1]:g})"
                 f" vs {best['none'][0]:.3f} without (at {best['none'][1]:g})")
    facts = {
        "faster at equal learning rates": same[0] > 0 and same[1] == 0,
        "faster at its best learning rate": (any(sign > 0 for _, sign in speeds)
                                             and not any(sign < 0 for _, sign in speeds)),
        "stable at larger learning rates": (_stability(data, "batch")[0] or 0)
        > (_stability(data, "none")[0] or 0)}
    return f"{status(facts)}: " + "; ".join(parts) + "."


def _config_rows(data: Data, extra: bool) -> Table:
    s, res = _parts(data)
    header = (["layout", "final test accuracy"] + [f"steps to {t}" for t in s["targets"]]
              + ["final training loss"])
    if extra:
        header[2:2] = ["training accuracy", "train - test gap"]
    rows = []
    for config in s["configs"]:
        runs = select(res["runs"], **config)
        row = ([label(config), metrics.cell(finals(runs))]
               + [steps_cell(runs, t, res["steps_per_epoch"]) for t in s["targets"]]
               + [metrics.cell([v for v in finals(runs, "train_loss") if v is not None], 4)])
        if extra:
            gaps = [r["train_accuracy"] - r["test_accuracy"][-1] for r in runs]
            row[2:2] = [metrics.cell([r["train_accuracy"] for r in runs]), metrics.cell(gaps)]
        rows.append(row)
    return header, rows


def placement_table(data: Data) -> Table:
    """Final test accuracy, steps to the target and final training loss per layout.

    Example:
      >>> from bnjax_train.studies.summary import committed
      >>> header, rows = placement_table(committed("placement"))
      >>> header[:2], [row[0] for row in rows]
      (['layout', 'final test accuracy'], ['conv-BN-ReLU', 'conv-ReLU-BN', 'no BN'])
    """
    return _config_rows(data, extra=False)


def placement_verdict(data: Data) -> str:
    """conv-BN-ReLU vs conv-ReLU-BN on final test accuracy (and both vs no BN).

    Example:
      >>> from bnjax_train.studies.summary import committed
      >>> placement_verdict(committed("placement")).startswith(("conv-", "neither"))
      True
    """
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
    """Test and training accuracy, their gap, steps to the target and training loss.

    Example:
      >>> from bnjax_train.studies.summary import committed
      >>> header, rows = dropout_table(committed("dropout"))
      >>> header[2:4], len(rows)
      (['training accuracy', 'train - test gap'], 4)
    """
    return _config_rows(data, extra=True)


def dropout_verdict(data: Data) -> str:
    """Does BN without dropout learn faster than BN with it, without losing test accuracy?

    Example:
      >>> from bnjax_train.studies.summary import committed
      >>> dropout_verdict(committed("dropout")).startswith(
      ...     ("confirmed", "partly confirmed", "not confirmed"))
      True
    """
    s, res = _parts(data)
    runs, rate = res["runs"], max(c["dropout"] for c in s["configs"])
    bn, bn_d = select(runs, norm="batch", dropout=0.0), select(runs, norm="batch", dropout=rate)
    signs, speeds = [], []
    for t in s["targets"]:
        m, m_d, z = speed(bn, bn_d, t, res["steps_per_epoch"])
        signs.append(1 if z >= SIGNIFICANT else -1 if z <= -SIGNIFICANT else 0)
        speeds.append(f"to {t} in {m:.0f} vs {m_d:.0f} steps ({abs(z):.1f} standard errors)"
                      if m is not None and m_d is not None else
                      f"to {t}: {len(reached(bn, t, res['steps_per_epoch']))}/{len(bn)} vs "
                      f"{len(reached(bn_d, t, res['steps_per_epoch']))}/{len(bn_d)} runs")
    faster = any(v > 0 for v in signs) and not any(v < 0 for v in signs)
    text, z = difference(finals(bn), finals(bn_d))
    kept = z > -SIGNIFICANT
    plain, plain_d = (select(runs, norm="none", dropout=0.0),
                      select(runs, norm="none", dropout=rate))
    helps = difference(finals(plain_d), finals(plain))[0].removeprefix("difference ")
    verdict = status({"faster without dropout": faster,
                      "no less accurate without dropout": kept})
    gap = {label(r[0]["config"]): metrics.mean_std(
        [x["train_accuracy"] - x["test_accuracy"][-1] for x in r])[0]
        for r in (bn, bn_d, plain_d, plain)}
    return (f"{verdict}: BN without dropout vs with dropout {rate:g}: "
            + "; ".join(speeds) + f"; final test accuracy {text}; without BN, dropout "
            f"changes test accuracy by {helps}; train - test gaps "
            + ", ".join(f"{k} {v:.3f}" for k, v in gap.items()) + ".")


def batch_size_table(data: Data) -> Table:
    """Final test accuracy per batch size (rows) and norm (columns).

    Example:
      >>> from bnjax_train.studies.summary import committed
      >>> header, rows = batch_size_table(committed("batch_size"))
      >>> header[:3], [row[0] for row in rows]
      (['batch size', 'BN', 'renorm'], ['2', '4', '16', '64', '256'])
    """
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


#: Norms whose statistics do not depend on the batch (the alternatives to BN at small batches).
BATCH_FREE = ("group", "group1", "layer")


def batch_size_verdict(data: Data) -> str:
    """At the smallest batch, do other norms beat BN, which holds its own at its best size?

    "Holds its own": no batch-free norm (group or layer norm) is ahead of BN at the batch size
    where BN does best; BN's own variants (renorm, ghost batches) are reported separately.

    Example:
      >>> from bnjax_train.studies.summary import committed
      >>> batch_size_verdict(committed("batch_size")).startswith(
      ...     ("confirmed", "partly confirmed", "not confirmed"))
      True
    """
    s, res = _parts(data)
    small = min(s["batch_sizes"])
    others = [n for n in s["norms"] if n not in ("batch", "none")]

    def acc(norm: str, batch: int) -> list[float]:
        return finals(select(res["runs"], norm=norm, batch_size=batch))

    def mean(norm: str, batch: int) -> float:
        return metrics.mean_std(acc(norm, batch))[0]

    def ahead(batch: int, norms: list[str]) -> list[tuple[str, float]]:
        """The norms at ``batch`` significantly ahead of BN, and by how many standard errors."""
        found = [(label({"norm": n}), metrics.compare(acc(n, batch), acc("batch", batch))[1])
                 for n in norms if acc(n, batch)]
        return [(name, z) for name, z in found if z >= SIGNIFICANT]

    best = max(s["batch_sizes"], key=lambda b: mean("batch", b))
    beaten = ahead(small, others)
    free = ahead(best, [n for n in others if n in BATCH_FREE])
    variants = ahead(best, [n for n in others if n not in BATCH_FREE])
    facts = {"BN falls behind other norms at the smallest batch": bool(beaten),
             "no batch-free norm beats BN at its best batch size": not free}

    def names(found: list[tuple[str, float]]) -> str:
        return ", ".join(f"{name} ({z:.1f} standard errors)" for name, z in found)

    return (f"{status(facts)}: at batch {small} BN reaches {mean('batch', small):.3f} and is "
            + (f"beaten by {names(beaten)}" if beaten else "beaten by no other norm")
            + f"; at its best batch size, {best}, BN reaches {mean('batch', best):.3f}, "
            + (f"beaten by {names(free)}" if free else "ahead of or level with group and layer"
               " norm")
            + (f"; ahead of it there among its own variants: {names(variants)}" if variants
               else "")
            + f"; without any norm: {mean('none', small):.3f} at batch {small}, "
            f"{mean('none', best):.3f} at {best}.")
