"""Command line of ``python -m bnjax.bench``: runs the benchmarks, prints tables, writes JSON."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from bnjax.bench import model as model_bench
from bnjax.bench import op as op_bench
from bnjax.bench.common import environment, markdown_table

__all__ = ["format_report", "main"]

_MODE_NAMES = {"train_fwd": "train fwd", "train_fwd_bwd": "train fwd+bwd",
               "infer_fwd": "inference fwd"}


def _shape(s: Sequence[int]) -> str:
    return "x".join(str(int(v)) for v in s)


def _op_tables(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        by = {(tuple(r["shape"]), r["mode"], r["impl"]): r for r in rows if r["dtype"] == dtype}
        table = []
        for shape, mode in dict.fromkeys((k[0], k[1]) for k in by):
            t = {impl: by[(shape, mode, impl)] for impl in op_bench.IMPLS}
            table.append([
                _shape(shape), _MODE_NAMES[mode],
                *(t[i]["median_ms"] for i in op_bench.IMPLS),
                *(t[i]["gbps"] for i in ("bnjax", "flax.linen", "floor")),
                t["bnjax"]["ratio_to_flax"], t["flax.nnx"]["ratio_to_flax"],
            ])
        out.append(f"Op level, {dtype} (median ms; GB/s over the minimal bytes):\n\n"
                   + markdown_table(
                       ["shape (NHWC)", "pass", "bnjax ms", "flax.linen ms", "flax.nnx ms",
                        "floor ms", "bnjax GB/s", "flax.linen GB/s", "floor GB/s",
                        "bnjax / flax.linen", "nnx / flax.linen"], table))
    return out


def _memory_table(rows: list[dict[str, Any]]) -> str:
    by = {(tuple(r["shape"]), r["dtype"], r["impl"]): r for r in rows}
    table = []
    for shape, dtype in dict.fromkeys((k[0], k[1]) for k in by):
        t = {i: by[(shape, dtype, i)] for i in ("bnjax", "flax.linen", "flax.nnx")}
        table.append([_shape(shape), dtype,
                      *(t[i]["peak_bytes"] / 2**20 for i in t),
                      *(t[i]["temp_bytes"] / 2**20 for i in ("bnjax", "flax.linen")),
                      t["bnjax"]["ratio_to_flax"]])
    return ("Peak memory of the compiled training forward+backward (XLA memory analysis, MiB; "
            "peak = arguments + outputs + temporaries):\n\n" + markdown_table(
                ["shape (NHWC)", "dtype", "bnjax peak", "flax.linen peak", "flax.nnx peak",
                 "bnjax temp", "flax.linen temp", "bnjax / flax.linen"], table))


def _model_table(rows: list[dict[str, Any]]) -> str:
    table = []
    for r in rows:
        name = f"{r['model']} {r['step']}, batch {r['batch']}"
        if r["available"]:
            peak = None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20
            table.append([name, r["variant"], r["median_ms"], r["ratio_to_flax"], peak])
        else:
            table.append([name, r["variant"], r["note"], "-", "-"])
    return ("Model level (median ms of the jitted step):\n\n" + markdown_table(
        ["step", "normalization", "ms", "ratio to flax BN", "peak MiB"], table))


def format_report(result: dict[str, Any]) -> str:
    """The printed report (markdown) of a result dict as ``main`` writes it to JSON.

    Example:
      >>> print(format_report({"meta": {"command": "x", "environment": {"device": "cpu"},
      ...                                "reps": 20, "warmup": 2}}).splitlines()[0])
      # bnjax benchmarks
    """
    meta = result["meta"]
    env = meta["environment"]
    lines = ["# bnjax benchmarks", "", f"Command: `{meta['command']}`", ""]
    lines.append("Machine: " + ", ".join(
        f"{k} {env[k]}" for k in ("device", "cpu", "cores", "cores_usable", "memory_gib",
                                  "jax", "jaxlib", "flax", "python") if k in env))
    if env.get("malloc_env"):
        lines.append("Allocator settings: " + " ".join(
            f"{k}={v}" for k, v in env["malloc_env"].items()))
    if "load_average_end" in meta:
        lines.append(f"Load average (1/5/15 min) at start {env.get('load_average')}, "
                     f"at end {meta['load_average_end']}")
    lines.append(f"Every time: median of {meta['reps']} interleaved runs after "
                 f"{meta['warmup']} warm-up runs.")
    if meta.get("quick"):
        lines.append("QUICK RUN: tiny shapes and few runs; the figures mean nothing.")
    if "op" in result:
        lines += ["", *("\n\n".join(_op_tables(result["op"])).splitlines())]
    if result.get("memory"):
        lines += ["", _memory_table(result["memory"])]
    if "model" in result:
        lines += ["", _model_table(result["model"])]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmarks named on the command line; returns the exit status.

    Args:
      argv: command-line arguments (default ``sys.argv[1:]``): ``--quick``, ``--out FILE``,
        ``--reps N``, ``--warmup N``, ``--parts op,model``.

    Returns:
      0 on success.

    Example:
      >>> main(["--help"])  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      SystemExit: 0
    """
    parser = argparse.ArgumentParser(
        prog="python -m bnjax.bench",
        description="Step-time benchmarks of bnjax batch norm against Flax's (op and model "
                    "level); prints markdown tables and writes JSON.")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, few runs: a smoke test whose figures mean nothing")
    parser.add_argument("--out", metavar="FILE", help="write every figure to this JSON file")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed runs per figure (default 20; 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed runs first (default 2; 1 with --quick)")
    parser.add_argument("--parts", default="op,model",
                        help="comma-separated parts to run: op, model (default both)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    reps = args.reps if args.reps is not None else (3 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if reps < 1 or warmup < 0:
        parser.error(f"--reps={reps} must be >= 1 and --warmup={warmup} >= 0")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - {"op", "model"})
    if unknown:
        parser.error(f"--parts names {unknown}; accepted: op, model")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    command = "python -m bnjax.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    result: dict[str, Any] = {"meta": {
        "command": command.strip(), "quick": args.quick, "reps": reps, "warmup": warmup,
        "environment": environment(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }}
    t0 = time.perf_counter()
    if "op" in parts:
        log("op level ...")
        shapes = op_bench.QUICK_SHAPES if args.quick else op_bench.SHAPES
        result.update(op_bench.run(shapes, op_bench.DTYPES, reps=reps, warmup=warmup, log=log))
    if "model" in parts:
        log("model level ...")
        result["model"] = model_bench.run(
            batch=4 if args.quick else 128, blocks_per_stage=0 if args.quick else 3,
            reps=reps, warmup=warmup, log=log)
    result["meta"]["load_average_end"] = [round(v, 2) for v in environment()["load_average"]]
    result["meta"]["seconds"] = round(time.perf_counter() - t0, 1)
    print(format_report(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, allow_nan=False)
        log(f"wrote {args.out}")
    return 0
