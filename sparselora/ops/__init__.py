"""Low-level sparse ops on frozen projections, each the exact autograd of its sparse function."""

from sparselora.ops.lora_layer import base_weight_bias
from sparselora.ops.sparse_linear import (
    ffn_context,
    lora_delta,
    proj_in_sparse,
    proj_out_sparse,
)

__all__ = ["base_weight_bias", "ffn_context", "lora_delta", "proj_in_sparse", "proj_out_sparse"]
