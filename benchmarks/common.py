"""Helpers for the benchmark scripts: model shapes, batches, timers, environment facts, JSON output.

Nothing here imports `sparselora`; the scripts treat the library as optional so that a benchmark of the
baselines still runs while (or where) the library is missing a feature.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python benchmarks/x.py` from a checkout, without installing
    sys.path.insert(0, str(REPO))

# -- model shapes (random bf16 weights) -----------------------------------------------------------------------
# (architecture, config kwargs). Rope theta goes through the config's own normalisation (rope_parameters).
SHAPES: dict[str, tuple[str, dict]] = {
    "llama3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5)),
    "llama2-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                rope_theta=10000.0, max_position_embeddings=4096, rms_norm_eps=1e-5)),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                 rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6)),
    # CPU smoke test: every code path, seconds not minutes.
    "tiny": ("llama", dict(hidden_size=128, intermediate_size=352, num_hidden_layers=6, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=4096, rope_theta=10000.0,
                           max_position_embeddings=2048, rms_norm_eps=1e-5)),
}

# (batch, seq, labelled tokens at the end of each row): the shape of the paper's fine-tuning workloads.
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]  # LoRA targets of the paper's setting
ALL_PROJ = QKVO + ["gate_proj", "up_proj", "down_proj"]

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


def make_config(shape: str):
    from transformers import LlamaConfig, Qwen2Config

    arch, kw = SHAPES[shape]
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    cfg = cls(tie_word_embeddings=False, **kw)
    cfg.use_cache = False
    return cfg


def build_base_model(shape: str | None, model_path: str | None, device: torch.device, dtype=torch.bfloat16, seed=0):
    """The frozen base: a preset shape with random weights, or a real checkpoint folder."""
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


def make_batch(vocab: int, batch: int, seq: int, labelled: int, device: torch.device, seed: int = 0) -> dict:
    """Random token ids (never 0, which is often a pad/special id); the last `labelled` tokens of each row
    carry labels, the rest are context (-100)."""
    if not 0 <= labelled <= seq:
        raise ValueError(f"labelled tokens ({labelled}) must lie in [0, seq={seq}]")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    labels = torch.full_like(ids, -100)
    if labelled:
        labels[:, seq - labelled:] = ids[:, seq - labelled:]
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


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


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# -- environment ----------------------------------------------------------------------------------------------
def gpu_slug(device: torch.device) -> str:
    """A short file-name-safe name of the accelerator: 'h100', 'h200', ..., or 'cpu'."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    m = re.search(r"\b([a-z]\d{2,4}[a-z]?)\b", name.replace("nvidia", ""))
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    import peft
    import transformers

    sl = _version("sparselora")
    if sl is None:
        try:
            import sparselora

            sl = getattr(sparselora, "__version__", "source checkout")
        except Exception:  # noqa: BLE001 - the library may be mid-rewrite; the record says so
            sl = None
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "liger": _version("liger-kernel"),
        "triton": _version("triton"),
        "sparselora": sl,
    }


def git_commit() -> str | None:
    """SPARSELORA_COMMIT when set (a copied checkout's .git may be stale: the GPU machine's was), else git's HEAD."""
    if os.environ.get("SPARSELORA_COMMIT"):
        return os.environ["SPARSELORA_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def write_json_atomic(path: str | Path, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
