import json

import pytest
import torch

import ocula
from ocula.errors import OculaError
from ocula.modelfile import ModelInfo, save_model
from ocula.models import build


def small_cnn_file(path):
    args = {"widths": [4, 8], "value_max": 16.0}
    model = build("cnn", **args).eval()
    save_model(path, model, ModelInfo("classify", "cnn", args, classes=[str(i) for i in range(10)],
                                      preprocess={"input_size": [8, 8], "channels": 1, "value_max": 16.0}))
    return model


def test_round_trip_keeps_weights_and_metadata(tmp_path):
    model = small_cnn_file(tmp_path / "m.ocula")
    loaded = ocula.load(tmp_path / "m.ocula")
    x = torch.rand(3, 1, 8, 8) * 16
    assert torch.equal(model(x), loaded.module(x))
    assert loaded.info.classes[3] == "3" and loaded.info.preprocess["value_max"] == 16.0


def rewrite_metadata(path, change):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = json.loads(header["__metadata__"]["ocula"])
    change(meta)
    header["__metadata__"]["ocula"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


def test_file_from_unknown_version_is_refused(tmp_path):
    path = tmp_path / "m.ocula"
    small_cnn_file(path)
    rewrite_metadata(path, lambda m: m.update(format_version=99, ocula_version="9.0"))
    with pytest.raises(OculaError, match="format version 99"):
        ocula.load(path)


def test_tampered_header_and_non_model_files(tmp_path):
    path = tmp_path / "m.ocula"
    small_cnn_file(path)
    rewrite_metadata(path, lambda m: m.pop("arch"))
    with pytest.raises(OculaError, match="damaged ocula metadata"):
        ocula.load(path)
    broken = tmp_path / "broken.ocula"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(OculaError, match="not an ocula model file"):
        ocula.load(broken)
    with pytest.raises(OculaError, match="not found"):
        ocula.load(tmp_path / "missing.ocula")


def test_weights_that_do_not_fit_the_architecture(tmp_path):
    path = tmp_path / "m.ocula"
    small_cnn_file(path)
    rewrite_metadata(path, lambda m: m["args"].update(widths=[4, 16]))
    with pytest.raises(OculaError, match="do not fit"):
        ocula.load(path)


def test_files_from_wrapped_models_load(tmp_path):
    """DistributedDataParallel and torch.compile save their weights under 'module.' and '_orig_mod.' prefixes."""
    model = small_cnn_file(tmp_path / "m.ocula")
    wrapped = torch.nn.Module()
    wrapped.module = model
    save_model(tmp_path / "ddp.ocula", wrapped, ocula.load(tmp_path / "m.ocula").info)
    x = torch.rand(2, 1, 8, 8) * 16
    assert torch.equal(ocula.load(tmp_path / "ddp.ocula").module(x), model(x))
