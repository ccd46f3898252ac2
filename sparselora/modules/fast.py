"""Opt-in fast kernels on a model instance (``apply_sparselora(..., fast_kernels=True)``): fused RMSNorm, SiLU*up
and RoPE (liger-kernel on CUDA), and the LM head + loss on labelled positions only. Exact for training (to float
rounding); the one visible change is that a forward *with labels* returns ``logits=None``."""

from __future__ import annotations

import inspect
import sys

from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from sparselora.modules.base import ForwardSwap
from sparselora.ops.fused_kernels import labelled_cross_entropy, rms_norm, rope_kernel, silu_mul


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


class FastRoPE:
    """RoPE of q and k through liger-kernel's fused kernel on CUDA: transformers applies it as ~10 strided
    elementwise kernels on q and k each way (about 8% of a Llama-3-8B training step on an H200). transformers
    calls it as a function of the model's modeling module, so that function is swapped, for every model of the
    module, while any model with fast kernels uses it (the last `remove` restores it); the swap runs the original
    off CUDA and for any call other than ``(q, k, cos, sin)``. liger's `use_liger_kernel` swaps the same function
    the same way."""

    _installed: dict[str, list] = {}  # modeling module name -> [original function, users]

    def __init__(self, module_name: str):
        self.name = module_name
        mod = sys.modules[module_name]
        entry = self._installed.get(module_name)
        if entry is None:
            original = mod.apply_rotary_pos_emb
            fused = rope_kernel()

            def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
                if fused is not None and q.is_cuda and not args and kwargs.get("unsqueeze_dim", 1) == 1:
                    return fused(q, k, cos, sin)
                return original(q, k, cos, sin, *args, **kwargs)

            apply_rotary_pos_emb.sparselora_original = original
            mod.apply_rotary_pos_emb = apply_rotary_pos_emb
            entry = self._installed[module_name] = [original, 0]
        entry[1] += 1

    @classmethod
    def supports(cls, hf: nn.Module) -> str | None:
        """The modeling module whose RoPE function `FastRoPE` can swap for this model, or None (also when
        liger-kernel is not installed: nothing to swap in)."""
        if rope_kernel() is None:
            return None
        name = type(hf).__module__
        mod = sys.modules.get(name)
        fn = getattr(mod, "apply_rotary_pos_emb", None)
        if fn is None or (name not in cls._installed and list(inspect.signature(fn).parameters)[:4] != ["q", "k", "cos", "sin"]):
            return None
        return name

    def remove(self):
        entry = self._installed.get(self.name)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            sys.modules[self.name].apply_rotary_pos_emb = entry[0]
            del self._installed[self.name]


def install(hf: nn.Module, layers, sparse_ffn: set[int], state) -> list:
    """Wrappers for every RMSNorm, every dense FFN, the head (which reads ``state.head_rows``) and RoPE; returned
    for `remove`."""
    wrappers: list = [FastRMSNorm(m) for m in hf.modules() if type(m).__name__.endswith("RMSNorm") and
                      getattr(m, "weight", None) is not None and m.weight.dim() == 1]
    wrappers += [FastMLP(layer.mlp) for i, layer in enumerate(layers) if i not in sparse_ffn]
    if getattr(hf, "lm_head", None) is not None and getattr(hf.lm_head, "bias", None) is None:
        wrappers.append(LabelledOnlyHead(hf, state))
    rope = FastRoPE.supports(hf)
    if rope is not None:
        wrappers.append(FastRoPE(rope))
    return wrappers
