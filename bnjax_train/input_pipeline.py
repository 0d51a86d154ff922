"""Datasets for the training program, in memory, and their train and eval batches.

Names (the ``dataset`` config field): ``"mnist1d"`` (MNIST-1D, generated locally, no network),
``"digits"`` (scikit-learn's 8x8 digits, shipped with it) and
``"tfds:NAME"`` (a tensorflow-datasets image classification set, ``mnist``, ``kmnist``,
``fashion_mnist``, ``cifar10``, ..., prepared on disk beforehand); :mod:`bnjax_train.sources`
reads them. The training program never downloads: a set that is not on disk fails at once with
a message naming the set, the folders searched and the command that prepares it, on a machine
with network::

    python -m bnjax_train.input_pipeline prepare tfds:NAME --data_dir DIR
    python -m bnjax_train.input_pipeline info tfds:NAME --data_dir DIR   # what is on disk

Arrays stay in memory in their stored dtype (``uint8`` images); batches are normalized per
channel on the fly with the mean and standard deviation of the training images. With several
processes (hosts) each process keeps only its own shard of every split (examples
``process_index::process_count``) and reads only those records; the global batch is the
concatenation of the processes' local batches.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Iterator, Sequence

import numpy as np

from bnjax_train.sources import (
    TFDS_PREFIX,
    DatasetNotFoundError,
    PrepareError,
    find_prepared,
    open_source,
    prepare,
    validate_dataset_name,
)

__all__ = [
    "AUGMENTATIONS",
    "TFDS_PREFIX",
    "Dataset",
    "DatasetNotFoundError",
    "PrepareError",
    "Split",
    "eval_batches",
    "find_prepared",
    "load_dataset",
    "num_eval_batches",
    "prepare",
    "steps_per_epoch",
    "train_batches",
    "validate_dataset_name",
]

#: Augmentations accepted by :func:`train_batches` (the ``augment`` config field).
AUGMENTATIONS: tuple[str, ...] = ("none", "crop_flip")


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of this process: inputs and integer labels.

    Attributes:
      x: inputs ``(n, ...)`` in their stored dtype (uint8 images or float32 sequences).
      y: integer labels ``(n,)``.
      total: number of examples of the split over all processes.
    """

    x: np.ndarray
    y: np.ndarray
    total: int

    def __len__(self) -> int:
        """Number of examples held by this process."""
        return len(self.y)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A loaded dataset (this process's shard of each split).

    Attributes:
      name: the dataset name, e.g. ``"mnist1d"`` or ``"tfds:mnist"``.
      train: training split (without the validation examples).
      test: test split.
      validation: the held-out part of the training set, or None.
      num_classes: number of classes.
      mean: per-channel mean of the training inputs (after scaling images to [0, 1]).
      std: per-channel standard deviation of the training inputs.
      scale: factor applied to the stored values before normalization (1/255 for uint8).
    """

    name: str
    train: Split
    test: Split
    validation: Split | None
    num_classes: int
    mean: np.ndarray
    std: np.ndarray
    scale: float = 1.0

    @classmethod
    def from_arrays(
        cls,
        name: str,
        x_train: np.ndarray,
        y_train: np.ndarray,
        x_test: np.ndarray,
        y_test: np.ndarray,
        *,
        num_classes: int | None = None,
    ) -> Dataset:
        """A single-process dataset from in-memory arrays (float inputs, no normalization).

        Example:
          >>> import numpy as np
          >>> ds = Dataset.from_arrays("toy", np.ones((10, 4)), np.arange(10) % 3,
          ...                          np.ones((5, 4)), np.arange(5) % 3)
          >>> ds.input_shape, ds.num_classes
          ((4,), 3)
        """
        y_train, y_test = np.asarray(y_train, np.int32), np.asarray(y_test, np.int32)
        if num_classes is None:
            num_classes = int(max(y_train.max(), y_test.max())) + 1
        return cls(name=name,
                   train=Split(np.asarray(x_train, np.float32), y_train, len(y_train)),
                   test=Split(np.asarray(x_test, np.float32), y_test, len(y_test)),
                   validation=None, num_classes=num_classes,
                   mean=np.zeros((), np.float32), std=np.ones((), np.float32))

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. ``(40,)`` or ``(28, 28, 1)``."""
        return tuple(self.train.x.shape[1:])

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """Scales and standardizes a batch of stored inputs to float32.

        Example:
          >>> import numpy as np
          >>> ds = Dataset.from_arrays("toy", np.ones((4, 2)), np.arange(4) % 2,
          ...                          np.ones((2, 2)), np.arange(2))
          >>> ds.normalize(ds.train.x[:2]).dtype
          dtype('float32')
        """
        x = x.astype(np.float32) * np.float32(self.scale)
        return (x - self.mean) / self.std


# --------------------------------------------------------------------------------------------
# Loading.


def load_dataset(
    name: str,
    *,
    data_dir: str = "data",
    validation_split: float = 0.0,
    process_index: int = 0,
    process_count: int = 1,
) -> Dataset:
    """Loads this process's shard of a dataset.

    Args:
      name: ``"mnist1d"`` or ``"tfds:NAME"``.
      data_dir: folder for the MNIST-1D cache and the first place searched for prepared
        tensorflow-datasets sets (then ``$TFDS_DATA_DIR`` and ``~/tensorflow_datasets``).
      validation_split: fraction of the training set held out (its last examples) as the
        validation split, in [0, 1).
      process_index: this process's index (``jax.process_index()``).
      process_count: number of processes (``jax.process_count()``).

    Returns:
      The :class:`Dataset`.

    Raises:
      ValueError: a bad argument.
      DatasetNotFoundError: a tensorflow-datasets set is not prepared on disk; the message
        names the set, the folders searched and how to prepare it.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     ds = load_dataset("mnist1d", data_dir=d)
      >>> len(ds.train), len(ds.test), ds.num_classes, ds.input_shape
      (4000, 1000, 10, (40,))
    """
    validate_dataset_name(name)
    if not 0.0 <= float(validation_split) < 1.0:
        raise ValueError(f"validation_split={validation_split!r} must be in [0, 1).")
    if not (isinstance(process_count, int) and process_count >= 1
            and isinstance(process_index, int) and 0 <= process_index < process_count):
        raise ValueError(
            f"process_index={process_index!r}, process_count={process_count!r}: need "
            "0 <= process_index < process_count."
        )
    reader = open_source(name, data_dir)

    n_train_all = reader.size("train")
    n_val = int(round(n_train_all * float(validation_split)))
    n_train = n_train_all - n_val
    if n_train < 1:
        raise ValueError(f"validation_split={validation_split!r} leaves no training examples.")

    def shard(split: str, start: int, stop: int) -> Split:
        idx = np.arange(start + process_index, stop, process_count)
        x, y = reader.read(split, idx)
        return Split(x=x, y=y.astype(np.int32), total=stop - start)

    train = shard("train", 0, n_train)
    validation = shard("train", n_train, n_train_all) if n_val else None
    test = shard("test", 0, reader.size("test"))
    mean, std, scale = reader.stats(n_train)
    return Dataset(name=name, train=train, test=test, validation=validation,
                   num_classes=reader.num_classes, mean=mean, std=std, scale=scale)


# --------------------------------------------------------------------------------------------
# Batches.


def _local_batch(batch_size: int, process_count: int, num_local_devices: int) -> int:
    if batch_size % (process_count * num_local_devices):
        raise ValueError(
            f"batch_size={batch_size} is not divisible by the {process_count * num_local_devices}"
            " devices."
        )
    return batch_size // process_count


def steps_per_epoch(ds: Dataset, batch_size: int, process_count: int = 1) -> int:
    """Full global batches per epoch (the last partial batch is dropped).

    Every process takes the same number: ``(train.total // process_count) // local_batch``.

    Example:
      >>> import numpy as np
      >>> ds = Dataset.from_arrays("toy", np.ones((1000, 2)), np.arange(1000) % 2,
      ...                          np.ones((10, 2)), np.arange(10) % 2)
      >>> steps_per_epoch(ds, 300)
      3
    """
    return (ds.train.total // process_count) // (batch_size // process_count)


def train_batches(
    ds: Dataset,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    start: int = 0,
    num_local_devices: int = 1,
    process_index: int = 0,
    process_count: int = 1,
    augment: str = "none",
) -> Iterator[dict[str, np.ndarray]]:
    """This process's part of each global training batch of one epoch, split across devices.

    The order is a permutation drawn from ``(seed, epoch, process_index)``, so batch ``k`` of
    an epoch is the same whether the epoch starts at 0 or resumes at ``start=k``.

    Args:
      ds: the dataset.
      batch_size: global batch size (all processes and devices).
      seed: data seed.
      epoch: epoch number (0-based).
      start: first batch of the epoch to yield (to resume mid-epoch).
      num_local_devices: leading axis of the yielded arrays.
      process_index: this process's index.
      process_count: number of processes.
      augment: ``"none"`` or ``"crop_flip"`` (pad 4, random crop, random horizontal flip;
        images only), drawn from ``(seed, epoch, batch, process_index)``.

    Yields:
      ``{"x": float32 (num_local_devices, per_device, ...), "y": int32 (num_local_devices,
      per_device)}``.

    Example:
      >>> import numpy as np
      >>> ds = Dataset.from_arrays("toy", np.ones((100, 40)), np.arange(100) % 2,
      ...                          np.ones((10, 40)), np.arange(10) % 2)
      >>> b = next(train_batches(ds, batch_size=64, seed=0, epoch=0, num_local_devices=2))
      >>> b["x"].shape, b["y"].shape
      ((2, 32, 40), (2, 32))
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment={augment!r}; accepted: {list(AUGMENTATIONS)}.")
    local = _local_batch(batch_size, process_count, num_local_devices)
    n = ds.train.total // process_count
    steps = n // local
    perm = np.random.default_rng([seed, epoch, process_index]).permutation(n)
    for k in range(start, steps):
        idx = np.sort(perm[k * local:(k + 1) * local])
        x = ds.normalize(ds.train.x[idx])
        if augment == "crop_flip":
            rng = np.random.default_rng([seed, epoch, k, process_index, 1])
            x = _crop_flip(x, rng)
        y = ds.train.y[idx]
        yield {"x": x.reshape((num_local_devices, -1) + x.shape[1:]),
               "y": y.reshape((num_local_devices, -1))}


def _crop_flip(x: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    if x.ndim != 4:
        raise ValueError(f"augment='crop_flip' needs images (batch, H, W, C); got {x.shape}.")
    b, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy = rng.integers(0, 2 * pad + 1, b)
    dx = rng.integers(0, 2 * pad + 1, b)
    flip = rng.random(b) < 0.5
    out = np.empty_like(x)
    for i in range(b):
        crop = padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = crop[:, ::-1] if flip[i] else crop
    return out


def num_eval_batches(split: Split, batch_size: int, process_count: int = 1) -> int:
    """Eval batches every process runs for ``split`` (the same on every process).

    Example:
      >>> import numpy as np
      >>> ds = Dataset.from_arrays("toy", np.ones((10, 2)), np.arange(10) % 2,
      ...                          np.ones((1000, 2)), np.arange(1000) % 2)
      >>> num_eval_batches(ds.test, 300)
      4
    """
    per_process = -(-split.total // process_count)
    local = batch_size // process_count
    return -(-per_process // local)


def eval_batches(
    ds: Dataset,
    split: Split,
    *,
    batch_size: int,
    num_local_devices: int = 1,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's part of each eval batch of ``split``, padded, with a validity mask.

    Every example of the split is seen exactly once over all processes; the last batch is
    padded with masked-out examples so every process runs the same number of batches.

    Yields:
      ``{"x", "y", "mask"}`` with leading axes ``(num_local_devices, per_device)``.

    Example:
      >>> import numpy as np
      >>> ds = Dataset.from_arrays("toy", np.ones((10, 2)), np.arange(10) % 2,
      ...                          np.ones((1000, 2)), np.arange(1000) % 2)
      >>> sum(int(b["mask"].sum()) for b in eval_batches(ds, ds.test, batch_size=300))
      1000
    """
    local = _local_batch(batch_size, process_count, num_local_devices)
    n = len(split)
    for k in range(num_eval_batches(split, batch_size, process_count)):
        idx = np.arange(k * local, (k + 1) * local)
        mask = idx < n
        idx = np.where(mask, idx, 0)
        x = ds.normalize(split.x[idx]) if n else np.zeros((local,) + split.x.shape[1:],
                                                          np.float32)
        y = split.y[idx] if n else np.zeros((local,), np.int32)
        yield {"x": x.reshape((num_local_devices, -1) + x.shape[1:]),
               "y": y.reshape((num_local_devices, -1)),
               "mask": mask.reshape((num_local_devices, -1))}


# --------------------------------------------------------------------------------------------
# Command line.


def _main(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m bnjax_train.input_pipeline",
        description="Prepare a dataset for train.py (needs network for tfds: sets).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="download and prepare a dataset")
    p.add_argument("dataset", help="mnist1d or tfds:NAME")
    p.add_argument("--data_dir", default="data")
    i = sub.add_parser("info", help="show what is on disk for a dataset")
    i.add_argument("dataset")
    i.add_argument("--data_dir", default="data")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        try:
            print(prepare(args.dataset, args.data_dir))
        except PrepareError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    t = time.time()
    ds = load_dataset(args.dataset, data_dir=args.data_dir)
    print(json.dumps({"dataset": ds.name, "train": len(ds.train), "test": len(ds.test),
                      "num_classes": ds.num_classes, "input_shape": ds.input_shape,
                      "seconds": round(time.time() - t, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
