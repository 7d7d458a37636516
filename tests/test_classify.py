import numpy as np
import pytest
import torch

import ocula
from ocula.data import registry
from ocula.engine.trainer import TrainConfig
from ocula.errors import OculaError
from ocula.export.onnx import check_parity, export_onnx
from ocula.tasks import classify


@pytest.fixture(scope="module")
def digits():
    return registry.load("digits", "train"), registry.load("digits", "test")


@pytest.fixture(scope="module")
def svc(digits):
    model, info = classify.fit_svc(digits[0])
    model.info = info
    return model


def test_torch_svc_predicts_exactly_like_sklearn(digits, svc):
    from sklearn.svm import SVC

    train, test = digits
    sk = SVC(gamma=0.001).fit(train.images.reshape(len(train), -1), train.labels)
    expected = sk.predict(test.images.reshape(len(test), -1))
    got = classify.batched_forward(svc, classify.to_tensor(test.images)).argmax(1).numpy()
    assert np.array_equal(got, expected)
    assert (expected == test.labels).mean() > 0.98


@pytest.mark.parametrize("which", ["svc", "cnn"])
def test_onnx_matches_torch(tmp_path, digits, svc, which):
    if which == "svc":
        model = svc
    else:
        args = classify.cnn_args(digits[0], widths=[8, 16])
        model = classify.build("cnn", **args).eval()
        model.info = classify.model_info(digits[0], "cnn", args)
    path = export_onnx(model, tmp_path / "m.onnx")
    x = classify.to_tensor(digits[1].images[:64])
    assert check_parity(model, path, x) < 1e-4
    from ocula.export.onnx import onnx_session

    out = onnx_session(path).run(None, {"image": x[:5].numpy()})[0]  # dynamic batch
    assert out.shape == (5, 10)


def test_coreml_spec_has_one_named_tensor_input(tmp_path, svc):
    ct = pytest.importorskip("coremltools")
    from ocula.export.coreml import export_coreml

    path = export_coreml(svc, tmp_path / "digits.mlpackage")
    spec = ct.utils.load_spec(str(path))
    (inp,), (out,) = spec.description.input, spec.description.output
    assert inp.name == "image" and list(inp.type.multiArrayType.shape) == [1, 1, 8, 8]
    assert inp.type.multiArrayType.shapeRange.sizeRanges[0].upperBound == 1024  # dynamic batch
    assert out.name == "scores"


def tiny_config(**kw):
    return TrainConfig(**{"epochs": 4, "batch_size": 64, "lr": 3e-3, "monitor": "val_loss", "mode": "min",
                          "seed": 3, **kw})


def tiny_train(digits, run_dir, config, resume=False):
    fit, val = classify.split_validation(digits[0], 0.1, config.seed)
    model, _, history = classify.train_cnn(fit, config, val=val, run_dir=run_dir, resume=resume, progress=False,
                                           arch_args=classify.cnn_args(fit, widths=[8, 16]))
    return model, history


def test_training_is_seeded_and_resume_equals_an_uninterrupted_run(tmp_path, digits, monkeypatch):
    full, history = tiny_train(digits, tmp_path / "full", tiny_config())
    again, _ = tiny_train(digits, tmp_path / "again", tiny_config())
    assert len(history) == 4
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), again.state_dict().values()))

    from ocula.engine.trainer import Trainer

    real_epoch, calls = Trainer._train_epoch, []

    def killed_during_third_epoch(self):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_epoch(self)

    monkeypatch.setattr(Trainer, "_train_epoch", killed_during_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        tiny_train(digits, tmp_path / "cut", tiny_config())
    monkeypatch.setattr(Trainer, "_train_epoch", real_epoch)
    resumed, resumed_history = tiny_train(digits, tmp_path / "cut", tiny_config(), resume=True)
    assert [h["epoch"] for h in resumed_history] == [1, 2, 3, 4]
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))
    with pytest.raises(OculaError, match="different config"):
        tiny_train(digits, tmp_path / "cut", tiny_config(lr=1e-2), resume=True)


def test_csv_log_checkpoints_and_evaluation_files(tmp_path, digits):
    model, history = tiny_train(digits, tmp_path, tiny_config(epochs=2))
    assert (tmp_path / "best.ocula").is_file() and (tmp_path / "last.ocula").is_file()
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,loss,lr") and len(rows) == 3
    model.info = ocula.load(tmp_path / "best.ocula").info
    result = classify.write_evaluation(model, digits[1], tmp_path / "eval")
    assert sum(map(sum, result["confusion"])) == len(digits[1])
    for f in ("confusion.png", "misclassified.png", "eval.json"):
        assert (tmp_path / "eval" / f).stat().st_size > 0


def test_early_stopping_and_nan_stop(tmp_path, digits):
    _, history = tiny_train(digits, tmp_path / "es", tiny_config(epochs=30, early_stopping=1, lr=1e-6))
    assert len(history) < 30
    with pytest.raises(OculaError, match="nan"):
        tiny_train(digits, tmp_path / "nan", tiny_config(lr=1e30, weight_decay=0.0, schedule="constant"))


def test_svc_scores_are_shares_of_the_votes(svc, digits):
    from ocula.api import Model

    results = Model(svc).predict(digits[1].images[:20, :, :, None].astype(np.uint8))  # N x H x W x C
    for r in results:
        assert sum(r.probabilities.values()) == pytest.approx(1.0)
        assert r.probability == max(r.probabilities.values()) and r.probabilities[r.name] == r.probability
    votes = classify.batched_forward(svc, classify.to_tensor(digits[1].images[:20]))
    assert [r.label for r in results] == votes.argmax(1).tolist()


def test_fashion_photos_become_light_articles_on_black():
    from ocula.data.photo import prepare_photo

    photo = np.full((120, 90, 3), 245, np.uint8)  # a dark shirt on a white table, off centre
    photo[20:70, 10:50] = (60, 40, 30)
    array, _ = prepare_photo(photo, style="fashion", size=(28, 28), channels=1)
    assert array.shape == (1, 28, 28)
    img = array[0]
    assert img[img > 100].size > 300 and img[0, 0] < 10  # the article is light, the background black
    ys, xs = np.nonzero(img > 100)
    assert abs(ys.mean() - 13.5) < 2 and abs(xs.mean() - 13.5) < 2  # trimmed and centred


def test_library_calls_leave_threads_and_random_state_alone(tmp_path):
    threads, state = torch.get_num_threads(), torch.random.get_rng_state()
    ocula.train("digits", "cnn", runs_dir=tmp_path, progress=False, epochs=1, threads=2, widths=[4, 8], seed=7)
    assert torch.get_num_threads() == threads and torch.equal(torch.random.get_rng_state(), state)
