"""ocula inspect: per-layer shapes, parameters and FLOPs (checked by hand on small layers and against the papers'
multiply-add counts), with the receptive field."""

import pytest
import torch
from torch import nn

from ocula.cli import main
from ocula.models.backbones import build_backbone
from ocula.models.inspect import inspect_model


def test_small_layers_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 5 * 5, 5))
    found = inspect_model(model, (10, 10), 3)
    rows = {r.name: r for r in found.rows}
    # FLOPs = 2 x multiply-adds: output pixels x channels x kernel taps (per group) x 2.
    assert (rows["0"].shape, rows["0"].params, rows["0"].flops) == ((8, 10, 10), 8 * 27 + 8, 2 * 8 * 100 * 27)
    assert (rows["2"].params, rows["2"].flops) == (8 * 9 + 8, 2 * 8 * 100 * 9)  # depthwise: 9 taps per output
    assert (rows["3"].shape, rows["3"].flops) == ((8, 5, 5), 0)
    assert (rows["5"].shape, rows["5"].params, rows["5"].flops) == ((5,), 200 * 5 + 5, 2 * 200 * 5)
    assert found.flops == 2 * 8 * 100 * 27 + 2 * 8 * 100 * 9 + 2 * 200 * 5
    assert found.params == sum(r.params for r in found.rows)
    # Receptive fields: 3, then 5 after the second 3x3, then 6 with jump 2 after the 2x2 pool.
    assert [(r.rf.r, r.rf.j) for r in found.rows if r.rf] == [(3, 1), (5, 1), (6, 2)]
    assert model.training  # the model comes back in the mode it was in


@pytest.mark.parametrize("name, million_mult_adds", [("mobilenet_v1", 569), ("mobilenet_v2", 301)])
def test_mobilenet_mult_adds_match_the_papers(name, million_mult_adds):
    """MobileNet v1: 569 M mult-adds (Howard et al., Table 1 totals); v2: 300 M (Sandler et al., Table 4)."""
    found = inspect_model(build_backbone(name))
    assert round(found.flops / 2e6) == million_mult_adds


def test_shared_layers_are_counted_once():
    block = build_backbone("resnet18").layer1[0]  # its ReLU module runs twice
    found = inspect_model(block, (8, 8), 64)
    relus = [r for r in found.rows if r.kind == "ReLU"]
    assert len(relus) == 2 and found.params == sum(p.numel() for p in block.parameters())


def run(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


def test_inspect_command(capsys):
    assert run(["inspect", "mobilenet_v1", "--arg", "small_input=true", "--arg", "num_classes=10",
                "--size", "32", "32", "--cell", "1", "1"]) == 0
    out = capsys.readouterr().out
    assert "features.26.0" in out and "1024x4x4" in out
    assert "total: 3,217,226 parameters" in out and "per 32x32x3 image" in out
    assert "receptive field 83, jump 8" in out
    assert run(["inspect", "resnet9"]) == 1 and "neither a model file nor an architecture" in capsys.readouterr().err
    assert run(["inspect", "resnet18", "--arg", "depth=3"]) == 1
    assert "cannot build resnet18" in capsys.readouterr().err


def test_inspect_a_model_file(tmp_path, capsys):
    import ocula
    from synthetic import class_folder

    data = class_folder(tmp_path / "shapes", size=16, per_class=9)
    ocula.train(str(data), "cnn", epochs=1, batch_size=9, widths=[4, 8], runs_dir=tmp_path, progress=False, threads=1)
    assert run(["inspect", str(tmp_path / "classify" / "shapes-cnn" / "model.ocula")]) == 0
    out = capsys.readouterr().out
    assert "per 16x16x3 image" in out and "head.3" in out  # the recorded input size, the cnn's last layer
