"""Each compression method on a small cnn trained on the 8x8 digits: the file shrinks as claimed, accuracy is kept,
the written file loads and predicts as the compressed module did, and bad input is a one-line error."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import ocula
from ocula.compression import QUANTIZED, distillation_loss, CompressConfig
from ocula.compression.layers import BinaryConv2d, binarize, make_layer
from ocula.compression.lowrank import _initialise
from ocula.compression.quantize import FakeInt8, quantize_int8, simulate_int8, strip_simulation
from ocula.data import registry
from ocula.engine.trainer import TrainConfig
from ocula.errors import OculaError
from ocula.modelfile import read_model_file, save_model
from ocula.tasks import classify


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 16-32 cnn trained on the digits' training split (the seeded 10 % validation held out), as a file."""
    train = registry.load("digits", "train")
    fit, val = classify.split_validation(train, 0.1, 0)
    config = TrainConfig(epochs=10, batch_size=64, lr=3e-3, seed=0)
    model, info, _ = classify.train_cnn(fit, config, val=val, progress=False,
                                        arch_args=classify.cnn_args(fit, widths=[16, 32]))
    info.preprocess["dataset"] = "digits"
    path = save_model(tmp_path_factory.mktemp("base") / "base.ocula", model, info)
    return path, ocula.load(path, device="cpu").evaluate()["accuracy"]


@pytest.fixture(scope="module")
def test_images():
    return classify.to_tensor(registry.load("digits", "test").images)


def compressed(base, tmp_path, method, **settings):
    suffix = ".onnx" if method in QUANTIZED else ".ocula"
    model = ocula.compress(base[0], method, tmp_path / f"{method}{suffix}", progress=False, device="cpu",
                           **{"epochs": 4, "lr": 3e-3, **settings})
    return model, model.evaluate()["accuracy"]


def test_magnitude_pruning_stores_the_sparse_weights_in_a_smaller_file(base, tmp_path):
    model, accuracy = compressed(base, tmp_path, "magnitude", amount=0.8)
    weights = [m.weight for m in model.module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros >= 0.79  # fine-tuning kept the pruned weights at zero
    # 1 mask bit per weight and 4 bytes per survivor: about (1/32 + 0.2) of the dense weights' bytes
    assert model.summary["bytes"] < 0.4 * model.summary["source_bytes"]
    assert accuracy >= base[1] - 0.03
    _, tensors, _ = read_model_file(model.path)
    assert tensors["features.1.0.weight:mask"].dtype == torch.uint8


def test_structured_pruning_rebuilds_a_physically_smaller_network(base, tmp_path, test_images):
    model, accuracy = compressed(base, tmp_path, "structured", amount=0.3, epochs=6)
    s = model.summary
    assert s["flops"] <= 0.7 * s["source_flops"] and s["bytes"] < s["source_bytes"]
    convs = [m for m in model.module.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] < [16, 16, 32, 32] and model.info.arch == "compressed"
    assert accuracy >= base[1] - 0.05
    assert _onnx_parity(model, tmp_path, test_images) < 1e-3


def test_pruning_spares_the_layers_whose_loss_says_they_are_sensitive():
    from ocula.compression import flops
    from ocula.compression.pruning import allocate_widths, prune_filters
    from ocula.models.classifiers import SmallCNN

    model, x = SmallCNN(widths=[16, 32]).eval(), torch.zeros(1, 1, 16, 16)
    first = "features.0.0"

    def loss(m):  # narrowing the first conv costs much, every other conv a little per channel removed
        convs = {name: c.out_channels for name, c in m.named_modules() if isinstance(c, nn.Conv2d)}
        return 10.0 * (convs[first] < 16) + 0.01 * (16 + 16 + 32 + 32 - sum(convs.values()))

    widths = allocate_widths(model, x, 0.4, loss)
    assert widths[first] == 16 and min(widths.values()) < 16
    before = flops(model, x)
    prune_filters(model, widths)
    assert flops(model, x) <= 0.6 * before


@pytest.mark.parametrize("method, rank", [("tucker", 0.5), ("cp", 0.75)])
def test_low_rank_factorisation_cuts_flops_and_keeps_accuracy(base, tmp_path, test_images, method, rank):
    model, accuracy = compressed(base, tmp_path, method, amount=rank, epochs=6)
    assert model.summary["flops"] < 0.75 * model.summary["source_flops"]
    assert any(isinstance(m, nn.Sequential) and len(m) in (3, 4) and isinstance(m[0], nn.Conv2d)
               and m[0].kernel_size == (1, 1) for m in model.module.modules())
    assert accuracy >= base[1] - 0.06
    assert _onnx_parity(model, tmp_path, test_images) < 1e-3


def test_tucker_and_svd_at_full_rank_reproduce_the_layer():
    torch.manual_seed(0)
    conv, linear = nn.Conv2d(6, 5, 3, padding=1, bias=True), nn.Linear(12, 7)
    for old, spec, x in ((conv, {"tucker": [6, 5]}, torch.randn(2, 6, 8, 8)), (linear, {"svd": 7}, torch.randn(3, 12))):
        new = make_layer(old, spec)
        _initialise(new, old, spec, seed=0)
        assert torch.allclose(new(x), old(x), atol=1e-4)


@pytest.mark.parametrize("method", ["bwn", "xnor"])
def test_binarized_weights_are_stored_as_one_bit(base, tmp_path, test_images, method):
    model, accuracy = compressed(base, tmp_path, method, epochs=6)
    _, tensors, _ = read_model_file(model.path)
    conv = model.module.features[1][0]
    assert tensors["features.1.0.weight:signs"].numel() == conv.weight.numel() // 8  # 16*16*9 bits
    w = conv.weight.detach()
    assert torch.allclose(w.abs(), w.abs().amax((1, 2, 3), keepdim=True))  # +-alpha per filter
    assert isinstance(model.module.features[1][1], nn.Identity)  # its batch norm folded into alpha and a bias
    assert model.summary["bytes"] < model.summary["source_bytes"] / 6
    assert accuracy >= (base[1] - 0.05 if method == "bwn" else 0.3)  # XNOR-Net binarizes activations too
    assert _onnx_parity(model, tmp_path, test_images) < 1e-3


@pytest.mark.parametrize("binary_inputs", [False, True])
def test_a_batch_norm_folds_into_the_binary_conv_before_it(binary_inputs):
    torch.manual_seed(0)
    conv = BinaryConv2d(4, 6, 3, padding=1, bias=False, binary_inputs=binary_inputs)
    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.weight.uniform_(-2, 2), bn.bias.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 4, 9, 9)
    folded = conv.fold(bn)
    assert torch.allclose(folded(x), bn(conv(x)), atol=1e-5)
    w = folded.weight.detach()
    assert torch.allclose(binarize(w), w)  # still binary: +-alpha per filter


def test_distillation_trains_a_smaller_student(base, tmp_path):
    model, accuracy = compressed(base, tmp_path, "distill", epochs=10, batch_size=32)
    assert model.info.args["widths"] == [8, 16] and model.summary["bytes"] < model.summary["source_bytes"] / 2
    assert accuracy > 0.85


def test_distillation_from_any_classifier_needs_the_students_widths(base, tmp_path):
    teacher, _ = compressed(base, tmp_path, "tucker")  # a 'compressed' network: no cnn widths to scale
    with pytest.raises(OculaError, match="give the student's widths"):
        compressed((teacher.path,), tmp_path, "distill", epochs=1)
    student, accuracy = compressed((teacher.path,), tmp_path, "distill", epochs=10, batch_size=32, widths=[8, 8])
    assert student.info.arch == "cnn" and student.info.args["widths"] == [8, 8] and accuracy > 0.6  # chance: 0.1


def test_distillation_loss_is_hinton_kd():
    teacher = nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    config = CompressConfig(temperature=2.0, alpha=0.7)
    loss = distillation_loss(teacher, config)
    assert float(loss(teacher, x, y)) == pytest.approx(0.3 * float(nn.functional.cross_entropy(teacher(x), y)),
                                                       rel=1e-5)  # a student equal to its teacher: no soft loss
    student = nn.Linear(4, 3)
    p, q = (teacher(x) / 2).softmax(1), (student(x) / 2).softmax(1)
    kl = float((p * (p.log() - q.log())).sum(1).mean())
    expected = 0.7 * 4 * kl + 0.3 * float(nn.functional.cross_entropy(student(x), y))
    assert float(loss(student, x, y)) == pytest.approx(expected, rel=1e-4)


def test_int8_onnx_is_smaller_loads_and_agrees_with_float(base, tmp_path, test_images):
    model, accuracy = compressed(base, tmp_path, "int8", calibration=256)
    assert model.path.suffix == ".onnx" and model.summary["bytes"] < 0.6 * model.summary["source_bytes"]
    float_model = ocula.load(base[0], device="cpu")
    with torch.no_grad():
        agree = (model.module(test_images).argmax(1) == float_model.module(test_images).argmax(1)).float().mean()
    assert agree >= 0.97 and accuracy >= base[1] - 0.02
    assert model.predict(np.zeros((8, 8)))[0].name in model.info.classes
    pytest.importorskip("fastapi")
    from ocula.serve.models import load_served

    served = load_served([model.path])["int8"]
    assert served.runtime == "onnx" and served.model.predict(np.zeros((8, 8)))[0].name in model.info.classes


def test_qat_fine_tunes_through_int8_rounding_into_an_int8_onnx(base, tmp_path, test_images):
    model, accuracy = compressed(base, tmp_path, "qat", calibration=256, epochs=2)
    s = model.summary
    assert s["method"] == "qat" and s["epoch_seconds"] > 0 and s["bytes"] < 0.6 * s["source_bytes"]
    assert model.path.suffix == ".onnx" and accuracy >= base[1] - 0.02


def test_simulated_int8_rounds_weights_as_onnx_runtime_does(base, tmp_path, test_images):
    import onnx
    from onnx import numpy_helper

    float_model = ocula.load(base[0], device="cpu").module
    sim = simulate_int8(copy.deepcopy(float_model))
    layers = {n: m for n, m in sim.named_modules() if isinstance(m, FakeInt8)}
    assert len(layers) == 5 and not any(isinstance(m, nn.BatchNorm2d) for m in sim.modules())  # 4 convs folded
    sim.train()
    with torch.no_grad():  # a training pass sets the activation ranges; the weights stay as they are
        sim(test_images[:128])
    sim.eval()
    with torch.no_grad():
        agree = (sim(test_images).argmax(1) == float_model.eval()(test_images).argmax(1)).float().mean()
    assert agree >= 0.97
    x = test_images[:8].requires_grad_()
    sim(x).sum().backward()  # straight through the rounding, to the inputs and to every layer's float weights
    assert x.grad.abs().sum() > 0 and all(m.layer.weight.grad.abs().sum() > 0 for m in layers.values())

    quantize_int8(strip_simulation(copy.deepcopy(sim)), [test_images[:64].numpy()], tmp_path / "q.onnx")
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for name, layer in layers.items():
        w = layer.layer.weight.detach()
        scale = w.abs().amax(dim=tuple(range(1, w.dim()))) / 127
        ours = torch.fake_quantize_per_channel_affine(w, scale, torch.zeros_like(scale, dtype=torch.int32), 0,
                                                      -127, 127)
        q, scale = tensors[f"{name}.weight_quantized"], tensors[f"{name}.weight_scale"]
        assert q.dtype == np.int8
        theirs = q.astype(np.float32) * scale.reshape(-1, *[1] * (q.ndim - 1))
        np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-6)


def test_bad_input_is_a_one_line_error(base, tmp_path):
    with pytest.raises(OculaError, match="unknown compression method"):
        ocula.compress(base[0], "zip", tmp_path / "x.ocula")
    with pytest.raises(OculaError, match="int8 writes a .onnx file"):
        ocula.compress(base[0], "int8", tmp_path / "x.ocula")
    with pytest.raises(OculaError, match="model file not found"):
        ocula.compress(tmp_path / "missing.ocula", "bwn", tmp_path / "x.ocula")
    with pytest.raises(OculaError, match="amount must be between 0 and 1"):
        ocula.compress(base[0], "magnitude", tmp_path / "x.ocula", amount=1.5, device="cpu")
    with pytest.raises(OculaError, match="unknown option"):
        ocula.compress(base[0], "magnitude", tmp_path / "x.ocula", ratio=0.5)
    svc, info = classify.fit_svc(registry.load("digits", "train"))
    info.preprocess["dataset"] = "digits"
    save_model(tmp_path / "svc.ocula", svc, info)
    with pytest.raises(OculaError, match="compress takes a network; this is a classify svc"):
        ocula.compress(tmp_path / "svc.ocula", "bwn", tmp_path / "x.ocula")
    from ocula.export.onnx import export_onnx

    export_onnx(ocula.load(base[0], device="cpu").module, tmp_path / "plain.onnx")
    with pytest.raises(OculaError, match="without ocula metadata"):
        ocula.load(tmp_path / "plain.onnx")


def _onnx_parity(model, tmp_path, x) -> float:
    from ocula.export.onnx import check_parity

    path = model.export("onnx", tmp_path / "exported.onnx").split(" ")[0]
    return check_parity(model.module, path, x)
