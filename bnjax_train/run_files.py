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

import contextlib
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
    "drop_lines_after",
    "epoch_records",
    "finite_or_none",
    "read_config_json",
    "read_metrics",
    "set_aside_metrics",
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
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a full disk: leave no half file behind
            os.remove(tmp)
        raise


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


def _readable(line: str) -> dict[str, Any] | None:
    """A line as a metrics record: a JSON object whose ``step`` (if any) is a count."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    step = record.get("step", 0)
    return record if isinstance(step, int) and not isinstance(step, bool) else None


def read_metrics(path: str, damaged: list[int] | None = None) -> list[dict[str, Any]]:
    r"""The readable lines of ``metrics.jsonl`` (a torn last line is dropped).

    A complete line that is not a metrics record (not JSON, not an object, a ``step`` that is
    not a count) is left out, and its number (from 1) added to ``damaged``; the lines after
    it are kept.

    Example:
      >>> import os, tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     path = os.path.join(d, "metrics.jsonl")
      ...     write_atomic(path, '{"step": 4}\n{garbage\n{"step": 8}\n{"step": 12')
      ...     bad = []
      ...     read_metrics(path, bad), bad
      ([{'step': 4}, {'step': 8}], [2])
    """
    if not os.path.exists(path):
        return []
    out = []
    with open(path, errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith("\n"):
                break  # the half line of a process killed while writing it
            record = _readable(line)
            if record is not None:
                out.append(record)
            elif damaged is not None:
                damaged.append(number)
    return out


def drop_lines_after(path: str, step: int | None) -> None:
    r"""Cuts ``metrics.jsonl`` before its first line past ``step`` (None: every epoch line).

    Truncates in place, which needs no disk space: on a full disk it leaves the file as a
    resume from checkpoint ``step`` (or a fresh start) would rewrite it.

    Example:
      >>> import os, tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     path = os.path.join(d, "metrics.jsonl")
      ...     write_atomic(path, '{"step": 4}\n{"step": 8}\n')
      ...     drop_lines_after(path, 4)
      ...     read_metrics(path)
      [{'step': 4}]
    """
    if not os.path.exists(path):
        return
    offset = 0
    with open(path, "rb") as f:
        for raw in f:
            record = _readable(raw.decode(errors="replace"))
            if not raw.endswith(b"\n") or (record is not None
                                            and record.get("step", 0) > (step or 0)):
                break
            offset += len(raw)
    os.truncate(path, offset)


def set_aside_metrics(workdir: str) -> str:
    r"""Moves ``metrics.jsonl`` to ``<workdir>/damaged_metrics/`` (as it is); its new path.

    Example:
      >>> import os, tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     write_atomic(os.path.join(d, "metrics.jsonl"), "{garbage\n")
      ...     os.path.relpath(set_aside_metrics(d), d), os.listdir(d)
      ('damaged_metrics/metrics.jsonl', ['damaged_metrics'])
    """
    aside = os.path.join(workdir, "damaged_metrics")
    os.makedirs(aside, exist_ok=True)
    dest, k = os.path.join(aside, "metrics.jsonl"), 1
    while os.path.lexists(dest):
        k += 1
        dest = os.path.join(aside, f"metrics-{k}.jsonl")
    os.replace(os.path.join(workdir, "metrics.jsonl"), dest)
    return dest


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
