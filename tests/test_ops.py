"""Each sparse op against a plain masked PyTorch reference: forward and every gradient, per dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

from sparselora.ops import ffn_context, lora_delta, proj_in_sparse, proj_out_sparse
from sparselora.selection import expand_to_query_heads, keep_count, select_attention, select_ffn
from sparselora.models.registry import ArchInfo

from helpers import assert_close

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


class Block(nn.Module):
    def __init__(self, i=37, o=53, bias=True):
        super().__init__()
        self.gate, self.up = nn.Linear(i, o, bias=bias), nn.Linear(i, o, bias=bias)
        self.down, self.proj = nn.Linear(o, i, bias=bias), nn.Linear(i, o, bias=bias)


def lora_block(dtype, lora=True, seed=0):
    torch.manual_seed(seed)
    m = Block().to(dtype)
    if lora:
        m = get_peft_model(m, LoraConfig(r=3, lora_alpha=5, target_modules=["gate", "up", "down", "proj"]))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3)
        m = m.base_model.model
    return m


def grads_of(module, x, fn):
    for p in module.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    (y.float() * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum().backward()
    g = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return y.detach(), x.grad.clone(), g


def check(module, x, fast, ref, dtype, name):
    ya, xa, ga = grads_of(module, x, fast)
    yb, xb, gb = grads_of(module, x, ref)
    assert_close(ya, yb, f"{name} out", dtype)
    assert_close(xa, xb, f"{name} input grad", dtype)
    assert ga.keys() == gb.keys() and ga, f"{name}: gradients of {sorted(gb)} expected, got {sorted(ga)}"
    for n in ga:
        assert_close(ga[n], gb[n], f"{name} grad {n}", dtype)


def full_lora(m, x):
    return m(x) - F.linear(x, m.base_layer.weight, m.base_layer.bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lora", [True, False])
def test_proj_out_sparse(dtype, lora):
    m = lora_block(dtype, lora)
    x = torch.randn(19, 37, dtype=dtype)
    rows = torch.tensor([0, 3, 4, 17, 52])
    mask = torch.zeros(53, dtype=dtype)
    mask[rows] = 1
    base = m.proj.base_layer if lora else m.proj

    def ref(x):
        b = F.linear(x, base.weight, base.bias) * mask
        return b + (full_lora(m.proj, x) if lora else 0)

    if not lora:
        for p in m.parameters():
            p.requires_grad_(True)
    check(m, x, lambda x: proj_out_sparse(m.proj, x, rows), ref, dtype, "proj_out_sparse")


@pytest.mark.parametrize("dtype", DTYPES)
def test_proj_in_sparse(dtype):
    m = lora_block(dtype)
    x = torch.randn(11, 53, dtype=dtype)
    cols = torch.tensor([1, 2, 30, 31, 50])
    mask = torch.zeros(53, dtype=dtype)
    mask[cols] = 1

    def ref(x):
        return F.linear(x * mask, m.down.base_layer.weight, m.down.base_layer.bias) + full_lora(m.down, x)

    check(m, x, lambda x: proj_in_sparse(m.down, x, cols), ref, dtype, "proj_in_sparse")


@pytest.mark.parametrize("dtype", DTYPES)
def test_ffn_context(dtype):
    m = lora_block(dtype)
    x = torch.randn(23, 37, dtype=dtype)
    keep = torch.tensor([0, 5, 6, 7, 40, 52])
    mask = torch.zeros(53, dtype=dtype)
    mask[keep] = 1

    def ref(x):
        return m.down(F.silu(m.gate(x)) * m.up(x) * mask)

    check(m, x, lambda x: ffn_context(m.gate, m.up, m.down, x, keep), ref, dtype, "ffn_context")


def test_lora_delta_slicing_equals_full_then_slice():
    m = lora_block(torch.float64)
    x = torch.randn(7, 37, dtype=torch.float64)
    rows = torch.tensor([2, 9, 10])
    assert_close(lora_delta(m.gate, x, out_rows=rows), full_lora(m.gate, x)[:, rows], "out_rows")
    h = torch.randn(7, 53, dtype=torch.float64)
    cols = torch.tensor([4, 8])
    assert_close(lora_delta(m.down, h[:, cols], in_cols=cols), full_lora(m.down, h * 0 + _onehot(h, cols)), "in_cols")
    assert lora_delta(nn.Linear(3, 3), torch.randn(2, 3)) is None


def _onehot(h, cols):
    out = torch.zeros_like(h)
    out[:, cols] = h[:, cols]
    return out


# --- selection ------------------------------------------------------------------------------------------------

ARCH = ArchInfo("llama", 1, 40, 86, num_heads=6, num_kv_heads=2, head_dim=8, vocab_size=10)


def test_keep_count():
    assert keep_count(14336, 0.99) == 143
    assert keep_count(10, 0.999) == 1
    assert keep_count(86, 1e-9) == 86
    from sparselora.selection import ffn_keep_count

    assert ffn_keep_count(14336, 0.99) == 144  # 143 rounded up to aligned rows
    assert ffn_keep_count(14336, 0.5) == 7168 and ffn_keep_count(1025, 0.999) == 8
    assert ffn_keep_count(86, 0.8) == 17  # small FFNs: the exact count


def test_attention_keep_counts_are_aligned():
    from sparselora.selection import KEEP_MULTIPLE, attention_keep_counts
    # Llama-3-8B at 20%: 409.6 RoPE-pair units and 819 v channels would leave unaligned 819/820-wide slices
    units, v = attention_keep_counts(8, 128, 0.2, pairs=True)
    assert (units, v) == (412, 824)
    for n_kv, d, s, pairs in [(8, 128, 0.2, True), (8, 128, 0.37, False), (32, 128, 0.5, True), (8, 128, 0.999, True)]:
        units, v = attention_keep_counts(n_kv, d, s, pairs)
        k_channels = units * (2 if pairs else 1)
        assert k_channels % KEEP_MULTIPLE == 0 and v % KEEP_MULTIPLE == 0, (n_kv, d, s, pairs, units, v)
        assert k_channels <= n_kv * d and v <= n_kv * d
    assert attention_keep_counts(2, 64, 0.2, pairs=True) == (keep_count(64, 0.2), keep_count(128, 0.2))  # small: exact


def test_gqa_expansion():
    # kv channel (g=1, d=3) -> query heads 3, 4, 5 (group 1 of size 3), dim 3
    out = expand_to_query_heads(torch.tensor([1 * 8 + 3]), ARCH)
    assert out.tolist() == [3 * 8 + 3, 4 * 8 + 3, 5 * 8 + 3]


@pytest.mark.parametrize("selector", ["svd", "oracle", "random", "l2"])
@pytest.mark.parametrize("pairs", [True, False])
def test_attention_selection_structure(selector, pairs):
    torch.manual_seed(0)
    x = torch.randn(30, 40)
    wq, wk, wv = torch.randn(48, 40), torch.randn(16, 40), torch.randn(16, 40)
    from sparselora.estimator import low_rank_factors, stack_factors

    factors = stack_factors([low_rank_factors(w, 4) for w in (wq, wk, wv)])
    sel = select_attention(selector, 0.5, x, ARCH, pairs, lambda x: x @ wq.T, lambda x: x @ wk.T, lambda x: x @ wv.T, factors)
    k, q, v, o = sel["k"], sel["q"], sel["v"], sel["o"]
    assert k.numel() == 8 and v.numel() == 8
    assert torch.equal(o, expand_to_query_heads(v, ARCH))
    if selector != "l2":
        assert torch.equal(q, expand_to_query_heads(k, ARCH))
    else:
        assert q.numel() == 24
    if pairs:
        for idx in (k, q):
            s = set(idx.tolist())
            assert all(((c // 8) * 8 + (c % 8 + 4) % 8) in s for c in s), "RoPE partner missing"


def test_svd_and_oracle_scores():
    """svd ranks by the estimate of ||silu(gate x) * (up x)||; oracle by the true value."""
    torch.manual_seed(1)
    x = torch.randn(50, 40)
    wg, wu = torch.randn(86, 40), torch.randn(86, 40)
    gate, up = (lambda x: x @ wg.T), (lambda x: x @ wu.T)
    true = (F.silu(gate(x)) * up(x)).norm(dim=0)
    oracle = select_ffn("oracle", 0.8, x, gate, up, None, 86)
    assert torch.equal(oracle, true.topk(17).indices.sort().values)
    from sparselora.estimator import low_rank_factors, stack_factors

    full_rank = stack_factors([low_rank_factors(w, 40) for w in (wg, wu)])  # full rank: the estimate is exact
    assert torch.equal(select_ffn("svd", 0.8, x, gate, up, full_rank, 86), oracle)
    # q/k: product of query (group-averaged) and key norms
    wq, wk, wv = torch.randn(48, 40), torch.randn(16, 40), torch.randn(16, 40)
    sel = select_attention("oracle", 0.75, x, ARCH, False, lambda x: x @ wq.T, lambda x: x @ wk.T, lambda x: x @ wv.T, None)
    qn = (x @ wq.T).norm(dim=0).view(6, 8).view(2, 3, 8).mean(1)
    kn = (x @ wk.T).norm(dim=0).view(2, 8)
    assert torch.equal(sel["k"], (qn * kn).reshape(-1).topk(4).indices.sort().values)
    assert torch.equal(sel["v"], (x @ wv.T).norm(dim=0).topk(4).indices.sort().values)


def test_indexing_functions_gradcheck():
    from sparselora.ops.indexing import gather_columns, permute_rows, spread_columns

    x = torch.randn(9, 7, dtype=torch.float64, requires_grad=True)
    perm = torch.randperm(9)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(9)
    cols = torch.tensor([0, 3, 6])
    assert torch.equal(permute_rows(x, perm, inv), x[perm])
    assert torch.equal(gather_columns(x, cols), x[:, cols])
    spread = spread_columns(x[:, :3], cols, 10)
    assert torch.equal(spread[:, cols], x[:, :3]) and spread[:, [1, 2, 4, 5, 7, 8, 9]].abs().sum() == 0
    torch.autograd.gradcheck(lambda t: permute_rows(t, perm, inv), (x,))
    torch.autograd.gradcheck(lambda t: gather_columns(t, cols), (x,))
    torch.autograd.gradcheck(lambda t: spread_columns(t, cols, 10), (x[:, :3].detach().requires_grad_(),))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", [None, "out", "in"])
@pytest.mark.parametrize("lora", [True, False])
def test_fused_split_lora_linear(dtype, mode, lora):
    """The fused projection on context-first rows equals the masked reference, forward and gradients."""
    from sparselora.ops.fused import split_lora_linear
    from sparselora.ops.lora_layer import lora_parts

    m = lora_block(dtype, lora)
    for p in m.parameters():
        p.requires_grad_("lora_" in "".join(n for n, q in m.named_parameters() if q is p))
    proj = m.proj
    n_ctx = 0 if mode is None else 7
    x = torch.randn(19, 37, dtype=dtype)
    idx = torch.tensor([0, 3, 4, 17, 36]) if mode == "in" else torch.tensor([0, 3, 4, 17, 52])
    base = proj.base_layer if lora else proj
    ctx = torch.zeros(19, 1, dtype=dtype)
    ctx[:n_ctx] = 1

    def ref(x):
        if mode == "out":
            keep = torch.zeros(53, dtype=dtype)
            keep[idx] = 1
            mask = 1 - ctx * (1 - keep)
            y = F.linear(x, base.weight, base.bias) * mask
        elif mode == "in":
            keep = torch.zeros(37, dtype=dtype)
            keep[idx] = 1
            y = F.linear(x * (1 - ctx * (1 - keep)), base.weight, base.bias)
        else:
            y = F.linear(x, base.weight, base.bias)
        return y + (full_lora(proj, x) if lora else 0)

    parts = lora_parts(proj)
    assert parts is not None
    if lora:
        check(m, x, lambda x: split_lora_linear(parts, x, n_ctx, mode, idx), ref, dtype, f"fused/{mode}")
    else:  # no trainable parameter: compare output and input gradient
        ya, xa, _ = grads_of(m, x, lambda x: split_lora_linear(parts, x, n_ctx, mode, idx))
        yb, xb, _ = grads_of(m, x, ref)
        assert_close(ya, yb, "fused out", dtype)
        assert_close(xa, xb, "fused input grad", dtype)


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", [None, "out", "in"])
def test_fused_lora_dropout(dtype, mode, device):
    """LoRA dropout inside the fused op: the same function as PEFT's branch on the same dropout mask (drawn from
    the same RNG state), forward and every gradient; and the mask really drops (p of the entries, scaled). On
    CUDA the mask is a seed's, regenerated in the backward (`ops.dropout`)."""
    from sparselora.ops import dropout
    from sparselora.ops.fused import split_lora_linear
    from sparselora.ops.lora_layer import lora_parts

    torch.manual_seed(0)
    m = get_peft_model(Block().to(device, dtype), LoraConfig(r=3, lora_alpha=5, target_modules=["proj"], lora_dropout=0.3))
    with torch.no_grad():
        m.base_model.model.proj.lora_B["default"].weight.normal_(0, 0.3)
    m = m.base_model.model
    proj = m.proj
    n_ctx = 0 if mode is None else 7
    idx = torch.tensor([0, 3, 4, 17, 36] if mode == "in" else [0, 3, 4, 17, 52], device=device)
    x = torch.randn(19, 37, dtype=dtype, device=device)
    ctx = torch.zeros(19, 1, dtype=dtype, device=device)
    ctx[:n_ctx] = 1
    base, A, B = proj.base_layer, proj.lora_A["default"], proj.lora_B["default"]

    def ref(x):
        torch.manual_seed(123)
        keep = dropout.keep_of(dropout.draw(x, 0.3), x, 0.3).to(A.weight.dtype)
        assert 0.5 < keep.float().mean() < 0.9
        lora = B(A(x * keep / 0.7)) * proj.scaling["default"]
        if mode == "out":
            k = torch.zeros(53, dtype=dtype, device=device)
            k[idx] = 1
            y = F.linear(x, base.weight, base.bias) * (1 - ctx * (1 - k))
        elif mode == "in":
            k = torch.zeros(37, dtype=dtype, device=device)
            k[idx] = 1
            y = F.linear(x * (1 - ctx * (1 - k)), base.weight, base.bias)
        else:
            y = F.linear(x, base.weight, base.bias)
        return y + lora

    def fast(x):
        torch.manual_seed(123)
        return split_lora_linear(lora_parts(proj), x, n_ctx, mode, idx)

    check(m, x, fast, ref, dtype, f"fused dropout/{mode}")


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_ctx", [0, 7, 19])
@pytest.mark.parametrize("p_drop", [0.0, 0.3])
@pytest.mark.parametrize("adapters", ["qkv", "qv"])
def test_fused_qkv_group_equals_its_projections(dtype, n_ctx, p_drop, adapters, device):
    """q/k/v as one node (`split_lora_linears`: sliced weights side by side, one input gradient, stacked LoRA A
    without dropout) against the three projections one by one, forward and every gradient: biases, GQA widths,
    different ranks and scales, a projection without an adapter, dropout (the same masks: drawn in the same
    order), no / some / all rows context."""
    from sparselora.ops.fused import split_lora_linear, split_lora_linears

    K, outs, ranks, scales = 37, (53, 16, 16), (3, 5, 3), (1.7, 2.0, 0.5)
    mode = "out" if n_ctx else None

    def build(dt):
        """The same values in dtype ``dt``: the group in ``dtype`` is judged by its distance from the projections
        one by one in float64 (in bfloat16 those sum three rounded input gradients, the group one)."""
        g = torch.Generator().manual_seed(0)
        rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype).to(device, dt)  # noqa: E731 (dtype's values)
        parts, leaves = [], []
        for name, o, r, s in zip("qkv", outs, ranks, scales):
            w, bias, a, b = rnd(o, K) * 0.2, rnd(o), rnd(r, K) * 0.3, rnd(o, r) * 0.3
            if name in adapters:
                leaves += [a.requires_grad_(), b.requires_grad_()]
            else:
                a = b = None
            parts.append((w, bias, a, b, s, p_drop))
        idxs = [torch.randperm(o, generator=g)[: o // 2 + 1].sort().values.to(device) for o in outs]
        return parts, leaves, rnd(19, K).requires_grad_(), [rnd(19, o) for o in outs], idxs if n_ctx else None

    def grads(dt, fn):
        parts, leaves, x, weights, idxs = build(dt)
        torch.manual_seed(11)
        ys = fn(parts, x, idxs)
        sum((y.double() * w.double()).sum() for y, w in zip(ys, weights)).backward()
        return [y.detach() for y in ys], [t.grad for t in [x, *leaves]]

    def one_by_one(parts, x, idxs):
        return [split_lora_linear(pr, x, n_ctx, mode, None if idxs is None else idxs[i]) for i, pr in enumerate(parts)]

    want = grads(torch.float64, one_by_one)
    got = grads(dtype, lambda parts, x, idxs: split_lora_linears(parts, x, n_ctx, mode, idxs))
    names = [f"output {q}" for q in "qkv"] + ["input grad"] + [f"{f} grad of {q}" for q in adapters for f in "AB"]
    pairs = list(zip(names, got[0] + got[1], want[0] + want[1]))
    if dtype != torch.bfloat16:
        for name, a, b in pairs:
            assert_close(a, b, f"group {name}", dtype)
        return
    # bfloat16 rounds every GEMM's output: element-wise cancellation exceeds any fixed tolerance, so the group's
    # distance from float64 is held to that of the projections one by one in bfloat16
    sep = grads(dtype, one_by_one)
    for (name, a, b), c in zip(pairs, sep[0] + sep[1]):
        err = lambda t: ((t.double() - b).norm() / b.norm()).item()  # noqa: E731
        assert err(a) <= 1.5 * err(c) + 2e-3, f"group {name}: {err(a):.3g} from float64, one by one {err(c):.3g}"


def test_dense_attention_blocks_run_q_k_v_as_one_fused_node():
    """With LoRA on q/k/v/o, an attention block SparseLoRA leaves dense runs two fused projection nodes (q/k/v, o),
    not four, and the step's loss and gradients are those of PEFT's forward."""
    import sparselora.ops.fused as fused
    from sparselora import SparseLoRAConfig, apply_sparselora

    from helpers import clone, make_batch, step_outputs, tiny_peft

    model = tiny_peft("llama", targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    ref = clone(model)
    # sparse FFN in one layer from step 2: this step runs dense, so it must equal PEFT's to rounding
    apply_sparselora(model, SparseLoRAConfig(ffn_sparsity={1: 0.5}, attn_sparsity={}, start_step=2))
    calls = []
    real = fused._apply_as_autocast
    fused._apply_as_autocast = lambda fn, x, *a: calls.append((fn, len(a))) or real(fn, x, *a)
    try:
        got = step_outputs(model, make_batch(seed=3))
    finally:
        fused._apply_as_autocast = real
    layers = model.base_model.model.config.num_hidden_layers
    projs = [n for fn, n in calls if fn is fused._SplitLoRALinear]
    assert projs.count(4 + 3 * 5) == layers, projs  # a q/k/v group passes 3 x 5 tensors, one projection 5
    want = step_outputs(ref, make_batch(seed=3))
    assert_close(got[1], want[1], "loss")
    for n in want[2]:
        assert_close(got[2][n], want[2][n], f"grad {n}")


def test_fused_qkv_serves_each_input_its_own_outputs():
    """The q/k/v group (`FusedQKV`) hands k and v the outputs computed with q only for that same input tensor:
    k/v called on another tensor (or first, or twice) compute their own, and each result equals PEFT's forward."""
    from sparselora.modules.linear import FusedQKV

    torch.manual_seed(0)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(12, 16), nn.Linear(12, 8), nn.Linear(12, 8)

    m = get_peft_model(Attn(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj"]))
    attn = m.base_model.model
    with torch.no_grad():
        for n, p in attn.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    want = {p: getattr(attn, f"{p}_proj") for p in "qkv"}
    x, other = torch.randn(5, 12), torch.randn(5, 12)
    ref = {p: want[p](x).detach() for p in "qkv"}
    ref_other = {p: want[p](other).detach() for p in "qkv"}
    group = FusedQKV(want)
    try:
        for order, inputs in ((("q", "k", "v"), (x, x, x)), (("k", "q", "v"), (x, x, x)),
                              (("q", "k", "v"), (x, other, x)), (("q", "q", "v", "k"), (x, x, x, x))):
            for p, t in zip(order, inputs):
                got = getattr(attn, f"{p}_proj")(t)
                assert_close(got, (ref if t is x else ref_other)[p], f"{p} after {order}")
    finally:
        group.remove()


def test_fused_refuses_what_it_cannot_reproduce():
    from sparselora.ops.lora_layer import lora_parts

    torch.manual_seed(0)
    m = get_peft_model(Block(), LoraConfig(r=3, target_modules=["proj"], lora_dropout=0.1)).base_model.model
    assert lora_parts(m.proj)[-1] == 0.1  # dropout: reproduced in the fused op
    m.eval()
    assert lora_parts(m.proj)[-1] == 0.0  # no dropout in eval mode
    lin = nn.Linear(3, 4)
    assert lora_parts(lin) is None  # trainable base weight
    frozen = lora_block(torch.float32)
    x = torch.randn(2, 37)
    assert lora_parts(frozen.proj) is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lora_parts(frozen.proj) is not None  # autocast: the fused op casts as a linear layer does


def rel_err(a: torch.Tensor, truth: torch.Tensor) -> float:
    return ((a.double() - truth.double()).norm() / truth.double().norm()).item()


def assert_as_close_as_reference(fast: dict, ref: dict, truth: dict, what: str) -> None:
    """bf16 rounding depends on the order of operations, so under autocast a fused op is judged by its distance
    from the float64 truth: at most twice the reference's own (plus a hair), never O(1) as a wrong formula is."""
    assert fast.keys() == ref.keys() == truth.keys(), what
    for n in truth:
        a, b = rel_err(fast[n], truth[n]), rel_err(ref[n], truth[n])
        assert a <= 2 * b + 2e-3, f"{what} {n}: relative error {a:.3g} vs the reference's {b:.3g} (float64 truth)"


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", [None, "out", "in"])
def test_fused_split_lora_linear_under_autocast(base_dtype, mode):
    """Under bf16 autocast (what Trainer(bf16=True) turns on), with float32 adapters (PEFT's default) on a float32
    or bf16 base: the fused projection matches the masked reference run under the same autocast, in the same
    dtypes (output bf16, input gradient in the input's dtype, adapter gradients float32), forward and every
    gradient."""
    from sparselora.ops.fused import split_lora_linear
    from sparselora.ops.lora_layer import lora_parts

    m = lora_block(torch.float32)
    m.proj.base_layer.to(base_dtype)
    for n, p in m.named_parameters():
        p.requires_grad_("lora_" in n)
    n_ctx = 0 if mode is None else 7
    idx = torch.tensor([0, 3, 4, 17, 36]) if mode == "in" else torch.tensor([0, 3, 4, 17, 52])
    x = torch.randn(19, 37, dtype=base_dtype)
    ctx = torch.zeros(19, 1)
    ctx[:n_ctx] = 1

    def ref(x, proj):
        base = proj.base_layer
        if mode == "out":
            keep = torch.zeros(53)
            keep[idx] = 1
            y = F.linear(x, base.weight, base.bias)
            return y * (1 - ctx * (1 - keep)).to(y.dtype) + full_lora(proj, x)
        if mode == "in":
            keep = torch.zeros(37, dtype=x.dtype)
            keep[idx] = 1
            return F.linear(x * (1 - ctx.to(x.dtype) * (1 - keep)), base.weight, base.bias) + full_lora(proj, x)
        return proj(x)

    def outs(model, x, fn):
        y, gx, g = grads_of(model, x, fn)
        return {"out": y, "input grad": gx, **g}

    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = outs(m, x, lambda x: split_lora_linear(lora_parts(m.proj), x, n_ctx, mode, idx))
        want = outs(m, x, lambda x: ref(x, m.proj))
    m64 = m.double()
    truth = outs(m64, x.double(), lambda x: ref(x, m64.proj))
    assert fast["out"].dtype == want["out"].dtype == torch.bfloat16
    assert fast["input grad"].dtype == want["input grad"].dtype == base_dtype
    assert {n for n in fast if "lora_" in n} == {"proj.lora_A.default.weight", "proj.lora_B.default.weight"}
    assert all(fast[n].dtype == torch.float32 for n in fast if "lora_" in n)
    assert_as_close_as_reference(fast, want, truth, f"autocast/{mode}/{base_dtype}")


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_fused_ffn_under_autocast(base_dtype):
    """The fused sparse FFN under bf16 autocast equals the unfused one under the same autocast, output in bf16."""
    from sparselora.ops.fused import split_ffn

    torch.manual_seed(1)
    wg, wu, wd = (torch.randn(s, dtype=base_dtype) * 0.2 for s in ((53, 37), (53, 37), (37, 53)))
    bg, bu, bd = (torch.randn(n, dtype=base_dtype) * 0.1 for n in (53, 53, 37))
    keep = torch.tensor([1, 2, 8, 30, 52])
    x = torch.randn(19, 37, dtype=base_dtype)

    def ref(x):
        def ffn(x, k):
            g, u = F.linear(x, wg[k], bg[k]), F.linear(x, wu[k], bu[k])
            return F.linear(F.silu(g) * u, wd[:, k], bd)
        return torch.cat([ffn(x[:7], keep), ffn(x[7:], slice(None))])

    outs = []
    for fn in (lambda x: split_ffn((wg, bg, wu, bu, wd, bd), x, 7, keep), ref):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(xi)
        (y.float() * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum().backward()
        outs.append((y.detach(), xi.grad))
    (ya, ga), (yb, gb) = outs
    assert ya.dtype == yb.dtype == torch.bfloat16 and ga.dtype == base_dtype
    assert_close(ya, yb, "autocast ffn out", torch.bfloat16)
    assert_close(ga, gb, "autocast ffn input grad", torch.bfloat16)


def test_unfused_reasons_name_the_cause():
    """Every case the fused op cannot reproduce has a reason (what `note_unfused` says); a layer whose adapters
    are all off runs fused as its plain base linear."""
    from sparselora.ops.lora_layer import lora_parts, unfused_reason

    torch.manual_seed(0)
    m = get_peft_model(Block(), LoraConfig(r=3, target_modules=["proj"])).base_model.model
    assert unfused_reason(m.proj) is None
    assert "trainable" in unfused_reason(nn.Linear(3, 4))
    m.proj.lora_dropout["default"] = FeatureDropout()
    assert "FeatureDropout, not nn.Dropout" in unfused_reason(m.proj) and lora_parts(m.proj) is None
    m.proj.lora_dropout["default"] = nn.Dropout(1.0)
    assert "drops everything" in unfused_reason(m.proj)
    m.proj.lora_dropout["default"] = nn.Identity()
    m.proj.merged_adapters = ["default"]
    assert "merged" in unfused_reason(m.proj)
    m.proj.merged_adapters = []
    m.proj.enable_adapters(False)
    w, b, a, bb, scale, p = lora_parts(m.proj)
    assert w is m.proj.base_layer.weight and a is None and bb is None and p == 0.0


class FeatureDropout(nn.Module):
    def forward(self, x):
        return x


def test_estimator_scores_without_full_activations():
    from sparselora.ops.scores import col_norms_sq, ffn_scores_sq

    torch.manual_seed(3)
    zg, zu = torch.randn(2500, 8), torch.randn(2500, 8)  # more rows than one CPU chunk
    bg, bu = torch.randn(8, 77), torch.randn(8, 77)
    direct = (F.silu(zg @ bg) * (zu @ bu)).pow(2).sum(0)
    assert_close(ffn_scores_sq(zg, zu, bg, bu), direct, "ffn scores", rtol=1e-4, atol=1e-3)
    assert_close(col_norms_sq(zg, bg), (zg @ bg).pow(2).sum(0), "gram column norms", rtol=1e-4, atol=1e-3)


def test_sparse_model_under_autocast():
    """bf16 autocast over a float32 model (what TRL's SFTTrainer turns on) runs and stays near fp32."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from helpers import make_batch, tiny_peft

    from sparselora import SparseLoRAConfig, apply_sparselora

    model = tiny_peft()
    apply_sparselora(model, SparseLoRAConfig(ffn_sparsity={1: 0.5}, attn_sparsity={2: 0.5}, start_step=0))
    batch = make_batch()
    ref = model(**batch).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    assert abs(loss.item() - ref.item()) < 0.05 * abs(ref.item())


def test_svd_scores_include_the_projection_bias():
    """With full-rank factors the svd estimate of q/k/v (bias included) ranks exactly like the true activations."""
    from sparselora.estimator import low_rank_factors, stack_factors
    from sparselora.ops.scores import col_norms_sq

    torch.manual_seed(4)
    x = torch.randn(40, 16)  # hidden 16: rank-16 factors are exact for every projection
    w = [torch.randn(48, 16), torch.randn(16, 16), torch.randn(16, 16)]
    b = [torch.randn(48) * 3, torch.randn(16) * 3, torch.randn(16) * 3]
    z, bb = torch.randn(40, 5), torch.randn(5, 16)
    assert_close(col_norms_sq(z, bb, b[1]), (z @ bb + b[1]).pow(2).sum(0), "biased column norms", rtol=1e-4, atol=1e-3)
    projs = [(lambda x, w=w_, b=b_: x @ w.T + b) for w_, b_ in zip(w, b)]
    full = stack_factors([low_rank_factors(w_, 16) for w_ in w])
    svd = select_attention("svd", 0.5, x, ARCH, True, *projs, full, b)
    oracle = select_attention("oracle", 0.5, x, ARCH, True, *projs, None)
    for key in "qkvo":
        assert torch.equal(svd[key], oracle[key]), key


def _expand_formula(kv_channels, arch):
    D, G = arch.head_dim, arch.group_size
    g, d = kv_channels // D, kv_channels % D
    heads = g[:, None] * G + torch.arange(G)[None, :]
    return (heads * D + d[:, None]).reshape(-1).sort().values


@pytest.mark.parametrize("heads,kv,dim", [(6, 2, 8), (4, 4, 10), (8, 1, 6), (6, 3, 5)])
@pytest.mark.parametrize("pairs", [True, False])
def test_channel_tables_match_the_formulas(heads, kv, dim, pairs):
    """The cached index tables give exactly the channels of the per-call formulas (distinct; in any order:
    every consumer slices or scatters by index)."""
    from sparselora.selection import _attention_from_units, _unit_channels

    arch = ArchInfo("llama", 1, 40, 86, num_heads=heads, num_kv_heads=kv, head_dim=dim, vocab_size=10)
    pairs = pairs and dim % 2 == 0
    n_units = kv * (dim // 2 if pairs else dim)
    g = torch.Generator().manual_seed(heads * 100 + kv * 10 + dim)
    for k in (1, n_units // 3 + 1, n_units):
        units = torch.randperm(n_units, generator=g)[:k].sort().values
        v_ch = torch.randperm(kv * dim, generator=g)[:k].sort().values
        sel = _attention_from_units(units, v_ch, arch, pairs)
        k_ch = _unit_channels(units, dim, pairs)
        for got, want in ((sel["k"], k_ch), (sel["q"], _expand_formula(k_ch, arch)), (sel["v"], v_ch),
                          (sel["o"], _expand_formula(v_ch, arch)), (expand_to_query_heads(k_ch, arch), _expand_formula(k_ch, arch))):
            assert got.unique().numel() == got.numel(), f"repeated channels in {got.tolist()}"
            assert torch.equal(got.sort().values, want), (got.tolist(), want.tolist())


def test_top_indices_on_cpu_and_its_errors():
    from sparselora.ops.topk import top_indices

    s = torch.tensor([0.3, -1.0, 2.0, 0.5, 2.5])
    assert top_indices(s, 2).tolist() == [2, 4] and top_indices(s, 5).tolist() == [0, 1, 2, 3, 4]
    for bad, k in ((s, 0), (s, 6), (s.view(1, 5), 2)):
        with pytest.raises(ValueError, match="1-D score vector and 0 < k"):
            top_indices(bad, k)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, i", [(256, 14336), (37, 1000), (1, 129), (300, 5)])
def test_silu_mul_sq_sum_equals_reference(device, dtype, n, i):
    """The sampled selector's one-pass FFN score (a Triton kernel on CUDA) against float64, on views of one [g | u]
    buffer (row stride 2i, as the fp8 GEMM's output is read) and on separate tensors."""
    from sparselora.ops import first_use
    from sparselora.ops.scores import SCORE_KERNEL, _silu_mul_sq_triton, silu_mul_sq_sum

    g = torch.Generator().manual_seed(n + i)
    gu = (torch.randn(n, 2 * i, generator=g) * 2).to(device, dtype)
    ref = (F.silu(gu[:, :i].double()) * gu[:, i:].double()).pow(2).sum(0)
    for a, b in ((gu[:, :i], gu[:, i:]), (gu[:, :i].contiguous(), gu[:, i:].contiguous())):
        # the kernel itself on CUDA (the public function would fall back to torch if the kernel were wrong)
        for out in ([_silu_mul_sq_triton(a, b, 0.5) * 2] if device != "cpu" else []) + [silu_mul_sq_sum(a, b)]:
            assert out.dtype == torch.float32 and out.shape == (i,)
            assert_close(out, ref, f"silu_mul_sq_sum {tuple(a.stride())}", rtol=1e-5, atol=1e-5)
    if device != "cpu":
        assert first_use._verdict.get(SCORE_KERNEL) is True, "the score kernel was set aside on this GPU"


def _fp8_emulated(w, x, bias=None):
    """x W^T from e4m3 values with one scale per row of each, multiplied in float64: what the fp8 GEMM computes."""
    def q(t):
        s = t.abs().amax(1, keepdim=True).double().clamp_min(1e-12) / 448.0
        return (t.double() / s).to(torch.float8_e4m3fn).double() * s
    y = q(x) @ q(w).t()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("m", [256, 37, 1])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_weight_equals_its_emulation(device, m, bias):
    """`Fp8Weight` (torch._scaled_mm on a GPU with fp8, the float32 emulation elsewhere) against the same quantized
    numbers multiplied in float64; rows not a multiple of 16 (padded on the GPU), a bias; and the quantization
    error itself is small against the exact product (what the ranking sees)."""
    from sparselora.ops.fp8 import Fp8Weight, fp8_supported

    if device != "cpu" and not fp8_supported(device):
        pytest.skip("this GPU has no fp8 tensor cores")
    g = torch.Generator().manual_seed(m)
    w = (torch.randn(96, 64, generator=g) * 0.05).to(device, torch.bfloat16)
    x = torch.randn(m, 64, generator=g).to(device, torch.bfloat16)
    b = (torch.randn(96, generator=g) * 0.1).to(device, torch.bfloat16) if bias else None
    fw = Fp8Weight(w, b)
    y = fw(x)  # the kernel itself, unchecked
    assert y.shape == (m, 96)
    exact = lambda t: t.float() @ w.float().t() + (0 if b is None else b.float())  # noqa: E731
    assert torch.equal(fw.checked(x, exact), y) or device == "cpu", "the fp8 GEMM was set aside on this GPU"
    ref = _fp8_emulated(w, x, b)
    assert_close(y.double(), ref, "fp8 GEMM vs emulation", rtol=2e-2, atol=2e-2)
    exact = x.double() @ w.double().t() + (0 if b is None else b.double())
    rel = (y.double() - exact).norm() / exact.norm()
    assert rel < 0.06, f"fp8 product off the exact one by {rel:.3f} (relative Frobenius)"


@pytest.mark.parametrize("m, k", [(256, 4096), (37, 1000), (1, 64)])
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_row_quantization_kernel_equals_torch(m, k):
    """The one-kernel row quantization of the fp8 scoring GEMM against `quantize_rows` (torch ops): the same scales,
    the same e4m3 values (rounding may differ by one step in rare halfway cases), zero rows with scale 1 padded."""
    from sparselora.ops.fp8 import _quantize_rows_padded, quantize_rows

    x = (torch.randn(m, k, device="cuda") * torch.rand(m, 1, device="cuda") * 10).to(torch.bfloat16)
    q, s = _quantize_rows_padded(x)
    rq, rs = quantize_rows(x)
    assert q.shape[0] % 16 == 0 and q.shape[0] >= m
    assert_close(s[:m], rs, "row scales", rtol=1e-6, atol=0)
    a, b = q[:m].float(), rq.float()
    off = (a - b).abs() > 0.07 * b.abs().clamp_min(2 ** -9)
    assert off.float().mean() < 1e-3, f"{int(off.sum())} of {off.numel()} fp8 values differ by more than one step"
    if q.shape[0] > m:
        assert (q[m:].float() == 0).all() and (s[m:] == 1).all()


def test_a_kernel_is_checked_on_first_use_and_set_aside_when_wrong(caplog):
    """`ops.first_use.checked`: the first call runs kernel and reference and compares; a kernel that agrees is used
    alone from then on, one that disagrees or raises is replaced by the reference (one warning), for the process."""
    from sparselora.ops import first_use

    first_use.reset()
    ref = torch.arange(4.0)
    calls = {"fast": 0, "ref": 0}

    def reference():
        calls["ref"] += 1
        return ref

    def run(name, fast):
        return first_use.checked(name, fast, reference, 1e-3)

    def good():
        calls["fast"] += 1
        return ref + 1e-6

    try:
        assert torch.equal(run("good kernel", good), ref + 1e-6) and calls == {"fast": 1, "ref": 1}
        run("good kernel", good)
        assert calls == {"fast": 2, "ref": 1}  # trusted: the reference no longer runs
        with caplog.at_level("WARNING", logger="sparselora"):
            assert torch.equal(run("wrong kernel", lambda: ref * 2), ref)
            assert torch.equal(run("broken kernel", lambda: 1 / 0), ref)
        said = [r.getMessage() for r in caplog.records]
        assert any("wrong kernel is set aside" in m and "differs" in m for m in said)
        assert any("broken kernel is set aside" in m and "ZeroDivisionError" in m for m in said)
        caplog.clear()
        assert torch.equal(run("wrong kernel", lambda: ref * 2), ref) and not caplog.records  # said once
    finally:
        first_use.reset()


def test_fp8_weights_side_by_side():
    """[gate; up] as one fp8 copy: the same numbers as the two copies apart, a missing bias counting as zeros."""
    from sparselora.ops.fp8 import Fp8Weight

    g = torch.Generator().manual_seed(3)
    w1, w2, x = (torch.randn(*s, generator=g) for s in ((32, 16), (48, 16), (5, 16)))
    b1 = torch.randn(32, generator=g)
    both = Fp8Weight.side_by_side([w1, w2], [b1, None])(x)
    assert_close(both[:, :32], Fp8Weight(w1, b1)(x), "gate part", rtol=1e-6, atol=1e-6)
    assert_close(both[:, 32:], Fp8Weight(w2)(x), "up part", rtol=1e-6, atol=1e-6)
    assert Fp8Weight.side_by_side([w1, w2]).bias is None
