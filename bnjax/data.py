"""Datasets for the training program: MNIST-1D (generated locally) and tensorflow-datasets sets.

Names (the ``dataset`` config field):

- ``"mnist1d"``: MNIST-1D (Greydanus, 2020), made by the ``mnist1d`` package's
  ``make_dataset`` with its default arguments (``get_dataset_args()``: 4000 train and 1000 test
  sequences of length 40, seed 42) and cached as
  ``<data_dir>/mnist1d/mnist1d_default_v<package version>.npz``. No network.
- ``"tfds:NAME"``: a tensorflow-datasets image classification set (``mnist``, ``kmnist``,
  ``fashion_mnist``, ``cifar10``, ...), read from a copy prepared in ``array_record`` format
  (read without TensorFlow) or, when TensorFlow is installed, in ``tfrecord`` format. The
  training program never downloads: a set that is not on disk fails at once with a message
  naming the set, the folders searched and the command that prepares it
  (``python -m bnjax.data prepare tfds:NAME --data_dir DIR`` on a machine with network).

Arrays stay in memory in their stored dtype (``uint8`` images); batches are normalized per
channel on the fly with the mean and standard deviation of the training images. With several
processes (hosts) each process keeps only its own shard of every split (examples
``process_index::process_count``) and reads only those records; the global batch is the
concatenation of the processes' local batches. Nothing here loads pickles: arrays are cached
as ``.npz`` and read with ``allow_pickle=False``.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.metadata
import json
import os
import random
import sys
import time
import zipfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

__all__ = [
    "AUGMENTATIONS",
    "Dataset",
    "DatasetNotFoundError",
    "Split",
    "TFDS_PREFIX",
    "eval_batches",
    "find_prepared",
    "load_dataset",
    "num_eval_batches",
    "prepare",
    "steps_per_epoch",
    "train_batches",
    "validate_dataset_name",
]

TFDS_PREFIX = "tfds:"
#: Augmentations accepted by :func:`train_batches` (the ``augment`` config field).
AUGMENTATIONS: tuple[str, ...] = ("none", "crop_flip")
_STATS_EXAMPLES = 10_000


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not on disk (and the training program does not download)."""


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
# Names and loading.


def validate_dataset_name(name: Any) -> None:
    """Raises a ``ValueError`` (naming the ``dataset`` field) if ``name`` is not accepted.

    Example:
      >>> validate_dataset_name("tfds:mnist")
      >>> validate_dataset_name("mnist")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: dataset='mnist' is not a known dataset; accepted: 'mnist1d' or 'tfds:NAME' ...
    """
    ok = isinstance(name, str) and (
        name == "mnist1d"
        or (name.startswith(TFDS_PREFIX) and len(name) > len(TFDS_PREFIX)
            and ".." not in name and not name.startswith(TFDS_PREFIX + "/"))
    )
    if not ok:
        raise ValueError(
            f"dataset={name!r} is not a known dataset; accepted: 'mnist1d' or 'tfds:NAME' (a "
            "tensorflow-datasets image classification set, e.g. 'tfds:mnist', 'tfds:kmnist', "
            "'tfds:fashion_mnist', 'tfds:cifar10')."
        )


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
      >>> ds = load_dataset("mnist1d", data_dir=tempfile.mkdtemp())
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
    if name == "mnist1d":
        raw = _load_mnist1d(data_dir)
        reader = _ArrayReader(raw)
    else:
        reader = _TfdsReader(name[len(TFDS_PREFIX):], data_dir)

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


class _ArrayReader:
    """Reads splits held in memory (MNIST-1D)."""

    def __init__(self, raw: dict[str, np.ndarray]) -> None:
        self.raw = raw
        self.num_classes = int(raw["y"].max()) + 1

    def size(self, split: str) -> int:
        return len(self.raw["y" if split == "train" else "y_test"])

    def read(self, split: str, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if split == "train":
            return self.raw["x"][idx], self.raw["y"][idx]
        return self.raw["x_test"][idx], self.raw["y_test"][idx]

    def stats(self, n_train: int) -> tuple[np.ndarray, np.ndarray, float]:
        # make_dataset already centres the whole set and scales it to unit variance.
        return np.zeros((), np.float32), np.ones((), np.float32), 1.0


def _mnist1d_cache_path(data_dir: str) -> str:
    # Keyed by the package version: its default arguments (and so the data) belong to it.
    # Found without importing mnist1d, which takes seconds (scipy, matplotlib).
    try:
        version = importlib.metadata.version("mnist1d")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return os.path.join(data_dir, "mnist1d", f"mnist1d_default_v{version}.npz")


def _load_mnist1d(data_dir: str) -> dict[str, np.ndarray]:
    """MNIST-1D with the package's default arguments, cached as ``.npz`` in ``data_dir``."""
    path = _mnist1d_cache_path(data_dir)
    keys = ("x", "y", "x_test", "y_test")
    if os.path.exists(path):
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in keys}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # A damaged cache (e.g. an interrupted write): make it again.
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    # make_dataset seeds the global NumPy and Python generators; keep the caller's.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        made = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    raw = {"x": np.asarray(made["x"], np.float32), "y": np.asarray(made["y"], np.int32),
           "x_test": np.asarray(made["x_test"], np.float32),
           "y_test": np.asarray(made["y_test"], np.int32)}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}.npz"
        np.savez(tmp, **raw)
        os.replace(tmp, path)  # atomic: a reader never sees half a file
    except OSError as e:  # a read-only data_dir only costs the cache
        print(f"bnjax.data: could not cache MNIST-1D in {path!r} ({e})", file=sys.stderr)
    return raw


def _tfds_search_dirs(data_dir: str) -> list[str]:
    dirs = [data_dir]
    if os.environ.get("TFDS_DATA_DIR"):
        dirs.append(os.environ["TFDS_DATA_DIR"])
    dirs.append(os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))
    out: list[str] = []
    for d in dirs:
        d = os.path.abspath(os.path.expanduser(d))
        if d not in out:
            out.append(d)
    return out


def _version_key(path: str) -> tuple[int, ...]:
    parts = os.path.basename(os.path.dirname(path)).split(".")
    return tuple(int(p) if p.isdigit() else -1 for p in parts)


def find_prepared(name: str, data_dir: str) -> str | None:
    """Folder of the newest prepared version of tensorflow-datasets set ``name``, or None.

    Looks for ``<dir>/<name>/<version>/dataset_info.json`` in ``data_dir``,
    ``$TFDS_DATA_DIR`` and ``~/tensorflow_datasets`` (``name`` may be ``"NAME/CONFIG"``).

    Example:
      >>> import tempfile
      >>> find_prepared("no_such_set", tempfile.mkdtemp()) is None
      True
    """
    for d in _tfds_search_dirs(data_dir):
        found = glob.glob(os.path.join(glob.escape(os.path.join(d, name)), "*",
                                       "dataset_info.json"))
        if found:
            return os.path.dirname(max(found, key=_version_key))
    return None


def _not_found_message(name: str, data_dir: str) -> str:
    dirs = _tfds_search_dirs(data_dir)
    return (
        f"dataset 'tfds:{name}' is not prepared on this machine: no "
        f"'{name}/<version>/dataset_info.json' in any of {dirs}. The training program never "
        "downloads. To prepare it, on a machine with network run\n"
        f"    pip install tensorflow && python -m bnjax.data prepare tfds:{name} "
        f"--data_dir {data_dir}\n"
        f"(equivalently: tfds build {name} --data_dir {data_dir} --file_format array_record), "
        f"then copy {os.path.join(data_dir, name)} here, or point --config.data_dir (or "
        "$TFDS_DATA_DIR) to the folder holding it."
    )


class _TfdsReader:
    """Reads a prepared tensorflow-datasets set from disk, only the records asked for."""

    def __init__(self, name: str, data_dir: str) -> None:
        path = find_prepared(name, data_dir)
        if path is None:
            raise DatasetNotFoundError(_not_found_message(name, data_dir))
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:  # pragma: no cover - tensorflow-datasets is a dependency
            raise ImportError(
                "reading 'tfds:' datasets needs the tensorflow-datasets package: "
                "pip install tensorflow-datasets"
            ) from e
        self.name = name
        self.path = path
        self.builder = tfds.builder_from_directory(path)
        info = self.builder.info
        keys = info.supervised_keys or ("image", "label")
        if not isinstance(keys, tuple | list) or len(keys) < 2:
            raise ValueError(f"dataset 'tfds:{name}' has supervised_keys {keys!r}; need "
                             "(image, label) for image classification.")
        self.x_key, self.y_key = keys[0], keys[1]
        label = info.features[self.y_key]
        self.num_classes = int(getattr(label, "num_classes", 0) or 0)
        if self.num_classes < 2:
            raise ValueError(f"dataset 'tfds:{name}': feature {self.y_key!r} is not a class "
                             "label with >= 2 classes; only image classification sets work.")
        for split in ("train", "test"):
            if split not in info.splits:
                raise ValueError(f"dataset 'tfds:{name}' at {path} has splits "
                                 f"{sorted(info.splits)}; need 'train' and 'test'.")
        self.format = str(getattr(info.file_format, "value", info.file_format) or "tfrecord")
        self._sources: dict[str, Any] = {}
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def size(self, split: str) -> int:
        return int(self.builder.info.splits[split].num_examples)

    def _source(self, split: str) -> Any:
        if split not in self._sources:
            self._sources[split] = self.builder.as_data_source(split=split)
        return self._sources[split]

    def read(self, split: str, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.format == "array_record":
            xs, ys = [], []
            src = self._source(split)
            for start in range(0, len(idx), 4096):
                recs = src.__getitems__([int(i) for i in idx[start:start + 4096]])
                xs.extend(np.asarray(r[self.x_key]) for r in recs)
                ys.extend(int(r[self.y_key]) for r in recs)
            if not xs:
                raise ValueError(f"dataset 'tfds:{self.name}' split {split!r} is empty here.")
            return np.stack(xs), np.asarray(ys, np.int64)
        return self._read_tfrecord(split, idx)

    def _read_tfrecord(self, split: str, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if split not in self._arrays:
            try:
                import tensorflow  # noqa: F401
            except ImportError as e:
                raise DatasetNotFoundError(
                    f"dataset 'tfds:{self.name}' at {self.path} is in {self.format!r} format, "
                    "which needs TensorFlow to read; pip install tensorflow, or rebuild it as "
                    f"array_record: tfds build {self.name} --file_format array_record"
                ) from e
            import tensorflow_datasets as tfds

            data = tfds.as_numpy(self.builder.as_dataset(split=split, batch_size=-1))
            self._arrays[split] = (np.asarray(data[self.x_key]), np.asarray(data[self.y_key]))
        x, y = self._arrays[split]
        return x[idx], y[idx]

    def stats(self, n_train: int) -> tuple[np.ndarray, np.ndarray, float]:
        # The same first examples on every process, so every process normalizes alike.
        x, _ = self.read("train", np.arange(min(n_train, _STATS_EXAMPLES)))
        scale = 1.0 / 255.0 if x.dtype == np.uint8 else 1.0
        xf = x.astype(np.float64) * scale
        axes = tuple(range(xf.ndim - 1)) if xf.ndim >= 3 else tuple(range(xf.ndim))
        mean = xf.mean(axis=axes)
        std = np.maximum(xf.std(axis=axes), 1e-6)
        return mean.astype(np.float32), std.astype(np.float32), scale


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
# Preparing a tensorflow-datasets set (needs network; never called by the training program).


def prepare(name: str, data_dir: str) -> str:
    """Downloads and prepares ``tfds:NAME`` in ``array_record`` format under ``data_dir``.

    Needs network access (and TensorFlow for sets whose images are encoded at preparation,
    such as ``mnist``). The training program never calls this.

    Args:
      name: ``mnist1d`` or ``tfds:NAME``.
      data_dir: folder to prepare the set in (the training program's ``data_dir``).

    Returns:
      The folder of the prepared set.

    Example:
      >>> prepare("tfds:kmnist", data_dir="data")  # doctest: +SKIP
      'data/kmnist/3.0.1'
    """
    validate_dataset_name(name)
    if name == "mnist1d":
        _load_mnist1d(data_dir)
        return os.path.join(data_dir, "mnist1d")
    import tensorflow_datasets as tfds

    tfds_name = name[len(TFDS_PREFIX):]
    builder = tfds.builder(tfds_name, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return str(builder.data_dir)


def _main(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m bnjax.data",
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
        print(prepare(args.dataset, args.data_dir))
        return 0
    t = time.time()
    ds = load_dataset(args.dataset, data_dir=args.data_dir)
    print(json.dumps({"dataset": ds.name, "train": len(ds.train), "test": len(ds.test),
                      "num_classes": ds.num_classes, "input_shape": ds.input_shape,
                      "seconds": round(time.time() - t, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
