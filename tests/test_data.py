"""bnjax_train.input_pipeline: MNIST-1D (vs the mnist1d package), tfds sets, batches, shards."""

import importlib.util
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tfds_fake
from processes import free_port

from bnjax_train import input_pipeline as data
from bnjax_train import sources


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One MNIST-1D cache for the session (shared with test_train.py)."""
    return str(tmp_path_factory.getbasetemp() / "bnjax_data")


@pytest.fixture(scope="module")
def mnist1d(data_dir):
    return data.load_dataset("mnist1d", data_dir=data_dir)


def test_mnist1d_is_the_packages_default_dataset_and_is_cached(mnist1d, data_dir):
    from mnist1d.data import get_dataset_args, make_dataset

    state = np.random.get_state()
    ref = make_dataset(get_dataset_args())
    np.random.set_state(state)
    np.testing.assert_allclose(mnist1d.train.x, ref["x"], rtol=1e-6)
    np.testing.assert_array_equal(mnist1d.train.y, ref["y"])
    np.testing.assert_allclose(mnist1d.test.x, ref["x_test"], rtol=1e-6)
    np.testing.assert_array_equal(mnist1d.test.y, ref["y_test"])
    assert (len(mnist1d.train), len(mnist1d.test), mnist1d.num_classes) == (4000, 1000, 10)
    cached = [f for f in os.listdir(os.path.join(data_dir, "mnist1d")) if f.endswith(".npz")]
    assert len(cached) == 1
    # Loading again reads the cache (no pickle) and does not touch the global RNG.
    before = np.random.get_state()[1].copy()
    again = data.load_dataset("mnist1d", data_dir=data_dir)
    np.testing.assert_array_equal(again.train.x, mnist1d.train.x)
    np.testing.assert_array_equal(np.random.get_state()[1], before)


def test_mnist1d_damaged_cache_is_rebuilt(tmp_path, mnist1d):
    path = sources._mnist1d_cache_path(str(tmp_path))
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04 truncated")
    ds = data.load_dataset("mnist1d", data_dir=str(tmp_path))
    np.testing.assert_array_equal(ds.test.y, mnist1d.test.y)


@pytest.mark.parametrize("process_count", [2, 3])
def test_process_shards_partition_every_split(mnist1d, data_dir, process_count):
    shards = [data.load_dataset("mnist1d", data_dir=data_dir, validation_split=0.1,
                                process_index=p, process_count=process_count)
              for p in range(process_count)]
    for split, lo, hi in (("train", 0, 3600), ("validation", 3600, 4000)):
        for p, ds in enumerate(shards):
            part = getattr(ds, split)
            assert part.total == hi - lo
            np.testing.assert_array_equal(part.y, mnist1d.train.y[lo + p:hi:process_count])
        assert sum(len(getattr(ds, split)) for ds in shards) == hi - lo
    for p, ds in enumerate(shards):
        np.testing.assert_array_equal(ds.test.x, mnist1d.test.x[p::process_count])


def _toy(n_train=103, n_test=37, shape=(5,)):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n_train,) + shape).astype(np.float32)
    x[:, 0] = np.arange(n_train)  # feature 0 identifies the example
    xt = rng.normal(size=(n_test,) + shape).astype(np.float32)
    xt[:, 0] = np.arange(n_test)
    return data.Dataset.from_arrays("toy", x, np.arange(n_train) % 4, xt, np.arange(n_test) % 4)


def test_train_batches_permute_each_epoch_and_resume_mid_epoch():
    ds = _toy()
    kw = dict(batch_size=20, seed=3, num_local_devices=4)
    epoch0 = list(data.train_batches(ds, epoch=0, **kw))
    assert len(epoch0) == data.steps_per_epoch(ds, 20) == 5
    assert epoch0[0]["x"].shape == (4, 5, 5) and epoch0[0]["y"].shape == (4, 5)
    ids = np.concatenate([b["x"][..., 0].ravel() for b in epoch0]).astype(int)
    assert len(set(ids)) == 100 and ids.max() < 103  # no example twice in an epoch
    np.testing.assert_array_equal(np.concatenate([b["y"].ravel() for b in epoch0]), ids % 4)
    again = list(data.train_batches(ds, epoch=0, **kw))
    resumed = list(data.train_batches(ds, epoch=0, start=3, **kw))
    for a, b in zip(epoch0, again, strict=True):
        np.testing.assert_array_equal(a["x"], b["x"])
    for a, b in zip(epoch0[3:], resumed, strict=True):
        np.testing.assert_array_equal(a["x"], b["x"])
    epoch1 = list(data.train_batches(ds, epoch=1, **kw))
    assert not np.array_equal(epoch0[0]["x"], epoch1[0]["x"])


def test_train_batches_across_processes_form_one_global_batch():
    ds_all = _toy(n_train=90)
    shards = [data.Dataset.from_arrays("toy", ds_all.train.x[p::3], ds_all.train.y[p::3],
                                       ds_all.test.x, ds_all.test.y) for p in range(3)]
    shards = [data.Dataset(**{**s.__dict__, "train": data.Split(s.train.x, s.train.y, 90)})
              for s in shards]
    per = [list(data.train_batches(s, batch_size=12, seed=0, epoch=0, num_local_devices=2,
                                   process_index=p, process_count=3))
           for p, s in enumerate(shards)]
    assert {len(b) for b in per} == {data.steps_per_epoch(shards[0], 12, 3)} == {7}
    seen = np.concatenate([b["x"][..., 0].ravel() for batches in per for b in batches])
    assert len(set(seen.astype(int))) == len(seen) == 84


@pytest.mark.parametrize("process_count", [1, 3])
def test_eval_batches_see_every_example_once(process_count):
    ds = _toy(n_test=37)
    seen = []
    counts = set()
    for p in range(process_count):
        shard = data.Split(ds.test.x[p::process_count], ds.test.y[p::process_count], 37)
        batches = list(data.eval_batches(ds, shard, batch_size=12, num_local_devices=2,
                                         process_count=process_count))
        counts.add(len(batches))
        assert len(batches) == data.num_eval_batches(shard, 12, process_count)
        for b in batches:
            assert b["x"].shape[:2] == b["mask"].shape == (2, 12 // process_count // 2)
            seen.extend(b["x"][..., 0][b["mask"]].astype(int).tolist())
    assert len(counts) == 1  # every process runs the same number of batches
    assert sorted(seen) == list(range(37))


def test_crop_flip_is_a_crop_of_the_padded_image():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 5, 7, 2)).astype(np.float32)
    out = data._crop_flip(x, np.random.default_rng(1), pad=2)
    assert out.shape == x.shape
    padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
    for i in range(6):
        candidates = [c for dy in range(5) for dx in range(5)
                      for c in (padded[i, dy:dy + 5, dx:dx + 7],
                                padded[i, dy:dy + 5, dx:dx + 7][:, ::-1])]
        assert any(np.array_equal(out[i], c) for c in candidates)
    with pytest.raises(ValueError, match="images"):
        data._crop_flip(x[:, :, :, 0], np.random.default_rng(0))


@pytest.mark.parametrize("name", sorted(tfds_fake.SETS))
def test_tfds_set_written_by_the_test_loads_exactly(tmp_path_factory, name):
    tfds_dir = str(tmp_path_factory.getbasetemp() / "bnjax_tfds")
    ref = tfds_fake.build(name, tfds_dir)
    x_train, y_train = ref["train"]
    x_test, y_test = ref["test"]
    ds = data.load_dataset(f"tfds:{name}", data_dir=tfds_dir)
    np.testing.assert_array_equal(ds.train.x, x_train)
    np.testing.assert_array_equal(ds.train.y, y_train)
    np.testing.assert_array_equal(ds.test.x, x_test)
    np.testing.assert_array_equal(ds.test.y, y_test)
    assert ds.num_classes == tfds_fake.SETS[name][1]
    # Per-channel normalization from the training images, in float64 here.
    xf = x_train.astype(np.float64) / 255.0
    mean, std = xf.mean(axis=(0, 1, 2)), xf.std(axis=(0, 1, 2))
    np.testing.assert_allclose(ds.normalize(x_test[:3]), (x_test[:3] / 255.0 - mean) / std,
                               rtol=1e-5, atol=1e-5)
    # Validation split and process shards.
    n = len(y_train)
    n_val = round(n * 0.25)
    parts = [data.load_dataset(f"tfds:{name}", data_dir=tfds_dir, validation_split=0.25,
                               process_index=p, process_count=2) for p in range(2)]
    for p, part in enumerate(parts):
        np.testing.assert_array_equal(part.train.x, x_train[p:n - n_val:2])
        np.testing.assert_array_equal(part.validation.y, y_train[n - n_val + p::2])
        np.testing.assert_array_equal(part.test.y, y_test[p::2])
        # Statistics of the training part (without the validation examples), on every process.
        np.testing.assert_allclose(part.mean, xf[:n - n_val].mean(axis=(0, 1, 2)), rtol=1e-5)
        np.testing.assert_allclose(part.std, xf[:n - n_val].std(axis=(0, 1, 2)), rtol=1e-5)


def test_missing_tfds_set_fails_fast_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    t0 = time.monotonic()
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load_dataset("tfds:mnist", data_dir=str(tmp_path / "d"))
    assert time.monotonic() - t0 < 30  # the bound; no download is tried
    msg = str(info.value)
    assert "'tfds:mnist'" in msg
    assert str(tmp_path / "d") in msg and str(tmp_path / "home" / "tensorflow_datasets") in msg
    assert "python -m bnjax_train.input_pipeline prepare tfds:mnist" in msg


def test_digits_are_scikit_learns_in_the_documented_split(tmp_path):
    from sklearn.datasets import load_digits

    ref = load_digits()
    order = np.random.default_rng(0).permutation(1797)  # the documented split: seed 0
    train, test = order[:1437], order[1437:]
    ds = data.load_dataset("digits", data_dir=str(tmp_path / "nothing_here"))
    assert (len(ds.train), len(ds.test), ds.num_classes, ds.input_shape) == (
        1437, 360, 10, (8, 8, 1))
    np.testing.assert_array_equal(ds.train.x[..., 0], ref.images[train])
    np.testing.assert_array_equal(ds.train.y, ref.target[train])
    np.testing.assert_array_equal(ds.test.x[..., 0], ref.images[test])
    np.testing.assert_array_equal(ds.test.y, ref.target[test])
    assert not (tmp_path / "nothing_here").exists()  # nothing downloaded, nothing cached
    # Batches are scaled to [0, 1] and standardized with the training images' statistics.
    scaled = ref.images[train].astype(np.float64) / 16.0
    want = (ref.images[test[:5]] / 16.0 - scaled.mean()) / scaled.std()
    np.testing.assert_allclose(ds.normalize(ds.test.x[:5])[..., 0], want, rtol=1e-5, atol=1e-5)
    assert data.prepare("digits", str(tmp_path)) == "sklearn.datasets.load_digits"


def test_prepare_offline_fails_in_seconds_with_one_message(tmp_path):
    # A real `prepare` of a real set whose source cannot be reached: every request goes to a
    # closed local port (the proxy), as offline as this machine is on any machine.
    port = free_port()
    proxy = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy,
           "https_proxy": proxy, "NO_PROXY": "", "no_proxy": "",
           "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    data_dir = tmp_path / "data"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bnjax_train.input_pipeline", "prepare",
                           "tfds:kmnist", "--data_dir", str(data_dir)],
                          env=env, capture_output=True, text=True, timeout=90)
    assert time.monotonic() - t0 < 60  # it used to retry for 3.5 minutes
    assert proc.returncode == 1, proc.stderr[-2000:]
    err = proc.stderr
    assert "Traceback" not in err and err.count("error: ") == 1, err
    line = next(x for x in err.splitlines() if x.startswith("error: "))
    assert "cannot prepare tfds:kmnist: its source http://codh.rois.ac.jp/" in line
    assert "cannot be reached from this machine" in line and "nothing was written" in line
    tf = "installed" if importlib.util.find_spec("tensorflow") else "not installed"
    assert (f"and TensorFlow too: tensorflow-datasets encodes the set's images with it (it is "
            f"{tf} here)") in line
    assert "python -m bnjax_train.input_pipeline prepare tfds:kmnist --data_dir" in err
    assert not data_dir.exists()  # no *.tmp, no empty folders


def test_prepare_failing_midway_removes_its_partial_files(tmp_path):
    # A set whose preparation fails after a download finished and another started: the
    # finished one stays (running again does not fetch it again), the partial one goes.
    data_dir = tmp_path / "data"
    (data_dir / "other").mkdir(parents=True)

    def split_generators(self, dl_manager):
        folder = dl_manager.download_dir
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "done.gz").write_bytes(b"complete")
        (folder / "part.gz.tmp.1f2e").mkdir()
        (folder / "part.gz.tmp.1f2e" / "part.gz").write_bytes(b"half")
        raise ConnectionError("the connection was reset")

    type("BnjaxFailsMidway", (tfds_fake.tfds.core.GeneratorBasedBuilder,), {
        "VERSION": tfds_fake.tfds.core.Version("1.0.0"),
        "_info": lambda self: tfds_fake.tfds.core.DatasetInfo(
            builder=self, features=tfds_fake.tfds.features.FeaturesDict(
                {"x": tfds_fake.tfds.features.Tensor(shape=(2,), dtype=np.float32)})),
        "_split_generators": split_generators,
        "_generate_examples": lambda self: iter(()),
    })
    with pytest.raises(sources.PrepareError) as info:
        sources.prepare("tfds:bnjax_fails_midway", str(data_dir))
    msg = str(info.value)
    assert msg.startswith("preparing tfds:bnjax_fails_midway failed (ConnectionError: the "
                          "connection was reset); partial files removed.")
    assert "TensorFlow" not in msg  # no image features: it is not needed
    assert info.value.__cause__ is None and info.value.__suppress_context__
    left = sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*"))
    assert left == ["downloads", "downloads/done.gz", "other"], left


@pytest.mark.parametrize("name", ["mnist", "tfds:", "tfds:../x", "", None, "MNIST1D"])
def test_unknown_dataset_names_are_rejected(name):
    with pytest.raises(ValueError, match="dataset=.*accepted: 'mnist1d', 'digits' or 'tfds:NAME'"):
        data.load_dataset(name)


def test_bad_arguments():
    ds = _toy()
    with pytest.raises(ValueError, match="validation_split"):
        data.load_dataset("mnist1d", validation_split=1.0)
    with pytest.raises(ValueError, match="process_index"):
        data.load_dataset("mnist1d", process_index=2, process_count=2)
    with pytest.raises(ValueError, match="augment='flip'"):
        next(data.train_batches(ds, batch_size=10, seed=0, epoch=0, augment="flip"))
    with pytest.raises(ValueError, match="batch_size=10 is not divisible by the 4 devices"):
        next(data.train_batches(ds, batch_size=10, seed=0, epoch=0, num_local_devices=4))
