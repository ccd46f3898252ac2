"""The sparse path on CUDA against the masked reference (forward and every gradient); skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from sparselora import SparseLoRAConfig, apply_sparselora, kept_channels
from sparselora.patch import get_state

from helpers import assert_close, clone, make_batch, step_outputs, tiny_peft
from reference import assert_bf16_close_to_reference, install_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


run = step_outputs


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("selector", ["svd", "labelled", "oracle"])
def test_cuda_sparse_matches_reference(arch, dtype, padding_side, selector):
    model = tiny_peft(arch, dtype=dtype, attn_implementation="sdpa").cuda()
    ref = clone(model)
    batch = {k: v.cuda() for k, v in make_batch(padding_side=padding_side, seed=9).items()}
    apply_sparselora(model, SparseLoRAConfig(ffn_sparsity={"0-3": 0.7}, attn_sparsity={"1-3": 0.5}, selector=selector, start_step=0))
    sparse = run(model, batch)
    kept = kept_channels(model)
    assert kept
    if dtype == torch.float32:
        handles = install_reference(ref, kept, batch)
        la, lossa, ga = sparse
        lb, lossb, gb = run(ref, batch)
        for h in handles:
            h.remove()
        assert_close(la, lb, "logits", dtype)
        assert_close(lossa, lossb, "loss", dtype)
        for n in gb:
            assert_close(ga[n], gb[n], f"grad {n}", dtype)
        return
    assert_bf16_close_to_reference(sparse, ref, kept, batch, run)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cuda_sparse_under_autocast_matches_reference(arch):
    """What Trainer(bf16=True) runs on a GPU: a bf16 base with float32 adapters (PEFT's default) on q/k/v/o under
    bf16 autocast, through the fused projections and the fused FFN, against the masked reference under the same
    autocast (judged by the distance from float64, which autocast leaves alone, as every bf16 check)."""
    import sparselora.ops.fused as fused
    from sparselora.bench.lora import QKVO

    model = tiny_peft(arch, dtype=torch.bfloat16, targets=QKVO, attn_implementation="sdpa").cuda()
    assert next(p for n, p in model.named_parameters() if "lora_A" in n).dtype == torch.float32
    ref = clone(model)
    batch = {k: v.cuda() for k, v in make_batch(seed=4).items()}
    apply_sparselora(model, SparseLoRAConfig(ffn_sparsity={"0-3": 0.7}, attn_sparsity={"1-3": 0.5}, start_step=0))

    def under_autocast(m, b):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return run(m, b)

    calls = []
    real = fused._apply_as_autocast
    fused._apply_as_autocast = lambda fn, *a: calls.append(fn) or real(fn, *a)
    try:
        sparse = under_autocast(model, batch)
    finally:
        fused._apply_as_autocast = real
    assert {fused._SplitLoRALinear, fused._SplitFFN} <= set(calls)
    kept = kept_channels(model)
    assert kept
    assert_bf16_close_to_reference(sparse, ref, kept, batch, under_autocast)


@pytest.mark.parametrize("n, i, r", [(3072, 14336, 8), (37, 1000, 4), (1, 129, 16), (700, 5, 8)])
def test_triton_ffn_scores(n, i, r):
    import torch.nn.functional as F

    from sparselora.ops.scores import ffn_scores_sq

    g = torch.Generator(device="cuda").manual_seed(n)
    zg, zu = (torch.randn(n, r, device="cuda", generator=g) for _ in range(2))
    bg, bu = (torch.randn(r, i, device="cuda", generator=g) * 0.3 for _ in range(2))
    ref = (F.silu(zg.double() @ bg.double()) * (zu.double() @ bu.double())).pow(2).sum(0)
    out = ffn_scores_sq(zg, zu, bg, bu)
    assert_close(out, ref, "triton ffn scores", rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cuda_fast_kernels_match_plain_path(arch):
    """fast_kernels=True on CUDA (liger RMSNorm / SiLU*mul / fused linear cross-entropy on labelled rows) gives
    the loss and LoRA gradients of the plain path (float32)."""
    model = tiny_peft(arch, attn_implementation="sdpa").cuda()
    fast = clone(model)
    batch = {k: v.cuda() for k, v in make_batch(seed=3).items()}
    cfg = SparseLoRAConfig(ffn_sparsity={"0-3": 0.7}, attn_sparsity={"1-3": 0.5}, start_step=0)
    apply_sparselora(model, cfg)
    apply_sparselora(fast, cfg, fast_kernels=True)
    _, loss, grads = step_outputs(model, batch, embed_grad=False)
    _, fast_loss, fast_grads = step_outputs(fast, batch, embed_grad=False)
    assert_close(fast_loss, loss, "loss", rtol=1e-4, atol=1e-4)
    for n in grads:
        assert_close(fast_grads[n], grads[n], f"grad {n}", rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("selector", ["svd", "labelled", "sampled", "sampled-spread"])
def test_cuda_graph_step_matches_eager_training(padded, selector):
    """Five AdamW steps through CUDAGraphStep (captured graphs, replayed with new ids) give the losses and adapter
    weights of the same steps run eagerly (float32); the dense (warm-up) steps get their own graph. sampled-spread:
    small samples, and other row counts in two FFN layers (`ffn_sample_rows`)."""
    from sparselora import CUDAGraphStep, schedule

    model = tiny_peft("qwen2", attn_implementation="sdpa").cuda()
    eager = clone(model)
    rows = {"sample_rows": 8, "ffn_sample_rows": {"0": 4, "2": 16}} if selector == "sampled-spread" else {}
    cfg = SparseLoRAConfig(ffn_sparsity={"0-3": 0.7}, attn_sparsity={"1-3": 0.5}, selector=selector.split("-")[0],
                           start_step=2, **rows)
    for m in (model, eager):
        apply_sparselora(m, cfg, fast_kernels=True)
    step = CUDAGraphStep(model, bucket=1)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (model, eager)]
    for i in range(5):
        b = make_batch(seed=10 + i, lengths=(24, 17, 11) if padded else (24,))
        batch = {k: v.cuda() for k, v in b.items()}
        for m in (model, eager):
            schedule(m, i, 5)
        loss = step(**batch)
        ref = eager(**batch).loss
        ref.backward()
        assert_close(loss, ref.detach(), f"loss at step {i}", rtol=1e-4, atol=1e-4)
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
    assert step.captures == 2  # dense steps 0-1, sparse steps 2-4
    for (n, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        if p.requires_grad:
            assert_close(p, q, f"weight {n} after 5 steps", rtol=1e-3, atol=1e-4)
    # the running FFN scores saw each batch once: the capture's warm-up forwards left them as they were
    mine, theirs = get_state(model).running_scores, get_state(eager).running_scores
    assert len(mine) == len(theirs) == (4 if selector.startswith("sampled") else 0)
    for j, (r, e) in enumerate(zip(mine.values(), theirs.values())):
        assert_close(r.running, e.running, f"running FFN scores of sparse layer {j}", rtol=1e-4, atol=1e-6)


def test_cuda_graph_trainer_matches_trainer_on_gpu(tmp_path):
    """CUDAGraphTrainer with real captures logs the losses and ends with the weights of the plain Trainer."""
    from transformers import Trainer, TrainingArguments

    from sparselora import CUDAGraphTrainer, SparseLoRACallback
    from sparselora.data import DataCollator, Example, tokenize_examples
    from test_data import tiny_tokenizer

    tok = tiny_tokenizer()
    base = tiny_peft("llama", vocab_size=len(tok), r=4, attn_implementation="sdpa")
    rows = [Example(f"Question {i}: what is {i} times {i + 3}? Think.", f" {i * (i + 3)}") for i in range(16)]
    feats, _ = tokenize_examples(rows, tok, max_length=128)
    runs = {}
    for cls in (Trainer, CUDAGraphTrainer):
        model = clone(base).cuda()
        apply_sparselora(model, SparseLoRAConfig(ffn_sparsity={"1-2": 0.75}, attn_sparsity={"2": 0.5}, start_step=2),
                         fast_kernels=True)
        args = TrainingArguments(output_dir=str(tmp_path / cls.__name__), max_steps=4, per_device_train_batch_size=2,
                                 learning_rate=1e-2, report_to=[], logging_steps=1, save_strategy="no",
                                 disable_tqdm=True, remove_unused_columns=False, seed=0, data_seed=0)
        exact = {} if cls is Trainer else {"graph_bucket": 1}
        trainer = cls(model=model, args=args, train_dataset=feats, data_collator=DataCollator(tok),
                      callbacks=[SparseLoRACallback()], **exact)
        trainer.train()
        if cls is CUDAGraphTrainer:
            assert trainer._graph_step.captures >= 2  # dense warm-up and sparse steps, per batch signature
        runs[cls.__name__] = ([h["loss"] for h in trainer.state.log_history if "loss" in h],
                              {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    (la, wa), (lb, wb) = runs["Trainer"], runs["CUDAGraphTrainer"]
    assert_close(torch.tensor(lb), torch.tensor(la), "logged losses", rtol=1e-4, atol=1e-4)
    for n in wa:
        assert_close(wb[n], wa[n], f"weight {n}", rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("gqa", [1, 4])
def test_packed_attention_kernel_matches_reference(gqa):
    """torch's varlen flash attention (bf16) against the block-diagonal SDPA reference in float32, zero-length
    segments included; the output is fully written (poisoned first)."""
    from sparselora.ops.varlen import packed_attention_forward, reference_packed_attention

    torch.manual_seed(0)
    cu = torch.tensor([0, 100, 100, 357, 360, 1000, 1024, 1024, 1024], dtype=torch.int32, device="cuda")
    hq, d = 8, 64
    q = torch.randn(1, hq, 1024, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, hq // gqa, 1024, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out, _ = packed_attention_forward(None, q, k, v, None, scaling=d ** -0.5, cu_seq_lens_q=cu, max_length_q=640)
    ref = reference_packed_attention(*(t[0].transpose(0, 1).float() for t in (q, k, v)), cu, d ** -0.5)
    assert_close(out[0].float(), ref, "packed attention", rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("sparse", [False, True])
def test_cuda_graph_step_on_packed_rows_matches_eager(sparse):
    """Packed rows (varlen attention, bf16), bucketed counts: graphs replayed over new packs give the eager
    path's losses and gradients, and a few graphs serve all batches."""
    from sparselora import CUDAGraphStep, use_packed_attention
    from sparselora.data import PackedCollator, pack_features

    model = tiny_peft("llama", dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    use_packed_attention(model)
    eager = clone(model)
    cfg = SparseLoRAConfig(ffn_sparsity={"0-3": 0.7} if sparse else {}, attn_sparsity={"1-3": 0.5} if sparse else {},
                           start_step=0)
    for m in (model, eager):
        apply_sparselora(m, cfg, fast_kernels=True)
    step, ref_step = CUDAGraphStep(model, bucket=16), CUDAGraphStep(eager, bucket=16, capture=False)
    coll = PackedCollator(pad_token_id=0, max_tokens=256, max_segments=8, max_segment_len=96)
    g = torch.Generator().manual_seed(3)
    for i in range(6):
        feats = []
        for _ in range(5):
            n, lab = int(torch.randint(20, 90, (1,), generator=g)), int(torch.randint(3, 15, (1,), generator=g))
            ids = torch.randint(1, 101, (n,), generator=g).tolist()
            feats.append({"input_ids": ids, "labels": [-100] * (n - lab) + ids[n - lab:]})
        batch = coll(pack_features(feats, 256, 8)[:1])
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
        loss, ref = step(**batch), ref_step(**batch)
        assert_close(loss.float(), ref.float(), f"loss at step {i}", rtol=2e-2, atol=2e-2)
        for (n, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
            if p.requires_grad:
                assert_close(p.grad.float(), q.grad.float(), f"grad {n} at step {i}", rtol=5e-2, atol=5e-2)
        model.zero_grad(set_to_none=True)
        eager.zero_grad(set_to_none=True)
    assert 1 <= step.captures <= 6


@pytest.mark.parametrize("p", [0.05, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seeded_dropout_kernels(p, dtype):
    """The seeded mask (`ops.dropout`): p of the entries dropped, in every lane of a Philox draw and row alike, with
    independent neighbours; the same seed gives the same mask (the backward's regeneration), a new draw another;
    the masked add equals its reference. An odd shape, so the last tile is partial."""
    from sparselora.ops import dropout

    x = torch.randn(1031, 517, device="cuda", dtype=dtype)
    seed = dropout.draw(x, p)
    assert seed.dtype == torch.int64 and seed.numel() == 1  # the seeded path, not torch's bool mask
    keep = dropout.keep_of(seed, x, p)
    flat = keep.flatten().float()
    assert abs(flat.mean().item() - (1 - p)) < 0.005
    for lane in range(4):
        assert abs(flat[lane::4].mean().item() - (1 - p)) < 0.01, f"lane {lane} of the Philox draws is off"
    both_dropped = ((flat[:-1] == 0) & (flat[1:] == 0)).float().mean().item()
    assert abs(both_dropped - p * p) < 0.01, f"neighbours are correlated: {both_dropped} vs {p * p}"
    assert not torch.equal(keep[0], keep[1])
    out = dropout.dropped(x, seed, p, dtype)
    assert torch.equal(out, torch.where(keep, x, torch.zeros_like(x)))
    assert torch.equal(dropout.dropped(x, seed, p, dtype), out)
    assert not torch.equal(dropout.keep_of(dropout.draw(x, p), x, p), keep)
    acc = torch.randn_like(x)
    t = torch.randn(x.shape, device="cuda", dtype=torch.float32)
    want = (acc.float() + t * keep).to(dtype)
    got = dropout.add_dropped_(acc.clone(), t, seed, p)
    assert_close(got, want, "masked add", dtype)


def test_seeded_lora_dropout_under_gradient_checkpointing():
    """Checkpointing recomputes a layer's forward in the backward: the seeded masks must be the same ones (torch's
    checkpoint restores the CUDA generator, from which the seeds are drawn), so the gradients equal those of the
    same step without checkpointing; and dropout really acts (another seed, another loss)."""
    from peft import LoraConfig, get_peft_model

    from helpers import tiny_model

    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama", attn_implementation="sdpa"),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3,
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])).cuda()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    ckpt = clone(model)
    for m in (model, ckpt):
        apply_sparselora(m, SparseLoRAConfig(ffn_sparsity={"1-2": 0.5}, attn_sparsity={"1-2": 0.5}, start_step=0),
                         fast_kernels=True)
        m.train()
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = {k: v.cuda() for k, v in make_batch(seed=4).items()}
    outs = []
    for m, seed in ((model, 5), (ckpt, 5), (model, 6)):
        torch.manual_seed(seed)
        outs.append(run(m, batch))
    (_, la, ga), (_, lb, gb), (_, lc, _) = outs
    assert_close(la, lb, "checkpointed loss")
    for n in ga:
        assert_close(ga[n], gb[n], f"checkpointed grad {n}")
    assert la.item() != lc.item(), "the dropout masks did not change with the seed"


def test_cuda_graph_step_draws_new_lora_dropout_each_replay():
    """LoRA dropout inside captured graphs: each replay draws a new mask (RNG offsets advance), as eager steps do."""
    from peft import LoraConfig, get_peft_model

    from helpers import tiny_model
    from sparselora import CUDAGraphStep

    model = get_peft_model(tiny_model("llama", attn_implementation="sdpa"),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=["q_proj", "v_proj", "o_proj",
                                                                                            "up_proj"])).cuda()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    apply_sparselora(model, SparseLoRAConfig(ffn_sparsity={"1-2": 0.5}, attn_sparsity={"1-2": 0.5}, start_step=0),
                     fast_kernels=True)
    step = CUDAGraphStep(model, bucket=1)
    batch = {k: v.cuda() for k, v in make_batch(seed=4).items()}
    losses = []
    for _ in range(4):
        losses.append(step(**batch).item())
        model.zero_grad(set_to_none=True)
    assert step.captures == 1 and all(torch.isfinite(torch.tensor(losses)))
    assert len(set(losses[1:])) == 3, f"replays repeated a dropout mask: {losses}"


@pytest.mark.parametrize("selector", ["svd", "sampled"])
def test_model_moved_to_cuda_after_apply_matches_one_applied_there(selector):
    """The Trainer moves the model to the GPU only when training starts, after `apply_sparselora` ran on the
    CPU: the estimator's factors must follow (they once stayed on the CPU and the first sparse step failed)."""
    cfg = SparseLoRAConfig(ffn_sparsity={"0-3": 0.7}, attn_sparsity={"1-3": 0.5}, selector=selector, start_step=0)
    batch = {k: v.cuda() for k, v in make_batch(seed=4).items()}
    moved = tiny_peft("qwen2")
    here = clone(moved).cuda()
    apply_sparselora(moved, cfg)
    moved.cuda()
    apply_sparselora(here, cfg)
    la, lossa, ga = run(moved, batch)
    lb, lossb, gb = run(here, batch)
    assert_close(la, lb, "logits", torch.float32)
    for n in gb:
        assert_close(ga[n], gb[n], f"grad {n}", torch.float32)


def _check_top_indices(got, scores, k, what):
    """``got``: k distinct ascending indices whose scores are the k largest, ties taken from the lowest index."""
    assert got.dtype == torch.long and got.shape == (k,), f"{what}: {got.dtype} {tuple(got.shape)}"
    assert bool((got[1:] > got[:-1]).all()), f"{what}: not strictly ascending"
    want = scores.topk(k).values
    assert torch.equal(scores[got].sort().values, want.sort().values), f"{what}: kept scores differ from torch.topk's"
    t = want.min()
    above, ties = (scores > t).nonzero().flatten(), (scores == t).nonzero().flatten()
    assert torch.equal(got, torch.cat([above, ties[: k - above.numel()]]).sort().values), f"{what}: ties"


@pytest.mark.parametrize("n", [1, 7, 512, 1000, 4097, 6149, 8960, 14336, 18944, 32768])
def test_top_indices_kernel_matches_torch_topk(n):
    """The fused top-k against torch.topk on random, negative, tied and constant scores, k from 1 to n: one program,
    or two stages for long vectors and small k (4097, 6149: a last block shorter than its k, slots left unwritten)."""
    from sparselora.ops.topk import top_indices

    g = torch.Generator(device="cuda").manual_seed(n)
    for kind in ("uniform", "normal", "ties", "constant", "bf16"):
        s = {"uniform": lambda: torch.rand(n, device="cuda", generator=g),
             "normal": lambda: torch.randn(n, device="cuda", generator=g),
             "ties": lambda: torch.randint(0, 7, (n,), device="cuda", generator=g).float(),
             "constant": lambda: torch.zeros(n, device="cuda"),
             "bf16": lambda: torch.randn(n, device="cuda", generator=g).bfloat16()}[kind]()
        for k in sorted({1, max(1, n // 100), max(1, n // 50), max(1, n // 4), n}):
            _check_top_indices(top_indices(s, k), s.float(), k, f"n={n} k={k} {kind}")


def test_top_indices_in_a_cuda_graph_and_past_the_fused_length():
    """Captured, the kernel recomputes from the replayed input; vectors longer than FUSED_MAX take torch.topk."""
    from sparselora.ops.topk import FUSED_MAX, top_indices

    s = torch.rand(14336, device="cuda")
    top_indices(s, 144)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = top_indices(s, 144)
    for seed in range(3):
        s.copy_(torch.rand(14336, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed)))
        graph.replay()
        _check_top_indices(out, s, 144, f"replay {seed}")
    big = torch.rand(FUSED_MAX + 5, device="cuda")
    _check_top_indices(top_indices(big, 300), big, 300, "fallback")


def test_cuda_graph_trainer_on_the_gpu_matches_the_trainer(tmp_path):
    """CUDAGraphTrainer on a GPU (host-side counts, non-blocking pinned copies, graphs) logs the losses of the plain
    Trainer's eager steps and ends with the same adapter weights."""
    from transformers import Trainer, TrainingArguments

    from sparselora import CUDAGraphTrainer, SparseLoRACallback

    batches = [make_batch(seed=s) for s in range(4)]
    rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(b["input_ids"].shape[0])]
    base = tiny_peft("llama", attn_implementation="sdpa")
    runs = {}
    for cls in (Trainer, CUDAGraphTrainer):
        model = clone(base).cuda()
        apply_sparselora(model, SparseLoRAConfig(ffn_sparsity={"0-3": 0.7}, attn_sparsity={"1-3": 0.5}, start_step=0),
                         fast_kernels=True)
        args = TrainingArguments(output_dir=str(tmp_path / cls.__name__), max_steps=4, report_to=[],
                                 per_device_train_batch_size=batches[0]["input_ids"].shape[0], learning_rate=1e-3,
                                 logging_steps=1, save_strategy="no", disable_tqdm=True, remove_unused_columns=False,
                                 seed=0, data_seed=0)
        trainer = cls(model=model, args=args, train_dataset=rows, callbacks=[SparseLoRACallback()],
                      **({"graph_bucket": 1} if cls is CUDAGraphTrainer else {}))
        if cls is Trainer:
            trainer.model_accepts_loss_kwargs = False  # micro-batches weigh the same, as in the graph trainer
        trainer.train()
        runs[cls.__name__] = ([h["loss"] for h in trainer.state.log_history if "loss" in h],
                              {n: p.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad})
    (la, wa), (lb, wb) = runs["Trainer"], runs["CUDAGraphTrainer"]
    assert len(la) == len(lb) == 4
    assert_close(torch.tensor(lb), torch.tensor(la), "logged losses", torch.float32, rtol=1e-3, atol=1e-3)
    for n in wa:
        assert_close(wb[n], wa[n], f"weight {n}", torch.float32, rtol=1e-3, atol=1e-3)


def test_step_clock_on_the_device_timeline():
    """On CUDA the clock reads events: an interval whose end the GPU has not reached stays out until it has."""
    from sparselora.bench.timing import Clock

    clock = Clock(torch.device("cuda"))
    clock.mark()
    a = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):
        a = a @ a / 64
    clock.mark()
    got = clock.seconds(wait=True)
    assert len(got) == 1 and got[0] > 0


def test_chunked_head_loss_in_cuda_graph_under_autocast(monkeypatch):
    """The labelled-only loss as the graphed Trainer step runs it (captured, under bf16 autocast, a bucketed row
    count): the chunked head, never the full float32 logits (the capture's peak stays below their size; it was
    several times that), with the loss and input gradient of F.cross_entropy over the autocast logits."""
    from sparselora.ops import fused_kernels
    from sparselora.ops.fused_kernels import head_chunk_rows, labelled_cross_entropy

    vocab, hidden_size = 50_000, 256
    monkeypatch.setattr(fused_kernels, "HEAD_CHUNK_BYTES_GPU", 4 * vocab * 256)
    assert head_chunk_rows(vocab, "cuda") == 256
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden0 = torch.randn(4, 700, hidden_size, device="cuda", generator=g).bfloat16()
    weight = (torch.randn(vocab, hidden_size, device="cuda", generator=g) / 16).bfloat16()
    labels = torch.randint(0, vocab, (4, 700), device="cuda", generator=g)
    labels[:, :300] = -100
    rows = int((labels[:, 1:] != -100).sum()) + 37  # bucketed: 37 rows without a label
    hidden = hidden0.clone().requires_grad_()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = labelled_cross_entropy(hidden, weight, labels, None, rows)
        loss.backward()
        return loss

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(s)
    hidden.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 4 * vocab * rows, f"capture peak {peak / 2**20:.0f} MiB >= the full float32 logits"
    hidden.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    ref_h = hidden0.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = torch.nn.functional.cross_entropy((ref_h @ weight.t())[:, :-1].reshape(-1, vocab).float(),
                                                labels[:, 1:].reshape(-1))
    ref.backward()
    assert_close(loss, ref, "loss", torch.bfloat16)
    assert_close(hidden.grad, ref_h.grad, "hidden grad", torch.bfloat16)


def test_callback_warns_of_an_eager_gpu_run_and_not_of_a_graphed_one(caplog):
    import logging

    from transformers import TrainerControl, TrainerState, TrainingArguments

    from sparselora import CUDAGraphTrainer, SparseLoRACallback

    model = tiny_peft("llama").cuda()
    apply_sparselora(model, SparseLoRAConfig(ffn_sparsity={1: 0.5}, attn_sparsity={}, start_step=0))
    state, cb = TrainerState(max_steps=4), SparseLoRACallback()
    with caplog.at_level(logging.WARNING, logger="sparselora"):
        cb.on_train_begin(None, state, TrainerControl(), model=model)
    assert "trains eagerly on this GPU" in caplog.text
    caplog.clear()
    CUDAGraphTrainer(model=model, args=TrainingArguments(output_dir="/tmp/sl-cb", report_to=[], bf16=False))
    with caplog.at_level(logging.WARNING, logger="sparselora"):
        cb.on_train_begin(None, state, TrainerControl(), model=model)
    assert "trains eagerly" not in caplog.text
