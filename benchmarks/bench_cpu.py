"""CPU benchmark: forward+backward of a mid-size random Llama, dense LoRA vs SparseLoRA, side by side.

    python benchmarks/bench_cpu.py            # hidden 1024, intermediate 4096, 8 layers, batch 4x256, 64 labelled

Both variants share one base model and take turns (interleaved), so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import sparselora
from sparselora import SparseLoRAConfig, apply_sparselora, flops
from sparselora.io import atomic_write_json
from sparselora.tokens import IGNORE_INDEX

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--hidden", type=int, default=1024)
p.add_argument("--intermediate", type=int, default=4096)
p.add_argument("--layers", type=int, default=8)
p.add_argument("--batch", default="4x256")
p.add_argument("--labelled", type=int, default=64)
p.add_argument("--ffn", type=float, default=0.9)
p.add_argument("--attn", type=float, default=0.5)
p.add_argument("--steps", type=int, default=10)
p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
p.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu-step.json"))
args = p.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

B, T = (int(v) for v in args.batch.split("x"))
config = LlamaConfig(
    hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
    num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256), vocab_size=32000,
    attn_implementation="sdpa",
)
torch.manual_seed(0)
model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
layers = f"0-{args.layers - 1}"
cfg = SparseLoRAConfig(ffn_sparsity={layers: args.ffn}, attn_sparsity={layers: args.attn}, start_step=0)
apply_sparselora(model, cfg)

ids = torch.randint(1, 32000, (B, T))
labels = torch.full_like(ids, IGNORE_INDEX)
labels[:, -args.labelled :] = ids[:, -args.labelled :]
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def step(sparse: bool) -> float:
    sparselora.set_enabled(model, sparse)
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    model(**batch).loss.backward()
    return time.perf_counter() - t0


times = {"dense": [], "sparse": []}
step(False), step(True)  # warm-up
for _ in range(args.steps):
    for name in times:
        times[name].append(step(name == "sparse"))

f = flops(config, cfg, (B, T), args.labelled, lora_rank=16)
med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
print(f"{'':8s} {'ms/step':>9s} {'GFLOP':>8s} {'GFLOP/s':>8s}")
for name, key in (("dense", "dense"), ("sparse", "sparse")):
    print(f"{name:8s} {med[name]:9.1f} {f[key] / 1e9:8.1f} {f[key] / 1e9 / (med[name] / 1e3):8.1f}")
print(f"speed-up {med['dense'] / med['sparse']:.2f}x  (FLOP ratio {f['ratio']:.3f}, bound {1 / f['ratio']:.2f}x)")
atomic_write_json(args.out, {
    "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
    "versions": {"torch": torch.__version__, "sparselora": sparselora.__version__},
    "args": vars(args), "step_ms": med, "speedup": med["dense"] / med["sparse"], "flops": f,
})
