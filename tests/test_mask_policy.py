"""The mask-value policy: stray grey values near a class value are snapped with one warning per file that counts
them, values far from every class are an error naming the file, and strict mode refuses any inexact value."""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from ocula.data.segmentation import MASK_POLICY, load_mask_folder, load_zheng
from ocula.errors import OculaError


@pytest.fixture(autouse=True)
def lenient(monkeypatch):
    monkeypatch.setattr(MASK_POLICY, "strict", False)  # restored after each test, whatever a test sets


def three_class_mask():
    mask = np.zeros((12, 12), np.uint8)
    mask[2:10, 2:10] = 128
    mask[4:8, 4:8] = 255
    return mask


@pytest.fixture
def zheng(tmp_path):
    folder = tmp_path / "Dataset 1"
    folder.mkdir()
    for n in (1, 2):
        Image.fromarray(np.full((12, 12, 3), 200, np.uint8)).save(folder / f"{n:03d}.bmp")
        Image.fromarray(three_class_mask()).save(folder / f"{n:03d}.png")
    return tmp_path


def write_mask(path, mask):
    Image.fromarray(mask).save(path)
    return path


def test_stray_values_are_snapped_with_one_warning_per_file(zheng):
    mask = three_class_mask()
    mask[2, 2:5] = (120, 135, 130)  # anti-aliased cytoplasm edge
    mask[0, 0] = 20  # near background
    mask[5, 5] = 250  # near nucleus
    write_mask(zheng / "Dataset 1" / "001.png", mask)
    ds = load_zheng(zheng)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        snapped = ds[0][1]
        clean = ds[1][1]
    assert np.array_equal(snapped, clean)  # every stray pixel went to the class it was near
    assert len(caught) == 1  # the clean file is silent, the stray one warns once
    message = str(caught[0].message)
    assert "001.png" in message and "5 mask pixels" in message and "[20, 120, 130, 135, 250]" in message


def test_values_far_from_every_class_are_an_error_naming_the_file(zheng):
    mask = three_class_mask()
    mask[0, :3] = 64  # halfway between background and cytoplasm: no class it could belong to
    write_mask(zheng / "Dataset 1" / "002.png", mask)
    with pytest.raises(OculaError, match=r"002.png: unexpected mask values \[64\]; expected only \[0, 128, 255\]"):
        load_zheng(zheng)[1]


def test_strict_mode_refuses_any_inexact_value(zheng):
    mask = three_class_mask()
    mask[2, 2] = 127
    write_mask(zheng / "Dataset 1" / "001.png", mask)
    MASK_POLICY.strict = True
    with pytest.raises(OculaError, match=r"001.png: unexpected mask values \[127\].*strict"):
        load_zheng(zheng)[0]
    load_zheng(zheng)[1]  # exact masks still read


def binary_folder(tmp_path, mask):
    (tmp_path / "images").mkdir(parents=True)
    (tmp_path / "masks").mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{name}.png")
    disc = np.zeros((16, 16), np.uint8)
    disc[4:12, 4:12] = 255
    write_mask(tmp_path / "masks" / "a.png", disc)
    write_mask(tmp_path / "masks" / "b.png", mask(disc.copy()))
    return tmp_path


def test_folder_binary_masks_follow_the_policy(tmp_path):
    def stray(m):
        m[4, 4:8], m[0, 0] = 240, 9
        return m

    ds = load_mask_folder(binary_folder(tmp_path, stray))
    with pytest.warns(UserWarning, match=r"b.png: 5 mask pixels with stray values \[9, 240\]"):
        _, mask = ds[1]
    assert np.array_equal(mask, ds[0][1]) and set(np.unique(mask)) == {0, 1}
    MASK_POLICY.strict = True
    with pytest.raises(OculaError, match="b.png: unexpected mask values"):
        ds[1]


def test_folder_grey_far_from_black_and_white_is_an_error(tmp_path):
    def grey(m):
        m[4, 4] = 128
        return m

    with pytest.raises(OculaError, match=r"b.png: unexpected mask values \[128\]; expected only \[0, 255\]"):
        load_mask_folder(binary_folder(tmp_path, grey))[1]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "ocula", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_strict_masks_refuses_and_the_default_warns_in_one_line(tmp_path):
    def stray(m):
        m[4, 4:8] = 250
        return m

    data = binary_folder(tmp_path / "data", stray)
    common = ("train", data, "--epochs", 1, "--crop", 16, "--crops-per-epoch", 2, "--batch-size", 2,
              "--val-fraction", 0, "--runs-dir", tmp_path / "runs", "--overwrite", "--quiet")
    strict = cli(*common, "--strict-masks")
    assert strict.returncode == 1 and strict.stdout == ""
    assert strict.stderr.strip().splitlines() == [
        f"ocula: error: {data / 'masks' / 'b.png'}: unexpected mask values [250]; expected only [0, 255] "
        "(strict masks)"]
    lenient = cli(*common)
    assert lenient.returncode == 0, lenient.stderr
    assert f"ocula: warning: {data / 'masks' / 'b.png'}: 4 mask pixels with stray values [250]" in lenient.stderr
