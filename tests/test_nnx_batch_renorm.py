"""bnjax.nnx_batch_renorm.BatchRenorm, CrossQ's layer for NNX, against the linen layer.

The linen layer is held to the published SBX layer in tests/test_batch_renorm.py; here the
NNX twin is held to it, and its parameter draws to flax.nnx.BatchNorm's.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from test_batch_renorm import _xs, close

import bnjax
from bnjax.nnx_batch_renorm import BatchRenorm as NNXBatchRenorm


def test_nnx_layer_equals_the_linen_layer_and_draws_like_flax_nnx():
    init = nnx.initializers.normal()
    ours = NNXBatchRenorm(5, warmup_steps=2, scale_init=init, bias_init=init, rngs=nnx.Rngs(3))
    flax_bn = nnx.BatchNorm(5, scale_init=init, bias_init=init, rngs=nnx.Rngs(3))
    close((ours.scale.value, ours.bias.value), (flax_bn.scale.value, flax_bn.bias.value), 0, 0)
    linen = bnjax.BatchRenorm(use_running_average=False, warmup_steps=2)
    v = {"params": {"scale": ours.scale.value, "bias": ours.bias.value},
         "batch_stats": bnjax.init_crossq_stats(5)}

    @nnx.jit
    def step(layer, x):
        return nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(layer), layer(x)

    def linen_loss(params, v, x):
        y, upd = linen.apply({**v, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y)), (y, upd)

    for x in _xs(4):
        before = nnx.clone(ours)
        grads, _ = step(before, x)
        y = ours(x)
        want_g, (want_y, upd) = jax.grad(linen_loss, has_aux=True)(v["params"], v, x)
        close(y, want_y)
        close((grads.scale.value, grads.bias.value), (want_g["scale"], want_g["bias"]))
        v = {**v, **upd}
        close({k: getattr(ours, k).value for k in upd["batch_stats"]}, upd["batch_stats"])
    ours.eval()
    close(ours(x), bnjax.BatchRenorm(use_running_average=True).apply(v, x))
    assert int(ours.steps.value) == 4
