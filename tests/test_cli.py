"""The command line as a user meets it: one-line errors for bad input, the photo pipeline, export."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

import ocula

SAMPLES = Path(ocula.__file__).parent / "samples"


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ocula", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_help_does_not_import_torch():
    code = "import sys, ocula.cli; ocula.cli.build_parser().format_help(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False"


@pytest.fixture(scope="module")
def svc_file(tmp_path_factory):
    return ocula.train("digits", "svc", runs_dir=tmp_path_factory.mktemp("runs"), progress=False).path


def bad_files(folder: Path) -> dict:
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(jpeg, "JPEG")
    files = {
        "truncated": ("truncated.jpg", jpeg.getvalue()[: len(jpeg.getvalue()) // 2], "truncated"),
        "not an image": ("notes.png", b"these are not pixels", "not an image"),
        "empty": ("empty.jpg", b"", "empty file"),
        "blank page": ("blank.png", None, "no ink"),
        "huge": ("huge.png", None, "decompression-bomb"),
    }
    for name, (fname, data, _) in files.items():
        if data is not None:
            (folder / fname).write_bytes(data)
    Image.new("L", (300, 200), 240).save(folder / "blank.png")
    Image.new("1", (10_000, 10_000)).save(folder / "huge.png")
    return {k: (folder / f, msg) for k, (f, _, msg) in files.items()}


def test_bad_images_give_one_line_naming_the_file(tmp_path, svc_file):
    for kind, (path, message) in bad_files(tmp_path).items():
        out = run("predict", svc_file, path)
        assert out.returncode == 1, kind
        assert "Traceback" not in out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0] and message in lines[0], (kind, out.stderr)


def test_a_folder_reports_bad_files_and_goes_on(tmp_path, svc_file):
    bad_files(tmp_path)
    Image.open(SAMPLES / "digit-2.jpg").save(tmp_path / "good.jpg")
    out = run("predict", svc_file, tmp_path, "--json")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    results = json.loads(out.stdout)
    assert [r["file"].endswith("good.jpg") for r in results if "error" not in r] == [True]


def test_bad_model_file_and_missing_dataset(tmp_path):
    (tmp_path / "model.ocula").write_text("hello")
    for args, message in [(("predict", tmp_path / "model.ocula", SAMPLES / "digit-1.jpg"), "not an ocula model"),
                          (("data", "info", "mnist", "--data-dir", tmp_path / "nowhere"), "data directory not found")]:
        out = run(*args)
        assert out.returncode == 1 and "Traceback" not in out.stderr and message in out.stderr


def test_corrupt_idx_dataset(tmp_path):
    (tmp_path / "mnist").mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / "mnist" / name).write_bytes(b"\x00\x00\x08\x03\x00\x00")
    out = run("data", "info", "mnist", "--data-dir", tmp_path)
    assert out.returncode == 1 and "IDX header truncated" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("mode", ["I;16", "RGBA", "CMYK"])
def test_unusual_image_modes_are_converted_not_refused(tmp_path, svc_file, mode):
    photo = ImageOps.exif_transpose(Image.open(SAMPLES / "digit-0.jpg"))
    if mode == "I;16":
        img = Image.fromarray((np.asarray(photo.convert("L"), np.uint16) * 257))
    else:
        img = photo.convert(mode)
    path = tmp_path / f"photo.{'jpg' if mode == 'CMYK' else 'png'}"
    img.save(path)
    out = run("predict", svc_file, path, "--json", "--out", "")
    assert out.returncode == 0, out.stderr
    original = ocula.load(svc_file).predict(SAMPLES / "digit-0.jpg")[0]
    assert json.loads(out.stdout)["class"] == original.name  # the same photo in another mode, the same answer


def test_exif_orientation_is_applied():
    from ocula.data.images import open_image

    raw = Image.open(SAMPLES / "digit-0.jpg")  # stored sideways with EXIF orientation 6
    assert raw.getexif().get(0x0112) == 6
    assert open_image(SAMPLES / "digit-0.jpg").size == raw.size[::-1]


def test_photo_pipeline_outputs_and_steps(tmp_path):
    from ocula.data.digit_photo import prepare_digit

    digits, steps = prepare_digit(SAMPLES / "digit-7.jpg", style="digits", size=(8, 8))
    assert digits.shape == (8, 8) and digits.min() >= 0 and digits.max() == 16
    mnist, _ = prepare_digit(SAMPLES / "digit-7.jpg", style="mnist", size=(28, 28))
    assert mnist.shape == (28, 28) and mnist.max() <= 255
    from scipy import ndimage

    cy, cx = ndimage.center_of_mass(mnist)
    assert abs(cy - 13.5) < 1 and abs(cx - 13.5) < 1  # centred by centre of mass, like MNIST
    assert "kept strokes" in steps


def test_predict_steps_and_export_commands(tmp_path, svc_file):
    out = run("predict", svc_file, SAMPLES / "digit-2.jpg", "--out", tmp_path, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["steps"] == str(tmp_path / "digit-2-steps.png")
    assert Image.open(tmp_path / "digit-2-steps.png").width > 100
    out = run("export", svc_file, "--format", "onnx", "--out", tmp_path / "svc.onnx")
    assert out.returncode == 0 and "max abs difference" in out.stdout


def test_demo_runs_end_to_end(tmp_path):
    out = run("demo", "--runs-dir", tmp_path)
    assert out.returncode == 0, out.stderr
    cnn_line = next(line for line in out.stdout.splitlines() if line.strip().startswith("ocula cnn"))
    assert float(cnn_line.split("accuracy")[1].split()[0]) >= 0.99
    assert (tmp_path / "classify" / "demo-digits-cnn" / "model.onnx").is_file()
    assert (tmp_path / "classify" / "demo-digits-cnn" / "digit-5-steps.png").is_file()
    read = next(line for line in out.stdout.splitlines() if "read correctly" in line)
    assert int(read.split(":")[1].split("/")[0]) >= 5  # the 8x8 model reads most of the ten photos


def test_train_resume_and_rerun_from_the_command_line(tmp_path):
    import synthetic

    data = synthetic.class_folder(tmp_path / "photos", per_class=9)
    runs = tmp_path / "runs"
    out = run("train", data, "--epochs", "1", "--batch-size", "9", "--runs-dir", runs, "--quiet", "--threads", "1")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    run_dir = runs / "classify" / "photos-cnn"
    assert summary["task"] == "classify" and summary["model"] == "cnn"
    assert summary["test_accuracy"] == json.loads((run_dir / "test-eval.json").read_text())["accuracy"]
    out = run("train", data, "--epochs", "2", "--resume", "--runs-dir", runs, "--quiet", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 1 + 2  # one more epoch, not a restart
    out = run("train", data, "--resume", "--lr", "0.5", "--runs-dir", runs, "--quiet")
    assert out.returncode == 1 and "lr" in out.stderr and "Traceback" not in out.stderr
    out = run("train", "--config", run_dir / "config.json", "--name", "again", "--runs-dir", runs, "--quiet")
    assert out.returncode == 0, out.stderr
    recorded = json.loads((run_dir / "summary.json").read_text())
    assert json.loads(out.stdout)["test_accuracy"] == recorded["test_accuracy"]
    out = run("evaluate", run_dir / "model.ocula", "--device", "cpu", "--out", tmp_path / "eval")
    assert out.returncode == 0, out.stderr
    resumed = json.loads((run_dir / "summary.json").read_text())["test_accuracy"]
    assert json.loads(out.stdout.splitlines()[0])["accuracy"] == pytest.approx(resumed, abs=1e-4)  # printed rounded
