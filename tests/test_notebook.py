"""The tour notebook runs in a real Jupyter kernel, and convmat's pictures show there without
touching the user's matplotlib backend."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from convmat.presentation.tour import notebook_text, steps

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "tour.ipynb"
IMAGES = ("image/png", "image/svg+xml")


def execute(nb: nbformat.NotebookNode, cwd: Path) -> nbformat.NotebookNode:
    """Run every cell in a fresh python3 kernel (this interpreter's); any error fails."""
    client = NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()
    return nb


def shown(cell: nbformat.NotebookNode) -> set[str]:
    """The MIME types of what a cell displayed, plus ``"gif"`` for an inline GIF."""
    kinds = set()
    for out in cell.get("outputs", []):
        data = out.get("data", {})
        kinds.update(data)
        if "data:image/gif;base64," in data.get("text/html", ""):
            kinds.add("gif")
    return kinds


def text_of(cell: nbformat.NotebookNode) -> str:
    return "".join(out.get("text", "") for out in cell.get("outputs", []))


def test_committed_notebook_is_generated_from_the_tour():
    assert NOTEBOOK.read_text(encoding="utf-8") == notebook_text(), (
        "docs/tour.ipynb is out of date: run python -m convmat.presentation.tour docs/tour.ipynb"
    )
    nbformat.validate(nbformat.reads(notebook_text(), as_version=4))


def test_tour_notebook_runs_and_every_step_renders(tmp_path):
    nb = execute(nbformat.read(NOTEBOOK, as_version=4), tmp_path)
    cells = {cell["id"]: cell for cell in nb.cells}
    images = 0
    for i, step in enumerate(steps(), 1):
        code = cells[f"step{i}-code"]
        assert text_of(code).count("checked:") == 1, (step.title, code["outputs"])
        # The symbolic W shows as a table (or a tensor, for the numeric steps).
        assert shown(code) & {"text/html", "text/plain"}, step.title
        picture = shown(cells[f"step{i}-picture"])
        assert picture & {*IMAGES, "gif"}, (step.title, picture)
        images += bool(picture & set(IMAGES))
    assert images >= 1
    assert "<table>" in cells["step1-code"]["outputs"][-1]["data"]["text/html"]
    assert list(tmp_path.iterdir()) == []  # the tour writes no files


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
