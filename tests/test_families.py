"""The lecture's CNN families: parameter counts equal torchvision's, the MobileNet v1 / v2 layer tables row by row,
the 32x32 stems, width multipliers, and training them through the classify task."""

import json

import pytest
import torch
from torch import nn

from ocula.models import build
from ocula.models.backbones import build_backbone, list_backbones
from ocula.models.backbones.googlenet import Inception

# torchvision's published counts (the weights' "num_params"); the fixtures' key lists give the others.
PUBLISHED = {"alexnet": 61_100_840, "vgg11": 132_863_336, "vgg16": 138_357_544, "vgg16_bn": 138_365_992,
             "googlenet": 6_624_904}  # GoogLeNet without its auxiliary classifiers, as torchvision's weights
FIXTURES = ["resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small",
            "vgg11_bn"]
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def imagenet(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):  # counting needs no memory and no initialisation
        return build_backbone(name, **kwargs)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_equal_torchvisions_published(name):
    assert parameters(imagenet(name)) == PUBLISHED[name]


@pytest.mark.parametrize("name", FIXTURES)
def test_parameter_counts_equal_torchvisions_fixture(name, fixtures):
    spec = json.loads((fixtures / "torchvision" / f"{name}.json").read_text())
    expected = sum(torch.Size(shape).numel() for key, shape in spec["keys"] if not key.endswith(BUFFERS))
    assert parameters(imagenet(name)) == expected


def test_published_counts_of_the_fixture_models():
    """The figures quoted in the issue, independent of the fixtures."""
    assert parameters(imagenet("resnet18")) == 11_689_512
    assert parameters(imagenet("resnet50")) == 25_557_032
    assert parameters(imagenet("mobilenet_v2")) == 3_504_872


def layer_inputs(model: nn.Module, size: int) -> list[tuple[type, tuple, tuple]]:
    """(layer type, weight shape, input shape [C, H, W]) of each conv and linear layer, in execution order."""
    rows = []
    hooks = [m.register_forward_hook(lambda m, args, out: rows.append((type(m), tuple(m.weight.shape),
                                                                       tuple(args[0].shape[1:]))))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return rows


def test_mobilenet_v1_is_the_lectures_28_layer_table():
    # (type/stride, filter shape, input size) rows of the lecture's table, the 5x row written out.
    table = [("conv", 2, (32, 3, 3, 3), (224, 3)), ("dw", 1, (32, 1, 3, 3), (112, 32)),
             ("pw", 1, (64, 32, 1, 1), (112, 32)), ("dw", 2, (64, 1, 3, 3), (112, 64)),
             ("pw", 1, (128, 64, 1, 1), (56, 64)), ("dw", 1, (128, 1, 3, 3), (56, 128)),
             ("pw", 1, (128, 128, 1, 1), (56, 128)), ("dw", 2, (128, 1, 3, 3), (56, 128)),
             ("pw", 1, (256, 128, 1, 1), (28, 128)), ("dw", 1, (256, 1, 3, 3), (28, 256)),
             ("pw", 1, (256, 256, 1, 1), (28, 256)), ("dw", 2, (256, 1, 3, 3), (28, 256)),
             ("pw", 1, (512, 256, 1, 1), (14, 256))]
    table += [("dw", 1, (512, 1, 3, 3), (14, 512)), ("pw", 1, (512, 512, 1, 1), (14, 512))] * 5
    table += [("dw", 2, (512, 1, 3, 3), (14, 512)), ("pw", 1, (1024, 512, 1, 1), (7, 512)),
              ("dw", 1, (1024, 1, 3, 3), (7, 1024)), ("pw", 1, (1024, 1024, 1, 1), (7, 1024)),
              ("fc", 1, (1000, 1024), (1024,))]
    model = build_backbone("mobilenet_v1")
    rows = layer_inputs(model, 224)
    assert len(rows) == len(table) == 28
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for (kind, stride, weight, size), (layer, shape, seen), conv in zip(table, rows, convs + [None]):
        assert shape == weight
        assert seen == (size if kind == "fc" else (size[1], size[0], size[0]))
        if conv is not None:
            assert conv.stride == (stride, stride) and (conv.groups > 1) == (kind == "dw")
    assert parameters(imagenet("mobilenet_v1")) == 4_231_976  # the paper's 4.2M


@pytest.mark.parametrize("width, millions", [(1.0, 4.2), (0.75, 2.6), (0.5, 1.3), (0.25, 0.5)])
def test_mobilenet_v1_width_multipliers_match_the_paper(width, millions):
    """The paper's Table 6 (parameters at widths 1, 0.75, 0.5, 0.25), to its rounding."""
    model = imagenet("mobilenet_v1", width_mult=width)
    assert round(parameters(model) / 1e6, 1) == millions
    assert model.out_channels["c5"] == int(1024 * width)


def test_mobilenet_v2_is_the_lectures_bottleneck_table():
    # Input side and channels, t, c, n, s of each row of the lecture's table. The lecture prints 28^2 x 64 as the
    # 96-channel row's input; the row before it has stride 2 (28 -> 14), and the paper's Table 2 says 14^2.
    table = [(112, 32, 1, 16, 1, 1), (112, 16, 6, 24, 2, 2), (56, 24, 6, 32, 3, 2), (28, 32, 6, 64, 4, 2),
             (14, 64, 6, 96, 3, 1), (14, 96, 6, 160, 3, 2), (7, 160, 6, 320, 1, 1)]
    model = build_backbone("mobilenet_v2").eval()
    shapes = []
    hooks = [layer.register_forward_hook(lambda m, args, out: shapes.append((tuple(args[0].shape[1:]),
                                                                             tuple(out.shape[1:]))))
             for layer in model.features]
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    assert shapes[0] == ((3, 224, 224), (32, 112, 112))  # conv2d, 32, s 2
    blocks, index = model.features[1:-1], 0
    for size, k, t, c, n, s in table:
        for i in range(n):
            block = blocks[index]
            cin = k if i == 0 else c
            side = size if i == 0 else size // s
            assert shapes[1 + index] == ((cin, side, side), (c, size // s, size // s))
            depthwise = [m for m in block.modules() if isinstance(m, nn.Conv2d) and m.groups > 1][0]
            assert depthwise.in_channels == t * cin and depthwise.stride[0] == (s if i == 0 else 1)
            index += 1
    assert index == len(blocks) == 17
    assert shapes[-1] == ((320, 7, 7), (1280, 7, 7))  # conv2d 1x1, 1280


def test_googlenet_inception_blocks_follow_the_paper():
    model = imagenet("googlenet")
    widths = {name: m.out_channels for name, m in model.named_children() if isinstance(m, Inception)}
    assert widths == {"inception3a": 256, "inception3b": 480, "inception4a": 512, "inception4b": 512,
                      "inception4c": 512, "inception4d": 528, "inception4e": 832, "inception5a": 832,
                      "inception5b": 1024}


@pytest.mark.parametrize("name", list_backbones())
def test_small_input_stem(name):
    """A 32x32 image reaches the last conv at 4x4 (AlexNet's unpadded pools: 7x7; VGG keeps its pools: 2x2)."""
    model = build_backbone(name, num_classes=10, small_input=True).eval()
    last = {}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    hook = convs[-1].register_forward_hook(lambda m, args, out: last.update(side=out.shape[-1]))
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    hook.remove()
    assert last["side"] == {"alexnet": 7, "vgg11": 2, "vgg11_bn": 2, "vgg16": 2, "vgg16_bn": 2}.get(name, 4)
    # Only AlexNet and VGG change their layers (a smaller head); the others only their strides.
    assert parameters(model) <= parameters(build_backbone(name, num_classes=10))


def test_backbone_classifier_keeps_the_saved_resnet_layout():
    """Model files saved before the stems moved into the backbones hold these exact keys and shapes."""
    model = build("backbone-classifier", backbone="resnet18", num_classes=10, small_input=True)
    state = model.state_dict()
    assert state["net.conv1.weight"].shape == (64, 3, 3, 3) and not any("maxpool" in k for k in state)
    thin = build("backbone-classifier", backbone="mobilenet_v1", num_classes=10, small_input=True, width_mult=0.5)
    assert thin.net.out_channels["c3"] == 512


def test_train_cifar_sized_mobilenet_through_the_classify_task(tmp_path):
    """`ocula train DATA --model mobilenet_v2 --width-mult 0.25` on a tiny 32x32 colour folder: one epoch, saved,
    loaded, and the arguments recorded."""
    import ocula
    from synthetic import class_folder

    data = class_folder(tmp_path / "shapes", size=32, per_class=12)
    model = ocula.train(str(data), "mobilenet_v2", epochs=1, batch_size=6, width_mult=0.25, runs_dir=tmp_path,
                        progress=False, threads=1)
    args = model.info.args
    assert args["backbone"] == "mobilenet_v2" and args["small_input"] and args["width_mult"] == 0.25
    again = ocula.load(tmp_path / "classify" / "shapes-mobilenet_v2" / "model.ocula")
    # A quarter of 96 channels at stride 4; the 1280-wide last conv is kept at widths below 1, as in the paper.
    assert again.module.net.out_channels == model.module.net.out_channels == {"c2": 24, "c3": 1280}


def test_classify_stops_at_a_minutes_budget(tmp_path):
    """--minutes ends a classifier's run at the wall-clock budget, mid-epoch if need be."""
    import csv

    import ocula
    from synthetic import class_folder

    data = class_folder(tmp_path / "shapes", size=32, per_class=12)
    ocula.train(str(data), "resnet18", epochs=50, batch_size=4, minutes=0.05, runs_dir=tmp_path, progress=False,
                threads=1)
    with open(tmp_path / "classify" / "shapes-resnet18" / "metrics.csv", newline="") as f:
        epochs = len(list(csv.DictReader(f)))
    assert 1 <= epochs < 50


@pytest.mark.parametrize("name", ["mobilenet_v1", "mobilenet_v2", "mobilenet_v3_small", "resnet18", "googlenet"])
def test_fresh_batch_norms_see_unit_scale_inputs(name):
    """A BatchNorm's running variance starts at 1, so a fresh network must feed it inputs of about that variance:
    else eval mode divides by the wrong scale until the running statistics have forgotten their start. Kaiming
    fan-out counted over all groups (torch's formula) gives depthwise convs outputs of variance ~1 / channels,
    which made MobileNets trained for a few hundred steps predict one class in eval mode."""
    torch.manual_seed(0)
    model = build_backbone(name, num_classes=10, small_input=True).train()
    seen = []
    hooks = [m.register_forward_hook(lambda m, args, out: seen.append(float(args[0].var((0, 2, 3)).mean())))
             for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(torch.randn(16, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert min(seen) > 0.05, min(seen)
