"""The labelled selector: channels ranked by the same batch's labelled tokens' own dense activations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparselora import SparseLoRAConfig, apply_sparselora, kept_channels
from sparselora.flop_count import flops
from sparselora.models.registry import arch_info
from sparselora.selection import LABELLED_ROWS_CAP, ffn_keep_count, labelled_rows, select_attention
from sparselora.tokens import split_tokens

from helpers import ARCHS, assert_close, clone, make_batch, step_outputs, tiny_peft


def _layer_input(model, layer: int, batch) -> torch.Tensor:
    """Input of decoder layer ``layer``'s MLP and attention (post-norm) in a dense run."""
    seen = {}
    blk = model.base_model.model.model.layers[layer]
    hs = [blk.mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("mlp", a[0].detach())),
          blk.self_attn.register_forward_pre_hook(
              lambda m, a, kw: seen.__setitem__("attn", (kw.get("hidden_states", a[0] if a else None)).detach()),
              with_kwargs=True)]
    with torch.no_grad():
        model(**batch)
    for h in hs:
        h.remove()
    return seen


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_kept_channels_are_the_labelled_tokens_top_channels(arch, padding_side):
    """Only layer 1's FFN (then only its attention) is sparse, so its input equals the dense model's: the kept FFN
    channels must be the top-k by ||silu(gate x) * (up x)|| over labelled positions, attention the ones the oracle
    picks from the labelled rows."""
    ref = tiny_peft(arch)
    batch = make_batch(padding_side=padding_side, seed=5)
    seen = _layer_input(ref, 1, batch)
    lab = batch["labels"] != -100
    blk = ref.base_model.model.model.layers[1]
    for kind in ("ffn", "attn"):
        model = clone(ref)
        apply_sparselora(model, SparseLoRAConfig(**{f"{kind}_sparsity": {1: 0.6}}, selector="labelled", start_step=0))
        step_outputs(model, batch)
        kept = kept_channels(model)[1]
        with torch.no_grad():
            if kind == "ffn":
                x = seen["mlp"][lab]
                h = F.silu(blk.mlp.gate_proj(x)) * blk.mlp.up_proj(x)
                assert torch.equal(kept["ffn"], h.norm(dim=0).topk(ffn_keep_count(h.shape[-1], 0.6)).indices.sort().values)
            else:
                a = blk.self_attn
                want = select_attention("oracle", 0.6, seen["attn"][lab], arch_info(ref.config), True,
                                        a.q_proj, a.k_proj, a.v_proj, None)
                for p in "qkvo":
                    assert torch.equal(kept[p], want[p].sort().values), p


def test_batch_without_labels_runs_dense():
    model = tiny_peft("llama")
    ref = clone(model)
    batch = make_batch()
    batch["labels"][:] = -100
    apply_sparselora(model, SparseLoRAConfig(ffn_sparsity={"0-3": 0.9}, attn_sparsity={"0-3": 0.5},
                                             selector="labelled", start_step=0))
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).logits
        b = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert_close(a, b, "logits without labelled tokens", torch.float32)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_split_orders_context_labelled_padding(padding_side):
    batch = make_batch(padding_side=padding_side)
    s = split_tokens(batch["labels"], batch["attention_mask"], batch["labels"].shape)
    mask, labels = batch["attention_mask"].reshape(-1), batch["labels"].reshape(-1)
    ctx = (mask == 1) & (labels == -100)
    lab = labels != -100
    assert s.num_context == int(ctx.sum()) and s.num_labelled == int(lab.sum())
    o = s.order
    assert bool(ctx[o[: s.num_context]].all())
    assert bool(lab[o[s.num_context : s.num_context + s.num_labelled]].all())
    assert bool((mask[o[s.num_context + s.num_labelled :]] == 0).all())
    for part in (o[: s.num_context], o[s.num_context : s.num_context + s.num_labelled]):
        assert bool((part[1:] > part[:-1]).all())  # original order within each group


def test_labelled_rows_cap():
    x = torch.arange(2000.0)[:, None]
    assert labelled_rows(x, 100).shape[0] == 100
    rows = labelled_rows(x, 1500)
    assert rows.shape[0] <= LABELLED_ROWS_CAP and float(rows[-1]) < 1500


def test_config_and_flops():
    with pytest.raises(ValueError, match="dense_output_tokens=True"):
        SparseLoRAConfig(ffn_sparsity={1: 0.5}, selector="labelled", dense_output_tokens=False)
    model = tiny_peft("llama")
    ffn_only = {"ffn_sparsity": {"1-2": 0.5}}
    svd = flops(model.config, SparseLoRAConfig(**ffn_only), (8, 64), 16)
    lab = flops(model.config, SparseLoRAConfig(**ffn_only, selector="labelled"), (8, 64), 16)
    assert svd["estimator"] > 0 and lab["estimator"] == 0 and lab["sparse"] < svd["sparse"]
    att = flops(model.config, SparseLoRAConfig(attn_sparsity={1: 0.5}, selector="labelled"), (8, 64), 16)
    a = arch_info(model.config)
    assert att["estimator"] == 8 * 16 * 2 * a.hidden_size * (a.num_heads + 2 * a.num_kv_heads) * a.head_dim
