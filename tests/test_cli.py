"""The convmat command, run as a user runs it: in a subprocess."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from convmat.presentation.tour import steps

from .test_symbolic import STRIDE_2


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "convmat", *args], capture_output=True, text=True, timeout=120
    )


def test_show():
    r = run("show", "--input", "10", "--kernel", "3", "--stride", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == (
        "dim 0: out = floor((in + pad_before + pad_after - dilation*(kernel - 1) - 1) / stride)"
        " + 1 = floor((10 + 0 + 0 - 1*(3 - 1) - 1) / 2) + 1 = 4"
    )
    assert r.stdout.rstrip().endswith(STRIDE_2)


def test_show_two_dims_transposed_and_pairs():
    r = run(
        "show", "--input", "4,5", "--kernel", "3", "--padding", "1:0,2", "--padding-mode", "reflect"
    )
    assert r.returncode == 0, r.stderr
    assert "stride) + 1 = floor((5 + 2 + 2 - 1*(3 - 1) - 1) / 1) + 1 = 7" in r.stdout
    assert "W: 21 x 20" in r.stdout
    r = run(
        "show",
        "--input",
        "3",
        "--kernel",
        "2",
        "--stride",
        "2",
        "--transposed",
        "--output-padding",
        "1",
    )
    assert r.returncode == 0, r.stderr
    assert "= (3 - 1)*2 - 0 - 0 + 1*(2 - 1) + 1 + 1 = 7" in r.stdout


def test_shape_same():
    r = run("shape", "--input", "10", "--kernel", "3", "--stride", "2", "--same")
    assert r.returncode == 0, r.stderr
    assert (
        r.stdout.splitlines()[-1] == "same padding (out = ceil(in / stride)): ((0, 1),) -> out (5,)"
    )
    assert "[[" not in r.stdout


def test_plot_writes_png(tmp_path):
    out = tmp_path / "W.png"
    r = run(
        "plot",
        "--input",
        "4,4",
        "--kernel",
        "2",
        "--in-channels",
        "2",
        "--out-channels",
        "2",
        "-o",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_animate_writes_gif_with_stated_frames(tmp_path):
    out = tmp_path / "conv.gif"
    r = run("animate", "--input", "9", "--kernel", "3", "--stride", "2", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"wrote {out} (4 frames)"
    with Image.open(out) as im:
        assert im.format == "GIF" and im.n_frames == 4
    capped = tmp_path / "capped.gif"
    r = run("animate", "--input", "6,6", "--kernel", "3", "--max-frames", "5", "-o", str(capped))
    assert r.returncode == 0, r.stderr
    with Image.open(capped) as im:
        assert im.n_frames == 5


def test_tour():
    r = run("tour")
    assert r.returncode == 0, r.stderr
    titles = [t for t, _, _ in steps()]
    positions = [r.stdout.index(t) for t in titles]
    assert positions == sorted(positions) and len(titles) == 10
    assert r.stdout.count("checked:") == 10
    assert len(r.stdout.splitlines()) < 200


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["show", "--input", "2", "--kernel", "3"],
            "convmat: error: kernel_size 3 with dilation 1 spans 3 elements",
        ),
        (
            ["show", "--input", "x", "--kernel", "3"],
            "convmat show: error: argument --input: expected comma-separated ints, got 'x'",
        ),
        (
            ["show", "--kernel", "3"],
            "convmat show: error: the following arguments are required: --input",
        ),
        (
            ["show", "--input", "8", "--kernel", "3", "--stride", "2", "--padding", "same"],
            "convmat: error: padding='same' is only defined for stride 1",
        ),
        (
            ["show", "--input", "8", "--kernel", "3", "--transposed", "--padding-mode", "reflect"],
            "convmat: error: --padding-mode must be 'zeros' for a transposed convolution",
        ),
        (
            ["plot", "--input", "8", "--kernel", "3", "-o", "/nonexistent/dir/W.png"],
            "convmat: error:",
        ),
        (["frobnicate"], "convmat: error: argument command: invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_one_line_exit_2(args, message):
    r = run(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith(message), r.stderr
