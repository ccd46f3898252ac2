"""GPU time of SparseLoRA's channel selection (SVD estimate + top-k) per layer, without host overhead: each call is
captured in a CUDA graph and replayed, as inside `CUDAGraphStep`. Reports the estimator's share of a step.

    python benchmarks/bench_estimator.py --shape llama3-8b --batch-preset math --step-ms 184.9
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from common import BATCH_PRESETS, SHAPES, cuda_ms, git_commit, paper_preset, versions
from sparselora.io import atomic_write_json
from sparselora import SparseLoRAConfig
from sparselora.estimator import low_rank_factors, stack_factors
from sparselora.models.registry import ArchInfo
from sparselora.selection import select_attention, select_ffn


def graph_ms(fn, reps: int) -> float:
    """Median GPU milliseconds of one replay of ``fn`` captured as a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps):
        times.append(cuda_ms(g.replay))
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama3-8b", choices=[s for s in SHAPES if s != "tiny"])
    p.add_argument("--batch-preset", default="math", choices=sorted(BATCH_PRESETS))
    p.add_argument("--preset", default=None)
    p.add_argument("--step-ms", type=float, default=None, help="the sparse step's time, for the share column")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    arch_name, kw = SHAPES[a.shape]
    B, T, L = BATCH_PRESETS[a.batch_preset]
    preset = a.preset or paper_preset(a.shape, a.batch_preset)
    n_layers = kw["num_hidden_layers"]
    cfg = SparseLoRAConfig.from_preset(preset, **({"num_layers": n_layers} if preset == "scaled" else {}))
    H, I, Hq, Hkv = kw["hidden_size"], kw["intermediate_size"], kw["num_attention_heads"], kw["num_key_value_heads"]
    D = H // Hq
    arch = ArchInfo(arch_name, n_layers, H, I, Hq, Hkv, D, 100)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    x = torch.randn(B * (T - L), H, device=dev, dtype=torch.bfloat16)  # the context rows of one batch

    def factors(out_dims):
        return stack_factors([low_rank_factors(torch.randn(o, H, device=dev) / H**0.5, cfg.estimator_rank)
                              for o in out_dims])

    ffn_f, attn_f = factors([I, I]), factors([Hq * D, Hkv * D, Hkv * D])
    rows = {}
    ffn_levels = sorted(set(cfg.ffn_sparsity.values()))
    attn_levels = sorted(set(cfg.attn_sparsity.values()))
    for s in ffn_levels:
        rows[f"ffn@{s}"] = graph_ms(lambda: select_ffn("svd", s, x, None, None, ffn_f, I), a.reps)
    for s in attn_levels:
        rows[f"attn@{s}"] = graph_ms(
            lambda: select_attention("svd", s, x, arch, cfg.rope_pairs, None, None, None, attn_f), a.reps)
    total = sum(rows[f"ffn@{s}"] for s in cfg.ffn_sparsity.values()) + \
        sum(rows[f"attn@{s}"] for s in cfg.attn_sparsity.values())
    print(f"{a.shape} {a.batch_preset} ({B}x{T}, {B * (T - L)} context rows), preset {preset}, rank {cfg.estimator_rank}")
    for k, v in rows.items():
        print(f"  {k:<12} {v:7.3f} ms per layer")
    share = f" = {100 * total / a.step_ms:.1f}% of a {a.step_ms} ms step" if a.step_ms else ""
    print(f"  all sparse layers ({len(cfg.ffn_sparsity)} FFN, {len(cfg.attn_sparsity)} attention): {total:.2f} ms{share}")
    doc = {"gpu": torch.cuda.get_device_name(), "shape": a.shape, "batch_preset": a.batch_preset, "preset": preset,
           "context_rows": B * (T - L), "per_layer_ms": rows, "total_ms": total, "step_ms": a.step_ms,
           "share": total / a.step_ms if a.step_ms else None, "versions": versions(), "commit": git_commit()}
    out = a.out or f"benchmarks/results/estimator-{a.shape}-{a.batch_preset}.json"
    atomic_write_json(out, doc)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
