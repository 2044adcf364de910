"""The engine: shape rules, padding modes, W's index pattern, assembly, the memory guard and the
one cache. Nothing here imports the layers, the analysis or the presentation.

The names below are the engine's interface; the other packages use only these.
"""

from .assemble import (
    LAYOUTS,
    assemble,
    check_layout,
    check_matrix_memory,
    check_weight,
    weight_view,
)
from .blocks import BlockPattern, block_size, get_block_pattern, tap_table
from .cache import (
    cache_budget,
    cache_info,
    cached,
    cached_bytes,
    clear_cache,
    discard,
    lookup,
    set_cache_budget,
    store,
    tensor_bytes,
)
from .memory import available_memory, check_allocation, total_memory
from .padding import PADDING_MODES, PaddingMode, padding_mode
from .pattern import INDEX, Pattern, get_pattern
from .shapes import (
    Geometry,
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
    "INDEX",
    "LAYOUTS",
    "PADDING_MODES",
    "BlockPattern",
    "Geometry",
    "PaddingMode",
    "Pattern",
    "assemble",
    "available_memory",
    "block_size",
    "cache_budget",
    "cache_info",
    "cached",
    "cached_bytes",
    "check_allocation",
    "check_layout",
    "check_matrix_memory",
    "check_weight",
    "clear_cache",
    "conv_geometry",
    "conv_output_size",
    "conv_transpose_geometry",
    "conv_transpose_output_size",
    "discard",
    "flat_pads",
    "get_block_pattern",
    "get_pattern",
    "lookup",
    "ntuple",
    "output_padding_for",
    "padding_mode",
    "plain_conv_problem",
    "same_padding",
    "set_cache_budget",
    "store",
    "tap_table",
    "tensor_bytes",
    "total_memory",
    "weight_view",
]
