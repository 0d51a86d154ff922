"""Many small training runs at once: one compiled step for every seed and learning rate.

Runs that differ only by seed (initialization, data order, dropout draws) or by the learning
rate share one model and one batch size, so :func:`train_runs` stacks their variables along a
leading axis and trains them all with ``jax.vmap`` inside one compiled epoch (a ``lax.scan``
over its steps). On two CPU cores this is several times faster than one run after another:
the per-step overhead is paid once, and the batched matrix products keep the cores busy.

The optimizer is split so that the learning rate can differ per run: the optax transformation
(``scale_by_adam``, a momentum trace or nothing) is applied to the gradients and the result is
scaled by ``-learning_rate * schedule(step)`` of each run.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnjax_train import input_pipeline

__all__ = ["OPTIMIZERS", "Data", "Recipe", "Runs", "accuracy", "l2_penalty", "load_data",
           "predict", "toy_data", "train_runs"]

#: Optimizers of :class:`Recipe`: the gradient transformation before the learning rate.
OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "adam": optax.scale_by_adam,
    "momentum": lambda: optax.trace(decay=0.9),
    "sgd": optax.identity,
}


@dataclasses.dataclass(frozen=True)
class Data:
    """A dataset in memory, normalized: training and test inputs and labels, NumPy float32.

    Attributes:
      x_train: training inputs ``(n, ...)``.
      y_train: training labels ``(n,)``.
      x_test: test inputs.
      y_test: test labels.
      num_classes: number of classes.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int


def load_data(name: str = "mnist1d", data_dir: str = "data", max_train: int = 0,
              max_test: int = 0) -> Data:
    """Loads a dataset of the program (MNIST-1D by default) as normalized arrays.

    Args:
      name: a dataset name of :func:`bnjax_train.input_pipeline.load_dataset`.
      data_dir: its ``data_dir``.
      max_train: keep only the first this many training examples (0: all).
      max_test: keep only the first this many test examples (0: all).

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     data = load_data(data_dir=d, max_train=200)
      >>> data.x_train.shape, data.x_test.shape, data.num_classes
      ((200, 40), (1000, 40), 10)
    """
    ds = input_pipeline.load_dataset(name, data_dir=data_dir)
    n_train = max_train or len(ds.train)
    n_test = max_test or len(ds.test)
    return Data(x_train=ds.normalize(ds.train.x[:n_train]), y_train=ds.train.y[:n_train],
                x_test=ds.normalize(ds.test.x[:n_test]), y_test=ds.test.y[:n_test],
                num_classes=ds.num_classes)


def toy_data(n_train: int = 32, n_test: int = 8, length: int = 40, num_classes: int = 10,
             seed: int = 0) -> Data:
    """Random inputs and labels shaped like MNIST-1D, for examples and tests.

    Example:
      >>> toy_data().x_train.shape, toy_data().num_classes
      ((32, 40), 10)
    """
    rng = np.random.default_rng(seed)
    return Data(rng.normal(size=(n_train, length)).astype(np.float32),
                rng.integers(0, num_classes, n_train).astype(np.int32),
                rng.normal(size=(n_test, length)).astype(np.float32),
                rng.integers(0, num_classes, n_test).astype(np.int32), num_classes)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How the runs train (everything but the model, the seeds and the learning rates).

    Attributes:
      optimizer: a key of :data:`OPTIMIZERS`.
      batch_size: examples per step.
      epochs: passes over the training set (the last partial batch of each is dropped).
      schedule: ``"cosine"`` (decay to zero over the whole run) or ``"constant"``.
      l2: L2 penalty ``l2 * sum(kernel ** 2)`` over every kernel, added to the loss (Keras's
        ``kernel_regularizer=l2(l2)``); 0: none.
    """

    optimizer: str = "adam"
    batch_size: int = 100
    epochs: int = 10
    schedule: str = "cosine"
    l2: float = 0.0

    def __post_init__(self) -> None:
        """Checks the fields."""
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r}; accepted: {sorted(OPTIMIZERS)}.")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule={self.schedule!r}; accepted: ['constant', 'cosine'].")
        for name in ("batch_size", "epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1.")
        if isinstance(self.l2, bool) or not isinstance(self.l2, int | float) or not (
                0.0 <= self.l2 < float("inf")):
            raise ValueError(f"l2={self.l2!r} must be a finite number >= 0.")


@dataclasses.dataclass
class Runs:
    """The result of :func:`train_runs` (``R`` runs, ``E`` epochs).

    Attributes:
      variables: the final variables, every leaf stacked along a leading axis of ``R``.
      test_accuracy: ``(R, E)`` test accuracy after each epoch (moving statistics).
      train_loss: ``(R, E)`` mean training loss of each epoch (NaN once a run diverged).
      nonfinite: ``(R,)`` a run had a non-finite training loss at some step.
      steps_per_epoch: optimizer steps per epoch.
      extra: ``{name: (R, E) array}`` what ``on_epoch`` returned after each epoch.
      compile_seconds: time spent compiling the training epoch.
      seconds: time of the whole call (compilation and evaluation included).
    """

    variables: Any
    test_accuracy: np.ndarray
    train_loss: np.ndarray
    nonfinite: np.ndarray
    steps_per_epoch: int
    extra: dict[str, np.ndarray]
    compile_seconds: float
    seconds: float


def l2_penalty(params: Any) -> jax.Array:
    """The sum of the squares of every ``kernel`` leaf of ``params`` (biases, scales excluded).

    Example:
      >>> l2_penalty({"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}).item()
      6.0
    """
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return sum((jnp.sum(jnp.square(a)) for path, a in leaves
                if getattr(path[-1], "key", None) == "kernel"), jnp.zeros(()))


@functools.lru_cache(maxsize=32)
def _epoch_fn(model: nn.Module, recipe: Recipe, total_steps: int) -> Callable[..., Any]:
    """The compiled epoch: ``lax.scan`` over the steps of ``vmap`` over the runs.

    One per model, recipe and run length (modules and recipes hash by their fields): runs of
    the same model and recipe in another call reuse its compiled program.
    """
    tx = OPTIMIZERS[recipe.optimizer]()

    def one_step(params, stats, opt_state, lr, key, x, y, step):
        def loss_fn(p):
            logits, updates = model.apply(
                {"params": p, "batch_stats": stats}, x, training=True,
                mutable=["batch_stats"], rngs={"dropout": jax.random.fold_in(key, step)})
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            if recipe.l2:
                loss = loss + recipe.l2 * l2_penalty(p)
            return loss, updates.get("batch_stats", stats)

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        scale = lr
        if recipe.schedule == "cosine":
            scale = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * step / total_steps))
        params = jax.tree.map(lambda p, u: p - scale * u, params, updates)
        return params, new_stats, opt_state, loss

    @jax.jit
    def epoch(params, stats, opt_state, lr, keys, x_train, y_train, idx, step0):
        def body(carry, inputs):
            params, stats, opt_state = carry
            k, batch_idx = inputs
            x, y = x_train[batch_idx], y_train[batch_idx]
            params, stats, opt_state, loss = jax.vmap(
                one_step, in_axes=(0, 0, 0, 0, 0, 0, 0, None))(
                    params, stats, opt_state, lr, keys, x, y, step0 + k)
            return (params, stats, opt_state), loss

        steps = jnp.arange(idx.shape[0])
        (params, stats, opt_state), losses = jax.lax.scan(
            body, (params, stats, opt_state), (steps, idx))
        return params, stats, opt_state, losses

    return epoch


def predict(model: nn.Module, variables: Any, x: np.ndarray, chunk: int = 1000) -> np.ndarray:
    """Logits ``(R, n, classes)`` of every run of stacked ``variables`` in inference mode.

    Example:
      >>> import flax.linen as nn
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, training):
      ...         return nn.Dense(3)(x)
      >>> four = {"params": {"Dense_0": {"kernel": np.ones((4, 2, 3)), "bias": np.zeros((4, 3))}}}
      >>> predict(Net(), four, np.ones((5, 2))).shape  # 4 runs, 5 examples, 3 logits
      (4, 5, 3)
    """
    fn = _predict_fn(model)
    parts = [np.asarray(fn(variables, jnp.asarray(x[i:i + chunk])))
             for i in range(0, len(x), chunk)]
    return np.concatenate(parts, axis=1)


@functools.lru_cache(maxsize=32)
def _predict_fn(model: nn.Module) -> Callable[[Any, Any], Any]:
    # One compiled function per model (modules hash by their fields), reused every epoch.
    return jax.jit(jax.vmap(lambda v, x: model.apply(v, x, training=False), in_axes=(0, None)))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Accuracy of each run: ``(R, n, classes)`` logits against ``(n,)`` labels -> ``(R,)``.

    Example:
      >>> accuracy(np.array([[[1.0, 0.0], [1.0, 0.0]]]), np.array([0, 1])).tolist()
      [0.5]
    """
    return np.mean(np.argmax(logits, axis=-1) == labels[None], axis=-1)


def _shuffles(seeds: Sequence[int], epoch: int, n: int, batch: int) -> np.ndarray:
    """``(steps, R, batch)`` example indices of one epoch: a permutation per run's seed."""
    steps = n // batch
    perms = [np.random.default_rng([int(s), epoch]).permutation(n)[:steps * batch]
             for s in seeds]
    return np.stack(perms).reshape(len(seeds), steps, batch).transpose(1, 0, 2)


def train_runs(
    model: nn.Module,
    data: Data,
    recipe: Recipe,
    seeds: Sequence[int],
    learning_rates: Sequence[float],
    on_epoch: Callable[[int, Any], dict[str, np.ndarray]] | None = None,
) -> Runs:
    """Trains one run per ``(seeds[r], learning_rates[r])``, all in one compiled step.

    Args:
      model: a flax module called as ``model(x, training)`` (dropout draws from ``"dropout"``).
      data: the dataset.
      recipe: optimizer, batch size, epochs and schedule (shared by all runs).
      seeds: a seed per run: its initialization, data order and dropout draws.
      learning_rates: a peak learning rate per run (same length as ``seeds``).
      on_epoch: called after each epoch with ``(epoch, stacked variables)``; the arrays
        ``(R,)`` it returns, by name, are collected into :attr:`Runs.extra`.

    Returns:
      :class:`Runs`.

    Example:
      >>> from bnjax_train.models import create_model
      >>> model = create_model("mlp", num_classes=10, hidden=(4,))
      >>> recipe = Recipe(optimizer="momentum", batch_size=16, epochs=2)
      >>> runs = train_runs(model, toy_data(), recipe, [0, 1], [0.05, 0.5])
      >>> runs.test_accuracy.shape, runs.nonfinite.tolist()
      ((2, 2), [False, False])
    """
    if len(seeds) != len(learning_rates) or not seeds:
        raise ValueError(f"seeds ({len(seeds)}) and learning_rates ({len(learning_rates)}) "
                         "must be non-empty and of the same length.")
    n, batch = len(data.x_train), recipe.batch_size
    if batch > n:
        raise ValueError(f"batch_size={batch} is larger than the {n} training examples.")
    t0 = time.perf_counter()
    steps = n // batch
    keys = jnp.stack([jax.random.key(int(s)) for s in seeds])
    variables = jax.vmap(lambda k: model.init(k, jnp.asarray(data.x_train[:batch]),
                                              training=False))(keys)
    tx = OPTIMIZERS[recipe.optimizer]()
    carry = (variables["params"], variables.get("batch_stats", {}),
             jax.vmap(tx.init)(variables["params"]))
    fixed = (jnp.asarray(learning_rates, jnp.float32),
             jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys),  # dropout draws
             jnp.asarray(data.x_train), jnp.asarray(data.y_train))
    t1 = time.perf_counter()
    epoch_fn = _epoch_fn(model, recipe, recipe.epochs * steps).lower(
        *carry, *fixed, jnp.asarray(_shuffles(seeds, 0, n, batch)), 0).compile()
    compile_seconds = time.perf_counter() - t1
    acc, losses, extra = [], [], {}
    nonfinite = np.zeros(len(seeds), bool)
    for e in range(recipe.epochs):
        idx = jnp.asarray(_shuffles(seeds, e, n, batch))
        *carry, loss = epoch_fn(*carry, *fixed, idx, e * steps)
        loss = np.asarray(loss)  # (steps, R)
        nonfinite |= ~np.isfinite(loss).all(axis=0)
        losses.append(loss.mean(axis=0))
        current = {"params": carry[0], "batch_stats": carry[1]} if carry[1] else {
            "params": carry[0]}
        acc.append(accuracy(predict(model, current, data.x_test), data.y_test))
        for name, value in (on_epoch(e, current) if on_epoch else {}).items():
            extra.setdefault(name, []).append(np.asarray(value))
    return Runs(variables=current, test_accuracy=np.stack(acc, axis=1),
                train_loss=np.stack(losses, axis=1), nonfinite=nonfinite,
                steps_per_epoch=steps, compile_seconds=compile_seconds,
                seconds=time.perf_counter() - t0,
                extra={k: np.stack(v, axis=1) for k, v in extra.items()})
