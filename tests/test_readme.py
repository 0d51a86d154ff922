"""The README is the two-minute page: what bnjax is, set-up, an example, porting, figures, links.

Its Python blocks run in tests/test_docs_site.py with every page of the docs; here, what the
README itself promises: the two set-up commands, its length, the porting table, rendered (never
hand-typed) headline figures, and links that lead somewhere.
"""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
RENDERED = re.compile(r"<!-- rendered: (\S+) (\S+) -->\n(.*?)<!-- end rendered -->", re.S)


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert match, f"the README has no '## {title}' section"
    return match.group(1)


def _slug(heading: str) -> str:
    """The anchor mkdocs (and GitHub) give a heading."""
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"[\s]+", "-", text)


def test_set_up_is_exactly_the_two_commands():
    blocks = re.findall(r"```bash\n(.*?)```", _section("Set-up"), re.S)
    assert len(blocks) == 1, blocks
    commands = [line.split("#")[0].strip() for line in blocks[0].splitlines()]
    assert commands == ['pip install -e ".[train]" && python train.py',
                        'pip install -e ".[test]" && python -m pytest']


def test_short_enough_to_read_in_two_minutes():
    own_lines = RENDERED.sub("", README).count("\n")
    assert own_lines <= 200, f"the README has {own_lines} lines of its own (rendered tables aside)"


def test_an_example_of_about_ten_lines():
    blocks = re.findall(r"```python\n(.*?)```", _section("Example"), re.S)
    assert blocks and len(blocks[0].splitlines()) <= 16, blocks


def test_porting_table_has_one_row_per_library_linking_to_its_section():
    porting = (REPO / "docs" / "porting.md").read_text()
    anchors = {_slug(h) for h in re.findall(r"^## (.+)$", porting, re.M)}
    rows = [r for r in _section("Porting").splitlines() if r.startswith("| ") and "---" not in r]
    for library, anchor in (("Flax linen", "flax-linen"), ("Flax NNX", "flax-nnx"),
                            ("Keras 3", "keras-3"), ("PyTorch", "pytorch")):
        row = [r for r in rows if r.startswith(f"| {library} ")]
        assert len(row) == 1, (library, rows)
        assert f"(docs/porting.md#{anchor})" in row[0], row[0]
        assert anchor in anchors, (anchor, anchors)


def test_headline_figures_are_rendered_regions_only():
    regions = RENDERED.findall(_section("Headline numbers"))
    assert {(path, table) for path, table, _ in regions} == {
        ("benchmarks/results/cpu.json", "headline")}  # a few rows; the full tables: docs
    outside = RENDERED.sub("", _section("Headline numbers"))
    assert not re.search(r"\d\.\d", outside), outside  # no figure typed by hand


def test_links_lead_to_existing_pages_and_headings():
    for target in re.findall(r"\]\(([^)#\s]+)(?:#([^)\s]+))?\)", README):
        path, anchor = target
        if path.startswith("http"):
            continue
        page = REPO / path
        assert page.exists(), f"the README links to {path}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
            assert anchor in {_slug(h) for h in headings}, f"{path} has no heading #{anchor}"


def test_ci_runs_the_readme_test_command_then_the_slow_set():
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#")]
    assert 'python -m pip install -q -e ".[test]"' in ci  # a clean machine has nothing
    assert ci.index("python -m pytest") < ci.index("python -m pytest -m slow"), ci
