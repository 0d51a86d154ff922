"""Small image-classification sets in tensorflow-datasets format, made by the tests (no network).

The tests build them with the real tensorflow-datasets writer (``array_record`` files, PNG
images encoded with PIL, so TensorFlow is not needed) and keep the arrays they wrote as the
reference the loader is checked against.
"""

import io
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image


def _png(a):
    buf = io.BytesIO()
    Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, format="PNG")
    return buf.getvalue()


def make_arrays(shape, n, num_classes, seed):
    rng = np.random.default_rng(seed)
    # Class-dependent brightness, so that a model can learn something from them.
    y = rng.integers(0, num_classes, n)
    base = (y[:, None, None, None] * (200 // num_classes)).astype(np.int64)
    x = np.clip(base + rng.integers(0, 16, (n,) + shape), 0, 255).astype(np.uint8)
    return x, y


def _builder_class(class_name, shape, num_classes, sizes):
    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=shape),
                "label": tfds.features.ClassLabel(num_classes=num_classes),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # records in the order written, as the reference
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in sizes}

    def _generate_examples(self, split):
        x, y = make_arrays(shape, sizes[split], num_classes, seed=list(sizes).index(split))
        for i in range(len(y)):
            yield i, {"image": _png(x[i]), "label": int(y[i])}

    return type(class_name, (tfds.core.GeneratorBasedBuilder,), {
        "VERSION": tfds.core.Version("1.0.0"),
        "_info": _info,
        "_split_generators": _split_generators,
        "_generate_examples": _generate_examples,
    })


# Defined once per process (tensorflow-datasets registers builder classes by name).
SETS = {
    "bnjax_fake_gray": ((12, 12, 1), 4, {"train": 96, "test": 40}),
    "bnjax_fake_rgb": ((8, 8, 3), 3, {"train": 50, "test": 21}),
}
_CLASSES = {name: _builder_class("".join(p.title() for p in name.split("_")), *spec)
            for name, spec in SETS.items()}


def build(name, data_dir):
    """Writes set ``name`` under ``data_dir`` (once) and returns the reference arrays."""
    shape, num_classes, sizes = SETS[name]
    if not os.path.exists(os.path.join(data_dir, name, "1.0.0", "dataset_info.json")):
        builder = _CLASSES[name](data_dir=data_dir, file_format="array_record")
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return {split: make_arrays(shape, n, num_classes, seed=i)
            for i, (split, n) in enumerate(sizes.items())}
