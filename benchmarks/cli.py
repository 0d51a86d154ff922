"""Command line of ``python -m benchmarks``: run a benchmark, print its tables, write its JSON.

Subcommands (each prints markdown tables and writes every figure, with the run's provenance,
to ``--out``; the default is under ``bench_results/``, outside the tracked files):

- ``step``: op level and model level step times of bnjax's batch norm against Flax's
  (``--parts op,model``); ``op`` and ``model`` run one part;
- ``fold``: ResNet-20 eval with and without the batch norms folded;
- ``sync``: a data-parallel train step with synchronized vs per-device statistics;
- ``parallel``: the train step on a device mesh (``jax.jit``, ``jax.shard_map``) and under
  ``pmap``, with synchronized and per-device statistics;
- ``inference_eval``: PreciseBN, MC batch norm and folding on a trained model;
- ``port``: a Flax model and its port to bnjax trained side by side, float32 and float64;
- ``report``: the tables of results JSON files, or ``--update`` the marked regions of pages.

Only the chosen benchmark's module is imported, after the arguments are parsed, so that
``sync`` and ``parallel`` can give JAX its 8 CPU devices before JAX starts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from benchmarks import common

__all__ = ["main"]


def _positive_reps(parser: argparse.ArgumentParser, reps: int, minimum: int, flag: str) -> None:
    if reps < minimum:
        parser.error(f"{flag}={reps}: use at least {minimum} runs (or --quick for a smoke test)")


def _step(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    from benchmarks import model as model_bench
    from benchmarks import op as op_bench

    reps = args.reps if args.reps is not None else (3 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if reps < 1 or warmup < 0:
        parser.error(f"--reps={reps} must be >= 1 and --warmup={warmup} >= 0")
    parts = {"op": ["op"], "model": ["model"]}.get(args.command) or [
        p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - {"op", "model"})
    if unknown:
        parser.error(f"--parts names {unknown}; accepted: op, model")
    meta = common.run_metadata("step", args.argv, quick=args.quick, reps=reps, warmup=warmup,
                               parts=parts)
    result: dict[str, Any] = {"meta": meta}
    if "op" in parts:
        _log("op level ...")
        shapes = op_bench.QUICK_SHAPES if args.quick else op_bench.SHAPES
        result.update(op_bench.run(shapes, op_bench.DTYPES, reps=reps, warmup=warmup, log=_log))
    if "model" in parts:
        _log("model level ...")
        result["model"] = model_bench.run(
            batch=4 if args.quick else 128, blocks_per_stage=0 if args.quick else 3,
            reps=reps, warmup=warmup, log=_log,
            models_=("resnet20",) if args.quick else tuple(model_bench.MODELS))
    return result


def _fold(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    if args.quick:
        args.batch, args.size, args.reps, args.warmup = 8, 8, 3, 1
    else:
        _positive_reps(parser, args.reps, 20, "--reps")
    from benchmarks import fold

    meta = common.run_metadata("fold", args.argv, quick=args.quick)
    r = fold.run(args.batch, args.size, args.reps, args.warmup, eager=args.eager,
                 quick=args.quick)
    return {"meta": meta, **r, "quick": args.quick}


def _sync(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    if args.quick:
        args.steps, args.warmup = 3, 1
    else:
        _positive_reps(parser, args.steps, 20, "--steps")
    from benchmarks import sync

    meta = common.run_metadata(args.command, args.argv, quick=args.quick)
    run = sync.run if args.command == "sync" else sync.run_parallel
    r = run(per_device=args.per_device, length=args.length, steps=args.steps,
            warmup=args.warmup, seed=args.seed, quick=args.quick)
    return {"meta": meta, **r, "quick": args.quick}


def _inference_eval(args: argparse.Namespace,
                    parser: argparse.ArgumentParser) -> dict[str, Any]:
    from benchmarks import inference_eval

    workdir = args.workdir or inference_eval.default_workdir(args.config, args.num_epochs)
    meta = common.run_metadata("inference_eval", args.argv)
    r = inference_eval.run(args.config, workdir, args.num_samples, args.seed, args.num_epochs)
    return {"meta": meta, **r}


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    from benchmarks import train_run

    workdir = args.workdir or train_run.default_workdir(args.config)
    meta = common.run_metadata("train", args.argv)
    return {"meta": meta, **train_run.run(args.config, workdir)}


def _port(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    from benchmarks import port

    record, seeds = ((1, 5), (0,)) if args.quick else (port.RECORD_STEPS, port.SEEDS)
    meta = common.run_metadata("port", args.argv, quick=args.quick)
    return {"meta": meta, **port.run(record, seeds), "quick": args.quick}


def _gpu_check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    from benchmarks import gpu_check

    return gpu_check.main(args.argv)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _add_step(sub: Any) -> None:
    for name, what in (("step", "op and model level step times (--parts)"),
                       ("op", "op level step times only"), ("model", "model level only")):
        p = sub.add_parser(name, help=what, description=f"bnjax vs Flax batch norm: {what}.")
        p.add_argument("--quick", action="store_true",
                       help="tiny shapes, few runs: a smoke test whose figures mean nothing")
        p.add_argument("--out", metavar="FILE", help=f"JSON file (default bench_results/"
                       f"{name}.json)")
        p.add_argument("--reps", type=int, default=None,
                       help="timed runs per figure (default 20; 3 with --quick)")
        p.add_argument("--warmup", type=int, default=None,
                       help="untimed runs first (default 2; 1 with --quick)")
        if name == "step":
            p.add_argument("--parts", default="op,model",
                           help="comma-separated parts to run: op, model (default both)")


def _add_others(sub: Any) -> None:
    p = sub.add_parser("fold", help="ResNet-20 eval, batch norms folded vs not")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=32, help="image height and width (CIFAR: 32)")
    p.add_argument("--reps", type=int, default=20, help="timed runs per variant (>= 20)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--eager", action="store_true",
                   help="also time op-by-op execution (no jit) of both variants")
    p.add_argument("--quick", action="store_true", help="tiny smoke test; figures meaningless")
    p.add_argument("--out", metavar="FILE", help="JSON file (default bench_results/fold.json)")
    for name, what in (("sync", "train step, synchronized vs local BN on 8 CPU devices"),
                       ("parallel", "train step on a mesh (jit, shard_map) and under pmap, "
                                    "synchronized and local BN, on 8 CPU devices")):
        s = sub.add_parser(name, help=what)
        s.add_argument("--per-device", type=int, default=16, help="examples per device")
        s.add_argument("--length", type=int, default=40, help="MNIST-1D sequence length")
        s.add_argument("--steps", type=int, default=30, help="timed steps per variant (>= 20)")
        s.add_argument("--warmup", type=int, default=3)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--quick", action="store_true",
                       help="smoke test: a tiny net, 3 steps; figures meaningless")
        s.add_argument("--out", metavar="FILE",
                       help=f"JSON file (default bench_results/{name}.json)")
    e = sub.add_parser("inference_eval", help="PreciseBN, MCBN and folding on a trained model")
    e.add_argument("--config", default="configs/default.py")
    e.add_argument("--workdir", default=None,
                   help="training run (default runs/inference_eval/<config>[_<N>ep])")
    e.add_argument("--num_samples", type=int, default=32, help="MCBN samples")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--num_epochs", type=int, default=0,
                   help="override the config's number of epochs (0: keep it)")
    e.add_argument("--out", metavar="FILE",
                   help="JSON file (default bench_results/inference_eval_<config>[_<N>ep].json)")
    t = sub.add_parser("train", help="the training program's config with batch norm and without")
    t.add_argument("--config", default="configs/default.py")
    t.add_argument("--workdir", default=None,
                   help="parent of the two runs (default runs/benchmarks_train/<config>)")
    t.add_argument("--out", metavar="FILE", help="JSON file (default bench_results/train.json)")
    o = sub.add_parser("port", help="a Flax model and its bnjax port trained side by side")
    o.add_argument("--quick", action="store_true", help="5 steps, 1 seed: a smoke test")
    o.add_argument("--out", metavar="FILE", help="JSON file (default bench_results/port.json)")
    g = sub.add_parser("gpu_check", help="tests and benchmarks on one GPU (see gpu_check.sh)")
    g.add_argument("--dry-run", action="store_true", help="tiny, on CPU: checks the script")
    g.add_argument("--out", metavar="FILE", help="JSON file (default bench_results/gpu_check"
                   ".json)")
    r = sub.add_parser("report", help="print the tables of results JSON files, or update pages")
    r.add_argument("files", nargs="*", metavar="FILE.json")
    r.add_argument("--table", help="print only this table (e.g. op, memory, model, fold)")
    r.add_argument("--update", nargs="+", metavar="PATH",
                   help="rewrite the marked regions of these markdown files or folders")


def _report(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import json

    from benchmarks import report

    if not args.files and not args.update:
        parser.error("report needs FILE.json arguments or --update PATH")
    for path in args.files:
        if args.table:
            print(report.render(os.path.abspath(path), args.table))
        else:
            with open(path) as f:
                print(report.render_all(json.load(f)))
        print()
    for changed in report.update(args.update or []):
        _log(f"updated {changed}")
    return 0


_RUNNERS = {"step": _step, "op": _step, "model": _step, "fold": _fold, "sync": _sync,
            "parallel": _sync, "inference_eval": _inference_eval, "train": _train,
            "port": _port, "gpu_check": _gpu_check}


def _default_out(args: argparse.Namespace) -> str:
    name = args.command
    if name == "inference_eval":
        from pathlib import Path

        name += "_" + Path(args.config).stem + (f"_{args.num_epochs}ep" if args.num_epochs
                                                else "")
    return str(common.RESULTS_DIR / f"{name}.json")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the subcommand named on the command line; returns the exit status.

    Args:
      argv: command-line arguments (default ``sys.argv[1:]``), e.g. ``["fold", "--quick"]``.

    Example:
      >>> main(["--help"])  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      SystemExit: 0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmarks of bnjax: run one, print its tables, write its JSON with the "
                    "run's provenance (see docs/benchmarks.md).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_step(sub)
    _add_others(sub)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command == "report":
        return _report(args, parser)
    if args.command in ("sync", "parallel"):  # before JAX starts: 8 CPU devices
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_force_host_platform_device_count=8").strip()
    if args.command in ("fold", "sync", "parallel"):
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    t0 = time.perf_counter()
    result = _RUNNERS[args.command](args, parser)
    result["meta"]["seconds"] = round(time.perf_counter() - t0, 1)
    from benchmarks import report

    print(report.render_all(result))
    common.write_json(result, args.out or _default_out(args))
    return 0
