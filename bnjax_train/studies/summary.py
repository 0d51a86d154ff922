"""Reading the run records of a study's results JSON: selection, per-run figures, phrases.

Every table cell and verdict of the studies is computed here and in the modules that call this
one, from the JSON alone (no JAX), so the docs can be regenerated from the committed files.
A difference is called real when it is at least :data:`SIGNIFICANT` standard errors of the
difference of the means (:func:`bnjax_train.studies.metrics.compare`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bnjax_train.studies import metrics

__all__ = [
    "REPO",
    "SIGNIFICANT",
    "committed",
    "difference",
    "diverged_runs",
    "finals",
    "label",
    "reached",
    "select",
    "speed",
    "status",
    "steps_cell",
]

#: The repository the program sits in (its ``docs/studies/`` holds the committed results).
REPO = Path(__file__).resolve().parents[2]
#: Standard errors of a difference of means from which it is called real.
SIGNIFICANT = 2.0

Record = Mapping[str, Any]
_NORM_LABELS = {"batch": "BN", "none": "no norm", "renorm": "renorm", "ghost": "ghost BN",
                "group": "group norm", "group1": "layer norm (per example)",
                "layer": "layer norm (per position)"}


def committed(name: str) -> dict[str, Any]:
    """The committed results of study ``name``: ``docs/studies/NAME.json`` of the repository.

    Example:
      >>> committed("placement")["meta"]["study"]
      'placement'
    """
    return json.loads((REPO / "docs" / "studies" / f"{name}.json").read_text())


def select(records: Sequence[Record], **config: Any) -> list[Record]:
    """The records whose config has every given field at the given value.

    Example:
      >>> rs = [{"config": {"norm": "batch", "lr": 0.1}}, {"config": {"norm": "none", "lr": 0.1}}]
      >>> len(select(rs, lr=0.1)), len(select(rs, norm="none"))
      (2, 1)
    """
    return [r for r in records if all(r["config"].get(k) == v for k, v in config.items())]


def finals(records: Sequence[Record], key: str = "test_accuracy") -> list[float]:
    """The last value of each record's curve ``key``.

    Example:
      >>> finals([{"test_accuracy": [0.5, 0.9]}, {"test_accuracy": [0.4, 0.8]}])
      [0.9, 0.8]
    """
    return [r[key][-1] for r in records]


def reached(records: Sequence[Record], target: float, steps_per_epoch: int) -> list[int]:
    """Steps to ``target`` test accuracy of the records that reach it.

    Example:
      >>> reached([{"test_accuracy": [0.5, 0.9]}, {"test_accuracy": [0.4, 0.8]}], 0.9, 40)
      [80]
    """
    steps = [metrics.steps_to_target(r["test_accuracy"], target, steps_per_epoch)
             for r in records]
    return [s for s in steps if s is not None]


def steps_cell(records: Sequence[Record], target: float, steps_per_epoch: int) -> str:
    """``"mean ± std"`` steps to ``target`` of the runs that reach it, with ``(k/n)`` if not all.

    Example:
      >>> rs = [{"test_accuracy": [0.5, 0.9]}, {"test_accuracy": [0.9, 0.9]},
      ...       {"test_accuracy": [0.1, 0.1]}]
      >>> steps_cell(rs, 0.9, 40), steps_cell(rs[2:], 0.9, 40)
      ('60 ± 28 (2/3)', 'not reached')
    """
    steps = reached(records, target, steps_per_epoch)
    if not steps:
        return "not reached"
    text = metrics.cell(steps, digits=0)
    return text if len(steps) == len(records) else f"{text} ({len(steps)}/{len(records)})"


def diverged_runs(records: Sequence[Record], num_classes: int) -> int:
    """How many of the records diverged (non-finite loss, or final accuracy near chance).

    Example:
      >>> diverged_runs([{"test_accuracy": [0.1], "nonfinite": True},
      ...                {"test_accuracy": [0.9], "nonfinite": False}], 10)
      1
    """
    return sum(metrics.diverged(r["test_accuracy"][-1], r["nonfinite"], num_classes)
               for r in records)


def label(config: Mapping[str, Any]) -> str:
    """A short name of a config for tables and verdicts.

    Example:
      >>> label({"norm": "batch", "placement": "after"}), label({"norm": "none", "dropout": 0.3})
      ('conv-ReLU-BN', 'no BN, dropout 0.3')
    """
    norm = config.get("norm", "batch")
    if "placement" in config:
        if norm == "none":
            return "no BN"
        return "conv-BN-ReLU" if config["placement"] == "before" else "conv-ReLU-BN"
    if "dropout" in config:
        base = "BN" if norm == "batch" else "no BN"
        return base + (f", dropout {config['dropout']:g}" if config["dropout"] else "")
    return _NORM_LABELS.get(norm, norm)


def difference(a: Sequence[float], b: Sequence[float], digits: int = 3) -> tuple[str, float]:
    """``"difference +0.012, 3.1 standard errors"`` of ``mean(a) - mean(b)``, and the size.

    Example:
      >>> text, z = difference([0.9, 0.92, 0.94], [0.8, 0.82, 0.84])
      >>> text, round(z, 2)
      ('difference +0.100, 6.1 standard errors', 6.12)
    """
    d, z = metrics.compare(a, b)
    return f"difference {d:+.{digits}f}, {abs(z):.1f} standard errors", z


def speed(a: Sequence[Record], b: Sequence[Record], target: float,
          steps_per_epoch: int) -> tuple[float | None, float | None, float]:
    """Mean steps to ``target`` of ``a`` and ``b``, and how many standard errors ``b`` is slower.

    A mean is None unless every run reaches the target; the size is infinite when only ``a``
    reaches it (minus infinity: only ``b``), 0 when neither does.

    Example:
      >>> fast = [{"test_accuracy": [0.95]}, {"test_accuracy": [0.5, 0.95]}]
      >>> slow = [{"test_accuracy": [0.5, 0.5, 0.95]}, {"test_accuracy": [0.5, 0.5, 0.91]}]
      >>> speed(fast, slow, 0.9, 10)
      (15.0, 30.0, 3.0)
    """
    sa, sb = reached(a, target, steps_per_epoch), reached(b, target, steps_per_epoch)
    ma = metrics.mean_std(sa)[0] if a and len(sa) == len(a) else None
    mb = metrics.mean_std(sb)[0] if b and len(sb) == len(b) else None
    if ma is not None and mb is not None:
        return ma, mb, metrics.compare(sb, sa)[1]
    if ma is None and mb is None:
        return ma, mb, 0.0
    return ma, mb, math.inf if mb is None else -math.inf


def status(facts: Mapping[str, bool]) -> str:
    """``confirmed`` when every part of a claim holds, ``not confirmed`` when none does.

    Example:
      >>> status({"faster": True, "stabler": False})
      'partly confirmed (faster; but not stabler)'
    """
    if all(facts.values()):
        return "confirmed"
    if not any(facts.values()):
        return "not confirmed on this data"
    yes = ", ".join(k for k, v in facts.items() if v)
    no = ", ".join(k for k, v in facts.items() if not v)
    return f"partly confirmed ({yes}; but not {no})"
