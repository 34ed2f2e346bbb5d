"""The tidal attention ops: `torch.ops.tidal.*`, registered on import, and their references."""

from tidal_compile.ops import reference
from tidal_compile.ops.library import dense_attention, index_sets, selection_attention, sparse_attention

__all__ = ["dense_attention", "index_sets", "reference", "selection_attention", "sparse_attention"]
