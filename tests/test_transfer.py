"""Transfer learning: the WBC-type dataset (cell crops, stratified reproducible folds, errors naming the file), a
classifier file as `--encoder`, and the cross-validation protocol on tiny synthetic sets."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import ocula
from ocula.data.cell_types import CROP, load_wbc_types
from ocula.data.classification import ImageSet, stratified_folds
from ocula.data.layout import open_dataset
from ocula.errors import OculaError
from ocula.models import build
from ocula.tasks import classify
from ocula import transfer

PER_TYPE = 6


def zheng_folder(root, size=40):
    """A fake wbc_zheng2018 copy: PER_TYPE cells of each of the 4 kept types and one basophil. Each cell is a white
    box on black whose place differs per image, so a crop can be checked to be centred on it."""
    folder = root / "Dataset 1"
    folder.mkdir(parents=True)
    rows, i = ["image ID,class label"], 0
    for label in (1, 2, 3, 4, 5):
        for k in range(PER_TYPE if label < 5 else 1):
            i += 1
            y, x = 4 + k, 20 - k
            image = np.zeros((size, size, 3), np.uint8)
            image[y:y + 14, x:x + 12] = 255
            mask = np.zeros((size, size), np.uint8)
            mask[y:y + 14, x:x + 12] = 128
            Image.fromarray(image).save(folder / f"{i:03d}.bmp")
            Image.fromarray(mask).save(folder / f"{i:03d}.png")
            rows.append(f"{i},{label}")
    (root / "Class Labels of Dataset 1.csv").write_text("\n".join(rows) + "\n")
    return root


def test_cells_are_cropped_around_their_mask_and_basophils_left_out(tmp_path):
    data = load_wbc_types(zheng_folder(tmp_path / "wbc_zheng2018"))
    assert data.images.shape == (4 * PER_TYPE, CROP, CROP, 3) and data.classes[3] == "eosinophil"
    assert np.bincount(data.labels).tolist() == [PER_TYPE] * 4
    centre = data.images[:, CROP // 2 - 2:CROP // 2 + 2, CROP // 2 - 2:CROP // 2 + 2]
    assert (centre == 255).all()  # every crop is centred on its cell, wherever the cell sits in its image


def test_the_dataset_loader_splits_on_fold_zero(tmp_path):
    zheng_folder(tmp_path / "wbc_zheng2018")
    train, test, all_ = (open_dataset("wbc-zheng-types", s, tmp_path) for s in ("train", "test", "all"))
    assert len(train) + len(test) == len(all_) and np.bincount(test.labels).min() >= 1
    fold_train, fold_test = stratified_folds(all_.labels)[0]
    assert np.array_equal(test.images, all_.images[fold_test]) and np.array_equal(train.labels, all_.labels[fold_train])


def test_folds_are_stratified_reproducible_and_partition_the_data():
    labels = np.repeat([0, 1, 2, 3], [176, 53, 48, 22])  # Zheng's counts
    folds = stratified_folds(labels, 5, seed=0)
    tests = np.concatenate([t for _, t in folds])
    assert np.array_equal(np.sort(tests), np.arange(len(labels)))  # each image is tested exactly once
    for train, test in folds:
        assert not set(train) & set(test)
        counts = np.bincount(labels[test], minlength=4)
        assert (np.abs(counts - np.bincount(labels) / 5) < 1).all()
    again = stratified_folds(labels, 5, seed=0)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
    assert not np.array_equal(folds[0][1], stratified_folds(labels, 5, seed=1)[0][1])
    with pytest.raises(OculaError, match="fewer than the 5 folds"):
        stratified_folds(np.repeat([0, 1], [20, 4]), 5)


def test_the_real_dataset(datasets):
    data = load_wbc_types(datasets / "wbc_zheng2018")
    assert np.bincount(data.labels).tolist() == [176, 53, 48, 22]  # the CSV's counts without the one basophil


@pytest.mark.parametrize("breaks, named", [("csv", "Class Labels of Dataset 1.csv"), ("image", "003.bmp"),
                                           ("mask", "004.png")])
def test_bad_files_are_named(tmp_path, breaks, named):
    root = zheng_folder(tmp_path / "wbc_zheng2018")
    if breaks == "csv":
        (root / named).unlink()
    elif breaks == "image":
        (root / "Dataset 1" / named).write_bytes(b"BM not really a bitmap")
    else:
        Image.fromarray(np.zeros((40, 40), np.uint8)).save(root / "Dataset 1" / named)  # a mask without a cell
    with pytest.raises(OculaError) as error:
        load_wbc_types(root)
    assert named in str(error.value) and "\n" not in str(error.value)


# --- a classifier file as the encoder --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny cnn and a tiny airbench trained on 3-class synthetic images, the 3-class folder, and a folder of two
    of its classes to transfer them to."""
    import synthetic

    root = tmp_path_factory.mktemp("transfer")
    folder = synthetic.class_folder(root / "photos", per_class=12)
    files = {name: ocula.train(folder, name, epochs=1, batch_size=12, widths=[8, 8, 8], threads=1, progress=False,
                               runs_dir=root / "runs", val_fraction=0).path for name in ("cnn", "airbench")}
    for name in ("bright", "dark"):
        shutil.copytree(folder / "train" / name, root / "two" / "train" / name)
    return files, folder, root / "two"


@pytest.mark.parametrize("name", ["cnn", "airbench"])
def test_a_classifier_file_initialises_every_layer_but_the_head(pretrained, name):
    files, _, two_folder = pretrained
    two = classify.load_data(two_folder, "train")
    arch, args, state = classify.network(two, name, encoder=files[name])
    assert args["num_classes"] == 2 and args["widths"] == [8, 8, 8]
    model = build(arch, **args).eval()
    assert set(model.load_state_dict(state, strict=False).missing_keys) == classify.head_keys(model)
    source = ocula.load(files[name], device="cpu").module.eval()
    x = torch.rand(4, 3, 16, 16) * 255
    with torch.no_grad():
        assert torch.allclose(model.penultimate(x), source.penultimate(x), atol=1e-5)
    tuned = ocula.train(two_folder, name, encoder=str(files[name]), epochs=1, batch_size=12, threads=1,
                        progress=False, runs_dir=two_folder.parent / "tuned", val_fraction=0)
    assert tuned.info.classes == ["bright", "dark"] and tuned.info.args["widths"] == [8, 8, 8]


def test_an_encoder_of_another_architecture_is_refused_in_one_line(pretrained):
    files, folder, two_folder = pretrained
    with pytest.raises(OculaError,
                       match="for airbench takes a classifier of that architecture.*not this cnn classify model"):
        classify.network(classify.load_data(two_folder, "train"), "airbench", encoder=files["cnn"])
    out = subprocess.run([sys.executable, "-m", "ocula", "train", str(folder), "--model", "svc", "--encoder",
                          str(files["cnn"]), "--runs-dir", str(two_folder.parent / "refused")],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "not the svc" in out.stderr and "Traceback" not in out.stderr


# --- the protocol ----------------------------------------------------------------------------------------------

def test_majority_scores_the_share_of_the_largest_class():
    data = ImageSet(np.zeros((60, 4, 4), np.uint8), np.repeat([0, 1, 2], [30, 20, 10]), ["a", "b", "c"], 255.0)
    scores = transfer.cross_validate("majority", data, transfer.majority())
    assert np.allclose(scores.accuracy, 0.5) and np.allclose(scores.balanced_accuracy, 1 / 3)


@pytest.mark.parametrize("head", ["linear", "svm", "knn"])
def test_frozen_features_learn_real_labels_and_not_shuffled_ones(pretrained, head):
    """Shuffled labels must score near chance: a protocol that let the test fold's labels in would not."""
    files, folder, _ = pretrained
    data = classify.load_data(folder, "train")
    real = transfer.cross_validate(head, data, transfer.frozen(files["cnn"], head, inner_folds=3), n_folds=3)
    assert real.accuracy.mean() > 0.9
    shuffled = ImageSet(data.images, np.random.default_rng(0).permutation(data.labels), data.classes, 255.0)
    chance = transfer.cross_validate(head, shuffled, transfer.frozen(files["cnn"], head, inner_folds=3), n_folds=3)
    assert chance.accuracy.mean() < 0.6 and chance.row()[0] == head


def test_training_on_the_folds_beats_the_majority(pretrained):
    _, folder, _ = pretrained
    data = classify.load_data(folder, "train")
    config = classify.default_config("cnn", epochs=4, batch_size=12, lr=0.01, threads=1)
    scores = transfer.cross_validate("scratch", data, transfer.trained("cnn", config), n_folds=3)
    assert scores.accuracy.mean() > 0.8 and scores.seconds > 0


def test_an_unknown_head_is_refused(pretrained):
    with pytest.raises(OculaError, match="unknown head"):
        transfer.frozen(pretrained[0]["cnn"], "forest")
