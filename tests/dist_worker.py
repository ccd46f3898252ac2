"""One rank of the distributed tests (launched by tests/test_distributed.py through torchrun, 2 CPU processes,
gloo). Rank 0 writes what the test compares under OUT (the first argument after the scenario).

    torchrun --nproc_per_node 2 tests/dist_worker.py loop OUT      # DDP + FSDP2 plain loops, estimator sharing
    torchrun --nproc_per_node 2 tests/dist_worker.py trainer OUT   # HF Trainer + callback, checkpoints, resume
    accelerate launch --multi_gpu --num_processes 2 tests/dist_worker.py loop,trainer OUT   # both (the test)
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import make_batch, tiny_peft  # noqa: E402

import sparselora  # noqa: E402
import sparselora.estimator  # noqa: E402
from sparselora import SparseLoRACallback, SparseLoRAConfig, apply_sparselora  # noqa: E402

STEPS, LR, WORLD = 3, 0.05, 2


def config(start_step=0):
    return SparseLoRAConfig(ffn_sparsity={1: 0.6, 2: 0.6}, attn_sparsity={2: 0.5}, estimator_rank=4, selector="svd",
                            start_step=start_step)


def global_batch(step: int) -> dict:
    # every row has 3 labelled tokens, so each rank's micro-batch has as many as the other: the mean of the
    # per-rank mean losses equals the global mean, and dense DDP equals one full-batch process exactly
    return make_batch(batch=4, seq=20, labelled=(3,), lengths=(20, 15, 12, 18), seed=100 + step)


def micro_batch(step: int, r: int) -> dict:
    return {k: v[2 * r: 2 * r + 2] for k, v in global_batch(step).items()}


def lora_state(model) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        if "lora_" in n:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[n.replace("module.", "")] = t.detach().clone()
    return out


def mean_over_ranks(x: torch.Tensor) -> float:
    x = x.detach().clone()
    dist.all_reduce(x)
    return x.item() / dist.get_world_size()


def train_loop(model, step_model=None) -> list[float]:
    step_model = step_model or model
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for s in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = step_model(**micro_batch(s, dist.get_rank())).loss
        loss.backward()
        opt.step()
        losses.append(mean_over_ranks(loss))
    return losses


def error_of(fn) -> str | None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test reads the message
        return f"{type(e).__name__}: {e}"
    return None


def scenario_loop(out: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank = dist.get_rank()
    result: dict = {}

    # -- estimator: built by rank 0 only into estimator_dir, identical factors on every rank -----------------
    builds = {"n": 0}
    real = sparselora.estimator.low_rank_factors

    def counting(*a, **k):
        builds["n"] += 1
        return real(*a, **k)

    sparselora.estimator.low_rank_factors = counting
    model = tiny_peft()
    apply_sparselora(model, config(), estimator_dir=out / "est")
    sparselora.estimator.low_rank_factors = real
    est = sparselora.patch.get_state(model).estimator
    digest = sum(float(v.double().sum()) * (i + 1) for i, (k, v) in enumerate(sorted(est.factors.items())))
    result["estimator_builds"] = gather(builds["n"])
    result["estimator_digests"] = gather(digest)

    # -- an error on rank 0 reaches every rank instead of a hang: estimator_dir is a file on rank 0 only ------
    bad = out / f"not-a-dir-{rank}"
    if rank == 0:
        bad.write_text("x")
    result["estimator_error"] = gather(error_of(lambda: apply_sparselora(tiny_peft(), config(), estimator_dir=bad)))

    # -- DDP, sparse from step 0 (no find_unused_parameters) -----------------------------------------------
    ddp = DDP(model)
    result["ddp_sparse_losses"] = train_loop(model, ddp)
    result["kept_differ"] = gather(sparselora.kept_channels(model)[1]["ffn"].tolist())
    save(out / "ddp_sparse.pt", lora_state(model))

    # -- DDP, dense -----------------------------------------------------------------------------------------
    model = tiny_peft()
    result["ddp_dense_losses"] = train_loop(model, DDP(model))
    save(out / "ddp_dense.pt", lora_state(model))

    # -- FSDP2: fully_shard each decoder layer, then the root ------------------------------------------------
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        fully_shard = None
    if fully_shard is not None:
        model = tiny_peft()
        apply_sparselora(model, config())
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        result["fsdp2_sharded"] = type(next(p for n, p in model.named_parameters() if "lora_B" in n)).__name__
        result["fsdp2_sparse_losses"] = train_loop(model)
        save(out / "fsdp2_sparse.pt", lora_state(model))

        # refused: sharded before apply_sparselora
        model = tiny_peft()
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        result["fsdp2_wrong_order"] = error_of(lambda: apply_sparselora(model, config()))

        # refused at the first sparse forward: FSDP units around single projections
        model = tiny_peft()
        apply_sparselora(model, config())
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            fully_shard(getattr(model.base_model.model.model.layers[2].self_attn, proj))
        fully_shard(model)
        result["fsdp2_proj_units"] = error_of(lambda: model(**micro_batch(0, rank)).loss.backward())
    if rank == 0:
        (out / "loop.json").write_text(json.dumps(result, indent=1))


def scenario_trainer(out: Path) -> None:
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Rows(Dataset):
        def __init__(self):
            b = make_batch(batch=16, seq=20, labelled=(3, 4, 2), lengths=(20, 15, 12, 18), seed=7)
            self.rows = [{k: v[i] for k, v in b.items()} for i in range(16)]

        def __len__(self):
            return 16

        def __getitem__(self, i):
            return self.rows[i]

    def collate(rows):
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def run(output_dir: Path, resume: str | None = None):
        model = tiny_peft()
        apply_sparselora(model, config(start_step=0.25), estimator_dir=out / "est")
        args = TrainingArguments(
            output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=2, learning_rate=LR,
            optim="sgd", lr_scheduler_type="constant", logging_steps=1, save_strategy="steps", save_steps=2,
            report_to=[], use_cpu=True, seed=0, ddp_backend="gloo", dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=Rows(), data_collator=collate,
                          callbacks=[SparseLoRACallback()])
        trainer.train(resume_from_checkpoint=resume)
        logs = [h for h in trainer.state.log_history if "loss" in h]
        return model, logs, trainer

    model, logs, _ = run(out / "a")
    save(out / "trainer_full.pt", lora_state(model))
    model, logs_b, trainer = run(out / "b", resume=str(out / "a" / "checkpoint-2"))
    save(out / "trainer_resumed.pt", lora_state(model))
    if dist.get_rank() == 0:
        (out / "trainer.json").write_text(json.dumps({
            "world_size": dist.get_world_size(), "logs": logs, "logs_resumed": logs_b,
            "wrapped": type(trainer.model_wrapped).__name__, "launcher": os.environ.get("ACCELERATE_LAUNCHER", "torchrun"),
        }, indent=1))


def gather(obj) -> list:
    box = [None] * dist.get_world_size()
    dist.all_gather_object(box, obj)
    return box


def save(path: Path, obj) -> None:
    if dist.get_rank() == 0:
        torch.save(obj, path)


def main():
    scenarios, out = sys.argv[1].split(","), Path(sys.argv[2])
    torch.set_num_threads(1)
    # evidence for the test that no rank runs interpreter teardown (see `shutdown`): atexit handlers run there
    rank = os.environ.get("RANK", "?")
    atexit.register(lambda: (out / f"finalized-rank{rank}").write_text("interpreter teardown ran\n"))
    if "loop" in scenarios:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
        scenario_loop(out)
    if "trainer" in scenarios:  # alone, the Trainer sets the process group up itself (through accelerate)
        scenario_trainer(out)
    shutdown()


def shutdown() -> None:
    """Leave without a crash at exit, by never running interpreter teardown.

    The test's own exit crash (issue 12 item 24) left no stack. An abort at exit with the same ingredients
    ("terminate called without an active exception", SIGABRT) was caught in core dumps of a minimal 2-rank gloo
    script (docs/distributed.md), 4 times, always the same way: a gloo worker thread
    (ProcessGroupGloo::runLoop) drops its reference to a finished collective after the caller has returned;
    when that is the last reference, the work's tensors are freed there, and a tensor whose Python object is
    then owned by C++ needs the GIL to release it. If the main thread has meanwhile begun Py_FinalizeEx,
    Python 3.11's take_gil ends the thread with pthread_exit, whose forced unwind reaches a noexcept C++
    destructor (~AsyncWork) -> std::terminate. destroy_process_group() does not prevent it: the worker threads
    keep running (the models and wrappers still hold the group; on CPU FSDP2 reuses the default group, there
    are no other groups), and the last collective may still be being released.

    So: every rank passes the barrier (all collectives done), waits on the launcher's store until every rank has
    (no rank closes a connection another still reads), destroys the group, and exits with os._exit(0): no
    Py_FinalizeEx, so no thread is ended while it holds C++ frames (the results are written and flushed
    before)."""
    import gc

    dist.barrier()
    store = dist.distributed_c10d._get_default_store()
    store.add("dist_worker_done", 1)
    deadline = time.monotonic() + 60
    while store.add("dist_worker_done", 0) < dist.get_world_size() and time.monotonic() < deadline:
        time.sleep(0.01)
    gc.collect()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
