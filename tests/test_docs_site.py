"""The docs are true: every Python block of README.md and docs/ runs, and the site builds.

- Each ```python block of a page runs, the blocks of one page in order in one fresh namespace,
  in an empty temporary working directory and with `tempfile`'s folder pointed at an empty one;
  both must be empty again afterwards (an example cleans up what it writes). A block fenced
  ```python no-run is skipped, only for an example that needs a network or a GPU, which its
  first line must say.
- Outside the regions rendered from results JSON (`<!-- rendered: FILE TABLE -->`), no page
  types a measured figure by hand (an accuracy such as 0.974, a percentage with decimals, a
  time in ms).
- `mkdocs build --strict` builds the site into a temporary folder (skipped where mkdocs, its
  material theme or mkdocstrings is not installed: `pip install -e ".[docs]"`).
- The API reference is the public face and no more: at most 10 pages; each name of the
  `__all__` of `bnjax`, `bnjax.nnx`, `bnjax.keras`, `bnjax.convert` and `bnjax.timing` on
  exactly one page; nothing else (no plumbing module such as `bnjax.stats`), and a module
  shown lists its members explicitly.
"""

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# docs/benchmarks.md holds the benchmark tables; its figures are checked against the JSON by
# tests/test_rendered_tables.py.
PAGES = [REPO / "README.md"] + sorted((REPO / "docs").rglob("*.md"))
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.M | re.S)
RENDERED = re.compile(r"<!-- rendered: \S+ \S+ -->\n.*?<!-- end rendered -->", re.S)
HAND_FIGURE = re.compile(r"(?<![\w.])(?:0\.\d{3,}|\d+\.\d+ ?%|\d+(?:\.\d+)? ?ms)(?![\w.])")


def python_blocks(page: Path) -> list[tuple[int, str, str]]:
    """``(line, info, source)`` of each fenced Python block of ``page``, dedented."""
    text = page.read_text()
    blocks = []
    for m in FENCE.finditer(text):
        words = m["info"].split()
        if not words or words[0] not in ("python", "py"):
            continue
        indent = len(m["indent"])
        source = "".join(line[indent:] for line in m["body"].splitlines(keepends=True))
        line = text.count("\n", 0, m.start("body")) + 1
        blocks.append((line, " ".join(words[1:]), source))
    return blocks


def _rel(page: Path) -> str:
    return str(page.relative_to(REPO))


PAGES_WITH_CODE = [p for p in PAGES if python_blocks(p)]


def test_the_pages_that_teach_by_example_have_python_blocks():
    names = {_rel(p) for p in PAGES_WITH_CODE}
    assert {"README.md", "docs/index.md", "docs/layer.md", "docs/porting.md", "docs/sync.md",
            "docs/inference.md", "docs/variants.md", "docs/try.md"} <= names, names


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=_rel)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    cwd, scratch = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    scratch.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    namespace: dict = {"__name__": "__docs__"}
    for line, info, source in python_blocks(page):
        if "no-run" in info:
            first = source.splitlines()[0] if source.strip() else ""
            assert re.search(r"network|GPU", first), (
                f"{_rel(page)}:{line}: a no-run block must say on its first line why (it "
                "needs a network or a GPU); every other block runs")
            continue
        # Padded so that a traceback's line numbers are the page's.
        code = compile("\n" * (line - 1) + source, f"{_rel(page)}", "exec")
        try:
            exec(code, namespace)  # noqa: S102 - running the docs is the point
        except Exception as e:  # pragma: no cover - the message is the point
            raise AssertionError(f"{_rel(page)}: the python block at line {line} failed: "
                                 f"{e!r}\n{source}") from e
    assert not list(cwd.iterdir()), f"{_rel(page)} left {sorted(os.listdir(cwd))} behind"
    assert not list(scratch.iterdir()), f"{_rel(page)} left {sorted(os.listdir(scratch))} in tmp"


def test_python_blocks_are_found_with_their_lines(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# t\n\n```python\na = 1\n```\n\n!!! note\n    ```python no-run\n"
                    "    # needs a GPU\n    b = 2\n    ```\n\n```bash\nls\n```\n")
    assert python_blocks(page) == [(4, "", "a = 1\n"),
                                   (9, "no-run", "# needs a GPU\nb = 2\n")]


@pytest.mark.parametrize("page", [p for p in PAGES if p.name != "benchmarks.md"], ids=_rel)
def test_no_figure_typed_by_hand(page):
    text = RENDERED.sub("", page.read_text())
    text = FENCE.sub("", text)  # code may hold any number (tolerances, shapes)
    found = [m.group(0) for m in HAND_FIGURE.finditer(text)]
    assert not found, (
        f"{_rel(page)} quotes {found}: figures come from committed results JSON, rendered "
        "between <!-- rendered: FILE TABLE --> markers by python -m benchmarks report")


def _have(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


@pytest.mark.skipif(not _have("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers"),
                    reason='mkdocs, mkdocs-material or mkdocstrings[python] is not installed '
                           '(pip install -e ".[docs]")')
def test_mkdocs_build_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(REPO / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "index.html").exists()
    assert (tmp_path / "site" / "api" / "layers" / "index.html").exists()
    # What was rendered is the public face: each of its names has its anchor on exactly one
    # reference page, and no other object of bnjax is rendered there (members of a class of
    # the face, such as TrainState.create, are the class's own).
    face, pages = public_face(), {}
    for html in (tmp_path / "site" / "api").rglob("index.html"):
        for anchor in set(re.findall(r'id="(bnjax(?:\.\w+)*)"', html.read_text())):
            pages.setdefault(anchor, []).append(html.parent.name)
    bad = {n: pages.get(n, []) for n in sorted(face) if len(pages.get(n, [])) != 1}
    assert not bad, f"names of the public face not rendered on exactly one page: {bad}"
    stray = [a for a in pages if a not in face | set(PUBLIC_MODULES)
             and a.rsplit(".", 1)[0] not in face]
    assert not stray, f"the reference renders {stray}, which are not in the public face"


def test_docstrings_are_rewritten_for_the_site():
    pytest.importorskip("griffe", reason='griffe comes with mkdocstrings[python] (".[docs]")')
    spec = importlib.util.spec_from_file_location(
        "griffe_docstrings", REPO / "docs" / "_ext" / "griffe_docstrings.py")
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    doc = ("Uses :func:`~bnjax.moments`.\n\nTable:\n\n  ====  ===\n  a     b\n  ====  ===\n"
           "  x     y\n  ====  ===\n\nExample:\n  >>> x[\"a\"]\n")
    assert ext.rewrite(doc) == (
        "Uses `bnjax.moments`.\n\nTable:\n\n  ```text\n  ====  ===\n  a     b\n  ====  ===\n"
        "  x     y\n  ====  ===\n  ```\n\nExamples:\n  >>> x[\"a\"]\n")


# The public face: the modules whose ``__all__`` the API reference shows, and nothing else.
PUBLIC_MODULES = ("bnjax", "bnjax.nnx", "bnjax.keras", "bnjax.convert", "bnjax.timing")
MAX_API_PAGES = 10
# A ``::: identifier`` line and the indented YAML options under it.
DIRECTIVE = re.compile(r"^:::[ \t]*(?P<id>\S+)[ \t]*(?:\n|$)"
                       r"(?P<options>(?:[ \t]+\S.*(?:\n|$))*)", re.M)


def public_face() -> set[str]:
    """The full names of every public module's ``__all__`` (``bnjax.batch_norm``, ...)."""
    face = set()
    for name in PUBLIC_MODULES:
        face |= {f"{name}.{n}" for n in importlib.import_module(name).__all__}
    return face


def documented(page: Path) -> list[str]:
    """The full names a page's mkdocstrings directives render (``::: id`` and ``members:``).

    ``::: bnjax.batch_norm`` renders that name; ``::: bnjax.keras`` with ``options: members:
    [L1, ...]`` renders the names listed; a public module with ``members: false`` renders only
    its docstring. A module of the face without an explicit list, or any other module, is
    returned as it is (and is then no name of the face).
    """
    import yaml

    names = []
    for m in DIRECTIVE.finditer(page.read_text()):
        options = (yaml.safe_load(m["options"]) or {}).get("options") or {}
        members = options.get("members")
        if m["id"] in PUBLIC_MODULES and members is False:
            continue
        if m["id"] in PUBLIC_MODULES and isinstance(members, list):
            names += [f"{m['id']}.{n}" for n in members]
        else:
            names.append(m["id"])
    return names


def test_directives_are_read_with_their_members(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# t\n\n::: bnjax\n    options:\n      members: false\n\n"
                    "::: bnjax.batch_norm\n\ntext ::: not one\n\n::: bnjax.keras\n"
                    "    options:\n      show_root_heading: false\n      members: [L1,\n"
                    "                L2]\n::: bnjax.stats\n::: bnjax.convert")
    assert documented(page) == ["bnjax.batch_norm", "bnjax.keras.L1", "bnjax.keras.L2",
                                "bnjax.stats", "bnjax.convert"]


def test_api_reference_is_the_public_face():
    api_pages = sorted((REPO / "docs" / "api").glob("*.md"))
    rendering = sorted({p for p in PAGES if DIRECTIVE.search(p.read_text())} | set(api_pages))
    assert len(rendering) <= MAX_API_PAGES, (
        f"{len(rendering)} API reference pages ({[_rel(p) for p in rendering]}); at most "
        f"{MAX_API_PAGES}: group the names by what a user needs")
    face, where = public_face(), {}
    for page in rendering:
        for name in documented(page):
            where.setdefault(name, []).append(_rel(page))
    missing = sorted(face - set(where))
    assert not missing, f"names of the public face on no reference page: {missing}"
    twice = {n: p for n, p in where.items() if len(p) > 1}
    assert not twice, f"names on more than one reference page: {twice}"
    extra = {n: p for n, p in where.items() if n not in face}
    assert not extra, (
        f"the reference documents {extra}, which are not in the public face: the names of "
        f"the __all__ of {', '.join(PUBLIC_MODULES)} (a public module lists its members: "
        "options: members: [...], or members: false for its docstring alone)")
