"""Data-parallel scaling of a LoRA step, dense (stock PEFT) vs SparseLoRA, on 1..N GPUs of one host.

    python benchmarks/bench_ddp.py --gpus 1,2,4,8 --shape llama3-8b --batch-preset math   # launches torchrun per N
    torchrun --nproc_per_node 8 benchmarks/bench_ddp.py --shape llama3-8b                 # one N only
    python benchmarks/bench_ddp.py --gpus 1,2 --shape tiny --device cpu                   # CPU/gloo smoke test

Weak scaling: every rank runs the batch preset's micro-batch (random bf16 weights of the shape, the last
`labelled` tokens of each row labelled), so the global batch is N micro-batches. Each rank selects its own
channels; LoRA gradients are all-reduced by DDP (or FSDP2 with --wrap fsdp2). Per step we time forward,
backward and AdamW; a step's time is the slowest rank's; the median over the measured steps is reported.
Dense and sparse alternate in rounds (apply_sparselora / remove_sparselora between rounds, the estimator
loaded from its cache after the first build) so drift hits both alike. With --wrap fsdp2 the weights are
sharded, so sparselora cannot be re-applied: dense is sparselora switched off (`set_enabled(False)`).

Reported per N: step ms, global tokens/s, sparse speed-up over dense, and scaling efficiency
tokens/s(N) / (N * tokens/s(1)) for each mode.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ALL_PROJ,
    BATCH_PRESETS,
    SHAPES,
    build_base_model,
    git_commit,
    gpu_slug,
    make_batch,
    median,
    paper_preset,
    QKVO,
    versions,
)
from sparselora.io import atomic_write_json  # noqa: E402



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", default=None, help="driver mode: comma list of world sizes, e.g. 1,2,4,8")
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--batch-preset", default="math", choices=sorted(BATCH_PRESETS))
    p.add_argument("--batch", default=None, help="BxT per rank, overrides the preset, e.g. 8x512")
    p.add_argument("--labelled", type=int, default=None)
    p.add_argument("--preset", default=None, help="SparseLoRA preset (default: the shape/batch one, else 'scaled')")
    p.add_argument("--lora-targets", default="qkvo", choices=["qkvo", "all"])
    p.add_argument("--lora-r", type=int, default=32)
    p.add_argument("--lora-alpha", type=int, default=64)
    p.add_argument("--wrap", default="ddp", choices=["ddp", "fsdp2"])
    p.add_argument("--steps", type=int, default=20, help="measured steps per mode")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per mode and round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--timeout", type=int, default=1800, help="driver: seconds per torchrun launch")
    p.add_argument("--out", default=None, help="JSON (default benchmarks/results/ddp-<shape>-<batch>-<gpu>.json)")
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)  # worker: where rank 0 writes its result
    a = p.parse_args(argv)
    b, t, lab = BATCH_PRESETS[a.batch_preset]
    if a.shape == "tiny":  # smoke-test size, as bench_step.py
        b, t, lab = min(b, 2), t // 4, min(lab, t // 16)
    if a.batch:
        b, t = (int(x) for x in a.batch.lower().split("x"))
    a.batch_size, a.seq = b, t
    a.labelled = a.labelled if a.labelled is not None else min(lab, t)
    if a.preset is None:
        a.preset = paper_preset(a.shape, a.batch_preset)
    return a


# -- worker: one rank ----------------------------------------------------------------------------------------
def worker(a) -> None:
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model

    import sparselora

    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = a.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=20))
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, a.dtype)

    base = build_base_model(a.shape, None, device, dtype=dtype, seed=0)
    targets = ALL_PROJ if a.lora_targets == "all" else QKVO
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=0.0,
                                            target_modules=targets, bias="none", task_type="CAUSAL_LM")).train()
    kw = {"num_layers": base.config.num_hidden_layers} if a.preset == "scaled" else {}
    cfg = sparselora.SparseLoRAConfig.from_preset(a.preset, **kw)
    cfg.start_step = 0
    est_dir = [tempfile.mkdtemp(prefix="sparselora-ddp-est-") if rank == 0 else None]
    dist.broadcast_object_list(est_dir, src=0, device=device if cuda else None)
    est_dir = est_dir[0]

    t = time.perf_counter()
    sparselora.apply_sparselora(model, cfg, estimator_dir=est_dir)  # rank 0 builds, the others receive
    build_s = time.perf_counter() - t
    if a.wrap == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        step_model = model
    else:
        from torch.nn.parallel import DistributedDataParallel as DDP

        step_model = DDP(model, device_ids=[local] if cuda else None, gradient_as_bucket_view=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    batch = make_batch(base.config.vocab_size, a.batch_size, a.seq, a.labelled, device, seed=1000 + rank)

    def set_mode(mode: str) -> None:
        applied = sparselora.patch.get_state(model, required=False) is not None
        if a.wrap == "fsdp2":
            sparselora.set_enabled(model, mode == "sparse")
        elif mode == "sparse" and not applied:
            sparselora.apply_sparselora(model, cfg, estimator_dir=est_dir)
        elif mode == "dense" and applied:
            sparselora.remove_sparselora(model)  # stock PEFT

    def step() -> tuple[float, float]:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step_model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, loss.item()

    times = {"dense": [], "sparse": []}
    peak = {"dense": 0, "sparse": 0}
    losses = {}
    per_round = max(1, a.steps // a.rounds)
    for r in range(a.rounds):
        for mode in ("dense", "sparse") if r % 2 == 0 else ("sparse", "dense"):
            set_mode(mode)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            for _ in range(a.warmup):
                _, loss = step()
                losses.setdefault(mode, loss)
            for _ in range(per_round):
                dt, _ = step()
                slowest = torch.tensor([dt], device=device)
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                times[mode].append(slowest.item())
            if cuda:
                peak[mode] = max(peak[mode], torch.cuda.max_memory_allocated())
    if rank == 0:
        tokens = a.batch_size * a.seq * world
        res = {"world_size": world, "estimator_build_s": build_s}
        for mode in times:
            ms = median(times[mode]) * 1e3
            res[mode] = {"step_ms": ms, "tokens_per_s": tokens / (ms / 1e3), "peak_gib_rank0": peak[mode] / 2**30,
                         "first_loss": losses.get(mode)}
        res["sparse_speedup"] = res["dense"]["step_ms"] / res["sparse"]["step_ms"]
        atomic_write_json(a.part, res)
        shutil.rmtree(est_dir, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()


# -- driver: one torchrun launch per world size ---------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def driver(a, argv) -> None:
    sizes = [int(x) for x in a.gpus.split(",")]
    if a.device.startswith("cuda") and max(sizes) > torch.cuda.device_count():
        sys.exit(f"--gpus asks for {max(sizes)} GPUs, this machine has {torch.cuda.device_count()}")
    passthrough, skip = [], False
    for x in argv:  # everything but --gpus/--out goes to the workers
        if skip:
            skip = False
            continue
        if x in ("--gpus", "--out", "--timeout"):
            skip = True
            continue
        if x.startswith(("--gpus=", "--out=", "--timeout=")):
            continue
        passthrough.append(x)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            part = Path(tmp) / f"{n}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(n),
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__, *passthrough,
                   "--part", str(part)]
            print(f"[bench_ddp] N={n}: {' '.join(cmd)}", flush=True)
            subprocess.run(cmd, check=True, timeout=a.timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))
            results.append(json.loads(part.read_text()))
    one = next((r for r in results if r["world_size"] == 1), None)
    for r in results:
        for mode in ("dense", "sparse"):
            r[mode]["scaling_efficiency"] = (
                r[mode]["tokens_per_s"] / (r["world_size"] * one[mode]["tokens_per_s"]) if one else None
            )
    device = torch.device(a.device if not a.device.startswith("cuda") else "cuda:0")
    record = {
        "benchmark": "ddp-scaling", "shape": a.shape, "batch_per_rank": [a.batch_size, a.seq],
        "labelled": a.labelled, "preset": a.preset, "wrap": a.wrap, "lora": {"r": a.lora_r, "alpha": a.lora_alpha,
        "targets": a.lora_targets}, "dtype": a.dtype, "steps": a.steps, "rounds": a.rounds,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "versions": versions(), "commit": git_commit(), "results": results,
    }
    out = a.out or Path(__file__).resolve().parent / "results" / f"ddp-{a.shape}-{a.batch_preset}-{gpu_slug(device)}.json"
    atomic_write_json(out, record)
    print(f"\n{'N':>3} {'dense ms':>9} {'sparse ms':>9} {'speedup':>8} {'dense tok/s':>12} {'sparse tok/s':>12} "
          f"{'dense eff':>9} {'sparse eff':>10}")
    for r in results:
        d, s = r["dense"], r["sparse"]
        eff = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        print(f"{r['world_size']:>3} {d['step_ms']:>9.1f} {s['step_ms']:>9.1f} {r['sparse_speedup']:>8.2f} "
              f"{d['tokens_per_s']:>12.0f} {s['tokens_per_s']:>12.0f} {eff(d['scaling_efficiency']):>9} "
              f"{eff(s['scaling_efficiency']):>10}")
    print(f"wrote {out}")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    if a.part:
        worker(a)
    elif a.gpus:
        driver(a, argv)
    elif "RANK" in os.environ:  # launched by torchrun directly: one world size, result printed and saved
        a.part = a.out or str(Path(__file__).resolve().parent / "results" / f"ddp-{a.shape}-{a.batch_preset}-n{os.environ.get('WORLD_SIZE')}.json")
        worker(a)
    else:
        sys.exit("pass --gpus 1,2,... (driver) or launch with torchrun --nproc_per_node N")


if __name__ == "__main__":
    main()
