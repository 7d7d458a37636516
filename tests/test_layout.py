"""Layout detection, splits and opening for registered names and tiny user folders of every supported layout;
real-data checks skip when ../shared is absent."""

import json

import numpy as np
import pytest
from PIL import Image

from ocula.data.classification import ImageSet
from ocula.data.detection import DetectionDataset
from ocula.data.layout import folder_layout, open_dataset, resolve_task, splits
from ocula.data.segmentation import MaskDataset
from ocula.errors import OculaError


def save(array, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)
    return path


def rgb(h=6, w=8, value=90):
    return np.full((h, w, 3), value, np.uint8)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def image_folder(tmp_path):
    for split, classes in (("train", ("cat", "dog")), ("test", ("dog",))):
        for c in classes:
            save(rgb(), tmp_path / split / c / "0.png")
    return tmp_path


def mask_folder(root, split=""):
    base = root / split
    for stem in ("a", "b"):
        save(rgb(), base / "images" / f"{stem}.png")
        save(np.zeros((6, 8)), base / "masks" / f"{stem}.png")
    write(root / "classes.txt", "bg\ncell\n")  # YOLO's class file name: the masks must still win
    return root


VOC_XML = """<annotation><filename>{name}.jpg</filename><size><width>8</width><height>6</height></size>
<object><name>{cls}</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>4</xmax><ymax>5</ymax></bndbox></object>
</annotation>"""


@pytest.fixture
def voc_folder(tmp_path):
    for name, cls in (("im1", "RBC"), ("im2", "WBC")):
        save(rgb(), tmp_path / "JPEGImages" / f"{name}.jpg")
        write(tmp_path / "Annotations" / f"{name}.xml", VOC_XML.format(name=name, cls=cls))
    sets = tmp_path / "ImageSets" / "Main"
    write(sets / "train.txt", "im1\n")
    write(sets / "val.txt", "im2\n")
    write(sets / "RBC_train.txt", "im1  1\n")  # VOC's per-class lists are not splits
    return tmp_path


@pytest.fixture
def yolo_folder(tmp_path):
    for split, stems in (("train", ("a", "b")), ("val", ("c",))):
        for stem in stems:
            save(rgb(), tmp_path / "images" / split / f"{stem}.jpg")
            write(tmp_path / "labels" / split / f"{stem}.txt", "1 0.5 0.5 0.5 0.5\n")
    write(tmp_path / "data.yaml", "train: images/train\nval: images/val\nnames: [RBC, WBC]\n")
    return tmp_path


def coco(file_names):
    return {"images": [{"id": i, "file_name": f, "width": 8, "height": 6} for i, f in enumerate(file_names)],
            "annotations": [{"id": 1, "image_id": 0, "category_id": 3, "bbox": [1, 1, 4, 3]}],
            "categories": [{"id": 3, "name": "WBC"}]}


@pytest.fixture
def coco_folder(tmp_path):
    for f in ("a.jpg", "b.jpg", "c.jpg"):
        save(rgb(), tmp_path / "images" / f)
    write(tmp_path / "train.json", json.dumps(coco(["a.jpg", "b.jpg"])))
    write(tmp_path / "val.json", json.dumps(coco(["c.jpg"])))
    return tmp_path


# --- folders ----------------------------------------------------------------------------------------------------

def test_image_folder(image_folder):
    assert folder_layout(image_folder) == ("classify", "image-folder")
    assert resolve_task(image_folder) == "classify" and splits(image_folder) == ("train", "test")
    test = open_dataset(image_folder, "test")
    assert isinstance(test, ImageSet) and test.classes == ["cat", "dog"] and test.labels.tolist() == [1]


@pytest.mark.parametrize("split", ["", "train"])
def test_mask_folder_flat_and_split(tmp_path, split):
    mask_folder(tmp_path, split)
    assert folder_layout(tmp_path) == ("segment", "mask-folder")
    expected = ("train",) if split else ("all",)
    assert splits(tmp_path) == expected
    data = open_dataset(tmp_path, expected[0])
    assert isinstance(data, MaskDataset) and len(data) == 2 and data.classes == ("bg", "cell")
    with pytest.raises(OculaError, match=f"no split 'val'; splits here: {expected[0]}$"):
        open_dataset(tmp_path, "val")  # load_mask_folder alone would silently read the whole folder


def test_voc_folder(voc_folder):
    assert folder_layout(voc_folder) == ("detect", "voc")
    assert splits(voc_folder) == ("train", "val")
    val = open_dataset(voc_folder, "val")
    assert isinstance(val, DetectionDataset) and [r.image.name for r in val.records] == ["im2.jpg"]
    assert val.classes == ("WBC",)


def test_flat_voc_folder_has_split_all(tmp_path):
    save(rgb(), tmp_path / "im1.jpg")
    write(tmp_path / "im1.xml", VOC_XML.format(name="im1", cls="RBC"))
    assert folder_layout(tmp_path) == ("detect", "voc") and splits(tmp_path) == ("all",)
    assert len(open_dataset(tmp_path, "all")) == 1


def test_yolo_folder(yolo_folder):
    assert folder_layout(yolo_folder) == ("detect", "yolo") and splits(yolo_folder) == ("train", "val")
    train = open_dataset(yolo_folder, "train")
    assert len(train) == 2 and train.classes == ("RBC", "WBC") and train.target(0)["labels"].tolist() == [1]


def test_yolo_by_class_file_alone(tmp_path):
    save(rgb(), tmp_path / "a.jpg")
    write(tmp_path / "a.txt", "0 0.5 0.5 0.5 0.5\n")
    write(tmp_path / "obj.names", "RBC\n")
    assert folder_layout(tmp_path) == ("detect", "yolo") and splits(tmp_path) == ("all",)
    assert len(open_dataset(tmp_path, "all")) == 1


def test_split_first_yolo_is_not_an_image_folder(tmp_path):
    """A Roboflow-style export: train/images holds images, so it must not read as a class named 'images'."""
    for split in ("train", "valid"):
        save(rgb(), tmp_path / split / "images" / "a.jpg")
        write(tmp_path / split / "labels" / "a.txt", "0 0.5 0.5 0.5 0.5\n")
    write(tmp_path / "data.yaml", "names: ['cell']\n")
    assert folder_layout(tmp_path) == ("detect", "yolo") and splits(tmp_path) == ("train", "valid")
    valid = open_dataset(tmp_path, "valid")
    assert len(valid) == 1 and valid.classes == ("cell",)


def test_coco_folder_and_file(coco_folder):
    assert folder_layout(coco_folder) == ("detect", "coco") and splits(coco_folder) == ("train", "val")
    train = open_dataset(coco_folder, "train")
    assert len(train) == 2 and train.classes == ("WBC",) and len(train.target(0)["boxes"]) == 1
    single = coco_folder / "train.json"
    assert folder_layout(single) == ("detect", "coco") and splits(single) == ("all",)
    assert len(open_dataset(single, "all")) == 2
    (coco_folder / "val.json").rename(coco_folder / "annotations.json")
    assert splits(coco_folder) == ("train", "all")
    assert len(open_dataset(coco_folder, "all")) == 1


# --- errors -----------------------------------------------------------------------------------------------------

def test_unknown_layout_names_folder_and_layouts(tmp_path):
    save(rgb(), tmp_path / "photos" / "a.jpg")
    with pytest.raises(OculaError) as e:
        folder_layout(tmp_path)
    message = str(e.value)
    assert message.startswith(f"{tmp_path}: no known dataset layout") and "\n" not in message
    assert all(k in message for k in ("train/<class>", "images/ + masks/", "Annotations/", "COCO", "YOLO"))
    with pytest.raises(OculaError, match="not a folder or COCO .json file"):
        folder_layout(save(rgb(), tmp_path / "x.png"))


def test_neither_registered_nor_a_folder(tmp_path):
    with pytest.raises(OculaError, match=r"'nowhere' is neither a registered dataset \(.*bccd.*mnist.*\) nor"):
        resolve_task("nowhere")
    with pytest.raises(OculaError, match="neither a registered dataset"):
        open_dataset(str(tmp_path / "missing"), "train")


def test_missing_split_lists_the_existing_ones(image_folder):
    with pytest.raises(OculaError, match=r"no split 'val'; splits here: train, test$"):
        open_dataset(image_folder, "val")
    with pytest.raises(OculaError, match="has splits train, test, not 'val'"):
        open_dataset("mnist", "val")


# --- registered names -------------------------------------------------------------------------------------------

def test_registered_names():
    assert resolve_task("digits") == "classify" and resolve_task("bccd") == "detect"
    assert resolve_task("isbi2012") == "segment"
    assert splits("bccd") == ("train", "val", "test", "trainval") and splits("cifar10") == ("train", "test")
    test = open_dataset("digits", "test")
    assert isinstance(test, ImageSet) and len(test) == 594


def test_existing_path_wins_over_registered_name(tmp_path, monkeypatch):
    save(rgb(), tmp_path / "bccd" / "train" / "cell" / "0.png")
    monkeypatch.chdir(tmp_path)
    assert resolve_task("bccd") == "classify" and splits("bccd") == ("train",)


def test_real_layouts(datasets):
    assert folder_layout(datasets / "cifar10") == ("classify", "image-folder")
    assert folder_layout(datasets / "bccd" / "BCCD") == ("detect", "voc")
    assert splits(datasets / "bccd" / "BCCD") == ("train", "trainval", "val", "test")
    with pytest.warns(UserWarning, match="BloodImage_00338"):  # BCCD's known zero-area box
        assert len(open_dataset("bccd", "val", datasets)) == 87
