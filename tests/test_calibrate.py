"""The sparsity probe: the whole config's frozen loss against dense, backed off until within the bound."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from sparselora import SparseLoRAConfig, apply_sparselora, kept_channels
from sparselora.calibrate import calibrate, frozen_loss
from sparselora.patch import get_state

from helpers import make_batch, tiny_peft


def _model(ffn=0.97, attn=0.9):
    model = tiny_peft("llama")
    apply_sparselora(model, SparseLoRAConfig(ffn_sparsity={"0-3": ffn}, attn_sparsity={"0-3": attn},
                                             selector="oracle", start_step=0.5))
    return model


def _batches():
    return [make_batch(seed=s) for s in (1, 2)]


def test_frozen_loss_is_dense_or_sparse_and_restores_the_model():
    model = _model()
    state = get_state(model)
    model.train()
    dense, sparse = frozen_loss(model, _batches(), sparse=False), frozen_loss(model, _batches(), sparse=True)
    with torch.no_grad():
        state.enabled = False
        ref = sum(float(model(**b).loss) for b in _batches()) / 2
        state.enabled = True
    assert dense == pytest.approx(ref, rel=1e-6) and sparse != dense
    assert model.training and state.enabled and not state.scheduled_on  # as before: dense warm-up still ahead


def test_backs_off_until_within_the_bound():
    model = _model()
    dense = frozen_loss(model, _batches(), sparse=False)
    first = frozen_loss(model, _batches(), sparse=True)
    bound = (first / dense - 1) / 4  # unreachable at the given levels
    cal = calibrate(model, _batches(), bound=bound, factor=0.5, max_rounds=8)
    assert len(cal.rounds) > 1 and cal.within_bound
    assert cal.rounds[0]["scale"] == 1.0 and cal.rounds[-1]["increase"] <= bound
    scale = cal.rounds[-1]["scale"]
    assert cal.config.ffn_sparsity[1] == pytest.approx(0.97 * scale)
    # the model runs the chosen levels: kept FFN channels of a sparse forward match the scaled sparsity
    state = get_state(model)
    state.scheduled_on = True
    model(**make_batch(seed=3))
    n = model.base_model.model.config.intermediate_size
    assert kept_channels(model)[1]["ffn"].numel() == max(1, round((1 - 0.97 * scale) * n))
    assert state.config is cal.config
    assert any("sparsity x" in line for line in cal.lines())


def test_within_bound_at_once_keeps_the_config_and_unreachable_bound_warns():
    model = _model(ffn=0.3, attn=0.2)
    cal = calibrate(model, _batches(), bound=10.0)
    assert len(cal.rounds) == 1 and cal.config.ffn_sparsity[0] == pytest.approx(0.3)
    model = _model()
    with pytest.warns(UserWarning, match="above the bound"):
        cal = calibrate(model, _batches(), bound=0.0, factor=0.9, max_rounds=2)
    assert not cal.within_bound and len(cal.rounds) == 2
    with pytest.raises(ValueError, match="bound"):
        calibrate(model, _batches(), bound=-1)


def test_finetune_probes_and_records_it(tmp_path, capsys):
    from test_cli import base_args, make_data, make_model_dir

    from sparselora.cli.main import main

    model, data = make_model_dir(tmp_path / "m"), make_data(tmp_path / "d.jsonl")
    env = {"model": str(model), "data": str(data), "est": str(tmp_path / "est")}
    (tmp_path / "sp.yaml").write_text("ffn_sparsity: {'0-3': 0.99}\nattn_sparsity: {'0-3': 0.9}\nselector: oracle\n")
    out = tmp_path / "run"
    assert main(base_args(env, out, "--max-steps", "2", "--lora-r", "4", "--sparsity", str(tmp_path / "sp.yaml"),
                          "--probe", "loss", "--loss-bound", "0.001", "--heldout", "4")) == 0
    err = capsys.readouterr().err
    assert "sparsity probe" in err and "dense loss" in err and "FLOP" in err
    summary = json.loads((out / "summary.json").read_text())
    cal = summary["calibration"]
    assert cal["rounds"] and cal["bound"] == 0.001 and cal["criterion"] == "loss"
    assert summary["heldout"]["examples"] == 4 and summary["heldout"]["dense_loss"] > 0
    ffn = summary["sparsity_config"]["ffn_sparsity"]
    assert list(ffn.values())[0] == pytest.approx(0.99 * cal["rounds"][-1]["scale"]), ffn
    off = tmp_path / "off"
    assert main(base_args(env, off, "--max-steps", "1", "--lora-r", "4", "--loss-bound", "off")) == 0
    summary = json.loads((off / "summary.json").read_text())
    assert summary["calibration"] is None and summary["heldout"] is None
    kl = tmp_path / "kl"  # the default criterion
    assert main(base_args(env, kl, "--max-steps", "1", "--lora-r", "4", "--sparsity", str(tmp_path / "sp.yaml"),
                          "--kl-bound", "0")) == 0
    err = capsys.readouterr().err
    assert "KL(dense || sparse) <= 0 nats" in err and "above the bound" in err
    cal = json.loads((kl / "summary.json").read_text())["calibration"]
    assert cal["criterion"] == "kl" and cal["bound"] == 0 and "kl" in cal["rounds"][-1]
    assert len(cal["rounds"]) > 1 and not cal["within_bound"]  # backed off as far as it goes


def test_kept_channels_are_empty_after_a_dense_forward():
    """kept_channels / sparsity_stats describe the last forward: empty after a dense one (issue 12 item 22)."""
    from sparselora import sparsity_stats

    model = tiny_peft("llama")
    apply_sparselora(model, SparseLoRAConfig(ffn_sparsity={"1-2": 0.5}, attn_sparsity={"1-2": 0.5}, start_step=0))
    model(**make_batch())
    assert set(kept_channels(model)) == {1, 2} and "sparselora/ffn_kept" in sparsity_stats(model)
    batch = make_batch()
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # no labels: dense
    assert kept_channels(model) == {} and "sparselora/ffn_kept" not in sparsity_stats(model)


def test_a_config_that_cannot_pay_is_flagged():
    from sparselora.fastpath import MIN_PAYING_FLOP_CUT, flop_cut_warning

    assert flop_cut_warning(MIN_PAYING_FLOP_CUT + 0.5) is None
    assert "no faster than dense" in flop_cut_warning(1.1)


def test_attention_too_mild_to_pay_runs_dense_and_says_so():
    from sparselora.fastpath import MIN_PAYING_ATTN_SPARSITY, paying_config

    cfg = SparseLoRAConfig.from_preset("llama3-8b-csr170k")  # attention 0.2 in 11 layers, FFN 0.97 in 17-30
    run, line = paying_config(cfg)
    assert run.attn_sparsity == {} and run.ffn_sparsity == cfg.ffn_sparsity
    assert "0.2 in layers 17-19,21-23,25-29 runs dense" in line
    assert cfg.attn_sparsity, "the given config is left as it was"
    math = SparseLoRAConfig.from_preset("llama3-8b-math10k")  # attention 0.75: it pays
    assert min(math.attn_sparsity.values()) >= MIN_PAYING_ATTN_SPARSITY and paying_config(math) == (math, None)
    mixed = SparseLoRAConfig(ffn_sparsity={3: 0.9}, attn_sparsity={"4-5": 0.3, 6: 0.8, 7: 0.3})
    run, line = paying_config(mixed)
    assert run.attn_sparsity == {6: 0.8} and "0.3 in layers 4-5,7" in line


def test_a_model_too_small_to_pay_on_a_gpu_is_flagged():
    from sparselora.fastpath import small_model_warning

    assert "hidden size (1536)" in small_model_warning(1536, "cuda")
    assert small_model_warning(4096, "cuda") is None
    assert small_model_warning(896, "cpu") is None  # the CPU demo's small model does gain (docs/performance.md)


def test_an_eager_gpu_run_is_flagged():
    """A sparse run on a GPU without CUDA graphs says it will be no faster than dense and what to do; a graphed
    run, a dense one and a CPU run say nothing."""
    from sparselora.fastpath import eager_gpu_warning

    msg = eager_gpu_warning("cuda", graphed=False, sparse=True)
    assert "no faster than dense" in msg and "CUDAGraphTrainer" in msg
    assert eager_gpu_warning("cuda", graphed=True, sparse=True) is None
    assert eager_gpu_warning("cuda", graphed=False, sparse=False) is None
    assert eager_gpu_warning("cpu", graphed=False, sparse=True) is None


@pytest.mark.parametrize("flags,message", [
    (["--loss-bound", "-1"], "loss_bound (--loss-bound) must be >= 0"),
    (["--loss-bound", "lots"], "--loss-bound takes a number"),
    (["--heldout", "-2"], "heldout (--heldout) must be"),
    (["--kl-bound", "-0.1"], "kl_bound (--kl-bound) must be >= 0"),
    (["--probe", "mean"], "invalid choice: 'mean'"),
    (["--heldout", "100000"], "leaves nothing to train on"),
])
def test_bad_probe_and_heldout_flags_are_clear_errors(tmp_path, capsys, flags, message):
    from test_cli import base_args, make_data, make_model_dir

    from sparselora.cli.main import main

    env = {"model": str(make_model_dir(tmp_path / "m")), "data": str(make_data(tmp_path / "d.jsonl")),
           "est": str(tmp_path / "est")}
    argparse_error = "takes a number" in message or "invalid choice" in message
    with pytest.raises(SystemExit) if argparse_error else contextlib.nullcontext():
        rc = main(base_args(env, tmp_path / "run", "--max-steps", "1", *flags))
        assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written


def test_frozen_kl_is_the_labelled_tokens_mean_kl_and_restores_the_model():
    from sparselora.calibrate import frozen_kl

    model = _model()
    state = get_state(model)
    model.train()
    batches = _batches()
    with torch.no_grad():
        model.eval()
        kls = []
        for b in batches:
            mask = b["labels"][:, 1:] != -100
            state.enabled, state.scheduled_on = False, True
            d = torch.log_softmax(model(**b).logits[:, :-1][mask].float(), -1)
            state.enabled = True
            s = torch.log_softmax(model(**b).logits[:, :-1][mask].float(), -1)
            kls.append(torch.nn.functional.kl_div(s, d, log_target=True, reduction="none").sum(-1))
        state.enabled, state.scheduled_on = True, False
        model.train()
    ref = float(torch.cat(kls).mean())
    kl = frozen_kl(model, batches, chunk=2)  # chunks smaller than a batch's labelled tokens
    assert kl == pytest.approx(ref, rel=1e-5) and kl > 0
    assert model.training and state.enabled and not state.scheduled_on
    # a config scaled to zero sparsity is the dense model: no divergence
    from sparselora.calibrate import scaled_config, set_levels

    set_levels(model, scaled_config(state.config, 0.0))
    assert frozen_kl(model, batches) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        frozen_kl(model, [dict(b, labels=torch.full_like(b["labels"], -100)) for b in batches])


def test_frozen_kl_with_the_fast_head_equals_the_plain_model():
    """The fast head returns no logits when labels are given; the KL probe then takes them from the last hidden
    state, and must measure the same as on the plain model."""
    from helpers import clone

    from sparselora.calibrate import frozen_kl

    plain = tiny_peft("llama")
    fast = clone(plain)
    cfg = lambda: SparseLoRAConfig(ffn_sparsity={"0-3": 0.9}, attn_sparsity={"0-3": 0.7},  # noqa: E731
                                   selector="oracle", start_step=0)
    apply_sparselora(plain, cfg())
    apply_sparselora(fast, cfg(), fast_kernels=True)
    assert fast(**make_batch(seed=1)).logits is None  # the branch under test
    a, b = frozen_kl(plain, _batches()), frozen_kl(fast, _batches())
    assert a > 0 and b == pytest.approx(a, rel=1e-4)


def test_kl_criterion_backs_off_until_the_kl_is_within_the_bound():
    from sparselora.calibrate import frozen_kl, scaled_config, set_levels

    model = _model()
    first = frozen_kl(model, _batches())
    bound = first / 20  # unreachable at the given levels
    cal = calibrate(model, _batches(), bound=bound, factor=0.5, max_rounds=8, criterion="kl")
    assert len(cal.rounds) > 1 and cal.within_bound and cal.criterion == "kl"
    assert cal.rounds[0]["kl"] == pytest.approx(first, rel=1e-5)
    assert all(r["kl"] > bound for r in cal.rounds[:-1]) and cal.rounds[-1]["kl"] <= bound
    # each round measured the config it names
    set_levels(model, scaled_config(cal.config, 1.0))
    assert frozen_kl(model, _batches()) == pytest.approx(cal.rounds[-1]["kl"], rel=1e-5)
    assert "KL(dense || sparse) <=" in cal.lines()[0] and "KL " in cal.lines()[-2]
    with pytest.raises(ValueError, match="criterion"):
        calibrate(model, _batches(), criterion="mean")


def test_probe_rounds_do_not_share_running_scores():
    """Each probe round scores its batches afresh (a round re-reading batches that an earlier round already
    averaged in would be optimistic), and training starts from empty running scores, not from the probe's."""
    model = tiny_peft("llama")
    apply_sparselora(model, SparseLoRAConfig(ffn_sparsity={"0-3": 0.9}, start_step=0, sample_rows=5))
    state = get_state(model)
    assert state.running_scores and state.config.score_momentum > 0
    losses = [frozen_loss(model, _batches(), sparse=True) for _ in range(2)]
    assert losses[0] == losses[1]  # the second call saw no history of the first
    assert all(not r.running.any() and not r.pending.any() for r in state.running_scores.values())

