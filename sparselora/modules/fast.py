"""Opt-in fast kernels on a model instance (``apply_sparselora(..., fast_kernels=True)``): fused RMSNorm and
SiLU*up (liger-kernel on CUDA), and the LM head + loss on labelled positions only. Exact for training; the
one visible change is that a forward *with labels* returns ``logits=None``."""

from __future__ import annotations

import inspect

from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from sparselora.modules.base import ForwardSwap
from sparselora.ops.fused_kernels import labelled_cross_entropy, rms_norm, silu_mul


class FastRMSNorm:
    def __init__(self, norm: nn.Module):
        self.norm = norm
        self.eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
        self.swap = ForwardSwap(norm, self.forward)

    def forward(self, x):
        return rms_norm(x, self.norm.weight, self.eps)

    def remove(self):
        self.swap.restore()


class FastMLP:
    """down(silu(gate x) * up x) with the fused activation; for FFNs that SparseLoRA leaves dense."""

    def __init__(self, mlp: nn.Module):
        self.mlp = mlp
        self.swap = ForwardSwap(mlp, self.forward)

    def forward(self, x):
        m = self.mlp
        return m.down_proj(silu_mul(m.gate_proj(x), m.up_proj(x)))

    def remove(self):
        self.swap.restore()


class LabelledOnlyHead:
    """The causal LM's forward, with the head and loss computed on labelled positions only."""

    def __init__(self, hf: nn.Module, state):
        self.hf, self.state = hf, state
        self.signature = inspect.signature(hf.forward)
        self.swap = ForwardSwap(hf, self.forward)

    def forward(self, *args, **kwargs):
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        labels = bound.pop("labels", None)
        extra = bound.pop("kwargs", {})
        if labels is None or bound.get("logits_to_keep") not in (None, 0):
            return self.swap.original(*args, **kwargs)
        num_items = extra.pop("num_items_in_batch", None)
        bound.pop("logits_to_keep", None)
        out = self.hf.model(**bound, **extra)
        rows = self.state.head_rows  # pinned by CUDAGraphStep; None: the exact count
        loss = labelled_cross_entropy(out.last_hidden_state, self.hf.lm_head.weight, labels, num_items, rows)
        return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states, attentions=out.attentions)

    def remove(self):
        self.swap.restore()


def install(hf: nn.Module, layers, sparse_ffn: set[int], state) -> list:
    """Wrappers for every RMSNorm, every dense FFN and the head (which reads ``state.head_rows``); returned for
    `remove`."""
    wrappers: list = [FastRMSNorm(m) for m in hf.modules() if type(m).__name__.endswith("RMSNorm") and
                      getattr(m, "weight", None) is not None and m.weight.dim() == 1]
    wrappers += [FastMLP(layer.mlp) for i, layer in enumerate(layers) if i not in sparse_ffn]
    if getattr(hf, "lm_head", None) is not None and getattr(hf.lm_head, "bias", None) is None:
        wrappers.append(LabelledOnlyHead(hf, state))
    return wrappers
