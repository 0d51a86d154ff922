"""The command line of the studies: run them, write JSON, PNG and markdown, print the tables.

``python -m bnjax_train.studies NAME [NAME ...] [--quick] [--seeds N] [--out DIR]
[--dataset digits]``; NAME is a study of :data:`bnjax_train.studies.render.STUDIES` or ``all``
(with ``--dataset digits``: every study that runs on it). On MNIST-1D a study writes
``OUT/NAME.*``, on digits ``OUT/NAME_digits.*``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bnjax.benchmark import environment, git_commit, write_json
from bnjax_train.studies.render import STUDIES, render_with_provenance
from bnjax_train.studies.settings import DATASETS, settings_for
from bnjax_train.studies.summary import REPO

__all__ = ["RESULTS", "draw", "main", "parse_args", "result_name", "run_study"]

#: Where results go by default (ignored by git, like the benchmarks' results).
RESULTS = Path("bench_results") / "studies"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command-line arguments; ``all`` expands to every study.

    Example:
      >>> args = parse_args(["placement", "mcbn", "--quick"])
      >>> args.names, args.quick, args.seeds
      (['placement', 'mcbn'], True, 2)
      >>> parse_args(["all", "--dataset", "digits"]).names
      ['covariate_shift', 'smoothness', 'regularization']
    """
    parser = argparse.ArgumentParser(
        prog="python -m bnjax_train.studies",
        description="Measure the claims about batch norm on MNIST-1D (or digits): each study "
                    "trains its runs with several seeds and writes NAME.json, NAME.png and "
                    "NAME.md.")
    parser.add_argument("names", nargs="+", metavar="NAME", choices=[*STUDIES, "all"],
                        help=f"a study ({', '.join(STUDIES)}) or all")
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings, under a minute per study: a test, figures meaningless")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per cell (default 5; 2 with --quick)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"folder (default {RESULTS})")
    parser.add_argument("--data_dir", default="data", help="the MNIST-1D cache (default data)")
    parser.add_argument("--dataset", default="mnist1d", choices=["mnist1d", "digits"],
                        help="mnist1d (default) or digits (covariate_shift, smoothness and "
                             "regularization only)")
    parser.add_argument("--redraw", action="store_true",
                        help="train nothing: redraw NAME.png and NAME.md from OUT/NAME.json")
    args = parser.parse_args(list(argv))
    if args.seeds is None:
        args.seeds = 2 if args.quick else 5
    if args.seeds < 1:
        parser.error(f"--seeds={args.seeds} must be at least 1")
    if "all" in args.names:
        args.names = [n for n in STUDIES if args.dataset in DATASETS[n]]
    wrong = [n for n in args.names if args.dataset not in DATASETS[n]]
    if wrong:
        parser.error(f"--dataset={args.dataset} is not a dataset of {', '.join(wrong)}; "
                     f"accepted: {', '.join(DATASETS[wrong[0]])}")
    return args


def result_name(name: str, dataset: str) -> str:
    """The stem of a study's files: ``NAME`` on MNIST-1D, ``NAME_digits`` on digits.

    Example:
      >>> result_name("smoothness", "mnist1d"), result_name("smoothness", "digits")
      ('smoothness', 'smoothness_digits')
    """
    return name if dataset == "mnist1d" else f"{name}_{dataset}"


def _runner(name: str) -> Callable[..., dict[str, Any]]:
    from bnjax_train.studies import inference, landscape, training

    return {"learning_rate": training.run_learning_rate, "placement": training.run_placement,
            "dropout": training.run_dropout, "batch_size": training.run_batch_size,
            "momentum": inference.run_momentum, "mcbn": inference.run_mcbn,
            "covariate_shift": landscape.run_covariate_shift,
            "smoothness": landscape.run_smoothness,
            "regularization": training.run_regularization}[name]


def run_study(name: str, *, quick: bool, seeds: int, out: Path, data_dir: str,
              argv: Sequence[str], dataset: str = "mnist1d") -> dict[str, Any]:
    """Runs study ``name`` on ``dataset``, writes its JSON, PNG and markdown, returns the results.

    Example:
      >>> r = run_study("placement", quick=True, seeds=2, out=Path("/tmp/s"), data_dir="data",
      ...               argv=["placement", "--quick"])  # doctest: +SKIP
    """
    from bnjax_train.studies.engine import load_data

    settings = settings_for(name, quick, dataset)
    git = git_commit(REPO)
    meta: dict[str, Any] = {
        "benchmark": "study", "study": name,
        "command": shlex.join(["python", "-m", "bnjax_train.studies", *argv]),
        "git_commit": git["commit"], "git_dirty": git["dirty"],
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": quick, "seeds": list(range(seeds)), "settings": settings,
        "environment": environment()}
    t0 = time.perf_counter()
    data = load_data(settings["dataset"], data_dir, max_train=settings.get("max_train", 0),
                     max_test=settings.get("max_test", 0))
    results = _runner(name)(data, settings, meta["seeds"])
    results["num_classes"] = data.num_classes
    meta["seconds"] = time.perf_counter() - t0
    out_data = {"meta": meta, "results": results}
    stem = result_name(name, dataset)
    write_json(out_data, out / f"{stem}.json")
    draw(stem, out)
    return out_data


def draw(name: str, out: Path) -> str:
    """Writes ``out/NAME.png`` and ``out/NAME.md`` from ``out/NAME.json``; returns the markdown.

    ``NAME`` is a file stem (:func:`result_name`).

    Example:
      >>> draw("placement", REPO / "docs" / "studies")  # doctest: +SKIP
    """
    from bnjax_train.studies.plots import plot_study

    json_path = (out / f"{name}.json").resolve()
    data = json.loads(json_path.read_text())
    plot_study(data, out / f"{name}.png")
    # Between the markers of python -m benchmarks report (the path from the repository root
    # when the file is in it), so the page is re-rendered and checked like the docs.
    where = json_path.relative_to(REPO) if json_path.is_relative_to(REPO) else json_path
    markdown = (f"# Study: {name}\n\n![{name}]({name}.png)\n\n<!-- rendered: {where} table -->\n"
                + render_with_provenance(data) + "\n<!-- end rendered -->\n")
    (out / f"{name}.md").write_text(markdown)
    print(markdown, flush=True)
    return markdown


def main(argv: Sequence[str]) -> int:
    """Runs the studies named in ``argv``; returns the exit status.

    Compiled programs are cached on disk for the run (a temporary folder, removed at the
    end): PreciseBN and MC batch norm compile their passes anew on every call, and the cache
    turns the repeats into look-ups.

    Example:
      >>> main(["placement", "--quick", "--out", "/tmp/s"])  # doctest: +SKIP
      0
    """
    args = parse_args(argv)
    if args.redraw:
        for name in args.names:
            draw(result_name(name, args.dataset), args.out)
        return 0
    import jax

    cache = tempfile.mkdtemp(prefix="bnjax_studies_xla_")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    try:
        for name in args.names:
            t0 = time.perf_counter()
            run_study(name, quick=args.quick, seeds=args.seeds, out=args.out,
                      data_dir=args.data_dir, argv=argv, dataset=args.dataset)
            print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return 0
