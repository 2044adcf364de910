"""plot_matrix and animate through the Python API."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from convmat.presentation.symbolic import symbolic
from PIL import Image
from torch import nn

from convmat import ConvMatError, conv_matrix
from convmat.presentation.plotting import _tap_grid, animate, plot_matrix


def test_every_kernel_entry_keeps_one_colour():
    sym = symbolic((4, 4), 2, in_channels=2, out_channels=3, padding=1, padding_mode="circular")
    grid = _tap_grid(sym)
    w = torch.arange(1.0, 1.0 + 3 * 2 * 4, dtype=torch.float64).view(3, 2, 2, 2)
    W = conv_matrix(w, (4, 4), padding=1, padding_mode="circular")
    # Cells of one colour (one weight entry, no folding) hold one value of W.
    for colour in grid.unique().tolist():
        if colour < 0 or colour != int(colour):
            continue
        assert W[grid == colour].unique().numel() == 1
    assert torch.equal(grid < 0, W == 0)


def test_sources(tmp_path):
    fig = plot_matrix(torch.randn(6, 8))
    assert fig.axes[0].get_ylabel() == "output y (6 rows)"
    fig = plot_matrix(conv_matrix(torch.randn(2, 1, 3), 5, layout=torch.sparse_csr))
    fig = plot_matrix(nn.Conv2d(2, 2, 3, padding=1, groups=2), (4, 4))
    lines = [ln for ln in fig.axes[0].get_lines()]
    assert len(lines) == 2  # one horizontal and one vertical channel boundary
    fig.savefig(tmp_path / "W.svg")
    assert (tmp_path / "W.svg").read_text().lstrip().startswith("<?xml")
    fig.savefig(tmp_path / "W.png")
    with Image.open(tmp_path / "W.png") as im:
        assert im.format == "PNG"
        assert np.asarray(im).std() > 0


def test_errors():
    with pytest.raises(
        ConvMatError, match=r"source must be a tensor, a convolution module or None, got str"
    ):
        plot_matrix("W")
    with pytest.raises(ConvMatError, match=r"W must be a matrix, got shape \(2, 2, 2\)"):
        plot_matrix(torch.ones(2, 2, 2))
    with pytest.raises(ConvMatError, match=r"larger than max_size=100"):
        plot_matrix(input_size=200, kernel_size=3, max_size=100)
    with pytest.raises(ConvMatError, match=r"animate shows 1-D and 2-D convolutions, got 3-D"):
        animate("x.gif", (3, 3, 3), 2)
