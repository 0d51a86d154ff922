"""Benchmarks and evaluations of bnjax: ``python -m benchmarks COMMAND`` (one home for all).

Commands (see :mod:`benchmarks.cli`): ``step`` (or ``op``, ``model``): bnjax's batch norm
against Flax's, op level and ResNet-20 step; ``fold``: eval with batch norms folded;
``sync``: synchronized vs per-device statistics; ``inference_eval``: PreciseBN, MC batch norm
and folding on a trained model; ``report``: the markdown tables of a results JSON, and the
marked regions of the docs rendered from the committed files in ``benchmarks/results/``.

Every run prints its tables and writes a JSON (``--out``, default under ``bench_results/``)
whose ``meta`` records the command, git commit, machine, library versions and load average.
Every time is a median over interleaved runs after warm-up; ``--quick`` runs tiny shapes and a
few repetitions: a smoke test of the harness whose figures mean nothing.

Example:
  >>> from benchmarks.common import median_times
  >>> times = median_times({"noop": lambda: None}, reps=3, warmup=1)
  >>> sorted(times["noop"])
  ['max_ms', 'median_ms', 'min_ms', 'n', 'p25_ms', 'p75_ms']
"""
