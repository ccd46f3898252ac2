"""Wrappers that make one block's FFN or attention take the sparse path for context tokens.

They replace ``forward`` on the given module instances only (no class is patched), so module names,
state dicts and PEFT's save/load are untouched, and `remove` restores the originals exactly.
"""

from sparselora.modules.attention import SparseAttention
from sparselora.modules.mlp import SparseMLP

__all__ = ["SparseAttention", "SparseMLP"]
