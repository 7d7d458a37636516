"""Cells from masks: splitting touching discs, shape measures, physical units, multi-class, CSV / JSON output."""

import csv
import json
import math

import numpy as np
import pytest

from ocula.tasks.cells import find_cells, split_touching


def _disc(shape, centre, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= r**2


def test_two_touching_discs_are_split_into_two_cells_of_about_pi_r2():
    r = 20
    pair = _disc((80, 120), (40, 40), r) | _disc((80, 120), (40, 40 + int(1.8 * r)), r)
    assert find_cells(pair, split=False).count == 1  # one connected blob before the watershed
    cells = find_cells(pair, min_distance=10)
    assert cells.count == 2
    for row in cells.rows:
        # Each keeps its disc minus half the lens the two share (about 2% of pi r^2 at 1.8 r apart).
        assert row["area_px"] == pytest.approx(math.pi * r**2, rel=0.05)
    assert sorted(round(row["centroid_col"]) for row in cells.rows) == pytest.approx([39, 77], abs=2)


def test_a_disc_is_round_and_stays_whole():
    cells = find_cells(_disc((100, 100), (50, 50), 25), pixel_size=0.5)
    (row,) = cells.rows
    assert row["circularity"] == pytest.approx(1.0, abs=0.05)
    assert row["equivalent_diameter_px"] == pytest.approx(50, abs=0.5)
    assert row["area_um2"] == pytest.approx(row["area_px"] * 0.25)
    assert row["equivalent_diameter_um"] == pytest.approx(25, abs=0.25)
    assert row["perimeter_um"] == pytest.approx(math.pi * 25, rel=0.03)
    assert (row["bbox_min_row"], row["bbox_max_row"]) == (25, 76)
    assert (row["centroid_row"], row["centroid_col"]) == (50.0, 50.0)


def test_an_ellipse_is_not_over_split_and_a_long_one_is_less_circular():
    # The distance map's ridge along a long ellipse has many near-equal peaks; h-maxima keeps one seed.
    yy, xx = np.mgrid[:80, :120]
    ellipse = ((yy - 40) / 10) ** 2 + ((xx - 60) / 40) ** 2 <= 1
    (row,) = find_cells(ellipse, min_distance=3).rows
    assert row["circularity"] < 0.85


def test_a_chain_of_small_touching_cells_is_counted():
    chain = np.zeros((40, 100), bool)
    for x in (15, 26, 37, 48):  # r = 6 discs, 11 px apart
        chain |= _disc(chain.shape, (20, x), 6)
    assert find_cells(chain, min_distance=4, min_area=10).count == 4


def test_specks_are_dropped_and_ids_renumbered():
    mask = _disc((60, 60), (30, 30), 10)
    mask[2:4, 2:4] = True  # a 4-pixel speck
    cells = find_cells(mask.astype(np.uint8) * 255, min_area=30)
    assert cells.count == 1 and cells.rows[0]["id"] == 1
    assert set(np.unique(cells.labels)) == {0, 1}
    assert find_cells(mask, min_area=1).count == 2


def test_multiclass_majority_label_and_mean_colour():
    mask = np.zeros((60, 100), np.uint8)
    mask[_disc(mask.shape, (30, 25), 12)] = 2
    mask[_disc(mask.shape, (30, 75), 12)] = 1
    mask[28:32, 70:73] = 2  # a few mislabelled pixels do not change the cell's class
    image = np.zeros((60, 100, 3), np.uint8)
    image[:, :50] = (200, 10, 30)
    image[:, 50:] = (0, 0, 255)
    cells = find_cells(mask, image, multiclass=True)
    left, right = sorted(cells.rows, key=lambda row: row["centroid_col"])
    assert (left["class"], right["class"]) == (2, 1)
    assert (left["mean_r"], left["mean_g"], left["mean_b"]) == (200.0, 10.0, 30.0)
    assert right["mean_b"] == 255.0


def test_probabilities_are_thresholded_and_bad_input_is_named():
    probs = _disc((50, 50), (25, 25), 10) * 0.9
    assert find_cells(probs).count == 1
    with pytest.raises(ValueError, match="integer class labels"):
        find_cells(probs, multiclass=True)
    with pytest.raises(ValueError, match="mask must be"):
        find_cells(np.zeros((2, 5, 5)))
    with pytest.raises(ValueError, match="image must be"):
        find_cells(probs, np.zeros((50, 40, 3)))
    with pytest.raises(ValueError, match="pixel_size"):
        find_cells(probs, pixel_size=0)


def test_empty_mask_has_no_cells():
    cells = find_cells(np.zeros((20, 20), bool))
    assert cells.count == 0 and cells.rows == []
    assert split_touching(np.zeros((5, 5), bool)).max() == 0


def test_csv_and_json_are_written_whole(tmp_path):
    mask = _disc((60, 100), (30, 25), 12) | _disc((60, 100), (30, 75), 12)
    cells = find_cells(mask, np.full((60, 100, 3), 128, np.uint8), pixel_size=0.25)
    cells.write_csv(tmp_path / "out" / "cells.csv")
    cells.write_json(tmp_path / "out" / "cells.json")
    with open(tmp_path / "out" / "cells.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 and table[0]["id"] == "1" and "area_um2" in table[0] and "mean_g" in table[0]
    data = json.loads((tmp_path / "out" / "cells.json").read_text())
    assert data["count"] == 2 and data["pixel_size_um"] == 0.25 and data["cells"] == cells.rows
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cells.csv", "cells.json"]  # no temp files
    find_cells(np.zeros((5, 5), bool)).write_csv(tmp_path / "empty.csv")
    assert (tmp_path / "empty.csv").read_text() == "id\n"
