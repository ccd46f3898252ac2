"""Loss of the frozen model on a few training batches with a whole SparseLoRA config applied (sparse from step 0),
next to its FLOP ratio: the quick check used to pick the accuracy experiment's configs (a single-layer sensitivity
scan does not see the interactions; this measures them).

    python benchmarks/probe_configs.py --task commonsense --configs "ffn=0.7@3-22" "ffn=0.7@2-22" --selectors svd,labelled,oracle
    python benchmarks/probe_configs.py --task math --configs "ffn=0.5@4-20" preset:qwen2.5-coder-0.5b-gsm8k

A config is 'preset:NAME', a YAML path, or 'ffn=S@LAYERS[,attn=S@LAYERS]'. Uses the first --batches batches of the
training examples in file order (benchmarks/accuracy.py's training files; bf16, CPU by default).
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy as A  # noqa: E402

from sparselora import SparseLoRAConfig  # noqa: E402
from sparselora.data import DataCollator, load_examples, tokenize_examples  # noqa: E402
from sparselora.flop_count import flops  # noqa: E402
from sparselora.loading import load_model  # noqa: E402
from sparselora.sensitivity import batch_stats, config_loss  # noqa: E402


def parse_config(spec: str) -> SparseLoRAConfig:
    if spec.startswith("preset:"):
        return SparseLoRAConfig.from_preset(spec[len("preset:"):])
    if spec.endswith((".yaml", ".yml")):
        return SparseLoRAConfig.from_yaml(spec)
    kw = {}
    for part in spec.split(","):
        kind, _, rest = part.partition("=")
        level, _, layers = rest.partition("@")
        if kind not in ("ffn", "attn") or not layers:
            raise SystemExit(f"bad config {spec!r}: use 'ffn=0.7@3-22' or 'ffn=0.5@4-20,attn=0.25@12-22'")
        kw[f"{kind}_sparsity"] = {layers: float(level)}
    return SparseLoRAConfig(**kw)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--task", required=True, choices=["math", "commonsense"])
    p.add_argument("--data-dir", default=str(A.REPO.parent / "shared" / "data"))
    p.add_argument("--configs", nargs="+", required=True)
    p.add_argument("--selectors", default="svd", help="comma list: svd, labelled, oracle, random, l2")
    p.add_argument("--ranks", default="8", help="comma list of estimator ranks to try (svd)")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    model, tok = load_model(a.model, dtype=torch.bfloat16, device=a.device)
    model.requires_grad_(False)
    n = a.batches * a.batch_size
    with tempfile.TemporaryDirectory() as work:  # the commonsense mix file is written there
        examples = load_examples(A.train_file(a.task, Path(a.data_dir), Path(work)), limit=n)
    feats, _ = tokenize_examples(list(examples), tok, max_length=512)
    collate = DataCollator(pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    bs = [{k: v.to(a.device) for k, v in collate(feats[i:i + a.batch_size]).items()}
          for i in range(0, len(feats), a.batch_size)][: a.batches]
    st = batch_stats(bs)
    with torch.no_grad():
        dense = sum(model(**b).loss.float().item() for b in bs) / len(bs)
    print(f"dense loss {dense:.4f} on {len(bs)} batches ({st['avg_length']:.0f} tokens, {st['avg_labelled']:.1f} labelled)")
    for spec in a.configs:
        sels = a.selectors.split(",")
        runs = [("svd", int(r)) for r in a.ranks.split(",") if "svd" in sels] + [(x, 8) for x in sels if x != "svd"]
        for selector, rank in runs:
            cfg = parse_config(spec)
            cfg.selector, cfg.estimator_rank = selector, rank
            label = f"{selector}-r{rank}" if selector == "svd" else selector
            ratio = flops(model.config, cfg, (a.batch_size, round(st["avg_length"])), round(st["avg_labelled"]),
                          labelled_only_head=True)["ratio"]
            t = time.time()
            loss = config_loss(model, bs, cfg, estimator_dir=A.REPO / ".cache" / "estimators")
            print(f"{spec:<30} {label:<8} FLOPs {ratio:6.1%}  loss {loss:.4f} ({loss - dense:+.4f})  {time.time() - t:.0f}s",
                  flush=True)


if __name__ == "__main__":
    main()
