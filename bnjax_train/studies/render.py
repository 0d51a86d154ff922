"""The markdown of a study's results JSON: claim, table, verdict, settings and time.

:func:`render_study` is registered with ``python -m benchmarks report`` (table ``table`` of a
study JSON), so a docs region ``<!-- rendered: docs/studies/NAME.json table -->`` is filled and
checked like the benchmark tables; the command's own ``NAME.md`` is that same rendering.
Nothing here imports JAX.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from benchmarks.common import markdown_table
from bnjax_train.studies import report_inference as inf
from bnjax_train.studies import report_training as tr

__all__ = ["CLAIMS", "STUDIES", "TABLES", "render_study", "verdict"]

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
}

#: The studies, in order.
STUDIES: tuple[str, ...] = tuple(CLAIMS)

_RENDERERS: dict[str, tuple[Callable[[Data], Any], Callable[[Data], str]]] = {
    "learning_rate": (tr.learning_rate_table, tr.learning_rate_verdict),
    "placement": (tr.placement_table, tr.placement_verdict),
    "dropout": (tr.dropout_table, tr.dropout_verdict),
    "batch_size": (tr.batch_size_table, tr.batch_size_verdict),
    "momentum": (inf.momentum_table, inf.momentum_verdict),
    "mcbn": (inf.mcbn_table, inf.mcbn_verdict),
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
'dropout', 'batch_size', 'momentum', 'mcbn'].
    """
    return _RENDERERS[_study(data)][1](data)


_OPTIMIZER_NAMES = {"adam": "Adam", "momentum": "SGD with momentum 0.9", "sgd": "SGD"}


def _settings_line(data: Data) -> str:
    s, meta = data["meta"]["settings"], data["meta"]
    seeds = meta["seeds"]
    lr = s.get("learning_rate")
    facts = [f"StudyCNN1D (features {list(s['features'])}, dense {s['hidden']})",
             _OPTIMIZER_NAMES.get(s["optimizer"], s["optimizer"]),
             *([f"learning rate {lr:g}"] if lr is not None and "reference_batch" not in s else []),
             *([f"learning rate {lr:g} x sqrt(batch / {s['reference_batch']})"]
               if "reference_batch" in s else []),
             *([f"batch {s['batch_size']}"] if "batch_size" in s else []),
             f"{s['epochs']} epochs ({s.get('schedule', 'cosine')} schedule)",
             f"{len(seeds)} seeds per cell ({', '.join(map(str, seeds))})"]
    extra = ", ".join(f"{k} {v}" for k, v in s.items() if k in (
        "targets", "min_steps", "precise_batches", "num_samples", "ghost_batch", "max_train"))
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

    Example:
      >>> import json
      >>> from benchmarks.common import REPO
      >>> data = json.loads((REPO / "docs/studies/placement.json").read_text())
      >>> print(render_study(data).splitlines()[0])
      Claim: BN goes between the convolution and the activation, "or sometimes after" it: \
which is better?
    """
    name = _study(data)
    table, judge = _RENDERERS[name]
    header, rows = table(data)
    return "\n\n".join([f"Claim: {CLAIMS[name]}", markdown_table(header, rows),
                        f"Verdict: {judge(data)}", _settings_line(data), _time_line(data)])


#: Tables of a study JSON for ``python -m benchmarks report`` (``meta.benchmark == "study"``).
TABLES: dict[str, Callable[[Data], str]] = {"table": render_study}
