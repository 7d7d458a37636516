"""The HTTP API of `ocula serve` through httpx (FastAPI's TestClient): every task answers by multipart and by
JSON, ONNX Runtime answers like torch, and every bad request gets a 4xx with one line of JSON while the server
keeps serving; time and concurrency limits answer 504 and 503 + Retry-After."""

import base64
import io
import json
import shutil
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ocula
from ocula.errors import OculaError
from ocula.weights import DIGIT_MODEL

import synthetic

with warnings.catch_warnings():  # Starlette's note that its TestClient will move from httpx to another client
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from ocula.serve.app import Limits, create_app  # noqa: E402
from ocula.serve.models import load_served  # noqa: E402

SAMPLES = Path(ocula.__file__).parent / "samples"
# Per task: the folder maker and settings that train in seconds; answers need not be good, only typed, except the
# segmenter's, which must find cells for the ONNX-against-torch comparison to mean something.
TINY = {
    "classify": (synthetic.class_folder, "cnn", dict(epochs=2, batch_size=8, widths=[4, 8])),
    "segment": (synthetic.mask_folder, "unet", dict(epochs=8, batch_size=4, lr=1e-2, crop=32,
                                                   arch_args={"widths": [4, 8, 16]})),
    "detect": (lambda root: synthetic.detection_folder(root, "voc"), "fcos",
               dict(epochs=1, steps_per_epoch=1, minutes=None, batch_size=2, input_size=[128, 160])),
}


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> dict[str, Path]:
    """One tiny model file per task in one folder, as a user would serve them; the segmenter also as ONNX."""
    root = tmp_path_factory.mktemp("serve")
    files = {}
    for task, (make, arch, settings) in TINY.items():
        data = make(root / task)
        model = ocula.train(str(data), arch, runs_dir=root / "runs", progress=False, threads=1, **settings)
        files[task] = shutil.copy(model.path, root / f"{task}.ocula")
    files["segment-onnx"] = shutil.copy(files["segment"], root / "segment-onnx.ocula")
    ocula.load(files["segment-onnx"], device="cpu").export("onnx")
    files["digits"] = DIGIT_MODEL
    files["images"] = {task: sorted((root / task).rglob("*.png"))[0] for task in TINY}
    return files


@pytest.fixture(scope="module")
def client(model_files):
    paths = [model_files[k] for k in ("digits", "classify", "segment", "segment-onnx", "detect")]
    app = create_app(load_served(paths), Limits(max_bytes=2_000_000, max_pixels=4_000_000))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def post_file(client, data: bytes, **fields):
    return client.post("/v1/predict", files={"image": ("x", data)}, data=fields)


def post_json(client, data: bytes, **fields):
    return client.post("/v1/predict", json={"image": base64.b64encode(data).decode(), **fields})


def png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_models_health_docs_and_page(client):
    listed = client.get("/v1/models").json()
    assert listed["default"] == "digits-mnist"
    by_name = {m["name"]: m for m in listed["models"]}
    assert {n: (m["task"], m["runtime"]) for n, m in by_name.items()} == {
        "digits-mnist": ("classify", "onnx"), "classify": ("classify", "torch"), "segment": ("segment", "torch"),
        "segment-onnx": ("segment", "onnx"), "detect": ("detect", "torch")}
    assert by_name["digits-mnist"]["preprocess"]["style"] == "mnist" and len(by_name["digits-mnist"]["classes"]) == 10
    assert client.get("/health").json() == {"status": "ok", "models": list(by_name), "in_flight": 0,
                                            "max_concurrent": 32}
    spec = client.get("/openapi.json").json()
    assert set(spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]) == {"multipart/form-data",
                                                                                  "application/json"}
    docs = client.get("/docs").text  # Swagger UI from the server itself, not a CDN
    assert "/static-offline-docs/swagger-ui-bundle.js" in docs and "https://" not in docs
    assert client.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("app.js", "style.css"):
        assert client.get(f"/static/{asset}").status_code == 200
    for f in (Path(ocula.__file__).parent / "serve" / "static").iterdir():  # nothing is fetched from elsewhere
        assert "http://" not in f.read_text() and "https://" not in f.read_text(), f.name


def test_the_bundled_digit_model_reads_the_sample_photos():
    from ocula.demo import read_samples

    correct, _ = read_samples(ocula.load(DIGIT_MODEL, device="cpu"))
    assert correct >= 9  # what `make demo` promises (the 8x8 model reads about 6)


def test_the_bundled_digit_model_reads_a_photo_and_shows_its_stages(client):
    body = post_file(client, (SAMPLES / "digit-7.jpg").read_bytes()).json()
    assert (body["model"], body["runtime"], body["class"]) == ("digits-mnist", "onnx", "7")
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-3 and body["probability"] > 0.5
    names = [s["name"] for s in body["stages"]]
    assert names[0].startswith("photo") and names[-1] == "model input 28x28"
    stage = Image.open(io.BytesIO(base64.b64decode(body["stages"][-1]["png"].partition(",")[2])))
    assert stage.size == (28, 28)
    assert "stages" not in post_file(client, (SAMPLES / "digit-7.jpg").read_bytes(), stages="false").json()


@pytest.mark.parametrize("task", list(TINY))
def test_every_task_answers_alike_by_form_and_by_json(client, model_files, task):
    data = model_files["images"][task].read_bytes()
    by_form, by_json = post_file(client, data, model=task), post_json(client, data, model=task)
    assert by_form.status_code == by_json.status_code == 200, by_form.text
    a, b = by_form.json(), by_json.json()
    assert a.pop("milliseconds") >= 0 and b.pop("milliseconds") >= 0
    assert a == b and a["task"] == task
    h, w = np.asarray(Image.open(model_files["images"][task])).shape[:2]
    assert (a["width"], a["height"]) == (w, h)
    if task == "classify":
        assert a["class"] in ("bright", "dark", "striped") and abs(sum(a["probabilities"].values()) - 1) < 1e-3
    elif task == "segment":
        mask = Image.open(io.BytesIO(base64.b64decode(a["mask_png"].partition(",")[2])))
        assert mask.mode == "RGBA" and mask.size == (w, h)
        assert sum(a["counts"].values()) == a["count"] == len(a["cells"])
    else:
        assert set(a["counts"]) == set(synthetic.BOX_CLASSES)
        assert sum(a["counts"].values()) == len(a["detections"])
        for d in a["detections"]:
            assert 0 <= d["box"][0] <= d["box"][2] <= w and 0 <= d["box"][1] <= d["box"][3] <= h


def test_onnx_runtime_answers_like_torch(client, model_files):
    data = model_files["images"]["segment"].read_bytes()
    torch_answer, onnx_answer = (post_file(client, data, model=m, min_area=0).json()
                                 for m in ("segment", "segment-onnx"))
    assert onnx_answer["runtime"] == "onnx" and torch_answer["runtime"] == "torch"
    assert onnx_answer["foreground"] > 0, "an empty mask would make this comparison vacuous"
    for key in ("mask_png", "count", "cells", "foreground"):
        assert onnx_answer[key] == torch_answer[key], key


def test_segment_options_reach_the_model(client, model_files):
    data = model_files["images"]["segment"].read_bytes()
    given = post_file(client, data, model="segment", cell_diameter="48", opening="true").json()
    assert given["cell_diameter_px"] == 48 and given["scale_assumed"] is False
    as_json = post_json(client, data, model="segment", cell_diameter=48, opening=True).json()
    assert as_json["mask_png"] == given["mask_png"]


def truncated_png() -> bytes:
    return png(np.full((64, 64, 3), 128))[:60]


# (what is wrong, the request, its status); each must answer one line of JSON and leave the server serving.
BAD = [
    ("text, not an image", lambda c: post_file(c, b"hello, I am text"), 415),
    ("an SVG (a type not accepted)", lambda c: post_file(c, b"<svg xmlns='x'></svg>"), 415),
    ("an empty file", lambda c: post_file(c, b""), 400),
    ("a truncated PNG", lambda c: post_file(c, truncated_png()), 400),
    ("a PNG over the pixel limit", lambda c: post_file(c, png(np.zeros((2100, 2000)))), 413),
    ("a file over the byte limit", lambda c: post_file(c, b"\x89PNG\r\n\x1a\n" + bytes(2_000_001)), 413),
    ("a body over the limit, by its length", lambda c: c.post("/v1/predict", content=b"x" * 3_000_000,
                                                               headers={"content-type": "application/json"}), 413),
    ("an unknown model", lambda c: post_file(c, png(np.zeros((8, 8))), model="nope"), 404),
    ("a blank photo for the digit model", lambda c: post_file(c, png(np.full((60, 60), 250))), 400),
    ("an option the task does not take", lambda c: post_file(c, png(np.zeros((8, 8))), min_area="3"), 400),
    ("an option that is not a number", lambda c: post_file(c, png(np.zeros((8, 8))), model="segment",
                                                           min_area="lots"), 400),
    ("an option that is not a boolean", lambda c: post_file(c, png(np.zeros((8, 8))), model="segment",
                                                             opening="maybe"), 400),
    ("stages that is not a boolean", lambda c: post_file(c, png(np.zeros((8, 8))), stages="maybe"), 400),
    ("a negative option", lambda c: post_file(c, png(np.zeros((8, 8))), model="detect", score_thresh="-1"), 400),
    ("an unknown field", lambda c: post_file(c, png(np.zeros((8, 8))), colour="red"), 400),
    ("a form without an image", lambda c: c.post("/v1/predict", files={"picture": ("x", b"1")}), 400),
    ("JSON that does not parse", lambda c: c.post("/v1/predict", content=b"{not json",
                                                  headers={"content-type": "application/json"}), 400),
    ("JSON without an image", lambda c: c.post("/v1/predict", json={"model": "segment"}), 400),
    ("an image that is not base64", lambda c: c.post("/v1/predict", json={"image": "%%%"}), 400),
    ("a model name that is a list", lambda c: post_json(c, png(np.zeros((8, 8))), model=["segment"]), 404),
    ("an option that is a list", lambda c: post_json(c, png(np.zeros((8, 8))), model="segment", min_area=[1]), 400),
    ("a body of another type", lambda c: c.post("/v1/predict", content=b"abc",
                                                headers={"content-type": "text/plain"}), 415),
    ("an unknown path", lambda c: c.get("/v2/predict"), 404),
    ("the wrong method", lambda c: c.get("/v1/predict"), 405),
]


@pytest.mark.parametrize("request_, status", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_requests_get_a_one_line_json_error_and_the_server_keeps_serving(client, request_, status):
    response = request_(client)
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and body["error"] and "\n" not in body["error"]
    assert "Traceback" not in response.text
    assert post_file(client, (SAMPLES / "digit-3.jpg").read_bytes()).json()["class"] == "3"


ODD = {"1x1": np.full((1, 1, 3), 90), "1x400": np.full((1, 400, 3), 90), "300x2": np.full((300, 2, 3), 90),
       "black": np.zeros((100, 100, 3)), "white": np.full((100, 100, 3), 255), "thin black": np.zeros((1, 4000))}


@pytest.mark.parametrize("image", list(ODD.values()), ids=list(ODD))
@pytest.mark.parametrize("model", ["digits-mnist", "classify", "segment", "segment-onnx", "detect"])
def test_odd_images_never_yield_a_server_error(client, model, image):
    response = post_file(client, png(image), model=model)
    assert response.status_code in (200, 400, 422), response.text
    assert response.status_code == 200 or "\n" not in response.json()["error"]


def slow_app(model_files, limits: Limits, gate: threading.Event):
    """An app whose model waits for `gate` before answering, to hold its prediction slots."""
    served = load_served([model_files["classify"]])
    predict = served["classify"].model.predict

    def waiting(*args, **kwargs):
        gate.wait(10)
        return predict(*args, **kwargs)

    served["classify"].model.predict = waiting
    return create_app(served, limits)


def wait_until(condition, seconds: float = 10):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_full_server_answers_503_with_retry_after_and_recovers(model_files):
    gate = threading.Event()
    image = model_files["images"]["classify"].read_bytes()
    with TestClient(slow_app(model_files, Limits(max_concurrent=2, workers=1), gate)) as c:
        first = []
        threads = [threading.Thread(target=lambda: first.append(post_file(c, image))) for _ in range(2)]
        for t in threads:
            t.start()
        wait_until(lambda: c.get("/health").json()["in_flight"] == 2)
        refused = post_file(c, image)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "busy" in refused.json()["error"]
        gate.set()
        for t in threads:
            t.join(10)
        assert [r.status_code for r in first] == [200, 200]
        assert post_file(c, image).status_code == 200 and c.get("/health").json()["in_flight"] == 0


def test_a_slow_prediction_answers_504_and_frees_its_slot_when_it_ends(model_files):
    gate = threading.Event()
    with TestClient(slow_app(model_files, Limits(timeout=0.2, max_concurrent=1), gate)) as c:
        late = post_file(c, model_files["images"]["classify"].read_bytes())
        assert late.status_code == 504 and "0.2 s" in late.json()["error"]
        assert c.get("/health").json()["in_flight"] == 1  # the work still runs and still counts
        gate.set()
        wait_until(lambda: c.get("/health").json()["in_flight"] == 0)


def test_cors_is_off_unless_an_origin_is_allowed(model_files):
    served = load_served([model_files["classify"]])
    ask = {"origin": "http://elsewhere.example", "access-control-request-method": "POST"}
    with TestClient(create_app(served)) as c:
        assert "access-control-allow-origin" not in c.options("/v1/predict", headers=ask).headers
    with TestClient(create_app(served, cors_origins=("http://elsewhere.example",))) as c:
        allowed = c.options("/v1/predict", headers=ask)
        assert allowed.headers["access-control-allow-origin"] == "http://elsewhere.example"


def test_two_models_with_one_name_are_refused(model_files, tmp_path):
    other = tmp_path / "classify.ocula"
    shutil.copy(model_files["classify"], other)
    with pytest.raises(OculaError, match="two models"):
        load_served([model_files["classify"], other])
