"""The sampled selector's rows spread over the FFN layers by need: the config field, the measured mass of each
sample size against an independent computation, the max-min allocation against exhaustive search, the layers
really sampling their own row counts, and the probe keeping or refusing the spread rows."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

from sparselora import SparseLoRAConfig, apply_sparselora
from sparselora.calibrate import RowAllocation, allocate_sample_rows, calibrate, sample_mass, spread_rows
from sparselora.flop_count import flops
from sparselora.models.registry import arch_info, causal_lm, decoder_layers
from sparselora.ops.lora_layer import base_weight_bias
from sparselora.patch import get_state
from sparselora.selection import ffn_keep_count, select_ffn
from sparselora.tokens import context_mask

from helpers import make_batch, tiny_peft

LADDER = (4, 8, 16, 64)


def _batches(n=2, batch=4, seq=40):
    return [make_batch(batch=batch, seq=seq, lengths=(40, 33, 27, 38), labelled=(4, 6, 3, 5), seed=s)
            for s in range(1, n + 1)]


def _model(ffn, attn=None, selector="sampled", **kw):
    model = tiny_peft("llama", layers=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_sparselora(model, SparseLoRAConfig(ffn_sparsity=ffn, attn_sparsity=attn or {}, selector=selector,
                                                 start_step=0, **kw))
    return model


# ------------------------------------------------------------------------------------------------- config
def test_config_reads_ranges_round_trips_and_falls_back():
    cfg = SparseLoRAConfig(ffn_sparsity={"1-3": 0.9}, ffn_sample_rows={"1-2": 64}, sample_rows=128)
    assert cfg.ffn_sample_rows == {1: 64, 2: 64}
    assert [cfg.ffn_rows(i) for i in (1, 2, 3)] == [64, 64, 128]
    again = SparseLoRAConfig.from_yaml(cfg.to_yaml())
    assert again.ffn_sample_rows == cfg.ffn_sample_rows and again.to_dict()["ffn_sample_rows"] == {"1-2": 64}


@pytest.mark.parametrize("rows, match", [({"5": 64}, "not in ffn_sparsity"), ({"1": 0}, "positive integer"),
                                          ({"1": True}, "positive integer"), ({"1": 2.5}, "positive integer"),
                                          ([64], "must be a dict")])
def test_config_refuses_bad_rows(rows, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SparseLoRAConfig(ffn_sparsity={"1-3": 0.9}, ffn_sample_rows=rows)


# ------------------------------------------------------------------------------------------- sample_mass
def test_sample_mass_matches_an_independent_computation():
    """Only layer 1's FFN is sparse, so its input in the sparse forward is the dense model's: recompute every mass
    from a hook on the dense model, the oracle by torch.topk, the sample by its own row arithmetic."""
    level = 0.8
    model = _model({"1": level}, score_momentum=0.0)
    batches = _batches()
    got = sample_mass(model, batches, LADDER)
    assert set(got) == {1}

    mlp = decoder_layers(causal_lm(model))[1].mlp
    seen = []
    handle = mlp.register_forward_pre_hook(lambda mod, a: seen.append(a[0].detach()))
    state = get_state(model)
    state.enabled = False
    want = {S: 0.0 for S in LADDER}
    with torch.no_grad():
        for b in batches:
            seen.clear()
            model(**b)
            x = seen[0].reshape(-1, seen[0].shape[-1])[context_mask(b["labels"], b["attention_mask"]).reshape(-1)]
            n = base_weight_bias(mlp.gate_proj)[0].shape[0]
            act = lambda rows: F.silu(mlp.gate_proj(rows)) * mlp.up_proj(rows)  # noqa: E731
            true = act(x).norm(dim=0)
            k = ffn_keep_count(n, level)
            best = true.topk(k).values.sum()
            for S in LADDER:
                rows = x if x.shape[0] <= S else x[torch.arange(S) * x.shape[0] // S]
                kept = act(rows).norm(dim=0).topk(k).indices
                want[S] += float(true[kept].sum() / best) / len(batches)
    handle.remove()
    state.enabled = True
    for S in LADDER:
        assert got[1][S] == pytest.approx(want[S], abs=1e-5), S
    assert got[1][64] == pytest.approx(1.0, abs=1e-4)  # every context row: the oracle (up to near-ties)
    assert got[1][4] < 0.999  # a small sample does lose mass here (else the comparison above proves little)


# -------------------------------------------------------------------------------------------- spread_rows
def _brute_force_worst(mass, budget, sizes):
    best = -1.0
    for combo in itertools.product(sizes, repeat=len(mass)):
        if sum(combo) <= budget * len(mass):
            best = max(best, min(mass[i][S] for i, S in zip(mass, combo)))
    return best


def test_spread_rows_maximises_the_worst_layer_within_the_budget():
    g = torch.Generator().manual_seed(0)
    sizes = (32, 64, 128, 256, 512)
    for trial in range(200):
        mass = {}
        for layer in range(2 + trial % 4):  # increasing in rows, each layer its own curve
            steps = torch.rand(len(sizes), generator=g) * (0.2 if trial % 2 else 0.05)
            curve = (1.0 - torch.flip(torch.cumsum(steps, 0), (0,))).clamp(0, 1).tolist()
            mass[layer] = dict(zip(sizes, curve))
        rows = spread_rows(mass, 128, sizes, enough=1.1)  # no early stop: the pure max-min
        assert sum(rows.values()) <= 128 * len(mass)
        assert min(mass[i][rows[i]] for i in mass) == pytest.approx(_brute_force_worst(mass, 128, sizes))


def test_spread_rows_gives_the_hard_layer_more_and_stops_where_enough():
    sizes = (32, 64, 128, 256, 512)
    easy = dict(zip(sizes, (0.992, 0.995, 0.997, 0.998, 0.999)))
    hard = dict(zip(sizes, (0.70, 0.80, 0.88, 0.93, 0.97)))
    mid = dict(zip(sizes, (0.90, 0.95, 0.975, 0.985, 0.991)))
    rows = spread_rows({0: easy, 1: hard, 2: mid}, 256, sizes)
    assert rows[0] == 32 and rows[1] == 512 and rows[1] > rows[2]
    assert sum(rows.values()) <= 3 * 256
    # all easy: far below the budget (the cost falls)
    assert spread_rows({0: easy, 1: easy}, 256, sizes) == {0: 32, 1: 32}


# ------------------------------------------------------------------------------- the layers use their rows
def test_each_ffn_layer_samples_its_own_rows():
    model = _model({"1-2": 0.8}, score_momentum=0.0, sample_rows=64, ffn_sample_rows={"1": 4})
    state = get_state(model)
    seen = {}
    state.ffn_probe = lambda w, xc, n: seen.__setitem__(w.layer, (w, xc.detach().clone(), n))
    with torch.no_grad():
        model(**_batches(1)[0])
    state.ffn_probe = None
    for layer, rows in ((1, 4), (2, 64)):
        w, xc, n = seen[layer]
        mlp = w.mlp
        expect = select_ffn("sampled", 0.8, xc, mlp.gate_proj, mlp.up_proj, None, n, rows=rows)
        assert torch.equal(w.kept.sort().values, expect.sort().values), layer
    w, xc, n = seen[1]
    other = select_ffn("sampled", 0.8, xc, w.mlp.gate_proj, w.mlp.up_proj, None, n, rows=64)
    assert not torch.equal(w.kept.sort().values, other.sort().values)  # 4 rows really choose otherwise


def test_flops_charge_each_layer_its_rows():
    arch = arch_info(tiny_peft("llama", layers=4).config)
    base = SparseLoRAConfig(ffn_sparsity={"1-2": 0.8}, sample_rows=64)
    fewer = SparseLoRAConfig(ffn_sparsity={"1-2": 0.8}, sample_rows=64, ffn_sample_rows={"1": 16})
    a, b = flops(arch, base, (4, 200), 20), flops(arch, fewer, (4, 200), 20)
    per_row = 2 * arch.hidden_size * 2 * arch.intermediate_size
    assert a["estimator"] - b["estimator"] == pytest.approx(per_row * (64 - 16))


# ------------------------------------------------------------------------------------------ in the probe
def test_allocate_sets_the_config_and_calibrate_reports_it():
    model = _model({"1-2": 0.8}, sample_rows=8)
    batches = _batches()
    alloc = allocate_sample_rows(model, batches, ladder=LADDER)
    assert isinstance(alloc, RowAllocation) and set(alloc.config.ffn_sample_rows) == {1, 2}
    assert sum(alloc.config.ffn_sample_rows.values()) <= 2 * 8
    assert get_state(model).config is alloc.config

    model = _model({"1-2": 0.8}, sample_rows=8)
    cal = calibrate(model, batches, bound=float("inf"))
    assert cal.rows is not None and cal.rows_kept and cal.config.ffn_sample_rows == cal.rows.config.ffn_sample_rows
    assert get_state(model).config is cal.config
    text = "\n".join(cal.lines())
    assert "sampled rows per FFN layer" in text and "with them:" in text


def test_calibrate_refuses_rows_that_break_the_bound(monkeypatch):
    model = _model({"1-2": 0.9}, sample_rows=64, score_momentum=0.0)
    batches = _batches()
    first = calibrate(model, batches, bound=float("inf"), criterion="kl", spread=False).rounds[-1]["kl"]
    import sparselora.calibrate as cal_mod

    def one_row(model, batches, missing_ok=False):  # a deliberately bad spread: one sampled row a layer
        state = get_state(model)
        state.config = cal_mod.dataclasses.replace(state.config, ffn_sample_rows={1: 1, 2: 1})
        return RowAllocation(state.config, {1: {64: 1.0, 1: 0.5}, 2: {64: 1.0, 1: 0.5}}, 64)

    monkeypatch.setattr(cal_mod, "allocate_sample_rows", one_row)
    cal = calibrate(model, batches, bound=first + 1e-9, criterion="kl")
    assert cal.within_bound and cal.rows is not None
    assert cal.rows_check["kl"] > first + 1e-9  # the bad rows do break the bound here
    assert not cal.rows_kept and not cal.config.ffn_sample_rows
    assert get_state(model).config is cal.config
    assert "every FFN layer keeps 64 rows" in "\n".join(cal.lines())


def test_no_spread_for_other_selectors_or_given_rows():
    model = _model({"1-2": 0.8}, selector="oracle")
    assert calibrate(model, _batches(), bound=float("inf")).rows is None
    with pytest.raises(ValueError, match="selector is 'oracle'"):
        allocate_sample_rows(model, _batches())
    model = _model({"1-2": 0.8}, ffn_sample_rows={"1": 16})
    cal = calibrate(model, _batches(), bound=float("inf"))
    assert cal.rows is None and cal.config.ffn_sample_rows == {1: 16}
