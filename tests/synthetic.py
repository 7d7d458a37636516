"""Tiny synthetic datasets in the layouts users bring: class folders, images/ + masks/, VOC and YOLO folders.

Each is small enough to train a model on in seconds and structured enough that a trained model must beat chance.
"""

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = np.array([[40, 40, 220], [220, 40, 40], [40, 200, 40]], np.uint8)
BOX_CLASSES = ["WBC", "RBC", "Platelets"]
BOX_SIZE = (128, 160)


def class_folder(root: Path, *, per_class: int = 24, size: int = 16) -> Path:
    """root/{train,test}/{bright,dark,striped}/*.png: RGB images whose class is visible at a glance."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", per_class // 3)):
        for name in ("bright", "dark", "striped"):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                noise = rng.integers(0, 40, (size, size, 3))
                image = {"bright": 200 + noise, "dark": 20 + noise,
                         "striped": np.where((np.arange(size) // 2 % 2)[:, None, None], 220, 30) + noise}[name]
                Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


def smear(rng, h: int, w: int, cells: int = 2):
    """A pale noisy background with purple discs (the 'cells'); mask 0/255."""
    image = (np.full((h, w, 3), 215) + rng.integers(0, 25, (h, w, 3))).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(cells):
        r = int(rng.integers(5, 8))
        cy, cx = rng.integers(r, h - r), rng.integers(r, w - r)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        mask[disc], image[disc] = 255, (125, 45, 150)
    return image, mask


def mask_folder(root: Path, *, n: int = 10, size=(48, 48)) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        image, mask = smear(rng, *size)
        Image.fromarray(image).save(root / "images" / f"s{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"s{i}.png")
    return root


def box_image(seed: int):
    """A dark image with solid squares: one big (class 0), some middle (1) and small (2) ones."""
    rng = np.random.default_rng(seed)
    image = np.full((*BOX_SIZE, 3), 20, np.uint8)
    boxes, labels = [], []
    for label, side, n in ((0, 48, 1), (1, 28, 3), (2, 10, 2)):
        for _ in range(n):
            for _ in range(100):  # rejection-sample a spot that overlaps nothing placed so far
                x, y = rng.integers(2, BOX_SIZE[1] - side - 2), rng.integers(2, BOX_SIZE[0] - side - 2)
                box = [x, y, x + side, y + side]
                if all(box[2] + 2 < b[0] or b[2] + 2 < box[0] or box[3] + 2 < b[1] or b[3] + 2 < box[1]
                       for b in boxes):
                    break
            boxes.append(box)
            labels.append(label)
            image[y:y + side, x:x + side] = COLOURS[label]
    return image, {"boxes": np.array(boxes, np.float32), "labels": np.array(labels, np.int64)}


def detection_folder(root: Path, fmt: str, *, n: int = 6) -> Path:
    """`n` synthetic box images written as a VOC, COCO or YOLO folder by ocula's own writer."""
    from ocula.data.detection import DetectionDataset, Record, write

    source = root.parent / f"{root.name}-images"
    source.mkdir(parents=True)
    records = []
    for i in range(n):
        image, target = box_image(i)
        Image.fromarray(image).save(source / f"smear{i}.png")
        records.append(Record(image=source / f"smear{i}.png", width=BOX_SIZE[1], height=BOX_SIZE[0],
                              boxes=target["boxes"], labels=target["labels"], difficult=None, truncated=None))
    write(DetectionDataset(records, BOX_CLASSES, "synthetic"), root, fmt)
    return root
