"""Model shapes of the paper's setting with random weights, the paper's SparseLoRA preset for a shape and task,
and the facts a benchmark record carries (versions, commit, accelerator, where results go)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]  # the source checkout's root, when the package runs from one

# (architecture, config kwargs). Rope theta goes through the config's own normalisation (rope_parameters).
SHAPES: dict[str, tuple[str, dict]] = {
    "llama3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5)),
    "llama2-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                rope_theta=10000.0, max_position_embeddings=4096, rms_norm_eps=1e-5)),
    "mistral-7b": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=32768,
                                   rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-5,
                                   sliding_window=None)),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                 rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6)),
    # CPU smoke test: every code path, seconds not minutes.
    "tiny": ("llama", dict(hidden_size=128, intermediate_size=352, num_hidden_layers=6, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=4096, rope_theta=10000.0,
                           max_position_embeddings=2048, rms_norm_eps=1e-5)),
}


# The SparseLoRA preset the paper uses for a shape and a task; any other pair is benchmarked with 'scaled'.
PAPER_PRESETS: dict[tuple[str, str], str] = {
    ("llama3-8b", "math"): "llama3-8b-math10k",
    ("llama3-8b", "commonsense"): "llama3-8b-csr170k",
    ("llama3-8b", "code"): "llama3.1-8b-codefeedback",
    ("llama2-7b", "math"): "llama2-7b-math10k",
    ("llama2-7b", "commonsense"): "llama2-7b-csr170k",
}


def paper_preset(shape: str, task: str) -> str:
    """The paper's preset for ``shape`` on ``task`` (math, commonsense or its short name csr, code), else 'scaled'."""
    return PAPER_PRESETS.get((shape, "commonsense" if task == "csr" else task), "scaled")


def make_config(shape: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)} or pass a model folder")
    arch, kw = SHAPES[shape]
    cfg = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch](tie_word_embeddings=False, **kw)
    cfg.use_cache = False
    return cfg


def build_base_model(shape: str | None, model_path: str | None, device: torch.device, dtype=torch.bfloat16, seed=0):
    """The frozen base: a preset shape with random weights (the same for a seed), or a real checkpoint folder."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if model_path:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation="sdpa")
        model.to(device)
    else:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(make_config(shape), dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    model.requires_grad_(False)
    return model.train()


def save_random_model(shape: str, tokenizer_dir: str | os.PathLike, out: str | os.PathLike, seed: int = 0,
                      device: str | None = None) -> Path:
    """A model folder of ``shape`` with random bf16 weights and the tokenizer of ``tokenizer_dir`` (its vocabulary
    and special tokens replace the shape's), so that `sparselora finetune` can time a shape that has no real
    checkpoint here on real, tokenized data."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = make_config(shape)
    cfg.vocab_size = len(tok)
    for name in ("bos", "eos", "pad"):
        setattr(cfg, f"{name}_token_id", getattr(tok, f"{name}_token_id"))
    torch.manual_seed(seed)
    with torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    out = Path(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)  # its chat template too
    return out


def gpu_slug(device: torch.device) -> str:
    """A short file-name-safe name of the accelerator: 'h100', 'h200', ..., or 'cpu'."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    m = re.search(r"\b([a-z]\d{2,4}[a-z]?)\b", name.replace("nvidia", ""))
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    import peft
    import transformers

    import sparselora

    return {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "peft": peft.__version__, "liger": _version("liger-kernel"),
            "triton": _version("triton"), "sparselora": sparselora.__version__}


def in_checkout() -> bool:
    """Whether the package runs from a source checkout (not from an installed copy in site-packages)."""
    return (REPO / "pyproject.toml").is_file() and (REPO / "benchmarks").is_dir()


def results_dir() -> Path:
    """Where a benchmark writes its JSON unless told: benchmarks/results of the checkout, else the current folder."""
    return REPO / "benchmarks" / "results" if in_checkout() else Path.cwd()


def git_commit() -> str | None:
    """SPARSELORA_COMMIT when set (a copied checkout's .git may be stale), else the checkout's HEAD (+ -dirty);
    None for an installed package (whatever repository its site-packages may lie in is not its source)."""
    if os.environ.get("SPARSELORA_COMMIT"):
        return os.environ["SPARSELORA_COMMIT"]
    if not in_checkout():
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None
