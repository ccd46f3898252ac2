"""Host-side cost of the eager sparse path: a model so small that its compute is negligible, so a step's wall time
is its host time (Python, dispatch, autograd), and the ops it issues can be counted.

    python benchmarks/host_overhead.py                    # packed row, svd selector, math10k-like layer pattern
    python benchmarks/host_overhead.py --selector sampled --layers all

Per path (dense = the same patched model with sparsity off, sparse): top-level aten ops of one forward + backward
(aten ops not nested in another aten op: what Python and autograd dispatch), aten::_local_scalar_dense calls
(.item()/.tolist()/nonzero: a host sync each on a GPU), and the median wall time of forward + backward over
``--iters`` steps, dense and sparse interleaved. CPU only by design (on a GPU the same step is kernel-bound).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

import sparselora  # noqa: E402
from sparselora import SparseLoRAConfig, apply_sparselora, use_packed_attention  # noqa: E402
from sparselora.data import PackedCollator, pack_features  # noqa: E402


def build(args):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.num_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=4096, tie_word_embeddings=False)
    model = get_peft_model(AutoModelForCausalLM.from_config(cfg),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    L = args.num_layers
    if args.layers == "all":
        ffn, attn = {f"0-{L - 1}": 0.9}, {f"0-{L - 1}": 0.75}
    else:  # like llama3-8b-math10k: FFN sparse in most layers, attention in a subset
        ffn, attn = {f"1-{L - 2}": 0.9}, {f"{L // 2 - 1}-{L - 2}": 0.75}
    scfg = SparseLoRAConfig(ffn_sparsity=ffn, attn_sparsity=attn, selector=args.selector, estimator_rank=4, start_step=0)
    packed = args.batch == "packed"
    if packed:
        use_packed_attention(model)
    apply_sparselora(model, scfg, fast_kernels=True)
    g = torch.Generator().manual_seed(0)
    feats = []
    for _ in range(args.segments):
        n_prompt, n_answer = int(torch.randint(20, 60, (1,), generator=g)), int(torch.randint(10, 40, (1,), generator=g))
        ids = torch.randint(1, 256, (n_prompt + n_answer,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]})
    if packed:
        T = sum(len(f["input_ids"]) for f in feats) + 7
        batch = PackedCollator(pad_token_id=0, max_tokens=T)(pack_features(feats, max_tokens=T))
    else:  # padded rows, left padding
        T = max(len(f["input_ids"]) for f in feats)
        ids = torch.zeros(len(feats), T, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for i, f in enumerate(feats):
            n = len(f["input_ids"])
            ids[i, T - n:] = torch.tensor(f["input_ids"])
            labels[i, T - n:] = torch.tensor(f["labels"])
            mask[i, T - n:] = 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    return model, batch


def step(model, batch):
    loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def top_level_ops(prof) -> Counter:
    """aten ops not nested inside another aten op (forward and the autograd thread's backward)."""
    c: Counter = Counter()
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        p = e.cpu_parent
        while p is not None and not p.name.startswith("aten::"):
            p = p.cpu_parent
        if p is None:
            c[e.name] += 1
    return c


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--layers", choices=["math", "all"], default="math")
    p.add_argument("--selector", default="svd")
    p.add_argument("--batch", choices=["packed", "padded"], default="packed")
    p.add_argument("--segments", type=int, default=2)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--top", type=int, default=0, help="print the most frequent top-level ops of the sparse step")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, batch = build(args)
    from torch.profiler import ProfilerActivity, profile

    res = {}
    for sparse in (False, True):
        sparselora.set_enabled(model, sparse)
        for _ in range(3):
            step(model, batch)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(model, batch)
        ops = top_level_ops(prof)
        syncs = sum(1 for e in prof.events() if e.name == "aten::_local_scalar_dense")
        res[sparse] = {"ops": sum(ops.values()), "syncs": syncs, "counter": ops, "times": []}
    for _ in range(args.iters):  # interleaved, so drift hits both alike
        for sparse in (False, True):
            sparselora.set_enabled(model, sparse)
            t0 = time.perf_counter()
            step(model, batch)
            res[sparse]["times"].append(1e3 * (time.perf_counter() - t0))
    n_tok = batch["input_ids"].numel()
    print(f"{args.batch} batch {tuple(batch['input_ids'].shape)} ({n_tok} tokens), layers={args.layers}, "
          f"selector={args.selector}, hidden={args.hidden}, {args.num_layers} layers")
    for sparse in (False, True):
        r = res[sparse]
        print(f"{'sparse' if sparse else 'dense '}: {r['ops']:5d} top-level aten ops, {r['syncs']} host syncs, "
              f"median {statistics.median(r['times']):.2f} ms (min {min(r['times']):.2f}) fwd+bwd")
    ratio = statistics.median(s / d for s, d in zip(res[True]["times"], res[False]["times"]))
    print(f"sparse / dense: {res[True]['ops'] / res[False]['ops']:.3f} ops, {ratio:.3f} time (median of paired steps)")
    if args.top:
        for name, n in res[True]["counter"].most_common(args.top):
            print(f"  {n:5d} {name}  (dense {res[False]['counter'][name]})")


if __name__ == "__main__":
    main()
