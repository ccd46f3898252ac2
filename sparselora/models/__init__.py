"""Per-architecture knowledge (registry) and model loading (local folder, GGUF, packaged aliases)."""

from sparselora.models.registry import SUPPORTED_FAMILIES, ArchInfo, UnsupportedModelError, arch_info, causal_lm

__all__ = ["SUPPORTED_FAMILIES", "ArchInfo", "UnsupportedModelError", "arch_info", "causal_lm"]
from sparselora.models.loading import ModelLoadError, load_model, resolve_model  # noqa: E402

__all__ += ["ModelLoadError", "load_model", "resolve_model"]
