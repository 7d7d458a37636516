"""Image-classification datasets: scikit-learn's bundled 8x8 digits, MNIST and Fashion-MNIST (IDX files), CIFAR-10
(binary batches or image folder), and any `root/<split>/<class>/<image>` folder."""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ocula.data.idx import read_idx
from ocula.data.images import list_images, open_image, to_mode
from ocula.data.registry import DatasetInfo, register
from ocula.errors import OculaError


@dataclass
class ImageSet:
    """Images [N, H, W] (grayscale) or [N, H, W, 3] (RGB) in their native value range (`value_max`), integer
    labels, class names."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    value_max: float  # 16 for sklearn digits, 255 for everything else
    name: str = ""

    @property
    def channels(self) -> int:
        return 1 if self.images.ndim == 3 else self.images.shape[3]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index], self.classes, self.value_max, self.name)


def stratified_folds(labels: np.ndarray, n_folds: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Shuffled, seeded stratified k-fold: [(train indices, test indices)] per fold, each class spread evenly."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(labels)
    if counts[counts > 0].min() < n_folds:
        raise OculaError(f"a class has {counts[counts > 0].min()} images, fewer than the {n_folds} folds")
    return list(StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels))


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


# --- image folders: root/<split>/<class>/<image> ---------------------------------------------------------------

FOLDER_SPLITS = ("train", "val", "test")
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}  # single-channel (+ alpha)
# PIL releases the GIL while decoding, but for small files most of the time is Python-side parsing (CIFAR-10:
# 2 threads ~1.2x faster than 1), so a few threads are enough; more only contend for the GIL.
DECODE_THREADS = min(4, os.cpu_count() or 1)
DECODE_CHUNK = 256  # files per task: one future per file would cost more than decoding a 32x32 JPEG


def image_folder_splits(root: str | Path) -> tuple[str, ...]:
    """Those of train, val, test that exist as folders under `root`."""
    return tuple(s for s in FOLDER_SPLITS if (Path(root) / s).is_dir())


def _class_dirs(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _folder_classes(root: Path, split: str, classes) -> list[str]:
    """`classes` when given, else the class folders of train (of `split` when there is no train)."""
    if classes is not None:
        return list(classes)
    source = root / "train" if (root / "train").is_dir() else root / split
    found = _class_dirs(source)
    if not found:
        raise OculaError("no class folders: expected <split>/<class>/<image> files", source)
    return found


def _resize(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if a.shape[:2] == tuple(size):
        return a
    return np.asarray(Image.fromarray(a).resize((size[1], size[0]), Image.BILINEAR))


def _decode(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    """uint8 HxW for single-channel files, HxWx3 for the rest; resized at once when the size is fixed (memory)."""
    img = open_image(path)
    a = np.asarray(to_mode(img, "L" if img.mode in GRAY_MODES else "RGB"))
    return _resize(a, size) if size else a


def _decode_all(files: list[Path], size: tuple[int, int] | None) -> list[np.ndarray]:
    chunks = [files[i:i + DECODE_CHUNK] for i in range(0, len(files), DECODE_CHUNK)]
    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        return [a for chunk in pool.map(lambda c: [_decode(f, size) for f in c], chunks) for a in chunk]


def _stack(arrays: list[np.ndarray], size: tuple[int, int] | None) -> np.ndarray:
    """One uint8 array: gray [N, H, W] only when every image is gray, at `size` or else the most common size."""
    h, w = size or Counter(a.shape[:2] for a in arrays).most_common(1)[0][0]
    rgb = any(a.ndim == 3 for a in arrays)
    out = np.empty((len(arrays), h, w, 3) if rgb else (len(arrays), h, w), np.uint8)
    for i, a in enumerate(arrays):
        a = _resize(a, (h, w))
        out[i] = a[..., None] if rgb and a.ndim == 2 else a  # gray into RGB: the value in all three channels
    return out


def load_image_folder(root: str | Path, split: str = "train", *, classes=None,
                      size: tuple[int, int] | None = None) -> ImageSet:
    """Split `split` of a `root/<split>/<class>/<image>` folder, decoded into memory (uint8, values 0-255).

    Classes: `classes` when given, else the sorted class folders of `root/train` (of the split when there is no
    train); a class folder the class list lacks is an error. Images are gray [N, H, W] when every file of the split
    is single-channel, else RGB [N, H, W, 3]; sizes that differ are resized (bilinear) to `size` (h, w), else to the
    split's most common size.
    """
    root = Path(root)
    if not root.is_dir():
        raise OculaError("folder not found", root)
    folder = root / split
    if not folder.is_dir():
        known = image_folder_splits(root)
        raise OculaError(f"no split {split!r} (splits here: {', '.join(known) or 'none'})", root)
    names = _folder_classes(root, split, classes)
    extra = sorted(set(_class_dirs(folder)) - set(names))
    if extra:
        raise OculaError(f"class folder {extra[0]!r} is not one of the classes {', '.join(names)}", folder / extra[0])
    files, labels = [], []
    for k, name in enumerate(names):
        found = list_images(folder / name) if (folder / name).is_dir() else []
        files += found
        labels += [k] * len(found)
    if not files:
        raise OculaError("no images in the class folders", folder)
    images = _stack(_decode_all(files, size), size)
    return ImageSet(images, np.array(labels, dtype=np.int64), names, 255.0, root.resolve().name)


# --- CIFAR-10 --------------------------------------------------------------------------------------------------

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_RECORD = 1 + 3 * 32 * 32  # label byte, then the R, G and B planes of a 32x32 image
CIFAR_BINARY = "cifar-10-batches-bin"


def read_cifar_binary(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 binary batch -> (images uint8 [N, 32, 32, 3], labels int64 [N])."""
    path = Path(path)
    try:
        data = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    except FileNotFoundError:
        raise OculaError("file not found", path) from None
    except OSError as e:
        raise OculaError(f"cannot read CIFAR-10 batch: {e.strerror or e}", path) from None
    if data.size == 0 or data.size % CIFAR_RECORD:
        raise OculaError(f"{data.size} bytes is not a whole number of {CIFAR_RECORD}-byte CIFAR-10 records "
                         "(truncated or not a CIFAR-10 binary batch)", path)
    records = data.reshape(-1, CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= len(CIFAR10_CLASSES):
        raise OculaError(f"label {labels.max()} outside 0..{len(CIFAR10_CLASSES) - 1}", path)
    images = np.ascontiguousarray(records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels


def load_cifar10(root: Path, split: str) -> ImageSet:
    """The official binary batches when `root/cifar-10-batches-bin/` exists, else the image-folder copy."""
    binary = Path(root) / CIFAR_BINARY
    if not binary.is_dir():
        return replace(load_image_folder(root, split, classes=CIFAR10_CLASSES, size=(32, 32)), name="cifar10")
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
    parts = [read_cifar_binary(binary / n) for n in names]
    return ImageSet(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                    CIFAR10_CLASSES, 255.0, "cifar10")


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
register(DatasetInfo(
    name="cifar10", task="classify", folder="cifar10",
    description="60k 32x32 RGB images, 10 classes (50k train / 10k test); reads the official binary batches "
                "(cifar-10-batches-bin/) or a train/<class>/ + test/<class>/ image-folder copy",
    loader="ocula.data.classification:load_cifar10",
    license="no licence stated; free for research, cite Krizhevsky 2009",
    urls={"cifar-10-binary.tar.gz": "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"},
    md5={"cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530"}))
