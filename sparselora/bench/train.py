"""Training throughput through `transformers.Trainer` on real, variable-length data: the benchmark users believe.

Row lengths (prompt and answer token counts) come from the real training mixes (lengths/*.json, tokenized by
benchmarks/make_lengths.py); token ids are random, weights random at a model shape (or a real model folder).
Every method sees the same examples in the same order, the same optimizer (AdamW), schedule (cosine, warm-up),
clipping (1.0) and bf16, and the same real-token budget per step; only the batching and the model path differ.

    python benchmarks/bench_train.py --shape llama3-8b --mix math          # or: sparselora bench --trainer ...

Prints a table and writes benchmarks/results/train-<shape>-<mix>-<gpu>.json (in a checkout; else in the current
folder).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from importlib import resources
from pathlib import Path

import torch

from sparselora.bench.lora import QKVO
from sparselora.bench.shapes import SHAPES, build_base_model, git_commit, gpu_slug, paper_preset, results_dir, versions
from sparselora.bench.timing import Clock
from sparselora.io import atomic_write_json
from sparselora.tokens import IGNORE_INDEX

# name: (kind, batching, what it is)
METHODS = {
    "peft": ("dense", "padded", "Trainer + stock PEFT, batches padded to their longest row"),
    "peft_liger": ("dense", "padded", "Trainer + PEFT, use_liger_kernel=True"),
    "peft_liger_grouped": ("dense", "padded, group_by_length", "Trainer + PEFT + liger, length-grouped batches"),
    "peft_liger_packed": ("dense", "packed", "Trainer + PEFT + liger, packed rows, segment-isolated attention"),
    "dense_graph_packed": ("dense", "packed", "sparselora's dense path (fused LoRA, fused kernels) + CUDA graphs, "
                                              "packed rows"),
    "sparselora_trainer": ("sparse", "padded", "Trainer + sparselora as a plain Trainer user gets it "
                                               "(apply_sparselora, DataCollator)"),
    "sparselora_packed": ("sparse", "packed", "Trainer + sparselora, packed rows, fused kernels, eager"),
    "sparselora_fast": ("sparse", "packed", "sparselora's default GPU path: packed rows, fused kernels, "
                                            "CUDAGraphTrainer with bucketed counts"),
}


def load_lengths(mix: str) -> dict:
    path = resources.files("sparselora.bench") / "lengths" / f"{mix}.json"
    if not path.is_file():
        raise SystemExit(f"no token lengths for mix {mix!r}; choose math, commonsense or code")
    return json.loads(path.read_text())


def make_examples(lengths: dict, n: int, vocab: int, seed: int) -> list[dict]:
    """``n`` examples drawn (shuffled, seeded) from the mix's real (prompt, answer) lengths, random ids."""
    rng = random.Random(seed)
    pairs = list(zip(lengths["prompt"], lengths["answer"]))
    rng.shuffle(pairs)
    g = torch.Generator().manual_seed(seed)
    out = []
    for p, a in (pairs * (n // len(pairs) + 1))[:n]:
        ids = torch.randint(1, vocab, (p + a,), generator=g).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * (p + a), "labels": [IGNORE_INDEX] * p + ids[p:]})
    return out


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _Recorder:
    """Per-step time (`Clock` marks at step begins: on CUDA events, no sync of its own, so the host may run ahead as
    in a user's run and the waits still count), real tokens per batch, and on CUDA the GPU timeline of each
    forward + backward (`Trainer.training_step`); the rest of a step is clipping, the optimizer and the Trainer's
    own work."""

    def __init__(self, collator, prof=None):
        self.collator, self.tokens, self.prof, self.events = collator, [], prof, []
        self.sparse_rows: list[int] = []  # per step: the rows that took the sparse path (the last micro-batch's)
        self.context: list[int] = []  # per batch: its context tokens (real, unlabelled)
        self.clock = Clock(torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    def time_training_step(self, trainer) -> None:
        if not torch.cuda.is_available():
            return
        inner = trainer.training_step

        def timed(*args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = inner(*args, **kwargs)
            end.record()
            self.events.append((start, end))
            return out

        trainer.training_step = timed

    def fwd_bwd_ms(self) -> list[float]:
        _sync()
        return [s.elapsed_time(e) for s, e in self.events]

    def __call__(self, features):
        batch = self.collator(features)
        self.tokens.append(int(batch["attention_mask"].sum()))
        self.context.append(int(((batch["labels"] == IGNORE_INDEX) & batch["attention_mask"].bool()).sum()))
        return batch

    def callback(self):
        from transformers import TrainerCallback

        from sparselora.patch import get_state

        rec = self

        class Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                rec.clock.mark()

            def on_step_end(self, args, state, control, model=None, **kw):
                sl = get_state(model, required=False) if model is not None else None
                if sl is not None:  # host values: no sync
                    rec.sparse_rows.append(sl.split.num_context if sl.split is not None else 0)
                if rec.prof is not None:
                    rec.prof.step()

            def on_train_end(self, args, state, control, **kw):
                rec.clock.mark()  # the end of the last step

        return Timer()


def run_method(name: str, args, examples: list[dict], lengths: list[int], device) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from sparselora import SparseLoRACallback, SparseLoRAConfig, apply_sparselora, use_packed_attention
    from sparselora.data import DataCollator
    from sparselora.fastpath import choose_path, packed_data, paying_config
    from sparselora.trainer import CUDAGraphTrainer

    method, _, selector = name.partition("@")  # "sparselora_fast@svd": that method with another selector
    kind, batching, _ = METHODS[method]
    base = build_base_model(args.shape, args.model, device, seed=args.seed)
    model = get_peft_model(base, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, target_modules=QKVO))
    packed = batching == "packed"
    path = choose_path(device.type, lengths, args.rows, packing=True, max_tokens=args.tokens_per_step)
    if packed:
        use_packed_attention(model)
        data, collator = packed_data(examples, path, pad_token_id=0)
    else:
        data, collator = examples, DataCollator(pad_token_id=0)
    trainer_cls, callbacks = Trainer, []
    if method.startswith("sparselora") or method == "dense_graph_packed":
        if kind == "sparse":
            layers = {"num_layers": base.config.num_hidden_layers} if args.preset == "scaled" else {}
            cfg = SparseLoRAConfig.from_preset(args.preset, **layers, **({"selector": selector} if selector else {}))
            cfg.start_step = 0  # sparse from the first step: the steady state is what is timed
            if method != "sparselora_trainer":  # the fast methods run what `sparselora finetune` runs
                cfg, line = paying_config(cfg)
                if line:
                    print(f"  {method}: {line}")
        else:
            cfg = SparseLoRAConfig(ffn_sparsity={}, attn_sparsity={})
        apply_sparselora(model, cfg, fast_kernels=method != "sparselora_trainer")
        callbacks.append(SparseLoRACallback())
    if method in ("sparselora_fast", "dense_graph_packed"):
        trainer_cls = CUDAGraphTrainer
    prof = None
    if name in (args.profile or "").split(","):  # kernel table of two measured steps (after the captures of the warm-up)
        from torch.profiler import ProfilerActivity, profile, schedule

        prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                       schedule=schedule(wait=args.warmup + args.steps // 2, warmup=1, active=2))
    rec = _Recorder(collator, prof)
    targs = TrainingArguments(
        output_dir=str(Path(args.scratch) / name), max_steps=args.warmup + args.steps,
        per_device_train_batch_size=1 if packed else args.rows, learning_rate=3e-4, lr_scheduler_type="cosine",
        warmup_steps=2, max_grad_norm=1.0, bf16=device.type == "cuda", use_cpu=device.type == "cpu", logging_steps=args.logging_steps, save_strategy="no", report_to=[],
        disable_tqdm=True, remove_unused_columns=False, dataloader_drop_last=True, seed=args.seed, data_seed=args.seed,
        use_liger_kernel=method.startswith("peft_liger"),
        train_sampling_strategy="group_by_length" if method == "peft_liger_grouped" else "sequential")
    trainer = trainer_cls(model=model, args=targs, train_dataset=data, data_collator=rec,
                          callbacks=callbacks + [rec.callback()])
    rec.time_training_step(trainer)
    _sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if prof is not None:
        with prof:
            trainer.train()
        dest = Path(args.profile_out) / f"profile-{name}.txt"
        dest.parent.mkdir(parents=True, exist_ok=True)
        stats = prof.key_averages()
        dest.write_text(stats.table(sort_by="self_device_time_total", row_limit=150, max_name_column_width=90))
        # the host's view as well: an eager step that is host-bound shows its cost in CPU time, not kernel time
        host = dest.with_name(f"profile-{name}-host.txt")
        host.write_text(stats.table(sort_by="self_cpu_time_total", row_limit=80, max_name_column_width=90))
        print(f"   profile of 2 steps: {dest} (kernels), {host} (host)")
    else:
        trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    times = rec.clock.seconds(wait=True)
    toks = rec.tokens[: len(times)]
    meas_t, meas_n = times[args.warmup:], toks[args.warmup:]
    step = getattr(trainer, "_graph_step", None)
    out = {
        "kind": kind, "batching": batching, "what": METHODS[method][2],
        "selector": cfg.selector if kind == "sparse" else None,
        "tokens_per_s": sum(meas_n) / sum(meas_t), "step_ms": statistics.median(meas_t) * 1e3,
        "mean_step_ms": statistics.mean(times) * 1e3, "tokens_per_step": statistics.mean(meas_n),
        "peak_gib": peak, "captures": step.captures if step is not None else 0,
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "steps_measured": len(meas_t),
    }
    fb = rec.fwd_bwd_ms()[args.warmup:]
    if fb:  # forward + backward on the GPU timeline; step_ms minus this is optimizer + Trainer + host gaps
        out["fwd_bwd_ms"] = statistics.median(fb)
    rows = rec.sparse_rows[args.warmup:len(times)]
    if kind == "sparse" and rows:  # bucketed down, the sparse rows are fewer than the context tokens
        out["sparse_row_fraction"] = sum(rows) / sum(meas_n)
        out["context_fraction"] = sum(rec.context[args.warmup:len(times)]) / sum(meas_n)
    if packed:
        out["pack"] = {"max_tokens": path.max_tokens, "max_segments": path.max_segments,
                       "max_segment_len": path.max_segment_len}
    del trainer, model, base
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="sparselora bench --trainer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES), help="model shape, random weights")
    ap.add_argument("--model", default=None, help="a real model folder instead of --shape")
    ap.add_argument("--mix", default="math", choices=["math", "commonsense", "code"])
    ap.add_argument("--preset", default=None, help="SparseLoRA preset (default: the paper's for shape and mix)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma list of {', '.join(METHODS)}; a sparse method@selector (e.g. sparselora_fast@svd) "
                         "runs that method with another selector than the preset's")
    ap.add_argument("--tokens-per-step", type=int, default=4096, help="real-token budget of a step (packed row size)")
    ap.add_argument("--steps", type=int, default=40, help="measured steps")
    ap.add_argument("--warmup", type=int, default=10, help="steps before measuring (captures happen here and later)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--logging-steps", type=int, default=10,
                    help="the Trainer's logging interval (each log reads the loss: a host sync); 10 as `sparselora "
                         "finetune` on a GPU")
    ap.add_argument("--profile", default=None, help="methods to profile, comma list (kernel table of two steps)")
    ap.add_argument("--profile-out", default=".", help="folder for profile-<method>.txt")
    ap.add_argument("--scratch", default="/tmp/sparselora-bench-train")
    ap.add_argument("--out", default=None,
                    help="JSON path (default train-<shape>-<mix>-<gpu>.json in benchmarks/results of a checkout,"
                         " else in the current folder)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: a smoke run of the tiny shape
    shape = args.shape if not args.model else Path(args.model).name
    args.preset = args.preset or paper_preset(args.shape, args.mix)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m.partition("@")[0] not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    from sparselora.selection import SELECTORS

    bad = [m for m in methods if "@" in m and (METHODS[m.partition("@")[0]][0] != "sparse"
                                               or m.partition("@")[2] not in SELECTORS)]
    if bad:
        raise SystemExit(f"{bad}: '@selector' takes a sparse method and one of {', '.join(SELECTORS)}")
    lengths = load_lengths(args.mix)
    mean_len = statistics.mean(p + a for p, a in zip(lengths["prompt"], lengths["answer"]))
    args.rows = max(1, round(args.tokens_per_step / mean_len))  # padded batches: the same real tokens per step
    if args.model:
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(args.model).vocab_size  # ids must fit the real model's embedding
    else:
        vocab = SHAPES[args.shape][1]["vocab_size"]
    n = int((args.warmup + args.steps + 2) * args.rows * 1.3)
    examples = make_examples(lengths, n, vocab, args.seed)
    ex_lengths = [len(e["input_ids"]) for e in examples]
    gpu = gpu_slug(device)
    out_path = Path(args.out or results_dir() / f"train-{shape}-{args.mix}-{gpu}.json")
    record = {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "shape": shape, "mix": args.mix, "preset": args.preset,
              "versions": versions(), "commit": git_commit(), "command": "sparselora bench --trainer " +
              " ".join(argv if argv is not None else __import__("sys").argv[1:]),
              "rows_per_padded_batch": args.rows, "tokens_per_step": args.tokens_per_step,
              "logging_steps": args.logging_steps,
              "lengths": {"tokenizer": lengths["tokenizer"], "sources": lengths["sources"],
                          "mean_prompt": statistics.mean(lengths["prompt"]),
                          "mean_answer": statistics.mean(lengths["answer"])},
              "vocab": vocab, "flops": _flop_bound(args, lengths), "methods": {}}
    for name in methods:
        print(f"-- {name}: {METHODS[name.partition('@')[0]][2]}", flush=True)
        try:
            record["methods"][name] = run_method(name, args, examples, ex_lengths, device)
        except Exception as exc:  # noqa: BLE001 - one failing method must not lose the others' numbers
            record["methods"][name] = {"kind": METHODS[name.partition("@")[0]][0], "error": f"{type(exc).__name__}: {exc}"}
            print(f"   failed: {type(exc).__name__}: {exc}", flush=True)
        atomic_write_json(out_path, record)  # after every method: a crash keeps what was measured
    _table(record)
    print(f"wrote {out_path}")
    return 0


def _flop_bound(args, lengths: dict) -> dict | None:
    """Analytic FLOPs of a step at the mix's mean prompt/answer lengths (labelled-only head on both sides): the
    speed-up the sparse config could reach if time followed FLOPs; the config as the fast methods run it."""
    from sparselora import SparseLoRAConfig, flops
    from sparselora.bench.shapes import make_config
    from sparselora.fastpath import paying_config

    if args.model:
        return None
    cfg = make_config(args.shape)
    layers = {"num_layers": cfg.num_hidden_layers} if args.preset == "scaled" else {}
    p, a = statistics.mean(lengths["prompt"]), statistics.mean(lengths["answer"])
    rows = max(1, round(args.tokens_per_step / (p + a)))
    run_cfg = paying_config(SparseLoRAConfig.from_preset(args.preset, **layers))[0]
    f = flops(cfg, run_cfg, (rows, round(p + a)), round(a), labelled_only_head=True)
    return {"dense": f["dense"], "sparse": f["sparse"], "speedup_bound": f["dense"] / f["sparse"],
            "context_fraction": p / (p + a), "at": f"{rows} rows of {round(p)} prompt + {round(a)} answer tokens"}


def _table(record: dict) -> None:
    ms = record["methods"]
    ok = {k: v for k, v in ms.items() if "error" not in v}
    best_dense = max((v["tokens_per_s"] for v in ok.values() if v["kind"] == "dense"), default=None)
    print(f"\n{record['shape']} / {record['mix']} / {record['preset']} on {record['gpu']}")
    if record.get("flops"):
        f = record["flops"]
        print(f"analytic FLOP bound {f['speedup_bound']:.2f}x at context fraction {f['context_fraction']:.2f} "
              f"({f['at']})")
    for k, v in ms.items():
        if v.get("sparse_row_fraction") is not None:
            print(f"  {k}: {v['sparse_row_fraction']:.2f} of the real tokens took the sparse path, of "
                  f"{v['context_fraction']:.2f} context (the rest ran dense: bucketed row counts)")
    print(f"{'method':<22}{'tok/s':>9}{'ms/step':>9}{'fwd+bwd':>9}{'mean ms':>9}{'tok/step':>9}{'peak GiB':>9}"
          f"{'graphs':>7}{'vs best dense':>14}{'loss first/last':>18}")
    for k, v in ms.items():
        if "error" in v:
            print(f"{k:<22} failed: {v['error'][:100]}")
            continue
        rel = f"{v['tokens_per_s'] / best_dense:.2f}x" if best_dense else "-"
        loss = f"{v['first_loss']:.2f}/{v['last_loss']:.2f}" if v["first_loss"] is not None else "-"
        fb = f"{v['fwd_bwd_ms']:.1f}" if v.get("fwd_bwd_ms") is not None else "-"
        print(f"{k:<22}{v['tokens_per_s']:>9.0f}{v['step_ms']:>9.1f}{fb:>9}{v['mean_step_ms']:>9.1f}"
              f"{v['tokens_per_step']:>9.0f}{v['peak_gib']:>9.1f}{v['captures']:>7}{rel:>14}{loss:>18}")


if __name__ == "__main__":
    raise SystemExit(main())
