"""Classification data: ImageSet shapes, image-folder loading (modes, sizes, class lists, bad files), the CIFAR-10
binary reader and registration, on tiny synthetic files; the real CIFAR-10 check skips when ../shared is absent."""

import numpy as np
import pytest
from PIL import Image

from ocula.data import classification, registry
from ocula.data.classification import (CIFAR10_CLASSES, ImageSet, image_folder_splits, load_image_folder,
                                       read_cifar_binary)
from ocula.errors import OculaError


def save(array, path, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array), mode).save(path)
    return path


def gray(value, h=4, w=5):
    return np.full((h, w), value, np.uint8)


def rgb(value, h=4, w=5):
    return np.stack([np.full((h, w), value + k, np.uint8) for k in range(3)], axis=2)


def test_imageset_channels_and_subset():
    g = ImageSet(np.zeros((3, 4, 5), np.uint8), np.arange(3), ["a", "b", "c"], 255.0, "g")
    c = ImageSet(np.zeros((3, 4, 5, 3), np.uint8), np.arange(3), ["a", "b", "c"], 255.0, "c")
    assert (g.channels, c.channels) == (1, 3)
    sub = c.subset([2, 0])
    assert sub.images.shape == (2, 4, 5, 3) and sub.labels.tolist() == [2, 0] and sub.name == "c"
    assert registry.load("digits", "all").images.shape == (1797, 8, 8)  # existing loaders stay [N, H, W]


def test_gray_folder_classes_from_train(tmp_path):
    for k, cls in enumerate(["dog", "cat", "emu"]):
        save(gray(10 * k), tmp_path / "train" / cls / "0.png")
        save(gray(10 * k + 1), tmp_path / "train" / cls / "1.png")
    save(gray(7), tmp_path / "test" / "emu" / "x.png")  # a split may lack classes
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    train = load_image_folder(tmp_path)
    assert train.classes == ["cat", "dog", "emu"] and train.images.shape == (6, 4, 5) and train.channels == 1
    assert train.images.dtype == np.uint8 and train.value_max == 255
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert train.images[:, 0, 0].tolist() == [10, 11, 0, 1, 20, 21]
    test = load_image_folder(tmp_path, "test")
    assert test.classes == train.classes and test.labels.tolist() == [2]
    assert image_folder_splits(tmp_path) == ("train", "test")


def test_given_classes_fix_the_order(tmp_path):
    save(gray(1), tmp_path / "train" / "a" / "0.png")
    save(gray(2), tmp_path / "train" / "b" / "0.png")
    data = load_image_folder(tmp_path, classes=["b", "a", "c"])
    assert data.classes == ["b", "a", "c"] and data.labels.tolist() == [0, 1]
    assert data.images[:, 0, 0].tolist() == [2, 1]  # b's image carries label 0
    with pytest.raises(OculaError, match=r"train/b: class folder 'b' is not one of the classes a$"):
        load_image_folder(tmp_path, classes=["a"])


def test_one_rgb_file_makes_the_split_rgb(tmp_path):
    save(gray(50), tmp_path / "train" / "a" / "0.png")
    save(rgb(100), tmp_path / "train" / "b" / "0.png")
    save(np.full((4, 5), 1000, np.uint16), tmp_path / "test" / "a" / "0.png")  # 16-bit is single-channel
    data = load_image_folder(tmp_path)
    assert data.images.shape == (2, 4, 5, 3) and data.channels == 3
    assert data.images[0, 0, 0].tolist() == [50, 50, 50] and data.images[1, 0, 0].tolist() == [100, 101, 102]
    assert load_image_folder(tmp_path, "test").images.shape == (1, 4, 5)


def test_sizes_resize_to_most_common_or_given(tmp_path):
    for n in range(3):
        save(rgb(60), tmp_path / "train" / "a" / f"{n}.png")
    save(rgb(60, 8, 10), tmp_path / "train" / "a" / "big.png")
    data = load_image_folder(tmp_path)
    assert data.images.shape == (4, 4, 5, 3)
    assert np.array_equal(data.images[3], rgb(60))  # bilinear keeps a flat image flat
    assert load_image_folder(tmp_path, size=(6, 7)).images.shape == (4, 6, 7, 3)


def test_decoding_in_chunks_keeps_file_order(tmp_path, monkeypatch):
    monkeypatch.setattr(classification, "DECODE_CHUNK", 2)
    for n in range(7):
        save(gray(n), tmp_path / "train" / ("a" if n < 3 else "b") / f"{n}.png")
    data = load_image_folder(tmp_path)
    assert data.images[:, 0, 0].tolist() == list(range(7)) and data.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]


def test_folder_errors_name_the_file(tmp_path):
    save(gray(1), tmp_path / "train" / "a" / "0.png")
    save(gray(1), tmp_path / "val" / "zebra" / "0.png")
    with pytest.raises(OculaError, match=r"val/zebra: class folder 'zebra' is not one of the classes a$"):
        load_image_folder(tmp_path, "val")
    with pytest.raises(OculaError, match=r"no split 'test' \(splits here: train, val\)"):
        load_image_folder(tmp_path, "test")
    bad = tmp_path / "train" / "a" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(OculaError) as e:
        load_image_folder(tmp_path)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(OculaError, match="no class folders"):
        load_image_folder(tmp_path / "empty")


# --- CIFAR-10 binary --------------------------------------------------------------------------------------------

def cifar_records(labels, seed=0):
    """Records of 1 label byte + R, G, B planes, and the images they hold as [N, 32, 32, 3]."""
    images = np.random.default_rng(seed).integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
    planes = images.transpose(0, 3, 1, 2).reshape(len(labels), -1)
    data = np.concatenate([np.array(labels, np.uint8)[:, None], planes], axis=1).tobytes()
    return data, images


def test_cifar_binary_reader(tmp_path):
    data, images = cifar_records([3, 0, 9])
    path = tmp_path / "data_batch_1.bin"
    path.write_bytes(data)
    got, labels = read_cifar_binary(path)
    assert got.shape == (3, 32, 32, 3) and got.dtype == np.uint8 and np.array_equal(got, images)
    assert labels.tolist() == [3, 0, 9]
    path.write_bytes(data[:-5])
    with pytest.raises(OculaError, match=r"data_batch_1.bin: 9214 bytes is not a whole number of 3073-byte"):
        read_cifar_binary(path)
    path.write_bytes(b"")
    with pytest.raises(OculaError, match="data_batch_1.bin: 0 bytes"):
        read_cifar_binary(path)
    path.write_bytes(cifar_records([1, 10])[0])
    with pytest.raises(OculaError, match=r"data_batch_1.bin: label 10 outside 0..9"):
        read_cifar_binary(path)
    with pytest.raises(OculaError, match="nothere.bin: file not found"):
        read_cifar_binary(tmp_path / "nothere.bin")


def test_cifar10_registered_loader_prefers_binary(tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        (folder / f"data_batch_{i}.bin").write_bytes(cifar_records([i, i + 1], seed=i)[0])
    data, images = cifar_records([7])
    (folder / "test_batch.bin").write_bytes(data)
    save(rgb(1, 32, 32), tmp_path / "cifar10" / "test" / "cat" / "0.png")  # ignored: the binary copy wins
    train = registry.load("cifar10", "train", tmp_path)
    assert train.images.shape == (10, 32, 32, 3) and train.labels.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    test = registry.load("cifar10", "test", tmp_path)
    assert np.array_equal(test.images, images) and test.classes == CIFAR10_CLASSES and test.name == "cifar10"
    (folder / "data_batch_3.bin").unlink()
    with pytest.raises(OculaError, match="data_batch_3.bin: file not found"):
        registry.load("cifar10", "train", tmp_path)


def test_cifar10_image_folder_copy(tmp_path):
    save(rgb(9, 32, 32), tmp_path / "cifar10" / "test" / "ship" / "0000.jpg")
    save(rgb(9, 32, 32), tmp_path / "cifar10" / "test" / "cat" / "0000.jpg")
    test = registry.load("cifar10", "test", tmp_path)
    assert test.labels.tolist() == [3, 8] and test.images.shape == (2, 32, 32, 3) and test.name == "cifar10"
    save(rgb(9, 32, 32), tmp_path / "cifar10" / "test" / "kitten" / "0000.jpg")
    with pytest.raises(OculaError, match="class folder 'kitten'"):
        registry.load("cifar10", "test", tmp_path)


def test_cifar10_registry_entry():
    info = registry.get_info("cifar10")
    assert info.task == "classify" and info.folder == "cifar10" and info.splits == ("train", "test")
    assert info.md5 == {"cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530"} and info.license
    assert info.urls["cifar-10-binary.tar.gz"] == "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"


def test_real_cifar10_test_split(datasets):
    test = registry.load("cifar10", "test", datasets)
    assert test.images.shape == (10000, 32, 32, 3) and test.images.dtype == np.uint8 and test.channels == 3
    assert np.bincount(test.labels, minlength=10).tolist() == [1000] * 10
    assert test.classes == CIFAR10_CLASSES
