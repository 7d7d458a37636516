"""The one model API, task by task, on users' own folders: ocula.train -> ocula.load -> predict from a path, an
array and a tensor batch with the same answers -> evaluate -> ONNX export; and runs killed with SIGKILL mid-epoch
that resume to exactly the weights of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ocula
from ocula.errors import OculaError
from ocula.modelfile import read_model_file

import synthetic

# Per task: the folder maker and training settings small enough for seconds of CPU.
TASKS = {
    "classify": (synthetic.class_folder, "cnn", dict(epochs=6, batch_size=8, lr=3e-3, widths=[8, 16])),
    "segment": (synthetic.mask_folder, "unet", dict(epochs=8, batch_size=4, lr=1e-2, crop=32,
                                                   arch_args={"widths": [4, 8, 16]})),
    "detect": (lambda root: synthetic.detection_folder(root, "voc"), "fcos",
               dict(epochs=3, steps_per_epoch=4, minutes=None, batch_size=2, input_size=[128, 160])),
}


def make_data(task, root):
    return str(TASKS[task][0](root))


@pytest.fixture(scope="module", params=list(TASKS))
def trained(request, tmp_path_factory):
    task = request.param
    data = make_data(task, tmp_path_factory.mktemp(task) / "data")
    _, model, settings = TASKS[task]
    runs = tmp_path_factory.mktemp("runs")
    return task, data, ocula.train(data, model, runs_dir=runs, progress=False, threads=1, **settings)


def answers(results) -> list:
    """What a result says, as plain numbers, for comparing predictions."""
    return [json.dumps(r.to_json() | {"file": None}, sort_keys=True) for r in results]


def test_train_load_predict_evaluate_export(trained, tmp_path):
    task, data, model = trained
    assert model.run_dir.name == f"data-{TASKS[task][1]}"
    for name in ("config.json", "summary.json", "model.ocula", "last.ocula", "metrics.csv"):
        assert (model.run_dir / name).is_file(), name
    assert json.loads((model.run_dir / "config.json").read_text())["task"] == task

    loaded = ocula.load(model.path, device="cpu")
    assert loaded.info.task == task and str(loaded.device) == "cpu"
    files = sorted(Path(data).rglob("*.png"))[:2]
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    by_path, by_array, by_batch = loaded.predict(files), loaded.predict(arrays), loaded.predict(batch)
    assert answers(by_path) == answers(by_array) == answers(by_batch)
    assert answers(loaded.predict(files[0])) == answers(by_path[:1])
    opaque = np.dstack([arrays[0], np.full(arrays[0].shape[:2], 255, np.uint8)])  # RGBA with nothing see-through
    assert answers(loaded.predict(opaque)) == answers(by_path[:1])

    metrics = loaded.evaluate(data, split="test" if task == "classify" else None, out=tmp_path / "eval")
    assert (tmp_path / "eval" / "eval.json").is_file()
    score = {"classify": "accuracy", "segment": "dice", "detect": "map50"}[task]
    assert metrics[score] > {"classify": 0.9, "segment": 0.5, "detect": 0.0}[task], metrics[score]

    message = loaded.export("onnx", tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx").stat().st_size > 1000 and "ONNX Runtime" in message


def test_a_second_run_with_the_same_seed_gives_the_same_weights(tmp_path):
    data = make_data("classify", tmp_path / "data")
    a, b = (ocula.train(data, "cnn", runs_dir=tmp_path / name, progress=False, threads=1, epochs=2, widths=[4, 8])
            for name in ("a", "b"))
    _, wa, _ = read_model_file(a.path)
    _, wb, _ = read_model_file(b.path)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


TRAIN_SCRIPT = "import json, sys, ocula; ocula.train(sys.argv[1], sys.argv[2], runs_dir=sys.argv[3], name='run', " \
               "progress=False, **json.loads(sys.argv[4]))"


# Faster R-CNN too: its preset trains in bf16 and channels-last, like fcos's.
RESUMED = {**TASKS, "detect-rcnn": (TASKS["detect"][0], "faster-rcnn", TASKS["detect"][2])}


@pytest.mark.parametrize("task", list(RESUMED))
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_weights(task, tmp_path):
    make, model, settings = RESUMED[task]
    data = str(make(tmp_path / "data"))
    settings = {**settings, "threads": 1, "epochs": settings["epochs"] + 2}
    run_dir = tmp_path / "killed" / task.split("-")[0] / "run"  # runs/<task>/: detect-rcnn is a detect run
    proc = subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT, data, model, str(tmp_path / "killed"),
                             json.dumps(settings)], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / "last.ocula").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # the first epoch is saved; the second has begun
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    assert not (run_dir / "model.ocula").exists(), "the run finished before it could be killed"

    resumed = ocula.train(data, model, runs_dir=tmp_path / "killed", name="run", resume=True, progress=False,
                          threads=1)
    straight = ocula.train(data, model, runs_dir=tmp_path / "straight", name="run", progress=False, **settings)
    for name in ("last.ocula", "model.ocula"):
        _, got, _ = read_model_file(resumed.run_dir / name)
        _, want, _ = read_model_file(straight.run_dir / name)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name


def test_resume_refuses_changed_settings_but_takes_more_epochs(tmp_path):
    data = make_data("classify", tmp_path / "data")
    settings = dict(progress=False, threads=1, widths=[4, 8], runs_dir=tmp_path)
    first = ocula.train(data, "cnn", epochs=2, **settings)
    with pytest.raises(OculaError, match="lr"):
        ocula.train(data, "cnn", resume=True, epochs=3, lr=0.1, **settings)
    longer = ocula.train(data, "cnn", resume=True, epochs=3, **settings)
    assert len(longer.run_dir.joinpath("metrics.csv").read_text().splitlines()) == 1 + 3
    again = ocula.train(config=first.run_dir / "config.json", name="again", **settings)
    _, a, _ = read_model_file(first.run_dir / "model.ocula")
    assert again.summary["test_accuracy"] == first.summary["test_accuracy"]


def test_the_task_comes_from_the_data(tmp_path):
    from ocula.data.layout import resolve_task

    assert resolve_task(make_data("segment", tmp_path / "seg")) == "segment"
    assert resolve_task(synthetic.detection_folder(tmp_path / "yolo", "yolo").as_posix()) == "detect"
    assert resolve_task("digits") == "classify"
    (tmp_path / "mnist").mkdir()  # a local folder named like a dataset is still a folder
    with pytest.raises(OculaError, match="mnist: no known dataset layout"):
        ocula.train(str(tmp_path / "mnist"), runs_dir=tmp_path, progress=False)


def test_yolo_folder_trains_with_its_own_class_names(tmp_path):
    data = synthetic.detection_folder(tmp_path / "yolo", "yolo")
    model = ocula.train(str(data), "fcos", runs_dir=tmp_path, progress=False, threads=1, epochs=1,
                        steps_per_epoch=2, minutes=None, batch_size=2)
    assert model.info.classes == synthetic.BOX_CLASSES
    assert model.info.preprocess["input_size"] == [128, 160]  # the images' own size, in multiples of 32


def test_predict_inputs_and_options_are_checked(trained):
    _, _, model = trained
    with pytest.raises(OculaError, match="cannot predict on a dict"):
        model.predict({"x": 1})
    with pytest.raises(OculaError, match="unknown option"):
        model.predict(np.zeros((16, 16, 3), np.uint8), colour="red")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_and_predict_on_cuda(trained, tmp_path):
    task, data, _ = trained
    _, model, settings = TASKS[task]
    m = ocula.train(data, model, runs_dir=tmp_path, progress=False, device="cuda", **settings)
    assert m.device.type == "cuda"
    assert len(m.predict(torch.rand(2, 3, 32, 32) * 255)) == 2


@pytest.mark.parametrize("task", list(TASKS))
def test_show_draws_a_sheet_of_any_folder(task, tmp_path):
    from ocula.api import show_data

    path = show_data(make_data(task, tmp_path / "data"), n=4, out=tmp_path / "sheet.png")
    with Image.open(path) as sheet:
        assert sheet.width > 100 and len(set(np.asarray(sheet.convert("L")).ravel())) > 8  # drawn, not blank


def test_class_folders_also_train_a_nearest_neighbour_recogniser(tmp_path):
    data = make_data("classify", tmp_path / "data")
    embedder = ocula.train(data, "cnn", runs_dir=tmp_path, progress=False, threads=1, epochs=3, widths=[8, 16])
    recogniser = ocula.train(data, "1nn", runs_dir=tmp_path, progress=False, embedder=str(embedder.path))
    assert recogniser.info.task == "recognize" and recogniser.run_dir.parent.name == "recognize"
    assert recogniser.summary["test_accuracy"] > 0.9  # the three looks are far apart in any trained embedding
    files = sorted(Path(data, "test", "striped").glob("*.png"))[:3]
    assert [r.name for r in ocula.load(recogniser.path).predict(files)] == ["striped"] * 3
