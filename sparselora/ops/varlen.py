"""Causal attention over packed rows, isolated per segment, as a transformers attention function.

Packing several examples into one fixed-size row removes padding and gives every batch the same shape (what CUDA
graphs need), but transformers' ``sdpa`` / ``flex_attention`` with packed ``position_ids`` let segments attend to
each other. This function reads the segment boundaries (``cu_seq_lens_q``, as `sparselora.data.PackedCollator`
emits them) and runs torch's variable-length flash attention on CUDA (bf16/fp16, head dim a multiple of 8), or a
block-diagonal causal SDPA everywhere else (the reference the tests compare against). No mask is built and no host sync happens, so
the step stays capturable.

    use_packed_attention(model)      # registers "sparselora_packed" and switches the model to it
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

ATTN_NAME = "sparselora_packed"


@functools.cache  # asked by every attention layer of every forward: inspect once
def _varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None, False
    return varlen_attn, "enable_gqa" in inspect.signature(varlen_attn).parameters


def segment_ids(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """Segment index of each of ``n`` flat tokens (zero-length segments in ``cu_seqlens`` are allowed)."""
    return torch.searchsorted(cu_seqlens[1:].to(torch.long), torch.arange(n, device=cu_seqlens.device), right=True)


def reference_packed_attention(q, k, v, cu_seqlens, scale):
    """(tokens, heads, dim) causal attention within segments: plain SDPA with a block-diagonal causal mask."""
    n, hq, _ = q.shape
    seg = segment_ids(cu_seqlens, n)
    pos = torch.arange(n, device=q.device)
    mask = (seg[:, None] == seg[None, :]) & (pos[:, None] >= pos[None, :])
    rep = hq // k.shape[1]
    k, v = (t.repeat_interleave(rep, dim=1) for t in (k, v))
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def packed_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention interface: query (batch, heads, seq, dim) -> (batch, seq, heads, dim), None."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        raise ValueError(
            f"attention '{ATTN_NAME}' needs segment boundaries (cu_seq_lens_q); batch the data with "
            "sparselora.data.PackedCollator, or switch the model back with model.set_attn_implementation('sdpa')"
        )
    if dropout:
        raise ValueError(f"attention '{ATTN_NAME}' has no attention dropout; set the config's attention_dropout to 0")
    b, hq, s, d = query.shape
    q, k, v = (t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (query, key, value))
    varlen_attn, has_gqa = _varlen()
    if q.is_cuda and varlen_attn is not None and q.dtype in (torch.bfloat16, torch.float16) and d % 8 == 0:
        max_len = int(kwargs.get("max_length_q") or b * s)
        extra = {"enable_gqa": True} if has_gqa and k.shape[1] != hq else {}
        cu = cu.to(torch.int32)
        out = varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scaling, window_size=(-1, 0), **extra)
    else:
        out = reference_packed_attention(q, k, v, cu, scaling)
    return out.reshape(b, s, hq, d), None


def register_packed_attention() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, packed_attention_forward)
    return ATTN_NAME


def use_packed_attention(model) -> None:
    """Switch ``model`` (a transformers model or a PeftModel around one) to segment-isolated packed attention."""
    register_packed_attention()
    from sparselora.models.registry import causal_lm

    causal_lm(model).set_attn_implementation(ATTN_NAME)
