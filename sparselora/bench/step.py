"""Time one LoRA fine-tuning step (forward, backward, AdamW) of several methods on one base model, fixed batch.

The kernel-level view (`sparselora bench`); the Trainer-level one on real data lengths is sparselora/bench/train.py
(`sparselora bench --trainer`).

    sparselora bench --shape llama3-8b --batch-preset math --preset llama3-8b-math10k
    sparselora bench --shape tiny --device cpu          # smoke test, seconds
    (from a checkout, the same: python benchmarks/bench_step.py ...)

One frozen base model (random bf16 weights of a preset shape, or --model PATH) is built once. Each method
gets its own module tree that *shares* those base weight tensors (a deepcopy whose memo maps every base
parameter to itself), wrapped by PEFT with identically initialised LoRA adapters, plus its own patches and its
own AdamW. So five methods cost one base model plus five sets of adapters/optimizer state, and can be timed
interleaved (round-robin) in one process: clock and thermal drift hit every method alike.

Per method and step we record, with CUDA events (wall clock on CPU): forward, backward, optimizer, whole step;
the median over >= --steps measured steps after --warmup steps is reported. Peak memory is reported as if the
method ran alone: base weights + the method's own resident state (adapters, optimizer, anything its patches
keep) + the largest transient growth during its steps (activations, gradients).

Methods:
  peft        stock PEFT LoRA (get_peft_model: fp32 adapters on a bf16 base), SDPA attention, HF loss
  peft_liger  PEFT LoRA with bf16 adapters + liger-kernel RoPE, RMSNorm, SwiGLU and fused linear cross-entropy
  dense_fast  sparselora's patched model with sparsity switched off (its dense fast path)
  sparselora  sparselora with the preset's SVD estimator, sparse from step 0
  oracle      sparselora with oracle channel selection (true activations), sparse from step 0
  labelled    sparselora ranking channels by the labelled tokens' own dense activations (no estimator matmuls)
  *_graph     dense_fast / sparselora / labelled with forward + backward replayed from a CUDA graph
              (sparselora.CUDAGraphStep); their fwd column is forward + backward, bwd is 0
A method that cannot run here (liger on CPU, CUDA graphs without CUDA, out of memory) is reported as skipped
with the reason; the others still run.

Writes benchmarks/results/step-<shape>-<batch preset>-<gpu>.json in a checkout, else in the current folder.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

import sparselora
from sparselora.bench.lora import ALL_PROJ, QKVO, base_checksum, cast_lora, shared_lora_model
from sparselora.bench.shapes import SHAPES, build_base_model, git_commit, gpu_slug, paper_preset, results_dir, versions
from sparselora.bench.timing import Clock, median
from sparselora.io import atomic_write_json
from sparselora.models.registry import ATTN_PROJS, PROJS
from sparselora.tokens import IGNORE_INDEX

# Five methods with different activation shapes take turns on one GPU: expandable segments keep the caching
# allocator from fragmenting into an OOM. main() sets it (unless set) before anything touches CUDA; the JSON
# records it.
ALLOC_CONF = "expandable_segments:True"

# (batch, seq, labelled tokens at the end of each row): the shape of the paper's fine-tuning workloads.
BATCH_PRESETS: dict[str, tuple[int, int, int]] = {
    "math": (8, 512, 128),   # Math10K: long prompt, chain-of-thought answer
    "csr": (8, 512, 3),      # Commonsense170K: the answer is a word or two
    "code": (6, 1024, 512),  # CodeFeedback: long answers
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


ALL_METHODS = ["peft", "peft_liger", "dense_fast", "sparselora", "oracle", "labelled",
               "dense_fast_graph", "sparselora_graph", "labelled_graph"]
# an ablation of sparselora_graph, run only when named: no channel selection at all (each layer keeps the channels of
# its first call), the floor that the selection's cost inside the graphed step is read from
ABLATIONS = ["sparselora_graph_fixed_channels"]
GiB = 2**30


class Skip(Exception):
    """This method cannot run here; the message says why."""


@dataclasses.dataclass
class Method:
    name: str
    model: torch.nn.Module
    step: callable  # step(batch, clock) -> loss tensor (detached)
    flops: float | None = None
    flops_source: str | None = None
    notes: dict = dataclasses.field(default_factory=dict)
    selection_timer: object = None  # SelectionTimer for the sparselora methods


# -- shared pieces --------------------------------------------------------------------------------------------
class Bench:
    """What every method builder needs: the shared base, the LoRA config."""

    def __init__(self, args, base, device):
        self.args, self.base, self.device = args, base, device
        self.arch = base.config.model_type
        self._ref_lora: dict[str, torch.Tensor] | None = None
        self.estimator_dir = args.estimator_dir or tempfile.mkdtemp(prefix="sparselora-est-")

    def sparsity_config(self, **changes):
        name = self.args.preset
        kw = {"num_layers": self.base.config.num_hidden_layers} if name == "scaled" else {}
        cfg = sparselora.SparseLoRAConfig.from_preset(name, **kw)
        return dataclasses.replace(cfg, **changes) if changes else cfg

    def lora_model(self):
        """A fresh module tree over the shared base weights, wrapped by stock PEFT; every method's adapters
        start from the same values (B = 0, so every method's first loss is the base model's loss)."""
        targets = ALL_PROJ if self.args.lora_targets == "all" else QKVO
        model = shared_lora_model(self.base, targets, self.args.lora_r, self.args.lora_alpha, self.args.seed)
        lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
        with torch.no_grad():
            if self._ref_lora is None:
                self._ref_lora = {n: p.detach().cpu().clone() for n, p in lora.items()}
            else:
                for n, p in lora.items():
                    p.copy_(self._ref_lora[n])
        return model.train()


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def adapter_dtype(model) -> str | None:
    for n, p in model.named_parameters():
        if "lora_" in n and p.requires_grad:
            return str(p.dtype).replace("torch.", "")
    return None


def make_step(model, params, ctx=contextlib.nullcontext):
    """The timed unit: forward (model returns the loss), backward, AdamW step + zero_grad."""
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

    def step(batch, clock):
        with ctx():
            clock.mark()
            loss = model(**batch).loss
            clock.mark()
            loss.backward()
            clock.mark()
            opt.step()
            opt.zero_grad(set_to_none=True)
            clock.mark()
        return loss.detach()

    return step


def make_graph_step(model, params, ctx=contextlib.nullcontext):
    """The timed unit with forward + backward from sparselora.CUDAGraphStep (captured on the first call)."""
    from sparselora import CUDAGraphStep

    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    graph_step = CUDAGraphStep(model)

    def step(batch, clock):
        clock.mark()
        with ctx():
            loss = graph_step(**batch)
        clock.mark()
        clock.mark()
        opt.step()
        opt.zero_grad(set_to_none=True)
        clock.mark()
        return loss

    step.graph_step = graph_step
    return step


@contextlib.contextmanager
def swapped_globals(module, replacements: dict):
    """Temporarily rebind names in a module (liger's RoPE is a module-level function swap)."""
    saved = {k: getattr(module, k) for k in replacements}
    for k, v in replacements.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(module, k, v)


@contextlib.contextmanager
def swapped_in(swaps):
    """`swapped_globals` for several modules at once: ``swaps`` is (module, replacements) pairs."""
    with contextlib.ExitStack() as stack:
        for module, replacements in swaps:
            stack.enter_context(swapped_globals(module, replacements))
        yield


@contextlib.contextmanager
def restored_globals(module):
    """Undo any module-level rebinding done inside (liger swaps classes in transformers' modeling file)."""
    saved = dict(vars(module))
    try:
        yield
    finally:
        for k, v in saved.items():
            if vars(module).get(k) is not v:
                setattr(module, k, v)


# -- FLOPs ----------------------------------------------------------------------------------------------------
def library_flops(bench, sparsity_cfg, use_sparse: bool, labelled_only_head: bool = False):
    """FLOPs per step from `sparselora.flops(model_config, sparsity_config, batch_shape, labelled_tokens)`
    (a dict with 'dense' and 'sparse'); None, with the reason, where it cannot be computed."""
    a = bench.args
    try:
        if sparsity_cfg is None:
            sparsity_cfg = bench.sparsity_config()
        targets = PROJS if a.lora_targets == "all" else ATTN_PROJS
        out = sparselora.flops(bench.base.config, sparsity_cfg, (a.batch_size, a.seq), a.labelled,
                               lora_rank=a.lora_r, lora_targets=targets, labelled_only_head=labelled_only_head)
        return float(out["sparse" if use_sparse else "dense"]), "sparselora.flops"
    except Exception as e:  # noqa: BLE001
        return None, f"unavailable ({type(e).__name__}: {e})"


# -- methods --------------------------------------------------------------------------------------------------
def build_peft(bench: Bench) -> Method:
    model = bench.lora_model()
    flops, src = library_flops(bench, None, use_sparse=False)
    return Method("peft", model, make_step(model, trainable(model)), flops, src)


def build_peft_liger(bench: Bench) -> Method:
    if bench.device.type != "cuda":
        raise Skip("liger-kernel's Triton kernels need CUDA")
    try:
        import liger_kernel.transformers as lk
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except Exception as e:  # noqa: BLE001
        raise Skip(f"liger-kernel does not import: {type(e).__name__}: {e}") from e
    apply = {"llama": lk.apply_liger_kernel_to_llama, "qwen2": lk.apply_liger_kernel_to_qwen2}.get(bench.arch)
    if apply is None:
        raise Skip(f"no liger patch wired up for model_type {bench.arch!r}")
    modeling = sys.modules[type(bench.base).__module__]

    model = bench.lora_model()
    cast_lora(model, torch.bfloat16)
    # Instance-level patches (RMSNorm, SwiGLU forward, fused linear CE forward) touch only this tree; liger
    # also rebinds classes in transformers' modeling module, which we undo so other methods stay stock.
    with restored_globals(modeling):
        apply(rope=False, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=True, swiglu=True,
              model=model.get_base_model())
    # RoPE is a module-level function in HF: swap it in only while this method's step runs.
    ctx = lambda: swapped_globals(modeling, {"apply_rotary_pos_emb": liger_rotary_pos_emb})  # noqa: E731
    flops, src = library_flops(bench, None, use_sparse=False)
    return Method("peft_liger", model, make_step(model, trainable(model), ctx), flops, src,
                  {"adapter_dtype": "bfloat16"})


class FixedChannels:
    """The library's selection functions replaced by the channels each layer chose on its first call: a step with
    the same sparse work and no selection at all."""

    def __init__(self):
        import sparselora.modules.attention as attention_module
        import sparselora.modules.mlp as mlp_module

        self.kept: dict[tuple[str, int], object] = {}
        # keyed by the module (FFN: its gate_proj) or bound forward (attention: q's) each layer passes
        self.swaps = [(mlp_module, {"select_ffn": self._cached(mlp_module.select_ffn, 3)}),
                      (attention_module, {"select_attention": self._cached(attention_module.select_attention, 5)})]

    def _cached(self, fn, key_arg: int):
        def cached(*args, **kwargs):
            key = (fn.__name__, id(args[key_arg]))
            if key not in self.kept:
                self.kept[key] = fn(*args, **kwargs)
            return self.kept[key]
        return cached

    def active(self):
        return swapped_in(self.swaps)


def _build_sparselora(bench: Bench, name: str, enabled: bool, graph: bool = False, ctx=contextlib.nullcontext,
                      **changes) -> Method:
    cfg = bench.sparsity_config(start_step=0, **changes)  # sparse from the first timed step
    model = bench.lora_model()
    if bench.args.sl_adapters == "bf16":
        cast_lora(model, torch.bfloat16)
    kw = {"estimator_dir": bench.estimator_dir}  # dense_fast and sparselora share one SVD build
    if not bench.args.no_fast_kernels:
        kw["fast_kernels"] = True  # fused norm/activation (liger on CUDA), labelled-only head + loss
    model = sparselora.apply_sparselora(model, cfg, **kw)
    sparselora.set_enabled(model, enabled)
    flops, src = library_flops(bench, cfg, use_sparse=enabled, labelled_only_head=kw.get("fast_kernels", False))
    if graph:
        if bench.device.type != "cuda":
            raise Skip("CUDA graphs need a CUDA device")
        return Method(name, model, make_graph_step(model, trainable(model), ctx), flops, src,
                      {"sparsity_config": _cfg_dict(cfg), "cuda_graph": True})
    timer = SelectionTimer(bench.device)
    m = Method(name, model, make_step(model, trainable(model), timer.active), flops, src,
               {"sparsity_config": _cfg_dict(cfg)})
    m.selection_timer = timer
    return m


def _cfg_dict(cfg):
    return cfg.to_dict()


def build_dense_fast(bench):
    return _build_sparselora(bench, "dense_fast", enabled=False)


def build_sparselora(bench):
    return _build_sparselora(bench, "sparselora", enabled=True)


def build_oracle(bench):
    return _build_sparselora(bench, "oracle", enabled=True, selector="oracle")


def build_labelled(bench):
    return _build_sparselora(bench, "labelled", enabled=True, selector="labelled")


BUILDERS = {"peft": build_peft, "peft_liger": build_peft_liger, "dense_fast": build_dense_fast,
            "sparselora": build_sparselora, "oracle": build_oracle, "labelled": build_labelled,
            "dense_fast_graph": lambda b: _build_sparselora(b, "dense_fast_graph", enabled=False, graph=True),
            "sparselora_graph": lambda b: _build_sparselora(b, "sparselora_graph", enabled=True, graph=True),
            "labelled_graph": lambda b: _build_sparselora(b, "labelled_graph", enabled=True, graph=True,
                                                          selector="labelled"),
            "sparselora_graph_fixed_channels": lambda b: _build_sparselora(
                b, "sparselora_graph_fixed_channels", enabled=True, graph=True, ctx=FixedChannels().active)}


class SelectionTimer:
    """Bench-side estimator timing: while a sparselora step runs, the library's channel-selection functions
    (SVD estimate or oracle activations, then top-k) are wrapped with timers (CUDA events on a GPU).
    Relies on internal names (sparselora.modules.{mlp,attention}.select_*); absent names -> no timing."""

    TARGETS = (("sparselora.modules.mlp", "select_ffn"), ("sparselora.modules.mlp", "select_ffn_from_activations"),
               ("sparselora.modules.attention", "select_attention"))

    def __init__(self, device):
        self.clock = Clock(device)
        self.wrapped = {}
        for mod_name, fn_name in self.TARGETS:
            mod = sys.modules.get(mod_name)
            if mod is not None and callable(getattr(mod, fn_name, None)):
                self.wrapped.setdefault(mod, {})[fn_name] = self._timed(getattr(mod, fn_name))

    def _timed(self, fn):
        def timed(*args, **kwargs):
            self.clock.mark()
            out = fn(*args, **kwargs)
            self.clock.mark()
            return out
        return timed

    def active(self):
        return swapped_in(self.wrapped.items())

    def pop_ms(self) -> float | None:
        if not self.wrapped:
            return None
        iv = self.clock.intervals_ms()
        self.clock.reset()
        return float(sum(iv[0::2]))  # (start, end) pairs; odd intervals are the gaps between calls


def estimator_ms(bench: Bench, method: Method) -> float | None:
    """Milliseconds the sparsity estimator (channel selection) took in the step that just ran, from the
    bench-side `SelectionTimer`."""
    timer = getattr(method, "selection_timer", None)
    return None if timer is None else timer.pop_ms()


# -- the run --------------------------------------------------------------------------------------------------
def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Runner:
    def __init__(self, bench: Bench, batch: dict):
        self.bench, self.batch, self.device = bench, batch, bench.device
        self.cuda = self.device.type == "cuda"
        self.base_bytes = torch.cuda.memory_allocated() if self.cuda else 0
        self.rec: dict[str, dict] = {}
        self.methods: dict[str, Method] = {}

    def _allocated(self):
        return torch.cuda.memory_allocated() if self.cuda else 0

    def build(self, name):
        """Build a method and run its warm-up steps (the first records the step-one loss)."""
        rec = self.rec.setdefault(name, {"losses": [], "steps": [], "transient": 0})
        before, t0 = self._allocated(), time.perf_counter()
        ref = base_checksum(self.bench.base)
        reason = tb = m = None
        try:
            m = BUILDERS[name](self.bench)
            if ref != base_checksum(self.bench.base):
                rec["warning"] = "building this method changed the shared base weights in place"
            rec["build_s"] = round(time.perf_counter() - t0, 3)
            rec["adapter_dtype"] = adapter_dtype(m.model)
            rec.update(m.notes)
            self.methods[name] = m
            for _ in range(self.bench.args.warmup):
                self.run_step(name, record=False)
            rec["own_resident_bytes"] = self._allocated() - before
        except Skip as e:
            reason = f"skipped: {e}"
        except Exception as e:  # noqa: BLE001 - one method's failure must not sink the benchmark
            reason, tb = f"failed: {type(e).__name__}: {e}", traceback.format_exc()
        if reason:  # outside the except block, so the exception's frames (activations) can be freed
            m = None  # noqa: F841
            self.drop(name, reason, tb)

    def drop(self, name, reason, tb=None):
        self.methods.pop(name, None)
        self.rec[name] = {"skipped": reason, **({"traceback": tb} if tb else {})}
        free(self.device)
        print(f"[{name}] {reason}", flush=True)

    def run_step(self, name, record=True):
        m, rec = self.methods[name], self.rec[name]
        clock = Clock(self.device)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        loss = m.step(self.batch, clock)
        fwd, bwd, opt = clock.intervals_ms()  # synchronizes
        if self.cuda and record:  # warm-up excluded: its first step also allocates the optimizer state
            rec["transient"] = max(rec["transient"], torch.cuda.max_memory_allocated() - before)
            rec["process_peak"] = max(rec.get("process_peak", 0), torch.cuda.max_memory_allocated())
        rec["losses"].append(float(loss))
        est = estimator_ms(self.bench, m)
        if record:
            rec["steps"].append({"fwd": fwd, "bwd": bwd, "opt": opt, "step": fwd + bwd + opt, "est": est})

    def safe_step(self, name):
        try:
            self.run_step(name)
            return
        except Exception as e:  # noqa: BLE001 (OOM included)
            reason, tb = f"failed: {type(e).__name__}: {e}", traceback.format_exc()
        self.drop(name, reason, tb)

    def summary(self, name):
        rec = self.rec[name]
        if "skipped" in rec:
            return rec
        m, a = self.methods.get(name), self.bench.args
        s = rec.pop("steps")
        out = {k: median([x[k] for x in s]) for k in ("step", "fwd", "bwd", "opt")}
        out = {f"{k}_ms": v for k, v in out.items()}
        out["estimator_ms"] = median([x["est"] for x in s])
        out["measured_steps"] = len(s)
        # a CUDA graph keeps its activations reserved in a private pool between steps: count its capture's peak
        graph_bytes = getattr(getattr(m.step, "graph_step", None), "graph_peak_bytes", 0) if m else 0
        out["peak_gib"] = ((self.base_bytes + rec.pop("own_resident_bytes", 0) + max(rec.pop("transient"), graph_bytes))
                           / GiB if self.cuda else None)
        out["process_peak_gib"] = rec.pop("process_peak", 0) / GiB if self.cuda else None
        out["flops_per_step"] = m.flops if m else None
        out["flops_source"] = m.flops_source if m else None
        tfl = m.flops / (out["step_ms"] * 1e-3) / 1e12 if m and m.flops and out["step_ms"] else None
        out["tflops"] = tfl
        out["mfu"] = tfl / a.peak_tflops if tfl else None
        out["first_loss"] = rec["losses"][0] if rec["losses"] else None
        out.update(rec)
        return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="sparselora bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES), help="random-weight model shape")
    p.add_argument("--model", default=None, help="a real model folder instead of --shape")
    p.add_argument("--batch-preset", default="math", choices=sorted(BATCH_PRESETS))
    p.add_argument("--batch", default=None, help="BxT, overrides the preset's shape, e.g. 8x512")
    p.add_argument("--labelled", type=int, default=None, help="labelled tokens at the end of each row")
    p.add_argument("--preset", default=None,
                   help="SparseLoRA preset (default: the one matching shape and batch preset, else 'scaled')")
    p.add_argument("--methods", default=",".join(ALL_METHODS),
                   help=f"comma list from {ALL_METHODS}, or the ablations {ABLATIONS}")
    p.add_argument("--lora-targets", default="qkvo", choices=["qkvo", "all"], help="q,k,v,o or all seven")
    p.add_argument("--lora-r", type=int, default=32)
    p.add_argument("--lora-alpha", type=int, default=64)
    p.add_argument("--no-fast-kernels", action="store_true", help="sparselora methods without fast_kernels=True")
    p.add_argument("--sl-adapters", default="bf16", choices=["peft", "bf16"],
                   help="adapter dtype for dense_fast/sparselora/oracle: as PEFT makes them (fp32) or cast to bf16")
    p.add_argument("--steps", type=int, default=20, help="measured steps per method (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per method (the first gives loss@1)")
    p.add_argument("--rounds", type=int, default=5, help="round-robin rounds the measured steps are split into")
    p.add_argument("--sequential", action="store_true",
                   help="build, time and free one method at a time (no interleaving; for tight memory)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cpu-threads", type=int, default=1,
                   help="torch threads on CPU (1: the smoke test stays quick on a busy machine)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="for MFU: H100 SXM bf16 dense spec (measured matmul ceiling is about 790)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--estimator-dir", default=None, help="SVD estimator cache (default: a fresh temp dir)")
    p.add_argument("--out", default=None,
                   help="JSON path (default step-<shape>-<batch>-<gpu>.json in benchmarks/results of a checkout,"
                        " else in the current folder)")
    a = p.parse_args(argv)
    b, t, lab = BATCH_PRESETS[a.batch_preset]
    if a.shape == "tiny" and not a.model:  # smoke-test size: the preset's proportions, a 16th of the tokens
        b, t, lab = min(b, 2), t // 4, min(lab, t // 16)
    if a.batch:
        b, t = (int(x) for x in a.batch.lower().split("x"))
    a.batch_size, a.seq = b, t
    a.labelled = a.labelled if a.labelled is not None else min(lab, t)
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = sorted(set(a.methods) - set(ALL_METHODS) - set(ABLATIONS))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {ALL_METHODS + ABLATIONS}")
    if a.preset is None:  # a real checkpoint gets the depth-generic preset unless told otherwise
        a.preset = "scaled" if a.model else paper_preset(a.shape, a.batch_preset)
    return a


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def print_table(res):
    ms = res["methods"]
    ref = {k: ms.get(k, {}).get("step_ms") for k in ("peft", "peft_liger")}
    head = (f"{'method':<11} {'step ms':>8} {'fwd':>7} {'bwd':>7} {'opt':>6} {'est ms':>6} {'peak GiB':>8} "
            f"{'TFLOP/s':>7} {'MFU':>5} {'x peft':>6} {'x liger':>7} {'loss@1':>8}")
    print("\n" + head + "\n" + "-" * len(head))
    for name, r in ms.items():
        if "skipped" in r:
            print(f"{name:<11} {r['skipped']}")
            continue
        sp = {k: (v / r["step_ms"] if v and r["step_ms"] else None) for k, v in ref.items()}
        print(f"{name:<11} {fmt(r['step_ms']):>8} {fmt(r['fwd_ms']):>7} {fmt(r['bwd_ms']):>7} "
              f"{fmt(r['opt_ms']):>6} {fmt(r['estimator_ms']):>6} {fmt(r['peak_gib']):>8} {fmt(r['tflops']):>7} "
              f"{fmt(r['mfu'], '.0%') if r['mfu'] else '-':>5} {fmt(sp['peft'], '.2f'):>6} "
              f"{fmt(sp['peft_liger'], '.2f'):>7} {fmt(r['first_loss'], '.4f'):>8}")


def main(argv=None):
    a = parse_args(argv)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)  # read when CUDA's allocator starts, not before
    device = torch.device(a.device)
    if device.type == "cpu":
        torch.set_num_threads(a.cpu_threads)
    t0 = time.perf_counter()
    base = build_base_model(None if a.model else a.shape, a.model, device, seed=a.seed)
    shape_name = Path(a.model).name if a.model else a.shape
    print(f"base {shape_name}: {sum(p.numel() for p in base.parameters()) / 1e9:.2f}B params on {device} "
          f"({time.perf_counter() - t0:.1f}s); batch {a.batch_size}x{a.seq}, last {a.labelled} labelled; "
          f"preset {a.preset}", flush=True)
    batch = make_batch(base.config.vocab_size, a.batch_size, a.seq, a.labelled, device, seed=a.seed)
    bench = Bench(a, base, device)
    run = Runner(bench, batch)
    per_round = max(1, math.ceil(a.steps / a.rounds))

    def time_rounds(names):
        for _ in range(a.rounds):
            for n in names:
                for _ in range(per_round):
                    if n in run.methods:
                        run.safe_step(n)

    if a.sequential:
        summaries = {}
        for n in a.methods:
            run.build(n)
            time_rounds([n])
            summaries[n] = run.summary(n)
            run.methods.pop(n, None)
            free(device)
    else:
        for n in a.methods:
            run.build(n)
        time_rounds([n for n in a.methods if n in run.methods])
        summaries = {n: run.summary(n) for n in a.methods}

    res = {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": shape_name,
        "batch": {"batch_size": a.batch_size, "seq": a.seq, "labelled_per_row": a.labelled,
                  "tokens": a.batch_size * a.seq},
        "batch_preset": a.batch_preset,
        "preset": a.preset,
        "lora": {"r": a.lora_r, "alpha": a.lora_alpha, "dropout": 0.0, "targets": a.lora_targets,
                 "sparselora_adapters": a.sl_adapters},
        "timing": {"steps": a.steps, "warmup": a.warmup, "rounds": a.rounds,
                   "interleaved": not a.sequential, "clock": "cuda events" if device.type == "cuda" else "wall"},
        "peak_tflops": a.peak_tflops,
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "versions": versions(),
        "commit": git_commit(),
        "methods": summaries,
    }
    if not a.estimator_dir:
        shutil.rmtree(bench.estimator_dir, ignore_errors=True)
    print_table(res)
    out = Path(a.out) if a.out else results_dir() / f"step-{shape_name}-{a.batch_preset}-{gpu_slug(device)}.json"
    atomic_write_json(out, res)
    print(f"\nwrote {out}  ({time.perf_counter() - t0:.1f}s total)")
    return res


if __name__ == "__main__":
    main()
