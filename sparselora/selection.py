"""From activations to kept channels: the selectors (one registry, `SELECTORS`), top-k, and the mapping of
attention channels under grouped-query attention and RoPE.

Selection is not differentiable and runs under no_grad; one channel set is chosen per batch. Every selector is
a way of estimating the oracle's score, the norm over the batch's context rows of a channel's true activation
(FFN: silu(gate x) * (up x); attention: ||q|| * ||k|| per kv channel under GQA, and ||v||):

* ``sampled`` (default): the oracle's score on an evenly spaced sample of at most `SAMPLE_ROWS` context rows,
  computed with the real projections (bias and LoRA included). Deterministic strided rows (no RNG), so gradient
  checkpointing recomputes the same channels, and the index shape depends only on the number of context rows.
  For the FFN the sample's score is averaged with the earlier batches' (`RunningScore`): which channels matter is
  largely shared across batches, so the average sees many more rows at no extra cost.
* ``svd``: the paper's estimator, the rank-r SVD factors of gate/up and q/k/v, on every context row.
* ``labelled``: the real activations of the same batch's labelled rows (free for the FFN: the dense path has them).
* ``oracle``: the true activations of every context row (an upper bound; costs the dense gate/up or q/k/v).
* ``l2``: each projection ranked by its own output norms rather than jointly: attention q by ||q||, k by ||k||;
  FFN by ||silu(gate x)_j|| * ||(up x)_j|| (the Cauchy-Schwarz bound of the oracle's score). An ablation.
* ``random``: uniformly random channels from the global RNG (checkpointing's RNG replay keeps them).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from sparselora.models.registry import ArchInfo
from sparselora.ops.fused_kernels import silu_mul
from sparselora.ops.scores import col_norms_sq, ffn_scores_sq, silu_mul_sq_sum
from sparselora.ops.topk import top_indices

Proj = Callable[[torch.Tensor], torch.Tensor]


def keep_count(n: int, sparsity: float) -> int:
    return max(1, min(n, round((1.0 - sparsity) * n)))


# Kept channels come in multiples of this: the k-wide sliced weights and activations then have 16-byte aligned
# rows in bf16, which cuBLAS's fast tensor-core kernels need. Unaligned widths fall back to sm75/sm80-era kernels
# ("align1"/"align2"): Llama-3-8B at 99% FFN sparsity keeps 143 of 14336 channels, and at 20% attention sparsity
# 819 of 1024 k/v channels; an H200 profile ran those GEMMs on such fallbacks (~30 ms of a 177 ms step).
# Below 1024 channels the rounding would move the sparsity noticeably, so small FFNs and attentions keep the
# exact count.
KEEP_MULTIPLE, ALIGN_FROM = 8, 1024


def _aligned(k: int, n: int, width: int, multiple: int) -> int:
    """``k`` of ``n`` rounded up to a multiple of ``multiple`` when the projection is ``width`` >= `ALIGN_FROM` wide."""
    return k if width < ALIGN_FROM else min(n, -(-k // multiple) * multiple)


def ffn_keep_count(n: int, sparsity: float) -> int:
    """Kept intermediate channels of an FFN: `keep_count`, rounded up to a multiple of `KEEP_MULTIPLE` for
    FFNs of at least `ALIGN_FROM` channels (at most 7 more channels, under 1%)."""
    return _aligned(keep_count(n, sparsity), n, n, KEEP_MULTIPLE)


def attention_keep_counts(num_kv_heads: int, head_dim: int, sparsity: float, pairs: bool) -> tuple[int, int]:
    """(kept q/k units, kept v channels) of an attention layer: a unit is a k channel, or with ``pairs`` a RoPE pair
    of them. Rounded up so every sliced width (k, q = group x k, v, o = group x v) is a multiple of
    `KEEP_MULTIPLE` channels when the kv width is at least `ALIGN_FROM` (Llama-3-8B: 8 x 128)."""
    width = num_kv_heads * head_dim
    units = num_kv_heads * (head_dim // 2 if pairs else head_dim)
    unit_multiple = KEEP_MULTIPLE // 2 if pairs else KEEP_MULTIPLE
    return (_aligned(keep_count(units, sparsity), units, width, unit_multiple),
            _aligned(keep_count(width, sparsity), width, width, KEEP_MULTIPLE))


def _col_norms(y: torch.Tensor) -> torch.Tensor:
    """Column norms accumulated in (at least) float32 without a float32 copy of ``y`` (one kernel)."""
    return torch.linalg.vector_norm(y, dim=0, dtype=torch.promote_types(y.dtype, torch.float32))


# Attention under the labelled selector runs the true q/k/v on at most this many labelled rows (evenly spaced):
# channel norms are stable well before that, and the extra cost stays a few percent of a sparse layer.
LABELLED_ROWS_CAP = 512


def labelled_rows(x_dense: torch.Tensor, num_labelled: int, cap: int = LABELLED_ROWS_CAP) -> torch.Tensor:
    """The labelled rows (the first ``num_labelled`` dense rows of a TokenSplit), at most ``cap`` of them."""
    x = x_dense[:num_labelled]
    return x if num_labelled <= cap else x[:: -(-num_labelled // cap)]


# The sampled selector scores at most this many context rows per batch (evenly spaced). Measured on real GSM8K
# batches of three models (benchmarks/results/recall-*.json, docs/results.md): 128 rows left the worst layer of
# Qwen2.5-Coder-1.5B at 0.88 of the oracle's FFN mass at 90% sparsity, 256 rows at 0.95. A few hundred rows are
# read-bound on the weights on a GPU, so 256 costs about what 128 does.
SAMPLE_ROWS = 256


_SAMPLE_INDEX: dict[tuple[int, int, torch.device], torch.Tensor] = {}
_SAMPLE_INDEX_MAX = 4096  # entries of a few KB; past it, new shapes compute their index each call


def _sample_index(n: int, rows: int, device: torch.device) -> torch.Tensor:
    """Never evicted: a captured CUDA graph reads the tensor by address, so freeing it would hand that memory to
    other tensors while the graph still replays from it."""
    key = (n, rows, device)
    idx = _SAMPLE_INDEX.get(key)
    if idx is None:
        idx = torch.arange(rows, device=device) * n // rows
        if len(_SAMPLE_INDEX) < _SAMPLE_INDEX_MAX and not (
                device.type == "cuda" and torch.cuda.is_current_stream_capturing()):  # not from a graph's pool
            _SAMPLE_INDEX[key] = idx
    return idx


def sample_rows(x: torch.Tensor, rows: int = SAMPLE_ROWS) -> torch.Tensor:
    """At most ``rows`` evenly spaced rows of ``x``: rows (i * n) // rows, i < rows. No RNG, so a recomputation
    (gradient checkpointing) picks the same rows; the index shape depends only on n (CUDA graphs). The index is
    built once per (n, rows, device): one gather a call, not three kernels more."""
    n = x.shape[0]
    if n <= rows:
        return x
    return x.index_select(0, _sample_index(n, rows, x.device))


class RunningScore:
    """One layer's FFN channel scores averaged over batches (an exponential moving average, weight ``momentum`` on
    the past when the sample is a small part of the batch), so that a sample of a few hundred rows a batch ranks
    like a sample of several batches.

    The weights are those of combining two estimates by their variances: the sample's shrinks with the share f
    of the batch's context rows it covers (a finite population: (1 - f) / rows), the past's error (other
    batches) does not. With r = momentum / (1 - momentum) the variance ratio at f -> 0, the past's weight is
    r (1 - f) / (r (1 - f) + 1): ``momentum`` for a small sample, 0 when the sample is the whole batch (then
    the score is exact and the past only dilutes it; measured, docs/accuracy-notes.md).

    Measured on real GSM8K batches (docs/accuracy-notes.md): the previous batch's *exact* oracle scores alone keep
    0.97 of this batch's oracle mass at 90% sparsity on SmolLM2-135M, so most of a channel's importance is shared
    across batches and the batch-to-batch part is what the current sample adds.

    Recompute-safe: a forward reads `running` and writes `pending`; `commit_running` (at the start of the next
    forward, `SparseLoRAState.begin_batch`) moves `pending` into `running`. A gradient-checkpointing recompute therefore
    picks the channels of its original forward, and under CUDA graphs both buffers are static (allocated in the
    warm-up, before capture) and the commit is a captured copy. Zero-initialised: the first batch ranks by its
    own sample (an EMA's missing bias correction is one scalar a batch, which no ranking sees). `SparseLoRACallback`
    saves the averages with each Trainer checkpoint, so a resumed run chooses as the uninterrupted one would."""

    def __init__(self, momentum: float):
        self.momentum = momentum
        self.running: torch.Tensor | None = None
        self.pending: torch.Tensor | None = None

    def weight(self, coverage: float) -> float:
        """The past's weight when the sample holds ``coverage`` (0-1) of the batch's context rows."""
        r = self.momentum / (1.0 - self.momentum) * max(0.0, 1.0 - coverage)
        return r / (r + 1.0)

    def blend(self, score: torch.Tensor, coverage: float = 0.0) -> torch.Tensor:
        """This batch's per-row score (mean over the sample of the squared activation) averaged with the past;
        ``coverage``: the share of the batch's context rows in the sample."""
        if self.running is None or self.running.shape != score.shape or self.running.device != score.device:
            if score.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("sparselora: a RunningScore was first used inside CUDA graph capture; run a "
                                   "warm-up forward first (CUDAGraphStep does)")
            self.running = torch.zeros_like(score, dtype=torch.float32)
            self.pending = torch.zeros_like(self.running)
        torch.lerp(score.float(), self.running, self.weight(coverage), out=self.pending)
        return self.pending

    def latest(self) -> torch.Tensor | None:
        """The average including the last forward's batch (what the next forward's commit makes the past)."""
        return self.pending

    def load(self, scores: torch.Tensor) -> None:
        """Continue from a saved `latest` (a resumed run); in place when the buffers exist (graphs read them)."""
        scores = scores.to(torch.float32)
        if self.running is not None and self.running.shape == scores.shape:
            self.running.copy_(scores)
            self.pending.copy_(scores)
        else:
            self.running, self.pending = scores.clone(), scores.clone()

    def reset(self) -> None:
        """Forget the past, in place (a captured graph keeps reading these buffers)."""
        if self.running is not None:
            self.running.zero_()
            self.pending.zero_()


def commit_running(scores) -> None:
    """Each `RunningScore`'s last forward becomes the past of its next one: one launch for all of them."""
    done = [r for r in scores if r.pending is not None]
    if done:
        torch._foreach_copy_([r.running for r in done], [r.pending for r in done])


@dataclass(frozen=True)
class Selector:
    """What a selector needs and what it costs. ``true_rows(kind, context_rows, labelled_rows, sample_rows)``: the
    rows on which it runs the true projections (gate+up for kind "ffn", q+k+v for "attention") per batch and layer."""

    name: str
    help: str
    needs_factors: bool = False  # rank-r SVD factors of gate/up and q/k/v, built at apply_sparselora
    scores_labelled: bool = False  # ranks by the labelled rows: a batch without them runs dense
    true_rows: Callable[[str, int, int, int], int] = lambda kind, nc, nl, sr: 0

    def flops(self, kind: str, hidden: int, outs: tuple[int, ...], context_rows: int, labelled_rows: int,
              rank: int, sample_rows: int = SAMPLE_ROWS) -> float:
        """Forward FLOPs of choosing the channels of one layer's FFN or attention for one batch; ``outs``: the
        output widths of the scored projections ((I, I) for gate/up, (q, kv, kv) for q/k/v)."""
        f = 2.0 * hidden * sum(outs) * self.true_rows(kind, context_rows, labelled_rows, sample_rows)
        if self.needs_factors:  # x A (all projections at once), then z B
            f += context_rows * (2.0 * hidden * len(outs) * rank + 2.0 * rank * sum(outs))
        return f


SELECTORS: dict[str, Selector] = {s.name: s for s in (
    Selector("sampled", "the oracle's score on an evenly spaced sample of at most sample_rows context rows "
             "(real projections, bias and LoRA included; default)", true_rows=lambda kind, nc, nl, sr: min(nc, sr)),
    Selector("svd", "the paper's estimator: rank-r SVD factors of gate/up and q/k/v on every context row",
             needs_factors=True),
    Selector("labelled", "the same batch's labelled tokens' own dense activations (free for the FFN)",
             scores_labelled=True, true_rows=lambda kind, nc, nl, sr: 0 if kind == "ffn" else min(nl, LABELLED_ROWS_CAP)),
    Selector("oracle", "true activations of every context row (upper bound)", true_rows=lambda kind, nc, nl, sr: nc),
    Selector("random", "uniformly random channels (ablation)"),
    Selector("l2", "each projection ranked by its own output norms, not jointly (ablation)",
             true_rows=lambda kind, nc, nl, sr: nc),
)}
DEFAULT_SELECTOR = "sampled"


@torch.no_grad()
def select_ffn_from_activations(sparsity: float, h: torch.Tensor) -> torch.Tensor:
    """Kept FFN channels ranked by the norm of real activations silu(gate x) * (up x) (rows of ``h``): the
    labelled selector passes the labelled tokens' own, which the dense path computes anyway."""
    return top_indices(_col_norms(h), ffn_keep_count(h.shape[-1], sparsity))


def _random(n: int, k: int, device) -> torch.Tensor:
    # the global RNG, so gradient checkpointing's RNG replay recomputes the same channels
    return torch.randperm(n, device=device)[:k].sort().values


def _project(x: torch.Tensor, factors: tuple[torch.Tensor, list[torch.Tensor]]) -> list[torch.Tensor]:
    """x A_i for each projection, with one matmul for all the A's (see `Estimator.stacked`)."""
    a, bs = factors
    z = x.to(a.dtype) @ a
    r = bs[0].shape[0]
    return [z[:, i * r : (i + 1) * r] for i in range(len(bs))]


@torch.no_grad()
def select_ffn(
    selector: str,
    sparsity: float,
    x: torch.Tensor,
    gate: Proj,
    up: Proj,
    factors: tuple[torch.Tensor, list[torch.Tensor]] | None,
    n: int,
    rows: int = SAMPLE_ROWS,
    running: RunningScore | None = None,
    gate_up: Proj | None = None,
) -> torch.Tensor:
    """Kept FFN intermediate channels, ranked by (an estimate of) the norm over the context rows ``x`` of
    silu(gate x) * (up x). ``rows``: the sample size of the sampled selector; ``running``: its average over
    earlier batches; ``gate_up``: [gate x | up x] in one call (an `ops.fp8.Fp8Weight` of the two weights side by
    side), used instead of ``gate``/``up`` (sampled only)."""
    k = ffn_keep_count(n, sparsity)
    if selector == "random":
        return _random(n, k, x.device)
    if selector == "svd":
        zg, zu = _project(x, factors)
        return top_indices(ffn_scores_sq(zg, zu, *factors[1]), k)  # squared norms: same order
    context = x.shape[0]
    if selector == "sampled":
        x = sample_rows(x, rows)
        if gate_up is not None:
            gu = gate_up(x)
            g, u = gu[:, :n], gu[:, n:]
        else:
            g, u = gate(x), up(x)
        # the mean over the sample of the squared activation, one kernel from g and u: samples of any size mix,
        # and the order is that of the norms
        per_row = silu_mul_sq_sum(g, u, 1.0 / x.shape[0])
        if running is None:
            return top_indices(per_row, k)
        return top_indices(running.blend(per_row, x.shape[0] / max(context, 1)), k)
    g, u = gate(x), up(x)
    if selector == "l2":  # the two factors' norms apart: an upper bound of the product's norm
        return top_indices(_col_norms(F.silu(g)) * _col_norms(u), k)
    return top_indices(_col_norms(silu_mul(g, u)), k)  # the activation the forward computes, in its dtype


@functools.lru_cache(maxsize=64)
def _channel_tables(head_dim: int, group_size: int, num_kv_heads: int, pairs: bool, device: torch.device):
    """Index tables of one attention shape, built once per process and device (a selection then maps units to
    channels with one gather instead of a dozen small ops per layer and batch):
    ``unit_k`` (units, 1 or 2): the kv channels of a selection unit (with RoPE pairs: d and d + head_dim/2);
    ``unit_q`` (units, G or 2G): the query channels of those kv channels under GQA; ``kv_q`` (kv channels, G):
    the query channels of each kv channel (the o_proj columns reading a v channel)."""
    D, G, Hkv = head_dim, group_size, num_kv_heads
    kv = torch.arange(Hkv * D, device=device)
    g, d = kv // D, kv % D
    kv_q = (g[:, None] * G + torch.arange(G, device=device)[None, :]) * D + d[:, None]  # (Hkv*D, G)
    if pairs:
        half = D // 2
        u = torch.arange(Hkv * half, device=device)
        h, du = u // half, u % half
        unit_k = torch.stack([h * D + du, h * D + du + half], 1)  # (units, 2)
    else:
        unit_k = kv[:, None]
    unit_q = kv_q.index_select(0, unit_k.reshape(-1)).reshape(unit_k.shape[0], -1)
    return unit_k, unit_q, kv_q


def _tables(arch: ArchInfo, pairs: bool, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _channel_tables(arch.head_dim, arch.group_size, arch.num_kv_heads, bool(pairs), torch.device(device))


def _lookup(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The union of the table rows ``idx`` (the rows' entries are distinct across rows), unsorted: every
    consumer slices or scatters by index, in any order, and a sort costs a kernel as long as the top-k."""
    return table.index_select(0, idx).reshape(-1)


def _unit_channels(units: torch.Tensor, head_dim: int, pairs: bool) -> torch.Tensor:
    """Channel indices of selection units; with RoPE pairs a unit (h, d) is channels d and d + head_dim/2."""
    if not pairs:
        return units
    half = head_dim // 2
    h, d = units // half, units % half
    return torch.cat([h * head_dim + d, h * head_dim + d + half]).sort().values


def _to_units(score: torch.Tensor, pairs: bool) -> torch.Tensor:
    """(heads, head_dim) channel scores -> flat unit scores (pairs summed)."""
    if pairs:
        half = score.shape[1] // 2
        score = score[:, :half] + score[:, half:]
    return score.reshape(-1)


def expand_to_query_heads(kv_channels: torch.Tensor, arch: ArchInfo) -> torch.Tensor:
    """Channel (g, d) of the kv heads -> channels (h, d) for every query head h of group g (unsorted)."""
    return _lookup(_tables(arch, False, kv_channels.device)[2], kv_channels)


@torch.no_grad()
def select_attention(
    selector: str,
    sparsity: float,
    x: torch.Tensor,
    arch: ArchInfo,
    rope_pairs: bool,
    q: Proj,
    k: Proj,
    v: Proj,
    factors: tuple[torch.Tensor, list[torch.Tensor]] | None,
    biases: list[torch.Tensor | None] | None = None,
    rows: int = SAMPLE_ROWS,
) -> dict[str, torch.Tensor]:
    """Kept output channels of q, k, v and input columns of o. ``x``: the context rows, or for the labelled
    selector the labelled rows (then scored like the oracle, by their true q/k/v); the sampled selector scores
    like the oracle on at most ``rows`` evenly spaced rows of ``x``. ``q``/``k``/``v`` include their bias; for
    svd, ``biases`` are added to the low-rank estimate.

    q/k are ranked jointly by ||q|| * ||k|| (query norms averaged over the heads of a kv group), so a kept k
    channel keeps the matching channel of every query head of its group; v by ||v||, and a kept v channel
    keeps the o_proj columns of every query head reading it. ``l2`` ranks q and k apart by their own norms.
    """
    D, Hq, Hkv = arch.head_dim, arch.num_heads, arch.num_kv_heads
    pairs = rope_pairs and D % 2 == 0
    units_per_head = D // 2 if pairs else D
    n_kv_units = Hkv * units_per_head
    k_units, v_keep = attention_keep_counts(Hkv, D, sparsity, pairs)

    if selector == "random":
        units, v_ch = _random(n_kv_units, k_units, x.device), _random(Hkv * D, v_keep, x.device)
        return _attention_from_units(units, v_ch, arch, pairs)

    if selector == "svd":  # exact column norms of x A B (+ the projection's bias) from the Gram matrix of x A
        biases = biases or [None] * 3
        qn, kn, vn = (col_norms_sq(z, b, c).sqrt() for z, b, c in zip(_project(x, factors), factors[1], biases))
    else:
        xs = sample_rows(x, rows) if selector == "sampled" else x
        qn, kn, vn = (_col_norms(f(xs)) for f in (q, k, v))
    qn, kn = qn.view(Hq, D), kn.view(Hkv, D)
    v_ch = top_indices(vn, v_keep)
    if selector == "l2":
        q_ch = _unit_channels(top_indices(_to_units(qn, pairs), k_units * arch.group_size), D, pairs)
        k_ch = _unit_channels(top_indices(_to_units(kn, pairs), k_units), D, pairs)
        return {"q": q_ch, "k": k_ch, "v": v_ch, "o": expand_to_query_heads(v_ch, arch)}
    score = qn.view(Hkv, arch.group_size, D).mean(1) * kn
    return _attention_from_units(top_indices(_to_units(score, pairs), k_units), v_ch, arch, pairs)


def _attention_from_units(units: torch.Tensor, v_ch: torch.Tensor, arch: ArchInfo, pairs: bool) -> dict[str, torch.Tensor]:
    """q/k/v/o channels from the kept kv units and v channels: one table gather each (q, o and paired k unsorted)."""
    unit_k, unit_q, kv_q = _tables(arch, pairs, units.device)
    k_ch = units if not pairs else _lookup(unit_k, units)
    return {"q": _lookup(unit_q, units), "k": k_ch, "v": v_ch, "o": _lookup(kv_q, v_ch)}
