"""Pictures of W: heatmaps and sliding-window animations (matplotlib, imported lazily).

Install with ``pip install "convmat[plot]"``.

Nothing here touches pyplot or the matplotlib backend: figures are drawn with the
object-oriented API (a :class:`~matplotlib.figure.Figure` on an Agg canvas), so the user's own
``plt`` plots and backend stay as they were. A returned figure shows itself as a PNG when it is
the last expression of a Jupyter cell, and an :class:`Animation` as an inline GIF.
"""

from __future__ import annotations

import base64
import functools
import html
import inspect
import io
import math
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._errors import ConvMatError
from ..engine import Geometry, check_allocation, check_count, check_int
from .symbolic import SymbolicMatrix, symbolic

__all__ = ["Animation", "animate", "plot_matrix", "save_figure"]

#: Frames of an animation by default; larger outputs show their first positions.
MAX_FRAMES = 48
#: The fastest frame rate a GIF plays reliably (its delays count hundredths of a second).
MAX_FPS = 50
#: The picture formats :func:`save_figure` writes, by file extension.
FIGURE_FORMATS = (".png", ".svg", ".pdf")

_CPU = torch.device("cpu")


@functools.cache
def _matplotlib() -> tuple[type, type]:
    """``(Figure class, FigureCanvasAgg)``: the one place matplotlib is imported. The Figure
    class renders itself as a PNG for IPython, with or without pyplot's inline backend."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConvMatError('plotting needs matplotlib: pip install "convmat[plot]"') from None

    class InlineFigure(Figure):
        """A matplotlib Figure that Jupyter displays as a PNG (``_repr_png_``)."""

        def _repr_png_(self) -> bytes:
            buffer = io.BytesIO()
            self.savefig(buffer, format="png", bbox_inches="tight")
            return buffer.getvalue()

    # Reachable by name, so that the figures pickle like any matplotlib figure.
    InlineFigure.__module__, InlineFigure.__qualname__ = __name__, "InlineFigure"
    globals()["InlineFigure"] = InlineFigure
    return InlineFigure, FigureCanvasAgg


def _new_figure(figsize: tuple[float, float]) -> Any:
    figure_class, canvas_class = _matplotlib()
    fig = figure_class(figsize=figsize)
    canvas_class(fig)  # attaches itself as fig.canvas; no pyplot, no backend
    return fig


def _output_path(path: Any, suffixes: tuple[str, ...]) -> Path:
    """``path`` as a Path to a new or existing file in an existing directory, with one of
    ``suffixes``; :class:`ConvMatError` otherwise (checked before anything is drawn)."""
    if not isinstance(path, str | os.PathLike):
        raise ConvMatError(f"path must be a str or a path, got {type(path).__name__}")
    p = Path(path)
    allowed = " or ".join(suffixes)
    if p.is_dir():
        raise ConvMatError(f"path must be a file ending in {allowed}, got a directory: {str(p)!r}")
    if p.suffix.lower() not in suffixes:
        raise ConvMatError(f"path must end in {allowed}, got {str(p)!r}")
    if not p.parent.is_dir():
        raise ConvMatError(f"path {str(p)!r} is in a directory that does not exist")
    return p


def _write_atomically(path: Path, write: Callable[[Any], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then move it into place: a
    failure never leaves a partial file."""
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        # Not mkstemp: its 0600 would replace the umask's mode of an ordinary new file.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise ConvMatError(f"cannot write {str(path)!r}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        raise ConvMatError(f"cannot write {str(path)!r}: {e.strerror}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_figure(fig: Any, path: str | os.PathLike[str], **savefig_kwargs: Any) -> Path:
    """Save a matplotlib figure atomically as PNG, SVG or PDF (chosen by the extension).

    Args:
        fig: a matplotlib Figure (such as :func:`plot_matrix` returns).
        path: the file to write, ending in ``.png``, ``.svg`` or ``.pdf``, in an existing
            directory.
        **savefig_kwargs: passed to ``fig.savefig`` (``bbox_inches="tight"`` by default).

    Returns:
        The path written.

    Raises:
        ConvMatError: for a directory, a missing directory, another extension or a failed write;
            nothing is left behind.

    Shape:
        the picture of ``fig``.

    >>> import tempfile, os
    >>> with tempfile.TemporaryDirectory() as d:
    ...     save_figure(plot_matrix(input_size=6, kernel_size=3), os.path.join(d, "W.svg")).name
    'W.svg'
    """
    p = _output_path(path, FIGURE_FORMATS)
    savefig_kwargs.setdefault("bbox_inches", "tight")
    _write_atomically(p, lambda f: fig.savefig(f, format=p.suffix[1:].lower(), **savefig_kwargs))
    return p


def _geometry(config: dict[str, Any]) -> Geometry:
    """The geometry of a :func:`convmat.symbolic` configuration, without building its pattern
    (so the picture's size is known, and refused, before anything large is made)."""
    unknown = sorted(set(config) - set(inspect.signature(symbolic).parameters))
    if unknown:
        raise TypeError(f"plot_matrix() got unexpected keyword arguments {unknown!r}")
    if "kernel_size" not in config:
        raise ConvMatError("kernel_size is needed to draw W of a configuration")
    return Geometry.from_channels(**{k: v for k, v in config.items() if k != "flip"})


def _config_of(geo: Geometry) -> dict[str, Any]:
    """The :func:`convmat.symbolic` keywords of a geometry."""
    config: dict[str, Any] = dict(
        input_size=geo.input_size, kernel_size=geo.kernel_size, stride=geo.stride,
        padding=geo.padding, dilation=geo.dilation, in_channels=geo.in_channels,
        out_channels=geo.out_channels, groups=geo.groups, transposed=geo.transposed,
    )  # fmt: skip
    if geo.transposed:
        config["output_padding"] = geo.output_padding
    else:
        config["padding_mode"] = geo.padding_mode
    return config


def _check_size(rows: int, cols: int, max_size: int) -> None:
    if max(rows, cols) > max_size:
        raise ConvMatError(
            f"W is {rows} x {cols}, larger than max_size={max_size} in a dimension; pass a larger "
            f"max_size, or draw a smaller input"
        )
    check_allocation(
        rows * cols * 8, _CPU, f"a {rows} x {cols} picture of W", "draw a smaller input"
    )


def _tap_grid(sym: SymbolicMatrix) -> torch.Tensor:
    """Dense ``(rows, cols)`` grid: the weight entry in each cell (its first tap when taps fold,
    offset so that folded cells get their own colours), -1 for structural zeros."""
    rows, cols = sym.shape
    grid = torch.full((rows, cols), -1.0)
    first = sym.taps[:, 0].double()
    folded = (sym.taps >= 0).sum(1) > 1
    grid[sym.rows, sym.cols] = torch.where(folded, first + 0.5, first).float()
    return grid


def _values_image(W: torch.Tensor, max_size: int) -> tuple[torch.Tensor, str]:
    """The values of a W tensor to draw, and the title; sizes are checked before densifying."""
    if W.dim() != 2:
        raise ConvMatError(f"W must be a matrix, got shape {tuple(W.shape)!r}")
    rows, cols = W.shape
    if rows == 0 or cols == 0:
        raise ConvMatError(f"W must have at least one row and one column, got shape {(rows, cols)}")
    if W.device.type == "meta":
        raise ConvMatError("W is on the meta device: it has no values to draw")
    _check_size(rows, cols, max_size)
    W = W.detach().cpu()
    if W.layout != torch.strided:
        W = W.to_dense()
    if W.is_complex():
        return W.abs().double(), "|W| (magnitude of a complex W)"
    return W.double(), "W"


def plot_matrix(
    source: Any = None,
    input_size: Any = None,
    *,
    ax: Any = None,
    max_size: int = 4096,
    **config: Any,
) -> Any:
    """A heatmap of W as a matplotlib Figure.

    ``source`` is a W tensor (coloured by value; a complex W by magnitude, so titled), a
    convolution module with ``input_size``, or nothing with the configuration as keywords
    (those of :func:`convmat.symbolic`); for the last two every kernel entry keeps one colour
    wherever it appears (cells where reflect or circular padding folds taps together are shaded
    between), and grid lines separate channel blocks.

    Drawn without pyplot: the matplotlib backend is never changed. In Jupyter the returned
    figure shows as a PNG; ``fig.savefig("W.png")`` (or :func:`save_figure`) saves it.

    Args:
        source: a tensor (dense or sparse), a conv module, or None.
        input_size: spatial input size (module or configuration).
        ax: draw into this matplotlib Axes instead of a new Figure.
        max_size: refuse matrices with more rows or columns than this (checked, with free
            memory, before anything is made dense).
        **config: the configuration (``kernel_size``, ``stride``, ...).

    Returns:
        The ``matplotlib.figure.Figure`` drawn on (``ax.figure`` when ``ax`` is given).

    Raises:
        ConvMatError: for a W larger than ``max_size`` or free memory, a tensor that is not a
            matrix, or a configuration torch rejects.

    Shape:
        the picture is ``rows x cols`` of W.

    >>> fig = plot_matrix(input_size=10, kernel_size=3, stride=2)
    >>> fig.axes[0].get_xlabel()
    'input x (10 columns)'
    >>> plot_matrix(torch.ones(3, 4, dtype=torch.complex64)).axes[0].get_title()
    '|W| (magnitude of a complex W)'
    """
    max_size = check_count(max_size, "max_size")
    sym = None
    if isinstance(source, torch.Tensor):
        if input_size is not None or config:
            raise ConvMatError(
                "input_size and configuration keywords describe a module or a configuration; "
                "a W tensor is drawn as it is"
            )
        image, title = _values_image(source, max_size)
    else:
        if isinstance(source, nn.Module):
            if config:
                raise ConvMatError(
                    f"configuration keywords {sorted(config)!r} cannot be combined with a "
                    f"module: its own configuration is drawn"
                )
            geo = Geometry.from_module(source, input_size)
            config = _config_of(geo)
        elif source is not None:
            raise ConvMatError(
                f"source must be a tensor, a convolution module or None, got "
                f"{type(source).__name__}"
            )
        else:
            config["input_size"] = input_size
            geo = _geometry(config)
        _check_size(*geo.matrix_shape, max_size)
        sym = symbolic(**config)
        image, title = _tap_grid(sym), "W"
    if ax is None:
        rows, cols = image.shape
        scale = 6 / max(rows, cols, 1)
        fig = _new_figure((max(3.0, cols * scale + 1), max(2.0, rows * scale + 1)))
        ax = fig.add_subplot()
    else:
        from matplotlib.axes import Axes

        if not isinstance(ax, Axes):
            raise ConvMatError(f"ax must be a matplotlib Axes, got {type(ax).__name__}")
    _draw(ax, image, sym)
    ax.set_title(title)
    return ax.figure


def _draw(ax: Any, image: torch.Tensor, sym: SymbolicMatrix | None) -> None:
    import numpy as np

    rows, cols = image.shape
    if sym is None:
        finite = image[image.isfinite()]
        if image.min() >= 0 and finite.numel():
            shown = ax.imshow(image.numpy(), cmap="viridis", vmin=0, interpolation="nearest")
        else:
            lim = float(finite.abs().max()) if finite.numel() else 1.0
            shown = ax.imshow(image.numpy(), cmap="coolwarm", vmin=-(lim or 1.0), vmax=lim or 1.0,
                              interpolation="nearest")  # fmt: skip
        ax.figure.colorbar(shown, ax=ax, shrink=0.8)
    else:
        ax.set_facecolor("white")
        ax.imshow(np.ma.masked_less(image.numpy(), 0), cmap="tab20", interpolation="nearest",
                  vmin=0, vmax=max(math.prod(sym.weight_shape), 1))  # fmt: skip
        geo = sym.geometry
        out_block, in_block = rows // geo.out_channels, cols // geo.in_channels
        for c in range(1, geo.out_channels):
            ax.axhline(c * out_block - 0.5, color="black", linewidth=1)
        for c in range(1, geo.in_channels):
            ax.axvline(c * in_block - 0.5, color="black", linewidth=1)
        if rows * cols <= 400 and (sym._plain or max(rows, cols) <= 12):  # labels that fit
            labels = sym.labels()
            for r in range(rows):
                for c in range(cols):
                    if labels[r][c] != "0":
                        ax.text(c, r, labels[r][c], ha="center", va="center", fontsize=7)
    from matplotlib.ticker import MaxNLocator

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"input x ({cols} columns)")
    ax.set_ylabel(f"output y ({rows} rows)")


class Animation:
    """A GIF made by :func:`animate`: shown inline by Jupyter (as an ``<img>`` with the GIF in
    a data URI), written to ``path`` when one was given, and savable again with :meth:`save`.

    Attributes:
        data: the GIF's bytes.
        frames: the number of frames.
        path: the file written, or None.
    """

    def __init__(self, data: bytes, frames: int, path: Path | None) -> None:
        self.data, self.frames, self.path = data, frames, path

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the GIF to ``path`` (ending in ``.gif``) atomically; returns the path."""
        p = _output_path(path, (".gif",))
        _write_atomically(p, lambda f: f.write(self.data))
        self.path = p
        return p

    def _repr_html_(self) -> str:
        encoded = base64.b64encode(self.data).decode("ascii")
        alt = html.escape(f"animation, {self.frames} frames")
        return f'<img src="data:image/gif;base64,{encoded}" alt="{alt}"/>'

    def __repr__(self) -> str:
        where = "" if self.path is None else f", path={str(self.path)!r}"
        return f"Animation(frames={self.frames}, {len(self.data):,} bytes{where})"


def animate(
    path: str | os.PathLike[str] | None,
    input_size: Any,
    kernel_size: Any,
    *,
    max_frames: int = MAX_FRAMES,
    fps: int = 2,
    **config: Any,
) -> Animation:
    """A GIF of the kernel sliding over the (padded, dilated) input of a 1-D or 2-D convolution,
    beside W with the current output's row highlighted; one frame per output position of the
    first output channel, at most ``max_frames``.

    Drawn without pyplot (the matplotlib backend is never changed). The result shows inline
    in Jupyter; the file, when ``path`` is given, is written atomically.

    Args:
        path: the GIF to write (ending in ``.gif``, in an existing directory), or None to write
            nothing.
        input_size, kernel_size, **config: as :func:`convmat.symbolic`.
        max_frames: cap on the frames (the first positions are shown), an int >= 1.
        fps: frames per second, an int from 1 to 50.

    Returns:
        An :class:`Animation` (``.frames``, ``.data``, ``.path``).

    Raises:
        ConvMatError: for a bad ``path``, ``max_frames`` or ``fps`` (before anything is drawn),
            a 3-D convolution, or a W too large to draw.

    Shape:
        frames = ``min(prod(output_size), max_frames)``.

    >>> import tempfile, os
    >>> with tempfile.TemporaryDirectory() as d:
    ...     animate(os.path.join(d, "conv.gif"), 6, 3, stride=2).frames
    2
    """
    target = None if path is None else _output_path(path, (".gif",))
    max_frames = check_count(max_frames, "max_frames")
    fps = check_int(fps, "fps", 1, MAX_FPS)
    from PIL import Image

    geo = _geometry({"input_size": input_size, "kernel_size": kernel_size, **config})
    if geo.ndim > 2:
        raise ConvMatError(f"animate shows 1-D and 2-D convolutions, got {geo.ndim}-D")
    if max(geo.matrix_shape) > 4096:
        raise ConvMatError(
            f"W is {geo.matrix_shape[0]} x {geo.matrix_shape[1]}, too large to animate (at most "
            f"4096 rows and columns); animate a smaller input"
        )
    positions = math.prod(geo.output_size)
    frames = min(positions, max_frames)
    fig = _new_figure((10, 4))
    width, height = (int(v) for v in fig.bbox.size)
    check_allocation(frames * width * height, _CPU, f"{frames} frames of {width} x {height}",
                     "pass a smaller max_frames")  # fmt: skip
    left, right = fig.subplots(1, 2, gridspec_kw={"wspace": 0.35})
    fig.subplots_adjust(top=0.84)
    plot_matrix(ax=right, input_size=input_size, kernel_size=kernel_size, **config)
    sym = symbolic(input_size, kernel_size, **config)
    draw = _frame_drawer(fig, left, right, sym, frames, positions)
    images = []
    for frame in range(frames):
        draw(frame)
        fig.canvas.draw()
        rgba = Image.frombuffer("RGBA", (width, height), fig.canvas.buffer_rgba())
        images.append(rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE))
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:],
                   duration=round(1000 / fps), loop=0)  # fmt: skip
    animation = Animation(buffer.getvalue(), frames, None)
    if target is not None:
        animation.save(target)
    return animation


def _frame_drawer(
    fig: Any, left: Any, right: Any, sym: SymbolicMatrix, frames: int, positions: int
) -> Callable[[int], None]:
    """A function that sets the artists of ``fig`` to show output position ``frame``."""
    from matplotlib.patches import Rectangle

    geo = sym.geometry
    highlight = Rectangle((-0.5, -0.5), sym.shape[1], 1, fill=False, edgecolor="red", linewidth=2)
    right.add_patch(highlight)
    if geo.transposed:
        # The input of a transposed convolution, with the cells each output receives from.
        grid_size, real = geo.input_size, None
        left.set_title("input (channel 0): the cells this output receives", fontsize=10)
    else:
        # The padded input: padding cells blank, input cells light, the kernel's taps dark
        # (spread by the dilation, moved by the stride).
        grid_size = geo.padded_size
        real = tuple(slice(b, b + i) for i, (b, _) in zip(geo.input_size, geo.padding))
        left.set_title(
            f"padded input ({geo.mode.label} padding blank), the kernel's taps dark", fontsize=10
        )
    shape2d = grid_size if geo.ndim == 2 else (1, grid_size[0])
    image = left.imshow(torch.zeros(shape2d).numpy(), cmap="Blues", vmin=0, vmax=1)
    left.set_xticks([])
    left.set_yticks([])

    def draw(frame: int) -> None:
        cells = torch.zeros(grid_size)
        if real is None:
            cols = sym.cols[sym.rows == frame]
            flat = cells.view(-1)
            flat[cols[cols < flat.numel()]] = 1
        else:
            cells[real] = 0.25
            position = torch.unravel_index(torch.tensor(frame), geo.output_size)
            # positions in the padded input: the window rule's, shifted by the pads before
            taps = [
                geo.reads(dim, int(p), torch.arange(k)) + b
                for dim, (p, k, (b, _)) in enumerate(zip(position, geo.kernel_size, geo.padding))
            ]
            cells[torch.meshgrid(*taps, indexing="ij")] = 1
        image.set_data(cells.view(shape2d).numpy())
        highlight.set_y(frame - 0.5)
        fig.suptitle(
            f"{sym.output_label(frame)}: frame {frame + 1} of {frames}"
            + (f" (first {frames} of {positions} positions)" if frames < positions else "")
        )

    return draw
