"""Accuracy of LoRA fine-tuning dense vs SparseLoRA on real data (issue 3): train, evaluate, record.

    python benchmarks/accuracy.py --model PATH --task math --data-dir ../shared/data --max-steps 150 \
        --methods base:0,dense,sparselora,oracle:0,dense_all7:0,sparselora_all7:0 --seeds 0,1
    python benchmarks/accuracy.py --model qwen2.5-coder-0.5b --task math --plan      # numbers only, no training

One process loads the base model once (bf16, CUDA when available) and, for each (method, seed), builds a
fresh module tree that *shares* the frozen base tensors (deepcopy with a memo mapping every base parameter to
itself), wraps it with PEFT LoRA (r=32, alpha=64, dropout 0; q,k,v,o, or all seven projections for the
``_all7`` methods), trains it with a plain loop (AdamW on the LoRA parameters, linear warm-up then cosine,
gradient clipping at 1.0, the same seed, data order and hyper-parameters for every method), removes
SparseLoRA, evaluates it with `sparselora.evaluate.evaluate` (greedy, left padding, large batches) and drops
it. The base weights are checksummed before and after every run; a change aborts the script.

Methods: ``base`` (no training), ``dense`` (plain LoRA), ``sparselora`` (SVD estimator), ``oracle`` (true
activations choose the channels), ``random`` (ablation), and ``<method>_all7`` (LoRA on q,k,v,o,gate,up,down).
``name:SEEDS`` overrides ``--seeds`` for one method (``oracle:0``, ``dense:0+1``).

Resumable: the JSON is rewritten atomically after every (method, seed); a restart with the same
result-affecting settings skips the pairs already done (errors are retried). A failing run is recorded with
its error and the script goes on. ``--deadline SECONDS`` stops before a run that would not finish in time.
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import math
import os
import random
import statistics
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, Clock, base_checksum, cast_lora, git_commit, gpu_slug, shared_lora_model, versions  # noqa: E402,F401
from sparselora.io import atomic_write_json  # noqa: E402
from sparselora.models.registry import ATTN_PROJS, PROJS, module_name  # noqa: E402
from sparselora.tokens import IGNORE_INDEX  # noqa: E402

QKVO = ATTN_PROJS
ALL7 = PROJS
MODULE = {p: module_name(p) for p in ALL7}
BASE_METHODS = {"base": None, "dense": None, "sparselora": "svd", "oracle": "oracle", "labelled": "labelled",
                "random": "random"}

COMMONSENSE_TRAIN = ("boolq", "arc_easy", "arc_challenge", "openbookqa")
COMMONSENSE_TEST = ("boolq", "piqa", "social_i_qa", "winogrande", "arc_easy", "openbookqa")
TEST_SUBSET_SEED = 12345  # the same test subset for every method and seed
TARGET_RATIO = 0.55
FFN_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99)
ATTN_GRID = (0.0, 0.25, 0.5, 0.75)

# Rough H100 constants for --plan (Qwen2.5-0.5B, eager PyTorch, bf16): measured numbers replace them once a
# run has recorded step_ms / eval seconds. Override with --est-step-ms / --est-token-ms.
EST_STEP_MS = 110.0      # one 8x512 LoRA step (fwd+bwd+AdamW); small models are launch-bound, not FLOP-bound
EST_TOKEN_MS = 30.0      # one decoding step of HF generate, any batch up to ~2k rows on an H100
EST_LOAD_S = 25.0        # python + torch + transformers import, model load, CUDA init


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


# ----------------------------------------------------------------------------------------------- methods
def parse_methods(spec: str, seeds: list[int]) -> list[tuple[str, list[int]]]:
    out = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        name, _, sd = item.partition(":")
        base = name[:-5] if name.endswith("_all7") else name
        if base not in BASE_METHODS or name == "base_all7":
            raise SystemExit(f"unknown method {name!r}; choose from {sorted(BASE_METHODS)} (+ '_all7' variants)")
        s = [int(x) for x in sd.replace("/", "+").split("+")] if sd else list(seeds)
        if name == "base":
            s = s[:1]  # greedy evaluation of the untrained model: one run says it all
        out.append((name, s))
    return out


def method_info(name: str) -> dict:
    all7 = name.endswith("_all7")
    base = name[:-5] if all7 else name
    return {"train": base != "base", "selector": BASE_METHODS[base],
            "targets": list(ALL7 if all7 else QKVO)}


def run_order(methods: list[tuple[str, list[int]]]) -> list[tuple[str, int]]:
    """Seed-major: every method's first seed before any second seed, so a cut-short budget still compares."""
    seeds = sorted({s for _, ss in methods for s in ss}, key=lambda s: min(ss.index(s) for _, ss in methods if s in ss))
    return [(m, s) for s in seeds for m, ss in methods if s in ss]


# ------------------------------------------------------------------------------------------------ data
def train_files(task: str, data_dir: Path) -> list[Path]:
    if task == "math":
        return [data_dir / "gsm8k" / "train.jsonl"]
    return [data_dir / "commonsense" / f"{n}_train.json" for n in COMMONSENSE_TRAIN]


def test_files(task: str, data_dir: Path) -> dict[str, Path]:
    if task == "math":
        return {"gsm8k": data_dir / "gsm8k" / "test.jsonl"}
    return {n: data_dir / "commonsense" / f"{n}_test.json" for n in COMMONSENSE_TEST}


def load_train_pool(task: str, data_dir: Path):
    from sparselora.data import load_examples

    pool = []
    for f in train_files(task, data_dir):
        pool.extend(load_examples(f))
    return pool


def load_tests(task: str, data_dir: Path, limit: int | None) -> tuple[dict, dict]:
    """{set: examples}, {set: {"n", "n_total", "lines_sha"}}; a limit takes a seeded random subset per set."""
    from sparselora.data import load_examples

    tests, info = {}, {}
    for name, path in test_files(task, data_dir).items():
        ex = load_examples(path)
        n_total = len(ex)
        if limit is not None and limit < n_total:
            idx = sorted(random.Random(f"{TEST_SUBSET_SEED}-{name}").sample(range(n_total), limit))
            ex = [ex[i] for i in idx]
        lines = ",".join(str(e.meta.get("line")) for e in ex)
        tests[name] = ex
        info[name] = {"n": len(ex), "n_total": n_total, "file": str(path.relative_to(path.parents[1])),
                      "lines_sha": hashlib.sha256(lines.encode()).hexdigest()[:16]}
    return tests, info


def shuffled(pool, seed: int):
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    return [pool[i] for i in order]


def tokenize_needed(examples, tokenizer, max_length: int, needed: int):
    """Tokenize from the front until ``needed`` examples survive (over-long targets are dropped)."""
    from sparselora.data import tokenize_examples

    feats, dropped, i = [], 0, 0
    chunk = max(64, needed // 8)
    while len(feats) < needed and i < len(examples):
        part = examples[i : i + max(chunk, needed - len(feats))]
        i += len(part)
        f, st = tokenize_examples(part, tokenizer, max_length=max_length)
        feats.extend(f)
        dropped += st.n_dropped + st.n_empty_target
    return feats[:needed], {"examples_read": i, "dropped": dropped}


def training_data(args, pool, tokenizer, seed: int):
    """(features in training order, batches' index lists, info). One epoch = the first ``n_data`` examples of
    the seeded shuffle; later epochs reshuffle those with (seed, epoch)."""
    n_pool = len(pool) if args.train_limit is None else min(args.train_limit, len(pool))
    steps = args.max_steps if args.max_steps else math.ceil(n_pool * args.epochs / args.batch_size)
    needed = min(n_pool, steps * args.batch_size)
    feats, tinfo = tokenize_needed(shuffled(pool, seed), tokenizer, args.max_length, needed)
    n = len(feats)
    order, epoch = [], 0
    while len(order) < steps * args.batch_size:
        idx = list(range(n))
        if epoch:
            random.Random(seed * 1000 + epoch).shuffle(idx)
        order.extend(idx)
        epoch += 1
    order = order[: steps * args.batch_size]
    if args.group_by_length:  # HF Trainer's group_by_length: sort within mega-batches of 50 batches, then
        lens = [len(f["input_ids"]) for f in feats]  # shuffle the batches, so padding shrinks, order stays random
        mega = 50 * args.batch_size
        grouped = []
        for i in range(0, len(order), mega):
            grouped.extend(sorted(order[i : i + mega], key=lambda j: -lens[j]))
        batches = [grouped[i * args.batch_size : (i + 1) * args.batch_size] for i in range(steps)]
        random.Random(seed * 7919 + 1).shuffle(batches)
    else:
        batches = [order[i * args.batch_size : (i + 1) * args.batch_size] for i in range(steps)]
    info = {"pool": len(pool), "n_data": n, "steps": steps, "epochs": round(steps * args.batch_size / n, 3), **tinfo}
    return feats, batches, info


def token_stats(feats, batches, pad_side="right") -> dict:
    """Real token counts: per sequence (unpadded) and per executed batch (padded to its longest row)."""
    lens = [len(f["input_ids"]) for f in feats]
    lab = [sum(1 for x in f["labels"] if x != IGNORE_INDEX) for f in feats]
    padded = [max(lens[i] for i in b) for b in batches]
    return {
        "avg_len": statistics.fmean(lens), "avg_labelled": statistics.fmean(lab),
        "avg_context": statistics.fmean(a - b for a, b in zip(lens, lab)),
        "context_share": 1 - sum(lab) / sum(lens),
        "avg_padded_len": statistics.fmean(padded) if padded else 0.0,
        "padding_share": 1 - sum(sum(lens[i] for i in b) for b in batches) / max(1, sum(p * len(b) for p, b in zip(padded, batches))),
    }


# ----------------------------------------------------------------------------------------------- FLOPs
def batch_flops(model_config, cfg, feats, batches, targets, rank, labelled_only_head=False) -> dict:
    """Mean FLOPs per step over the executed batches: padding and labelled tokens run dense (as the library
    does); ``ideal`` is the same at the average unpadded length."""
    from sparselora import flops

    dense, sparse = [], []
    for b in batches:
        rows = [feats[i] for i in b]
        T = max(len(f["input_ids"]) for f in rows)
        ctx = sum(sum(1 for x in f["labels"] if x == IGNORE_INDEX) for f in rows)
        dense_tokens = round(T - ctx / len(rows))  # labelled + padding per row
        r = flops(model_config, cfg, (len(rows), T), dense_tokens, lora_rank=rank, lora_targets=tuple(targets),
                  labelled_only_head=labelled_only_head)
        dense.append(r["dense"])
        sparse.append(r["sparse"])
    st = token_stats(feats, batches)
    ideal = flops(model_config, cfg, (len(batches[0]), round(st["avg_len"])), round(st["avg_labelled"]),
                  lora_rank=rank, lora_targets=tuple(targets), labelled_only_head=labelled_only_head)
    d, s = statistics.fmean(dense), statistics.fmean(sparse)
    return {"dense": d, "sparse": s, "ratio": s / d, "ideal_unpadded_ratio": ideal["ratio"],
            "lm_head_share_dense": ideal["lm_head"] / ideal["dense"]}


def ratio_grid(model_config, feats, batches, num_layers, targets=QKVO, rank=32, labelled_only_head=False) -> list[dict]:
    from sparselora import SparseLoRAConfig

    rows = []
    for f in FFN_GRID:
        for a in ATTN_GRID:
            cfg = SparseLoRAConfig.from_preset("scaled", num_layers=num_layers, ffn_sparsity=f, attn_sparsity=a)
            r = batch_flops(model_config, cfg, feats, batches, targets, rank, labelled_only_head)
            rows.append({"ffn": f, "attn": a, "ratio": r["ratio"], "ideal": r["ideal_unpadded_ratio"]})
    return rows


def choose_scaled(grid: list[dict], target: float, slack: float) -> tuple[dict, bool]:
    """The least aggressive grid point (highest ratio) at or under ``target``. When no point reaches it, the
    least aggressive point within ``slack`` of the lowest reachable ratio: past that, more sparsity buys
    almost no FLOPs (labelled tokens and the LM head dominate) while it costs accuracy."""
    ok = [g for g in grid if g["ratio"] <= target]
    if ok:
        return max(ok, key=lambda g: (g["ratio"], -g["ffn"], -g["attn"])), True
    floor = min(g["ratio"] for g in grid)
    near = [g for g in grid if g["ratio"] <= floor + slack]
    return max(near, key=lambda g: (g["ratio"], -g["ffn"], -g["attn"])), False


def sparsity_config(args, model_config, num_layers, feats, batches):
    """(SparseLoRAConfig, description, grid or None)."""
    from sparselora import SparseLoRAConfig

    spec = args.sparsity
    grid = None
    if spec and (spec.endswith((".yaml", ".yml")) or os.path.sep in spec):
        cfg = SparseLoRAConfig.from_yaml(spec)
        how = f"yaml:{spec}"
    elif spec and spec != "auto":
        cfg = SparseLoRAConfig.from_preset(spec, **({"num_layers": num_layers} if spec == "scaled" else {}))
        how = f"preset:{spec}"
    else:
        grid = ratio_grid(model_config, feats, batches, num_layers, labelled_only_head=args.fast_kernels)
        pick, met = choose_scaled(grid, args.target_ratio, args.unreachable_slack)
        cfg = SparseLoRAConfig.from_preset("scaled", num_layers=num_layers, ffn_sparsity=pick["ffn"],
                                           attn_sparsity=pick["attn"])
        how = (f"auto: scaled ffn={pick['ffn']} attn={pick['attn']} -> {pick['ratio']:.1%} of dense FLOPs "
               + ("(least aggressive grid point <= target)" if met else
                  f"(target {args.target_ratio:.0%} NOT reachable on this data: lowest grid ratio "
                  f"{min(g['ratio'] for g in grid):.1%}; least aggressive point within {args.unreachable_slack:.0%} of it)"))
    cfg.start_step = args.start_step
    cfg.estimator_rank = args.estimator_rank if args.estimator_rank else cfg.estimator_rank
    return cfg, how, grid


# ------------------------------------------------------------------------------------------------ model
def lora_model(base, targets, rank, alpha, seed, adapter_dtype):
    model = shared_lora_model(base, [MODULE[t] for t in targets], rank, alpha, seed)
    cast_lora(model, adapter_dtype)
    return model


def lr_lambda(total: int, warmup_ratio: float):
    warm = math.ceil(warmup_ratio * total)

    def f(step):
        if step < warm:
            return (step + 1) / warm  # first step is not at lr 0 (it would waste a step)
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f, warm


def train(model, feats, batches, args, device, sparse: bool) -> dict:
    import sparselora
    from sparselora.data import DataCollator

    collate = DataCollator(pad_token_id=args.pad_id)
    cpu_batches = [collate([feats[i] for i in b]) for b in batches]
    if device.type == "cuda":
        cpu_batches = [{k: v.pin_memory() for k, v in b.items()} for b in cpu_batches]
    params = [p for p in model.parameters() if p.requires_grad]
    kw = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay, **kw)
    fn, warm = lr_lambda(len(batches), args.warmup_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
    total = len(batches)
    losses, sparse_steps, grad_norms, skipped = [], 0, [], []
    model.train()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    clock = Clock(device)
    for step, b in enumerate(cpu_batches):
        if sparse:
            sparse_steps += int(sparselora.schedule(model, step, total))
        clock.mark()
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        out = model(**b, use_cache=False)
        out.loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or float("inf"))
        grad_norms.append(norm.detach())
        # one host sync per step: a non-finite gradient must not reach the weights (GradScaler does the same);
        # every skipped step is recorded and reported, never hidden
        if args.skip_nonfinite and not torch.isfinite(norm).item():
            skipped.append(step)
            log(f"  step {step}: gradient norm not finite (loss {out.loss.item():.4f}); optimizer step skipped")
        else:
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.detach())
        if not cuda and args.verbose:
            log(f"  step {step + 1}/{total} loss {out.loss.item():.4f}")
    clock.mark()
    step_ms = clock.intervals_ms()
    seconds = time.perf_counter() - t0
    curve = torch.stack(losses).float().cpu().tolist()
    diverged_at = next((i for i, x in enumerate(curve) if not math.isfinite(x)), None)
    if diverged_at is not None:
        log(f"  training DIVERGED: loss not finite from step {diverged_at} on")
    stats = sparselora.sparsity_stats(model) if sparse else {}
    k = max(1, len(curve) // 10)
    return {"train_seconds": seconds, "step_ms_median": statistics.median(step_ms[1:] or step_ms),
            "step_ms_median_sparse": statistics.median(step_ms[-max(1, sparse_steps - 1):]) if sparse_steps else None,
            "loss_curve": [round(x, 5) for x in curve], "final_loss": statistics.fmean(curve[-k:]),
            "diverged_at_step": diverged_at, "skipped_steps": skipped,
            "grad_norm_curve": [round(x, 4) for x in torch.stack(grad_norms).float().cpu().tolist()],
            "first_loss": curve[0], "sparse_steps": sparse_steps, "warmup_steps": warm,
            "last_sparsity_stats": stats}


@torch.no_grad()
def probe(model, feats, batches, args, device) -> dict:
    """Loss of the model as it is (adapters at init: B = 0, so the base model) on a few training batches,
    with the sparse path forced on and with it off: how much the chosen sparsity perturbs the loss at step 0."""
    import sparselora
    from sparselora.data import DataCollator

    collate = DataCollator(pad_token_id=args.pad_id)
    state = sparselora.patch.get_state(model)
    before = state.scheduled_on
    state.scheduled_on = True
    was = model.training
    model.eval()
    dense, sparse = [], []
    try:
        for b in batches:
            batch = {k: v.to(device) for k, v in collate([feats[i] for i in b]).items()}
            sparse.append(model(**batch, use_cache=False).loss.float().item())
            with sparselora.dense(model):
                dense.append(model(**batch, use_cache=False).loss.float().item())
    finally:
        state.scheduled_on = before
        model.train(was)
    return {"dense": statistics.fmean(dense), "sparse": statistics.fmean(sparse), "batches": len(batches)}


# ------------------------------------------------------------------------------------------------- runs
def evaluate_all(model, tokenizer, tests, task, args, pred_dir: Path | None) -> dict:
    from sparselora.evaluate import evaluate

    eval_task = "math" if task == "math" else "commonsense"
    res = {}
    for name, ex in tests.items():
        s = evaluate(model, tokenizer, ex, task=eval_task, batch_size=args.eval_batch_size,
                     max_new_tokens=args.max_new_tokens, out_dir=pred_dir, name=name)
        res[name] = {k: s[k] for k in ("accuracy", "n", "correct", "ci95", "n_unparsed", "seconds")}
        log(f"  {name}: {s['accuracy']:.4f} (n={s['n']}, unparsed {s['n_unparsed']}, {s['seconds']:.1f}s)")
    return res


def one_run(name, seed, ctx) -> dict:
    import sparselora

    args, base, tok, device = ctx["args"], ctx["base"], ctx["tokenizer"], ctx["device"]
    info = method_info(name)
    rec = {"seed": seed, "settings_hash": ctx["settings_hash"], "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    pred_dir = ctx["pred_root"] / f"{name}-s{seed}" if ctx["pred_root"] else None
    t0 = time.perf_counter()
    if not info["train"]:
        model = base
        rec["eval"] = evaluate_all(model, tok, ctx["tests"], args.task, args, pred_dir)
    else:
        feats, batches, dinfo = training_data(args, ctx["pool"], tok, seed)
        rec["data"] = dinfo | token_stats(feats, batches)
        model = lora_model(base, info["targets"], args.lora_r, args.lora_alpha, seed, ctx["adapter_dtype"])
        cfg = None
        kw = {"fast_kernels": True} if args.fast_kernels else {}
        if info["selector"]:
            cfg = copy.deepcopy(ctx["sparsity"])
            cfg.selector = info["selector"]
            sparselora.apply_sparselora(model, cfg, estimator_dir=args.estimator_dir, **kw)
        elif args.fast_kernels:  # dense with the same fused kernels and labelled-only LM head: a fair baseline
            sparselora.apply_sparselora(model, ctx["sparsity"], estimator_dir=args.estimator_dir, **kw)
            sparselora.set_enabled(model, False)
        if cfg is not None and args.probe_batches:
            rec["probe"] = probe(model, feats, batches[: args.probe_batches], args, device)
            log(f"  probe (untrained, {len(batches[: args.probe_batches])} batches): loss dense {rec['probe']['dense']:.4f}, "
                f"sparse {rec['probe']['sparse']:.4f} ({rec['probe']['sparse'] - rec['probe']['dense']:+.4f})")
        fl = batch_flops(base.config, cfg if cfg is not None else ctx["sparsity"], feats, batches,
                         info["targets"], args.lora_r, args.fast_kernels)
        rec["flops"] = {"dense_per_step": fl["dense"], "sparse_per_step": fl["sparse"] if cfg else fl["dense"],
                        "ratio": fl["ratio"] if cfg else 1.0, "ideal_unpadded_ratio": fl["ideal_unpadded_ratio"] if cfg else 1.0}
        if cfg is not None:  # warm-up steps run dense
            w = cfg.start_step_for(len(batches)) / len(batches)
            rec["flops"]["ratio_incl_warmup"] = w + (1 - w) * rec["flops"]["ratio"]
        log(f"  {dinfo['steps']} steps on {dinfo['n_data']} examples; FLOPs/step {rec['flops']['sparse_per_step']:.3e} "
            f"({rec['flops']['ratio']:.1%} of dense)")
        rec.update(train(model, feats, batches, args, device, cfg is not None))
        log(f"  trained in {rec['train_seconds']:.1f}s (median step {rec['step_ms_median']:.1f} ms), "
            f"loss {rec['first_loss']:.3f} -> {rec['final_loss']:.3f}")
        if cfg is not None or args.fast_kernels:
            sparselora.remove_sparselora(model)  # evaluation runs the plain PEFT model for every method
        model.eval()
        rec["eval"] = evaluate_all(model, tok, ctx["tests"], args.task, args, pred_dir)
        del model
    rec["seconds_total"] = time.perf_counter() - t0
    return rec


def aggregate(doc: dict) -> None:
    """Per method: the lists the report reads, in seed order, from the successful runs."""
    for name, m in doc["methods"].items():
        runs = [r for _, r in sorted(m.get("runs", {}).items(), key=lambda kv: int(kv[0])) if "eval" in r]
        m["seeds"] = [r["seed"] for r in runs]
        sets = list(runs[0]["eval"]) if runs else []
        m["accuracy"] = {s: [r["eval"][s]["accuracy"] for r in runs] for s in sets}
        if sets:
            m["average"] = [statistics.fmean(r["eval"][s]["accuracy"] for s in sets) for r in runs]
        m["eval_seconds"] = [sum(r["eval"][s]["seconds"] for s in sets) for r in runs]
        if runs and "flops" in runs[0]:
            m["flops_per_step"] = statistics.fmean(r["flops"]["sparse_per_step"] for r in runs)
            m["flops_dense_per_step"] = statistics.fmean(r["flops"]["dense_per_step"] for r in runs)
            m["flops_ratio"] = m["flops_per_step"] / m["flops_dense_per_step"]
            m["train_seconds"] = [r["train_seconds"] for r in runs]
            m["step_ms_median"] = [r["step_ms_median"] for r in runs]
            m["final_loss"] = [r["final_loss"] for r in runs]
            m["loss_curve"] = [r["loss_curve"] for r in runs]
            m["skipped_steps"] = [r.get("skipped_steps", []) for r in runs]
            if all("probe" in r for r in runs):
                m["probe_loss"] = [{"dense": r["probe"]["dense"], "sparse": r["probe"]["sparse"]} for r in runs]
        errors = {k: r["error"] for k, r in m.get("runs", {}).items() if "error" in r}
        if errors:
            m["errors"] = errors
        else:
            m.pop("errors", None)


# ------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF folder, GGUF file or alias (smollm2-135m, qwen2.5-coder-0.5b)")
    p.add_argument("--task", required=True, choices=["math", "commonsense"])
    p.add_argument("--methods", default="base,dense,sparselora,oracle,dense_all7,sparselora_all7",
                   help="comma list; 'name:0' or 'name:0+1' overrides --seeds for that method")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--out", default=None, help="default benchmarks/results/accuracy-<model>-<task>.json")
    p.add_argument("--pred-dir", default=None, help="predictions per run (default: <out without .json>.preds/); 'none' to skip")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps per run (default: --epochs over the data)")
    p.add_argument("--epochs", type=float, default=1.0, help="used when --max-steps is not given")
    p.add_argument("--train-limit", type=int, default=None, help="use the first N examples of the seeded shuffle")
    p.add_argument("--test-limit", type=int, default=None, help="seeded random subset of N examples per test set")
    p.add_argument("--sparsity", default="auto", help="'auto' (scaled preset tuned to --target-ratio), a preset name, or a YAML path")
    p.add_argument("--target-ratio", type=float, default=TARGET_RATIO)
    p.add_argument("--unreachable-slack", type=float, default=0.03,
                   help="auto, target unreachable: least aggressive config within this of the lowest ratio")
    p.add_argument("--probe-batches", type=int, default=4,
                   help="before training a sparse method: loss of the untrained model, dense vs sparse, on this many batches")
    p.add_argument("--start-step", type=float, default=0.05)
    p.add_argument("--estimator-rank", type=int, default=None, help="default: the config's (8)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-ratio", type=float, default=0.04)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=True,
                   help="batch sequences of similar length (as HF Trainer's group_by_length): less padding for all methods")
    p.add_argument("--fast-kernels", action="store_true",
                   help="apply_sparselora(fast_kernels=True) for every trained method (dense too, sparsity off): fused "
                        "RMSNorm/SiLU*up and a labelled-only LM head; FLOPs then count the head on labelled tokens only")
    p.add_argument("--lora-r", type=int, default=32)
    p.add_argument("--lora-alpha", type=int, default=64)
    p.add_argument("--adapter-dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="base model dtype (fp32 only for CPU smoke tests)")
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 256 (math), 32 (commonsense)")
    p.add_argument("--device", default=None)
    p.add_argument("--skip-nonfinite", action=argparse.BooleanOptionalAction, default=True,
                   help="skip (and record) an optimizer step whose gradient norm is not finite")
    p.add_argument("--cudnn-sdpa", action="store_true",
                   help="allow cuDNN's SDPA kernels (off by default: every method's training went NaN at the same "
                        "batches on the H100 with them, plain PEFT included, while a CPU replay stayed finite)")
    p.add_argument("--estimator-dir", default=str(REPO / ".cache" / "estimators"))
    p.add_argument("--deadline", type=float, default=None, help="seconds: start no run that would end after this")
    p.add_argument("--plan", action="store_true", help="print steps, tokens, FLOP ratios and a time estimate; no training")
    p.add_argument("--est-step-ms", type=float, default=EST_STEP_MS)
    p.add_argument("--est-token-ms", type=float, default=EST_TOKEN_MS)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.max_new_tokens is None:
        args.max_new_tokens = 256 if args.task == "math" else 32
    return args


def model_slug(model: str) -> str:
    name = Path(model).name if os.path.exists(model) else model
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in name.lower()).strip("-") or "model"


def settings(args, sparsity_cfg, test_info) -> dict:
    keys = ("task", "max_steps", "epochs", "train_limit", "test_limit", "batch_size", "max_length", "group_by_length", "lr",
            "warmup_ratio", "weight_decay", "target_ratio", "unreachable_slack", "max_grad_norm", "lora_r", "lora_alpha", "adapter_dtype", "dtype", "max_new_tokens", "fast_kernels", "cudnn_sdpa", "skip_nonfinite")
    s = {k: getattr(args, k) for k in keys}
    s["sparsity_config"] = sparsity_cfg.to_dict()
    s["tests"] = {k: v["lines_sha"] for k, v in test_info.items()}
    return s


def plan(args, model_config, tokenizer, pool, tests, methods_runs, cfg, how, grid, feats, batches, dinfo):
    st = token_stats(feats, batches)
    print(f"\nPLAN  task={args.task}  model={args.model}")
    print(f"  train pool {dinfo['pool']} examples; per run {dinfo['steps']} steps x {args.batch_size} = "
          f"{dinfo['steps'] * args.batch_size} sequences ({dinfo['epochs']} epochs of {dinfo['n_data']})")
    print(f"  tokens/sequence {st['avg_len']:.1f} (context {st['avg_context']:.1f}, labelled {st['avg_labelled']:.1f}; "
          f"context share {st['context_share']:.1%}); padded batch length {st['avg_padded_len']:.1f} "
          f"(padding {st['padding_share']:.1%} of executed tokens)")
    tokens = dinfo["steps"] * args.batch_size * st["avg_len"]
    print(f"  training tokens per run {tokens:,.0f}")
    if grid is not None:
        print("  FLOP ratio (sparse/dense per executed step, q,k,v,o LoRA) of the 'scaled' preset, rows ffn, cols attn:")
        print("    ffn\\attn " + " ".join(f"{a:>7}" for a in ATTN_GRID))
        for f in FFN_GRID:
            print(f"    {f:<8} " + " ".join(f"{g['ratio']:>7.1%}" for g in grid if g["ffn"] == f))
        floor = min(g["ratio"] for g in grid)
        print(f"  lowest reachable ratio on this data: {floor:.1%} (target {args.target_ratio:.0%}: "
              f"{'reachable' if floor <= args.target_ratio else 'NOT reachable -- labelled tokens, padding and the LM head stay dense'})")
    for targets, label in ((QKVO, "qkvo"), (ALL7, "all7")):
        fl = batch_flops(model_config, cfg, feats, batches, targets, args.lora_r, args.fast_kernels)
        print(f"  chosen config ({label} LoRA): {fl['ratio']:.1%} of dense FLOPs per step "
              f"(unpadded {fl['ideal_unpadded_ratio']:.1%}; LM head {fl['lm_head_share_dense']:.0%} of dense)")
    print(f"  sparsity: {how}")
    print(f"    {json.dumps(cfg.to_dict())}")
    # time estimate
    n_train = sum(1 for m, _ in methods_runs if method_info(m)["train"])
    n_eval = len(methods_runs)
    steps_s = dinfo["steps"] * args.est_step_ms / 1e3
    eval_s = 0.0
    lines = []
    for name, ex in tests.items():
        nb = math.ceil(len(ex) / args.eval_batch_size)
        # trained commonsense models stop after ~10 tokens; GSM8K answers run ~150-256 tokens
        new = args.max_new_tokens if args.task == "math" else min(args.max_new_tokens, 16)
        prompt_tok = sum(len(e.prompt) for e in ex) / 3.5  # rough chars/token
        s = nb * new * args.est_token_ms / 1e3 + prompt_tok / 2e6
        eval_s += s
        lines.append(f"{name} {len(ex)} ({nb} batches) ~{s:.0f}s")
    total = EST_LOAD_S + n_train * (steps_s + 5) + n_eval * eval_s
    print(f"  runs: {len(methods_runs)} ({n_train} trained): {', '.join(f'{m}:s{s}' for m, s in methods_runs)}")
    print(f"  eval per run: {'; '.join(lines)}")
    print(f"  ESTIMATE (H100, {args.est_step_ms:.0f} ms/step, {args.est_token_ms:.0f} ms/decoding step): "
          f"train {steps_s:.0f}s/run, eval {eval_s:.0f}s/run, total ~{total / 60:.1f} min "
          f"(+ ~1 min of estimator SVD and first-step warm-up)")


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    methods = parse_methods(args.methods, seeds)
    runs = run_order(methods)
    data_dir = Path(args.data_dir).expanduser()
    slug = model_slug(args.model)
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"accuracy-{slug}-{args.task}.json"
    from transformers import AutoConfig, AutoTokenizer

    from sparselora.loading import resolve_model
    from sparselora.models.registry import arch_info

    folder = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    args.pad_id = tokenizer.pad_token_id
    model_config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    L = arch_info(model_config).num_layers

    pool = load_train_pool(args.task, data_dir)
    tests, test_info = load_tests(args.task, data_dir, args.test_limit)
    feats0, batches0, dinfo0 = training_data(args, pool, tokenizer, seeds[0] if seeds else 0)
    cfg, how, grid = sparsity_config(args, model_config, L, feats0, batches0)
    if args.plan:
        plan(args, model_config, tokenizer, pool, tests, runs, cfg, how, grid, feats0, batches0, dinfo0)
        return 0
    log(f"sparsity: {how}")

    sett = settings(args, cfg, test_info)
    sh = hashlib.sha256(json.dumps(sett, sort_keys=True).encode()).hexdigest()[:16]
    doc = None
    if out.exists():
        doc = json.loads(out.read_text())
        if doc.get("config", {}).get("settings_hash") != sh:
            bak = out.with_name(out.name + f".bak-{doc.get('config', {}).get('settings_hash', 'old')}")
            os.replace(out, bak)
            log(f"{out} was made with other settings; moved to {bak.name}, starting afresh")
            doc = None

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not args.cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    from sparselora.loading import load_model

    t0 = time.perf_counter()
    base, _ = load_model(folder, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32, device=device)
    base.requires_grad_(False)
    base.config.use_cache = False
    load_s = time.perf_counter() - t0
    checksum = base_checksum(base)
    log(f"loaded {folder} on {device} in {load_s:.1f}s; base checksum {checksum}")

    if doc is None:
        doc = {"model": slug, "model_path": str(args.model), "task": args.task, "methods": {}}
    st0 = token_stats(feats0, batches0)
    doc.update({
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "gpu_slug": gpu_slug(device), "versions": versions(), "commit": git_commit(),
        "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "python benchmarks/accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {**sett, "settings_hash": sh, "seeds": seeds, "methods": args.methods,
                   "lr_schedule": f"linear warm-up {args.warmup_ratio} then cosine to 0", "optimizer": "AdamW (betas 0.9, 0.999)",
                   "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": 0.0, "qkvo": list(QKVO), "all7": list(ALL7),
                            "adapter_dtype": args.adapter_dtype, "base_dtype": args.dtype},
                   "sparsity_choice": how, "start_step": args.start_step, "eval_batch_size": args.eval_batch_size,
                   "train_files": [str(f.relative_to(data_dir)) for f in train_files(args.task, data_dir)],
                   "train_data": dinfo0, "token_stats": st0, "tests": test_info,
                   "ratio_grid": grid, "base_checksum": checksum, "model_load_seconds": load_s},
    })
    ctx = {"args": args, "base": base, "tokenizer": tokenizer, "device": device, "pool": pool, "tests": tests,
           "sparsity": cfg, "settings_hash": sh,
           "adapter_dtype": torch.bfloat16 if args.adapter_dtype == "bf16" else torch.float32,
           "pred_root": None if args.pred_dir == "none" else Path(args.pred_dir or out.with_suffix("").as_posix() + ".preds")}
    durations = []
    for name, seed in runs:
        m = doc["methods"].setdefault(name, {"runs": {}})
        prev = m["runs"].get(str(seed))
        if prev and "error" not in prev and prev.get("settings_hash") == sh:
            log(f"{name} seed {seed}: done before, skipped")
            continue
        elapsed = time.perf_counter() - t_start
        guess = max(durations) if durations else 0.0
        if args.deadline and elapsed + guess > args.deadline:
            log(f"{name} seed {seed}: not started ({elapsed:.0f}s elapsed + ~{guess:.0f}s > deadline {args.deadline:.0f}s)")
            continue
        log(f"== {name} seed {seed}")
        t0 = time.perf_counter()
        try:
            rec = one_run(name, seed, ctx)
        except Exception as exc:  # noqa: BLE001 - recorded, and the next method still runs
            rec = {"seed": seed, "settings_hash": sh, "error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc()[-4000:]}
            log(f"  FAILED: {rec['error']}")
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        durations.append(time.perf_counter() - t0)
        after = base_checksum(base)
        if after != checksum:
            rec["error"] = (rec.get("error", "") + f" base weights changed ({checksum} -> {after})").strip()
        m["runs"][str(seed)] = rec
        doc["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
        aggregate(doc)
        write_json(out, doc)
        if after != checksum:
            log("base weights changed: aborting")
            return 2
    if device.type == "cuda":
        doc["config"]["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    aggregate(doc)
    write_json(out, doc)
    log(f"wrote {out} in {time.perf_counter() - t_start:.0f}s")
    print_summary(doc)
    return 0


def write_json(path, doc):
    atomic_write_json(path, doc)


def print_summary(doc):
    print(f"\n{doc['model']} {doc['task']}  ({doc['gpu']})")
    for name, m in doc["methods"].items():
        avg = m.get("average") or []
        acc = " ".join(f"{s}={statistics.fmean(v):.3f}" for s, v in m.get("accuracy", {}).items() if v)
        fl = f"{m['flops_ratio']:.1%}" if "flops_ratio" in m else "-"
        ts = f"{statistics.fmean(m['train_seconds']):.1f}s" if m.get("train_seconds") else "-"
        print(f"  {name:<16} avg {statistics.fmean(avg) if avg else float('nan'):.4f} seeds {m.get('seeds')} "
              f"FLOPs {fl} train {ts}  {acc}" + ("  ERRORS" if m.get("errors") else ""))


if __name__ == "__main__":
    sys.exit(main())
