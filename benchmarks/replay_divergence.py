"""Replay the first 32 training steps of benchmarks/accuracy.py (math, seed 1, plain PEFT LoRA, fp32 adapters on a
bf16 base) and print loss, gradient norm and the largest LoRA weight per step: where did the GPU run go NaN?

    python benchmarks/replay_divergence.py      # CPU, about 6 minutes on 2 cores
"""
import sys, torch, time
sys.path.insert(0, "benchmarks")
import accuracy as A
from pathlib import Path
from sparselora.loading import resolve_model
from sparselora.data import DataCollator
from transformers import AutoTokenizer, AutoModelForCausalLM
torch.set_num_threads(2)
path = resolve_model("qwen2.5-coder-0.5b")
tok = AutoTokenizer.from_pretrained(path)
args = A.parse_args(["--model", str(path), "--task", "math", "--data-dir", "/work/shared/data", "--max-steps", "150"])
pool = A.load_train_pool("math", Path("/work/shared/data"))
seed = 1
feats, batches, info = A.training_data(args, pool, tok, seed)
base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa")
base.requires_grad_(False)
model = A.lora_model(base, A.QKVO, 32, 64, seed, torch.float32)
collate = DataCollator(pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=3e-4)
fn, warm = A.lr_lambda(len(batches), 0.04)
sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
model.train()
t0 = time.time()
for step in range(32):
    b = collate([feats[i] for i in batches[step]])
    out = model(**b)
    out.loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
    pn = max(p.abs().max().item() for p in params)
    print(step, round(out.loss.item(), 4), "grad", round(gn.item(), 3), "max|w|", round(pn, 4), "lr", sched.get_last_lr()[0], f"{time.time()-t0:.0f}s", flush=True)
