"""Image-classification datasets: scikit-learn's bundled 8x8 digits, MNIST and Fashion-MNIST (IDX files)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ocula.data.idx import read_idx
from ocula.data.registry import DatasetInfo, register
from ocula.errors import OculaError


@dataclass
class ImageSet:
    """Grayscale images [N, H, W] in their native value range (`value_max`), integer labels, class names."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    value_max: float  # 16 for sklearn digits, 255 for MNIST-style data
    name: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index], self.classes, self.value_max, self.name)


def load_digits(root: Path | None, split: str) -> ImageSet:
    """All 1797 digits as split 'all'; 'train' / 'test' are the source document's split (test_size=1/3, seed 42)."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    data = ImageSet(d.images.astype(np.float32), d.target.astype(np.int64), [str(i) for i in range(10)], 16.0,
                    "digits")
    if split == "all":
        return data
    train_idx, test_idx = digits_document_split(len(data))
    return data.subset(train_idx if split == "train" else test_idx)


def digits_document_split(n: int, test_size: float = 0.33, seed: int = 42):
    """The split of 000_960cf4a20a8e44bb.txt: train_test_split(test_size=0.33, random_state=42), as indices."""
    from sklearn.model_selection import train_test_split

    return train_test_split(np.arange(n), test_size=test_size, random_state=seed)


def _idx_loader(classes: list[str], name: str):
    def load(root: Path, split: str) -> ImageSet:
        prefix = "train" if split == "train" else "t10k"
        images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise OculaError(f"images {images.shape} and labels {labels.shape} do not pair up", root)
        if labels.min() < 0 or labels.max() >= len(classes):
            raise OculaError(f"labels outside 0..{len(classes) - 1}", root)
        return ImageSet(images, labels, classes, 255.0, name)

    return load


def _idx_files(base: str) -> dict[str, str]:
    names = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    return {n: f"{base}/{n}" for n in names}


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
load_mnist = _idx_loader([str(i) for i in range(10)], "mnist")
load_fashion_mnist = _idx_loader(FASHION_CLASSES, "fashion-mnist")

register(DatasetInfo(
    name="digits", task="classify", folder="",
    description="1797 handwritten digits, 8x8, values 0-16 (bundled with scikit-learn; UCI optdigits test set)",
    loader="ocula.data.classification:load_digits", splits=("train", "test", "all"),
    license="CC BY 4.0 (UCI)"))
register(DatasetInfo(
    name="mnist", task="classify", folder="mnist",
    description="70k handwritten digits, 28x28 grayscale (60k train / 10k test)",
    loader="ocula.data.classification:load_mnist", license="no licence file (LeCun, Cortes, Burges)",
    urls=_idx_files("https://ossci-datasets.s3.amazonaws.com/mnist"),
    md5={"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
         "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
         "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
         "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}))
register(DatasetInfo(
    name="fashion-mnist", task="classify", folder="fashion_mnist",
    description="70k Zalando article images, 28x28 grayscale, 10 classes (60k train / 10k test)",
    loader="ocula.data.classification:load_fashion_mnist", license="MIT",
    urls=_idx_files("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com"),
    md5={"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
         "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
         "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
         "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}))
