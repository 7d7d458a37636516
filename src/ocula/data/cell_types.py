"""White-blood-cell types as a classification dataset (`wbc-zheng-types`): Zheng et al. 2018 Dataset 1's cells, each
cut out around its segmentation mask, labelled with the type the dataset's CSV gives.

Every cell is cropped at one scale (a WINDOW px square centred on the box of its mask, mirrored where it leaves the
image) and resized to CROP px, so cell size stays a cue: lymphocytes are smaller than monocytes. Basophils are left
out: the CSV has one, which cannot be spread over 5 stratified folds. Splits: `all`, and `train` / `test` = the
other folds / fold TEST_FOLD of the seeded stratified 5-fold split (`stratified_folds(labels)`), so
`ocula train wbc-zheng-types` scores one held-out fold; the transfer benchmark runs all five.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ocula.data.classification import ImageSet, stratified_folds
from ocula.data.registry import DatasetInfo, register
from ocula.data.segmentation import WBC_TYPES, load_zheng, zheng_types_csv
from ocula.errors import OculaError

TYPES = WBC_TYPES[:4]  # neutrophil, lymphocyte, monocyte, eosinophil
WINDOW = 104  # px around the cell's centre: the largest cell box of Dataset 1 (103 px) fits whole
CROP = 64  # px of the stored crop
TEST_FOLD = 0


def crop_cell(image: np.ndarray, mask: np.ndarray, path: Path, window: int = WINDOW, size: int = CROP) -> np.ndarray:
    """A size x size RGB crop of the window x window square centred on the box of the mask's cell (mask > 0)."""
    ys, xs = np.nonzero(mask)
    if not len(ys):
        raise OculaError("mask has no cell (all background)", path)
    half = window // 2
    cy, cx = (ys.min() + ys.max() + 1) // 2, (xs.min() + xs.max() + 1) // 2
    padded = np.pad(image, ((half, half), (half, half), (0, 0)), mode="symmetric")
    square = padded[cy:cy + window, cx:cx + window]  # the window's top-left is (cy - half, cx - half) unpadded
    return np.asarray(Image.fromarray(np.ascontiguousarray(square)).resize((size, size), Image.BILINEAR))


def load_wbc_types(root: Path, split: str = "all") -> ImageSet:
    csv_path = zheng_types_csv(root)
    if not csv_path.is_file():
        raise OculaError("file not found (the WBC types of Dataset 1)", csv_path)
    cells = load_zheng(root)
    keep = [i for i, m in enumerate(cells.metadata) if m["wbc_type"] in TYPES]
    if not keep:
        raise OculaError(f"no cell of the types {', '.join(TYPES)}", csv_path)
    images = np.stack([crop_cell(*cells[i], cells.files[i][1]) for i in keep])
    labels = np.array([TYPES.index(cells.metadata[i]["wbc_type"]) for i in keep], dtype=np.int64)
    data = ImageSet(images, labels, list(TYPES), 255.0, "wbc-zheng-types")
    if split == "all":
        return data
    train, test = stratified_folds(labels)[TEST_FOLD]
    return data.subset(train if split == "train" else test)


register(DatasetInfo(
    name="wbc-zheng-types", task="classify", folder="wbc_zheng2018",
    description=f"Zheng et al. 2018 WBC Dataset 1 as {CROP}x{CROP} cell crops labelled neutrophil, lymphocyte, "
                "monocyte or eosinophil (the one basophil left out); train / test: folds 1-4 / fold 0 of a seeded "
                "stratified 5-fold split",
    loader="ocula.data.cell_types:load_wbc_types", splits=("train", "test", "all"),
    license="GPL-3.0; acknowledge Jiangxi Tecom Science Corporation and cite Zheng et al., Micron 107:55-71 (2018)",
    urls={"Dataset 1": "https://github.com/zxaoyou/segmentation_WBC"},
))
