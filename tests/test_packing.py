"""Packed batches: segment-isolated attention, the packer and collator, and packed training against the same
examples padded; bucketed token counts against the plain step with the same split."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparselora import CUDAGraphStep, SparseLoRAConfig, apply_sparselora, use_packed_attention
from sparselora.data import DataCollator, PackedCollator, pack_features
from sparselora.ops.varlen import reference_packed_attention
from sparselora.patch import get_state
from sparselora.tokens import split_tokens

from helpers import assert_close, assert_same_lora_grads, assert_step_matches_reference, clone, lora_grads, tiny_peft


def _examples(lengths, labelled, vocab=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, lab in zip(lengths, labelled):
        ids = torch.randint(1, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (n - lab) + ids[n - lab :]})
    return out


def test_reference_attention_is_per_segment_causal():
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 5, 12, 13, 20, 20, 20], dtype=torch.int32)  # zero-length segments included
    q, k, v = torch.randn(20, 4, 8), torch.randn(20, 2, 8), torch.randn(20, 2, 8)
    out = reference_packed_attention(q, k, v, cu, 0.3)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if a == b:
            continue
        qs, ks, vs = q[a:b].transpose(0, 1), k[a:b].repeat_interleave(2, 1).transpose(0, 1), v[a:b].repeat_interleave(2, 1).transpose(0, 1)
        ref = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=0.3).transpose(0, 1)
        assert_close(out[a:b], ref, f"segment {a}:{b}")


def test_packer_keeps_limits_and_order():
    feats = _examples([30, 50, 20, 70, 10, 40, 90], [5] * 7)
    packs = pack_features(feats, max_tokens=100, max_segments=3)
    assert sorted(n for p in packs for n in p["seq_lens"]) == sorted(len(f["input_ids"]) for f in feats)
    for p in packs:
        assert sum(p["seq_lens"]) <= 100 and len(p["seq_lens"]) <= 3
        assert len(p["input_ids"]) == len(p["labels"]) == sum(p["seq_lens"])
        start = 0
        for n in p["seq_lens"]:
            assert p["labels"][start] == -100  # a segment's first token is never predicted from the previous one
            start += n
    with pytest.raises(ValueError, match="more than a packed row holds"):
        pack_features(_examples([120], [3]), max_tokens=100)


def test_collator_gives_one_shape_for_every_batch():
    feats = _examples([30, 50, 20, 70, 10, 40, 90, 33], [5] * 8)
    coll = PackedCollator(pad_token_id=0, max_tokens=100, max_segments=4, max_segment_len=90)
    packs = pack_features(feats, 100, 4)
    shapes = set()
    for i in range(0, len(packs), 2):
        b = coll(packs[i : i + 2])
        shapes.add(tuple((k, tuple(v.shape) if torch.is_tensor(v) else v) for k, v in b.items()))
        cu = b["cu_seq_lens_q"]
        assert cu[-1] == b["input_ids"].numel() and (cu[1:] >= cu[:-1]).all()
        assert (cu[1:] - cu[:-1]).max() <= 90
        real = b["attention_mask"].bool()
        assert (b["labels"][~real] == -100).all()
    assert len(shapes) <= 2  # the last batch may hold one pack
    with pytest.raises(ValueError, match="plain examples"):
        coll(feats[:2])


def _packed_model(arch="llama", **kw):
    model = tiny_peft(arch, **kw)
    use_packed_attention(model)
    return model


def _segment_logits(logits, batch):
    cu = batch["cu_seq_lens_q"].tolist()
    flat = logits.reshape(-1, logits.shape[-1])
    return [flat[a:b] for a, b in zip(cu[:-1], cu[1:])]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_forward_matches_each_example_alone(arch):
    feats = _examples([17, 9, 23], [4, 3, 6])
    model = _packed_model(arch)
    alone = clone(model)
    alone.base_model.model.set_attn_implementation("sdpa")
    coll = PackedCollator(pad_token_id=0, max_tokens=64, max_segments=4)
    batch = coll(pack_features(feats, 64, 4))
    with torch.no_grad():
        segs = _segment_logits(model(**batch).logits, batch)
        for f, seg in zip(feats, segs):
            ref = alone(input_ids=torch.tensor([f["input_ids"]])).logits[0]
            assert_close(seg, ref, "segment logits")


@pytest.mark.parametrize("sparse", [False, True])
def test_changing_one_segment_leaves_the_others_unchanged(sparse):
    """Isolation of packed segments, for logits and for every LoRA gradient's contribution (random selector with a
    fixed seed, so the channel choice does not depend on the data and only attention could leak)."""
    coll = PackedCollator(pad_token_id=0, max_tokens=64, max_segments=4)
    feats = _examples([17, 9, 23], [4, 3, 6])
    changed = [feats[0], _examples([9], [3], seed=5)[0], feats[2]]
    model = _packed_model()
    if sparse:
        apply_sparselora(model, SparseLoRAConfig(ffn_sparsity={"1-2": 0.5}, attn_sparsity={"1-2": 0.5},
                                                 selector="random", start_step=0))
    outs = []
    for fs in (feats, changed):
        batch = coll(pack_features(fs, 64, 4))
        # loss on segments 0 and 2 only: their gradients must not see segment 1
        batch["labels"][0, 17 : 17 + 9] = -100
        torch.manual_seed(0)
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        out.loss.backward()
        segs = _segment_logits(out.logits.detach(), batch)
        outs.append((segs[0], segs[2], lora_grads(model)))
    assert_close(outs[1][0], outs[0][0], "segment 0 logits")
    assert_close(outs[1][1], outs[0][1], "segment 2 logits")
    for n, g in outs[0][2].items():
        assert_close(outs[1][2][n], g, f"grad {n}")


@pytest.mark.parametrize("fast_kernels", [False, True])
def test_packed_step_matches_padded_step(fast_kernels):
    """Same examples, packed (packed attention) or padded (sdpa, per-row): same loss and gradients, dense LoRA."""
    feats = _examples([17, 9, 23, 12], [4, 3, 6, 2])
    packed = _packed_model()
    padded = clone(packed)
    padded.base_model.model.set_attn_implementation("sdpa")
    for m in (packed, padded):
        apply_sparselora(m, SparseLoRAConfig(ffn_sparsity={}, attn_sparsity={}, start_step=0),
                         fast_kernels=fast_kernels)
    pb = PackedCollator(pad_token_id=0, max_tokens=40, max_segments=4)(pack_features(feats, 40, 4))
    db = DataCollator(pad_token_id=0)(feats)
    losses = []
    for m, b in ((packed, pb), (padded, db)):
        m.zero_grad(set_to_none=True)
        loss = m(**b).loss
        loss.backward()
        losses.append(loss.detach())
    assert_close(losses[0], losses[1], "loss")
    assert_same_lora_grads(packed, padded)


def test_bucket_rounds_the_sparse_rows_down():
    labels = torch.full((2, 20), -100)
    labels[0, 15:] = 1
    labels[1, 18:] = 1
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 19] = 0
    exact = split_tokens(labels, mask, (2, 20))
    assert exact.num_context == 15 + 18
    b = split_tokens(labels, mask, (2, 20), bucket=8)
    assert b.num_context == 32 and b.num_labelled == exact.num_labelled
    assert torch.equal(b.ctx, exact.ctx[:32])  # the last context token runs dense
    assert split_tokens(labels, mask, (2, 20), bucket=64) is None  # less than one bucket: dense


def _sparse_packed_pair(selector: str):
    """A packed-attention model and its clone, both SparseLoRA-patched (fast kernels, sparse from step 0)."""
    model = _packed_model("qwen2")
    ref = clone(model)
    for m in (model, ref):
        apply_sparselora(m, SparseLoRAConfig(ffn_sparsity={"1-2": 0.6}, attn_sparsity={"1-2": 0.5},
                                             selector=selector, start_step=0), fast_kernels=True)
    return model, ref


@pytest.mark.parametrize("selector", ["svd", "labelled"])
def test_graph_path_on_packed_buckets_matches_plain_step(selector):
    """CUDAGraphStep's path on packed batches with bucketed counts against a plain forward + backward pinned to the
    same bucketed split (some context rows then run dense: the bucket must matter here)."""
    model, ref = _sparse_packed_pair(selector)
    step = CUDAGraphStep(model, capture=False, bucket=8, slack=0)  # buckets only: no reuse of a neighbour
    coll = PackedCollator(pad_token_id=0, max_tokens=64, max_segments=4, max_segment_len=32)
    for seed in (1, 2, 1):
        batch = coll(pack_features(_examples([17, 9, 23], [4, 3, 6], seed=seed), 64, 4))
        loss = step(**batch)
        split = split_tokens(batch["labels"], batch["attention_mask"], tuple(batch["input_ids"].shape), True, 8)
        exact = split_tokens(batch["labels"], batch["attention_mask"], tuple(batch["input_ids"].shape))
        assert split.num_context < exact.num_context
        assert_step_matches_reference(model, ref, batch, loss, split)
    assert get_state(model).split.num_context % 8 == 0


@pytest.mark.parametrize("selector", ["svd", "oracle"])
def test_graph_reuse_of_a_neighbour_matches_plain_step(selector):
    """Batches served by a neighbouring graph (fewer sparse rows, more head rows than their own bucket) train
    exactly as a plain forward + backward pinned to the split the step used; the counts stay within the slack."""
    model, ref = _sparse_packed_pair(selector)
    step = CUDAGraphStep(model, capture=False, bucket=4, slack=12, promote_after=100)
    coll = PackedCollator(pad_token_id=0, max_tokens=64, max_segments=4, max_segment_len=32)
    buckets = set()
    for seed, prompts in enumerate(([17, 9, 23], [15, 9, 21], [20, 12, 25], [11, 9, 20])):
        batch = coll(pack_features(_examples(prompts, [4, 3, 6], seed=seed), 64, 4))
        exact = split_tokens(batch["labels"], batch["attention_mask"], tuple(batch["input_ids"].shape))
        buckets.add(exact.num_context // 4)
        loss = step(**batch)
        used = get_state(model).split
        assert used.num_context % 4 == 0 and exact.num_context // 4 * 4 - 12 <= used.num_context <= exact.num_context
        assert_step_matches_reference(model, ref, batch, loss, used)
    assert len(buckets) == 4 and len(step.graphs) < len(buckets)  # a neighbour served some batches


def test_graph_choice_reuses_then_promotes():
    """The signature policy alone: the first batch's graph is placed a bucket low, nearby buckets reuse it (never a
    graph with more sparse rows or fewer head rows than the batch has), a bucket served ``promote_after`` times,
    or beyond the slack, gets its own graph."""
    from types import SimpleNamespace

    pol = SimpleNamespace(graphs={}, served={}, promote_after=2)
    choose = lambda n, h: CUDAGraphStep._choose(pol, "b", n, -(-h // 16) * 16, h, 24, 16, 8)  # noqa: E731
    assert choose(64, 30) == (56, 32)  # new: one bucket low
    pol.graphs[("b", 56, 32)] = None
    assert choose(64, 30) == (56, 32)  # its own bucket is served by the graph (once)
    assert choose(72, 20) == (56, 32)  # within the slack, head within one head bucket
    assert choose(48, 20) == (40, 32)  # fewer context rows than the graph has: new graph
    assert choose(72, 40) == (64, 48)  # more head rows than any graph: new graph (a bucket low)
    assert choose(104, 20) == (96, 32)  # beyond the slack: new graph
    assert choose(64, 30) == (56, 32)  # served twice (promote_after) ...
    assert choose(64, 30) == (64, 32)  # ... then promoted to its own graph
    assert CUDAGraphStep._choose(pol, "other", 64, 32, 30, 24, 16, 8) == (56, 32)  # other shapes never share
    assert CUDAGraphStep._choose(pol, "b", 0, 32, 30, 24, 16, 8) == (0, 32)  # dense: no sparse rows to lower


def test_finetune_packed_path_on_cpu(tmp_path, capsys):
    """`sparselora finetune --packing --cuda-graphs` (the GPU default, forced; graphs run their eager path on CPU):
    the run trains on packed rows, says so, and records the path."""
    import json

    from test_cli import base_args, make_data, make_model_dir

    from sparselora.cli.main import main

    env = {"model": str(make_model_dir(tmp_path / "m")), "data": str(make_data(tmp_path / "d.jsonl")),
           "est": str(tmp_path / "est")}
    out = tmp_path / "run"
    assert main(base_args(env, out, "--max-steps", "2", "--lora-r", "4", "--packing", "--cuda-graphs",
                          "--fast-kernels", "--loss-bound", "off")) == 0
    assert "training path: packed rows of" in capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    path = s["training_path"]
    assert path["packed"] and path["cuda_graphs"] and path["max_tokens"] >= path["max_segment_len"]
    assert s["steps"] == 2 and all(step["tokens"] > 0 for step in s["step_times"])
    assert s["losses"] and all(l["loss"] == l["loss"] for l in s["losses"])  # finite
