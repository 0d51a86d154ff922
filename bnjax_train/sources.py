"""Where the examples come from: MNIST-1D, scikit-learn's digits and prepared tfds sets.

- ``"mnist1d"``: MNIST-1D (Greydanus, 2020), made by the ``mnist1d`` package's
  ``make_dataset`` with its default arguments (``get_dataset_args()``: 4000 train and 1000 test
  sequences of length 40, seed 42) and cached as
  ``<data_dir>/mnist1d/mnist1d_default_v<package version>.npz``. No network.
- ``"digits"``: the 1,797 handwritten digits bundled with scikit-learn
  (``sklearn.datasets.load_digits``: 8x8 images of 17 grey levels, 0 to 16, ten classes),
  split once and for all by a permutation drawn from seed 0: its first
  :data:`DIGITS_TRAIN` (1,437, 80%) examples train, the other 360 test. Images
  ``(8, 8, 1)`` float32 scaled by 1/16, standardized with the training images' mean and
  standard deviation. No network: the data ship inside the package.
- ``"tfds:NAME"``: a tensorflow-datasets image classification set read from a copy prepared in
  ``array_record`` format (read without TensorFlow) or, when TensorFlow is installed, in
  ``tfrecord`` format, only the records asked for. The training program never downloads; only
  :func:`prepare` (``python -m bnjax_train.input_pipeline prepare tfds:NAME``) does.

:func:`open_source` gives a reader with ``size(split)``, ``read(split, indices)``,
``stats(n_train)`` and ``num_classes``; :mod:`bnjax_train.input_pipeline` builds the
:class:`~bnjax_train.input_pipeline.Dataset` and the batches from it. Nothing here loads
pickles: arrays are cached as ``.npz`` and read with ``allow_pickle=False``.
"""

from __future__ import annotations

import glob
import importlib.metadata
import logging
import os
import random
import sys
import zipfile
from typing import Any, Protocol

import numpy as np

__all__ = [
    "DIGITS_TRAIN",
    "LOCAL_DATASETS",
    "TFDS_PREFIX",
    "DatasetNotFoundError",
    "PrepareError",
    "Source",
    "find_prepared",
    "open_source",
    "prepare",
    "validate_dataset_name",
]

TFDS_PREFIX = "tfds:"
#: The datasets made or shipped on this machine (no download, nothing to prepare).
LOCAL_DATASETS: tuple[str, ...] = ("mnist1d", "digits")
#: Training examples of ``"digits"`` (the first of its fixed permutation); the rest test.
DIGITS_TRAIN = 1437
_STATS_EXAMPLES = 10_000


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not on disk (and the training program does not download)."""


class Source(Protocol):
    """What :func:`open_source` returns: the splits of one dataset, read on demand.

    Example:
      >>> class Ones:  # a source of 4 examples of 3 features, all in class 0
      ...     num_classes = 2
      ...     def size(self, split): return 4
      ...     def read(self, split, idx): return np.ones((len(idx), 3)), np.zeros(len(idx))
      ...     def stats(self, n_train): return np.zeros(()), np.ones(()), 1.0
      >>> source: Source = Ones()
      >>> source.read("train", np.arange(2))[0].shape
      (2, 3)
    """

    num_classes: int

    def size(self, split: str) -> int:
        """Number of examples of ``split`` (``"train"`` or ``"test"``)."""

    def read(self, split: str, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inputs (stored dtype) and labels of the examples ``idx`` of ``split``."""

    def stats(self, n_train: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Per-channel mean, standard deviation and scale of the first ``n_train`` examples."""


def validate_dataset_name(name: Any) -> None:
    """Raises a ``ValueError`` (naming the ``dataset`` field) if ``name`` is not accepted.

    Example:
      >>> validate_dataset_name("tfds:mnist")
      >>> validate_dataset_name("mnist")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: dataset='mnist' is not a known dataset; accepted: 'mnist1d', 'digits' or ...
    """
    ok = isinstance(name, str) and (
        name in LOCAL_DATASETS
        or (name.startswith(TFDS_PREFIX) and len(name) > len(TFDS_PREFIX)
            and ".." not in name and not name.startswith(TFDS_PREFIX + "/"))
    )
    if not ok:
        raise ValueError(
            f"dataset={name!r} is not a known dataset; accepted: 'mnist1d', 'digits' or "
            "'tfds:NAME' (a "
            "tensorflow-datasets image classification set, e.g. 'tfds:mnist', 'tfds:kmnist', "
            "'tfds:fashion_mnist', 'tfds:cifar10')."
        )


def open_source(name: str, data_dir: str) -> Source:
    """The reader of dataset ``name`` (``"mnist1d"``, ``"digits"`` or ``"tfds:NAME"``).

    Args:
      name: the dataset name.
      data_dir: folder of the MNIST-1D cache and the first one searched for prepared
        tensorflow-datasets sets (then ``$TFDS_DATA_DIR`` and ``~/tensorflow_datasets``).

    Returns:
      A :class:`Source`.

    Raises:
      ValueError: an unknown name.
      DatasetNotFoundError: a tensorflow-datasets set is not prepared on disk; the message
        names the set, the folders searched and how to prepare it.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     source = open_source("mnist1d", d)
      >>> source.size("train"), source.size("test"), source.num_classes
      (4000, 1000, 10)
    """
    validate_dataset_name(name)
    if name == "mnist1d":
        return _ArrayReader(_load_mnist1d(data_dir))
    if name == "digits":
        return _DigitsReader(_load_digits())
    return _TfdsReader(name[len(TFDS_PREFIX):], data_dir)


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


class _DigitsReader(_ArrayReader):
    """Reads scikit-learn's digits: images of 0 to 16, standardized with the training set's."""

    def stats(self, n_train: int) -> tuple[np.ndarray, np.ndarray, float]:
        x = self.raw["x"][:n_train].astype(np.float64) / 16.0
        return (np.float32(x.mean()).reshape(1), np.float32(max(x.std(), 1e-6)).reshape(1),
                1.0 / 16.0)


def _load_digits() -> dict[str, np.ndarray]:
    """scikit-learn's bundled digits, ``(n, 8, 8, 1)`` float32 of 0 to 16, in the fixed split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("dataset 'digits' needs scikit-learn (it ships the images): "
                          "pip install scikit-learn, or pip install -e '.[train]'") from e
    digits = load_digits()
    x = np.asarray(digits.images, np.float32)[..., None]
    y = np.asarray(digits.target, np.int32)
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[:DIGITS_TRAIN], order[DIGITS_TRAIN:]
    return {"x": x[train], "y": y[train], "x_test": x[test], "y_test": y[test]}


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
        print(f"bnjax_train: could not cache MNIST-1D in {path!r} ({e})", file=sys.stderr)
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
      >>> with tempfile.TemporaryDirectory() as d:
      ...     find_prepared("no_such_set", d) is None
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
        f"    pip install tensorflow && python -m bnjax_train.input_pipeline prepare tfds:{name} "
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
# Preparing a tensorflow-datasets set (needs network; never called by the training program).


class PrepareError(RuntimeError):
    """:func:`prepare` could not make the set: its source is unreachable, or a need is unmet."""


def _image_set(builder: Any) -> bool:
    """Whether the set has image features (tensorflow-datasets encodes them with TensorFlow)."""
    import tensorflow_datasets as tfds

    features = builder.info.features
    stack = [features]
    while stack:
        feature = stack.pop()
        if isinstance(feature, tfds.features.Image):
            return True
        if isinstance(feature, tfds.features.FeaturesDict):
            stack.extend(feature.values())
    return False


def _needs(name: str, builder: Any, data_dir: str) -> str:
    """What preparing ``tfds:NAME`` needs, and the command that does it on another machine."""
    import importlib.util

    tf = "installed" if importlib.util.find_spec("tensorflow") else "not installed"
    tf_line = (f"TensorFlow too: tensorflow-datasets encodes the set's images with it (it is {tf}"
               " here); " if _image_set(builder) else "")
    return (f"Preparing tfds:{name} needs network access to its source, and {tf_line}training "
            "on the prepared copy needs neither. On a machine with both run\n"
            f"    python -m bnjax_train.input_pipeline prepare tfds:{name} --data_dir {data_dir}\n"
            f"then copy {os.path.join(data_dir, name)} here (or point --config.data_dir or "
            "$TFDS_DATA_DIR to the folder holding it).")


def _unreachable(urls: Any, timeout: float = 5.0) -> tuple[str, str] | None:
    """The first of ``urls``' hosts that cannot be reached in ``timeout`` s, and why; or None.

    One request per host, without retries, through the same ``requests`` (and proxy settings)
    tensorflow-datasets downloads with; any HTTP answer counts as reachable.
    """
    import urllib.parse

    import requests

    seen = set()
    for url in urls or ():
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or parts.netloc in seen:
            continue
        seen.add(parts.netloc)
        try:
            requests.head(url, timeout=timeout, allow_redirects=False).close()
        except requests.RequestException as e:
            reason = getattr(e.args[0], "reason", e) if e.args else e
            return url, type(reason).__name__
    return None


def _snapshot(folder: str) -> set[str]:
    return {os.path.join(d, n) for d, dirs, files in os.walk(folder) for n in dirs + files}


def _remove_partial(data_dir: str, before: set[str], made_data_dir: bool) -> None:
    """Removes what a failed preparation left: ``*.tmp*`` files and folders, empty folders.

    Completed downloads stay, so that running the command again does not fetch them again.
    """
    import shutil

    for d, dirs, files in os.walk(data_dir, topdown=False):
        for n in files + dirs:
            path = os.path.join(d, n)
            if path in before or not os.path.lexists(path):
                continue
            if ".tmp" in n and os.path.isdir(path):
                shutil.rmtree(path)
            elif ".tmp" in n:
                os.remove(path)
            elif os.path.isdir(path) and not os.listdir(path):
                os.rmdir(path)
    if made_data_dir and os.path.isdir(data_dir) and not os.listdir(data_dir):
        os.rmdir(data_dir)


def _download_and_prepare(name: str, builder: Any, data_dir: str) -> None:
    """``builder.download_and_prepare()``; on failure, cleans up and raises one PrepareError."""
    made_data_dir = not os.path.exists(data_dir)
    before = set() if made_data_dir else _snapshot(data_dir)
    try:
        builder.download_and_prepare()
    except BaseException as e:
        _remove_partial(data_dir, before, made_data_dir)
        if not isinstance(e, Exception):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise PrepareError(f"preparing tfds:{name} failed ({type(e).__name__}: {first}); "
                           f"partial files removed. {_needs(name, builder, data_dir)}") from None


def prepare(name: str, data_dir: str) -> str:
    """Downloads and prepares ``tfds:NAME`` in ``array_record`` format under ``data_dir``.

    Needs network access, and TensorFlow for image sets (tensorflow-datasets encodes their
    images with it while preparing; reading them back does not need it). The training program
    never calls this. The set's sources are tried first, once each: an unreachable one fails
    at once, before anything is written; a preparation that fails later removes its partial
    (``*.tmp*``) files and keeps the completed downloads.

    Args:
      name: ``mnist1d`` or ``tfds:NAME``.
      data_dir: folder to prepare the set in (the training program's ``data_dir``).

    Returns:
      The folder of the prepared set.

    Raises:
      ValueError: an unknown name.
      PrepareError: a source cannot be reached, or the preparation failed; the message says
        what preparing the set needs and how to do it on another machine.

    Example:
      >>> prepare("tfds:kmnist", data_dir="data")  # doctest: +SKIP
      'data/kmnist/3.0.1'
    """
    validate_dataset_name(name)
    if name == "digits":  # shipped inside scikit-learn: nothing to prepare
        _load_digits()
        return "sklearn.datasets.load_digits"
    if name == "mnist1d":
        _load_mnist1d(data_dir)
        return os.path.join(data_dir, "mnist1d")
    import tensorflow_datasets as tfds

    tfds_name = name[len(TFDS_PREFIX):]
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # not "Variant folder ... has no dataset_info.json"
    try:
        builder = tfds.builder(tfds_name, data_dir=data_dir, file_format="array_record")
        prepared = builder.is_prepared()
    finally:
        absl_log.setLevel(level)
    if not prepared:
        blocked = _unreachable(builder.url_infos)
        if blocked is not None:
            url, why = blocked
            raise PrepareError(f"cannot prepare tfds:{tfds_name}: its source {url} cannot be "
                               f"reached from this machine ({why}); nothing was written. "
                               f"{_needs(tfds_name, builder, data_dir)}")
        _download_and_prepare(tfds_name, builder, data_dir)
    return str(builder.data_dir)
