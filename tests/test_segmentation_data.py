"""Mask datasets (readers, broken pairs, folds, crops, drawing) and paired augmentation, on tiny synthetic files;
real-data checks skip when ../shared is absent."""

import numpy as np
import pytest
from PIL import Image
from skimage.segmentation import find_boundaries

from ocula.data import registry
from ocula.data.paired_transforms import (Affine, BackgroundShift, ColorJitter, Compose, HFlip, Lamp, RandomConv,
                                          RedCells, Rot90, StainJitter, VFlip, blood_smear_augment)
from ocula.data.segmentation import (Augmented, RandomCrops, folds, kfold_indices, load_isbi2012,
                                     load_mask_folder, load_sigtuple, load_zheng, mask_grid, overlay)
from ocula.errors import OculaError


def rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def disc(h, w, value=255, r=None):
    yy, xx = np.mgrid[:h, :w]
    r = r or min(h, w) // 3
    return np.where((yy - h / 2) ** 2 + (xx - w / 2) ** 2 < r * r, value, 0).astype(np.uint8)


def save(array, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)
    return path


# --- SigTuple ---------------------------------------------------------------------------------------------------

@pytest.fixture
def sigtuple(tmp_path):
    train = tmp_path / "SigTuple_data" / "Train_Data"
    for n in range(10):
        save(rgb(16, 16, n), train / f"train-{n}.jpg")
        save(disc(16, 16), train / f"train-{n}-mask.jpg", quality=75)
    save(rgb(30, 40), train / "ABC123.jpg")
    save(disc(30, 40), train / "ABC123-mask.jpg")
    for name in ("X1", "X2"):
        save(rgb(20, 24), tmp_path / "SigTuple_data" / "Test_Data" / f"{name}.jpg")
    return tmp_path


def test_sigtuple_splits(sigtuple):
    train = load_sigtuple(sigtuple, "train")
    assert len(train) == 11 and train.has_masks and train.classes == ("background", "wbc")
    assert [p.name for p, _ in train.files][:3] == ["train-0.jpg", "train-1.jpg", "train-2.jpg"]  # numeric order
    assert len(load_sigtuple(sigtuple, "patches")) == 10
    large = load_sigtuple(sigtuple, "large")
    assert [p.name for p, _ in large.files] == ["ABC123.jpg"] and large[0][1].shape == (30, 40)
    test = load_sigtuple(sigtuple / "SigTuple_data", "test")  # the inner folder works as root too
    assert len(test) == 2 and not test.has_masks and test[0][1] is None and test[0][0].shape == (20, 24, 3)


def test_jpeg_mask_is_thresholded(sigtuple):
    image, mask = load_sigtuple(sigtuple, "patches")[0]
    assert image.dtype == np.uint8 and image.shape == (16, 16, 3)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    assert (mask == disc(16, 16) // 255).mean() > 0.95  # JPEG smears edges only
    grey = np.array([[100, 120, 135, 200]], dtype=np.uint8).repeat(16, 0).repeat(4, 1)
    save(grey, sigtuple / "SigTuple_data" / "Train_Data" / "train-0-mask.jpg", quality=100)
    assert load_sigtuple(sigtuple, "patches")[0][1][8, 2::4].tolist() == [0, 0, 1, 1]


def test_sigtuple_folds_follow_protocol(sigtuple):
    ds = load_sigtuple(sigtuple, "train")
    fs = folds(ds)
    assert len(fs) == 5
    for k, (tr, va) in enumerate(fs):
        assert [ds.files[i][0].stem for i in va] == [f"train-{k}", f"train-{k + 5}"]
        assert 10 in tr and set(tr) | set(va) == set(range(11)) and not set(tr) & set(va)  # large always trains
    sub = ds.subset(fs[0][1])
    assert len(sub) == 2 and sub.classes == ds.classes and sub.metadata[0]["fold_index"] == 0


def test_generic_kfold_covers_each_index_once():
    fs = kfold_indices(23, 5, seed=1)
    assert sorted(np.concatenate([va for _, va in fs]).tolist()) == list(range(23))
    assert all(len(tr) + len(va) == 23 for tr, va in fs)
    assert [va.tolist() for _, va in fs] == [va.tolist() for _, va in kfold_indices(23, 5, seed=1)]
    with pytest.raises(OculaError):
        kfold_indices(3, 5)


def test_size_mismatch_names_both_files(sigtuple):
    train = sigtuple / "SigTuple_data" / "Train_Data"
    save(disc(17, 16), train / "train-3-mask.jpg")
    ds = load_sigtuple(sigtuple, "patches")
    with pytest.raises(OculaError, match="train-3-mask.jpg.*16x17.*train-3.jpg"):
        ds[3]
    with pytest.raises(OculaError, match="train-3"):
        ds.check()


def test_missing_mask_is_named_at_load(sigtuple):
    (sigtuple / "SigTuple_data" / "Train_Data" / "train-7-mask.jpg").unlink()
    with pytest.raises(OculaError, match="train-7.jpg: no mask.*train-7-mask.jpg"):
        load_sigtuple(sigtuple, "train")
    assert len(load_sigtuple(sigtuple, "test")) == 2  # the unmasked split does not care


def test_corrupt_jpeg_mask(sigtuple):
    path = sigtuple / "SigTuple_data" / "Train_Data" / "train-2-mask.jpg"
    path.write_bytes(path.read_bytes()[:200])
    ds = load_sigtuple(sigtuple, "patches")
    ds[1]
    with pytest.raises(OculaError, match="train-2-mask.jpg"):
        ds[2]


# --- Zheng 2018 -------------------------------------------------------------------------------------------------

@pytest.fixture
def zheng(tmp_path):
    folder = tmp_path / "Dataset 1"
    for n, (h, w) in enumerate([(12, 12), (9, 11), (10, 10)], start=1):
        save(rgb(h, w, n), folder / f"{n:03d}.bmp")
        save(np.maximum(disc(h, w, 128, r=4), disc(h, w, 255, r=2)), folder / f"{n:03d}.png")
    (tmp_path / "Class Labels of Dataset 1.csv").write_text("image ID,class label\n1,2\n2,5\n")
    return tmp_path


def test_zheng_reader(zheng):
    ds = load_zheng(zheng, "all")
    assert len(ds) == 3 and ds.classes == ("background", "cytoplasm", "nucleus")
    image, mask = ds[1]
    assert image.shape == (9, 11, 3) and mask.shape == (9, 11) and set(np.unique(mask)) == {0, 1, 2}
    assert [m["wbc_type"] for m in ds.metadata] == ["lymphocyte", "basophil", None]
    assert ds.metadata[0]["wbc_label"] == 2


def test_zheng_unexpected_mask_value(zheng):
    save(np.full((12, 12), 64, np.uint8), zheng / "Dataset 1" / "001.png")
    with pytest.raises(OculaError, match=r"001.png: unexpected mask values \[64\]"):
        load_zheng(zheng, "all")[0]


def test_zheng_bad_csv(zheng):
    (zheng / "Class Labels of Dataset 1.csv").write_text("image ID,class label\n1,9\n")
    with pytest.raises(OculaError, match="Class Labels of Dataset 1.csv: bad row at line 2"):
        load_zheng(zheng, "all")


# --- ISBI 2012 --------------------------------------------------------------------------------------------------

def test_isbi_reader(tmp_path):
    data = tmp_path / "data" / "membrane"
    for n in (0, 1, 10, 2):
        save(rgb(8, 8, n)[..., 0], data / "train" / "image" / f"{n}.png")
        save(disc(8, 8), data / "train" / "label" / f"{n}.png")
        save(rgb(8, 8, n)[..., 0], data / "test" / f"{n}.png")
    train = load_isbi2012(tmp_path, "train")
    assert [p.stem for p, _ in train.files] == ["0", "1", "2", "10"] and train.classes == ("membrane", "cell")
    image, mask = train[0]
    assert image.shape == (8, 8, 3) and np.array_equal(mask, disc(8, 8) // 255)
    assert not load_isbi2012(tmp_path, "test").has_masks
    (data / "train" / "label" / "10.png").unlink()
    with pytest.raises(OculaError, match="10.png: no mask"):
        load_isbi2012(tmp_path, "train")


# --- generic folder ---------------------------------------------------------------------------------------------

def test_folder_binary_and_palette_masks(tmp_path):
    save(rgb(6, 6), tmp_path / "images" / "a.jpg")
    save(disc(6, 6), tmp_path / "masks" / "a.png")
    save(rgb(5, 7), tmp_path / "images" / "b.png")
    pal = Image.fromarray(np.array([[0, 1, 2, 255, 2, 1, 0]] * 5, np.uint8), "P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [255, 255, 255] * 253)
    pal.save(tmp_path / "masks" / "b.png")
    (tmp_path / "classes.txt").write_text("bg\nred\ngreen\n")
    ds = load_mask_folder(tmp_path)
    assert ds.classes == ("bg", "red", "green")
    assert np.array_equal(ds[0][1], disc(6, 6) // 255)
    assert ds[1][1][0].tolist() == [0, 1, 2, 255, 2, 1, 0]  # palette indices kept, 255 = ignore
    assert not load_mask_folder(tmp_path, masks=False).has_masks


def test_folder_errors(tmp_path):
    save(rgb(6, 6), tmp_path / "train" / "images" / "a.png")
    save(np.full((6, 6), 3, np.uint8), tmp_path / "train" / "masks" / "a.png")
    with pytest.raises(OculaError, match="class index 3 but the dataset has 2 classes"):
        load_mask_folder(tmp_path, "train")[0]
    save(rgb(6, 6), tmp_path / "train" / "images" / "b.png")
    with pytest.raises(OculaError, match="b.png: no mask"):
        load_mask_folder(tmp_path, "train")
    save(disc(6, 6), tmp_path / "train" / "masks" / "b.jpg")
    save(disc(6, 6), tmp_path / "train" / "masks" / "b.bmp")
    with pytest.raises(OculaError, match="two masks share the stem 'b'"):
        load_mask_folder(tmp_path, "train")


def test_registry_entries():
    for name, splits in [("wbc-sigtuple", ("train", "patches", "large", "test")), ("wbc-zheng", ("all",)),
                         ("isbi2012", ("train", "test"))]:
        info = registry.get_info(name)
        assert info.task == "segment" and info.splits == splits and info.license and info.urls
    with pytest.raises(OculaError, match="not 'val'"):
        registry.load("wbc-zheng", "val")


# --- crops, wrappers, drawing -----------------------------------------------------------------------------------

def test_random_crops_pad_and_repeat(sigtuple):
    ds = load_sigtuple(sigtuple, "train")
    crops = RandomCrops(ds, size=24, per_image=2, seed=3, foreground=1.0)
    assert len(crops) == 22
    image, mask = crops[1]  # a 16x16 patch, reflect-padded up to 24
    assert image.shape == (24, 24, 3) and mask.shape == (24, 24)
    assert np.array_equal(image[:16, 16:24], image[:16, 14:6:-1])
    large_crop = crops[21][1]
    assert large_crop.any()  # centred on the foreground
    assert all(np.array_equal(a, b) for a, b in zip(crops[21], RandomCrops(ds, 24, 2, seed=3, foreground=1.0)[21]))
    before = crops[20][0]
    crops.set_epoch(1)
    assert not np.array_equal(before, crops[20][0])
    with pytest.raises(IndexError):
        crops[22]


def test_augmented_wrapper_is_seeded(sigtuple):
    ds = load_sigtuple(sigtuple, "patches")
    a, b = Augmented(ds, blood_smear_augment(), seed=5), Augmented(ds, blood_smear_augment(), seed=5)
    assert all(np.array_equal(x, y) for i in range(4) for x, y in zip(a[i], b[i]))
    assert any(not np.array_equal(a[i][0], Augmented(ds, blood_smear_augment(), seed=6)[i][0]) for i in range(4))


def test_overlay_and_grid(sigtuple):
    image, mask = load_sigtuple(sigtuple, "patches")[0]
    over = overlay(image, mask)
    assert over.dtype == np.uint8 and over.shape == image.shape
    assert np.array_equal(over[mask == 0], image[mask == 0]) and not np.array_equal(over, image)
    grid = mask_grid(load_sigtuple(sigtuple, "train"), n=5, tile=32, cols=2)
    assert grid.dtype == np.uint8 and grid.shape == (3 * 36 - 4, 2 * (66 + 4) - 4, 3)
    assert mask_grid(load_sigtuple(sigtuple, "test"), n=4, tile=16).shape[2] == 3


# --- paired transforms ------------------------------------------------------------------------------------------

def blob_image(h=48, w=40):
    """A smooth image whose thresholded red channel is a mask tied to the pixels."""
    yy, xx = np.mgrid[:h, :w]
    red = 127.5 + 127.5 * np.sin(yy / 5.0) * np.cos(xx / 7.0)
    return np.stack([red, np.full_like(red, 90), 255 - red], axis=2).round().astype(np.uint8)


def derive(image):
    return (image[..., 0] > 127).astype(np.uint8)


@pytest.mark.parametrize("t", [HFlip(p=1), VFlip(p=1), Rot90()])
def test_lossless_geometry_keeps_alignment(t):
    image = blob_image()
    for seed in range(4):
        out, mask = t(image, derive(image), np.random.default_rng(seed))
        assert np.array_equal(mask, derive(out)) and out.flags.c_contiguous and mask.flags.c_contiguous


def test_affine_keeps_alignment_and_labels():
    image = blob_image()
    t = Affine(degrees=25, scale=(0.85, 1.15), translate=0.1, p=1)
    for seed in range(4):
        out, mask = t(image, derive(image) * 2, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 2}  # nearest: no in-between labels
        expected = derive(out)
        wrong = mask // 2 != expected
        # Bilinear vs nearest may differ on the one-pixel edge band, nowhere else; a 1-pixel shift would be far worse.
        assert (wrong & ~find_boundaries(expected, mode="thick")).sum() <= 2
        assert wrong.mean() < 0.6 * (np.roll(mask // 2, 1, axis=0) != expected).mean()
        assert not np.array_equal(out, image)


def test_colour_and_stain_touch_image_only():
    image, mask = blob_image(), derive(blob_image())
    for t in (ColorJitter(0.2, 0.2, 0.2, 0.05, p=1), StainJitter(0.1, 0.05, p=1)):
        out, m = t(image, mask, np.random.default_rng(0))
        assert m is mask and out.shape == image.shape and out.dtype == np.uint8
        assert 0 < np.abs(out.astype(int) - image).mean() < 40
    for t in (ColorJitter(0, 0, 0, 0, p=1), StainJitter(0, 0, p=1)):
        assert np.array_equal(t(image, None, np.random.default_rng(0))[0], image)  # exact round trips


def test_red_cells_darken_only_the_background():
    image = np.full((96, 96, 3), 230, np.uint8)
    mask = np.zeros((96, 96), np.uint8)
    mask[32:64, 32:64] = 2  # a white cell on top of whatever is drawn
    out, m = RedCells(count=12, p=1)(image, mask, np.random.default_rng(0))
    assert m is mask and out.dtype == np.uint8
    assert np.array_equal(out[mask > 0], image[mask > 0])
    darker = (out.astype(int) < image).any(axis=2) & (mask == 0)
    assert 0.05 < darker.mean() < 0.95  # discs, not a wash over the whole background
    assert (out <= image).all()  # light is absorbed, never added
    again, _ = RedCells(count=12, p=1)(image, mask, np.random.default_rng(0))
    assert np.array_equal(out, again)
    assert RedCells(p=1)(image, None, np.random.default_rng(0))[0] is image  # nothing to keep the cells off


def test_background_shift_moves_image_and_mask_together_onto_background_light():
    rng = np.random.default_rng(0)
    image = rng.integers(200, 230, (64, 80, 3)).astype(np.uint8)  # a noisy pale background ...
    mask = np.zeros((64, 80), np.uint8)
    mask[20:40, 30:50] = 2
    image[mask > 0] = (90, 40, 120)  # ... and a dark cell
    out, moved = BackgroundShift(shift=0.5, p=1)(image, mask, np.random.default_rng(3))
    assert out.shape == image.shape and moved.shape == mask.shape and (moved > 0).sum() > 0
    assert (out[moved > 0] == (90, 40, 120)).all() and (moved[(out == (90, 40, 120)).all(axis=2)] == 2).all()
    assert not np.array_equal(moved, mask)  # it moved
    light = np.percentile(image[mask == 0], 99, axis=0).astype(np.uint8)
    fill = ((out == light).all(axis=2) & (moved == 0)).mean()
    assert fill > 0.05  # the uncovered strip holds the background light, labelled background
    full = np.ones_like(mask)
    assert BackgroundShift(p=1)(image, full, np.random.default_rng(0))[0] is image  # no background to fill with
    assert BackgroundShift(p=1)(image, None, np.random.default_rng(0))[0] is image


def test_a_warm_lamp_dims_blue_light_most_and_leaves_the_mask():
    image = np.full((8, 8, 3), 240, np.uint8)
    mask = np.eye(8, dtype=np.uint8)
    warm, kept = Lamp(warmth=(0.5, 0.5), p=1)(image, mask, np.random.default_rng(0))
    assert kept is mask and (warm == warm[0, 0]).all()
    r, g, b = warm[0, 0].astype(int)
    assert r == 240 and 215 < g < 225 and 140 < b < 150  # like Zheng's yellow fields: blue at 0.6 of red
    cold, _ = Lamp(warmth=(-0.2, -0.2), p=1)(image, mask, np.random.default_rng(0))
    assert cold[0, 0, 2] == 255 and cold[0, 0, 0] == 240  # a daylight filter: blue up (here clipped)


def test_random_conv_recolours_a_cell_but_keeps_its_outline():
    mask = (disc(48, 48) > 0).astype(np.uint8)
    image = np.where(mask[..., None] > 0, (90, 40, 120), (230, 220, 200)).astype(np.uint8)
    inside, outside = disc(48, 48, r=10) > 0, disc(48, 48, r=22) == 0  # away from the outline's 3x3 blur
    colours, contrasts = [], []
    for seed in range(20):
        out, kept = RandomConv(p=1)(image, mask, np.random.default_rng(seed))
        assert kept is mask and out.shape == image.shape and out.dtype == np.uint8
        assert out[inside].std(axis=0).max() < 1 and out[outside].std(axis=0).max() < 1  # flat regions stay flat
        colours.append(out[inside].mean(axis=0))
        contrasts.append(np.abs(out[inside].mean(axis=0) - out[outside].mean(axis=0)).max())
    assert np.ptp(colours, axis=0).max() > 60  # the cell takes many colours ...
    assert np.mean(np.array(contrasts) > 10) > 0.8  # ... and mostly stays apart from its background
    twice = [RandomConv(p=1)(image, mask, np.random.default_rng(3))[0] for _ in range(2)]
    assert np.array_equal(*twice)
    assert RandomConv(p=0)(image, mask, np.random.default_rng(0))[0] is image


def test_compose_is_repeatable_and_handles_no_mask():
    image = blob_image(37, 53)  # non-square: quarter turns swap the sides
    aug = blood_smear_augment()
    runs = [aug(image, derive(image), seed) for seed in (1, 1, 2)]
    assert np.array_equal(runs[0][0], runs[1][0]) and np.array_equal(runs[0][1], runs[1][1])
    assert not np.array_equal(runs[0][0], runs[2][0]) or not np.array_equal(runs[0][1], runs[2][1])
    out, none = aug(image, None, 3)
    assert none is None and out.shape in ((37, 53, 3), (53, 37, 3))
    assert "StainJitter" in repr(aug) and isinstance(aug, Compose)


def test_affine_on_greyscale_image():
    out, _ = Affine(p=1)(blob_image()[..., 0], None, np.random.default_rng(0))
    assert out.shape == (48, 40) and out.dtype == np.uint8


# --- real data (skips without ../shared) ------------------------------------------------------------------------

def test_real_sigtuple(datasets):
    root = datasets / "wbc_sigtuple"
    patches, large, test = (load_sigtuple(root, s) for s in ("patches", "large", "test"))
    assert (len(patches), len(large), len(test)) == (164, 5, 61)
    assert len(load_sigtuple(root, "train")) == 169
    image, mask = patches[0]
    assert image.shape == (128, 128, 3) and set(np.unique(mask)) == {0, 1}
    sizes = sorted(Image.open(p).size for p, _ in large.files)
    assert sizes[0] == (344, 366) and (1402, 537) in sizes
    assert [len(v) for _, v in folds(load_sigtuple(root, "train"))] == [33, 33, 33, 33, 32]


def test_real_zheng(datasets):
    ds = load_zheng(datasets / "wbc_zheng2018", "all")
    assert len(ds) == 300 and sum(m["wbc_type"] == "neutrophil" for m in ds.metadata) == 176
    values = set()
    for _, mask_path in ds.files[::10]:
        values |= set(np.unique(np.asarray(Image.open(mask_path))).tolist())
    assert values == {0, 128, 255}
    assert set(np.unique(ds[0][1])) == {0, 1, 2}


def test_real_isbi(datasets):
    train = load_isbi2012(datasets / "isbi2012_em", "train")
    assert len(train) == 30 and len(load_isbi2012(datasets / "isbi2012_em", "test")) == 30
    image, mask = train[0]
    assert image.shape == (512, 512, 3) and set(np.unique(mask)) == {0, 1} and 0.6 < mask.mean() < 0.9
