"""How well does each selector find the channels the oracle keeps? Real activations of a real model, and the
frozen model's loss with the whole default config per selector.

    python benchmarks/recall.py --model smollm2-135m --out benchmarks/results/recall-smollm2-135m.json

Batches of ``--batch-size`` GSM8K train examples (prompt + answer, tokenized exactly as training tokenizes them);
one channel set per batch, as in training. For every layer that the model's default config (the `scaled`
preset) makes sparse, a forward pre-hook on the dense model's MLP / attention takes the context rows (label
-100, not padding) and the labelled rows of its input, and each candidate chooses channels with the library's
own `select_ffn` / `select_attention` and the layer's real projections:

* ``oracle``      true activations of every context row (the reference);
* ``sampled``     the library's default: the oracle's score on `SAMPLE_ROWS` evenly spaced context rows, for the
  FFN averaged over the earlier batches in order (`RunningScore`, the default `score_momentum`), as in training;
  ``sampled-m0`` the FFN's without that average (each batch's sample alone); ``sampled-S`` that on S rows;
  ``sampled-S-mM`` (FFN) S rows averaged at momentum M (``--momenta``): what a smaller, cheaper sample keeps;
  ``sampled-fp8`` (FFN) the default scored as on a GPU with fp8 tensor cores (`SparseLoRAConfig.sample_fp8`):
  gate/up of the sample from e4m3 copies with row scales (`ops.fp8.Fp8Weight`, emulated in float32 here);
  ``sampled-stale`` the default's channels of the previous batch, on this one (what selecting every other
  step would keep on the steps between; batches 2 on);
  ``sampled-spread`` (FFN) the default with its rows spread over the layers by need (`calibrate.spread_rows`, as
  `sparselora finetune`'s probe does), from the mass of each sample size measured on ``--calib-batches`` other
  batches (the examples after the measured ones), per level; the same mean rows or fewer (``spread_rows`` in the
  file);
* ``mean``        the oracle's score of the mean context row (how the reference implementation scores the FFN);
* ``labelled``    the oracle's score on the batch's labelled rows (the library's labelled selector);
* ``svd``         the library's estimator at its default rank 8 (q/k/v biases included), ``svd-rN`` rank N;
* ``l2``, ``random`` the library's ablations.

recall = |chosen ∩ oracle| / |oracle|; mass = true score summed over the chosen channels / over the oracle's.
True scores: FFN ||silu(gate x) * (up x)||_j over the context rows; attention q/k the oracle's joint score of a kv
channel (query norms averaged over its group, times ||k||); v ||v||. Kind ``attention`` is the worse of q/k and
v per layer (``attention_qk``, ``attention_v`` apart). Per layer: mean over batches; summary: mean and worst layer
over the config's sparse layers. ``loss``: the frozen model's mean loss on the first ``--loss-batches`` batches,
dense and with the whole default config per selector (`apply_sparselora`, start_step 0).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, git_commit, versions, write_json_atomic  # noqa: E402

LEVELS = (0.5, 0.7, 0.9)
SAMPLES = (32, 64, 128, 512)  # besides the library's SAMPLE_ROWS
LOSS_SELECTORS = ("sampled", "svd", "labelled", "oracle", "random")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"))
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="which examples: the first N of a seeded shuffle")
    p.add_argument("--levels", default=",".join(map(str, LEVELS)))
    p.add_argument("--ranks", default="64", help="svd ranks besides the default rank 8 (empty: none)")
    p.add_argument("--loss-batches", type=int, default=2)
    p.add_argument("--calib-batches", type=int, default=2, help="batches that spread the rows (sampled-spread)")
    p.add_argument("--momenta", default="0.5,0.8",
                   help="FFN score momenta tried with every sample size (sampled-S-mM); empty: none")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--estimator-dir", default=str(Path.home() / ".cache" / "sparselora" / "estimators"))
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def _overlap(a, b):
    return torch.isin(a, b).sum().item() / b.numel()


def main(argv=None):
    args = parse_args(argv)
    from sparselora import SparseLoRAConfig, apply_sparselora, remove_sparselora
    from sparselora.data import DataCollator, load_examples, tokenize_examples
    from sparselora.calibrate import ROW_LADDER, ffn_sample_masses, spread_rows
    from sparselora.estimator import Estimator
    from sparselora.loading import load_model
    from sparselora.models.registry import arch_info, decoder_layers
    from sparselora.ops.fp8 import Fp8Weight
    from sparselora.ops.lora_layer import base_weight_bias
    from sparselora.selection import (DEFAULT_SELECTOR, SAMPLE_ROWS, RunningScore, commit_running, labelled_rows,
                                      select_attention, select_ffn)
    from sparselora.tokens import context_mask

    torch.set_num_threads(args.threads)
    t0 = time.time()
    levels = [float(x) for x in args.levels.split(",")]
    ranks = [8] + [int(r) for r in args.ranks.split(",") if r and int(r) != 8]
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype), device="cpu")
    model.requires_grad_(False).eval()
    arch, layers = arch_info(model.config), decoder_layers(model)
    cfg = SparseLoRAConfig.from_preset("scaled", num_layers=arch.num_layers)
    ffn_layers, att_layers = sorted(cfg.ffn_sparsity), sorted(cfg.attn_sparsity)

    pool = load_examples(args.data)
    order = list(range(len(pool)))
    random.Random(args.seed).shuffle(order)
    n_calib = args.calib_batches * args.batch_size
    feats, _ = tokenize_examples([pool[i] for i in order[: args.samples + n_calib]], tok, max_length=args.max_length)
    feats, calib_feats = feats[: args.samples], feats[args.samples :]
    collate = DataCollator(tok)
    batches = [collate(feats[b : b + args.batch_size]) for b in range(0, len(feats), args.batch_size)]
    calib = [collate(calib_feats[b : b + args.batch_size]) for b in range(0, len(calib_feats), args.batch_size)]

    # the library's SVD factors (cached on disk: the loss runs below load the same file)
    weights = {(i, p): base_weight_bias(getattr(layers[i].mlp, f"{p}_proj"))[0] for i in ffn_layers for p in ("gate", "up")}
    weights |= {(i, p): base_weight_bias(getattr(layers[i].self_attn, f"{p}_proj"))[0] for i in att_layers for p in "qkv"}
    est = {r: Estimator.build(weights, r, args.estimator_dir) for r in ranks}
    print(f"loaded, factors built ({time.time() - t0:.0f}s)", flush=True)

    # store[metric][kind][level][selector][layer] -> values over batches
    store = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list)))))
    rows = {}
    momentum = cfg.score_momentum
    running = {i: RunningScore(momentum) for i in ffn_layers}  # committed after each batch, as begin_batch does
    momenta = [float(m) for m in args.momenta.split(",") if m]
    grid = [(S, m) for S in sorted({SAMPLE_ROWS, *SAMPLES}) for m in momenta if (S, m) != (SAMPLE_ROWS, momentum)]
    running_grid = {(i, S, m): RunningScore(m) for i in ffn_layers for S, m in grid}
    fp8, running_fp8 = {}, {i: RunningScore(momentum) for i in ffn_layers}  # sampled-fp8: the GPU's scores, emulated
    previous = {}  # (kind, layer, level) -> the default's channels on the last batch (sampled-stale)

    # sampled-spread: each sample size's mass on the calibration batches (alone, vs the oracle), then the rows
    ladder = sorted({*ROW_LADDER, SAMPLE_ROWS})
    curve = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))  # level -> layer -> rows -> masses
    spread: dict[float, dict[int, int]] = {}
    running_spread = {(i, s): RunningScore(momentum) for i in ffn_layers for s in levels}

    def calib_hook(i):
        def hook(mod, a):
            xc = a[0].reshape(-1, a[0].shape[-1]).float()[rows["ctx"]]
            masses = ffn_sample_masses(xc, mod.gate_proj, mod.up_proj, arch.intermediate_size, levels, ladder)
            for s, by_rows in masses.items():
                for S, m in by_rows.items():
                    curve[s][i][S].append(m)
        return hook

    if calib:
        handles = [layers[i].mlp.register_forward_pre_hook(calib_hook(i)) for i in ffn_layers]
        for batch in calib:
            rows["ctx"] = context_mask(batch["labels"], batch["attention_mask"]).reshape(-1)
            with torch.no_grad():
                model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for h in handles:
            h.remove()
        spread = {s: spread_rows({i: {S: statistics.fmean(v) for S, v in c.items()} for i, c in curve[s].items()},
                                 SAMPLE_ROWS, ladder) for s in levels}
        print("spread rows, mean:", {s: statistics.fmean(r.values()) for s, r in spread.items()}, flush=True)

    def record(kind, s, name, layer, chosen, best, true):
        store["recall"][kind][s][name][layer].append(_overlap(chosen, best))
        store["mass"][kind][s][name][layer].append((true[chosen].sum() / true[best].sum()).item())

    def names(r):
        return "svd" if r == 8 else f"svd-r{r}"

    def ffn_hook(i):
        def hook(mod, a):
            x = a[0].reshape(-1, a[0].shape[-1]).float()
            xc, xl = x[rows["ctx"]], x[rows["lab"]]
            n = arch.intermediate_size
            g, u = mod.gate_proj(xc).float(), mod.up_proj(xc).float()
            true = (torch.nn.functional.silu(g) * u).norm(dim=0)
            for s in levels:
                best = select_ffn("oracle", s, xc, lambda _: g, lambda _: u, None, n)
                cands = {"sampled-m0" if S == SAMPLE_ROWS else f"sampled-{S}": (
                    select_ffn("sampled", s, xc, mod.gate_proj, mod.up_proj, None, n, rows=S))
                    for S in sorted({SAMPLE_ROWS, *SAMPLES})}
                cands["sampled"] = select_ffn("sampled", s, xc, mod.gate_proj, mod.up_proj, None, n,
                                              running=running[i])
                if ("ffn", i, s) in previous:  # sampled-stale: last batch's channels (selection every other step)
                    cands["sampled-stale"] = previous["ffn", i, s]
                previous["ffn", i, s] = cands["sampled"]
                if i not in fp8:
                    fp8[i] = Fp8Weight.side_by_side([mod.gate_proj.weight, mod.up_proj.weight])
                cands["sampled-fp8"] = select_ffn("sampled", s, xc, None, None, None, n, running=running_fp8[i],
                                                  gate_up=fp8[i])
                if spread:
                    cands["sampled-spread"] = select_ffn("sampled", s, xc, mod.gate_proj, mod.up_proj, None, n,
                                                         rows=spread[s][i], running=running_spread[i, s])
                for S, m in grid:
                    cands[f"sampled-{S}-m{m:g}"] = select_ffn("sampled", s, xc, mod.gate_proj, mod.up_proj, None, n,
                                                             rows=S, running=running_grid[i, S, m])
                cands["mean"] = select_ffn("oracle", s, xc.mean(0, keepdim=True), mod.gate_proj, mod.up_proj, None, n)
                cands["labelled"] = select_ffn("oracle", s, xl, mod.gate_proj, mod.up_proj, None, n)
                cands["l2"] = select_ffn("l2", s, xc, lambda _: g, lambda _: u, None, n)
                torch.manual_seed(1000 * i + int(100 * s))
                cands["random"] = select_ffn("random", s, xc, None, None, None, n)
                for r in ranks:
                    cands[names(r)] = select_ffn("svd", s, xc, None, None, est[r].stacked(i, ("gate", "up")), n)
                for name, chosen in cands.items():
                    record("ffn", s, name, i, chosen, best, true)
        return hook

    def att_hook(i):
        def hook(mod, a, kw):
            h = kw.get("hidden_states", a[0] if a else None)
            x = h.reshape(-1, h.shape[-1]).float()
            xc, xl = x[rows["ctx"]], x[rows["lab"]]
            proj = [getattr(mod, f"{p}_proj") for p in "qkv"]
            q, k, v = (f(xc).float() for f in proj)
            D, G = arch.head_dim, arch.group_size
            qk_true = (q.norm(dim=0).view(arch.num_kv_heads, G, D).mean(1) * k.norm(dim=0).view(-1, D)).reshape(-1)
            v_true = v.norm(dim=0)
            fixed = (lambda _: q, lambda _: k, lambda _: v)
            biases = [base_weight_bias(f)[1] for f in proj]
            for s in levels:
                best = select_attention("oracle", s, xc, arch, cfg.rope_pairs, *fixed, None)
                cands = {"sampled" if S == SAMPLE_ROWS else f"sampled-{S}": select_attention(
                    "sampled", s, xc, arch, cfg.rope_pairs, *proj, None, rows=S) for S in sorted({SAMPLE_ROWS, *SAMPLES})}
                if ("attention", i, s) in previous:
                    cands["sampled-stale"] = previous["attention", i, s]
                previous["attention", i, s] = cands["sampled"]
                cands["mean"] = select_attention("oracle", s, xc.mean(0, keepdim=True), arch, cfg.rope_pairs, *proj, None)
                cands["labelled"] = select_attention("oracle", s, labelled_rows(xl, xl.shape[0]), arch, cfg.rope_pairs,
                                                     *proj, None)
                cands["l2"] = select_attention("l2", s, xc, arch, cfg.rope_pairs, *fixed, None)
                torch.manual_seed(1000 * i + int(100 * s))
                cands["random"] = select_attention("random", s, xc, arch, cfg.rope_pairs, None, None, None, None)
                for r in ranks:
                    cands[names(r)] = select_attention("svd", s, xc, arch, cfg.rope_pairs, None, None, None,
                                                       est[r].stacked(i, "qkv"), biases)
                for name, c in cands.items():
                    record("attention_qk", s, name, i, c["k"], best["k"], qk_true)
                    record("attention_v", s, name, i, c["v"], best["v"], v_true)
        return hook

    handles = [layers[i].mlp.register_forward_pre_hook(ffn_hook(i)) for i in ffn_layers]
    handles += [layers[i].self_attn.register_forward_pre_hook(att_hook(i), with_kwargs=True) for i in att_layers]
    n_ctx = n_lab = 0
    for bi, batch in enumerate(batches):
        rows["ctx"] = context_mask(batch["labels"], batch["attention_mask"]).reshape(-1)
        rows["lab"] = (batch["labels"] != -100).reshape(-1)
        n_ctx += int(rows["ctx"].sum())
        n_lab += int(rows["lab"].sum())
        with torch.no_grad():
            model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        commit_running([*running.values(), *running_grid.values(), *running_spread.values(), *running_fp8.values()])
        print(f"batch {bi + 1}/{len(batches)} ({time.time() - t0:.0f}s)", flush=True)
    for h in handles:
        h.remove()

    # the frozen model's loss with the whole default config, per selector
    loss = {}
    lb = batches[: args.loss_batches]

    def mean_loss():
        with torch.no_grad():
            return statistics.fmean(model(**b).loss.item() for b in lb)

    loss["dense"] = mean_loss()
    for sel in LOSS_SELECTORS:
        torch.manual_seed(0)
        apply_sparselora(model, SparseLoRAConfig.from_preset("scaled", num_layers=arch.num_layers, selector=sel,
                                                             start_step=0), estimator_dir=args.estimator_dir)
        loss[sel] = mean_loss()
        remove_sparselora(model)
    loss = {k: round(v, 4) for k, v in loss.items()}
    print("loss", loss, flush=True)

    summary, per_layer = {}, {}
    for metric, kinds in store.items():  # kind "attention": the worse of q/k and v per layer and batch
        kinds["attention"] = {s: {n: {i: [min(a, b) for a, b in zip(kinds["attention_qk"][s][n][i],
                                                                   kinds["attention_v"][s][n][i])]
                                      for i in kinds["attention_qk"][s][n]} for n in kinds["attention_qk"][s]}
                              for s in kinds["attention_qk"]}
        summary[metric], per_layer[metric] = {}, {}
        for kind in ("ffn", "attention", "attention_qk", "attention_v"):
            summary[metric][kind], per_layer[metric][kind] = {}, {}
            for s, sels in kinds[kind].items():
                pl = {n: {str(i): round(statistics.fmean(v), 4) for i, v in sorted(d.items())} for n, d in sels.items()}
                per_layer[metric][kind][str(s)] = pl
                summary[metric][kind][str(s)] = {n: {"config_layers_mean": round(statistics.fmean(d.values()), 4),
                                                     "config_layers_min": round(min(d.values()), 4)}
                                                 for n, d in pl.items()}
    doc = {
        "model": args.model, "default_selector": DEFAULT_SELECTOR, "sample_rows": SAMPLE_ROWS,
        "score_momentum": momentum, "momenta_tried": momenta,
        "calib_batches": len(calib), "spread_rows": {str(s): {str(i): r for i, r in rows_.items()}
                                                    for s, rows_ in spread.items()},
        "architecture": arch.__dict__ | {"group_size": arch.group_size},
        "data": str(Path(args.data).resolve().relative_to(REPO.parent)) if Path(args.data).resolve().is_relative_to(REPO.parent) else args.data,
        "samples": len(feats), "batch_size": args.batch_size, "batches": len(batches), "seed": args.seed,
        "context_tokens": n_ctx, "labelled_tokens": n_lab, "dtype": args.dtype, "device": "cpu",
        "levels": levels, "config": "scaled preset", "config_layers": {"ffn": ffn_layers, "attention": att_layers},
        "versions": versions(), "commit": git_commit(),
        "command": "python benchmarks/recall.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "seconds": round(time.time() - t0, 1),
        "mass_vs_oracle": summary["mass"], "recall": summary["recall"],
        "mass_vs_oracle_per_layer": per_layer["mass"], "recall_per_layer": per_layer["recall"],
        "loss": {"batches": len(lb), "config": "scaled preset, start_step 0", **loss},
    }
    slug = "".join(c if c.isalnum() or c in ".-" else "-" for c in Path(args.model).name.lower())
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"recall-{slug}.json"
    write_json_atomic(out, doc)
    for kind in ("ffn", "attention"):
        print(kind)
        for s, sels in doc["mass_vs_oracle"][kind].items():
            print(f"  s={s}: " + ", ".join(f"{n} {v['config_layers_mean']:.3f}/{v['config_layers_min']:.2f}" for n, v in sels.items()))
    print(f"wrote {out} ({doc['seconds']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
