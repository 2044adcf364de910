"""The convmat command, run as a user runs it: in a subprocess."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import convmat
from convmat import symbolic
from convmat.presentation import cli
from convmat.presentation.tour import steps

from .reference import conv_configs, conv_transpose_configs
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
    titles = [s.title for s in steps()]
    positions = [r.stdout.index(t) for t in titles]
    assert positions == sorted(positions) and len(titles) == 12
    assert r.stdout.count("checked:") == 12
    assert len(r.stdout.splitlines()) < 240
    # The two steps beyond the tutorial show their numbers in text: the three norms side by
    # side, and the input's scaled copies of the kernel adding up to the output.
    assert re.search(r"^16 x 16 +0\.\d{4} +1\.\d{4} +1\.\d{4}$", r.stdout, re.MULTILINE)
    assert "y = sum     1   2   5   4   9   6  13   8  12" in r.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["show", "--input", "2", "--kernel", "3"],
            "convmat: error: kernel_size 3 with dilation 1 spans 3 elements",
        ),
        (
            ["show", "--input", "x", "--kernel", "3"],
            "convmat show: error: argument --input: expected comma-separated ints >= 1, got 'x'",
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
        (["frobnicate"], "convmat: error: argument COMMAND: invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_one_line_exit_2(args, message):
    r = run(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith(message), r.stderr


LAYER = ["--input", "224,224", "--kernel", "3", "--padding", "1", "--in-channels", "64",
         "--out-channels", "64"]  # fmt: skip
SIZE_LINE = "W: 3211264 x 3211264 = (64 channels x 224 x 224) x (64 channels x 224 x 224)"


def test_shape_of_a_large_layer_builds_nothing():
    r = run("shape", *LAYER)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].endswith("= floor((224 + 1 + 1 - 1*(3 - 1) - 1) / 1) + 1 = 224")
    assert lines[-1] == SIZE_LINE and len(lines) == 3


def test_show_of_a_large_layer_prints_its_corners():
    r = run("show", *LAYER)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert SIZE_LINE in lines
    assert lines[-1] == "(3211264 x 3211264: showing 16 rows and 16 columns; '...' marks the rest)"
    grid = lines[lines.index("") + 1 : -1]
    assert len(grid) == 17  # 16 rows and the '...' row
    # Output (0, 0, 0) reads inputs (i, 0..1, 0..1) of channel 0 through taps 1..2 (padding 1).
    assert grid[0].lstrip("[ ").startswith("w[0,0,1,1],   w[0,0,1,2],")
    # The last output (63, 223, 223) reads inputs (i, 222..223, 222..223) through taps 0..1.
    assert grid[-1].endswith("w[63,63,1,0], w[63,63,1,1]]]")


def test_version_and_bare_command(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"convmat {convmat.__version__}\n"
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: convmat") and "shape" in out and "norm" in out


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_help():
    parser = cli._parser()
    commands = _subparsers(parser)
    assert set(commands) == {"show", "shape", "plot", "animate", "norm", "tour", "explore"}
    for name, sub in [("convmat", parser), *commands.items()]:
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, (name, action.option_strings)


def test_closed_pipe_ends_quietly():
    with subprocess.Popen([sys.executable, "-m", "convmat", "tour"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as p:  # fmt: skip
        p.stdout.close()  # as `| head` does, before the command writes
        err = p.stderr.read()
        code = p.wait(timeout=300)
    assert err == b""
    assert code == 141


def test_internal_error_is_one_line_and_status_1(capsys, monkeypatch):
    def broken(geo):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "_size_lines", broken)
    assert cli.main(["shape", "--input", "8", "--kernel", "3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("convmat: internal error: ZeroDivisionError: division by zero")
    assert "CONVMAT_DEBUG=1" in err


def test_transposed_shape(capsys):
    assert cli.main(["shape", "--input", "4", "--kernel", "3", "--stride", "2", "--transposed",
                     "--output-padding", "1", "--padding", "1"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("= (4 - 1)*2 - 1 - 1 + 1*(3 - 1) + 1 + 1 = 8")
    assert lines[1] == "W: 8 x 4 = (1 channels x 8) x (1 channels x 4)"


# -- --flip: the true convolution --------------------------------------------------------------


def _cli_args(cfg) -> list[str]:
    """The command's options for a drawn configuration."""
    ints = lambda v: ",".join(map(str, v))  # noqa: E731
    if isinstance(cfg.padding, str | int):
        padding = str(cfg.padding)
    elif isinstance(cfg.padding[0], tuple):
        padding = ",".join(f"{b}:{a}" for b, a in cfg.padding)
    else:
        padding = ints(cfg.padding)
    args = ["--input", ints(cfg.input_size), "--kernel", ints(cfg.kernel_size), "--stride",
            ints(cfg.stride), "--dilation", ints(cfg.dilation), "--padding", padding,
            "--in-channels", str(cfg.in_channels), "--out-channels", str(cfg.out_channels),
            "--groups", str(cfg.groups)]  # fmt: skip
    if cfg.transposed:
        return [*args, "--transposed", "--output-padding", ints(cfg.output_padding)]
    return [*args, "--padding-mode", cfg.padding_mode]


@settings(max_examples=30)
@given(cfg=st.one_of(conv_configs(), conv_transpose_configs()))
def test_show_flip_prints_symbolic_flip(cfg):
    kw = dict(in_channels=cfg.in_channels, out_channels=cfg.out_channels,
              transposed=cfg.transposed, **cfg.matrix_kwargs())  # fmt: skip
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["show", *_cli_args(cfg), "--flip"]) == 0
    text = str(symbolic(cfg.input_size, cfg.kernel_size, flip=True, **kw))
    assert out.getvalue().endswith(f"\n\n{text}\n")
    plain = io.StringIO()
    with contextlib.redirect_stdout(plain):
        assert cli.main(["show", *_cli_args(cfg)]) == 0
    # The sizes are those of the cross-correlation; only the labels change.
    assert plain.getvalue().split("\n\n")[0] == out.getvalue().split("\n\n")[0]
    assert plain.getvalue().endswith(f"\n\n{symbolic(cfg.input_size, cfg.kernel_size, **kw)}\n")


def test_flip_in_every_configuration_command(capsys, tmp_path):
    commands = _subparsers(cli._parser())
    for name in ("show", "shape", "plot", "animate"):
        assert "--flip" in commands[name].format_help(), name
    assert cli.main(["show", "--input", "5", "--kernel", "3", "--flip"]) == 0
    assert capsys.readouterr().out.endswith(
        "[[w3, w2, w1,  0,  0],\n [ 0, w3, w2, w1,  0],\n [ 0,  0, w3, w2, w1]]\n"
    )
    shape = ["shape", "--input", "7,6", "--kernel", "3,2", "--stride", "2", "--padding", "2:0,1"]
    assert cli.main(shape) == 0
    plain = capsys.readouterr().out
    assert cli.main([*shape, "--flip"]) == 0
    assert capsys.readouterr().out == plain


def test_plot_and_animate_with_flip(capsys, tmp_path):
    config = ["--input", "6", "--kernel", "3", "--stride", "2"]
    images = {}
    for flip in ([], ["--flip"]):
        png, gif = tmp_path / f"W{len(flip)}.png", tmp_path / f"a{len(flip)}.gif"
        assert cli.main(["plot", *config, *flip, "-o", str(png)]) == 0
        assert cli.main(["animate", *config, *flip, "-o", str(gif)]) == 0
        assert capsys.readouterr().out.splitlines()[-1] == f"wrote {gif} (2 frames)"
        with Image.open(png) as im, Image.open(gif) as an:
            assert an.n_frames == 2
            images[bool(flip)] = (np.asarray(im.convert("RGB")), np.asarray(an.convert("RGB")))
    # The same picture size, other colours: W's taps come in the other order.
    for plain, flipped in zip(images[False], images[True]):
        assert plain.shape == flipped.shape and not np.array_equal(plain, flipped)
