"""Independent references for the synchronized-statistics and train-step tests.

Everything here is float64 and uses neither bnjax's batch-norm arithmetic nor its train step:
batch norm is written in NumPy (forward and backward), and the reference train step uses
flax.linen.BatchNorm with a hand-written masked cross-entropy and plain SGD.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

MOMENTUM = 0.99
EPSILON = 1e-3


def np_bn(x, mask, scale, bias, moving_mean, moving_var, dy, eps=EPSILON, momentum=MOMENTUM):
    """Float64 training-mode BN over the rows of ``x`` (N, C) where ``mask`` (N,) is True.

    Returns y, new moving mean, new moving var, dx, dscale, dbias for the loss sum(y * dy).
    Masked-out rows take no part in the statistics but are normalized with them; their
    outputs carry no gradient (bnjax's contract: padding), so their ``dy`` is dropped.
    """
    x = np.asarray(x, np.float64)
    m = np.ones(len(x), bool) if mask is None else np.asarray(mask, bool)
    dy = np.asarray(dy, np.float64) * m[:, None]
    xv = x[m]
    n = len(xv)
    mean = xv.mean(0)
    var = ((xv - mean) ** 2).mean(0)
    r = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean) * r
    y = scale * xhat + bias
    new_mean = momentum * moving_mean + (1 - momentum) * mean
    new_var = momentum * moving_var + (1 - momentum) * var
    # Backward: valid rows feel the statistics; masked rows only their direct path.
    dxhat = dy * scale
    dvar = np.sum(dxhat * (x - mean) * -0.5 * r**3, axis=0)
    dmean = np.sum(-dxhat * r, axis=0)
    dx = dxhat * r + m[:, None] * (dvar * 2 * (x - mean) / n + dmean / n)
    dscale = np.sum(dy * xhat, axis=0)
    dbias = np.sum(dy, axis=0)
    return y, new_mean, new_var, dx, dscale, dbias


class RefMLP(nn.Module):
    """Dense -> flax.linen.BatchNorm -> relu, ``layers`` times, then Dense (float64)."""

    layers: int = 2
    width: int = 6
    classes: int = 3

    @nn.compact
    def __call__(self, x, training):
        for _ in range(self.layers):
            x = nn.Dense(self.width, param_dtype=jnp.float64, dtype=jnp.float64)(x)
            x = nn.BatchNorm(use_running_average=not training, momentum=MOMENTUM,
                             epsilon=EPSILON, param_dtype=jnp.float64,
                             dtype=jnp.float64)(x)
            x = nn.relu(x)
        return nn.Dense(self.classes, param_dtype=jnp.float64, dtype=jnp.float64)(x)


def to64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def ref_train_step(variables, batch, *, layers, lr, penalty=0.0, clip=None):
    """One SGD step of RefMLP on the valid examples, float64, returns (variables, loss, acc).

    loss = mean over the valid examples (``batch["mask"]``; the others are dropped) of
    -log softmax(logits)[y] + penalty * sum(kernel**2)
    over the first Dense kernel (the penalty a bnjax test model sows into "losses").
    """
    with jax.enable_x64():
        model = RefMLP(layers=layers)
        # A masked-out example takes no part in anything: the reference is the step on the
        # valid examples alone (batch norm included).
        mask = batch.get("mask")
        valid = np.ones(len(batch["y"]), bool) if mask is None else np.asarray(mask, bool)
        x = jnp.asarray(np.asarray(batch["x"])[valid], jnp.float64)
        y = jnp.asarray(np.asarray(batch["y"])[valid])
        params, stats = to64(variables["params"]), to64(variables["batch_stats"])

        def loss_fn(p):
            logits, upd = model.apply({"params": p, "batch_stats": stats}, x, training=True,
                                      mutable=["batch_stats"])
            logp = jax.nn.log_softmax(logits)
            nll = -jnp.take_along_axis(logp, y[:, None], 1)[:, 0]
            ce = jnp.sum(nll) / max(len(y), 1)
            reg = penalty * jnp.sum(p["Dense_0"]["kernel"] ** 2)
            acc = jnp.sum(jnp.argmax(logits, -1) == y) / max(len(y), 1)
            return ce + reg, (upd["batch_stats"], acc)

        (loss, (new_stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        new_params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
        if clip is not None:
            new_params = jax.tree.map(lambda p: jnp.clip(p, -clip, clip), new_params)
        return (to64({"params": new_params, "batch_stats": new_stats}), float(loss), float(acc))


class SyncMLP(nn.Module):
    """The bnjax model under test: the same layers and variable names as RefMLP (float32).

    With ``penalty`` > 0 it sows ``penalty * sum(kernel**2)`` of its first Dense kernel into
    the "losses" collection.
    """

    layers: int = 2
    width: int = 6
    classes: int = 3
    axis_name: str | None = "batch"
    axis_index_groups: object = None
    penalty: float = 0.0

    @nn.compact
    def __call__(self, x, training):
        import bnjax

        for i in range(self.layers):
            dense = nn.Dense(self.width)
            x = dense(x)
            if i == 0 and self.penalty:
                self.sow("losses", "l2", self.penalty * jnp.sum(dense.variables["params"]
                                                                ["kernel"] ** 2))
            x = bnjax.BatchNorm(axis_name=self.axis_name,
                                axis_index_groups=self.axis_index_groups)(x, training=training)
            x = nn.relu(x)
        return nn.Dense(self.classes)(x)


def make_data(n, features=4, classes=3, seed=0):
    rng = np.random.RandomState(seed)
    x = (rng.randn(n, features) * 2 + 1).astype(np.float32)
    y = rng.randint(0, classes, n).astype(np.int32)
    return x, y


def init_variables(layers=2, features=4, seed=0):
    model = SyncMLP(layers=layers, axis_name=None)
    v = model.init(jax.random.key(seed), jnp.ones((2, features)), training=False)
    # Non-trivial moving statistics and BN parameters.
    rng = np.random.RandomState(seed + 1)
    v = jax.tree.map(lambda a: np.asarray(a) + 0.1 * rng.randn(*a.shape).astype(np.float32), v)
    v["batch_stats"] = jax.tree.map(np.abs, v["batch_stats"])
    return v
