"""The text files of a workdir: ``config.json`` and ``metrics.jsonl``.

``config.json`` holds the run's resolved config; when the run resumes, the new config is
compared with it (:func:`config_changes`): fields in
``bnjax_train.config_lib.RESUME_CHANGEABLE_FIELDS`` may change (the change becomes an event line
of ``metrics.jsonl``), the others may not.

``metrics.jsonl`` is strict JSON, one object per line (a non-finite number is written as
``null``): one line per epoch (``epoch``, ``step``, ``train_*``, ``test_*``, ...) and event lines
(``{"event": "config_change", "step": N, "changes": {FIELD: [OLD, NEW]}}``). Files are replaced
atomically or appended line by line with ``fsync``, so a process killed at any moment leaves
whole lines.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from bnjax_train.config_lib import INVOCATION_FIELDS, RESUME_CHANGEABLE_FIELDS

__all__ = [
    "append_metrics",
    "check_same_config",
    "config_changes",
    "epoch_records",
    "finite_or_none",
    "read_config_json",
    "read_metrics",
    "write_atomic",
    "write_metrics",
]


def write_atomic(path: str, text: str) -> None:
    r"""Writes ``text`` to ``path`` through a temporary file and a rename: never half a file.

    Example:
      >>> import os, tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     write_atomic(os.path.join(d, "a.txt"), "hi\n")
      ...     os.listdir(d)
      ['a.txt']
    """
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def finite_or_none(tree: Any) -> Any:
    """``tree`` (dicts, lists, numbers) with every non-finite float replaced by None.

    Example:
      >>> finite_or_none({"loss": float("nan"), "acc": [0.5, float("inf")], "step": 3})
      {'loss': None, 'acc': [0.5, None], 'step': 3}
    """
    if isinstance(tree, Mapping):
        return {k: finite_or_none(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [finite_or_none(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree


def _line(record: Mapping[str, Any]) -> str:
    return json.dumps(finite_or_none(record), allow_nan=False) + "\n"


def read_metrics(path: str) -> list[dict[str, Any]]:
    r"""The complete lines of ``metrics.jsonl`` (a torn last line is dropped).

    Example:
      >>> import os, tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     path = os.path.join(d, "metrics.jsonl")
      ...     write_atomic(path, '{"step": 4}\n{"step": 8')
      ...     read_metrics(path)
      [{'step': 4}]
    """
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


def epoch_records(lines: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The epoch lines of ``metrics.jsonl`` (without the event lines).

    Example:
      >>> epoch_records([{"epoch": 1, "step": 4}, {"event": "config_change", "step": 4}])
      [{'epoch': 1, 'step': 4}]
    """
    return [dict(r) for r in lines if "event" not in r]


def append_metrics(path: str, record: Mapping[str, Any]) -> None:
    """Appends one strict JSON line to ``metrics.jsonl`` and flushes it to disk.

    Example:
      >>> import os, tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     append_metrics(os.path.join(d, "m.jsonl"), {"step": 1, "loss": float("nan")})
      ...     with open(os.path.join(d, "m.jsonl")) as f:
      ...         print(f.read(), end="")
      {"step": 1, "loss": null}
    """
    with open(path, "a") as f:
        f.write(_line(record))
        f.flush()
        os.fsync(f.fileno())


def write_metrics(path: str, records: Sequence[Mapping[str, Any]]) -> None:
    """Replaces ``metrics.jsonl`` with ``records`` (atomically).

    Example:
      >>> import os, tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     write_metrics(os.path.join(d, "m.jsonl"), [{"step": 4}, {"step": 8}])
      ...     read_metrics(os.path.join(d, "m.jsonl"))
      [{'step': 4}, {'step': 8}]
    """
    write_atomic(path, "".join(_line(r) for r in records))


def read_config_json(workdir: str) -> dict[str, Any] | None:
    """The config a workdir's run was started with (``config.json``), or None if there is none.

    Raises:
      ValueError: ``config.json`` is not a JSON object; the message names the file.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     print(read_config_json(d))
      None
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        old = e
    if not isinstance(old, dict):
        raise ValueError(
            f"{path} is not a config written by train.py ({old}); it records the config of the "
            "run in that workdir. Put the original back, or use a new --workdir.")
    return old


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]
                   ) -> tuple[list[str], dict[str, list[Any]]]:
    """Fields that differ between a run's ``config.json`` and a new config, sorted in two.

    Returns:
      The fields that may not change (``"FIELD: OLD there, NEW now"``), and those that may
      (``{FIELD: [OLD, NEW]}``, ``RESUME_CHANGEABLE_FIELDS``); the fields of
      ``INVOCATION_FIELDS`` are left out.

    Example:
      >>> config_changes({"seed": 0, "learning_rate": 0.1}, {"seed": 1, "learning_rate": 0.01})
      (['config.seed: 0 there, 1 now'], {'learning_rate': [0.1, 0.01]})
    """
    refused, changed = [], {}
    for k in sorted(set(old) | set(new)):
        if k in INVOCATION_FIELDS or old.get(k) == new.get(k):
            continue
        if k in RESUME_CHANGEABLE_FIELDS:
            changed[k] = [old.get(k), new.get(k)]
        else:
            refused.append(f"config.{k}: {old.get(k)!r} there, {new.get(k)!r} now")
    return refused, changed


def check_same_config(workdir: str, config: Mapping[str, Any]) -> dict[str, list[Any]]:
    """The changes a resumed run may make to its config; raises on any other change.

    Fields in ``RESUME_CHANGEABLE_FIELDS`` may differ (they leave every array's shape as it
    is); a workdir without ``config.json`` passes.

    Args:
      workdir: the run's folder.
      config: the new run's config as JSON data (``config_lib.config_dict``).

    Returns:
      ``{FIELD: [OLD, NEW]}`` for the changeable fields that differ.

    Raises:
      ValueError: another field differs; the message names each (old and new value).

    Example:
      >>> import json, os, tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     write_atomic(os.path.join(d, "config.json"), json.dumps({"seed": 0}))
      ...     check_same_config(d, {"seed": 1})  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: workdir ... holds a run with another config (fields config.seed: 0 there, ...
    """
    old = read_config_json(workdir)
    if old is None:
        return {}
    refused, changed = config_changes(old, config)
    if refused:
        raise ValueError(
            f"workdir {workdir!r} holds a run with another config (fields "
            + ", ".join(refused)
            + "); resume it with the same config or use a new --workdir. Fields that may "
            f"change when a run resumes: {', '.join(RESUME_CHANGEABLE_FIELDS)}.")
    return changed
