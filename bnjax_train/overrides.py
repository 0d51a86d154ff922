"""``--config.FIELD=VALUE`` on the command line: found among the arguments, parsed, applied.

``train.py`` loads a config file (``--config FILE``) and then sets the fields named on the
command line, in any order relative to ``--config``: ``--config.learning_rate=1e-3``,
``--config.model_kwargs.features=(16,16)``, ``--config.progress_bar=false`` (also
``--config.FIELD VALUE``). A value is read as the type of the field it replaces: text for a
text field, ``true``/``false`` for a switch, a Python literal (number, tuple, dict) otherwise; a
value that does not read as that type is kept as text, so :func:`bnjax_train.config_lib.
validate_config` reports it like any other bad value, naming the field and what it accepts.
New entries may be added under a mapping (``model_kwargs``); a field the config does not know
is reported by the validation as unknown, with the known ones.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["PREFIX", "apply_overrides", "parse_value", "split_overrides"]

#: What starts a config override on the command line.
PREFIX = "--config."

_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str | None]]]:
    """Separates ``--config.PATH=VALUE`` / ``--config.PATH VALUE`` from the other arguments.

    Returns:
      The other arguments, in order, and ``(PATH, VALUE)`` pairs (``VALUE`` None when none
      was given: ``--config.progress_bar`` alone, or before another ``--`` argument).

    Example:
      >>> split_overrides(["train.py", "--config.seed=3", "--workdir", "w",
      ...                  "--config.num_epochs", "4", "--config.progress_bar"])
      (['train.py', '--workdir', 'w'], [('seed', '3'), ('num_epochs', '4'), ('progress_bar', None)])
    """
    rest, overrides = [], []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith(PREFIX):
            rest.append(arg)
        elif "=" in arg:
            path, value = arg[len(PREFIX):].split("=", 1)
            overrides.append((path, value))
        elif i + 1 < len(args) and not args[i + 1].startswith("-"):
            overrides.append((arg[len(PREFIX):], args[i + 1]))
            i += 1
        else:
            overrides.append((arg[len(PREFIX):], None))
        i += 1
    return rest, overrides


def parse_value(text: str, current: Any) -> Any:
    """``text`` read as the type of ``current`` (the field's value now); text if it does not read.

    Example:
      >>> parse_value("1e-3", 0.1), parse_value("3", 0.1), parse_value("abc", 0.1)
      (0.001, 3.0, 'abc')
      >>> parse_value("false", True), parse_value("(8, 8)", (4,)), parse_value("runs/x", "data")
      (False, (8, 8), 'runs/x')
    """
    stripped = text.strip()
    if isinstance(current, bool):
        low = stripped.lower()
        return True if low in _TRUE else False if low in _FALSE else text
    try:
        value = ast.literal_eval(stripped)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        if isinstance(current, float) and stripped.lower().lstrip("+-") in ("nan", "inf",
                                                                           "infinity"):
            return float(stripped)
        return text
    if isinstance(current, str):
        return value if isinstance(value, str) else text
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _set(tree: dict[str, Any], path: str, text: str | None) -> str | None:
    """Sets ``path`` of the plain config ``tree``; an error message, or None."""
    keys = path.split(".")
    if not all(keys):
        return f"--config.{path}: not a field path (e.g. --config.model_kwargs.features=(8,8))"
    node = tree
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, Mapping):
            where = ".".join(keys[:depth + 1])
            return (f"--config.{path}: config.{where} is {child!r}, not a mapping; set it "
                    f"with --config.{where}=VALUE")
        node = child
    current = node.get(keys[-1])
    if text is None:
        if isinstance(current, bool):
            text = "true"
        else:
            return f"--config.{path}: needs a value (--config.{path}=VALUE)"
    node[keys[-1]] = parse_value(text, current)
    return None


def apply_overrides(config: Any, overrides: Sequence[tuple[str, str | None]]) -> Any:
    """A copy of ``config`` (a ``ConfigDict``) with the command line's values set.

    Raises:
      ValueError: a path through a field that is not a mapping, or a value missing; the
        message names the argument. Values are not checked here: run
        :func:`bnjax_train.config_lib.validate_config` on the result.

    Example:
      >>> import ml_collections
      >>> config = ml_collections.ConfigDict({"seed": 0, "model_kwargs": {}})
      >>> new = apply_overrides(config, [("seed", "3"), ("model_kwargs.hidden", "(16, 16)")])
      >>> new.seed, new.model_kwargs.hidden
      (3, (16, 16))
      >>> apply_overrides(config, [("seed.x", "1")])  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: invalid command line:
        --config.seed.x: config.seed is 0, not a mapping; set it with --config.seed=VALUE
    """
    import ml_collections

    tree = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    errors = [e for path, text in overrides if (e := _set(tree, path, text)) is not None]
    if errors:
        raise ValueError("invalid command line:\n  " + "\n  ".join(errors))
    return ml_collections.ConfigDict(tree)
