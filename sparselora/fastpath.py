"""Which training path a run takes, decided once, printed, and shared by `sparselora finetune`, the Trainer
integration and the benchmark (so the benchmark measures what users run).

On a CUDA GPU the fastest correct path is: packed rows of a fixed token budget with segment-isolated attention
(no padding, one batch shape), fused kernels, and forward + backward replayed from CUDA graphs with bucketed token
counts (a handful of graphs per run). Each piece falls back, with its reason, where it cannot apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from sparselora.data.packing import PackedCollator, pack_features

ROUND = 128  # token budgets and segment bounds are multiples of this


def _round_up(n: float, m: int = ROUND) -> int:
    return max(m, int(-(-n // m) * m))


@dataclass
class TrainingPath:
    packed: bool
    cuda_graphs: bool
    fast_kernels: bool
    max_tokens: int | None = None  # packed rows: tokens per row
    max_segment_len: int | None = None
    max_segments: int = 32
    reasons: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = [f"packed rows of {self.max_tokens} tokens (segment-isolated attention)" if self.packed
                 else "padded batches", "CUDA graphs" if self.cuda_graphs else "eager",
                 "fused kernels" if self.fast_kernels else "plain kernels"]
        why = f" ({'; '.join(self.reasons)})" if self.reasons else ""
        return "training path: " + ", ".join(parts) + why


def choose_path(
    device_type: str,
    lengths: Sequence[int],
    batch_size: int,
    *,
    gradient_checkpointing: bool = False,
    world_size: int = 1,
    dtype: str = "bfloat16",
    packing: bool | None = None,
    cuda_graphs: bool | None = None,
    fast_kernels: bool | None = None,
    max_tokens: int | None = None,
) -> TrainingPath:
    """The fastest correct path for this run; ``None`` means "decide", a bool forces that piece (an impossible
    forced choice raises). A packed row holds about ``batch_size`` examples on average, so a step sees as many
    examples as a padded batch would."""
    reasons: list[str] = []
    gpu = device_type == "cuda"
    if packing is None:
        packing = gpu
        if not gpu:
            reasons.append("packing pays on a GPU; on CPU padded batches are as fast")
    if fast_kernels is None:
        # on a CPU the fused norm/activation are the plain torch ops (the same numbers); what pays there is the
        # labelled-only, chunked LM head + loss: SmolLM2-135M at 4 x 460 tokens 3.8 -> 2.9 GB peak RSS, the
        # head's forward + backward 2.8 -> 1.5 s (the same loss to float rounding; docs/performance.md, CPU memory)
        fast_kernels = True
        if not gpu:
            reasons.append("the LM head and loss run on labelled tokens only, a chunk at a time (memory)")
    blockers = []  # a forced cuda_graphs without a GPU runs the graph trainer's eager path (the same numbers)
    if gradient_checkpointing:
        blockers.append("gradient checkpointing")
    if world_size > 1:
        blockers.append("several processes")
    if dtype == "float16":
        blockers.append("float16 loss scaling")
    if cuda_graphs and blockers:
        raise ValueError(f"CUDA graphs cannot run here: {', '.join(blockers)}; turn cuda_graphs off or change that")
    if cuda_graphs is None:
        cuda_graphs = gpu and not blockers
        if blockers and gpu:
            reasons.append("eager because of " + ", ".join(blockers))
    if cuda_graphs and not packing:
        reasons.append("CUDA graphs without packing capture a graph per batch shape")
    path = TrainingPath(packing, bool(cuda_graphs), bool(fast_kernels), reasons=reasons)
    if packing:
        if not lengths:
            raise ValueError("no examples to pack")
        longest = max(lengths)
        path.max_segment_len = _round_up(longest, 64)
        mean = sum(lengths) / len(lengths)
        path.max_tokens = max_tokens or max(_round_up(batch_size * mean), _round_up(longest))
        if path.max_tokens < longest:
            raise ValueError(f"max_tokens={path.max_tokens} is shorter than the longest example ({longest} tokens)")
        path.max_segments = max(8, 2 * batch_size)
    return path


def packed_data(features: Sequence[dict], path: TrainingPath, pad_token_id: int) -> tuple[list[dict], PackedCollator]:
    """The training set as packs and the collator that batches them, for a packed `TrainingPath`."""
    packs = pack_features(features, path.max_tokens, path.max_segments)
    seg = min(path.max_segment_len, path.max_tokens)
    return packs, PackedCollator(pad_token_id, path.max_tokens, path.max_segments, seg)


# Attention sparsity below this level runs dense: there the context-sparse q/k/v/o (row-split GEMMs, channel
# slices, the selection) cost more than the FLOPs they save. Measured on an H200 (Llama-3-8B shape, one layer's
# q/k/v/o forward + backward in a CUDA graph, LoRA r=32; dense 1.31-1.34 ms): at 3,600 context rows of 4,096, 20%
# sparsity 1.60 ms with the selection, 50% 1.27, 75% 1.03; at 2,000 rows 1.57 / 1.38 / 1.25. Through the Trainer on
# the commonsense mix (llama3-8b-csr170k, attention at 20% in 11 layers) the step took 164.9 ms with its attention
# sparse and 159.8 ms with it dense. On the 2-core CPU (`benchmarks/bench_cpu.py`, FFN 0.9, two runs each) the
# sparse step took 3,435 / 3,542 ms with attention at 0.5 and 3,437 / 3,308 ms with it dense, 3,070 at 0.75
# (docs/performance.md). The FFN's slices pay at any level.
MIN_PAYING_ATTN_SPARSITY = 0.5


def paying_config(cfg):
    """(config, line): ``cfg`` without its attention levels below `MIN_PAYING_ATTN_SPARSITY` (those layers' attention
    runs dense: as fast or faster, and exact), with the line that says so; ``cfg`` itself and None when it has none.
    `sparselora finetune` and the benchmark's fast methods run what this returns; `apply_sparselora` applies a
    config as given."""
    import dataclasses

    from sparselora.config import _compact

    low = {i: s for i, s in cfg.attn_sparsity.items() if 0 < s < MIN_PAYING_ATTN_SPARSITY}
    if not low:
        return cfg, None
    kept = {i: s for i, s in cfg.attn_sparsity.items() if i not in low}
    levels = "; ".join(f"{v:g} in layers {','.join(k for k, x in _compact(low).items() if x == v)}"
                       for v in sorted(set(low.values())))
    line = (f"attention sparsity {levels} runs dense: attention sparsity below {MIN_PAYING_ATTN_SPARSITY:g} costs "
            "more than it saves (measured on GPU and CPU, docs/performance.md); the FFN sparsity is kept")
    return dataclasses.replace(cfg, attn_sparsity=kept), line


# Below this analytic FLOP cut the sparse path's fixed costs (row permutations, selection, thin GEMMs) eat the
# saving: measured, Llama-2-7B's 1.40x cut ran at 0.99x of dense (H100, graphed); the CPU demo's 1.12x at 0.99x.
MIN_PAYING_FLOP_CUT = 1.4


def flop_cut_warning(speedup: float) -> str | None:
    """A warning when a config's analytic FLOP cut (dense / sparse) is too small to show up as time."""
    if speedup >= MIN_PAYING_FLOP_CUT:
        return None
    return (f"this sparsity config cuts the step's FLOPs only {speedup:.2f}x at this data's prompt/answer lengths; "
            f"below {MIN_PAYING_FLOP_CUT}x the sparse path's fixed costs usually make it no faster than dense "
            "(docs/performance.md). Expect little or no speed-up; a sparser config (if its loss allows) or --dense")



# Below this hidden size the sparse path's fixed costs outweigh its FLOP cut on a GPU. Measured on an H200 through
# `sparselora finetune` (benchmarks/accuracy.py, train_seconds, 600 commonsense steps): Qwen2.5-Coder-0.5B (hidden
# 896) 28.0 s sparse (1.19x FLOP cut) vs 25.2 s dense at fc38568, Qwen2.5-Coder-1.5B (1536) 40.6 s (1.20x cut) vs
# 29.3 s at 3c717cd, the fused ops running under the Trainer's autocast (before that fix: 44.3 vs 26.5 s and 54.7
# vs 35.1 s); the Llama-3-8B shape (4096) ran 1.11-1.37x faster than the best dense stack (docs/performance.md).
MIN_PAYING_HIDDEN = 3072


def small_model_warning(hidden_size: int, device_type: str) -> str | None:
    """A warning when the model is too small for the sparse path to be faster than dense on a GPU."""
    if device_type != "cuda" or hidden_size >= MIN_PAYING_HIDDEN:
        return None
    return (f"this model's hidden size ({hidden_size}) is below {MIN_PAYING_HIDDEN}: on a GPU its layers are too "
            "small for the sparse path to pay (measured 1.1-1.4x slower than dense at hidden 896 and 1536, "
            "docs/performance.md); train it --dense for speed, sparse to study the method")


def eager_gpu_warning(device_type: str, graphed: bool, sparse: bool) -> str | None:
    """A warning when the sparse path trains eagerly on a GPU (no CUDA graphs: gradient checkpointing, several
    processes, float16, or a plain Trainer): the eager sparse step is host-bound. Measured on an H200 (Llama-3-8B
    shape, math mix, b86f5bb): 275.5 ms a step against 272.5 for packed PEFT + liger, 1.02x of its tokens/s,
    against 1.27x for the graphed path (docs/performance.md, "The eager path re-measured")."""
    if device_type != "cuda" or graphed or not sparse:
        return None
    return ("the sparse path trains eagerly on this GPU (no CUDA graphs); eager it is host-bound and measured no "
            "faster than dense (1.02x packed PEFT + liger's tokens/s on Llama-3-8B, docs/performance.md). For the "
            "speed-up use sparselora.CUDAGraphTrainer with packed rows (what `sparselora finetune` picks when "
            "nothing keeps graphs off: gradient checkpointing, several processes, float16), or train dense")
