"""Candidate criteria for the pre-training sparsity probe (sparselora.calibrate), side by side, per scale.

The probe today bounds the relative increase of the frozen model's MEAN loss over the labelled tokens of the run's
first batches. On commonsense (answers "the correct answer is answerN") the mean is dominated by template tokens
that do not depend on the context, so the probe can pass a config under which the question is no longer read.
This measures, with the library's own pieces (scaled preset, PEFT LoRA r32 on q,k,v,o, the default selector,
tokenization as `sparselora.train`, padded batches of the first training examples), for each scale of the preset:

  mean      (a) relative increase of the mean loss (what `calibrate` bounds; its own frozen_loss is reported too)
  kl        (b) mean KL(dense || sparse) of the next-token distributions over labelled tokens (nats)
  answer    (c) relative loss increase on the gold answer's tokens (Example.answer, last occurrence in the target)
  last      (c) relative loss increase on the last labelled token before EOS, one per example
  top10     (c) relative loss increase on the 10% of labelled tokens with the highest dense loss (per batch)
  rare      (c) relative loss increase on labelled tokens whose id occurs in fewer than half of the batch's targets
  flip      (d) 1 - top-1 agreement of dense and sparse predictions on labelled tokens
  wmean     (e) per-token loss increase weighted by the dense per-token loss, relative: sum(d*D) / sum(d*d)
  ans_flip  (d on answer tokens) 1 - top-1 agreement on the gold answer's tokens

    python benchmarks/probe_criteria.py --tasks math,commonsense --batches 2 --threads 2
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy as A  # noqa: E402

from peft import LoraConfig, get_peft_model  # noqa: E402

from sparselora import SparseLoRAConfig, apply_sparselora  # noqa: E402
from sparselora.calibrate import frozen_loss, scaled_config, set_levels  # noqa: E402
from sparselora.data import DataCollator, load_examples, tokenize_examples  # noqa: E402
from sparselora.io import atomic_write_json  # noqa: E402
from sparselora.loading import load_model  # noqa: E402
from sparselora.models.registry import module_name  # noqa: E402
from sparselora.patch import get_state  # noqa: E402
from sparselora.tokens import IGNORE_INDEX  # noqa: E402

SCALES = (1.0, 0.7, 0.49, 0.343, 0.2401)  # the probe's rounds (factor 0.7)
CRITERIA = ("mean", "kl", "answer", "last", "top10", "rare", "flip", "wmean", "ans_flip")


def answer_mask(target_ids: list[int], answer: str | None, tokenizer) -> list[bool]:
    """Which of the target's tokens overlap the last occurrence of ``answer`` in the decoded target."""
    if not answer:
        return [False] * len(target_ids)
    ends, text = [], ""
    for k in range(len(target_ids)):
        text = tokenizer.decode(target_ids[: k + 1])
        ends.append(len(text))
    start = text.rfind(answer)
    if start < 0:
        return [False] * len(target_ids)
    stop = start + len(answer)
    begins = [0] + ends[:-1]
    return [b < stop and e > start for b, e in zip(begins, ends)]


@torch.no_grad()
def labelled_logprobs(model, batch, sparse: bool):
    """Log-softmax of the next-token logits at labelled positions (flattened, row order), and the model's loss;
    the state toggled as `frozen_loss` does (sparse from step 0, eval mode)."""
    state = get_state(model)
    was_training, enabled, on = model.training, state.enabled, state.scheduled_on
    model.eval()
    state.enabled, state.scheduled_on = sparse, True
    try:
        out = model(**batch)
    finally:
        state.enabled, state.scheduled_on = enabled, on
        model.train(was_training)
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    lp = torch.log_softmax(out.logits[:, :-1][mask].float(), dim=-1)
    del out
    return lp, None


def token_info(batch, feats, examples, tokenizer):
    """Per labelled position (row order, as `labelled_logprobs`): target id, example index, and the masks."""
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    tgt = labels[mask]
    row = torch.arange(labels.shape[0]).unsqueeze(1).expand_as(labels)[mask]
    eos = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    ans, last = [], []
    counts: dict[int, int] = {}
    for f in feats:
        for t in set(x for x in f["labels"] if x != IGNORE_INDEX):
            counts[t] = counts.get(t, 0) + 1
    for f, ex in zip(feats, examples):
        t = [x for x in f["labels"] if x != IGNORE_INDEX]
        ans.extend(answer_mask(t, ex.answer, tokenizer))
        k = max(i for i, x in enumerate(t) if x not in eos) if any(x not in eos for x in t) else len(t) - 1
        last.extend(i == k for i in range(len(t)))
    rare = torch.tensor([counts[int(t)] < len(feats) / 2 for t in tgt])
    return tgt, row, torch.tensor(ans), torch.tensor(last), rare


def rel(s: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> float:
    return float(s[m].sum() / d[m].sum() - 1) if m.any() else float("nan")


def measure_task(task: str, args, model, tokenizer, data_dir: Path) -> dict:
    with tempfile.TemporaryDirectory() as work:
        examples = load_examples(A.train_file(task, data_dir, Path(work)))
    n = args.batch_size
    head = list(examples[: n * args.batches * 2])  # a margin for dropped examples (none expected)
    feats, _ = tokenize_examples(head, tokenizer, max_length=args.max_length)
    if len(feats) != len(head):
        raise SystemExit("examples were dropped at tokenization: the index map to the gold answers is off")
    feats, head = feats[: n * args.batches], head[: n * args.batches]
    collate = DataCollator(tokenizer)
    batches = [collate(feats[i:i + n]) for i in range(0, len(feats), n)]
    base = get_state(model).config
    dense_probe = frozen_loss(model, batches, sparse=False)
    # per-token accumulators over all batches
    acc = {s: {"s_nll": [], "kl": [], "agree": [], "probe": None} for s in SCALES}
    d_nll, ans_all, last_all, rare_all, top_all = [], [], [], [], []
    for b, batch in enumerate(batches):
        t0 = time.time()
        fb, eb = feats[b * n:(b + 1) * n], head[b * n:(b + 1) * n]
        tgt, _, ans, last, rare = token_info(batch, fb, eb, tokenizer)
        dlp, _ = labelled_logprobs(model, batch, sparse=False)
        dn = -dlp.gather(1, tgt[:, None]).squeeze(1)
        d_arg = dlp.argmax(-1)
        d_nll.append(dn), ans_all.append(ans), last_all.append(last), rare_all.append(rare)
        top_all.append(dn >= torch.quantile(dn, 0.9))
        print(f"  {task} batch {b}: {len(tgt)} labelled tokens ({int(ans.sum())} answer), dense {time.time() - t0:.0f}s",
              flush=True)
        for s in SCALES:
            t1 = time.time()
            set_levels(model, scaled_config(base, s))
            slp, _ = labelled_logprobs(model, batch, sparse=True)
            acc[s]["s_nll"].append(-slp.gather(1, tgt[:, None]).squeeze(1))
            kl = torch.zeros(len(tgt))
            for i in range(0, len(tgt), 256):  # KL(dense || sparse), in chunks
                p = dlp[i:i + 256]
                kl[i:i + 256] = (p.exp() * (p - slp[i:i + 256])).sum(-1)
            acc[s]["kl"].append(kl)
            acc[s]["agree"].append(slp.argmax(-1) == d_arg)
            del slp
            print(f"    x{s:.3f}: {time.time() - t1:.0f}s", flush=True)
        del dlp
    set_levels(model, base)
    d = torch.cat(d_nll)
    masks = {"answer": torch.cat(ans_all), "last": torch.cat(last_all), "top10": torch.cat(top_all),
             "rare": torch.cat(rare_all)}
    rows = []
    for s in SCALES:
        cfg = scaled_config(base, s)
        set_levels(model, cfg)
        probe = frozen_loss(model, batches, sparse=True) if args.check_probe else None
        sn, kl, ag = torch.cat(acc[s]["s_nll"]), torch.cat(acc[s]["kl"]), torch.cat(acc[s]["agree"])
        # (a) as frozen_loss: the mean over batches of each batch's mean token loss
        per_batch = [(torch.cat(acc[s]["s_nll"][i:i + 1]).mean(), d_nll[i].mean()) for i in range(len(batches))]
        mean_s = sum(float(x) for x, _ in per_batch) / len(per_batch)
        mean_d = sum(float(y) for _, y in per_batch) / len(per_batch)
        r = {"scale": s, "ffn": max(cfg.ffn_sparsity.values()), "attn": max(cfg.attn_sparsity.values()),
             "mean": mean_s / mean_d - 1, "probe_frozen_loss_increase": None if probe is None else probe / dense_probe - 1,
             "kl": float(kl.mean()), "flip": float(1 - ag.float().mean()),
             "ans_flip": float(1 - ag[masks["answer"]].float().mean()) if masks["answer"].any() else float("nan"),
             "wmean": float((d * (sn - d)).sum() / (d * d).sum()),
             "sparse_mean_loss": mean_s, "kl_answer": float(kl[masks["answer"]].mean())}
        for k, m in masks.items():
            r[k] = rel(sn, d, m)
            r[f"dense_{k}_loss"] = float(d[m].mean())
        rows.append(r)
    set_levels(model, base)
    dense = {"mean_loss": sum(float(x.mean()) for x in d_nll) / len(d_nll), "frozen_loss": dense_probe,
             "n_tokens": len(d), **{f"n_{k}": int(m.sum()) for k, m in masks.items()},
             **{f"{k}_loss": float(d[m].mean()) for k, m in masks.items()},
             "share_of_loss_on_answer": float(d[masks["answer"]].sum() / d.sum())}
    return {"dense": dense, "rows": rows, "batches": len(batches), "batch_size": n}


def fmt(v: float) -> str:
    return f"{v:+8.1%}" if abs(v) < 10 else f"{v:+8.0%}"


def print_table(task: str, res: dict) -> None:
    d = res["dense"]
    print(f"\n{task}: {res['batches']} x {res['batch_size']} examples, {d['n_tokens']} labelled tokens "
          f"({d['n_answer']} answer, {d['n_top10']} top10, {d['n_rare']} rare); dense mean loss {d['mean_loss']:.3f}, "
          f"answer-token loss {d['answer_loss']:.3f} ({d['share_of_loss_on_answer']:.1%} of the summed loss)")
    print(f"{'scale':>6} {'ffn':>5} {'attn':>5} | {'mean':>8} {'kl':>7} {'answer':>8} {'last':>8} {'top10':>8} "
          f"{'rare':>8} {'flip':>7} {'ans_flip':>8} {'wmean':>8}")
    for r in res["rows"]:
        print(f"{r['scale']:6.3f} {r['ffn']:5.3f} {r['attn']:5.3f} | {fmt(r['mean'])} {r['kl']:7.4f} {fmt(r['answer'])} "
              f"{fmt(r['last'])} {fmt(r['top10'])} {fmt(r['rare'])} {r['flip']:7.1%} {r['ans_flip']:8.1%} "
              f"{fmt(r['wmean'])}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--tasks", default="math,commonsense")
    p.add_argument("--data-dir", default=str(A.REPO.parent / "shared" / "data"))
    p.add_argument("--batches", type=int, default=2, help="the probe's batches (finetune: 2)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="torch seed before LoRA (accuracy.py's seed 0)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--check-probe", action="store_true", help="also run frozen_loss per scale (one more forward each)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model, dtype=torch.float32)
    torch.manual_seed(a.seed)
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, task_type="CAUSAL_LM",
                                             target_modules=[module_name(t) for t in ("q", "k", "v", "o")]))
    nl = model.get_base_model().config.num_hidden_layers
    apply_sparselora(model, SparseLoRAConfig.from_preset("scaled", num_layers=nl))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=A.REPO, capture_output=True, text=True).stdout.strip()
    doc = {"model": a.model, "commit": commit, "command": " ".join(["python"] + sys.argv),
           "device": "cpu", "dtype": "float32", "threads": a.threads, "selector": get_state(model).config.selector,
           "preset": f"scaled (num_layers={nl})", "lora": "r32 alpha64 on q,k,v,o (B = 0: the frozen model)",
           "criteria": {k: v for k, v in (line.strip().split(None, 1) for line in __doc__.splitlines()
                                          if line.strip().split(None, 1)[:1] and line.strip().split(None, 1)[0] in CRITERIA)},
           "tasks": {}}
    out = Path(a.out) if a.out else A.REPO / "benchmarks" / "results" / f"probe-criteria-{A.model_slug(a.model)}.json"
    for task in a.tasks.split(","):
        t = time.time()
        res = measure_task(task, a, model, tok, Path(a.data_dir))
        res["seconds"] = round(time.time() - t)
        doc["tasks"][task] = res
        print_table(task, res)
        atomic_write_json(out, doc)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
