"""Every table between `<!-- rendered: FILE TABLE -->` markers in the docs (docs/*.md and the
README) is what `python -m benchmarks report` renders from the committed JSON today, and no
committed result or rendered table publishes a failure as a figure."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import report

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted((REPO / "docs").rglob("*.md")) + [REPO / "README.md"]
REGIONS = [(page, m) for page in PAGES if page.exists()
           for m in report.MARKER.finditer(page.read_text())]


def test_the_benchmarks_page_has_rendered_tables():
    page = REPO / "docs" / "benchmarks.md"
    tables = {(m["path"], m["table"]) for p, m in REGIONS if p == page}
    assert {("benchmarks/results/cpu.json", "op"), ("benchmarks/results/cpu.json", "model"),
            ("benchmarks/results/fold_bench.json", "fold"),
            ("benchmarks/results/sync_bench.json", "sync")} <= tables


def test_the_try_page_renders_the_timing_of_a_real_model():
    page = REPO / "docs" / "try.md"
    assert ("benchmarks/results/resnet20_bench.json", "model") in {
        (m["path"], m["table"]) for p, m in REGIONS if p == page}


@pytest.mark.parametrize("page,match", REGIONS,
                         ids=[f"{p.relative_to(REPO)}:{m['path']}:{m['table']}"
                              for p, m in REGIONS])
def test_rendered_region_matches_its_json(page, match):
    assert match["body"] == report.render(match["path"], match["table"]), (
        f"{page.relative_to(REPO)}: the table {match['table']!r} of {match['path']} is stale; "
        "run: python -m benchmarks report --update docs/ README.md")


def _results(meta=None, **extra):
    return {"meta": {"benchmark": "sync", **(meta or {})}, "devices": 8,
            "per_device_batch": 16, "steps": 40, "ratio_sync_over_local": 1.10692,
            "results": {"sync": {"median_ms": 13.3746, "p25_ms": 12.95, "p75_ms": 13.93,
                                 "min_ms": 12.25},
                        "local": {"median_ms": 12.0827, "p25_ms": 11.22, "p75_ms": 12.84,
                                  "min_ms": 10.21}}, **extra}


def test_render_writes_the_table_and_where_it_was_measured(tmp_path):
    env = {"cpu": "AMD EPYC", "cores": 2, "jax": "0.10.2", "flax": "0.12.8",
           "load_average": [0.5, 0.25, 0.125]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(_results({"command": "python -m benchmarks sync",
                                         "git_commit": "0123456789abcdef0123",
                                         "git_dirty": False, "environment": env})))
    assert report.render(path, "sync") == (
        "cnn1d train step, 8 CPU devices x 16 examples, 40 steps each, interleaved:\n\n"
        "| variant | median ms | p25 ms | p75 ms | min ms |\n"
        "|---|---|---|---|---|\n"
        "| sync | 13.4 | 12.9 | 13.9 | 12.2 |\n"
        "| local | 12.1 | 11.2 | 12.8 | 10.2 |\n\n"
        "Ratio sync / local (medians): 1.107.\n\n"
        "Measured with `python -m benchmarks sync`; commit 0123456789ab; AMD EPYC, 2 cores; "
        "jax 0.10.2, flax 0.12.8; load average at start 0.5/0.25/0.125 (1/5/15 min).")


def test_render_of_an_old_file_says_what_it_lacks(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps(_results(benchmark="sync_bench", machine={"cores": 2})))
    lines = report.render(path, "sync").splitlines()
    assert lines[-1] == ("Note: this file predates the full run metadata; not recorded: "
                         "command, git commit, CPU model, library versions, load average at "
                         "start.")
    with pytest.raises(ValueError, match=r"table='op' is not a table .* accepted: \['sync'\]"):
        report.render(path, "op")


def test_update_rewrites_only_the_marked_regions(tmp_path):
    page = tmp_path / "page.md"
    rel = "benchmarks/results/sync_bench.json"
    page.write_text(f"# Sync\n\nbefore\n<!-- rendered: {rel} sync -->\nold table\n"
                    "<!-- end rendered -->\nafter\n")
    assert report.update([tmp_path]) == [page]
    assert page.read_text() == (f"# Sync\n\nbefore\n<!-- rendered: {rel} sync -->\n"
                                f"{report.render(rel, 'sync')}\n<!-- end rendered -->\nafter\n")
    assert report.update([page]) == []  # up to date: nothing changes


def test_report_command_prints_the_tables_of_a_file(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "report", "benchmarks/results/fold_bench.json",
         "--table", "fold"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == report.render("benchmarks/results/fold_bench.json", "fold")


RESULTS = sorted((REPO / "benchmarks" / "results").glob("*.json")) + sorted(
    (REPO / "docs").rglob("*.json"))
FAILED = re.compile(r"\b(failed|not available|unavailable|error)\b\s*:", re.I)


def _failed_entries(node, where=""):
    """Every place of a results JSON that records a failure instead of a figure."""
    if isinstance(node, dict):
        if node.get("available") is False:
            yield f"{where}: available is False ({node.get('note', '')!r})"
        for k, v in node.items():
            yield from _failed_entries(v, f"{where}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _failed_entries(v, f"{where}[{i}]")
    elif isinstance(node, str) and FAILED.search(node):
        yield f"{where}: {node[:120]!r}"


@pytest.mark.parametrize("path", RESULTS, ids=[str(p.relative_to(REPO)) for p in RESULTS])
def test_no_committed_result_holds_a_failed_row(path):
    failed = list(_failed_entries(json.loads(path.read_text())))
    assert not failed, f"{path.relative_to(REPO)} publishes failures as results: {failed}"


@pytest.mark.parametrize("page,match", REGIONS,
                         ids=[f"{p.relative_to(REPO)}:{m['path']}:{m['table']}"
                              for p, m in REGIONS])
def test_no_rendered_table_shows_a_failed_row(page, match):
    rows = [row for row in match["body"].splitlines() if row.startswith("|")]
    bad = [row for row in rows if FAILED.search(row)]
    assert not bad, f"{page.relative_to(REPO)} shows failed rows: {bad}"


def test_the_failure_check_sees_the_row_a_failed_fold_used_to_write():
    row = {"variant": "bnjax BN folded", "median_ms": None, "available": False,
           "note": 'failed: ValueError: Parameter "use_running_average" must be passed'}
    assert len(list(_failed_entries({"model": [row]}))) == 2
    assert FAILED.search("| resnet20 eval | bnjax BN folded | failed: ValueError: ... |")
    assert not FAILED.search("| resnet20 eval | bnjax BN folded | 41.2 | 0.46 |")
