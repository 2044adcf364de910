"""The tour notebook, docs/tour.ipynb: stored executed (with its pictures and printed matrices, so
it reads on a code host without a kernel) and generated from the one source,
convmat/presentation/tour.py; it runs in a real Jupyter kernel, and convmat's pictures show there
without touching the user's matplotlib backend.

How the stored outputs are checked: the tour is run again in a fresh kernel (once per session,
the generator's own way, :func:`execute_notebook`) and compared with the stored notebook.

- Text must be equal: printed output, ``text/plain`` and ``text/html`` of every cell, in order,
  and the execution counts.
- Pictures (PNG figures, and GIF animations inline in HTML): when the installed matplotlib and
  pillow are the versions recorded in the notebook (``metadata.convmat.outputs_made_with``), the
  whole file must be byte for byte what the generator writes now, pictures included; they are
  deterministic (Agg, seeded random numbers, no dates or timings in the file). Under other
  versions, whose renderers may move a pixel, each picture must be there, in the same format
  and place, with the same pixel size within 2% (a GIF also with the same number of frames).
"""

from __future__ import annotations

import base64
import io
import itertools
import re
from pathlib import Path

import nbformat
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from nbclient import NotebookClient
from PIL import Image

from convmat import ConvMatError
from convmat.presentation import tour
from convmat.presentation.tour import (
    execute_notebook,
    notebook,
    notebook_text,
    picture_versions,
    plot_scatter,
    plot_spectrum,
    steps,
)

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "tour.ipynb"
IMAGES = ("image/png", "image/svg+xml")
GIF = re.compile(r"data:image/gif;base64,([A-Za-z0-9+/=]+)")
REGENERATE = "run python -m convmat.presentation.tour docs/tour.ipynb"


def execute(nb: nbformat.NotebookNode, cwd: Path) -> nbformat.NotebookNode:
    """Run every cell in a fresh python3 kernel (this interpreter's); any error fails."""
    client = NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()
    return nb


def joined(value: str | list[str]) -> str:
    return value if isinstance(value, str) else "".join(value)


def shown(cell) -> set[str]:
    """The MIME types of what a cell displayed, plus ``"gif"`` for an inline GIF."""
    kinds = set()
    for out in cell.get("outputs", []):
        data = out.get("data", {})
        kinds.update(data)
        if "data:image/gif;base64," in joined(data.get("text/html", "")):
            kinds.add("gif")
    return kinds


def text_of(cell) -> str:
    return "".join(joined(out.get("text", "")) for out in cell.get("outputs", []))


def split_pictures(output: dict) -> tuple[dict, list[tuple[str, tuple[int, int], int]]]:
    """An output without its pictures' bytes, and its pictures as ``(format, size, frames)``.

    A PNG's bytes are dropped; a GIF's data URI in HTML is replaced by a marker; the byte count
    in an Animation's ``text/plain`` is masked (it is the GIF's size)."""
    rest = {key: value for key, value in output.items() if key != "data"}
    pictures = []
    data = {}
    for key, value in output.get("data", {}).items():
        value = joined(value)
        if key == "image/png":
            with Image.open(io.BytesIO(base64.b64decode(value))) as im:
                pictures.append(("PNG", im.size, 1))
            continue
        if key == "text/html":
            for encoded in GIF.findall(value):
                with Image.open(io.BytesIO(base64.b64decode(encoded))) as im:
                    pictures.append(("GIF", im.size, im.n_frames))
            value = GIF.sub("data:image/gif;base64,<GIF>", value)
        if key == "text/plain" and value.startswith("Animation("):
            value = re.sub(r"[\d,]+ bytes", "<n> bytes", value)
        data[key] = value
    if "data" in output:
        rest["data"] = data
    if "text" in rest:
        rest["text"] = joined(rest["text"])
    return rest, pictures


def close_size(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return all(abs(x - y) <= max(2, 0.02 * max(x, y)) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """The tour run now in a fresh Jupyter kernel, as the generator stores it."""
    cwd = tmp_path_factory.mktemp("kernel")
    nb = execute_notebook(cwd=cwd)
    assert list(cwd.iterdir()) == []  # the tour writes no files
    return nb


@pytest.fixture(scope="module")
def stored():
    return nbformat.reads(NOTEBOOK.read_text(encoding="utf-8"), as_version=4)


def test_committed_notebook_has_the_tours_cells(stored):
    nbformat.validate(stored)
    made = notebook()
    assert [(c.cell_type, c.id, c.source) for c in stored.cells] == [
        (c["cell_type"], c["id"], "".join(c["source"])) for c in made["cells"]
    ], f"docs/tour.ipynb's cells are not the tour's: {REGENERATE}"
    metadata = {k: v for k, v in stored.metadata.items() if k != "convmat"}
    assert metadata == made["metadata"]
    assert set(stored.metadata.convmat.outputs_made_with) == set(picture_versions())


def test_committed_notebook_is_stored_executed(stored):
    """It reads without a kernel: every code cell has run and shows something; every step's
    picture is in the file; nothing in it changes from one run to the next."""
    code = [c for c in stored.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    cells = {c.id: c for c in stored.cells}
    for i, step in enumerate(steps(), 1):
        assert text_of(cells[f"step{i}-code"]).count("checked:") == 1, step.title
        assert shown(cells[f"step{i}-picture"]) & {*IMAGES, "gif"}, step.title
    for cell in code:  # printed output kept as one, however the kernel cut it into messages
        kinds = [(out.output_type, out.get("name")) for out in cell.outputs]
        assert all(a != b or a[0] != "stream" for a, b in itertools.pairwise(kinds)), cell.id
    text = NOTEBOOK.read_text(encoding="utf-8")
    assert not re.search(r"\b0x[0-9a-f]{6,}", text)  # no memory addresses in reprs
    assert '"execution": {' not in text and "iopub" not in text  # no timings
    assert "Traceback" not in text and '"name": "stderr"' not in text


def test_stored_outputs_are_what_the_tour_shows_now(stored, fresh):
    made = nbformat.from_dict(fresh)
    assert len(stored.cells) == len(made.cells), REGENERATE
    for old, new in zip(stored.cells, made.cells):
        if old.cell_type != "code":
            continue
        assert old.get("execution_count") == new.get("execution_count"), (old.id, REGENERATE)
        assert len(old.outputs) == len(new.outputs), (old.id, REGENERATE)
        for a, b in zip(old.outputs, new.outputs):
            (rest_a, pictures_a), (rest_b, pictures_b) = split_pictures(a), split_pictures(b)
            assert rest_a == rest_b, (old.id, f"stale output: {REGENERATE}")
            assert [(f, n) for f, _, n in pictures_a] == [(f, n) for f, _, n in pictures_b], old.id
            for (_, size_a, _), (_, size_b, _) in zip(pictures_a, pictures_b):
                assert close_size(size_a, size_b), (old.id, size_a, size_b, REGENERATE)
    if stored.metadata.convmat.outputs_made_with == picture_versions():
        # The same renderers: the file is byte for byte what the generator writes now.
        assert NOTEBOOK.read_text(encoding="utf-8") == notebook_text(fresh), REGENERATE


def test_notebook_file_is_written_as_nbformat_writes_it(fresh):
    """Saving it again in Jupyter changes nothing but what Jupyter adds."""
    text = notebook_text(fresh)
    assert nbformat.writes(nbformat.reads(text, as_version=4)) + "\n" == text


def test_tour_notebook_runs_and_every_step_renders(fresh):
    nb = nbformat.from_dict(fresh)
    cells = {cell["id"]: cell for cell in nb.cells}
    images = 0
    for i, step in enumerate(steps(), 1):
        code = cells[f"step{i}-code"]
        assert text_of(code).count("checked:") == 1, (step.title, code["outputs"])
        # The symbolic W as a table, a tensor, or a printed table of numbers.
        assert shown(code) & {"text/html", "text/plain"} or text_of(code).count("\n") > 3
        picture = shown(cells[f"step{i}-picture"])
        assert picture & {*IMAGES, "gif"}, (step.title, picture)
        images += bool(picture & set(IMAGES))
        for out in code.outputs + cells[f"step{i}-picture"].outputs:
            assert out.output_type != "error" and out.get("name") != "stderr", (step.title, out)
    assert images >= 1
    assert "<table>" in joined(cells["step1-code"]["outputs"][-1]["data"]["text/html"])


def test_tour_has_the_steps_in_the_tutorials_order():
    titles = [s.title.split(". ", 1)[1] for s in steps()]
    assert [s.title.split(". ", 1)[0] for s in steps()] == [str(i) for i in range(1, 13)]
    order = [
        "A convolution is a matrix",
        "Channels",
        "A 2-D convolution is a 1-D one with rows as channels",
        "What spectral_norm divides by is not the layer's norm",
        "The transposed convolution is W transposed",
        "The transposed convolution scatters the kernel",
    ]
    assert [titles.index(t) for t in order] == sorted(titles.index(t) for t in order)


def test_a_failing_cell_is_named(tmp_path):
    nb = {**notebook(), "cells": [tour._cell("code", "print(1)", "fine"),
                                  tour._cell("code", "1 / 0", "boom")]}  # fmt: skip
    with pytest.raises(ConvMatError, match="cell 'boom' of the notebook failed: ZeroDivisionError"):
        execute_notebook(nb, cwd=tmp_path)


def test_generator_command(tmp_path, capsys):
    path = tmp_path / "tour.ipynb"
    assert tour.main(["--no-execute", str(path)]) == 0
    assert path.read_text(encoding="utf-8") == notebook_text()
    assert capsys.readouterr().out == f"wrote {path}\n"
    assert tour.main([]) == 2
    assert "usage: python -m convmat.presentation.tour" in capsys.readouterr().err
    assert tour.main(["--no-execute", str(tmp_path / "missing" / "tour.ipynb")]) == 2
    assert capsys.readouterr().err.startswith("convmat tour: error: path ")


# -- the tour's own pictures, read back and checked against torch --------------------------


@settings(max_examples=15, deadline=None)
@given(
    x=st.lists(st.integers(-5, 5), min_size=1, max_size=6),
    w=st.lists(st.integers(-5, 5), min_size=1, max_size=4),
    stride=st.integers(1, 4),
    dilation=st.integers(1, 3),
)
def test_scatter_picture_is_the_transposed_convolution(x, w, stride, dilation):
    xs, taps = torch.tensor(x, dtype=torch.float64), torch.tensor(w, dtype=torch.float64)
    fig = plot_scatter(xs, taps, stride=stride, dilation=dilation)
    ax = fig.axes[0]
    y = F.conv_transpose1d(xs.view(1, 1, -1), taps.view(1, 1, -1), stride=stride,
                           dilation=dilation).flatten()  # fmt: skip
    n = len(x)
    cells = {}
    for text in ax.texts:
        j, i = (round(v) for v in text.get_position())
        assert (i, j) not in cells
        cells[i, j] = text.get_text()
    # Input i's copy: x_i * w_t at output i * stride + t * dilation, and nothing else in its row.
    copies = {
        (i, i * stride + t * dilation): f"{x[i]:.3g}·w{t + 1}\n= {x[i] * w[t]:.3g}"
        for i in range(n)
        for t in range(len(w))
    }
    assert {key: value for key, value in cells.items() if key[0] < n} == copies
    assert [cells[n, j] for j in range(len(y))] == [f"{v + 0.0:.3g}" for v in y.tolist()]
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"y{j + 1}" for j in range(len(y))]


def test_spectrum_picture():
    s = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64)
    fig = plot_spectrum(s, {"one": 1.0, "half": 0.5}, title="T")
    ax = fig.axes[0]
    assert ax.lines[0].get_ydata().tolist() == [3.0, 2.0, 1.0, 0.5]
    assert [line.get_ydata()[0] for line in ax.lines[1:]] == [1.0, 0.5]
    assert ax.get_legend_handles_labels()[1] == [
        "4 singular values", "one = 1 (2 above)", "half = 0.5 (3 above)"
    ]  # fmt: skip
    assert ax.get_title() == "T"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: plot_scatter([1.0], torch.ones(3)), "x must be a 1-D tensor, got list"),
        (
            lambda: plot_scatter(torch.ones(2, 2), torch.ones(3)),
            r"x must be a non-empty 1-D .*\(2, 2\)",
        ),
        (lambda: plot_scatter(torch.ones(0), torch.ones(3)), r"x must be a non-empty 1-D .*\(0,\)"),
        (
            lambda: plot_scatter(torch.ones(3), torch.ones(3, dtype=torch.complex64)),
            "weight must hold real",
        ),
        (
            lambda: plot_scatter(torch.tensor([1.0, float("nan")]), torch.ones(3)),
            "x must be finite",
        ),
        (lambda: plot_scatter(torch.ones(3), torch.ones(3), stride=0), "stride"),
        (lambda: plot_scatter(torch.ones(3), torch.ones(3), dilation=-1), "dilation"),
        (lambda: plot_scatter(torch.ones(33), torch.ones(1)), "at most 32 inputs .* got 33 inputs"),
        (
            lambda: plot_scatter(torch.ones(30), torch.ones(3), stride=4),
            "at most 32 inputs and 96 outputs, got 30 inputs and 119",
        ),
        (lambda: plot_spectrum(torch.ones(2, 2)), "values must be a non-empty 1-D"),
        (
            lambda: plot_spectrum(torch.ones(2), {"a": float("inf")}),
            r"marks\['a'\] must be a finite real number, got inf",
        ),
        (
            lambda: plot_spectrum(torch.ones(2), {"a": True}),
            r"marks\['a'\] must be a finite real number, got True",
        ),
    ],
)
def test_tour_pictures_refuse_bad_input(call, message):
    with pytest.raises(ConvMatError, match=message):
        call()


USER_NOTEBOOK = [
    "import matplotlib\nb = matplotlib.get_backend()\nimport torch, convmat",
    "convmat.plot_matrix(input_size=6, kernel_size=3)",
    "convmat.plot_matrix(torch.randn(4, 5))",
    "convmat.animate(None, 6, 3, stride=2)",
    "assert matplotlib.get_backend() == b, (b, matplotlib.get_backend())\nprint(b)",
    "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([1, 2, 3])\nplt.show()",
]


def test_users_backend_and_plots_are_untouched(tmp_path):
    # A fresh kernel: pyplot is not imported, so only convmat's own display makes the PNGs.
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in USER_NOTEBOOK])
    nb = execute(nb, tmp_path)
    kinds = [shown(cell) for cell in nb.cells]
    assert "image/png" in kinds[1] and "image/png" in kinds[2]
    assert "gif" in kinds[3]
    assert "inline" in text_of(nb.cells[4])  # the kernel's default, matplotlib_inline
    assert "image/png" in kinds[5]  # the user's own pyplot figure still shows
