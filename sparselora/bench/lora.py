"""LoRA models for the benchmarks: stock PEFT adapters on the paper's targets, several models over one frozen base
whose weights they share (never copy), and a checksum that tells whether a method edited that base in place."""

from __future__ import annotations

import copy
import hashlib

import torch

from sparselora.models.registry import ATTN_PROJS, PROJS, module_name

QKVO = [module_name(p) for p in ATTN_PROJS]  # LoRA targets of the paper's setting
ALL_PROJ = [module_name(p) for p in PROJS]


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
