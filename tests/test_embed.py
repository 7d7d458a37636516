"""Embeddings from a classifier's penultimate layer, vector files, and gallery recognisers saved as model files
that `ocula.load`, `ocula predict` and evaluation use like any classifier."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import ocula
from ocula.errors import OculaError
from ocula.models import build
from ocula.tasks.embed import embed_data, load_vectors


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import synthetic

    root = tmp_path_factory.mktemp("embed")
    data = synthetic.class_folder(root / "photos", per_class=9)
    model = ocula.train(data, "cnn", epochs=1, batch_size=9, threads=1, runs_dir=root / "runs", progress=False)
    return data, model.path


def test_penultimate_is_what_the_last_linear_layer_sees():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 255
    cnn = build("cnn", num_classes=4, in_channels=3, widths=[8, 16]).eval()
    assert torch.allclose(cnn.head[-1](cnn.penultimate(x)), cnn(x), atol=1e-5)
    resnet = build("backbone-classifier", backbone="resnet18", num_classes=4, small_input=True).eval()
    f = resnet.penultimate(x)
    assert f.shape == (2, 512) and torch.allclose(resnet.net.fc(f), resnet(x), atol=1e-4)


def test_vectors_file_holds_vectors_labels_and_ids(trained, tmp_path):
    data, model_path = trained
    said = embed_data(model_path, str(data), tmp_path / "v.safetensors", device="cpu", normalize=True)
    vectors, labels, meta = load_vectors(tmp_path / "v.safetensors")
    assert "27 vectors" in said and vectors.shape == (27, 128) and labels.tolist() == sorted(labels.tolist())
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert meta["classes"] == ["bright", "dark", "striped"] and meta["ids"][0] == "train/0" and len(meta["ids"]) == 27


@pytest.mark.parametrize("rule", ["1nn", "knn", "map"])
def test_a_recogniser_is_a_model_file_like_any_other(trained, tmp_path, rule):
    from ocula.data.classification import load_image_folder

    data, model_path = trained
    embed_data(model_path, str(data), tmp_path / "g.ocula", device="cpu", rule=rule, k=3)
    model = ocula.load(tmp_path / "g.ocula", device="cpu")
    assert model.info.task == "recognize" and model.module.gallery.shape == (27, 128)
    train = load_image_folder(data, "train")
    results = model.predict(train.images)
    assert all(abs(sum(r.probabilities.values()) - 1) < 1e-5 for r in results)
    if rule == "1nn":  # every reference is its own nearest neighbour
        assert [r.label for r in results] == train.labels.tolist()
    assert model.evaluate(split="test")["accuracy"] >= 0.5  # three classes visible at a glance


def test_embed_and_predict_from_the_command_line(trained, tmp_path):
    data, model_path = trained
    run = lambda *a: subprocess.run([sys.executable, "-m", "ocula", *map(str, a)], capture_output=True, text=True)
    out = run("embed", model_path, data, "--out", tmp_path / "g.ocula", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    image = sorted((data / "test" / "dark").iterdir())[0]
    out = run("predict", tmp_path / "g.ocula", image, "--json", "--out", "", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["class"] == "dark"
    out = run("embed", tmp_path / "missing.ocula", data, "--out", tmp_path / "v.safetensors")
    assert out.returncode == 1 and "model file not found" in out.stderr and "Traceback" not in out.stderr


def test_a_model_without_penultimate_features_gets_one_line(tmp_path):
    from ocula.modelfile import ModelInfo
    from ocula.tasks.embed import embed

    svc = build("svc", n_features=4, n_support=[1, 1], gamma=0.1)
    svc.info = ModelInfo(task="classify", arch="svc", args={}, preprocess={"input_size": [2, 2], "channels": 1})
    with pytest.raises(OculaError, match="no penultimate features"):
        embed(svc, np.zeros((1, 2, 2)))
    with pytest.raises(OculaError, match="not an ocula vector file"):
        (tmp_path / "v.safetensors").write_bytes(b"junk")
        load_vectors(tmp_path / "v.safetensors")


def test_normalised_softmax_embedder_separates_the_classes(trained):
    from ocula.data.classification import load_image_folder
    from ocula.engine.trainer import TrainConfig
    from ocula.index import build_index
    from ocula.tasks.embed import embed
    from ocula.tasks.recognize import train_embedder

    data, _ = trained
    train, test = load_image_folder(data, "train"), load_image_folder(data, "test")
    model = train_embedder(train, TrainConfig(epochs=3, batch_size=9, threads=1), widths=(8, 16), progress=False)
    assert model.info.arch == "cnn" and model.head[-1].in_features == 16
    g, q = embed(model, train.images, normalize=True), embed(model, test.images, normalize=True)
    nearest = train.labels[build_index(g, "brute").search(q, 1)[1][:, 0]]
    assert (nearest == test.labels).mean() >= 0.8


def test_a_new_class_joins_a_recogniser_without_training(trained, tmp_path):
    import shutil

    from ocula.data.classification import load_image_folder

    data, model_path = trained
    known, new = tmp_path / "known", tmp_path / "new"
    for name in ("bright", "dark"):
        shutil.copytree(data / "train" / name, known / "train" / name)
    shutil.copytree(data / "train" / "striped", new / "train" / "striped")
    embed_data(model_path, str(known), tmp_path / "two.ocula", device="cpu")
    said = embed_data(tmp_path / "two.ocula", str(new), tmp_path / "three.ocula", device="cpu")
    assert "27 references of 3 classes" in said
    two, three = (ocula.load(tmp_path / f, device="cpu") for f in ("two.ocula", "three.ocula"))
    assert two.info.classes == ["bright", "dark"] and three.info.classes == ["bright", "dark", "striped"]
    assert torch.equal(three.module.gallery[:18], two.module.gallery)  # the old references are kept as they were
    test = load_image_folder(data, "test")
    assert [r.label for r in three.predict(test.images)] == test.labels.tolist()


@pytest.mark.parametrize("rule", ["1nn", "map"])
def test_a_recogniser_exports_to_onnx_with_parity(trained, tmp_path, rule):
    from ocula.data.classification import load_image_folder
    from ocula.export.onnx import onnx_session, run_onnx
    from ocula.tasks.classify import prepare

    data, model_path = trained
    embed_data(model_path, str(data), tmp_path / "g.ocula", device="cpu", rule=rule)
    model = ocula.load(tmp_path / "g.ocula", device="cpu")
    model.export("onnx", tmp_path / "g.onnx")  # checked below on real images, not only on the export's random input
    test = load_image_folder(data, "test")
    x = torch.from_numpy(np.stack([prepare(im, model.info.preprocess, "test")[0] for im in test.images]))
    t = torch.linspace(0, 1, 201)[:, None, None, None]
    x = torch.cat([x, (1 - t) * x[0] + t * x[3]])  # and a walk from a bright to a dark image, ambiguous midway
    with torch.no_grad():
        expected = model.module(x).numpy()
    (got,) = run_onnx(onnx_session(tmp_path / "g.onnx"), x)
    assert expected.max(1).min() < 0.99  # some probabilities are not saturated, so the comparison means something
    assert (got.argmax(1) == expected.argmax(1)).all()
    # exp(-distance / T) with T the gallery's small nearest-neighbour distance magnifies float rounding where two
    # classes meet: 5e-4 seen there, 1e-7 elsewhere
    np.testing.assert_allclose(got, expected, atol=2e-3)
