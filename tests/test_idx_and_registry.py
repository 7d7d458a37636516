import gzip
import struct

import numpy as np
import pytest

from ocula.data import registry
from ocula.data.idx import read_idx
from ocula.errors import OculaError


def idx_bytes(array: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + \
        array.astype(np.uint8).tobytes()


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, compress):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    data = idx_bytes(a)
    path = tmp_path / "x.idx"
    path.write_bytes(gzip.compress(data) if compress else data)
    assert np.array_equal(read_idx(path), a)


@pytest.mark.parametrize("data, message", [
    (b"", "only 0 bytes"),
    (b"\x01\x02\x08\x01" + b"\x00" * 8, "bad magic"),
    (b"\x00\x00\x08\x09", "9 dimensions"),
    (idx_bytes(np.zeros((2, 2)))[:-1], "size mismatch"),
    (idx_bytes(np.zeros((2, 2))) + b"\x00", "size mismatch"),
    (b"\x1f\x8b\x08\x00garbage", "corrupt gzip"),
])
def test_idx_rejects_corrupt_files_naming_them(tmp_path, data, message):
    path = tmp_path / "bad.idx"
    path.write_bytes(data)
    with pytest.raises(OculaError, match=message) as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_digits_uses_the_documents_split():
    train, test = registry.load("digits", "train"), registry.load("digits", "test")
    assert (len(train), len(test)) == (1203, 594)
    assert train.value_max == 16 and train.images.shape[1:] == (8, 8)


def test_missing_dataset_dir_is_one_clear_error(tmp_path):
    with pytest.raises(OculaError, match="data directory not found"):
        registry.load("mnist", "train", tmp_path / "nowhere")


def test_unknown_dataset_and_split():
    with pytest.raises(OculaError, match="unknown dataset"):
        registry.get_info("cifar-1000")
    with pytest.raises(OculaError, match="splits"):
        registry.load("digits", "validation")


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_real_idx_datasets_and_checksums(datasets, name):
    train = registry.load(name, "train", datasets)
    test = registry.load(name, "test", datasets)
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert np.bincount(test.labels).tolist() and test.labels.max() == 9
    assert all(registry.verify(name, datasets).values())
