"""Each selector's kept channels, inside the patched model and per layer, against an independent computation on the
same batch: the layer inputs are captured in the same sparse forward, the context rows are found from the batch's
labels and mask by hand, the projections are recomputed from the raw weights (base + bias + LoRA), the SVD
estimate from torch.linalg.svd, and the GQA/RoPE-pair scoring is written out here. A selector fed the wrong rows
(permuted, labelled instead of context), the up factors in place of the gate's, or q/k/v without their bias fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparselora import SparseLoRAConfig, apply_sparselora, kept_channels
from sparselora.config import SELECTORS
from sparselora.flop_count import flops
from sparselora.models.registry import arch_info
from sparselora.patch import get_state
from sparselora.selection import SELECTORS as REGISTRY, sample_rows

from helpers import ALL_TARGETS, make_batch, tiny_peft

LAYERS = (0, 2, 3)
SPARSITY = 0.6
ROWS = 7  # the sampled selector's rows: fewer than the batch's context rows, so which rows it takes matters


def _lin(mod, x):
    """A PEFT LoRA linear from its raw weights (dropout 0): x W^T + b + s (x A^T) B^T."""
    base = getattr(mod, "base_layer", mod)
    y = x @ base.weight.double().T
    if base.bias is not None:
        y = y + base.bias.double()
    for name in getattr(mod, "lora_A", {}):
        y = y + mod.scaling[name] * (x @ mod.lora_A[name].weight.double().T) @ mod.lora_B[name].weight.double().T
    return y


def _svd_lin(mod, x, r, bias=True):
    """The rank-r truncated SVD of the frozen weight applied to x (+ the bias)."""
    base = getattr(mod, "base_layer", mod)
    u, s, vh = torch.linalg.svd(base.weight.double(), full_matrices=False)
    y = x @ (u[:, :r] * s[:r] @ vh[:r]).T
    return y + base.bias.double() if bias and base.bias is not None else y


def _top(scores, k):
    return set(scores.topk(k).indices.tolist())


def _keep(n, s):
    return max(1, min(n, round((1 - s) * n)))


def _assert_top(kept, scores, k, what):
    """``kept`` is a top-k set of ``scores`` (ties within float error allowed)."""
    kept = kept.tolist()
    assert len(kept) == k == len(set(kept)), f"{what}: {len(kept)} channels kept, expected {k}"
    rest = sorted(set(range(scores.numel())) - set(kept))
    if rest:
        lo, hi = scores[kept].min().item(), scores[rest].max().item()
        assert lo >= hi - 1e-9 * scores.abs().max().item(), f"{what}: kept a channel scoring {lo:.6g} < dropped {hi:.6g}"


def _attention_expected(q, k, v, arch, s):
    """The oracle's rule, written out: kv unit (g, d) scores mean_h ||q_(h,d)|| * ||k_(g,d)|| summed over the RoPE
    pair (d, d + D/2); q keeps (h, d) for every head h of a kept unit's group; o the columns of every head reading a
    kept v channel. Returns {q, k, v, o: sorted channel lists} and the unit scores."""
    D, G, Hkv = arch.head_dim, arch.group_size, arch.num_kv_heads
    qn, kn, vn = q.norm(dim=0).view(-1, D), k.norm(dim=0).view(Hkv, D), v.norm(dim=0)
    half = D // 2
    unit = {}
    for g in range(Hkv):
        for d in range(half):
            unit[(g, d)] = sum(qn[g * G : (g + 1) * G, e].mean().item() * kn[g, e].item() for e in (d, d + half))
    units = list(unit)
    scores = torch.tensor([unit[u] for u in units], dtype=torch.float64)
    top = [units[i] for i in sorted(_top(scores, _keep(len(units), s)))]
    k_ch = sorted(g * D + e for g, d in top for e in (d, d + half))
    q_ch = sorted(h * D + c % D for c in k_ch for h in range(c // D * G, (c // D + 1) * G))
    v_ch = sorted(_top(vn, _keep(vn.numel(), s)))
    o_ch = sorted(h * D + c % D for c in v_ch for h in range(c // D * G, (c // D + 1) * G))
    return {"q": q_ch, "k": k_ch, "v": v_ch, "o": o_ch}, scores, units


def _check_attention(kept, q, k, v, arch, s, what):
    want, scores, units = _attention_expected(q, k, v, arch, s)
    got_units = sorted({(c // arch.head_dim, c % arch.head_dim % (arch.head_dim // 2)) for c in kept["k"].tolist()})
    _assert_top(torch.tensor([units.index(u) for u in got_units]), scores, len(want["k"]) // 2, f"{what} k units")
    D, G = arch.head_dim, arch.group_size
    k_ch = kept["k"].tolist()
    assert kept["q"].tolist() == sorted(h * D + c % D for c in k_ch for h in range(c // D * G, (c // D + 1) * G)), what
    vn = v.norm(dim=0)
    _assert_top(kept["v"], vn, len(want["v"]), f"{what} v")
    v_ch = kept["v"].tolist()
    assert kept["o"].tolist() == sorted(h * D + c % D for c in v_ch for h in range(c // D * G, (c // D + 1) * G)), what


def _run(arch, selector, seed=3, targets=ALL_TARGETS, **cfg_kw):
    """Sparse forward of a tiny model (FFN and attention sparse in LAYERS); the inputs of each sparse layer's MLP
    and attention as the patched model saw them; the kept channels; the context and labelled rows."""
    model = tiny_peft(arch, targets=targets).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # Qwen2-sized q/k/v biases (real ones are large), so that leaving them out shows
                p.mul_(5)
            elif "base_layer.weight" in name and "o_proj" not in name and "down_proj" not in name:
                p.div_(p.norm(dim=1, keepdim=True))  # equal row norms: which rows are scored decides the channels
    cfg = SparseLoRAConfig(ffn_sparsity={i: SPARSITY for i in LAYERS}, attn_sparsity={i: SPARSITY for i in LAYERS},
                           selector=selector, start_step=0, sample_rows=ROWS, **cfg_kw)
    apply_sparselora(model, cfg)
    blocks = model.base_model.model.model.layers
    return (model, blocks, *_forward_seen(model, blocks, seed))


def _forward_seen(model, blocks, seed):
    """One sparse forward of a batch: each sparse layer's MLP / attention input (sequence order), the kept
    channels, and the batch's context and labelled rows (flattened (batch, seq) order)."""
    batch = make_batch(batch=3, seq=24, labelled=(3, 5, 2), lengths=(24, 19, 15), seed=seed)
    seen = {}
    hooks = []
    for i in LAYERS:
        hooks.append(blocks[i].mlp.register_forward_pre_hook(
            lambda m, a, i=i: seen.__setitem__(("mlp", i), a[0].detach().double())))
        hooks.append(blocks[i].self_attn.register_forward_pre_hook(
            lambda m, a, kw, i=i: seen.__setitem__(("attn", i), kw.get("hidden_states", a[0] if a else None).detach().double()),
            with_kwargs=True))
    torch.manual_seed(11)
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    state = get_state(model)
    assert state.stream_permuted  # LAYERS are attention-sparse: the stream ran context-first there (modules.stream)
    for key, x in seen.items():  # back to sequence order
        seen[key] = x.reshape(-1, x.shape[-1])[state.split.inverse].view(x.shape)
    labels, mask = batch["labels"].reshape(-1), batch["attention_mask"].reshape(-1)
    ctx = [j for j in range(labels.numel()) if labels[j] == -100 and mask[j] == 1]  # flattened (batch, seq) order
    lab = [j for j in range(labels.numel()) if labels[j] != -100]
    return seen, kept_channels(model), ctx, lab


def _rows(x, idx):
    return x.reshape(-1, x.shape[-1])[idx]


def _sampled(idx):
    n = len(idx)
    return idx if n <= ROWS else [idx[(i * n) // ROWS] for i in range(ROWS)]


def _ffn_scores(selector, mlp, x, rank=8):
    if selector == "svd":
        return (F.silu(_svd_lin(mlp.gate_proj, x, rank)) * _svd_lin(mlp.up_proj, x, rank)).norm(dim=0)
    g, u = _lin(mlp.gate_proj, x), _lin(mlp.up_proj, x)
    if selector == "l2":
        return F.silu(g).norm(dim=0) * u.norm(dim=0)
    return (F.silu(g) * u).norm(dim=0)


SCORED = ("sampled", "svd", "oracle", "labelled", "l2")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("selector", SCORED)
def test_kept_channels_match_independent_scores(arch, selector):
    model, blocks, seen, kept, ctx, lab = _run(arch, selector)
    a = arch_info(model.config)
    assert len(ctx) > ROWS
    rows = {"sampled": _sampled(ctx), "labelled": lab}.get(selector, ctx)
    for i in LAYERS:
        mlp, att = blocks[i].mlp, blocks[i].self_attn
        x = _rows(seen[("mlp", i)], rows)
        scores = _ffn_scores(selector, mlp, x)
        _assert_top(kept[i]["ffn"], scores, _keep(scores.numel(), SPARSITY), f"{arch}/{selector} layer {i} ffn")
        xa = _rows(seen[("attn", i)], rows)
        proj = _svd_lin if selector == "svd" else (lambda m, x, r: _lin(m, x))
        q, k, v = (proj(getattr(att, f"{p}_proj"), xa, 8) for p in "qkv")
        if selector == "l2":  # q and k ranked apart by their own (RoPE-pair) norms
            D = a.head_dim
            for p, t in (("q", q), ("k", k)):
                n2 = t.pow(2).sum(0).view(-1, D)
                unit = (n2[:, : D // 2].sqrt() + n2[:, D // 2 :].sqrt()).reshape(-1)
                got = sorted({c // D * (D // 2) + c % D % (D // 2) for c in kept[i][p].tolist()})
                _assert_top(torch.tensor(got), unit, len(got), f"{arch}/l2 layer {i} {p}")
            _assert_top(kept[i]["v"], v.norm(dim=0), len(kept[i]["v"]), f"{arch}/l2 layer {i} v")
        else:
            _check_attention(kept[i], q, k, v, a, SPARSITY, f"{arch}/{selector} layer {i} attention")


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.8])
def test_ffn_scores_average_over_batches(momentum):
    """score_momentum m: batch t's FFN channels are the top of (1 - w) s_t + w e_(t-1), e the running average,
    s_j the mean over batch j's sampled rows of the squared activation, w the past's weight for the sample's
    share of the batch (the first batch: its own sample); attention is not averaged; `reset_running_scores`
    forgets. (Recomputes: test_eager_fast's checkpointing test.)"""
    model, blocks, seen, kept, ctx, lab = _run("qwen2", "sampled", seed=3, score_momentum=momentum)
    state = get_state(model)
    assert len(state.running_scores) == (len(LAYERS) if momentum else 0)
    a = arch_info(model.config)

    def per_row(seen, ctx, i):
        x = _rows(seen[("mlp", i)], _sampled(ctx))
        return _ffn_scores("sampled", blocks[i].mlp, x).pow(2) / x.shape[0]

    rs = state.running_scores
    w = rs[LAYERS[0]].weight(ROWS / len(ctx)) if momentum else 0.0  # the past's weight (same context count below)
    if momentum:  # the variance-weighted rule: momentum for a tiny sample, less as it covers more of the batch
        r = momentum / (1 - momentum) * (1 - ROWS / len(ctx))
        assert w == pytest.approx(r / (r + 1)) and 0 < w < momentum
        assert rs[LAYERS[0]].weight(0.0) == pytest.approx(momentum) and rs[LAYERS[0]].weight(1.0) == 0.0
    past = {i: (1 - w) * per_row(seen, ctx, i) for i in LAYERS}  # the first batch: its own sample (zero start)
    differs = False
    for seed in (4, 5):
        seen, kept, ctx, lab = _forward_seen(model, blocks, seed)
        for i in LAYERS:
            now = per_row(seen, ctx, i)
            avg = (1 - w) * now + w * past[i]
            _assert_top(kept[i]["ffn"], avg, _keep(avg.numel(), SPARSITY), f"m={momentum} seed {seed} layer {i} ffn")
            differs |= _top(avg, len(kept[i]["ffn"])) != _top(now, len(kept[i]["ffn"]))
            past[i] = avg
            xa = _rows(seen[("attn", i)], _sampled(ctx))
            q, k, v = (_lin(getattr(blocks[i].self_attn, f"{p}_proj"), xa) for p in "qkv")
            _check_attention(kept[i], q, k, v, a, SPARSITY, f"m={momentum} layer {i} attention")
    assert differs == (momentum > 0)  # the average picked other channels than each batch alone (else: vacuous)
    state.reset_running_scores()
    seen, kept, ctx, lab = _forward_seen(model, blocks, 6)
    for i in LAYERS:
        now = per_row(seen, ctx, i)
        _assert_top(kept[i]["ffn"], now, _keep(now.numel(), SPARSITY), f"after reset, layer {i} ffn")


def test_a_sample_of_the_whole_batch_is_not_averaged():
    """When the sample is every context row, the score is exact and the past would only dilute it: the channels
    equal those of each batch alone (score_momentum 0), batch after batch."""
    kept = []
    for m in (0.5, 0.0):
        model = tiny_peft("llama").eval()
        apply_sparselora(model, SparseLoRAConfig(ffn_sparsity={"0-3": 0.8}, start_step=0, score_momentum=m,
                                                 sample_rows=1000))
        per = []
        for seed in (1, 2, 3):
            with torch.no_grad():
                model(**make_batch(seed=seed))
            per.append([kept_channels(model)[i]["ffn"] for i in range(4)])
        kept.append(per)
    for b, (a, z) in enumerate(zip(*kept)):
        assert all(torch.equal(x, y) for x, y in zip(a, z)), f"batch {b}"


def test_wrong_inputs_are_caught():
    """The checks above tell apart the mistakes a selector could make: other rows, other factors, no bias."""
    model, blocks, seen, kept, ctx, lab = _run("qwen2", "sampled")
    for i in LAYERS:
        mlp, att = blocks[i].mlp, blocks[i].self_attn
        x = seen[("mlp", i)].reshape(-1, seen[("mlp", i)].shape[-1])
        right = _ffn_scores("sampled", mlp, x[_sampled(ctx)])
        k = _keep(right.numel(), SPARSITY)
        assert _top(right, k) == set(kept[i]["ffn"].tolist())
        shuffled = [ctx[j] for j in torch.randperm(len(ctx), generator=torch.Generator().manual_seed(i)).tolist()]
        for wrong_rows in (_sampled(shuffled), _sampled(sorted(ctx, key=lambda j: (j % 24, j))), ctx[:ROWS], lab):
            assert _top(_ffn_scores("sampled", mlp, x[wrong_rows]), k) != _top(right, k)
    a = arch_info(model.config)
    for i in LAYERS:
        att = blocks[i].self_attn
        xs = _rows(seen[("attn", i)], _sampled(ctx))
        with_bias = _attention_expected(*(_lin(getattr(att, f"{p}_proj"), xs) for p in "qkv"), a, SPARSITY)[0]
        assert with_bias == {p: kept[i][p].tolist() for p in "qkvo"}
        nob = [_lin(getattr(att, f"{p}_proj"), xs) - getattr(att, f"{p}_proj").base_layer.bias.double() for p in "qkv"]
        without = _attention_expected(*nob, a, SPARSITY)[0]
        assert without["k"] != with_bias["k"] and without["v"] != with_bias["v"], i
    mlp = blocks[LAYERS[-1]].mlp
    xm = _rows(seen[("mlp", LAYERS[-1])], ctx)
    up_twice = (F.silu(_svd_lin(mlp.up_proj, xm, 8)) * _svd_lin(mlp.up_proj, xm, 8)).norm(dim=0)
    assert _top(up_twice, k) != _top(_ffn_scores("svd", mlp, xm), k)


def test_random_selector_is_the_seeded_draw():
    """random: per layer in forward order, randperm of the kv units (k) then of the v channels, then the FFN's."""
    model, blocks, seen, kept, ctx, lab = _run("llama", "random")
    a = arch_info(model.config)
    D, half = a.head_dim, a.head_dim // 2
    n_units, n_v, n_ffn = a.num_kv_heads * half, a.num_kv_heads * D, a.intermediate_size
    g = torch.manual_seed(11)
    for i in LAYERS:
        units = torch.randperm(n_units)[: _keep(n_units, SPARSITY)].tolist()
        v = torch.randperm(n_v)[: _keep(n_v, SPARSITY)].tolist()
        ffn = torch.randperm(n_ffn)[: _keep(n_ffn, SPARSITY)].tolist()
        assert kept[i]["k"].tolist() == sorted(u // half * D + u % half + e for u in units for e in (0, half)), i
        assert kept[i]["v"].tolist() == sorted(v), i
        assert kept[i]["ffn"].tolist() == sorted(ffn), i
    assert g is not None
    again = _run("llama", "random")[3]
    assert all(torch.equal(again[i][p], kept[i][p]) for i in LAYERS for p in kept[i])


def test_sample_rows_are_strided_and_deterministic():
    x = torch.arange(1000.0)[:, None]
    s = sample_rows(x, 64)
    assert s.shape == (64, 1) and s[:, 0].tolist() == [(i * 1000) // 64 for i in range(64)]
    assert torch.equal(sample_rows(x[:50], 64), x[:50])  # fewer rows than the sample: all of them


def test_registry_drives_config_and_flops():
    assert SELECTORS == tuple(REGISTRY) and SparseLoRAConfig(ffn_sparsity={1: 0.5}).selector == "sampled"
    model = tiny_peft("llama")
    c, a = model.config, arch_info(model.config)
    H, I = a.hidden_size, a.intermediate_size
    qkv = (a.num_heads + 2 * a.num_kv_heads) * a.head_dim
    B, T, lab = 8, 64, 16
    nc = B * (T - lab)
    est = {s: flops(c, SparseLoRAConfig(ffn_sparsity={1: 0.5}, attn_sparsity={1: 0.5}, selector=s, sample_rows=100),
                    (B, T), lab)["estimator"] for s in REGISTRY}
    assert est["oracle"] == est["l2"] == nc * 2 * H * (2 * I + qkv)  # the dense activations the oracle computes
    assert est["sampled"] == 100 * 2 * H * (2 * I + qkv)
    assert est["random"] == 0 and est["labelled"] == B * lab * 2 * H * qkv
    assert est["svd"] == nc * (2 * H * 2 * 8 + 2 * 8 * 2 * I) + nc * (2 * H * 3 * 8 + 2 * 8 * qkv)
    with pytest.raises(ValueError, match="sample_rows"):
        SparseLoRAConfig(ffn_sparsity={1: 0.5}, sample_rows=0)


def test_sampled_ffn_scores_from_fp8_copies(monkeypatch):
    """sample_fp8 (on a GPU with fp8 tensor cores; here the CPU emulation forced on): each sparse FFN builds one
    fp8 copy of [gate; up] and keeps the top channels of the fp8 scores of its sampled rows, computed here
    independently from the quantized weights; nearly the channels of exact scores; sample_fp8=False and an
    adapter on the FFN leave it off."""
    import sparselora.modules.mlp as mlp_mod

    def quantized(t):
        s = t.abs().amax(1, keepdim=True).clamp_min(1e-12) / 448.0
        return (t / s).to(torch.float8_e4m3fn).double() * s

    from sparselora.bench.lora import QKVO

    monkeypatch.setattr(mlp_mod, "fp8_supported", lambda device: True)
    model, blocks, seen, kept, ctx, lab = _run("qwen2", "sampled", targets=QKVO, score_momentum=0.0)
    for i in LAYERS:
        wrapper = next(w for w in get_state(model).layers[i] if isinstance(w, mlp_mod.SparseMLP))
        assert wrapper.fp8 is not None, f"layer {i}: no fp8 copy was built"
        mlp = blocks[i].mlp
        x = _rows(seen[("mlp", i)], _sampled(ctx))
        wg, wu = (getattr(mlp, p).weight.double() for p in ("gate_proj", "up_proj"))
        gu = quantized(x) @ quantized(torch.cat([wg, wu])).t()
        n = wg.shape[0]
        scores = (F.silu(gu[:, :n]) * gu[:, n:]).norm(dim=0)
        k = _keep(n, SPARSITY)
        _assert_top(kept[i]["ffn"], scores, k, f"fp8 layer {i} ffn")
        exact = _ffn_scores("oracle", mlp, x)
        assert exact[kept[i]["ffn"]].sum() >= 0.98 * exact.topk(k).values.sum()

    for targets, kw in ((QKVO, {"sample_fp8": False}), (ALL_TARGETS, {})):
        off = _run("qwen2", "sampled", targets=targets, score_momentum=0.0, **kw)[0]
        assert all(w.fp8 is None for ws in get_state(off).layers.values() for w in ws if isinstance(w, mlp_mod.SparseMLP))


def test_sample_index_is_cached_and_never_evicted(monkeypatch):
    """The evenly spaced sample's index is built once per (rows in, rows out, device) and kept (a CUDA graph that
    captured a gather with it reads it by address); past the cache's bound, new shapes compute theirs each call."""
    import sparselora.selection as sel

    monkeypatch.setattr(sel, "_SAMPLE_INDEX", {})
    x = torch.arange(50.0)[:, None]
    first = sel._sample_index(50, 7, x.device)
    assert sel._sample_index(50, 7, x.device) is first
    assert torch.equal(sample_rows(x, 7)[:, 0], torch.tensor([(i * 50) // 7 for i in range(7)], dtype=torch.float32))
    monkeypatch.setattr(sel, "_SAMPLE_INDEX_MAX", 1)
    a, b = sel._sample_index(60, 7, x.device), sel._sample_index(60, 7, x.device)
    assert a is not b and torch.equal(a, b) and sel._sample_index(50, 7, x.device) is first


def test_a_wrong_fp8_gemm_is_set_aside_and_the_exact_scores_choose(monkeypatch, caplog):
    """Through the sparse FFN: an fp8 GEMM that returns garbage on this machine is caught at its first use (one
    warning) and the channels are those the exact projections choose, as with sample_fp8 off."""
    import sparselora.modules.mlp as mlp_mod
    from sparselora.bench.lora import QKVO
    from sparselora.ops import first_use
    from sparselora.ops.fp8 import Fp8Weight

    exact = _run("qwen2", "sampled", targets=QKVO, score_momentum=0.0, sample_fp8=False)[3]
    monkeypatch.setattr(mlp_mod, "fp8_supported", lambda device: True)
    monkeypatch.setattr(Fp8Weight, "_gemm", lambda self, x: torch.randn(x.shape[0], self.q.shape[0]))
    first_use.reset()
    try:
        with caplog.at_level("WARNING", logger="sparselora"):
            kept = _run("qwen2", "sampled", targets=QKVO, score_momentum=0.0)[3]
    finally:
        first_use.reset()
    assert any("fp8 scoring GEMM is set aside" in r.getMessage() for r in caplog.records)
    for i in LAYERS:
        assert torch.equal(kept[i]["ffn"], exact[i]["ffn"]), f"layer {i}"
