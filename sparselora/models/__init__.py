"""Per-architecture knowledge: the registry (supported families, the block layout) and the aliases' configs
(configs/). Loading a model (folders, GGUF files, aliases) is `sparselora.loading`."""

from sparselora.models.registry import SUPPORTED_FAMILIES, ArchInfo, UnsupportedModelError, arch_info, causal_lm

__all__ = ["SUPPORTED_FAMILIES", "ArchInfo", "UnsupportedModelError", "arch_info", "causal_lm"]

_LOADING = ("ModelLoadError", "load_model", "resolve_model")


def __getattr__(name):  # `from sparselora.models import load_model` keeps working (it lives in sparselora.loading)
    if name in _LOADING:
        from sparselora import loading

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
