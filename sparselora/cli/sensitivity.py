"""`sparselora sensitivity`: measure per-layer sensitivity to sparsity and write a config for a FLOP budget."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

from sparselora.calibrate import CRITERIA, DEFAULT_KL_BOUND, DEFAULT_LOSS_BOUND
from sparselora.cli.finetune import loss_bound_type  # off: None, no back-off (the range: _check_args)
from sparselora.config import SELECTORS
from sparselora.models.registry import ATTN_PROJS, PROJS
from sparselora.selection import DEFAULT_SELECTOR

EXIT_OK, EXIT_ERROR, EXIT_INFEASIBLE = 0, 1, 3

HELP = "measure each layer's loss sensitivity to sparsity and choose a layer-wise config for a FLOP budget"

DESCRIPTION = """\
Measure, on a calibration slice of your data, how much the loss on labelled tokens rises when one layer's
FFN alone, or its attention alone, runs SparseLoRA's sparse path at each sparsity level (frozen model,
no gradients; --selector, the library's default unless given, from step 0). Then choose per layer the levels
with the least predicted (additive) loss increase whose analytic FLOPs per training step are at most
--budget x dense.

The additive prediction is a ranking, not a loss estimate (layers interact; the joint increase has been
4-30x the prediction), so the chosen config is then probed as a whole on the same batches, as `sparselora
finetune` does before training (sparselora.calibrate): when it changes the model more than the bound over
dense (--probe kl, the default as in finetune: the mean KL(dense || sparse) over labelled tokens above
--kl-bound nats; --probe loss: the loss rising more than --loss-bound, relative), every layer's sparsity is
scaled down round by round until it does not, and the backed-off
config is written (its FLOPs can then exceed --budget: the bound wins, and the command says so). The result
is a SparseLoRAConfig YAML for `sparselora finetune --sparsity`.

Cost: one dense pass plus layers x 2 x levels passes over --samples examples (layers before the measured one
are taken from a cache, so a pass costs about half a forward on average), then 1 + rounds full passes."""

EPILOG = """\
examples:
  # a config at half the dense FLOPs, from 16 GSM8K training examples
  sparselora sensitivity --model smollm2-135m --data ../shared/data/gsm8k/train.jsonl \\
      --budget 0.5 --samples 16 --levels 0.5,0.9,0.99 --output sens-smollm2
  sparselora finetune ... --sparsity sens-smollm2/sparsity.yaml

  # the same measurements, another budget (no model run)
  sparselora sensitivity --from-json sens-smollm2/sensitivity.json --budget 0.6 --output sens-0.6

  # with a trained LoRA adapter, on a GPU
  sparselora sensitivity --model ./base --adapter ./lora-out --data train.jsonl --budget 0.55 --device cuda

outputs (in --output): sparsity.yaml (the config, with a header saying how it was made),
sensitivity.json (raw losses per layer, kind and level; dense loss; FLOP model), heatmap.png
(needs matplotlib), table.md. With --from-json there is no model, so the config is not probed (finetune
probes it before training).

exit codes: 0 done; 1 bad input (missing file, unsupported model, bad levels); 2 usage error;
3 the budget is infeasible (below the FLOPs with every block at the highest level)."""


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sensitivity",
        help=HELP,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def _levels(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--levels {text!r} must be comma-separated numbers like 0.5,0.9,0.99") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sparselora.train import RunConfig

    run_probe = RunConfig().probe  # the back-off criterion finetune uses by default
    src = p.add_argument_group("what to measure")
    src.add_argument("--model", help="model alias (smollm2-135m, qwen2.5-coder-0.5b, ...), HF folder or GGUF file")
    src.add_argument("--data", help="training data file (.json/.jsonl: GSM8K, LLM-Adapters, prompt/completion, chat)")
    src.add_argument("--adapter", help="a PEFT LoRA adapter folder to measure with (optional)")
    src.add_argument("--format", default="auto", help="data format (default: auto-detect)")
    src.add_argument("--samples", type=int, default=32, help="calibration examples drawn from --data (default 32)")
    src.add_argument("--seed", type=int, default=0, help="seed of the sample draw (default 0)")
    src.add_argument("--max-length", type=int, default=512, help="token limit per example (default 512)")
    src.add_argument("--batch-size", type=int, default=4, help="examples per forward (default 4)")
    src.add_argument(
        "--levels", type=_levels, default=[0.5, 0.75, 0.9, 0.99],
        help="sparsity levels to measure, comma-separated (default 0.5,0.75,0.9,0.99)",
    )
    src.add_argument("--rank", type=int, default=8, help="SVD estimator rank (default 8)")
    src.add_argument("--selector", default=DEFAULT_SELECTOR, choices=list(SELECTORS),
                     help=f"channel selector (default {DEFAULT_SELECTOR}, the library's; svd is the paper's estimator)")
    src.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    src.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
        help="model dtype (default bfloat16, as training runs; float32 is much slower on CPU)",
    )
    src.add_argument("--estimator-dir", help="cache folder of SVD estimator factors (default: a temporary one)")
    src.add_argument("--threads", type=int, help="torch CPU threads (default: half the usable cores, at most 4 — "
                     "the rule of every sparselora command)")
    src.add_argument(
        "--from-json", metavar="FILE",
        help="skip measuring: re-use a sensitivity.json of an earlier run (e.g. for another --budget)",
    )
    ch = p.add_argument_group("what to choose")
    ch.add_argument("--budget", type=float, required=True, help="FLOPs of a sparse step as a fraction of dense, e.g. 0.5")
    ch.add_argument(
        "--lora-rank", type=int, default=None,
        help="LoRA rank assumed by the FLOP model (default: the adapter's, else 32)",
    )
    ch.add_argument(
        "--lora-targets", default=None,
        help="LoRA targets assumed by the FLOP model, e.g. q,k,v,o,gate,up,down (default: the adapter's, else q,k,v,o)",
    )
    ch.add_argument(
        "--loss-bound", type=loss_bound_type(None), default=DEFAULT_LOSS_BOUND, metavar="X|off",
        help="the bound of --probe loss: after choosing, scale the sparsity down until the whole config's frozen "
             "loss on the calibration batches rises at most X (relative) over dense, as `finetune --loss-bound` "
             "does; 'off' writes the choice as is, still measured, whatever --probe says "
             f"(default {DEFAULT_LOSS_BOUND:g}, the same as finetune's)",
    )
    ch.add_argument(
        "--probe", choices=CRITERIA, default=run_probe,
        help="what the back-off bounds, as `finetune --probe`: 'kl', the mean KL(dense || sparse) of the "
             "next-token distributions over the labelled tokens (--kl-bound), which also sees the changes to "
             "short answers that the mean loss hides; 'loss', the relative rise of the mean loss (--loss-bound) "
             f"(default {run_probe}, the same as finetune's)",
    )
    ch.add_argument(
        "--kl-bound", type=float, default=DEFAULT_KL_BOUND, metavar="NATS",
        help=f"the bound of --probe kl, in nats per labelled token (default {DEFAULT_KL_BOUND:g}, finetune's)",
    )
    ch.add_argument("--start-step", type=float, default=0.05, help="dense warm-up written into the config (default 0.05)")
    ch.add_argument("--output", "-o", help="output folder (default: sensitivity-<model name>)")


def _err(msg: str) -> None:
    print(f"sparselora sensitivity: error: {msg}", file=sys.stderr)


def _adapter_lora(adapter: str) -> tuple[int | None, list[str] | None]:
    path = Path(adapter) / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--adapter {adapter}: no adapter_config.json there (is it a PEFT LoRA adapter folder?)")
    cfg = json.loads(path.read_text())
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    short = sorted({t.rsplit(".", 1)[-1].removesuffix("_proj") for t in targets} & set(PROJS))
    return cfg.get("r"), short or None


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _progress(start: float, total_blocks: int):
    done = [0]

    def report(kind, layer, n_layers, seconds, losses):
        done[0] += 1
        elapsed = time.perf_counter() - start
        eta = elapsed / done[0] * (total_blocks - done[0])
        vals = " ".join(f"{v:.4f}" for v in losses)
        print(
            f"  layer {layer:>3}/{n_layers - 1} {kind:<4} loss {vals}  ({seconds:.1f} s; {done[0]}/{total_blocks}, "
            f"eta {eta / 60:.1f} min)",
            file=sys.stderr,
            flush=True,
        )

    return report


def _user_error(msg: str):
    from sparselora.cli.main import CLIError

    return CLIError(msg)


class _Infeasible(Exception):
    """The budget cannot be reached (exit code EXIT_INFEASIBLE)."""


@contextlib.contextmanager
def _reported(*types: type[BaseException], prefix: str = ""):
    """Exceptions of ``types`` raised inside become one-line user errors (``prefix`` + their message); the
    budget's infeasibility becomes `_Infeasible`."""
    from sparselora.sensitivity import InfeasibleBudgetError

    try:
        yield
    except InfeasibleBudgetError as exc:
        raise _Infeasible(str(exc)) from None
    except types as exc:
        raise _user_error(f"{prefix}{exc}") from None


def run(args) -> int:
    """The command: user errors (CLIError, one line) exit EXIT_ERROR, an unreachable budget EXIT_INFEASIBLE,
    Ctrl-C 130; anything else propagates to `sparselora.cli.main` (one line there too)."""
    from sparselora.cli.main import CLIError

    try:
        return _run(args)
    except _Infeasible as exc:
        _err(str(exc))
        return EXIT_INFEASIBLE
    except CLIError as exc:
        _err(str(exc))
        return EXIT_ERROR
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


@dataclasses.dataclass
class _Inputs:
    """What the measurement (or an earlier one, --from-json) gives the choice and the outputs."""

    arch: Any
    calib: dict
    source: dict
    model_name: str
    out_dir: Path
    tok_stats: dict
    lora_rank: int
    lora_targets: list
    levels: list
    sens: Any = None  # with --from-json: the earlier measurements
    model: Any = None  # measured now: the model and its calibration batches
    batches: list | None = None


def _check_args(args):
    from sparselora import sensitivity as S
    from sparselora.train import set_threads

    if getattr(args, "threads", None) is not None and args.threads < 0:
        raise _user_error(f"--threads must be >= 1, got {args.threads}")
    set_threads(getattr(args, "threads", None))
    bound = getattr(args, "loss_bound", DEFAULT_LOSS_BOUND)
    if bound is not None and not (math.isfinite(bound) and bound >= 0):
        raise _user_error(f"--loss-bound {bound:g} must be >= 0: the largest relative rise of the frozen loss over "
                          f"dense that the written config may cause (e.g. {DEFAULT_LOSS_BOUND:g}), or 'off'")
    kl = getattr(args, "kl_bound", DEFAULT_KL_BOUND)
    if not (math.isfinite(kl) and kl >= 0):
        raise _user_error(f"--kl-bound {kl:g} must be >= 0: the largest mean KL(dense || sparse), in nats per "
                          f"labelled token, that the written config may cause (e.g. {DEFAULT_KL_BOUND:g})")
    if not 0.0 < args.budget <= 1.0:
        raise _user_error(f"--budget {args.budget} must be in (0, 1]: the FLOPs of a sparse step as a fraction of dense")
    with _reported(ValueError):
        return S.check_levels(args.levels)


def _from_json(args, lora_rank, lora_targets) -> _Inputs:
    """Earlier measurements, re-used for another budget: no model run."""
    from sparselora import sensitivity as S
    from sparselora.models.registry import ArchInfo

    with _reported(OSError, KeyError, ValueError, TypeError, prefix=f"cannot read --from-json {args.from_json}: "):
        rec = json.loads(Path(args.from_json).read_text())
        sens = S.Sensitivity.from_dict(rec["sensitivity"])
        arch = ArchInfo(**rec["arch"])
        calib = rec["calibration"]
    source = dict(rec.get("source", {}))
    source["from_json"] = str(args.from_json)
    args.rank = sens.estimator_rank
    return _Inputs(
        arch=arch, calib=calib, source=source, model_name=source.get("model", "model"),
        out_dir=Path(args.output or Path(args.from_json).parent), tok_stats=rec.get("tokenize", {}),
        lora_rank=lora_rank or rec.get("flops", {}).get("lora_rank", 32),
        lora_targets=lora_targets or rec.get("flops", {}).get("lora_targets", list(ATTN_PROJS)),
        levels=sens.levels,  # the measured levels decide; --levels is ignored with --from-json
        sens=sens,
    )


def _load(args, levels, lora_rank, lora_targets) -> _Inputs:
    """The model (+ adapter), frozen, and the calibration batches of --samples examples of --data."""
    import torch

    from sparselora import sensitivity as S
    from sparselora.data import DataCollator, load_examples, tokenize_examples
    from sparselora.loading import load_model
    from sparselora.models.registry import arch_info

    if not args.model or not args.data:
        raise _user_error("--model and --data are required (or --from-json FILE to re-use earlier measurements)")
    for name in ("samples", "batch_size", "max_length", "rank"):
        if getattr(args, name) < 1:
            raise _user_error(f"--{name.replace('_', '-')} must be >= 1")
    if args.adapter:
        with _reported(OSError, ValueError):
            a_rank, a_targets = _adapter_lora(args.adapter)
        lora_rank = lora_rank or a_rank
        lora_targets = lora_targets or a_targets
    lora_rank = lora_rank or 32
    lora_targets = lora_targets or list(ATTN_PROJS)

    with _reported(OSError, ValueError):
        examples = load_examples(args.data, fmt=args.format)
    rng = random.Random(args.seed)
    idx = sorted(rng.sample(range(len(examples)), min(args.samples, len(examples))))
    picked = [examples[i] for i in idx]
    device = _device(args.device)
    dtype = getattr(torch, args.dtype)
    print(f"loading {args.model} ({args.dtype}, {device}) ...", file=sys.stderr, flush=True)
    with _reported(OSError, ValueError):  # ModelLoadError / UnsupportedModelError are ValueErrors
        model, tokenizer = load_model(args.model, dtype=dtype, device=device)
        arch = arch_info(model.config)
    if args.adapter:
        model = _with_adapter(model, args, device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    with _reported(ValueError):
        features, stats = tokenize_examples(picked, tokenizer, max_length=args.max_length)
    if len(features) < len(picked):
        print(f"note: {stats.summary()}", file=sys.stderr)
    batches = S.make_batches(features, DataCollator(tokenizer), args.batch_size)
    calib = S.batch_stats(batches)
    calib["batch_size"] = args.batch_size
    source = {
        "model": str(args.model),
        "adapter": args.adapter,
        "data": str(args.data),
        "samples": len(features),
        "seed": args.seed,
        "max_length": args.max_length,
        "dtype": args.dtype,
        "device": str(device),
        "example_indices": idx,
    }
    model_name = Path(str(args.model)).name or str(args.model)
    return _Inputs(arch=arch, calib=calib, source=source, model_name=model_name,
                   out_dir=Path(args.output or f"sensitivity-{model_name}"), tok_stats=stats.as_dict(),
                   lora_rank=lora_rank, lora_targets=lora_targets, levels=levels, model=model, batches=batches)


def _with_adapter(model, args, device):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, args.adapter, is_trainable=False).to(device)
    except Exception as exc:  # peft raises many kinds
        if "size mismatch" in str(exc):  # one line, not one per tensor
            from sparselora.cli.eval import base_of_adapter

            exc = (f"it was trained on another base model ({base_of_adapter(Path(args.adapter)) or 'unknown'}), "
                   f"not {args.model}: its weight shapes do not fit; pass that base with --model")
        raise _user_error(f"cannot load adapter {args.adapter}: {exc}") from None


def _measure(args, run: _Inputs, min_ratio: float):
    from sparselora import sensitivity as S
    from sparselora.models.registry import UnsupportedModelError

    calib, arch, levels = run.calib, run.arch, run.levels
    n_blocks = arch.num_layers * 2
    print(
        f"calibration: {calib['sequences']} sequences, avg {calib['avg_length']:.0f} tokens "
        f"({calib['avg_labelled']:.0f} labelled) in {len(run.batches)} batches; measuring {arch.num_layers} layers "
        f"x 2 x {len(levels)} levels = {n_blocks * len(levels)} passes (lowest reachable FLOP ratio "
        f"{min_ratio:.3f})",
        file=sys.stderr,
        flush=True,
    )
    with _reported(ValueError, UnsupportedModelError):
        return S.measure_sensitivity(
            run.model,
            run.batches,
            levels,
            selector=args.selector,
            estimator_rank=args.rank,
            estimator_dir=args.estimator_dir,
            progress=_progress(time.perf_counter(), n_blocks),
            seed=args.seed,
        )


def _run(args) -> int:
    """Check the arguments, measure (or read earlier measurements), choose for the budget, write the outputs."""
    from sparselora import sensitivity as S

    t_start = time.perf_counter()
    levels = _check_args(args)
    lora_rank, lora_targets = args.lora_rank, args.lora_targets.split(",") if args.lora_targets else None
    if args.from_json:
        run = _from_json(args, lora_rank, lora_targets)
    else:
        run = _load(args, levels, lora_rank, lora_targets)
    arch, calib, sens = run.arch, run.calib, run.sens
    lora_rank, lora_targets, levels = run.lora_rank, run.lora_targets, run.levels

    batch_shape = (int(calib.get("batch_size", 1)), max(1, round(calib["avg_length"])))
    labelled = min(batch_shape[1], round(calib["avg_labelled"]))
    flop_kw = dict(lora_rank=int(lora_rank), lora_targets=list(lora_targets))
    selector = sens.selector if sens is not None else args.selector
    with _reported(ValueError):
        min_ratio = S.check_budget(arch, args.budget, levels, batch_shape, labelled, args.rank, **flop_kw,
                                   selector=selector)
    if not args.from_json:
        sens = _measure(args, run, min_ratio)
    with _reported():
        choice = S.choose_config(
            sens, arch, args.budget, batch_shape, labelled, start_step=args.start_step, **flop_kw
        )
    probe = None
    if args.from_json:
        print("note: not probed (--from-json has no model): the written config is the additive choice; "
              "`sparselora finetune` probes it before training (--probe)", file=sys.stderr)
    elif choice.config.is_sparse:
        probe = _probe(args, run, choice.config)
        probe.update(_final_cost(probe["calibration"].config, arch, batch_shape, labelled, flop_kw))
    return _write_outputs(args, run, sens, choice, probe, batch_shape, labelled, t_start)


def _probe(args, run: _Inputs, cfg) -> dict:
    """The chosen config measured whole on the calibration batches, backed off by `sparselora.calibrate` (the
    mechanism `finetune` uses) until --probe's criterion is within its bound (--kl-bound or --loss-bound; none
    with --loss-bound off); with the lines that say so."""
    import warnings

    import torch

    from sparselora.calibrate import calibrate
    from sparselora.patch import apply_sparselora, remove_sparselora

    criterion = args.probe
    bound = None if args.loss_bound is None else (args.kl_bound if criterion == "kl" else args.loss_bound)
    model = run.model
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in run.batches]
    torch.manual_seed(args.seed)  # the random selector draws as in the measurement
    with _reported(ValueError):
        apply_sparselora(model, cfg, estimator_dir=args.estimator_dir)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the lines below say it, the warning included
            # levels only: the sampled rows a layer needs depend on the training batch's size, so finetune's own
            # probe spreads them on the run's batches
            cal = calibrate(model, batches, bound=math.inf if bound is None else bound, criterion=criterion,
                            spread=False)
    finally:
        remove_sparselora(model)
    where = f"the {len(batches)} calibration batches"
    if bound is None:
        r = cal.rounds[0]
        kl = f", KL {r['kl']:.4f}" if "kl" in r else ""
        lines = [f"joint probe (frozen model, {where}): dense loss {cal.dense_loss:.4f}, the whole config "
                 f"{r['sparse_loss']:.4f} ({r['increase']:+.1%}{kl}); --loss-bound off: written as chosen"]
    else:
        lines = cal.lines(batches=where, using="writing")
    return {"calibration": cal, "bound": bound, "criterion": criterion, "lines": lines}


def _final_cost(cfg, arch, batch_shape, labelled, flop_kw) -> dict:
    """The FLOP ratio of the written (possibly backed-off) config, as the choice counted it."""
    from sparselora.flop_count import flops

    return {"ratio": flops(arch, cfg, batch_shape, labelled, **flop_kw)["ratio"]}


def _outcome(args, sens, choice, probe) -> dict:
    """The written config and what was predicted and measured about it (the "choice" of sensitivity.json)."""
    chosen = choice.config
    out = {
        "budget": args.budget,
        "ratio": choice.ratio,  # of the written config (below: after a back-off)
        "chosen_ratio": choice.ratio,  # of the choice for the budget
        "predicted_delta": choice.predicted_delta,  # additive, absolute (loss units)
        "predicted_increase": choice.predicted_delta / sens.dense_loss if sens.dense_loss else None,  # relative
        "measured_delta": None if args.from_json else 0.0,  # the choice applied whole, absolute
        "measured_increase": None if args.from_json else 0.0,  # relative, as --loss-bound counts it
        "loss_bound": None if args.from_json else args.loss_bound,
        "probe_criterion": None if args.from_json else args.probe,
        "kl_bound": None if args.from_json else args.kl_bound,
        "probe": None,
        "config": chosen.to_dict(),
        "chosen_config": chosen.to_dict(),
    }
    if probe is not None:
        cal = probe["calibration"]
        first = cal.rounds[0]
        out.update(
            ratio=probe["ratio"],
            measured_delta=first["sparse_loss"] - cal.dense_loss,
            measured_increase=first["increase"],
            config=cal.config.to_dict(),
            probe={"dense_loss": cal.dense_loss, "bound": probe["bound"], "criterion": probe["criterion"],
                   "rounds": cal.rounds,
                   "scale": cal.rounds[-1]["scale"], "within_bound": probe["bound"] is None or cal.within_bound},
        )
    return out


def _write_outputs(args, run: _Inputs, sens, choice, probe, batch_shape, labelled, t_start) -> int:
    """The table, the choice and its probe on the terminal; sparsity.yaml (with a header that says how it was
    chosen and probed), sensitivity.json, table.md and heatmap.png in the output folder."""
    from sparselora import sensitivity as S
    from sparselora.io import atomic_write_json, atomic_write_text

    calib, source, arch = run.calib, run.source, run.arch
    model_name, out_dir, tok_stats = run.model_name, run.out_dir, run.tok_stats
    lora_rank, lora_targets = run.lora_rank, run.lora_targets
    outcome = _outcome(args, sens, choice, probe)
    cfg = probe["calibration"].config if probe is not None else choice.config  # what is written
    scale = outcome["probe"]["scale"] if probe is not None else 1.0
    title = (
        f"{model_name}: loss increase per layer (dense loss {sens.dense_loss:.4f}; {calib['sequences']} samples; "
        f"selector {sens.selector} r={sens.estimator_rank})"
    )
    S.print_table(sens, cfg, title=title)
    total = time.perf_counter() - t_start
    pred_rel = outcome["predicted_increase"]
    summary = [
        f"chosen for the budget: FLOP ratio {choice.ratio:.4f} (budget {args.budget:g}; lowest reachable "
        f"{choice.min_ratio:.4f}), predicted (additive) loss increase {choice.predicted_delta:+.4f}"
        + (f" ({pred_rel:+.1%})" if pred_rel is not None else "")
    ]
    if probe is not None:
        m_abs, m_rel = outcome["measured_delta"], outcome["measured_increase"]
        times = f", {m_abs / choice.predicted_delta:.1f}x the prediction" if min(m_abs, choice.predicted_delta) > 0 else ""
        summary.append(f"measured with the whole config at once: {m_abs:+.4f} ({m_rel:+.1%}){times}")
        summary += probe["lines"]
        if scale < 1.0:
            over = outcome["ratio"] > args.budget + 1e-12
            summary.append(
                f"written: the choice's sparsity x{scale:.2f}, FLOP ratio {outcome['ratio']:.4f}"
                + (f" (above the budget {args.budget:g}: the {'KL' if args.probe == 'kl' else 'loss'} bound wins; --loss-bound off keeps "
                   "the choice)"
                   if over else "")
            )
            if outcome["ratio"] >= 1.0:
                summary.append("WARNING: at these levels a sparse step costs more than a dense one (the selector "
                               "costs more than they save): train dense (finetune --dense), or raise --{args.probe}-bound")
    for line in summary:
        print(line, file=sys.stderr if "WARNING" in line else sys.stdout)
    print(f"FFN sparsity:  {cfg.to_dict()['ffn_sparsity'] or '{} (all dense)'}")
    print(f"attn sparsity: {cfg.to_dict()['attn_sparsity'] or '{} (all dense)'}")

    header = [
        f"SparseLoRA layer-wise sparsity chosen by `sparselora sensitivity` (sparselora {_version()})",
        f"model: {source.get('model')}" + (f" + adapter {source['adapter']}" if source.get("adapter") else ""),
        f"data: {source.get('data')} ({calib['sequences']} examples, seed {source.get('seed')}, "
        f"max_length {source.get('max_length')}, {source.get('dtype')})",
        "measured: loss increase on the labelled tokens when one layer's FFN or attention alone is sparse,",
        f"  levels {', '.join(f'{v:g}' for v in sens.levels)}, selector {sens.selector}, estimator rank "
        f"{sens.estimator_rank}; dense loss {sens.dense_loss:.4f}",
        f"chosen: least predicted (additive) loss increase {choice.predicted_delta:+.4f} with FLOPs <= "
        f"{args.budget:g} x dense",
        f"  (ratio {choice.ratio:.4f} per sparselora.flops at batch {batch_shape[0]}x{batch_shape[1]}, "
        f"{labelled} labelled tokens, LoRA r={lora_rank} on {','.join(lora_targets)})",
    ]
    if probe is not None:
        p = outcome["probe"]
        header.append(f"probed whole: loss increase {outcome['measured_delta']:+.4f} ({outcome['measured_increase']:+.1%}"
                      f" over dense {p['dense_loss']:.4f})")
        if p["bound"] is None:
            header.append("  --loss-bound off: written as chosen")
        else:
            kl = p["criterion"] == "kl"
            bound = f"KL <= {p['bound']:g} nats/token" if kl else f"+{p['bound'] * 100:g}%"
            last = p["rounds"][-1]
            got = f"KL {last['kl']:.4f}" if kl else f"increase {last['increase']:+.1%}"
            if len(p["rounds"]) == 1 and p["within_bound"]:
                header.append(f"  within the bound {bound} as chosen ({got}): not backed off")
            else:
                header.append(f"  bound {bound}: backed off (sparselora.calibrate) in {len(p['rounds'])} rounds to "
                              f"x{scale:.2f}: {got}, FLOP ratio {outcome['ratio']:.4f}"
                              + ("" if p["within_bound"] else "; WARNING: above the bound"))
    elif args.from_json:
        header.append("not probed (--from-json, no model): finetune probes it before training")
    header += [
        "use: sparselora finetune ... --sparsity this.yaml",
        '  or: SparseLoRAConfig.from_yaml("this.yaml") in Python',
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    yaml_path = out_dir / "sparsity.yaml"
    atomic_write_text(yaml_path, S.yaml_header(header) + cfg.to_yaml())
    record = {
        "source": source,
        "arch": _asdict(arch),
        "calibration": calib,
        "tokenize": tok_stats,
        "sensitivity": sens.to_dict(),
        "flops": {
            "batch_shape": list(batch_shape),
            "labelled_tokens": labelled,
            "lora_rank": int(lora_rank),
            "lora_targets": list(lora_targets),
            "min_ratio": choice.min_ratio,
            **choice.flops,
        },
        "choice": outcome,
        "seconds_total": total,
    }
    atomic_write_json(out_dir / "sensitivity.json", _finite(record))
    text = "\n".join(summary)
    atomic_write_text(out_dir / "table.md", f"{title}\n\n{S.format_table(sens, cfg)}\n\n{text}\n")
    # boxed: the choice for the budget (the measured levels); a back-off scales them (the table shows the result)
    png = S.write_heatmap(sens, out_dir / "heatmap.png", choice.config,
                          title=title + (f"; boxed: the budget's choice, written x{scale:.2f}" if scale < 1 else ""))
    print(f"wrote {yaml_path}, {out_dir / 'sensitivity.json'}, {out_dir / 'table.md'}", end="")
    print(f", {out_dir / 'heatmap.png'}" if png else " (no heatmap: pip install matplotlib)")
    print(f"time: {total:.1f} s ({sens.seconds:.1f} s measuring, {sens.forwards} forwards)")
    return EXIT_OK


def _asdict(obj) -> dict:
    import dataclasses

    return dataclasses.asdict(obj)


def _finite(obj):
    """JSON without NaN/inf (they become null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _version() -> str:
    try:
        from sparselora import __version__

        return __version__
    except ImportError:
        return "?"


def main(argv=None) -> int:
    """`python -m sparselora.cli.sensitivity ...` (the same as `sparselora sensitivity ...`)."""
    parser = argparse.ArgumentParser(prog="sparselora")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["sensitivity", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
