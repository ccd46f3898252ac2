"""Helpers for the benchmark scripts, re-exported from their one home in the package (`sparselora.bench`, which
`sparselora bench` runs from an installed copy too):

    sparselora.bench.shapes  model shapes (random bf16 weights), the paper's preset for a shape and task, versions,
                             commit, accelerator name
    sparselora.bench.lora    PEFT LoRA models over one shared base, the base weights' checksum, the LoRA targets
    sparselora.bench.timing  Clock (CUDA events / wall clock), cuda_ms, median
    sparselora.bench.step    the fixed-batch presets and random batches of the step benchmark
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python benchmarks/x.py` from a checkout, without installing
    sys.path.insert(0, str(REPO))

from sparselora.bench.lora import ALL_PROJ, QKVO, base_checksum, cast_lora, shared_lora_model  # noqa: E402,F401
from sparselora.bench.shapes import (  # noqa: E402,F401
    SHAPES,
    build_base_model,
    git_commit,
    gpu_slug,
    make_config,
    paper_preset,
    versions,
)
from sparselora.bench.step import BATCH_PRESETS, make_batch  # noqa: E402,F401
from sparselora.bench.timing import Clock, cuda_ms, median  # noqa: E402,F401
# JSON results are written by sparselora.io; the old name stays for the scripts that import it from here
from sparselora.io import atomic_write_json as write_json_atomic  # noqa: E402,F401
