"""Bad ``convmat`` invocations: each prints exactly one line on stderr, nothing on stdout, no
traceback, exits with status 2 and leaves no file behind.

Every row runs in-process through ``main(argv)``; a representative subset also runs as a user
runs it, in subprocesses (a few at a time).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn

from convmat.presentation.cli import main

BIG = "99999999999999999999"  # more than int64 holds
C = ["--input", "8", "--kernel", "3"]  # a valid configuration
C2 = ["--input", "8,8", "--kernel", "3"]

FACTORIES = """\
import sys
from torch import nn

CONSTANT = 42


def raises():
    raise RuntimeError("boom\\nsecond line")


def exits():
    sys.exit(0)


def exits_text():
    sys.exit("bye")


def needs_arg(x):
    return x


def not_module():
    return 3


def conv():
    return nn.Conv2d(1, 1, 3)
"""

CUSTOM = """\
from torch import nn


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 1, 3)

    def forward(self, x):
        return self.c(x)
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of inputs: factories, broken modules, good and bad saved files."""
    d = tmp_path_factory.mktemp("cli_errors")
    (d / "factories.py").write_text(FACTORIES)
    (d / "custom_mod.py").write_text(CUSTOM)
    (d / "badimport.py").write_text('raise ValueError("bad at import")\n')
    (d / "exitimport.py").write_text("import sys\nsys.exit(3)\n")
    (d / "adir").mkdir()
    (d / "adir.pt").mkdir()
    (d / "empty.pt").write_bytes(b"")
    (d / "garbage.pt").write_bytes(b"not a torch file\n" * 20)
    torch.save(torch.ones(3), d / "tensor.pt")
    torch.save([1, 2], d / "list.pt")
    torch.save({"a": [1]}, d / "dictlist.pt")
    conv = nn.Conv2d(1, 1, 3)
    torch.save(conv.state_dict(), d / "state.pt")
    torch.save(nn.Linear(2, 2).state_dict(), d / "otherstate.pt")
    torch.save(nn.Sequential(conv), d / "model.pt")
    torch.save(nn.Sequential(conv), d / "legacy.pt", _use_new_zipfile_serialization=False)
    sys.path.insert(0, str(d))
    try:
        custom = importlib.import_module("custom_mod")
        torch.save(custom.Custom(), d / "custom.pt")
    finally:
        sys.path.remove(str(d))
        sys.modules.pop("custom_mod", None)
    return d


def _norm(*args: str) -> list[str]:
    return ["norm", *args]


# (argv, a part of the one line on stderr)
ROWS: list[tuple[list[str], str]] = [
    # -- the command and its arguments
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["--frob"], "the following arguments are required: COMMAND"),
    (["show"], "the following arguments are required: --input, --kernel"),
    (["show", "--input", "8"], "required: --kernel"),
    (["show", "--kernel", "3"], "required: --input"),
    (["show", *C, "--unknown"], "unrecognized arguments: --unknown"),
    (["shape", *C, "extra"], "unrecognized arguments: extra"),
    (["tour", "extra"], "unrecognized arguments: extra"),
    (["show", "--input"], "expected one argument"),
    # -- sizes
    (["show", "--input", "x", "--kernel", "3"], "--input: expected comma-separated ints >= 1"),
    (["show", "--input", "", "--kernel", "3"], "--input: expected comma-separated ints >= 1"),
    (["show", "--input", "0", "--kernel", "3"], "--input: expected comma-separated ints >= 1"),
    (["show", "--input", "-3", "--kernel", "3"], "--input: expected comma-separated ints >= 1"),
    (["show", "--input", "8,,8", "--kernel", "3"], "--input: expected comma-separated ints"),
    (["show", "--input", "2.5", "--kernel", "3"], "--input: expected comma-separated ints"),
    (["show", "--input", BIG, "--kernel", "3"], "is too large"),
    (["shape", "--input", BIG, "--kernel", "3"], "is too large"),
    (["plot", "--input", BIG, "--kernel", "3", "-o", "W.png"], "is too large"),
    (["shape", "--input", "1,2,3,4", "--kernel", "1"], "--input must have 1, 2 or 3 values"),
    (["show", "--input", "4611686018427387904", "--kernel", "3"], "too large to label"),
    (["show", "--input", "2", "--kernel", "3"], "kernel_size 3 with dilation 1 spans 3"),
    (["show", "--input", "8", "--kernel", "0"], "--kernel: expected comma-separated ints >= 1"),
    (["show", "--input", "8", "--kernel", "2,2"], "--kernel must have one value or one per"),
    (["show", "--input", "8", "--kernel", BIG], "is too large"),
    (["show", *C, "--stride", BIG], "is too large"),
    (["shape", *C, "--stride", BIG], "is too large"),
    (["show", *C, "--stride", "0"], "--stride: expected comma-separated ints >= 1"),
    (["show", *C2, "--stride", "1,1,1"], "--stride must have one value or one per"),
    (["show", *C, "--dilation", "0"], "--dilation: expected comma-separated ints >= 1"),
    (["show", *C, "--dilation", BIG], "is too large"),
    (["show", *C, "--dilation", "5"], "spans 11 elements"),
    # -- padding
    (["show", *C, "--padding", "-1"], "--padding: expected an int >= 0"),
    (["show", *C, "--padding", "x"], "--padding: expected an int >= 0"),
    (["show", *C, "--padding", "1:2:3"], "--padding: a pair is before:after"),
    (["show", *C2, "--padding", "1,2,3"], "--padding must have one value or one per"),
    (["show", *C, "--padding", BIG], "is too large"),
    (["show", *C, "--padding", "same", "--stride", "2"], "padding='same' is only defined"),
    (["show", *C, "--padding-mode", "foo"], "--padding-mode: invalid choice: 'foo'"),
    (["show", *C, "--padding", "8", "--padding-mode", "reflect"], "reflect padding must be"),
    (["show", *C, "--padding", "9", "--padding-mode", "circular"], "circular padding must be"),
    # -- channels and groups
    (["show", *C, "--in-channels", "0"], "--in-channels: must be >= 1"),
    (["show", *C, "--in-channels", "1.5"], "--in-channels: expected an int, got '1.5'"),
    (["show", *C, "--out-channels", "-2"], "--out-channels: must be >= 1"),
    (["show", *C, "--in-channels", BIG], "is too large"),
    (["show", *C, "--groups", "0"], "--groups: must be >= 1"),
    (["show", *C, "--groups", "x"], "--groups: expected an int"),
    (
        ["show", *C, "--groups", "2", "--in-channels", "3", "--out-channels", "2"],
        "--in-channels (3) must be divisible by --groups (2)",
    ),
    (
        ["shape", *C, "--groups", "2", "--in-channels", "2", "--out-channels", "3"],
        "--out-channels (3) must be divisible by --groups (2)",
    ),
    # -- transposed
    (["show", *C, "--output-padding", "1"], "--output-padding applies to a transposed"),
    (["shape", *C, "--output-padding", "0"], "--output-padding applies to a transposed"),
    (["show", *C, "--transposed", "--padding-mode", "reflect"], "--padding-mode must be 'zeros'"),
    (["show", *C, "--transposed", "--padding", "same"], "or 'valid', got 'same'"),
    (
        ["show", *C, "--transposed", "--stride", "2", "--output-padding", "2"],
        "output_padding must be >= 0 and smaller than either stride or dilation",
    ),
    (["show", *C, "--transposed", "--output-padding", "-1"], "--output-padding: expected"),
    (["shape", *C, "--transposed", "--same"], "--same is the padding of an ordinary"),
    (
        ["show", "--input", "1", "--kernel", "1", "--padding", "1", "--transposed"],
        "output size",
    ),
    # -- plot
    (["plot", *C, "-o", "W.xyz"], "-o 'W.xyz' ends in '.xyz'"),
    (["plot", *C, "-o", "W"], "-o 'W' has no extension"),
    (["plot", *C, "-o", "W.gif"], "must end in .png, .svg or .pdf"),
    (["plot", *C, "-o", "adir"], "-o 'adir' is a directory"),
    (["plot", *C, "-o", "adir/"], "is a directory"),
    (["plot", *C, "-o", ""], "-o must name a file"),
    (["plot", *C, "-o", "missing/W.png"], "the directory 'missing' does not exist"),
    (["plot", *C, "-o"], "expected one argument"),
    (["plot", *C], "required: -o/--output"),
    (["plot", "--input", "5000", "--kernel", "3", "-o", "W.png"], "W is 4998 x 5000"),
    # -- animate
    (["animate", *C, "-o", "a.png"], "must end in .gif"),
    (["animate", *C, "-o", "a"], "-o 'a' has no extension"),
    (["animate", *C, "-o", "adir"], "-o 'adir' is a directory"),
    (["animate", *C, "-o", "missing/a.gif"], "the directory 'missing' does not exist"),
    (["animate", *C, "-o", "a.gif", "--max-frames", "0"], "--max-frames: must be >= 1"),
    (["animate", *C, "-o", "a.gif", "--max-frames", "-1"], "--max-frames: must be >= 1"),
    (["animate", *C, "-o", "a.gif", "--max-frames", "x"], "--max-frames: expected an int"),
    (["animate", *C, "-o", "a.gif", "--max-frames", BIG], "is too large"),
    (["animate", "--input", "4,4,4", "--kernel", "2", "-o", "a.gif"], "1-D and 2-D"),
    # -- norm: the model
    (_norm("--input", "3"), "required: --model"),
    (_norm("--model", "resnet", "--input", "3"), "must be MODULE:FACTORY"),
    (_norm("--model", "missing.pt", "--input", "3"), "file 'missing.pt' does not exist"),
    (_norm("--model", "adir", "--input", "3"), "must be MODULE:FACTORY"),
    (_norm("--model", "adir.pt", "--input", "3"), "'adir.pt' is not a file"),
    (_norm("--model", "no_such_module_xyz:f", "--input", "3"), "cannot import"),
    (_norm("--model", "missing.py:f", "--input", "3"), "cannot import 'missing.py'"),
    (_norm("--model", "factories.py:raises", "--input", "3"), "raised RuntimeError: boom"),
    (_norm("--model", "factories.py:exits", "--input", "3"), "called sys.exit(0)"),
    (_norm("--model", "factories.py:exits_text", "--input", "3"), "called sys.exit('bye')"),
    (_norm("--model", "factories.py:nothing", "--input", "3"), "has no attribute 'nothing'"),
    (_norm("--model", "factories.py:needs_arg", "--input", "3"), "callable without arguments"),
    (_norm("--model", "factories.py:not_module", "--input", "3"), "must give an nn.Module"),
    (_norm("--model", "factories.py:CONSTANT", "--input", "3"), "must give an nn.Module"),
    (_norm("--model", "badimport.py:f", "--input", "3"), "failed: ValueError: bad at import"),
    (_norm("--model", "badimport:f", "--input", "3"), "failed: ValueError: bad at import"),
    (_norm("--model", "exitimport.py:f", "--input", "3"), "called sys.exit(3)"),
    (_norm("--model", "garbage.pt", "--input", "3"), "is not a file saved with torch.save"),
    (_norm("--model", "empty.pt", "--input", "3"), "'empty.pt' is empty"),
    (_norm("--model", "state.pt", "--input", "1,5,5"), "holds a state_dict, not a model"),
    (_norm("--model", "legacy.pt", "--input", "1,5,5"), "torch's legacy format"),
    (_norm("--model", "custom.pt", "--input", "1,5,5"), "needs custom_mod.Custom"),
    (_norm("--model", "factories.py:conv", "--input", "5,8,8"), "does not run"),
    # -- norm: the weights
    (_norm("--model", "factories.py:conv", "--input", "1,5,5", "--weights", "tensor.pt"),
     "holds a Tensor, not a state_dict"),
    (_norm("--model", "factories.py:conv", "--input", "1,5,5", "--weights", "list.pt"),
     "holds a list, not a state_dict"),
    (_norm("--model", "factories.py:conv", "--input", "1,5,5", "--weights", "empty.pt"),
     "'empty.pt' is empty"),
    (_norm("--model", "factories.py:conv", "--input", "1,5,5", "--weights", "garbage.pt"),
     "is not a file saved with torch.save"),
    (_norm("--model", "factories.py:conv", "--input", "1,5,5", "--weights", "missing.pt"),
     "does not exist"),
    (_norm("--model", "factories.py:conv", "--input", "1,5,5", "--weights", "dictlist.pt"),
     "its entry 'a' is a list"),
    (_norm("--model", "factories.py:conv", "--input", "1,5,5", "--weights", "otherstate.pt"),
     "does not fit the model"),
    (_norm("--model", "factories.py:conv", "--input", "1,5,5", "--weights", "model.pt"),
     "holds a model, not a state_dict"),
    # -- norm: the numbers
    (_norm("--model", "factories.py:conv", "--input", "1,5,5", "--tol", "-1"), "--tol: must be"),
    (_norm("--model", "factories.py:conv", "--input", "1,5,5", "--tol", "nan"), "--tol: must be"),
    (_norm("--model", "factories.py:conv", "--input", "1,5,5", "--tol", "inf"), "--tol: must be"),
    (_norm("--model", "factories.py:conv", "--input", "1,5,5", "--tol", "0"), "--tol: must be"),
    (_norm("--model", "factories.py:conv", "--input", "1,5,5", "--tol", "x"), "--tol: expected"),
    (_norm("--model", "factories.py:conv", "--input", "1,5,5", "--width", "1"), "--width: must be"),
    (_norm("--model", "factories.py:conv", "--input", "1,5,5", "--width", "0"), "--width: must be"),
    (_norm("--model", "factories.py:conv", "--input", "1,5,5", "--width", "x"), "--width: expected"),
    (_norm("--model", "factories.py:conv", "--input", "1,5,5", "--width", "1e-3", "--tol", "1e-3"),
     "not allowed with argument"),
    (_norm("--model", "factories.py:conv", "--input", "0"), "--input: expected"),
    (_norm("--model", "factories.py:conv", "--input", BIG), "is too large"),
]  # fmt: skip

#: Rows also run in subprocesses, as a user runs them: one of each kind of mistake.
SUBPROCESS = [
    "frobnicate",
    f"show --input {BIG} --kernel 3",
    f"shape --input 8 --kernel 3 --stride {BIG}",
    "show --input 8 --kernel 3 --output-padding 1",
    "shape --input 8 --kernel 3 --groups 2 --in-channels 2 --out-channels 3",
    "plot --input 8 --kernel 3 -o W.xyz",
    "plot --input 8 --kernel 3 -o adir",
    "animate --input 8 --kernel 3 -o a.gif --max-frames 0",
    "norm --model factories.py:raises --input 3",
    "norm --model factories.py:exits --input 3",
    "norm --model badimport.py:f --input 3",
    "norm --model garbage.pt --input 3",
    "norm --model legacy.pt --input 1,5,5",
    "norm --model factories.py:conv --input 1,5,5 --weights tensor.pt",
    "norm --model factories.py:conv --input 1,5,5 --weights empty.pt",
    "norm --model factories.py:conv --input 1,5,5 --tol nan",
]
_BY_ARGS = {" ".join(argv): (argv, message) for argv, message in ROWS}


def _listing(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def _check(code: int, out: str, err: str, message: str) -> None:
    assert code == 2, (code, err)
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.endswith("\n"), err
    assert message in err, err
    assert out == "", out


def test_table_is_large():
    assert len(ROWS) >= 100 and len(set(SUBPROCESS)) >= 15
    assert set(SUBPROCESS) <= set(_BY_ARGS)


@pytest.mark.parametrize(("argv", "message"), ROWS, ids=[" ".join(a)[:60] for a, _ in ROWS])
def test_bad_invocation_in_process(argv, message, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the command may add the cwd
    before = _listing(workdir)
    code = main(argv)
    out, err = capsys.readouterr()
    _check(code, out, err, message)
    assert _listing(workdir) == before


def test_bad_invocations_in_subprocesses(workdir):
    before = _listing(workdir)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(key: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "convmat", *_BY_ARGS[key][0]],
                              capture_output=True, text=True, timeout=300, cwd=workdir,
                              env=env)  # fmt: skip

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(run, SUBPROCESS))
    for key, r in zip(SUBPROCESS, results):
        _check(r.returncode, r.stdout, r.stderr, _BY_ARGS[key][1])
    assert _listing(workdir) == before
