"""UNet: any input size, binary / multi-class heads, the seed's parameter count, ONNX export with dynamic H and W."""

import numpy as np
import pytest
import torch

from ocula.models.unet import UNet, build_unet, count_parameters

SMALL = dict(widths=(4, 8, 16, 32))  # same code paths as the real widths, a fraction of the cost


def test_seed_matches_the_documents_parameter_count():
    # The notes' Keras summary: 7,846,081 for a grayscale input; RGB adds 2 x 9 x 32 first-layer weights.
    assert count_parameters(build_unet("unet-seed", in_channels=1)) == 7_846_081
    assert count_parameters(build_unet("unet-seed")) == 7_846_081 + 2 * 9 * 32


def test_default_unet_is_a_quarter_of_the_seed():
    n = count_parameters(build_unet("unet"))
    assert n == 2_074_417
    assert n < count_parameters(build_unet("unet-seed")) / 3


@pytest.mark.parametrize("size", [(37, 53), (128, 128), (500, 700), (1, 1)])
@pytest.mark.parametrize("kw", [dict(norm="batch", residual=True), dict(upsample="transpose", norm="group"),
                                dict(upsample="nearest", dropout=0.2)])
def test_any_input_size_comes_back_the_same_size(size, kw):
    model = UNet(**SMALL, **kw).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 1, *size)


def test_multi_class_logits_and_gradients():
    model = UNet(in_channels=1, num_classes=4, **SMALL, norm="batch", residual=True)
    x = torch.randn(2, 1, 45, 30)
    out = model(x)
    assert out.shape == (2, 4, 45, 30)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_odd_sizes_are_zero_padded_then_cropped():
    # 37x53 must equal running the net on the input zero-padded to 40x56 (multiples of 2**3), cropped back.
    model = UNet(**SMALL).eval()
    x = torch.randn(1, 3, 37, 53)
    with torch.no_grad():
        padded = model(torch.nn.functional.pad(x, (0, 56 - 53, 0, 40 - 37)))
        assert torch.allclose(model(x), padded[..., :37, :53], atol=1e-6)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError):
        UNet(norm="layer")
    with pytest.raises(ValueError):
        build_unet("unet-huge")


def _onnx_parity(tmp_path, model, *, dynamo: bool, example_size, sizes):
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "unet.onnx"
    example = (torch.randn(1, 3, *example_size),)
    if dynamo:
        h, w = torch.export.Dim("H", min=1, max=4096), torch.export.Dim("W", min=1, max=4096)
        torch.onnx.export(model, example, path, dynamo=True, input_names=["image"], output_names=["logits"],
                          dynamic_shapes={"x": {2: h, 3: w}})
    else:
        torch.onnx.export(model, example, path, dynamo=False, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "N", 2: "H", 3: "W"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for size in sizes:
        x = torch.randn(1, 3, *size)
        (got,) = session.run(None, {"image": x.numpy()})
        with torch.no_grad():
            want = model(x).numpy()
        assert got.shape == want.shape
        assert np.abs(got - want).max() < 1e-4


@pytest.mark.filterwarnings("ignore")
def test_onnx_export_keeps_h_and_w_dynamic(tmp_path):
    # Exported at 128x128 (no padding needed); 500x700 and 37x53 only work if the pad was traced, not frozen.
    _onnx_parity(tmp_path, build_unet("unet", **SMALL).eval(), dynamo=True, example_size=(128, 128),
                 sizes=[(128, 128), (500, 700), (37, 53)])


@pytest.mark.filterwarnings("ignore")
def test_onnx_legacy_exporter_and_the_seed(tmp_path):
    # The seed exports too (dropout vanishes in eval mode). Small sizes: the full seed at 500x700 costs seconds.
    _onnx_parity(tmp_path, build_unet("unet-seed").eval(), dynamo=False, example_size=(64, 64),
                 sizes=[(64, 64), (37, 53)])
