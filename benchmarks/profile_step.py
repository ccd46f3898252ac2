"""Where does a SparseLoRA step spend its GPU time? A torch.profiler table of one shape, dense vs sparse.

    python benchmarks/profile_step.py --shape llama3-8b --batch-preset math --preset llama3-8b-math10k
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BATCH_PRESETS, build_base_model, cuda_ms, make_batch  # noqa: E402

import sparselora  # noqa: E402
from sparselora import SparseLoRAConfig, apply_sparselora  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--shape", default="llama3-8b")
p.add_argument("--batch-preset", default="math")
p.add_argument("--preset", default="llama3-8b-math10k")
p.add_argument("--rows", type=int, default=35)
p.add_argument("--trace", default=None, help="write a chrome trace here")
p.add_argument("--labelled", type=int, default=None, help="labelled tokens per row (default: the batch preset's)")
p.add_argument("--shapes", action="store_true", help="also a table of the sparse step's ops by input shape")
args = p.parse_args()

dev = torch.device("cuda")
base = build_base_model(args.shape, None, dev, torch.bfloat16)
model = get_peft_model(base, LoraConfig(r=32, lora_alpha=64, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
model.to(torch.bfloat16)
B, T, labelled = BATCH_PRESETS[args.batch_preset]
labelled = labelled if args.labelled is None else args.labelled
batch = make_batch(base.config.vocab_size, B, T, labelled, dev)
cfg = dataclasses.replace(SparseLoRAConfig.from_preset(args.preset), start_step=0)
torch.cuda.synchronize()
t0 = time.perf_counter()
apply_sparselora(model, cfg, fast_kernels=True)
torch.cuda.synchronize()
print(f"apply_sparselora (estimator build) {time.perf_counter() - t0:.1f} s")
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-5)


def step():
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


for sparse in (False, True):
    sparselora.set_enabled(model, sparse)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    ts = []
    for _ in range(10):
        ts.append(cuda_ms(step))
    print(f"{'sparse' if sparse else 'dense'}: median {sorted(ts)[5]:.1f} ms/step, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=args.shapes and sparse) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total" if False else "self_device_time_total", row_limit=args.rows, max_name_column_width=60))
    if args.shapes and sparse:
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="device_time_total", row_limit=60,
                                                                  max_name_column_width=30, max_shapes_column_width=70))
    if args.trace and sparse:
        prof.export_chrome_trace(args.trace)
