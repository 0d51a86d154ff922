"""Step-time benchmarks of bnjax's batch norm against Flax's: ``python -m bnjax.bench``.

One command prints markdown tables and writes every figure to JSON (``--out FILE``):

- op level (:mod:`bnjax.bench.op`): training forward, training forward+backward and inference
  forward of ``bnjax.BatchNorm``, ``flax.linen.BatchNorm`` and ``flax.nnx.BatchNorm`` on NHWC
  inputs, next to an elementwise pass that moves the same number of bytes (the memory floor of
  the device), with milliseconds, GB/s over the minimal bytes and the ratio to Flax; and the
  peak memory of the compiled forward+backward from XLA's memory analysis;
- model level (:mod:`bnjax.bench.model`): a jitted ResNet-20 train step (CIFAR shapes) with
  bnjax batch norm, Flax batch norm and no normalization, and inference with and without
  folding the batch norms into the convolutions (where ``bnjax.fold_batch_norm`` exists).

Every time is the median of at least 20 runs after warm-up (``--reps``), with the variants of a
row interleaved in one loop so that a change of machine load hits them alike. ``--quick`` runs
tiny shapes and a few repetitions: a smoke test of the harness whose figures mean nothing.

Example:
  >>> from bnjax.bench.common import median_times
  >>> times = median_times({"noop": lambda: None}, reps=3, warmup=1)
  >>> sorted(times["noop"])
  ['max_ms', 'median_ms', 'min_ms', 'n', 'p25_ms', 'p75_ms']
"""

from bnjax.bench.cli import main

__all__ = ["main"]
