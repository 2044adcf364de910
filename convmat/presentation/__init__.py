"""The presentation: symbolic W, pictures, the guided tour and the ``convmat`` command. May use
every package below it; nothing imports it but the command's entry points and the top-level
``convmat`` names.

The names below are the package's interface, imported on first use (the command's shape rules
need no torch). The function :func:`~convmat.presentation.symbolic.symbolic` shares its module's
name, so it cannot be one of them (once imported, the module is the package's attribute of that
name): ``convmat.symbolic`` is read from its module, the one exception the contract in
``pyproject.toml`` names.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes

#: Where each name of the interface lives; imported on first use.
_WHERE = {
    "Animation": ".plotting",
    "SymbolicMatrix": ".symbolic",
    "animate": ".plotting",
    "main": ".cli",
    "plot_matrix": ".plotting",
    "save_figure": ".plotting",
}

__getattr__, __dir__ = lazy_attributes(__name__, _WHERE)

if TYPE_CHECKING:
    from .cli import main
    from .plotting import Animation, animate, plot_matrix, save_figure
    from .symbolic import SymbolicMatrix

__all__ = ["Animation", "SymbolicMatrix", "animate", "main", "plot_matrix", "save_figure"]
