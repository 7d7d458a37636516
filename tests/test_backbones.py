"""Backbones: torchvision compatibility (names, shapes, numbers), the uniform face, FPN, weight loading, frozen
batch norm, ONNX."""

import copy
import functools
import importlib.util

import pytest
import torch
from torch import nn

from ocula.errors import OculaError
from ocula.models.backbones import (FPN, BackboneWithFPN, FrozenBatchNorm2d, build_backbone, freeze_batch_norm,
                                    list_backbones, load_weights)

NAMES = ["resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "vgg11_bn"]
FAMILIES = ["alexnet", "googlenet", "mobilenet_v1", "vgg11", "vgg16", "vgg16_bn"]  # no fixtures: test_families.py


@functools.cache
def reference_module(folder):
    """The fixtures' reference_weights.py, which is a plain file beside the JSON specs, not a package."""
    spec = importlib.util.spec_from_file_location("reference_weights", folder / "reference_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_registry_lists_every_backbone():
    assert list_backbones() == sorted(NAMES + FAMILIES)
    with pytest.raises(OculaError, match="unknown backbone 'resnet9'"):
        build_backbone("resnet9")


@pytest.mark.parametrize("name", NAMES)
def test_matches_torchvision(name, fixtures):
    ref = reference_module(fixtures / "torchvision")
    spec = ref.load_spec(name)
    with torch.device("meta"):  # no time spent on random init: every tensor is replaced below
        model = build_backbone(name)
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == [(k, s) for k, s in spec["keys"]]
    model.load_state_dict(ref.reference_state_dict(spec), strict=True, assign=True)
    with torch.no_grad():
        logits = model.eval()(ref.reference_input(spec["input_shape"]))
    # The stored logits are rounded to 1e-6 and barely depend on the input, so a loose tolerance would let
    # subtle slips through (MobileNetV3 with BatchNorm eps 1e-5 instead of 1e-3 is off by only 5e-5).
    assert (logits - torch.tensor(spec["logits"])).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", NAMES + FAMILIES)
def test_forward_features_levels(name):
    model = build_backbone(name, num_classes=0).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.zeros(1, 3, 64, 64))
        pooled = model(torch.zeros(1, 3, 64, 64))
    assert list(feats) == ["c2", "c3", "c4", "c5"]
    assert model.strides == {"c2": 4, "c3": 8, "c4": 16, "c5": 32}
    for i, (level, fmap) in enumerate(feats.items()):
        side = [15, 7, 3, 1][i] if name == "alexnet" else 64 // model.strides[level]  # unpadded 11x11 conv, pools
        assert fmap.shape == (1, model.out_channels[level], side, side), level
    assert pooled.shape == (1, model.num_features)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_one_channel_input(name):
    model = build_backbone(name, in_channels=1, num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


def test_group_norm_keeps_torchvision_names():
    bn = build_backbone("resnet18")
    gn = build_backbone("resnet18", norm_layer="group")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gn.modules())
    assert list(gn.state_dict()) == [k for k in bn.state_dict() if "running_" not in k and "num_batches" not in k]
    assert gn(torch.zeros(1, 3, 32, 32)).shape == (1, 1000)  # batch of one trains fine without BatchNorm
    with pytest.raises(OculaError, match="unknown norm_layer 'layer'"):
        build_backbone("vgg11_bn", norm_layer="layer")


def test_mobilenet_width_multiplier():
    thin = build_backbone("mobilenet_v2", width_mult=0.5, num_classes=0)
    assert thin.out_channels == {"c2": 16, "c3": 16, "c4": 48, "c5": 1280}
    assert build_backbone("mobilenet_v3_large", width_mult=0.75, num_classes=0).out_channels["c5"] == 720


def test_fpn_levels_and_odd_sizes():
    model = BackboneWithFPN(build_backbone("resnet18", num_classes=0), out_channels=32, extra_p6=True).eval()
    assert model.out_channels == 32
    assert model.strides == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 64, 96))
        odd = model(torch.zeros(1, 3, 70, 50))
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    for level, fmap in out.items():
        stride = model.strides[level]
        assert fmap.shape == (2, 32, -(-64 // stride), -(-96 // stride)), level  # sizes round up
    assert [tuple(m.shape[-2:]) for m in odd.values()] == [(18, 13), (9, 7), (5, 4), (3, 2), (2, 1)]


def test_fpn_takes_any_levels():
    fpn = FPN(in_channels={"c5": 8, "c3": 4, "c4": 6}, out_channels=5)
    feats = {"c3": torch.zeros(1, 4, 8, 8), "c4": torch.zeros(1, 6, 4, 4), "c5": torch.zeros(1, 8, 2, 2)}
    assert {k: tuple(v.shape) for k, v in fpn(feats).items()} == {
        "p3": (1, 5, 8, 8), "p4": (1, 5, 4, 4), "p5": (1, 5, 2, 2)}


def test_load_weights_pth_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    source = build_backbone("mobilenet_v3_small")
    torch.save({"model": source.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")  # a training checkpoint
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    for path in (tmp_path / "ckpt.pth", tmp_path / "w.safetensors"):
        target = load_weights(build_backbone("mobilenet_v3_small"), path)
        for key, value in source.state_dict().items():
            assert torch.equal(target.state_dict()[key], value), (path.name, key)


def test_load_weights_skip_head_for_fine_tuning(tmp_path):
    path = tmp_path / "imagenet.pth"
    source = build_backbone("resnet18")
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, path)  # saved from DDP
    with pytest.raises(OculaError, match="skip_head=True"):
        load_weights(build_backbone("resnet18", num_classes=10), path)
    target = build_backbone("resnet18", num_classes=10)
    fresh_fc = target.fc.weight.clone()
    load_weights(target, path, skip_head=True)
    assert torch.equal(target.fc.weight, fresh_fc)
    assert torch.equal(target.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    load_weights(build_backbone("resnet18", num_classes=0), path, skip_head=True)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])  # BatchNorm eps 1e-5 and 1e-3
def test_frozen_batch_norm_is_eval_batch_norm_in_training_mode(name, tmp_path):
    model = build_backbone(name, num_classes=0).double()  # float64: a deep net's rounding would hide small slips
    g = torch.Generator().manual_seed(0)
    for m in model.modules():  # statistics far from a fresh BatchNorm's, variances small enough for eps to matter
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5, generator=g)
            m.running_var.uniform_(1e-3, 2.0, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.normal_(0, 0.1, generator=g)
    reference = copy.deepcopy(model).eval()
    before = copy.deepcopy(model.state_dict())
    frozen = freeze_batch_norm(model).train()
    assert frozen is model and not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert list(frozen.state_dict()) == list(before)  # the same keys: checkpoints load either way
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out = frozen(x)
    for key, value in frozen.state_dict().items():
        assert torch.equal(value, before[key]), key  # running statistics (and the rest) untouched
    with torch.no_grad():
        torch.testing.assert_close(out, reference(x))
    torch.save(reference.state_dict(), tmp_path / "unfrozen.pth")
    reloaded = load_weights(freeze_batch_norm(build_backbone(name, num_classes=0).double()), tmp_path / "unfrozen.pth")
    assert all(torch.equal(v, before[k]) for k, v in reloaded.state_dict().items())


def test_frozen_batch_norm_keeps_the_input_dtype_and_rejects_what_it_cannot_freeze():
    bn = nn.BatchNorm2d(3)
    assert FrozenBatchNorm2d.from_batch_norm(bn)(torch.ones(1, 3, 2, 2, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert isinstance(freeze_batch_norm(bn), FrozenBatchNorm2d)
    with pytest.raises(OculaError, match="running statistics"):
        freeze_batch_norm(nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False)))


class Payload:
    """Something a weights file must not contain."""


def test_load_weights_errors_are_one_line(tmp_path):
    torch.save(build_backbone("resnet18", num_classes=0).state_dict(), tmp_path / "r18.pth")
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    torch.save({"payload": Payload()}, tmp_path / "pickled.pt")
    cases = {
        "broken.pth": "not a readable PyTorch or safetensors weights file",
        "pickled.pt": "does not unpickle",
        "missing.pth": "no such weights file",
        "r18.pth": "80 missing (layer1.2.conv1.weight",  # resnet18 weights into resnet34
    }
    for filename, expected in cases.items():
        with pytest.raises(OculaError) as info:
            load_weights(build_backbone("resnet34", num_classes=0), tmp_path / filename)
        message = str(info.value)
        assert expected in message and filename in message and "\n" not in message, message


def test_resnet18_onnx_dynamic_batch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = build_backbone("resnet18", num_classes=10).eval()
    path = tmp_path / "resnet18.onnx"
    torch.onnx.export(model, (torch.zeros(2, 3, 64, 64),), path, input_names=["x"], output_names=["logits"],
                      dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, dynamo=True, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            expected = model(x)
        got = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
        assert (got - expected).abs().max().item() < 1e-4
