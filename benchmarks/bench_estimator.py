"""GPU time of SparseLoRA's channel selection per layer and selector, without host overhead: each call is captured
in a CUDA graph and replayed, as inside `CUDAGraphStep`. Reports each selector's share of a step.

    python benchmarks/bench_estimator.py --shape llama3-8b --batch-preset math --step-ms 184.9 --selectors svd,sampled

svd: the rank-r estimate and its scores; sampled (the default): the real projections (random bf16 weights of the
shape) on the sampled rows, and their scores, for the FFN averaged over batches as in training (`RunningScore`);
``--sample-rows`` adds ``sampled-S`` on S rows; where the GPU has fp8 (the library's default then),
``sampled-bf16`` scores the FFN rows in bf16 for comparison. All include the top-k and the channel mapping. Also the top-k
alone at the preset's sizes: the library's one-launch kernel against torch.topk + sort.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from common import BATCH_PRESETS, SHAPES, cuda_ms, git_commit, paper_preset, versions
from sparselora.io import atomic_write_json
from sparselora import SparseLoRAConfig
from sparselora.estimator import low_rank_factors, stack_factors
from sparselora.models.registry import ArchInfo
from sparselora.ops.fp8 import Fp8Weight, fp8_supported
from sparselora.ops.topk import top_indices
from sparselora.selection import (SELECTORS, RunningScore, attention_keep_counts, ffn_keep_count, select_attention,
                                  select_ffn)


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
    p.add_argument("--selectors", default="svd,sampled", help=f"comma list of {', '.join(SELECTORS)}")
    p.add_argument("--sample-rows", default="", help="comma list of further sample sizes for sampled (sampled-S)")
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

    selectors = [n.strip() for n in a.selectors.split(",") if n.strip()]
    unknown = [n for n in selectors if n not in SELECTORS or SELECTORS[n].scores_labelled]
    if unknown:
        p.error(f"selectors {unknown} cannot be timed here (unknown, or they rank by labelled rows)")

    def factors(out_dims):
        return stack_factors([low_rank_factors(torch.randn(o, H, device=dev) / H**0.5, cfg.estimator_rank)
                              for o in out_dims])

    def weight(out_dim):  # a frozen bf16 weight of the shape (the sampled/oracle selectors run the real ones)
        return torch.randn(out_dim, H, device=dev, dtype=torch.bfloat16) / H**0.5

    def proj(w):
        return lambda t: t @ w.t()

    ffn_f, attn_f = factors([I, I]), factors([Hq * D, Hkv * D, Hkv * D])
    wg, wu = weight(I), weight(I)
    gate, up, q, k, v = proj(wg), proj(wu), proj(weight(Hq * D)), proj(weight(Hkv * D)), proj(weight(Hkv * D))
    # the library's sampled FFN scores: from an fp8 copy of [gate; up] where the GPU has fp8 (SparseMLP._fp8_gate_up)
    fp8 = Fp8Weight.side_by_side([wg, wu]) if cfg.sample_fp8 and fp8_supported(dev) else None
    variants = [(sel, sel, cfg.sample_rows, fp8) for sel in selectors]  # (timed name, selector, sample rows, fp8)
    if "sampled" in selectors:
        variants += [(f"sampled-{r}", "sampled", r, fp8) for r in sorted({int(t) for t in a.sample_rows.split(",") if t})
                     if r != cfg.sample_rows]
        if fp8 is not None:
            variants.append(("sampled-bf16", "sampled", cfg.sample_rows, None))
    table, totals = {}, {}
    for name, sel, n_rows, gate_up in variants:
        rows = table[name] = {}
        for s in sorted(set(cfg.ffn_sparsity.values())):
            running = RunningScore(cfg.score_momentum) if sel == "sampled" and cfg.score_momentum > 0 else None
            rows[f"ffn@{s}"] = graph_ms(
                lambda: select_ffn(sel, s, x, gate, up, ffn_f, I, n_rows, running, gate_up), a.reps)
        for s in sorted(set(cfg.attn_sparsity.values())):
            rows[f"attn@{s}"] = graph_ms(
                lambda: select_attention(sel, s, x, arch, cfg.rope_pairs, q, k, v, attn_f, None, n_rows),
                a.reps)
        totals[name] = sum(rows[f"ffn@{s}"] for s in cfg.ffn_sparsity.values()) + \
            sum(rows[f"attn@{s}"] for s in cfg.attn_sparsity.values())
    pairs = cfg.rope_pairs and D % 2 == 0
    units = Hkv * (D // 2 if pairs else D)
    sizes = sorted({(I, ffn_keep_count(I, s)) for s in cfg.ffn_sparsity.values()}
                   | {pair for s in cfg.attn_sparsity.values()
                      for pair in zip((units, Hkv * D), attention_keep_counts(Hkv, D, s, pairs))})
    topk = {}
    for n, k_ in sizes:
        sc = torch.rand(n, device=dev)
        topk[f"{n}/{k_}"] = {"library": graph_ms(lambda: top_indices(sc, k_), a.reps),
                             "torch": graph_ms(lambda: sc.topk(k_, sorted=False).indices.sort().values, a.reps)}
    print(f"{a.shape} {a.batch_preset} ({B}x{T}, {B * (T - L)} context rows), preset {preset}, "
          f"rank {cfg.estimator_rank}, sample rows {cfg.sample_rows}")
    for name in table:
        for k_, v_ in table[name].items():
            print(f"  {name:<11} {k_:<12} {v_:7.3f} ms per layer")
        share = f" = {100 * totals[name] / a.step_ms:.1f}% of a {a.step_ms} ms step" if a.step_ms else ""
        print(f"  {name:<11} all sparse layers ({len(cfg.ffn_sparsity)} FFN, {len(cfg.attn_sparsity)} attention): "
              f"{totals[name]:.2f} ms{share}")
    for nk, t in topk.items():
        print(f"  top-k {nk:<12} library {1000 * t['library']:6.1f} us   torch.topk + sort {1000 * t['torch']:6.1f} us")
    doc = {"gpu": torch.cuda.get_device_name(), "shape": a.shape, "batch_preset": a.batch_preset, "preset": preset,
           "context_rows": B * (T - L), "sample_rows": cfg.sample_rows, "sample_fp8": fp8 is not None, "per_layer_ms": table, "total_ms": totals, "topk_ms": topk,
           "step_ms": a.step_ms, "share": {k_: t / a.step_ms for k_, t in totals.items()} if a.step_ms else None,
           "versions": versions(), "commit": git_commit(),
           "command": "python benchmarks/bench_estimator.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = a.out or f"benchmarks/results/estimator-{a.shape}-{a.batch_preset}.json"
    atomic_write_json(out, doc)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
