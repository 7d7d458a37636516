"""Receptive field / jump / start of small nets against numbers worked out by hand."""

import pytest
import torch
from torch import nn

from ocula.errors import OculaError
from ocula.models.detection.receptive_field import RFRow, feature_cell_box, receptive_field


def vgg_like():
    conv = lambda cin, cout: nn.Conv2d(cin, cout, 3, padding=1)  # noqa: E731
    return nn.Sequential(conv(3, 4), nn.ReLU(), conv(4, 4), nn.ReLU(), nn.MaxPool2d(2),
                         conv(4, 8), nn.ReLU(), conv(8, 8), nn.ReLU(), nn.MaxPool2d(2))


def test_vgg_like_stack_by_hand():
    rows = receptive_field(vgg_like(), (32, 32))
    # r_out = r_in + (k-1) j_in, j_out = j_in s, start_out = start_in + ((k-1)/2 - p) j_in, from (1, 1, 0.5)
    assert rows == [
        RFRow("0", 3, 1, 1, 3.0, 1.0, 0.5),
        RFRow("2", 3, 1, 1, 5.0, 1.0, 0.5),
        RFRow("4", 2, 2, 0, 6.0, 2.0, 1.0),
        RFRow("5", 3, 1, 1, 10.0, 2.0, 1.0),
        RFRow("7", 3, 1, 1, 14.0, 2.0, 1.0),
        RFRow("9", 2, 2, 0, 16.0, 4.0, 2.0),
    ]
    last = rows[-1]
    assert feature_cell_box(last, 0, 0) == (-6.0, -6.0, 10.0, 10.0)
    assert feature_cell_box(last, 1, 2) == (2.0, -2.0, 18.0, 14.0)  # centre x = 2 + 2 * 4, y = 2 + 4


def test_alexnet_first_layers_dilation_and_same_padding():
    net = nn.Sequential(nn.Conv2d(3, 4, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, stride=2),
                        nn.Conv2d(4, 4, 3, dilation=2, padding="same"), nn.Conv2d(4, 4, (1, 3)))
    rows = receptive_field(net, (64, 64))
    assert (rows[0].r, rows[0].j, rows[0].start) == (11.0, 4.0, 3.5)  # 0.5 + (5 - 2) * 1
    assert (rows[1].r, rows[1].j, rows[1].start) == (19.0, 8.0, 7.5)  # 11 + 2 * 4; 3.5 + 1 * 4
    # dilation 2: effective kernel 5, "same" padding 2
    assert (rows[2].padding, rows[2].r, rows[2].j, rows[2].start) == (2, 51.0, 8.0, 7.5)
    # a 1x3 kernel only grows the width
    assert (rows[3].kernel, rows[3].r, rows[3].start) == ((1, 3), (51.0, 67.0), (7.5, 15.5))
    assert feature_cell_box(rows[3], 0, 0) == (15.5 - 33.5, 7.5 - 25.5, 15.5 + 33.5, 7.5 + 25.5)


class Block(nn.Module):
    """Residual block with a strided 1x1 shortcut conv: it must start from the block input, not the main path."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.conv_b = nn.Conv2d(4, 4, 3, padding=1)
        self.shortcut = nn.Conv2d(3, 4, 1, stride=2)
        self.after = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv_b(torch.relu(self.conv_a(x)))
        return self.after(torch.relu(y + self.shortcut(x)))


def test_residual_shortcut_does_not_compound():
    rows = {r.name: r for r in receptive_field(Block(), (16, 16))}
    assert (rows["conv_a"].r, rows["conv_a"].j) == (3.0, 2.0)
    assert (rows["conv_b"].r, rows["conv_b"].j) == (7.0, 2.0)
    assert (rows["shortcut"].r, rows["shortcut"].j, rows["shortcut"].start) == (1.0, 2.0, 0.5)
    assert (rows["after"].r, rows["after"].j) == (11.0, 2.0)  # continues from the wider main path


def test_restores_mode_and_rejects_models_without_layers():
    net = vgg_like().train()
    receptive_field(net, (8, 8))
    assert net.training
    with pytest.raises(OculaError):
        receptive_field(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), (2, 2))
