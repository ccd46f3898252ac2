"""Opt-in fast kernels on a model instance (``apply_sparselora(..., fast_kernels=True)``): fused RMSNorm, SiLU*up
and RoPE (liger-kernel on CUDA), and the LM head + loss on labelled positions only. Exact for training (to float
rounding); the one visible change is that a forward *with labels* returns ``logits=None``."""

from __future__ import annotations

import inspect
import sys

from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from sparselora.modules.base import ForwardSwap
from sparselora.modules.stream import wants_hidden_states
from sparselora.ops.fused_kernels import (head_positions, head_rows_of, labelled_cross_entropy, rms_norm, rope_kernel,
                                          silu_mul)


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
    """down(silu(gate x) * up x) with the fused activation; for FFNs that SparseLoRA leaves dense.

    The last layer's (``state`` given) computes only the rows the labelled-only head reads, while that head has
    set them (`SparseLoRAState.head_rows_index`): nothing reads the other rows' output after the last layer, so
    their FFN (forward and backward) is dead work. Their output is zero instead; loss and gradients are exact."""

    def __init__(self, mlp: nn.Module, layer: int, state=None):
        self.mlp, self.layer, self.state = mlp, layer, state
        self.swap = ForwardSwap(mlp, self.forward)

    def forward(self, x):
        m = self.mlp
        live = None if self.state is None else self.state.head_rows_index
        if live is None:
            return m.down_proj(silu_mul(m.gate_proj(x), m.up_proj(x)))
        shape, idx = live
        if tuple(x.shape[:-1]) != shape:
            raise RuntimeError(f"sparselora: the last layer's FFN saw input of shape {tuple(x.shape)} but the head's "
                               f"rows were found for (batch, seq) = {shape}; the model was called inside another forward")
        if self.state.permuted_at(self.layer):  # the rows sit where the permutation put them
            idx = self.state.split.inverse.index_select(0, idx)
        rows = x.reshape(-1, x.shape[-1]).index_select(0, idx)
        y = m.down_proj(silu_mul(m.gate_proj(rows), m.up_proj(rows)))
        return y.new_zeros(x.shape[0] * x.shape[1], y.shape[-1]).index_copy(0, idx, y).view(*shape, y.shape[-1])

    def remove(self):
        self.swap.restore()


class LabelledOnlyHead:
    """The causal LM's forward, with the head and loss computed on labelled positions only; it also tells the
    last layer's dense FFN (`FastMLP`) which rows the head reads, unless hidden states are asked for (then every
    row's last hidden state is returned, so every row is computed)."""

    def __init__(self, hf: nn.Module, state):
        self.hf, self.state = hf, state
        self.signature = inspect.signature(hf.forward)
        self.swap = ForwardSwap(hf, self.forward)

    def forward(self, *args, **kwargs):
        self.state.head_rows_index = None  # per forward, as the batch split (a forward without labels: every row)
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        labels = bound.pop("labels", None)
        extra = bound.pop("kwargs", {})
        if labels is None or bound.get("logits_to_keep") not in (None, 0):
            return self.swap.original(*args, **kwargs)
        num_items = extra.pop("num_items_in_batch", None)
        bound.pop("logits_to_keep", None)
        rows = self.state.head_rows  # pinned by CUDAGraphStep; None: the exact count
        positions = head_positions(labels, rows)
        hidden_states = wants_hidden_states({**bound, "kwargs": extra}, self.hf.config)
        T = labels.shape[1]
        if not hidden_states and T > 1:
            self.state.head_rows_index = (tuple(labels.shape), head_rows_of(positions, T))
        out = self.hf.model(**bound, **extra)
        loss = labelled_cross_entropy(out.last_hidden_state, self.hf.lm_head.weight, labels, num_items, rows, positions)
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
        if fn is None:
            return None
        # transformers >= 5.25 with `kernels` installed wraps it in an nn.Module whose forward has the signature
        plain = fn.forward if isinstance(fn, nn.Module) else fn
        if name not in cls._installed and list(inspect.signature(plain).parameters)[:4] != ["q", "k", "cos", "sin"]:
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
    """Wrappers for every RMSNorm, every dense FFN (the last one computing the head's rows only), the head (which
    reads ``state.head_rows``) and RoPE; returned for `remove`."""
    wrappers: list = [FastRMSNorm(m) for m in hf.modules() if type(m).__name__.endswith("RMSNorm") and
                      getattr(m, "weight", None) is not None and m.weight.dim() == 1]
    head = getattr(hf, "lm_head", None) is not None and getattr(hf.lm_head, "bias", None) is None
    last = len(layers) - 1
    wrappers += [FastMLP(layer.mlp, i, state if head and i == last else None)
                 for i, layer in enumerate(layers) if i not in sparse_ffn]
    if head:
        wrappers.append(LabelledOnlyHead(hf, state))
    rope = FastRoPE.supports(hf)
    if rope is not None:
        wrappers.append(FastRoPE(rope))
    return wrappers
