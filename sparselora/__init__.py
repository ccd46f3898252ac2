"""sparselora: faster LoRA fine-tuning by contextual sparsity (SparseLoRA, Khaki et al., ICML 2025).

    cfg = SparseLoRAConfig.from_preset("llama3-8b-math10k")
    model = apply_sparselora(peft_model, cfg)
"""

from sparselora.callback import SparseLoRACallback
from sparselora.config import SparseLoRAConfig
from sparselora.errors import SparseLoRAError
from sparselora.estimator import EstimatorCacheError
from sparselora.flop_count import flops
from sparselora.graphs import CUDAGraphStep
from sparselora.models.registry import UnsupportedModelError
from sparselora.ops.varlen import use_packed_attention
from sparselora.patch import (
    apply_sparselora,
    dense,
    kept_channels,
    remove_sparselora,
    schedule,
    set_enabled,
    sparsity_stats,
)

__version__ = "0.1.0"


def __getattr__(name):
    # transformers.Trainer costs half a second to import: only when asked for
    if name == "CUDAGraphTrainer":
        from sparselora.trainer import CUDAGraphTrainer

        return CUDAGraphTrainer
    raise AttributeError(f"module 'sparselora' has no attribute {name!r}")

__all__ = [
    "CUDAGraphStep",
    "CUDAGraphTrainer",
    "EstimatorCacheError",
    "SparseLoRACallback",
    "SparseLoRAConfig",
    "SparseLoRAError",
    "UnsupportedModelError",
    "apply_sparselora",
    "dense",
    "flops",
    "kept_channels",
    "remove_sparselora",
    "schedule",
    "set_enabled",
    "sparsity_stats",
    "use_packed_attention",
]
