"""The markdown of a study's results JSON: claim, table, verdict, settings, time, provenance.

:func:`render_study` is registered with ``python -m benchmarks report`` (table ``table`` of a
study JSON), so a docs region ``<!-- rendered: docs/studies/NAME.json table -->`` is filled and
checked like the benchmark tables; the command's own ``NAME.md`` is that same rendering
(:func:`render_with_provenance`: the table and the :func:`provenance` line under it, which
the benchmarks' tables share). A quick run's rendering has no verdict: it decides nothing.
Nothing here imports JAX.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from bnjax.benchmark import markdown_table
from bnjax_train.studies import report_inference as inf
from bnjax_train.studies import report_landscape as land
from bnjax_train.studies import report_training as tr

__all__ = ["CLAIMS", "NO_VERDICT", "STUDIES", "TABLES", "provenance", "render_study",
           "render_with_provenance", "verdict"]

Data = Mapping[str, Any]

#: The claim each study tests, as articles about batch norm make it.
CLAIMS: dict[str, str] = {
    "learning_rate": "BN speeds up training and allows higher learning rates.",
    "placement": "BN goes between the convolution and the activation, \"or sometimes after\" "
                 "it: which is better?",
    "dropout": "With BN, dropout becomes unnecessary: \"removing dropout while using BN gives "
               "much faster learning without a loss in generalization\".",
    "batch_size": "BN fails at small batches, where layer or group norm (or renorm, ghost "
                  "batches) should win.",
    "momentum": "The momentum of the moving statistics matters early in training (and "
                "PreciseBN fixes it).",
    "mcbn": "Monte Carlo batch norm gives useful uncertainty, but \"for larger batch sizes "
            "MCBN fails to capture epistemic uncertainty\".",
    "covariate_shift": "BN works by reducing internal covariate shift.",
    "smoothness": "BN makes the optimization landscape smoother.",
    "regularization": "BN regularizes; with no other regularizer it speeds training but adds "
                      "little accuracy.",
}

#: What a quick run says in place of a verdict.
NO_VERDICT = ("No verdict: a quick run trains tiny networks for a step or two; its numbers "
              "test the program and decide nothing.")

#: The studies, in order.
STUDIES: tuple[str, ...] = tuple(CLAIMS)

_RENDERERS: dict[str, tuple[Callable[[Data], Any], Callable[[Data], str]]] = {
    "learning_rate": (tr.learning_rate_table, tr.learning_rate_verdict),
    "placement": (tr.placement_table, tr.placement_verdict),
    "dropout": (tr.dropout_table, tr.dropout_verdict),
    "batch_size": (tr.batch_size_table, tr.batch_size_verdict),
    "momentum": (inf.momentum_table, inf.momentum_verdict),
    "mcbn": (inf.mcbn_table, inf.mcbn_verdict),
    "covariate_shift": (land.covariate_shift_table, land.covariate_shift_verdict),
    "smoothness": (land.smoothness_table, land.smoothness_verdict),
    "regularization": (land.regularization_table, land.regularization_verdict),
}


def _study(data: Data) -> str:
    name = (data.get("meta") or {}).get("study")
    if name not in _RENDERERS:
        raise ValueError(f"meta.study={name!r} is not a study; accepted: {list(STUDIES)}.")
    return name


def verdict(data: Data) -> str:
    """The one-line verdict on the study's claim, computed from the results JSON.

    Raises:
      ValueError: ``data["meta"]["study"]`` is not one of :data:`STUDIES`.

    Example:
      >>> verdict({"meta": {"study": "nope"}})
      Traceback (most recent call last):
      ...
      ValueError: meta.study='nope' is not a study; accepted: ['learning_rate', 'placement', \
'dropout', 'batch_size', 'momentum', 'mcbn', 'covariate_shift', 'smoothness', 'regularization'].
    """
    return _RENDERERS[_study(data)][1](data)


_OPTIMIZER_NAMES = {"adam": "Adam", "momentum": "SGD with momentum 0.9", "sgd": "SGD"}


def _settings_line(data: Data) -> str:
    s, meta = data["meta"]["settings"], data["meta"]
    seeds = meta["seeds"]
    lr = s.get("learning_rate")
    net = " in 2D, on images" if s["dataset"] == "digits" else ""
    facts = [f"StudyCNN1D{net} (features {list(s['features'])}, dense {s['hidden']})",
             _OPTIMIZER_NAMES.get(s["optimizer"], s["optimizer"]),
             *([f"learning rate {lr:g}"] if lr is not None and "reference_batch" not in s else []),
             *([f"learning rate {lr:g} x sqrt(batch / {s['reference_batch']})"]
               if "reference_batch" in s else []),
             *([f"batch {s['batch_size']}"] if "batch_size" in s else []),
             f"{s['epochs']} epochs ({s.get('schedule', 'cosine')} schedule)",
             f"{len(seeds)} seeds per cell ({', '.join(map(str, seeds))})"]
    extra = ", ".join(f"{k} {v}" for k, v in s.items() if k in (
        "targets", "min_steps", "precise_batches", "num_samples", "ghost_batch", "max_train",
        "probe_batches", "shift_step", "step_sizes", "little"))
    return ("Settings: " + ", ".join(facts) + (f"; {extra}" if extra else "")
            + f"; dataset {s['dataset']}.")


def _time_line(data: Data) -> str:
    meta, res = data["meta"], data["results"]
    n = len(res["runs"])
    end = meta.get("load_average_end")
    return (f"Time: {meta['seconds']:.0f} s for the study ({n} training runs in "
            f"{res['compiled_steps']} compiled training step"
            f"{'s' if res['compiled_steps'] != 1 else ''}: {res['train_seconds']:.0f} s, of "
            f"which {res['compile_seconds']:.0f} s compiling)"
            + (f"; load average at the end {'/'.join(map(str, end))}." if end else "."))


def render_study(data: Data) -> str:
    """Claim, table (``mean ± std`` over seeds), verdict, settings and time of a study JSON.

    A quick run (``meta.quick``) gets :data:`NO_VERDICT` in place of the verdict.

    Example:
      >>> from bnjax_train.studies.summary import committed
      >>> data = committed("placement")
      >>> print(render_study(data).splitlines()[0])
      Claim: BN goes between the convolution and the activation, "or sometimes after" it: \
which is better?
      >>> data["meta"]["quick"] = True
      >>> [line for line in render_study(data).splitlines() if "erdict" in line] == [NO_VERDICT]
      True
    """
    name = _study(data)
    table, judge = _RENDERERS[name]
    header, rows = table(data)
    said = NO_VERDICT if data["meta"].get("quick") else f"Verdict: {judge(data)}"
    return "\n\n".join([f"Claim: {CLAIMS[name]}", markdown_table(header, rows), said,
                        _settings_line(data), _time_line(data)])


#: Tables of a study JSON for ``python -m benchmarks report`` (``meta.benchmark == "study"``).
TABLES: dict[str, Callable[[Data], str]] = {"table": render_study}

_VERSIONS = ("jax", "jaxlib", "flax", "optax", "numpy", "bnjax")


def _facts(data: Data) -> dict[str, Any]:
    """The provenance fields of a results JSON, wherever its format kept them (None: absent)."""
    meta = data.get("meta") or {}
    env = {**(data.get("machine") or {}), **(data.get("environment") or {}),
           **(meta.get("environment") or {})}
    return {
        "command": meta.get("command") or data.get("command"),
        "git commit": meta.get("git_commit"),
        "CPU model": env.get("cpu"),
        "core count": env.get("cores") or env.get("cpu_count"),
        "library versions": {k: env[k] for k in _VERSIONS if env.get(k)} or None,
        "load average at start": env.get("load_average"),
    }


def provenance(data: Data) -> str:
    """The line under a table: how it was measured, and what the file does not record.

    Example:
      >>> print(provenance({"meta": {"command": "python -m bnjax_train.studies mcbn",
      ...                            "git_commit": "0123456789abcdef", "quick": True}}))
      Measured with `python -m bnjax_train.studies mcbn`; commit 0123456789ab; QUICK RUN: tiny \
shapes and few runs, the figures mean nothing.
      <BLANKLINE>
      Note: this file predates the full run metadata; not recorded: CPU model, core count, \
library versions, load average at start.
    """
    f, meta = _facts(data), data.get("meta") or {}
    parts = []
    if f["command"]:
        parts.append(f"`{f['command']}`")
    if f["git commit"]:
        parts.append(f"commit {f['git commit'][:12]}"
                     + (" with local changes" if meta.get("git_dirty") else ""))
    machine = ", ".join(str(v) for v in (f["CPU model"], f["core count"] and
                                         f"{f['core count']} cores") if v)
    if machine:
        parts.append(machine)
    if f["library versions"]:
        parts.append(", ".join(f"{k} {v}" for k, v in f["library versions"].items()))
    if f["load average at start"]:
        parts.append("load average at start "
                     + "/".join(str(v) for v in f["load average at start"]) + " (1/5/15 min)")
    malloc = (meta.get("environment") or {}).get("malloc_env")
    if malloc:
        parts.append(" ".join(f"{k}={v}" for k, v in malloc.items()))
    if meta.get("reps"):
        parts.append(f"median of {meta['reps']} interleaved runs after {meta.get('warmup')} "
                     "warm-up runs")
    if meta.get("quick") or data.get("quick"):
        parts.append("QUICK RUN: tiny shapes and few runs, the figures mean nothing")
    line = "Measured with " + "; ".join(parts) + "."
    missing = [k for k, v in f.items() if not v]
    if missing:
        line += ("\n\nNote: this file predates the full run metadata; not recorded: "
                 + ", ".join(missing) + ".")
    return line


def render_with_provenance(data: Data) -> str:
    """:func:`render_study` and the :func:`provenance` line: a docs region's whole body.

    Example:
      >>> from bnjax_train.studies.summary import committed
      >>> render_with_provenance(committed("mcbn")).splitlines()[-1].startswith("Measured with")
      True
    """
    return render_study(data) + "\n\n" + provenance(data)
