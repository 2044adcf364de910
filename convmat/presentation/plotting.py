"""Pictures of W: heatmaps and sliding-window animations (matplotlib, imported lazily).

Install with ``pip install "convmat[plot]"``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._errors import ConvMatError
from ..engine import Geometry
from .symbolic import SymbolicMatrix, symbolic

__all__ = ["animate", "plot_matrix"]

#: Frames of an animation at most; larger outputs show their first positions.
MAX_FRAMES = 48


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConvMatError('plotting needs matplotlib: pip install "convmat[plot]"') from None
    return plt


def _config_of_module(module: nn.Module, input_size: Any) -> dict[str, Any]:
    Geometry.from_module(module, input_size)  # refuses anything but a plain convolution
    m: Any = module
    transposed = m.transposed
    config = dict(input_size=input_size, kernel_size=m.kernel_size, stride=m.stride,
                  padding=m.padding, dilation=m.dilation, in_channels=m.in_channels,
                  out_channels=m.out_channels, groups=m.groups, transposed=transposed)  # fmt: skip
    if transposed:
        config["output_padding"] = m.output_padding
    else:
        config["padding_mode"] = m.padding_mode
    return config


def _tap_grid(sym: SymbolicMatrix) -> torch.Tensor:
    """Dense ``(rows, cols)`` grid: the weight entry in each cell (its first tap when taps fold,
    offset so that folded cells get their own colours), -1 for structural zeros."""
    rows, cols = sym.shape
    grid = torch.full((rows, cols), -1.0)
    first = sym.taps[:, 0].double()
    folded = (sym.taps >= 0).sum(1) > 1
    grid[sym.rows, sym.cols] = torch.where(folded, first + 0.5, first).float()
    return grid


def plot_matrix(
    source: Any = None,
    input_size: Any = None,
    *,
    ax: Any = None,
    max_size: int = 4096,
    **config: Any,
) -> Any:
    """A heatmap of W as a matplotlib Figure.

    ``source`` is a W tensor (coloured by value), a convolution module with ``input_size``, or
    nothing with the configuration as keywords (those of :func:`convmat.symbolic`); for the last
    two every kernel entry keeps one colour wherever it appears (cells where reflect or circular
    padding folds taps together are shaded between), and grid lines separate channel blocks.

    Args:
        source: a tensor, a conv module, or None.
        input_size: spatial input size (module or configuration).
        ax: draw into this Axes instead of a new Figure.
        max_size: refuse matrices with more rows or columns than this.
        **config: the configuration (``kernel_size``, ``stride``, ...).

    Returns:
        The ``matplotlib.figure.Figure``; ``fig.savefig("W.png")`` (or ``.svg``) saves it.

    Shape:
        the picture is ``rows x cols`` of W.

    >>> fig = plot_matrix(input_size=10, kernel_size=3, stride=2)
    >>> fig.axes[0].get_xlabel()
    'input x (10 columns)'
    """
    plt = _pyplot()
    sym = None
    if isinstance(source, torch.Tensor):
        W = source.to_dense() if source.layout != torch.strided else source
        if W.dim() != 2:
            raise ConvMatError(f"W must be a matrix, got shape {tuple(W.shape)!r}")
        image, cmap = W.detach().double().cpu(), "coolwarm"
    else:
        if isinstance(source, nn.Module):
            config = _config_of_module(source, input_size)
        elif source is not None:
            raise ConvMatError(
                f"source must be a tensor, a convolution module or None, got "
                f"{type(source).__name__}"
            )
        else:
            config["input_size"] = input_size
        sym = symbolic(**config)
        if max(sym.shape) > max_size:
            raise ConvMatError(
                f"W is {sym.shape[0]} x {sym.shape[1]}, larger than max_size={max_size}"
            )
        image, cmap = _tap_grid(sym), "tab20"
    rows, cols = image.shape
    if max(rows, cols) > max_size:
        raise ConvMatError(f"W is {rows} x {cols}, larger than max_size={max_size}")
    if ax is None:
        scale = 6 / max(rows, cols, 1)
        fig, ax = plt.subplots(figsize=(max(3.0, cols * scale + 1), max(2.0, rows * scale + 1)))
    fig = ax.figure
    if sym is None:
        lim = float(image.abs().max()) or 1.0
        shown = ax.imshow(image.numpy(), cmap=cmap, vmin=-lim, vmax=lim, interpolation="nearest")
        fig.colorbar(shown, ax=ax, shrink=0.8)
    else:
        masked = image.numpy().copy()
        import numpy as np

        data = np.ma.masked_less(masked, 0)
        ax.set_facecolor("white")
        ax.imshow(data, cmap=cmap, interpolation="nearest",
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
    ax.set_xlabel(f"input x ({cols} columns)")
    ax.set_ylabel(f"output y ({rows} rows)")
    ax.set_title("W")
    return fig


def animate(
    path: str | Path,
    input_size: Any,
    kernel_size: Any,
    *,
    max_frames: int = MAX_FRAMES,
    fps: int = 2,
    **config: Any,
) -> int:
    """Write a GIF: the kernel sliding over the (padded, dilated) input of a 1-D or 2-D
    convolution, beside W with the current output's row highlighted; one frame per output
    position of the first output channel, at most ``max_frames``.

    Args:
        path: the GIF to write.
        input_size, kernel_size, **config: as :func:`convmat.symbolic`.
        max_frames: cap on the frames (the first positions are shown).
        fps: frames per second.

    Returns:
        The number of frames written.

    Shape:
        frames = ``min(prod(output_size), max_frames)``.

    >>> import tempfile, os
    >>> with tempfile.TemporaryDirectory() as d:
    ...     animate(os.path.join(d, "conv.gif"), 6, 3, stride=2)
    2
    """
    plt = _pyplot()
    from matplotlib.animation import FuncAnimation, PillowWriter
    from matplotlib.patches import Rectangle

    sym = symbolic(input_size, kernel_size, **config)
    geo = sym.geometry
    if geo.ndim > 2:
        raise ConvMatError(f"animate shows 1-D and 2-D convolutions, got {geo.ndim}-D")
    if max(sym.shape) > 4096:
        raise ConvMatError(f"W is {sym.shape[0]} x {sym.shape[1]}, too large to animate")
    positions = math.prod(geo.output_size)
    frames = min(positions, max_frames)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    plot_matrix(ax=right, input_size=input_size, kernel_size=kernel_size, **config)
    highlight = Rectangle((-0.5, -0.5), sym.shape[1], 1, fill=False, edgecolor="red", linewidth=2)
    right.add_patch(highlight)
    if geo.transposed:
        # The input of a transposed convolution, with the cells each output receives from.
        grid_size, real = geo.input_size, None
        left.set_title("input (channel 0): cells this output receives")
    else:
        # The padded input: padding cells blank, input cells light, the kernel's taps dark
        # (spread by the dilation, moved by the stride).
        grid_size = tuple(i + b + a for i, (b, a) in zip(geo.input_size, geo.padding))
        real = tuple(slice(b, b + i) for i, (b, _) in zip(geo.input_size, geo.padding))
        mode = "zero" if geo.padding_mode == "zeros" else geo.padding_mode
        left.set_title(f"padded input ({mode} padding blank): the kernel's window")
    shape2d = grid_size if geo.ndim == 2 else (1, grid_size[0])
    image = left.imshow(torch.zeros(shape2d).numpy(), cmap="Blues", vmin=0, vmax=1)
    left.set_xticks([])
    left.set_yticks([])

    def draw(frame: int) -> list[Any]:
        cells = torch.zeros(grid_size)
        if real is None:
            cols = sym.cols[sym.rows == frame]
            flat = cells.view(-1)
            flat[cols[cols < flat.numel()]] = 1
        else:
            cells[real] = 0.25
            position = torch.tensor(torch.unravel_index(torch.tensor(frame), geo.output_size))
            taps = [
                p * s + torch.arange(k) * d
                for p, s, k, d in zip(position.tolist(), geo.stride, geo.kernel_size, geo.dilation)
            ]
            cells[torch.meshgrid(*taps, indexing="ij")] = 1
        image.set_data(cells.view(shape2d).numpy())
        highlight.set_y(frame - 0.5)
        fig.suptitle(
            f"{sym.output_label(frame)}: frame {frame + 1} of {frames}"
            + (f" (first {frames} of {positions} positions)" if frames < positions else "")
        )
        return [image, highlight]

    FuncAnimation(fig, draw, frames=frames, blit=False).save(
        str(path), writer=PillowWriter(fps=fps)
    )
    plt.close(fig)
    return frames
