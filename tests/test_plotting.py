"""plot_matrix and animate through the Python API."""

from __future__ import annotations

import base64
import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from convmat import ConvMatError, conv_matrix
from convmat.presentation.plotting import _tap_grid, animate, plot_matrix, save_figure
from convmat.presentation.symbolic import symbolic


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


def test_nothing_changes_the_backend_or_loads_pyplot(tmp_path):
    # In a fresh interpreter (the test process may already hold pyplot state).
    code = f"""
import sys, matplotlib
matplotlib.use("pdf")
import torch, convmat
fig = convmat.plot_matrix(input_size=6, kernel_size=3)
convmat.plot_matrix(torch.randn(4, 5))
convmat.animate({str(tmp_path / "a.gif")!r}, 5, 2)
fig._repr_png_()
assert matplotlib.get_backend() == "pdf", matplotlib.get_backend()
assert "matplotlib.pyplot" not in sys.modules
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_figure_shows_as_png_in_jupyter():
    fig = plot_matrix(input_size=6, kernel_size=3)
    data = fig._repr_png_()
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_draws_into_a_given_axes():
    from matplotlib.figure import Figure

    outer = Figure()
    left, right = outer.subplots(1, 2)
    assert plot_matrix(input_size=5, kernel_size=2, ax=right) is outer
    assert right.get_title() == "W" and left.get_title() == ""
    with pytest.raises(ConvMatError, match=r"ax must be a matplotlib Axes, got str"):
        plot_matrix(input_size=5, kernel_size=2, ax="right")


def test_huge_sparse_W_is_refused_before_it_is_made_dense():
    n = 10**6
    W = torch.sparse_coo_tensor(
        torch.tensor([[0, n - 1], [0, n - 1]]), torch.ones(2), (n, n), check_invariants=True
    )
    with pytest.raises(ConvMatError, match=r"W is 1000000 x 1000000, larger than max_size=4096"):
        plot_matrix(W)
    # Past a raised max_size, the memory guard refuses (8 TB), still before densifying.
    with pytest.raises(ConvMatError, match=r"picture of W needs 8,000,000,000,000 bytes"):
        plot_matrix(W, max_size=n)
    with pytest.raises(ConvMatError, match=r"W is 1 x 100000, larger than max_size=4096"):
        plot_matrix(input_size=100000, kernel_size=100000)


def test_complex_W_is_drawn_by_magnitude():
    W = torch.tensor([[3 + 4j, 0], [0, -1j]], dtype=torch.complex128)
    ax = plot_matrix(W).axes[0]
    assert ax.get_title() == "|W| (magnitude of a complex W)"
    assert ax.images[0].get_array().tolist() == [[5.0, 0.0], [0.0, 1.0]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(source=torch.ones(2, 3), input_size=4), r"a W tensor is drawn as it is"),
        (dict(source=torch.ones(2, 3), stride=2), r"a W tensor is drawn as it is"),
        (dict(source=torch.ones(2, 3, device="meta")), r"W is on the meta device"),
        (dict(source=torch.ones(0, 3)), r"at least one row and one column, got shape \(0, 3\)"),
        (dict(source=torch.ones(2, 3), max_size=0), r"max_size must be an int >= 1, got 0"),
        (
            dict(source=torch.ones(2, 3), max_size=True),
            r"max_size must be an int >= 1, got True",
        ),
        (
            dict(source=nn.Conv1d(1, 1, 3), input_size=5, stride=2),
            r"cannot be combined with a module",
        ),
        (dict(input_size=5), r"kernel_size is needed"),
        (
            dict(input_size=5, kernel_size=2, in_channels=1.5),
            r"in_channels must be an int >= 1, got 1.5",
        ),
    ],
)
def test_plot_errors(kwargs, message):
    with pytest.raises(ConvMatError, match=message):
        plot_matrix(**kwargs)


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['strides'\]"):
        plot_matrix(input_size=5, kernel_size=2, strides=2)


def test_nan_and_integer_W_draw():
    plot_matrix(torch.tensor([[float("nan"), 1.0], [-2.0, float("inf")]]))
    plot_matrix(torch.tensor([[1, 0], [0, 2]]))


def test_animation_displays_inline_and_writes_atomically(tmp_path):
    path = tmp_path / "conv.gif"
    anim = animate(path, 9, 3, stride=2)
    assert anim.frames == 4 and anim.path == path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv.gif"]  # no temporary left
    assert path.read_bytes() == anim.data
    page = anim._repr_html_()
    assert page.startswith('<img src="data:image/gif;base64,')
    data = base64.b64decode(page.split("base64,")[1].split('"')[0])
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "GIF" and im.n_frames == 4
    assert repr(anim).startswith("Animation(frames=4, ")
    nowhere = animate(None, (4, 4), 2, max_frames=3, fps=10)
    assert nowhere.path is None and nowhere.frames == 3
    nowhere.save(tmp_path / "later.GIF")
    with Image.open(tmp_path / "later.GIF") as im:
        assert im.n_frames == 3 and im.info["duration"] == 100


@pytest.mark.parametrize("name", ["max_frames", "fps"])
@pytest.mark.parametrize("value", [0, -1, True, 1.5, "3", None])
def test_animate_frame_arguments(tmp_path, name, value):
    allowed = "an int >= 1" if name == "max_frames" else "an int from 1 to 50"
    with pytest.raises(ConvMatError, match=rf"{name} must be {allowed}, got {value!r}"):
        animate(tmp_path / "a.gif", 6, 3, **{name: value})
    assert list(tmp_path.iterdir()) == []


def test_animate_fps_ceiling(tmp_path):
    with pytest.raises(ConvMatError, match=r"fps must be an int from 1 to 50, got 51"):
        animate(tmp_path / "a.gif", 6, 3, fps=51)


@pytest.mark.parametrize(
    ("where", "message"),
    [
        (".", r"got a directory"),
        ("missing/a.gif", r"is in a directory that does not exist"),
        ("a.png", r"path must end in \.gif, got '.*a\.png'"),
        ("a", r"path must end in \.gif"),
    ],
)
def test_animate_paths(tmp_path, where, message):
    with pytest.raises(ConvMatError, match=message):
        animate(tmp_path / where, 6, 3)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConvMatError, match=r"path must be a str or a path, got int"):
        animate(3, 6, 3)


def test_save_figure(tmp_path):
    fig = plot_matrix(input_size=6, kernel_size=3)
    assert save_figure(fig, tmp_path / "W.png") == tmp_path / "W.png"
    with Image.open(tmp_path / "W.png") as im:
        assert im.format == "PNG"
    for bad, message in [(tmp_path, "got a directory"), (tmp_path / "W.xyz", r"\.png or \.svg or \.pdf"),
                         (tmp_path / "no" / "W.png", "does not exist")]:  # fmt: skip
        with pytest.raises(ConvMatError, match=message):
            save_figure(fig, bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["W.png"]


def test_a_failed_write_leaves_nothing(tmp_path):
    class Broken:
        def savefig(self, f, **kwargs):
            f.write(b"partial")
            raise OSError(28, "No space left on device")

    with pytest.raises(ConvMatError, match=r"cannot write '.*W\.png': No space left on device"):
        save_figure(Broken(), tmp_path / "W.png")
    assert list(tmp_path.iterdir()) == []
