"""Which Hugging Face architectures SparseLoRA supports, and where their projections live.

All supported families share the Llama block layout: ``model.model.layers[i].mlp.{gate,up,down}_proj`` with a
SiLU-gated FFN and ``model.model.layers[i].self_attn.{q,k,v,o}_proj`` with rotary grouped-query attention.
Qwen2 adds q/k/v biases and Qwen3 per-head q/k RMSNorm; neither changes where the projections are.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sparselora.errors import SparseLoRAError

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

# -- the block layout: one home for the projection names ----------------------------------------------------------
# Short names, as the config, the CLI (--lora-targets q,k,v,o), kept_channels and flops use them; the module of
# projection p is ``layer.<BLOCK[p]>.<p>_proj``.
ATTN_PROJS = ("q", "k", "v", "o")
FFN_PROJS = ("gate", "up", "down")
PROJS = ATTN_PROJS + FFN_PROJS
BLOCK = {**{p: "self_attn" for p in ATTN_PROJS}, **{p: "mlp" for p in FFN_PROJS}}


def module_name(p: str) -> str:
    """``"q"`` -> ``"q_proj"``: the attribute name of projection ``p`` in its block."""
    return f"{p}_proj"


def projection(layer: nn.Module, p: str) -> nn.Module:
    """Projection ``p`` (a short name) of one decoder layer."""
    return getattr(getattr(layer, BLOCK[p]), module_name(p))


def sliced_projections(config) -> dict[int, tuple[str, ...]]:
    """{layer: the projections (short names, in PROJS order) whose frozen weights the sparse path of ``config``
    slices}: the attention's four where its sparsity is > 0, the FFN's three where the FFN's is; layers with
    neither are absent."""
    out: dict[int, tuple[str, ...]] = {}
    for i in sorted({*config.attn_sparsity, *config.ffn_sparsity}):
        names = (ATTN_PROJS if config.attn_sparsity.get(i, 0) > 0 else ()) + (
            FFN_PROJS if config.ffn_sparsity.get(i, 0) > 0 else ())
        if names:
            out[i] = names
    return out


class UnsupportedModelError(SparseLoRAError, ValueError):
    pass


@dataclass(frozen=True)
class ArchInfo:
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


def arch_info(config) -> ArchInfo:
    """Shape facts of a supported config; a clear error for anything else."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"sparselora does not support model_type {model_type!r}; supported families: "
            f"{', '.join(SUPPORTED_FAMILIES)} (Llama-style blocks with a SiLU-gated FFN)"
        )
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedModelError(f"sparselora needs a SiLU-gated FFN, but this {model_type} uses hidden_act={act!r}")
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ArchInfo(
        model_type=model_type,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
    )


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    inner = get_base() if callable(get_base) else model
    if not hasattr(inner, "config") or not hasattr(getattr(inner, "model", None), "layers"):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a Hugging Face causal LM with decoder layers at .model.layers; "
            f"pass an AutoModelForCausalLM of a supported family ({', '.join(SUPPORTED_FAMILIES)}) or its PeftModel"
        )
    return inner


def decoder_layers(hf_model: nn.Module) -> nn.ModuleList:
    return hf_model.model.layers
