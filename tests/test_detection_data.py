"""Detection data: VOC / COCO / YOLO readers and writers, the loader policy, check, drawing, and the real BCCD."""

import json
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from conftest import DATASETS, need
from ocula.data import registry, voc, yolo
from ocula.data.boxes import box_iou_np as box_iou
from ocula.data.detection import BCCD_CLASSES, DetectionDataset, Record, check, convert, load_detection, write
from ocula.data.draw import draw_boxes, draw_samples
from ocula.errors import OculaError

# (name, VOC 1-based xmin ymin xmax ymax, difficult)
OBJECTS = {
    "a": [("cat", (1, 1, 64, 48), 0), ("dog", (10, 5, 30, 40), 1)],
    "b": [("dog", (33, 2, 60, 20), 0)],
    "c": [],  # a negative image
}


def voc_xml(filename, objects, size=(64, 48)):
    objs = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b, d in objects)
    w, h = size
    return (f"<annotation><filename>{filename}</filename><size><width>{w}</width><height>{h}</height>"
            f"<depth>3</depth></size>{objs}</annotation>")


def make_voc(root, objects=OBJECTS, size=(64, 48), image_size=None):
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for stem, objs in objects.items():
        Image.new("RGB", image_size or size, (120, 60, 200)).save(root / "JPEGImages" / f"{stem}.png")
        (root / "Annotations" / f"{stem}.xml").write_text(voc_xml(f"{stem}.png", objs, size))
    return root


def boxes_by_image(ds):
    return {ds.records[i].image.stem: (ds.target(i)["boxes"].round(3).tolist(), ds.target(i)["labels"].tolist())
            for i in range(len(ds))}


# --- formats ---------------------------------------------------------------------------------------------------

def test_voc_one_based_coordinates_and_flags(tmp_path):
    ds = load_detection(make_voc(tmp_path / "voc"), "voc")
    assert ds.classes == ("cat", "dog")  # sorted names found
    i = [r.image.stem for r in ds.records].index("a")
    image, target = ds[i]
    assert image.shape == (48, 64, 3) and image.dtype == np.uint8
    assert target["boxes"].dtype == np.float32 and target["labels"].dtype == np.int64
    np.testing.assert_array_equal(target["boxes"], [[0, 0, 64, 48], [9, 4, 30, 40]])  # (1, 1, W, H) = whole image
    assert target["labels"].tolist() == [0, 1] and target["difficult"].tolist() == [False, True]


def test_round_trip_voc_coco_yolo_voc(tmp_path):
    objects = {**OBJECTS, "d": [("cat", (523, 1, 640, 480), 0)]}  # BCCD-sized: YOLO's rounding exceeds the edge
    src = make_voc(tmp_path / "voc", objects, size=(640, 480))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean round trip drops and clips nothing
        convert(src, "voc", tmp_path / "coco", "coco", classes=["dog", "cat"])
        convert(tmp_path / "coco", "coco", tmp_path / "yolo", "yolo")
        convert(tmp_path / "yolo", "yolo", tmp_path / "voc2", "voc")
    first = load_detection(src, "voc", classes=["dog", "cat"])
    again = load_detection(tmp_path / "voc2", "voc", classes=["dog", "cat"])
    assert boxes_by_image(again) == boxes_by_image(first)  # integer VOC boxes survive YOLO's normalisation exactly
    assert yolo.read_classes(tmp_path / "yolo") == ["dog", "cat"]
    assert (tmp_path / "voc2" / "Annotations" / "c.xml").is_file()  # the negative image travels too
    # The COCO file is readable by the reference implementation.
    from pycocotools.coco import COCO

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        api = COCO(str(tmp_path / "coco" / "annotations.json"))
    assert len(api.getImgIds()) == 4 and len(api.getAnnIds()) == 4
    assert [c["name"] for c in api.loadCats(api.getCatIds())] == ["dog", "cat"]


def test_splits_round_trip_through_every_format(tmp_path):
    src = make_voc(tmp_path / "voc")
    (src / "ImageSets" / "Main").mkdir(parents=True)
    (src / "ImageSets" / "Main" / "train.txt").write_text("a\nc\n")
    ds = load_detection(src, "voc", split="train")
    assert [r.image.stem for r in ds.records] == ["a", "c"]
    for fmt in ("voc", "coco", "yolo"):
        write(ds, tmp_path / fmt, fmt, split="train")
        back = load_detection(tmp_path / fmt, fmt, split="train", classes=ds.classes)
        assert boxes_by_image(back) == boxes_by_image(ds)
    assert "train: images/train" in (tmp_path / "yolo" / "data.yaml").read_text()
    with pytest.raises(OculaError, match="no split 'val'; known: train"):
        load_detection(src, "voc", split="val")


def test_yaml_names_forms(tmp_path):
    forms = {"flow": "nc: 2\nnames: ['red cell', \"WBC\"]\n",
             "block": "names:\n  - red cell\n  - WBC\ntrain: images\n",
             "mapping": "path: x\nnames:\n  0: red cell\n  1: WBC # white\n"}
    for key, text in forms.items():
        (tmp_path / f"{key}.yaml").write_text(text)
        assert yolo.yaml_names(tmp_path / f"{key}.yaml") == ["red cell", "WBC"], key


def test_convert_refuses_output_inside_source_and_unknown_format(tmp_path):
    src = make_voc(tmp_path / "voc")
    with pytest.raises(OculaError, match="outside the source folder"):
        convert(src, "voc", src / "out", "coco")
    with pytest.raises(OculaError, match="unknown detection format 'kitti'"):
        convert(src, "voc", tmp_path / "out", "kitti")


# --- loader policy and check -----------------------------------------------------------------------------------

def test_loader_policy_and_check(tmp_path):
    objects = {
        "zero": [("cat", (20, 20, 20, 20), 0), ("cat", (5, 5, 30, 30), 0)],  # a click without a drag
        "out": [("dog", (-9, 10, 80, 40), 0)],  # leaves the 64x48 image
        "dup": [("cat", (10, 10, 40, 40), 0), ("cat", (11, 11, 40, 40), 0), ("dog", (10, 10, 40, 40), 0)],
        "none": [],
        "bird": [("bird", (5, 5, 20, 20), 0)],
    }
    root = make_voc(tmp_path / "voc", objects)
    (root / "JPEGImages" / "none.png").unlink()
    Image.new("RGB", (32, 32)).save(root / "JPEGImages" / "bird.png")  # annotation says 64x48
    with pytest.warns(UserWarning) as caught:
        ds = load_detection(root, "voc", classes=["cat", "dog"])
    assert len(caught) == 1  # one summary per dataset
    message = str(caught[0].message)
    assert "dropped 2" in message and "zero.xml" in message and "bird.xml" in message and "clipped 1" in message
    stems = [r.image.stem for r in ds.records]
    assert len(ds) == 5  # the image without objects is kept
    assert ds.target(stems.index("zero"))["boxes"].tolist() == [[4, 4, 30, 30]]
    assert ds.target(stems.index("out"))["boxes"].tolist() == [[0, 9, 64, 40]]
    assert ds.records[stems.index("out")].boxes.tolist() == [[-10, 9, 80, 40]]  # raw records stay as in the file

    report = check(ds)
    assert report.counts() == {"zero_area": 1, "outside_image": 1, "near_duplicate": 1, "no_objects": 1,
                               "missing_image": 1, "unknown_class": 1, "size_mismatch": 1}
    kinds = {i.kind: i for i in report.issues}
    assert kinds["zero_area"].image == "zero.png"
    assert "'bird'" in kinds["unknown_class"].detail
    assert "64x48" in kinds["size_mismatch"].detail and "32x32" in kinds["size_mismatch"].detail
    assert report.boxes_per_class == {"cat": 4, "dog": 2}
    assert "zero_area 1" in report.text()
    with pytest.raises(OculaError, match="image is 32x32 but its annotation bird.xml says 64x48"):
        ds[stems.index("bird")]


def test_box_iou():
    a = np.array([[0, 0, 10, 10], [0, 0, 1, 1]], np.float32)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 20, 20]], np.float32)
    np.testing.assert_allclose(box_iou(a, b), [[1, 50 / 150, 0], [0.01, 0, 0]])


def test_dataset_subset_and_record_shapes():
    r = Record(image="x.png", width=10, height=10, boxes=[], labels=[], difficult=None, truncated=None)
    assert r.boxes.shape == (0, 4) and r.labels.dtype == np.int64 and r.difficult.dtype == bool
    ds = DetectionDataset([r, r, r], ["a"], name="t")
    assert len(ds.subset([0, 2])) == 2 and ds.subset([1]).classes == ("a",)


# --- broken input ----------------------------------------------------------------------------------------------

BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<annotation><filename>&lol9;</filename></annotation>
"""


@pytest.mark.parametrize("text, message", [
    ("", "empty annotation file"),
    ("<annotation><object>\n<name>cat</name>\n</annotation>", r"malformed XML at line 3, column 3"),
    ("<labels/>", "root element is <labels>, expected <annotation>"),
    (voc_xml("a.png", [("cat", (1, 1, 5, 5), 0)]).replace("<bndbox>", "<box>").replace("</bndbox>", "</box>"),
     r"object 1 \(cat\): missing <bndbox>"),
    (voc_xml("a.png", [("cat", (1, 1, 5, 5), 0)]).replace("<ymax>5</ymax>", ""), r"object 1 \(cat\): missing <ymax>"),
    (voc_xml("a.png", [("", (1, 1, 5, 5), 0)]), "object 1: missing <name>"),
    (voc_xml("a.png", [("cat", (1, "1O", 5, 5), 0)]), r"<ymin> is '1O', not a number"),
    (voc_xml("a.png", [("cat", (1, 1, "nan", 5), 0)]), r"<xmax> is 'nan', not a finite number"),
    (BILLION_LAUGHS, "declares entities; refused"),
])
def test_broken_voc(tmp_path, text, message):
    root = make_voc(tmp_path / "voc", {"a": []})
    (root / "Annotations" / "a.xml").write_text(text)
    start = time.perf_counter()
    with pytest.raises(OculaError, match=message) as e:
        load_detection(root, "voc")
    assert str(e.value).startswith(str(root / "Annotations" / "a.xml")) and "\n" not in str(e.value)
    assert time.perf_counter() - start < 1  # nothing was expanded


@pytest.mark.parametrize("payload, message", [
    ("", "empty file"),
    ('{"images": [,]}', "not valid JSON at line 1, column 13"),
    ("[]", "the top level is a list, not an object"),
    ('{"type": "instances"}', "no 'images' list"),
    ({"images": [{"id": 1, "file_name": "a.png", "width": 64}], "annotations": [], "categories": []},
     r"images\[0\]: missing 'height'"),
    ({"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}],
      "annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0, "5", 5]}], "categories": []},
     r"annotations\[0\]: 'bbox' is \[0, 0, '5', 5\], expected 4 finite numbers"),
    ({"images": [], "annotations": [{"image_id": 7, "category_id": 1, "bbox": [0, 0, 5, 5]}], "categories": []},
     r"annotations\[0\]: image_id 7 is not in 'images'"),
])
def test_broken_coco(tmp_path, payload, message):
    path = tmp_path / "annotations.json"
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    with pytest.raises(OculaError, match=message) as e:
        load_detection(path, "coco")
    assert str(e.value).startswith(str(path))


@pytest.mark.parametrize("lines, message", [
    ("0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2\n", "line 2: 4 fields, expected 5"),
    ("0 0.5 0.5 0.2 0.2 0.9\n", "line 1: 6 fields, expected 5"),
    ("\n0 0.5 1.2 0.2 0.2\n", r"line 2: value 1.2 is outside \[0, 1\]"),
    ("0 0.5 0.5 -0.1 0.2\n", r"line 1: value -0.1 is outside \[0, 1\]"),
    ("0 0.5 0.5 0.2 abc\n", "line 1: '0 0.5 0.5 0.2 abc' is not all numbers"),
    ("1.5 0.5 0.5 0.2 0.2\n", "line 1: class '1.5' is not a class index"),
])
def test_broken_yolo(tmp_path, lines, message):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "images" / "a.png")
    (tmp_path / "labels" / "a.txt").write_text(lines)
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    with pytest.raises(OculaError, match=message) as e:
        load_detection(tmp_path, "yolo")
    assert str(e.value).startswith(str(tmp_path / "labels" / "a.txt"))


def test_yolo_without_class_names_and_unknown_index(tmp_path):
    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("5 0.5 0.5 0.5 0.5\n")
    with pytest.raises(OculaError, match="no class names"):
        load_detection(tmp_path, "yolo")
    with pytest.warns(UserWarning, match="dropped 1"):
        ds = load_detection(tmp_path, "yolo", classes=["cat"])
    assert [i.kind for i in check(ds).issues] == ["unknown_class"]


# --- drawing ---------------------------------------------------------------------------------------------------

def test_draw_boxes_and_samples(tmp_path):
    image = np.full((48, 64, 3), 128, np.uint8)
    out = draw_boxes(image, [[10, 20, 50, 40]], [1], scores=[0.9], classes=["cat", "dog"])
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (image == 128).all()  # the input is not drawn on
    assert tuple(out[30, 10]) == (255, 210, 0)  # left edge in class 1's colour
    ds = load_detection(make_voc(tmp_path / "voc"), "voc")
    sheet = draw_samples(ds, n=3, cols=2, tile=32)
    assert sheet.shape == (2 * 24 + 4, 2 * 32 + 4, 3)


# --- real BCCD -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bccd_all():
    root = need(DATASETS / "bccd" / "BCCD")
    with pytest.warns(UserWarning, match="dropped 2 .*BloodImage_00338.xml, BloodImage_00343.xml"):
        return voc.read(root, classes=BCCD_CLASSES, name="bccd/all")


def test_bccd_registry_and_splits(datasets):
    info = registry.get_info("bccd")
    assert (info.task, info.folder, info.license.split()[0]) == ("detect", "bccd/BCCD", "MIT")
    assert info.splits == ("train", "val", "test", "trainval")
    assert "https://github.com/Shenggan/BCCD_Dataset" in info.urls.values()
    sizes = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for split in info.splits:
            ds = registry.load("bccd", split, data_dir=datasets)
            assert ds.classes == ("WBC", "RBC", "Platelets")
            sizes[split] = len(ds)
    assert sizes == {"train": 205, "val": 87, "test": 72, "trainval": 292}
    image, target = ds[0]
    assert image.shape == (480, 640, 3) and len(target["boxes"]) == len(target["labels"]) > 0


def test_bccd_counts_and_check(bccd_all):
    assert len(bccd_all) == 364
    report = check(bccd_all)
    assert report.boxes_per_class == {"WBC": 372, "RBC": 4155, "Platelets": 361}
    zero = report.of_kind("zero_area")
    assert [i.image for i in zero] == ["BloodImage_00338.jpg", "BloodImage_00343.jpg"]
    assert all(i.detail.startswith("RBC") for i in zero)
    dup = report.of_kind("near_duplicate")
    assert [i.image[11:16] for i in dup] == ["00013", "00020", "00100", "00104", "00251", "00284", "00331", "00403"]
    assert all(i.detail.startswith("RBC") for i in dup)
    assert report.counts() == {"zero_area": 2, "near_duplicate": 8}  # nothing outside, no size mismatch
    assert [n[11:16] for n in report.images_without["WBC"]] == ["00133", "00135", "00171", "00178", "00228", "00327"]
    assert len(report.images_without["RBC"]) == 15
    # After the loader policy: the two zero-area boxes are gone, nothing else is.
    assert sum(len(bccd_all.target(i)["boxes"]) for i in range(len(bccd_all))) == 4888 - 2
