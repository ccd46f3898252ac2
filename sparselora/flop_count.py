"""Analytic FLOPs of one LoRA training step, dense and with SparseLoRA (forward + backward).

Counted: the matmuls. A frozen base projection costs 2*in*out per token forward and the same again backward
(input gradient only, no weight gradient); a LoRA branch costs 2*r*(in+out) forward and twice that backward
(input and weight gradients). Causal attention costs 2*heads*head_dim*T^2 per sequence forward, 3x that for
forward + backward. The LM head costs 4*hidden*vocab per token (all tokens, as transformers computes it,
unless ``labelled_only_head``, which also computes a dense last layer's FFN on the labelled rows only). Sparse
layers scale each base projection of context tokens by its kept fraction and add the channel selection as run,
from the selector's own cost (`sparselora.selection.SELECTORS`): the true gate/up or q/k/v on the rows it scores
(every context row for the oracle and l2, at most SAMPLE_ROWS for sampled, at most LABELLED_ROWS_CAP labelled rows
for the labelled selector's attention; its FFN reuses the dense rows' activations), the low-rank products for
svd, nothing for random. Norms, activations and the optimizer are not counted.
"""

from __future__ import annotations

from sparselora.config import SparseLoRAConfig
from sparselora.models.registry import ATTN_PROJS, FFN_PROJS, PROJS, ArchInfo, arch_info
from sparselora.selection import DEFAULT_SELECTOR, SAMPLE_ROWS, SELECTORS, attention_keep_counts, ffn_keep_count

ALL_TARGETS = PROJS


def as_arch(model_config) -> ArchInfo:
    """ArchInfo of an ArchInfo, a transformers config or a model."""
    if isinstance(model_config, ArchInfo):
        return model_config
    return arch_info(getattr(model_config, "config", model_config))


def _batch(batch_shape) -> tuple[int, int]:
    if isinstance(batch_shape, str):
        try:
            b, t = (int(v) for v in batch_shape.lower().split("x"))
        except ValueError:
            raise ValueError(f"batch shape {batch_shape!r} must look like '8x512' (batch x sequence length)") from None
        return b, t
    b, t = batch_shape
    return int(b), int(t)


def _dims(a: ArchInfo) -> dict[str, tuple[int, int]]:
    q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    H, I = a.hidden_size, a.intermediate_size
    return {"q": (H, q), "k": (H, kv), "v": (H, kv), "o": (q, H), "gate": (H, I), "up": (H, I), "down": (I, H)}


def attention_kept(a: ArchInfo, sparsity: float, rope_pairs: bool = True) -> dict[str, float]:
    """Kept fraction of each attention projection's sliced side, as `selection.select_attention` keeps them."""
    pairs = rope_pairs and a.head_dim % 2 == 0
    units = a.num_kv_heads * (a.head_dim // 2 if pairs else a.head_dim)
    k_units, v_keep = attention_keep_counts(a.num_kv_heads, a.head_dim, sparsity, pairs)
    qk, v = k_units / units, v_keep / (a.num_kv_heads * a.head_dim)
    return {"q": qk, "k": qk, "v": v, "o": v}


def flops(
    model_config,
    sparsity_config: SparseLoRAConfig | None,
    batch_shape,
    labelled_tokens: int,
    *,
    lora_rank: int = 32,
    lora_targets=ATTN_PROJS,
    labelled_only_head: bool = False,
) -> dict[str, float]:
    """FLOPs of one step: {"dense", "sparse", "ratio", "estimator", ...} for a batch of ``batch_shape``
    (``(8, 512)`` or ``"8x512"``) whose last ``labelled_tokens`` tokens per sequence carry labels."""
    a = as_arch(model_config)
    B, T = _batch(batch_shape)
    if not 0 <= labelled_tokens <= T:
        raise ValueError(f"labelled_tokens={labelled_tokens} must be between 0 and the sequence length {T}")
    unknown = set(lora_targets) - set(ALL_TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {ALL_TARGETS}")
    N, Nc = B * T, B * (T - labelled_tokens)
    r = lora_rank
    dims = _dims(a)
    head = 4 * a.hidden_size * a.vocab_size * (B * labelled_tokens if labelled_only_head else N)
    attn_core = 6 * a.num_heads * a.head_dim * T * T * B // 2 * a.num_layers  # causal half of 3 x 2 matmuls

    def base(p, tokens, kept=1.0):
        i, o = dims[p]
        return 4 * i * o * tokens * kept

    def lora(p, tokens, in_kept=1.0, out_kept=1.0):
        if p not in lora_targets:
            return 0.0
        i, o = dims[p]
        return 6 * r * (i * in_kept + o * out_kept) * tokens

    per_layer_dense = sum(base(p, N) + lora(p, N) for p in dims)
    # the labelled-only head reads B * labelled_tokens rows of the last layer, whose dense FFN computes only those
    Nl = B * labelled_tokens
    last_ffn_saved = sum(base(p, N - Nl) + lora(p, N - Nl) for p in FFN_PROJS) if labelled_only_head else 0.0
    dense = per_layer_dense * a.num_layers + attn_core + head - last_ffn_saved
    if sparsity_config is not None:
        sparsity_config.check_layers(a.num_layers)
    ffn_s = sparsity_config.ffn_sparsity if sparsity_config is not None else {}
    att_s = sparsity_config.attn_sparsity if sparsity_config is not None else {}
    rank = sparsity_config.estimator_rank if sparsity_config is not None else 0
    rope_pairs = sparsity_config.rope_pairs if sparsity_config is not None else True
    sel = SELECTORS[sparsity_config.selector if sparsity_config is not None else DEFAULT_SELECTOR]
    rows = sparsity_config.sample_rows if sparsity_config is not None else SAMPLE_ROWS
    sparse, estimator = 0.0, 0.0
    H, I = a.hidden_size, a.intermediate_size
    for layer in range(a.num_layers):
        s_ffn = ffn_s.get(layer, 0.0)
        s_att = att_s.get(layer, 0.0)
        cost = 0.0
        Nd = N - Nc
        if s_ffn > 0:
            k = ffn_keep_count(I, s_ffn) / I
            cost += sum(base(p, Nd) + lora(p, Nd) for p in FFN_PROJS)
            cost += base("gate", Nc, k) + base("up", Nc, k) + base("down", Nc, k)
            cost += lora("gate", Nc, out_kept=k) + lora("up", Nc, out_kept=k) + lora("down", Nc, in_kept=k)
            ffn_rows = sparsity_config.ffn_rows(layer) if sparsity_config is not None else rows
            estimator += sel.flops("ffn", H, (I, I), Nc, Nl, rank, ffn_rows)
        else:
            cost += sum(base(p, N) + lora(p, N) for p in FFN_PROJS)
            if layer == a.num_layers - 1:
                cost -= last_ffn_saved
        if s_att > 0:
            kept = attention_kept(a, s_att, rope_pairs)
            cost += sum(base(p, Nd) + lora(p, Nd) + base(p, Nc, kept[p]) + lora(p, Nc) for p in ATTN_PROJS)
            q_out, kv_out = dims["q"][1], dims["k"][1]
            estimator += sel.flops("attention", H, (q_out, kv_out, kv_out), Nc, Nl, rank, rows)
        else:
            cost += sum(base(p, N) + lora(p, N) for p in ATTN_PROJS)
        sparse += cost
    sparse += attn_core + head + estimator
    return {
        "dense": float(dense),
        "sparse": float(sparse),
        "ratio": float(sparse / dense),
        "estimator": float(estimator),
        "lm_head": float(head),
        "attention_core": float(attn_core),
    }
