"""How close is the sparse step's LoRA gradient to the dense one? Cosine and relative error on real batches.

The sparsity probe (sparselora.calibrate) compares forwards; training follows gradients, which the sparse path
changes too (a dropped FFN channel passes no gradient back to its context token's input). This measures, on the
frozen base with LoRA r32 on q,k,v,o (B drawn N(0, 0.02) so that every LoRA gradient is non-trivial), one batch
of the task's first training examples (tokenized as `sparselora.train`), for each config: the loss dense and
sparse, and the cosine / relative L2 error of all LoRA gradients (sparse vs dense). Configs are the scaled preset
times a scale, optionally FFN-only or attention-only, and an FFN channel score (``act``: the oracle, norm of
silu(gate x) * (up x) over the context rows; ``act_wd``: times the down projection's column norm, the output error
of dropping a channel; ``jac``: the input-gradient a dropped channel would have carried, with unit-variance output
gradients; ``mix``: act_wd + jac, each normalized).

    python benchmarks/grad_fidelity.py --model qwen2.5-coder-0.5b --configs math:0.49:both:act,commonsense:0.343:both:act
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy as A  # noqa: E402

from peft import LoraConfig, get_peft_model  # noqa: E402

import sparselora.modules.mlp as mlp_module  # noqa: E402
from sparselora import SparseLoRAConfig, apply_sparselora, remove_sparselora  # noqa: E402
from sparselora.bench.shapes import git_commit  # noqa: E402
from sparselora.data import DataCollator, load_examples, tokenize_examples  # noqa: E402
from sparselora.io import atomic_write_json  # noqa: E402
from sparselora.loading import load_model  # noqa: E402
from sparselora.ops.lora_layer import base_weight_bias  # noqa: E402
from sparselora.patch import get_state  # noqa: E402
from sparselora.selection import ffn_keep_count, select_ffn  # noqa: E402

SCORES = ("act", "act_wd", "jac", "mix")


def make_scorer(model, score: str):
    """A `select_ffn` replacement ranking channels by ``score`` (the oracle's rows: every context row)."""
    norms = {}
    for layer in model.base_model.model.model.layers:
        m = layer.mlp
        wg, wu, wd = (base_weight_bias(p)[0].float() for p in (m.gate_proj, m.up_proj, m.down_proj))
        norms[id(base_weight_bias(m.gate_proj)[0])] = (wg.norm(dim=1), wu.norm(dim=1), wd.norm(dim=0))

    @torch.no_grad()
    def select(selector, sparsity, x, gate, up, factors, n, rows=None):
        if score == "act":
            return select_ffn("oracle", sparsity, x, gate, up, factors, n)
        g, u = gate(x).float(), up(x).float()
        ng, nu, nd = norms[id(base_weight_bias(gate)[0])]
        out_err = (F.silu(g) * u).pow(2).sum(0) * nd.pow(2)
        dsilu = torch.sigmoid(g) * (1 + g * (1 - torch.sigmoid(g)))
        grad_err = nd.pow(2) * ((dsilu * u).pow(2).sum(0) * ng.pow(2) + F.silu(g).pow(2).sum(0) * nu.pow(2))
        s = {"act_wd": out_err, "jac": grad_err, "mix": out_err / out_err.sum() + grad_err / grad_err.sum()}[score]
        return s.topk(ffn_keep_count(n, sparsity)).indices.sort().values

    return select


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--configs", required=True, help="comma list of task:scale:both|ffn|attn:score")
    p.add_argument("--examples", type=int, default=8)
    p.add_argument("--data-dir", default=str(A.REPO.parent / "shared" / "data"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(A.REPO / "benchmarks" / "results" / "grad-fidelity-MODEL.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    base, tok = load_model(args.model, dtype=torch.float32)
    n_layers = base.config.num_hidden_layers
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    for name, prm in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(prm, std=0.02)
    preset = SparseLoRAConfig.from_preset("scaled", num_layers=n_layers)
    batches, rows = {}, []
    for spec in args.configs.split(","):
        task, scale, kind, score = spec.split(":")
        if kind not in ("both", "ffn", "attn") or score not in SCORES:
            raise SystemExit(f"bad config {spec!r}: task:scale:both|ffn|attn:{'|'.join(SCORES)}")
        if task not in batches:
            with tempfile.TemporaryDirectory() as w:
                ex = load_examples(A.train_file(task, Path(args.data_dir), Path(w)))[: args.examples]
            batches[task] = DataCollator(tok)(tokenize_examples(ex, tok, max_length=512)[0])
        s = float(scale)
        cfg = SparseLoRAConfig(
            ffn_sparsity={i: v * s for i, v in preset.ffn_sparsity.items()} if kind != "attn" else {},
            attn_sparsity={i: v * s for i, v in preset.attn_sparsity.items()} if kind != "ffn" else {},
            selector="oracle", start_step=0)
        apply_sparselora(model, cfg)
        state = get_state(model)
        mlp_module.select_ffn = make_scorer(model, score)
        t0 = time.perf_counter()
        res = {}
        for sparse in (False, True):
            state.enabled = sparse
            model.zero_grad(set_to_none=True)
            out = model(**batches[task])
            out.loss.backward()
            res[sparse] = (float(out.loss), torch.cat([q.grad.flatten() for q in model.parameters() if q.requires_grad]))
        mlp_module.select_ffn = select_ffn
        (ld, gd), (ls, gs) = res[False], res[True]
        row = {"task": task, "scale": s, "sparse": kind, "ffn_score": score,
               "ffn": cfg.ffn_sparsity, "attn": cfg.attn_sparsity, "loss_dense": ld, "loss_sparse": ls,
               "grad_cosine": F.cosine_similarity(gd, gs, dim=0).item(),
               "grad_rel_error": ((gs - gd).norm() / gd.norm()).item(), "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"{task:12s} x{s:<6g} {kind:4s} {score:6s}: loss {ld:.4f} -> {ls:.4f}, grad cosine "
              f"{row['grad_cosine']:.3f}, rel error {row['grad_rel_error']:.3f}", flush=True)
        remove_sparselora(model)
    out = Path(args.out.replace("MODEL", args.model))
    atomic_write_json(out, {"model": args.model, "commit": git_commit(), "examples": args.examples,
                            "command": "python benchmarks/grad_fidelity.py " + " ".join(
                                argv if argv is not None else sys.argv[1:]),
                            "lora": "r32 alpha64 on q,k,v,o, B ~ N(0, 0.02), dropout 0", "dtype": "float32",
                            "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
