"""What the compilers get: no full-size temporaries on the CPU, one-pass statistics elsewhere.

The training forward and backward each need two per-feature sums over ``x`` (and ``dy``).
bnjax picks the forward's form when lowering for a platform (``bnjax.stats.sums_of``): on the
CPU two reductions kept apart by copies (so XLA:CPU writes no full-size intermediate), on GPU
and TPU one variadic reduction that reads its inputs once. The backward is JAX's transpose of
the training forward's tangent map, whose copies (``bnjax.stats.apart``, ``barrier``) keep
XLA:CPU from writing any full-size intermediate there too. The CPU check reads the compiled HLO; the
GPU/TPU check reads the StableHLO that ``jax.export`` lowers for those platforms without a
device.
"""

import re

import jax
import jax.numpy as jnp
import pytest

import bnjax

SHAPE = (16, 8, 8, 32)


def _fwd_bwd(dtype):
    stats = {"mean": jnp.zeros(32), "var": jnp.ones(32)}

    def f(x, params, dy):
        def bn(x, params):
            return bnjax.batch_norm(x, stats, params, training=True)

        (y, new), vjp = jax.vjp(bn, x, params)
        return y, new, vjp((dy, jax.tree.map(jnp.zeros_like, new)))

    args = (jnp.ones(SHAPE, dtype), {"scale": jnp.ones(32), "bias": jnp.zeros(32)},
            jnp.ones(SHAPE, dtype))
    return jax.jit(f), args


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_forward_backward_writes_only_its_outputs(dtype):
    """Unmasked: with a mask, XLA:CPU writes the selected values before reducing them."""
    fn, args = _fwd_bwd(dtype)
    hlo = fn.lower(*args).compile().as_text()
    entry = hlo[hlo.index("\nENTRY"):]
    full = re.compile(r"^\s*%\S+ = \w+\[" + ",".join(map(str, SHAPE)) + r"\]")
    buffers = [line.strip()[:120] for line in entry.splitlines()
               if full.match(line) and " parameter(" not in line and "bitcast(" not in line]
    # y and dx, nothing else of x's size: every intermediate stays inside a fusion.
    assert len(buffers) == 2, "\n".join(buffers)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_accelerator_lowering_reads_x_once_for_the_forward_sums(platform):
    fn, args = _fwd_bwd(jnp.float32)
    text = jax.export.export(fn, platforms=[platform])(*args).mlir_module()
    assert "optimization_barrier" not in text
    full = "x".join(map(str, SHAPE))
    # The forward's (x - c, (x - c)^2): one reduce with two results over the full-size input.
    variadic = re.findall(r"stablehlo\.reduce\(%\S+ init: %\S+\), \(%\S+ init: %\S+\).*?"
                          rf"\(tensor<{full}xf32>, tensor<{full}xf32>", text)
    assert len(variadic) == 1, len(variadic)
    # The backward (JAX's transpose of the tangent map) reduces dy and dy * (x - mean): two
    # sums of one operand each, siblings over dy that the compiler is free to fuse.
    single = re.findall(r"stablehlo\.reduce\(%\S+ init: %\S+\) applies stablehlo\.add "
                        rf"across dimensions = \[0, 1, 2\] : \(tensor<{full}xf32>", text)
    assert len(single) == 2, len(single)


def test_cpu_lowering_keeps_the_sums_apart():
    fn, args = _fwd_bwd(jnp.float32)
    text = jax.export.export(fn, platforms=["cpu"])(*args).mlir_module()
    assert text.count("optimization_barrier") >= 2
