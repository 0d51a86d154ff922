"""Markdown tables of a results JSON, and the marked regions of the docs rendered from them.

``python -m benchmarks report FILE.json [...]`` prints every table of each file;
``--table NAME`` picks one. A page shows a table between markers naming the JSON (relative to
the repository root) and the table::

    <!-- rendered: benchmarks/results/cpu.json op -->
    ...
    <!-- end rendered -->

``python -m benchmarks report --update docs/ README.md`` rewrites every such region in place,
and ``tests/test_rendered_tables.py`` checks that each region is what :func:`render` gives, so
a figure on a page is always the one in the committed JSON. Each table ends with a line naming
the command, commit, machine, library versions and load it was measured with; a file written
before those fields were recorded says which ones it lacks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO, markdown_table
from bnjax.benchmark import model_table
from bnjax_train.studies.render import TABLES as STUDY_TABLES
from bnjax_train.studies.render import provenance as _provenance

__all__ = ["TABLES", "kind_of", "render", "render_all", "update"]

Data = Mapping[str, Any]
MARKER = re.compile(
    r"<!-- rendered: (?P<path>\S+) (?P<table>\S+) -->\n(?P<body>.*?)\n?<!-- end rendered -->",
    re.S)
_MODE_NAMES = {"train_fwd": "train fwd", "train_fwd_bwd": "train fwd+bwd",
               "infer_fwd": "inference fwd"}
_IMPLS = ("bnjax", "flax.linen", "flax.nnx", "floor")


def kind_of(data: Data) -> str:
    """Which benchmark wrote a results JSON: ``step``, ``fold``, ``sync``, ``parallel``, ...

    Files written before ``meta.benchmark`` existed are recognized by their fields.

    Example:
      >>> kind_of({"meta": {"benchmark": "fold"}}), kind_of({"auroc": {}})
      ('fold', 'inference_eval')
    """
    meta = data.get("meta") or {}
    if "benchmark" in meta:
        return meta["benchmark"]
    if data.get("benchmark") == "sync_bench":
        return "sync"
    if "speedup_median_ratio" in data:
        return "fold"
    if "auroc" in data:
        return "inference_eval"
    if "op" in data or isinstance(data.get("model"), list):
        return "step"
    raise ValueError(f"not a results JSON of python -m benchmarks (keys {sorted(data)})")


def _shape(s: Iterable[int]) -> str:
    return "x".join(str(int(v)) for v in s)


def _op(data: Data) -> str:
    rows = data["op"]
    out = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        by = {(tuple(r["shape"]), r["mode"], r["impl"]): r for r in rows if r["dtype"] == dtype}
        table = []
        for shape, mode in dict.fromkeys((k[0], k[1]) for k in by):
            t = {impl: by[(shape, mode, impl)] for impl in _IMPLS}
            table.append([
                _shape(shape), _MODE_NAMES[mode], *(t[i]["median_ms"] for i in _IMPLS),
                *(t[i]["gbps"] for i in ("bnjax", "flax.linen", "floor")),
                t["bnjax"]["ratio_to_flax"], t["flax.nnx"]["ratio_to_flax"],
                t["floor"]["ratio_to_flax"],
            ])
        out.append(f"Op level, {dtype} (median ms; GB/s over the minimal bytes):\n\n"
                   + markdown_table(
                       ["shape (NHWC)", "pass", "bnjax ms", "flax.linen ms", "flax.nnx ms",
                        "floor ms", "bnjax GB/s", "flax.linen GB/s", "floor GB/s",
                        "bnjax / flax.linen", "nnx / flax.linen", "floor / flax.linen"],
                       table))
    return "\n\n".join(out)


def _memory(data: Data) -> str:
    by = {(tuple(r["shape"]), r["dtype"], r["impl"]): r for r in data["memory"]}
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


def _model(data: Data) -> str:
    return model_table(data["model"])


def _headline(data: Data) -> str:
    """The README's few rows: bnjax against flax.linen, op level and model level.

    One layer's training forward+backward at the largest shape of the op table, and each
    model's train step.
    """
    largest = max((tuple(r["shape"]) for r in data["op"]), key=np.prod)  # one shape: a few rows
    op = {(tuple(r["shape"]), r["dtype"], r["impl"]): r for r in data["op"]
          if r["mode"] == "train_fwd_bwd" and tuple(r["shape"]) == largest}
    rows = [[f"one layer, {_shape(shape)}, {dtype}", "train fwd+bwd", r["median_ms"],
             op[(shape, dtype, "flax.linen")]["median_ms"], r["ratio_to_flax"], "-", "-"]
            for (shape, dtype, impl), r in op.items() if impl == "bnjax"]
    model = {(r["model"], r["step"], r["dtype"], r["variant"]): r for r in data["model"]
             if r["available"]}
    for (name, step, dtype, variant), r in model.items():
        flax = model.get((name, step, dtype, "flax BN"))
        if variant == "bnjax BN" and step == "train" and flax:
            rows.append([f"{name}, batch {r['batch']}, {dtype}", "train step", r["median_ms"],
                         flax["median_ms"], r["ratio_to_flax"],
                         r["peak_bytes"] / 2**20, flax["peak_bytes"] / 2**20])
    return ("bnjax against flax.linen.BatchNorm (median ms; the full tables are on the "
            "benchmarks page):\n\n" + markdown_table(
                ["what", "pass", "bnjax ms", "flax.linen ms", "bnjax / flax", "bnjax peak MiB",
                 "flax peak MiB"], rows))


def _run_time(r: Data) -> str:
    meta = r["meta"]
    start, end = (meta.get("environment") or {}).get("load_average"), meta.get("load_average_end")
    load = "/".join(map(str, start)) if start else "not recorded"
    return (f"The whole command (compiling every step, then the timed rounds) took "
            f"{meta['seconds']:.0f} s; load average {load} at the start and "
            f"{'/'.join(map(str, end)) if end else 'not recorded'} at the end (1/5/15 min) on "
            f"{(meta.get('environment') or {}).get('cores_usable', '?')} usable cores.")


def _fold(r: Data) -> str:
    rows = [[name, v["median_ms"], v["p25_ms"], v["p75_ms"], round(v["images_per_s"])]
            for name, v in r["results"].items()]
    env = r.get("environment") or {}
    where = env.get("backend") or (r.get("meta") or {}).get("environment", {}).get("device", "")
    eager = r.get("op_by_op_speedup_median_ratio")
    return (f"ResNet-20 eval, input {_shape(r['input_shape'])} {r['dtype']}, {where}, median of "
            f"{r['reps']} interleaved runs:\n\n"
            + markdown_table(["variant", "median ms", "p25 ms", "p75 ms", "images/s"], rows)
            + f"\n\nFolded {r['folded_pairs']} batch norms ({len(r['kept'])} kept); speedup "
            f"(unfolded / folded median) {r['speedup_median_ratio']:.2f}x, median of paired "
            f"ratios {r['speedup_paired_median']:.2f}x"
            + (f"; op by op (no jit) {eager:.2f}x" if eager else "")
            + "; max relative difference of the outputs "
            f"{r['max_rel_err_folded_vs_unfolded']:.1e}.")


def _sync(r: Data) -> str:
    rows = [[k, s["median_ms"], s["p25_ms"], s["p75_ms"], s["min_ms"]]
            for k, s in r["results"].items()]
    return (f"cnn1d train step, {r['devices']} CPU devices x {r['per_device_batch']} examples, "
            f"{r['steps']} steps each, interleaved:\n\n"
            + markdown_table(["variant", "median ms", "p25 ms", "p75 ms", "min ms"], rows)
            + f"\n\nRatio sync / local (medians): {r['ratio_sync_over_local']:.3f}.")


def _parallel(r: Data) -> str:
    rows = [[k, s["median_ms"], s["p25_ms"], s["p75_ms"], s["min_ms"],
             r["ratio_to_pmap_sync"][k]] for k, s in r["results"].items()]
    return (f"cnn1d train step, {r['devices']} CPU devices x {r['per_device_batch']} examples, "
            f"{r['steps']} steps each, interleaved:\n\n"
            + markdown_table(["variant", "median ms", "p25 ms", "p75 ms", "min ms",
                              "/ pmap, sync BN"], rows))


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def _run_name(r: Data) -> str:
    facts = [r["config"]] + [f"{r[k]} {what}" for k, what in
                             (("num_epochs", "epochs"), ("train_steps", "steps")) if k in r]
    return f"{r['model']} on {r['dataset']} ({', '.join(facts)})"


def _accuracy(r: Data) -> str:
    rows = [
        ["moving-average statistics (plain inference)", _pct(r["test_accuracy_moving"])],
        [f"PreciseBN, {r['num_train_batches']} batches of {r['batch_size']}",
         _pct(r["test_accuracy_precise"])],
        ["PreciseBN, unbiased m/(m-1)", _pct(r["test_accuracy_precise_unbiased"])],
        [f"MCBN mean of {r['mcbn_num_samples']} samples", _pct(r["test_accuracy_mcbn"])],
        [f"folded ({r['folded_pairs']} BN folded, {len(r['folded_kept'])} kept)",
         _pct(r["test_accuracy_folded"])],
    ]
    d = r["precise_vs_moving"]
    return (f"{_run_name(r)}:\n\n" + markdown_table(["statistics", "test accuracy"], rows)
            + "\n\nMoving vs precise statistics: variance differs by "
            f"{100 * d['var_rel_diff_median']:.2f}% (median over channels; max "
            f"{100 * d['var_rel_diff_max']:.1f}%), mean by {d['mean_diff_in_std_median']:.3f} "
            f"std (max {d['mean_diff_in_std_max']:.3f}).")


def _auroc(r: Data) -> str:
    rows = [[k.replace("_", " "), f"{v:.3f}"] for k, v in r["auroc"].items()]
    return (f"{_run_name(r)}:\n\n"
            + markdown_table(["uncertainty score", "AUROC (shuffled vs test)"], rows)
            + f"\n\nFolded vs unfolded logits: max relative difference "
            f"{r['folded_max_rel_logit_diff']:.1e}; plain accuracy on the shuffled inputs "
            f"{_pct(r['ood_accuracy_plain'])}.")


#: The tables of each kind of results JSON, by name, in print order.
def _train_summary(r: Data) -> str:
    rows = []
    for norm, label in (("batch", "batch norm"), ("none", "no norm")):
        v = r["variants"][norm]
        reach = v["steps_to_accuracy"]
        rows.append([label, f"{v['final_test_accuracy']:.4f}", f"{v['best_test_accuracy']:.4f}",
                     *(reach.get(t) if reach.get(t) is not None else "not reached"
                       for t in ("0.9", "0.95", "0.97")),
                     v["steps_to_train_loss"] if v["steps_to_train_loss"] is not None
                     else "not reached", v["steps"]])
    return markdown_table(["variant", "final test acc", "best test acc", "steps to 0.90",
                           "steps to 0.95", "steps to 0.97", "steps to train loss 0.01",
                           "steps"], rows) + (
        f"\n\n{r['model']} on {r['dataset']} ({r['config']}); both runs took "
        f"{r['wall_seconds_both_runs']:.0f} s.")


def _port_drift(r: Data) -> str:
    keys = ("flax_f32_vs_f64", "bnjax_f32_vs_f64", "bnjax_vs_flax_f32", "bnjax_vs_flax_f64")
    rows = []
    for step in r["steps"]:
        at = [row for row in r["rows"] if row["step"] == step]
        rows.append([step, *(f"{np.median([row[k] for row in at]):.1e}" for k in keys)])
    worst = max(row["bnjax_vs_flax_f64"] for row in r["rows"])
    return markdown_table(["step", "Flax float32 vs float64", "bnjax float32 vs float64",
                           "bnjax vs Flax, float32", "bnjax vs Flax, float64"], rows) + (
        f"\n\nLargest absolute difference over every parameter and moving statistic, median "
        f"over {len(r['seeds'])} seeds; {r['setup']}. bnjax vs Flax in float64, largest over "
        f"every seed and step: {worst:.1e}.")


def _gpu_checks(r: Data) -> str:
    rows = [[f["path"] + (f" -k '{f['keyword']}'" if f["keyword"] else ""), f["summary"],
             f["returncode"]] for f in r["tests"]["files"]]
    bw = r["copy_bandwidth"]
    return (f"Devices: {', '.join(r['device']['devices'])}; driver: "
            f"{r['device']['nvidia_smi'] or 'n/a'}. Copy bandwidth: {bw['gbps']:.1f} GB/s "
            f"({bw['mib']} MiB read and written).\n\n"
            + markdown_table(["tests", "pytest summary", "exit status"], rows))


TABLES: dict[str, dict[str, Callable[[Data], str]]] = {
    "step": {"headline": _headline, "op": _op, "memory": _memory, "model": _model},
    "fold": {"fold": _fold},
    "sync": {"sync": _sync},
    "parallel": {"parallel": _parallel},
    "inference_eval": {"accuracy": _accuracy, "auroc": _auroc},
    "train": {"summary": _train_summary},
    "port": {"drift": _port_drift},
    "gpu_check": {"checks": _gpu_checks, "op": _op, "memory": _memory, "model": _model},
    "compare": {"model": lambda d: model_table(d["model"], spread=True),  # bnjax-bench
                "run": _run_time},
}


def render(path: str | Path, table: str) -> str:
    """The markdown of table ``table`` of the results JSON at ``path``, with its provenance.

    Args:
      path: the JSON, absolute or relative to the repository root.
      table: a table name of its kind (see :data:`TABLES`), e.g. ``"op"``.

    Raises:
      ValueError: ``table`` is not a table of that file's kind.

    Example:
      >>> print(render("benchmarks/results/sync_bench.json", "sync").splitlines()[0])
      cnn1d train step, 8 CPU devices x 16 examples, 40 steps each, interleaved:
    """
    path = Path(path)
    with open(path if path.is_absolute() else REPO / path) as f:
        data = json.load(f)
    tables = TABLES[kind_of(data)]
    if table not in tables:
        raise ValueError(f"table={table!r} is not a table of {str(path)!r} "
                         f"({kind_of(data)} results); accepted: {sorted(tables)}")
    return tables[table](data) + "\n\n" + _provenance(data)


def render_all(data: Data) -> str:
    """Every table of a results dict, as ``python -m benchmarks report`` prints them.

    Example:
      >>> r = {"meta": {"benchmark": "sync", "command": "python -m benchmarks sync"},
      ...      "devices": 8, "per_device_batch": 2, "steps": 1, "ratio_sync_over_local": 1.0,
      ...      "results": {"sync": {"median_ms": 1.0, "p25_ms": 1.0, "p75_ms": 1.0,
      ...                           "min_ms": 1.0}}}
      >>> print(render_all(r).splitlines()[2])
      | variant | median ms | p25 ms | p75 ms | min ms |
    """
    kind = kind_of(data)
    shown = [fn(data) for name, fn in TABLES[kind].items() if kind != "step" or data.get(name)]
    return "\n\n".join(shown) + "\n\n" + _provenance(data)


def update(paths: Iterable[str | Path]) -> list[Path]:
    r"""Rewrites every marked region of the markdown files under ``paths``; returns the changed.

    Args:
      paths: markdown files, or folders whose ``*.md`` files (recursively) are updated.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     page = Path(d) / "page.md"
      ...     _ = page.write_text("<!-- rendered: benchmarks/results/sync_bench.json sync -->\n"
      ...                         "<!-- end rendered -->\n")
      ...     changed = update([d])
      ...     print(page.read_text().splitlines()[1])
      cnn1d train step, 8 CPU devices x 16 examples, 40 steps each, interleaved:
    """
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.rglob("*.md")) if p.is_dir() else [p]
    changed = []
    for file in files:
        text = file.read_text()
        new = MARKER.sub(lambda m: (f"<!-- rendered: {m['path']} {m['table']} -->\n"
                                    f"{render(m['path'], m['table'])}\n<!-- end rendered -->"),
                         text)
        if new != text:
            file.write_text(new)
            changed.append(file)
    return changed


# python -m bnjax_train.studies NAME (meta.benchmark "study"): claim, table and verdict of a
# study, rendered by bnjax_train.studies.render.
TABLES["study"] = STUDY_TABLES
