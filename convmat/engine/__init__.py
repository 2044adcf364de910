"""The engine: shape rules, padding modes, W's index pattern, assembly, the memory guard and the
one cache. Nothing here imports the layers, the analysis or the presentation.

The names below are the engine's interface; the other packages use only these (a contract in
``pyproject.toml``, checked by ``tests/test_layers_contract.py``). The cache's own workings
(making room for the memory guard, its counters, parsing the budget) stay inside the engine;
what it offers the other packages is the budget itself: :func:`cached`, or :func:`lookup`,
:func:`store` and :func:`discard` for entries checked against the values they were built from
(:func:`same_values`), with :func:`tensor_bytes` to size them.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes

#: Where each name of the interface lives; a module is imported on first use (the shape rules
#: need no torch, so ``convmat shape`` starts at once).
_WHERE = {
    "BlockPattern": ".blocks",
    "Geometry": ".shapes",
    "LAYOUTS": ".assembly",
    "PADDING_MODES": ".padding",
    "PaddingMode": ".padding",
    "Pattern": ".pattern",
    "adaptive_window": ".axes",
    "assemble": ".assembly",
    "available_memory": ".memory",
    "block_size": ".blocks",
    "cache_budget": ".cache",
    "cache_info": ".cache",
    "cached": ".cache",
    "check_allocation": ".memory",
    "check_count": ".shapes",
    "check_flip": ".shapes",
    "check_int": ".shapes",
    "check_matrix_memory": ".assembly",
    "check_shape": ".shapes",
    "check_weight": ".assembly",
    "clear_cache": ".cache",
    "conv_geometry": ".shapes",
    "conv_output_size": ".shapes",
    "conv_transpose_geometry": ".shapes",
    "conv_transpose_output_size": ".shapes",
    "coupling_reach": ".axes",
    "discard": ".cache",
    "flat_pads": ".shapes",
    "get_block_pattern": ".blocks",
    "get_pattern": ".pattern",
    "kept_pages": ".memory",
    "lookup": ".cache",
    "most_reads": ".axes",
    "natural_size": ".axes",
    "ntuple": ".shapes",
    "oriented": ".assembly",
    "output_length": ".axes",
    "output_padding_for": ".shapes",
    "padding_mode": ".padding",
    "plain_conv_problem": ".shapes",
    "read_by": ".axes",
    "reads": ".axes",
    "same_padding": ".shapes",
    "same_values": ".cache",
    "set_cache_budget": ".cache",
    "span": ".axes",
    "store": ".cache",
    "tap_reading": ".axes",
    "tap_table": ".blocks",
    "tensor_bytes": ".cache",
    "transposed_output_length": ".axes",
    "weight_view": ".assembly",
}

__getattr__, __dir__ = lazy_attributes(__name__, _WHERE)

if TYPE_CHECKING:
    from .assembly import (
        LAYOUTS,
        assemble,
        check_matrix_memory,
        check_weight,
        oriented,
        weight_view,
    )
    from .axes import (
        adaptive_window,
        coupling_reach,
        most_reads,
        natural_size,
        output_length,
        read_by,
        reads,
        span,
        tap_reading,
        transposed_output_length,
    )
    from .blocks import BlockPattern, block_size, get_block_pattern, tap_table
    from .cache import (
        cache_budget,
        cache_info,
        cached,
        clear_cache,
        discard,
        lookup,
        same_values,
        set_cache_budget,
        store,
        tensor_bytes,
    )
    from .memory import available_memory, check_allocation, kept_pages
    from .padding import PADDING_MODES, PaddingMode, padding_mode
    from .pattern import Pattern, get_pattern
    from .shapes import (
        Geometry,
        check_count,
        check_flip,
        check_int,
        check_shape,
        conv_geometry,
        conv_output_size,
        conv_transpose_geometry,
        conv_transpose_output_size,
        flat_pads,
        ntuple,
        output_padding_for,
        plain_conv_problem,
        same_padding,
    )

__all__ = [
    "LAYOUTS",
    "PADDING_MODES",
    "BlockPattern",
    "Geometry",
    "PaddingMode",
    "Pattern",
    "adaptive_window",
    "assemble",
    "available_memory",
    "block_size",
    "cache_budget",
    "cache_info",
    "cached",
    "check_allocation",
    "check_count",
    "check_flip",
    "check_int",
    "check_matrix_memory",
    "check_shape",
    "check_weight",
    "clear_cache",
    "conv_geometry",
    "conv_output_size",
    "conv_transpose_geometry",
    "conv_transpose_output_size",
    "coupling_reach",
    "discard",
    "flat_pads",
    "get_block_pattern",
    "get_pattern",
    "kept_pages",
    "lookup",
    "most_reads",
    "natural_size",
    "ntuple",
    "oriented",
    "output_length",
    "output_padding_for",
    "padding_mode",
    "plain_conv_problem",
    "read_by",
    "reads",
    "same_padding",
    "same_values",
    "set_cache_budget",
    "span",
    "store",
    "tap_reading",
    "tap_table",
    "tensor_bytes",
    "transposed_output_length",
    "weight_view",
]
