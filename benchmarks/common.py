"""Helpers for the benchmark scripts: model shapes, batches, LoRA models over one shared base, the base
weights' checksum, timers, environment facts.

Shapes and environment facts come from `sparselora.bench.shapes` (the packaged Trainer benchmark uses them too).
"""

from __future__ import annotations

import copy
import hashlib
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python benchmarks/x.py` from a checkout, without installing
    sys.path.insert(0, str(REPO))

# -- model shapes (random bf16 weights) and environment facts: one home, shared with the packaged benchmark
from sparselora.bench.shapes import SHAPES, build_base_model, git_commit, gpu_slug, make_config, versions  # noqa: E402,F401
# JSON results are written by sparselora.io; the old name stays for the scripts that import it from here
from sparselora.io import atomic_write_json as write_json_atomic  # noqa: E402,F401
from sparselora.models.registry import ATTN_PROJS, PROJS, module_name  # noqa: E402
from sparselora.tokens import IGNORE_INDEX  # noqa: E402

# (batch, seq, labelled tokens at the end of each row): the shape of the paper's fine-tuning workloads.
QKVO = [module_name(p) for p in ATTN_PROJS]  # LoRA targets of the paper's setting
ALL_PROJ = [module_name(p) for p in PROJS]

BATCH_PRESETS: dict[str, tuple[int, int, int]] = {
    "math": (8, 512, 128),   # Math10K: long prompt, chain-of-thought answer
    "csr": (8, 512, 3),      # Commonsense170K: the answer is a word or two
    "code": (6, 1024, 512),  # CodeFeedback: long answers
}

# The SparseLoRA preset a shape/batch pair is benchmarked with unless --preset says otherwise.
DEFAULT_SPARSITY_PRESET = {
    ("llama3-8b", "math"): "llama3-8b-math10k",
    ("llama3-8b", "csr"): "llama3-8b-csr170k",
    ("llama3-8b", "code"): "llama3.1-8b-codefeedback",
    ("llama2-7b", "math"): "llama2-7b-math10k",
    ("llama2-7b", "csr"): "llama2-7b-csr170k",
}


def make_batch(vocab: int, batch: int, seq: int, labelled: int, device: torch.device, seed: int = 0) -> dict:
    """Random token ids (never 0, which is often a pad/special id); the last `labelled` tokens of each row
    carry labels, the rest are context (-100)."""
    if not 0 <= labelled <= seq:
        raise ValueError(f"labelled tokens ({labelled}) must lie in [0, seq={seq}]")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    labels = torch.full_like(ids, IGNORE_INDEX)
    if labelled:
        labels[:, seq - labelled:] = ids[:, seq - labelled:]
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


# -- LoRA models over one shared base ---------------------------------------------------------------------------
def shared_lora_model(base, target_modules, rank: int, alpha: float, seed: int):
    """A fresh module tree over ``base``'s weights (shared, never copied) wrapped by stock PEFT LoRA on
    ``target_modules`` (module names, e.g. q_proj), adapters initialised from ``seed``."""
    from peft import LoraConfig, get_peft_model

    memo = {id(p): p for p in base.parameters()}  # share, never copy, the frozen weights
    tree = copy.deepcopy(base, memo)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(target_modules),
                     bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    return get_peft_model(tree, cfg)


def cast_lora(model, dtype) -> None:
    """The LoRA adapters' weights in ``dtype`` (the base stays as it is)."""
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.to(dtype)


def base_checksum(model) -> str:
    """Exact-enough identity of every frozen tensor: float64 sum and sum of squares, hashed (a method that edits
    the shared base weights in place would corrupt the others)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            x = p.detach().double()
            h.update(f"{n}|{tuple(p.shape)}|{x.sum().item():.10e}|{x.square().sum().item():.10e}".encode())
    return h.hexdigest()[:20]


# -- timing ---------------------------------------------------------------------------------------------------
class Clock:
    """Marks points in a step; CUDA events on a GPU (no host sync inside the step), wall clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        """Milliseconds between consecutive marks (synchronizes the device once)."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def cuda_ms(fn) -> float:
    """Milliseconds of one call of ``fn`` on the GPU, between two CUDA events (waits for the second)."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
