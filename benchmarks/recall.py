"""How well does the SVD estimator find the channels the oracle keeps? Recall on real activations of a real model.

    python benchmarks/recall.py --model qwen2.5-coder-0.5b --data ../shared/data/gsm8k/train.jsonl \
        --samples 16 --out benchmarks/results/recall-qwen2.5-coder-0.5b.json

The dense model runs real training sequences (prompt + target, tokenized exactly as training tokenizes them)
in batches of ``--batch-size`` (one channel set per batch, as in training). Forward hooks capture, for every
layer, the MLP input and the attention input on *context* tokens (label -100, not padding) and the true
outputs of gate/up and q/k/v. Then, per layer and sparsity level, `sparselora.selection.select_ffn` /
`select_attention` choose channels with the oracle (true activations) and with:

* ``svd-rN``   the library's estimator (`sparselora.estimator.low_rank_factors`, rank N, no bias);
* ``svd-rN+b`` the same plus the projection's bias (Qwen2 has q/k/v biases, which the estimator leaves out);
* ``l2``       (attention) q and k ranked apart by their own norms instead of jointly;
* ``random``   expected recall = kept fraction (analytic).

Recall = |chosen ∩ oracle| / |oracle|. ``mass`` (FFN, v) = oracle score captured by the chosen channels /
oracle score of the oracle's own top-k: 1.0 when a miss swaps in a channel as strong as the one it misses.
Attention reports k channels (chosen jointly with q) and v channels (which also decide o's columns).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, git_commit, versions, write_json_atomic  # noqa: E402

FFN_LEVELS = (0.5, 0.9, 0.99)
ATTN_LEVELS = (0.5, 0.75)
RANKS = (4, 8, 16)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"))
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="which samples: the first N of a seeded shuffle")
    p.add_argument("--ffn-levels", default=",".join(map(str, FFN_LEVELS)))
    p.add_argument("--attn-levels", default=",".join(map(str, ATTN_LEVELS)))
    p.add_argument("--ranks", default=",".join(map(str, RANKS)))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="model dtype for the activations (float32 is faster on CPUs)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.isin(a, b).sum().item() / b.numel()


def main(argv=None):
    args = parse_args(argv)
    from sparselora.data import DataCollator, load_examples, tokenize_examples
    from sparselora.estimator import low_rank_factors, stack_factors
    from sparselora.models.loading import load_model
    from sparselora.models.registry import arch_info, decoder_layers
    from sparselora.selection import keep_count, select_attention, select_ffn
    from sparselora.tokens import context_mask

    t0 = time.time()
    ffn_levels = [float(x) for x in args.ffn_levels.split(",")]
    attn_levels = [float(x) for x in args.attn_levels.split(",")]
    ranks = [int(x) for x in args.ranks.split(",")]
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    model, tok = load_model(args.model, dtype=dtype, device=device)
    model.requires_grad_(False)
    arch = arch_info(model.config)
    layers = decoder_layers(model)
    L = arch.num_layers

    pool = load_examples(args.data)
    idx = list(range(len(pool)))
    random.Random(args.seed).shuffle(idx)
    examples = [pool[i] for i in idx[: args.samples]]
    feats, _ = tokenize_examples(examples, tok, max_length=args.max_length)
    collate = DataCollator(tok)

    # estimator factors per layer and rank, from the frozen weights (float32, as the library builds them)
    def w(mod):
        return mod.weight.detach().float()

    factors = {}
    for r in ranks:
        for i, layer in enumerate(layers):
            a, m = layer.self_attn, layer.mlp
            factors[(r, i)] = {p: low_rank_factors(w(getattr(mod, f"{p}_proj")), r)
                               for mod, ps in ((m, ("gate", "up")), (a, ("q", "k", "v"))) for p in ps}

    cap: dict = {}

    def hook_in(key):
        def f(mod, args_, kwargs):
            x = kwargs.get("hidden_states", args_[0] if args_ else None)
            cap[key] = x.reshape(-1, x.shape[-1])[cap["ctx"]].float()
        return f

    def hook_out(key):
        def f(mod, args_, out):
            cap[key] = out.reshape(-1, out.shape[-1])[cap["ctx"]].float()
        return f

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.mlp.register_forward_pre_hook(hook_in((i, "x_mlp")), with_kwargs=True))
        handles.append(layer.self_attn.register_forward_pre_hook(hook_in((i, "x_att")), with_kwargs=True))
        for p in ("gate", "up"):
            handles.append(getattr(layer.mlp, f"{p}_proj").register_forward_hook(hook_out((i, p))))
        for p in ("q", "k", "v"):
            handles.append(getattr(layer.self_attn, f"{p}_proj").register_forward_hook(hook_out((i, p))))

    # results[kind][level][selector] -> list over batches of per-layer values
    kinds = {"ffn": ffn_levels, "attn_k": attn_levels, "attn_v": attn_levels}
    res = {k: {str(s): {} for s in lv} for k, lv in kinds.items()}
    mass = {k: {str(s): {} for s in lv} for k, lv in (("ffn", ffn_levels), ("attn_v", attn_levels))}

    def add(store, kind, s, sel, layer, value):
        store[kind][str(s)].setdefault(sel, [[] for _ in range(L)])[layer].append(value)

    n_ctx_total = 0
    bs = args.batch_size
    for b in range(0, len(feats), bs):
        batch = collate(feats[b : b + bs])
        ctx = context_mask(batch["labels"], batch["attention_mask"]).reshape(-1).to(device)
        cap.clear()
        cap["ctx"] = ctx
        n_ctx_total += int(ctx.sum())
        with torch.no_grad():
            model.model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        for i, layer in enumerate(layers):
            act = layer.mlp.act_fn
            n_ffn = arch.intermediate_size
            x, g, u = cap[(i, "x_mlp")], cap[(i, "gate")], cap[(i, "up")]
            score = (act(g) * u).norm(dim=0)
            for s in ffn_levels:
                k = keep_count(n_ffn, s)
                orc = select_ffn("oracle", s, x, lambda _: g, lambda _: u, None, n_ffn)
                best = score[orc].sum().item()
                add(res, "ffn", s, "random", i, k / n_ffn)
                add(mass, "ffn", s, "random", i, k / n_ffn * score.sum().item() / best)
                for r in ranks:
                    f = factors[(r, i)]
                    sel = select_ffn("svd", s, x, None, None, stack_factors([f["gate"], f["up"]]), n_ffn)
                    add(res, "ffn", s, f"svd-r{r}", i, _overlap(sel, orc))
                    add(mass, "ffn", s, f"svd-r{r}", i, score[sel].sum().item() / best)
            xa = cap[(i, "x_att")]
            q, kk, v = cap[(i, "q")], cap[(i, "k")], cap[(i, "v")]
            att = layer.self_attn
            vscore = v.norm(dim=0)
            for s in attn_levels:
                orc = select_attention("oracle", s, xa, arch, True, lambda _: q, lambda _: kk, lambda _: v, None)
                n_k, n_v = orc["k"].numel(), orc["v"].numel()
                add(res, "attn_k", s, "random", i, n_k / (arch.num_kv_heads * arch.head_dim))
                add(res, "attn_v", s, "random", i, n_v / (arch.num_kv_heads * arch.head_dim))
                vbest = vscore[orc["v"]].sum().item()
                add(mass, "attn_v", s, "random", i, n_v / vscore.numel() * vscore.sum().item() / vbest)
                l2 = select_attention("l2", s, xa, arch, True, lambda _: q, lambda _: kk, lambda _: v, None)
                add(res, "attn_k", s, "l2", i, _overlap(l2["k"], orc["k"]))
                add(res, "attn_v", s, "l2", i, _overlap(l2["v"], orc["v"]))
                for r in ranks:
                    f = factors[(r, i)]
                    sel = select_attention("svd", s, xa, arch, True, None, None, None, stack_factors([f["q"], f["k"], f["v"]]))
                    add(res, "attn_k", s, f"svd-r{r}", i, _overlap(sel["k"], orc["k"]))
                    add(res, "attn_v", s, f"svd-r{r}", i, _overlap(sel["v"], orc["v"]))
                    add(mass, "attn_v", s, f"svd-r{r}", i, vscore[sel["v"]].sum().item() / vbest)
                    bias = {p: getattr(getattr(att, f"{p}_proj"), "bias", None) for p in ("q", "k", "v")}
                    if any(bb is not None for bb in bias.values()):
                        def lr(p, f=f, bias=bias):
                            a_, b_ = f[p]
                            bb = bias[p]
                            return lambda z: z @ a_ @ b_ + (bb.float() if bb is not None else 0.0)
                        selb = select_attention("oracle", s, xa, arch, True, lr("q"), lr("k"), lr("v"), None)
                        add(res, "attn_k", s, f"svd-r{r}+b", i, _overlap(selb["k"], orc["k"]))
                        add(res, "attn_v", s, f"svd-r{r}+b", i, _overlap(selb["v"], orc["v"]))
    for h in handles:
        h.remove()

    from sparselora import SparseLoRAConfig

    scaled = SparseLoRAConfig.from_preset("scaled", num_layers=L)
    sparse_layers = {"ffn": sorted(scaled.ffn_sparsity), "attn_k": sorted(scaled.attn_sparsity),
                     "attn_v": sorted(scaled.attn_sparsity)}

    def finish(store):
        per_layer, summary = {}, {}
        for kind, levels in store.items():
            per_layer[kind], summary[kind] = {}, {}
            for s, sels in levels.items():
                per_layer[kind][s], summary[kind][s] = {}, {}
                for sel, vals in sels.items():
                    pl = [statistics.fmean(v) for v in vals]
                    per_layer[kind][s][sel] = [round(x, 4) for x in pl]
                    summary[kind][s][sel] = {
                        "all_layers": round(statistics.fmean(pl), 4),
                        "scaled_sparse_layers": round(statistics.fmean(pl[j] for j in sparse_layers[kind]), 4),
                        "min_layer": round(min(pl), 4)}
        return per_layer, summary

    per_layer, summary = finish(res)
    mass_pl, mass_summary = finish(mass)
    doc = {
        "model": args.model, "architecture": arch.__dict__ | {"group_size": arch.group_size},
        "data": str(Path(args.data).resolve().relative_to(REPO.parent)) if str(Path(args.data).resolve()).startswith(str(REPO.parent)) else args.data,
        "samples": len(feats), "batch_size": bs, "batches": (len(feats) + bs - 1) // bs, "seed": args.seed,
        "context_tokens": n_ctx_total, "dtype": args.dtype, "device": str(device),
        "ranks": ranks, "ffn_levels": ffn_levels, "attn_levels": attn_levels,
        "scaled_sparse_layers": {"ffn": sparse_layers["ffn"], "attn": sparse_layers["attn_k"]},
        "versions": versions(), "commit": git_commit(),
        "command": "python benchmarks/recall.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "seconds": round(time.time() - t0, 1),
        "recall": summary, "mass": mass_summary, "recall_per_layer": per_layer, "mass_per_layer": mass_pl,
    }
    slug = "".join(c if c.isalnum() or c in ".-" else "-" for c in Path(args.model).name.lower())
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"recall-{slug}.json"
    write_json_atomic(out, doc)
    print_table(doc)
    print(f"wrote {out} ({doc['seconds']}s)")
    return 0


def print_table(doc):
    print(f"\nrecall of the oracle's channels: {doc['model']}, {doc['samples']} samples, {doc['context_tokens']} context "
          f"tokens (mean over the 'scaled' preset's sparse layers; all layers in brackets)")
    for kind, title in (("ffn", "FFN"), ("attn_k", "attention q/k"), ("attn_v", "attention v/o")):
        levels = list(doc["recall"][kind])
        sels = list(doc["recall"][kind][levels[0]])
        print(f"  {title:<14}" + "".join(f"{'s=' + lv:>20}" for lv in levels))
        for sel in sels:
            cells = []
            for lv in levels:
                r = doc["recall"][kind][lv].get(sel)
                cells.append(f"{r['scaled_sparse_layers']:.3f} ({r['all_layers']:.3f})" if r else "-")
            print(f"    {sel:<12}" + "".join(f"{c:>20}" for c in cells))


if __name__ == "__main__":
    sys.exit(main())
