"""Griffe extension: render bnjax's docstrings (Google style with doctest examples) on the site.

The docstrings are written for ``help()`` and ``doctest``: an ``Example:`` section of ``>>>``
lines, reST roles (``:func:`name```) and reST simple tables. Before griffe parses a docstring
this extension

- renames the section ``Example:`` to ``Examples:``, the name under which griffe's Google
  parser renders ``>>>`` lines as code (as ``Example:`` they would be Markdown text, where
  ``x["a"]`` reads as a link);
- turns reST roles into code spans (``:func:`fold_batch_norm``` -> ```fold_batch_norm```);
- puts reST simple tables (between ``====  ====`` rules) in a text code block.

The docstrings themselves are left as they are. mkdocs.yml loads this file through the
mkdocstrings ``extensions`` option.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.M)
_ROLE = re.compile(r":(?:func|class|mod|data|meth|attr|obj|exc):`~?([^`]+)`")
_RULE = re.compile(r"^(\s*)=+(?: +=+)+\s*$")


def _fence_tables(text: str) -> str:
    """Wraps each reST simple table (three ``=`` rules: top, under the header, bottom)."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _RULE.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        rules = [j for j in range(i, len(lines)) if _RULE.match(lines[j])][:3]
        end = rules[-1] if len(rules) == 3 else i
        indent = match.group(1)
        out += [f"{indent}```text", *lines[i:end + 1], f"{indent}```"]
        i = end + 1
    return "\n".join(out)


def rewrite(text: str) -> str:
    """The docstring ``text`` as the site renders it.

    Example:
      >>> rewrite("Uses :func:`~bnjax.moments` and :class:`Moments`.")
      'Uses `bnjax.moments` and `Moments`.'
    """
    text = _EXAMPLE.sub(r"\1Examples:", text)
    text = _ROLE.sub(r"`\1`", text)
    return _fence_tables(text)


class DocstringsForTheSite(griffe.Extension):
    """Rewrites every docstring griffe loads (see the module docstring)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Called by griffe for each module, class, function and attribute it loads."""
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
