"""Sensitivity analysis: the fast measuring path equals the library's sparse path, sensitivities behave, the
knapsack meets the budget (and is optimal), infeasible budgets fail, and the CLI writes its files."""

from __future__ import annotations

import argparse
import itertools
import json
import warnings

import pytest
import torch

from sparselora import SparseLoRAConfig, apply_sparselora, flops, remove_sparselora
from sparselora import sensitivity as S
from sparselora.cli import sensitivity as cli
from sparselora.data import DataCollator, Example, tokenize_examples
from sparselora.models.registry import arch_info

from sparselora.calibrate import DEFAULT_KL_BOUND, DEFAULT_LOSS_BOUND
from sparselora.selection import DEFAULT_SELECTOR

from helpers import make_batch, tiny_model, tiny_peft

torch.set_num_threads(1)

CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_tokenizer():
    """One token per byte, a few specials and a chat template; built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", additional_special_tokens=specials[3:]
    )
    fast.chat_template = CHAT
    return fast


def records(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        a, b = (int(v) for v in torch.randint(1, 50, (2,), generator=g))
        out.append({"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"})
    return out


def examples(n: int, seed: int = 0):
    return [Example(prompt=r["question"], target=r["answer"].replace("####", "The answer is")) for r in records(n, seed)]


VOCAB = 5 + 256
LAYERS = 4


@pytest.fixture(scope="module")
def trained():
    """A tiny llama trained briefly on arithmetic text, so that its layers matter and sparsity costs loss."""
    tok = byte_tokenizer()
    model = tiny_model("llama", layers=LAYERS, vocab_size=VOCAB, intermediate_size=64)
    feats, _ = tokenize_examples(examples(64, seed=1), tok, max_length=64)
    batches = S.make_batches(feats, DataCollator(tok), 16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(100):
        loss = model(**batches[step % len(batches)]).loss
        opt.zero_grad()  # ~100 steps: loss 5.6 -> 0.55
        loss.backward()
        opt.step()
    model.eval()
    model.requires_grad_(False)
    calib, _ = tokenize_examples(examples(8, seed=2), tok, max_length=64)
    return model, tok, S.make_batches(calib, DataCollator(tok), 3)


def mean_loss(model, batches) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            n = int((b["labels"][:, 1:] != -100).sum())
            total += float(model(**b).loss) * n
            count += n
    return total / count


def test_fast_path_equals_library_sparse_path(trained):
    """Cached prefix + labelled-only head == a plain forward with a one-layer config applied."""
    model, _, batches = trained
    sens = S.measure_sensitivity(model, batches, [0.5, 0.9], layers=[0, 2])
    assert sens.dense_loss == pytest.approx(mean_loss(model, batches), rel=1e-5)
    for kind, layer, j in itertools.product(S.KINDS, [0, 2], [0, 1]):
        key = "ffn_sparsity" if kind == "ffn" else "attn_sparsity"
        # both default to the library's selector
        apply_sparselora(model, SparseLoRAConfig(**{key: {layer: sens.levels[j]}}, start_step=0))
        try:
            ref = mean_loss(model, batches)
        finally:
            remove_sparselora(model)
        assert sens.loss[kind][layer][j] == pytest.approx(ref, rel=1e-5), (kind, layer, j)
    assert all(v != v for v in sens.loss["ffn"][1])  # layers not asked for stay unmeasured (NaN)
    # the plain head (full logits + the model's own loss) gives the same numbers
    runner = S._Runner(model, batches, torch.device("cpu"), labelled_head=False)
    assert runner.dense() == pytest.approx(sens.dense_loss, rel=1e-6)


def test_peft_model_with_adapter():
    """A PeftModel (LoRA on every projection, non-zero B) is measured through the same sparse path."""
    model = tiny_peft()
    model.eval()
    batches = [make_batch(seed=s) for s in range(2)]
    sens = S.measure_sensitivity(model, batches, [0.75], layers=[1], selector="svd")  # still selectable
    assert sens.selector == "svd" and sens.dense_loss == pytest.approx(mean_loss(model, batches), rel=1e-5)
    for kind in S.KINDS:
        key = "ffn_sparsity" if kind == "ffn" else "attn_sparsity"
        apply_sparselora(model, SparseLoRAConfig(**{key: {1: 0.75}}, start_step=0, selector="svd"))
        try:
            assert sens.loss[kind][1][0] == pytest.approx(mean_loss(model, batches), rel=1e-5)
        finally:
            remove_sparselora(model)


def test_model_left_untouched(trained):
    model, _, batches = trained
    with torch.no_grad():
        before = model(**batches[0]).logits.clone()
    S.measure_sensitivity(model, batches[:1], [0.9], layers=[1])
    assert getattr(model, "_sparselora_state", None) is None
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    assert "_loss_function" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(model(**batches[0]).logits, before)


def test_sensitivities_nonnegative_and_monotone(trained):
    model, _, batches = trained
    sens = S.measure_sensitivity(model, batches, [0.25, 0.75, 0.98])
    tol = 0.02 * sens.dense_loss
    for kind in S.KINDS:
        for row in sens.delta(kind):
            assert min(row) > -tol, (kind, row)
            assert all(b >= a - tol for a, b in zip(row, row[1:])), (kind, row)
    # the highest level really hurts somewhere (this model leans on attention, most of all in layer 0)
    assert max(r[-1] for k in S.KINDS for r in sens.delta(k)) > 10 * tol
    # the optimizer's view is clipped at 0 and non-decreasing in the level
    for row in S.predicted_deltas(sens, "ffn"):
        assert row[0] >= 0 and row == sorted(row)


def _sens(levels, ffn, attn, dense=1.0):
    return S.Sensitivity(
        levels=levels,
        num_layers=len(ffn),
        dense_loss=dense,
        loss={"ffn": [[dense + v for v in r] for r in ffn], "attn": [[dense + v for v in r] for r in attn]},
    )


@pytest.mark.parametrize("selector", ["sampled", "svd"])  # the FLOP model charges each selector its own cost
def test_choice_meets_budget_and_is_optimal(selector):
    arch = arch_info(tiny_model(layers=3).config)
    levels = [0.5, 0.9]
    ffn = [[0.30, 0.90], [0.01, 0.05], [0.20, 0.70]]  # early and last layers sensitive
    attn = [[0.50, 1.50], [0.02, 0.20], [0.05, 0.60]]
    sens = _sens(levels, ffn, attn)
    sens.selector = selector
    shape, lab = (4, 200), 60
    lowest = S.check_budget(arch, 1.0, levels, shape, lab, selector=selector)  # this tiny model's LM head is a big dense share
    assert 0.5 < lowest < 0.95
    for budget in [lowest + (1 - lowest) * f for f in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)]:
        ch = S.choose_config(sens, arch, budget, shape, lab)
        ratio = flops(arch, ch.config, shape, lab)["ratio"]
        assert ratio <= budget + 1e-12 and ratio == pytest.approx(ch.ratio)
        # brute force over every per-block choice
        best = None
        for combo in itertools.product(range(-1, len(levels)), repeat=6):
            fc = {i: levels[j] for i, j in enumerate(combo[:3]) if j >= 0}
            ac = {i: levels[j] for i, j in enumerate(combo[3:]) if j >= 0}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cfg = SparseLoRAConfig(ffn_sparsity=fc, attn_sparsity=ac, selector=sens.selector)
            if flops(arch, cfg, shape, lab)["ratio"] <= budget:
                loss = sum(ffn[i][j] for i, j in enumerate(combo[:3]) if j >= 0)
                loss += sum(attn[i][j] for i, j in enumerate(combo[3:]) if j >= 0)
                best = loss if best is None else min(best, loss)
        assert ch.predicted_delta == pytest.approx(best, abs=1e-9), budget
    # a middle budget sparsifies the insensitive middle layer first
    ch = S.choose_config(sens, arch, lowest + 0.6 * (1 - lowest), shape, lab)
    assert ch.config.ffn_sparsity.get(1) == 0.9
    assert ch.config.ffn_sparsity.get(0, 0) < 0.9 and ch.config.attn_sparsity.get(0, 0) == 0


def test_infeasible_budget():
    arch = arch_info(tiny_model(layers=3).config)
    sens = _sens([0.5], [[0.1]] * 3, [[0.1]] * 3)
    with pytest.raises(S.InfeasibleBudgetError, match="infeasible"):
        S.choose_config(sens, arch, 0.5, (4, 200), 60)
    with pytest.raises(ValueError, match="budget"):
        S.check_budget(arch, 0.0, [0.5], (4, 200), 60)
    with pytest.raises(ValueError, match="outside"):
        S.check_levels([0.5, 1.0])


# ----------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, trained):
    model, tok, _ = trained
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    data = path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records(40, seed=3)))
    return path, data


def run_cli(*argv) -> int:
    parser = argparse.ArgumentParser(prog="sparselora")
    sub = parser.add_subparsers(dest="command", required=True)
    p = cli.register(sub)
    assert p.epilog and "examples" in p.epilog and p.description
    args = parser.parse_args(["sensitivity", *argv])
    return args.func(args)


def test_cli_end_to_end(model_dir, tmp_path, capsys):
    path, data = model_dir
    out = tmp_path / "out"
    common = ["--model", str(path), "--data", str(data), "--samples", "6", "--batch-size", "3", "--max-length", "64"]
    code = run_cli(*common, "--dtype", "float32", "--levels", "0.5,0.9", "--budget", "0.93", "--output", str(out))
    assert code == 0, capsys.readouterr().err
    for name in ("sparsity.yaml", "sensitivity.json", "table.md"):
        assert (out / name).is_file(), name
    pytest.importorskip("matplotlib")
    assert (out / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    text = (out / "sparsity.yaml").read_text()
    assert text.startswith("# SparseLoRA layer-wise sparsity") and "--sparsity this.yaml" in text
    cfg = SparseLoRAConfig.from_yaml(out / "sparsity.yaml")
    rec = json.loads((out / "sensitivity.json").read_text())
    assert rec["sensitivity"]["levels"] == [0.5, 0.9] and len(rec["sensitivity"]["loss"]["ffn"]) == LAYERS
    assert rec["sensitivity"]["selector"] == DEFAULT_SELECTOR == cfg.selector
    assert rec["calibration"]["sequences"] == 6
    f, ch = rec["flops"], rec["choice"]
    chosen = SparseLoRAConfig.from_dict(ch["chosen_config"])
    assert flops(_arch(rec), chosen, tuple(f["batch_shape"]), f["labelled_tokens"])["ratio"] <= 0.93
    # the written config is the probed one: the choice, or its back-off
    assert cfg.to_dict() == ch["config"]
    assert flops(_arch(rec), cfg, tuple(f["batch_shape"]), f["labelled_tokens"])["ratio"] == pytest.approx(ch["ratio"])
    probe = ch["probe"]  # finetune's default criterion: the mean KL over labelled tokens
    assert ch["probe_criterion"] == probe["criterion"] == "kl" and probe["bound"] == DEFAULT_KL_BOUND
    assert probe["rounds"][0]["scale"] == 1.0 and all("kl" in r for r in probe["rounds"])
    assert ch["measured_increase"] == pytest.approx(probe["rounds"][0]["increase"])
    assert ch["predicted_delta"] is not None and ch["measured_delta"] is not None
    assert probe["within_bound"] == (probe["rounds"][-1]["kl"] <= DEFAULT_KL_BOUND)
    printed = capsys.readouterr().out
    assert "FLOP ratio" in printed and "predicted (additive)" in printed and "sparsity probe" in printed
    assert "dense loss" in printed and "sparsity x1.00" in printed

    # another budget from the same measurements: no model run
    out2 = tmp_path / "out2"
    assert run_cli("--from-json", str(out / "sensitivity.json"), "--budget", "0.97", "--output", str(out2)) == 0
    rec2 = json.loads((out2 / "sensitivity.json").read_text())
    assert rec2["sensitivity"]["loss"] == rec["sensitivity"]["loss"] and rec2["choice"]["ratio"] <= 0.97
    assert rec2["choice"]["probe"] is None and "not probed" in capsys.readouterr().err  # no model: said so
    assert "not probed" in (out2 / "sparsity.yaml").read_text()


COMMON = ["--samples", "6", "--batch-size", "3", "--max-length", "64", "--dtype", "float32", "--levels", "0.5,0.9",
          "--budget", "0.93"]


def test_cli_default_selector_is_the_library_s(model_dir):
    """One source of truth: the command, the measurement and a bare Sensitivity all default to DEFAULT_SELECTOR;
    svd stays selectable."""
    import inspect

    parser = argparse.ArgumentParser()
    p = cli.register(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["sensitivity", "--budget", "0.5"]).selector == DEFAULT_SELECTOR
    assert parser.parse_args(["sensitivity", "--budget", "0.5", "--selector", "svd"]).selector == "svd"
    assert f"default {DEFAULT_SELECTOR}" in p.format_help()
    assert inspect.signature(S.measure_sensitivity).parameters["selector"].default == DEFAULT_SELECTOR
    assert S.Sensitivity(levels=[0.5], num_layers=1, dense_loss=1.0, loss={}).selector == DEFAULT_SELECTOR


def _fake_probe(monkeypatch, dense=1.0):
    """The probe's frozen loss made exact: dense ``dense``; sparse ``dense * (1 + the config's highest level)``,
    so the relative increase is the highest level and each round of `calibrate` scales it by its factor."""
    import sparselora.calibrate as C
    from sparselora.patch import get_state

    def fake(model, batches, sparse):
        if not sparse:
            return dense
        cfg = get_state(model).config
        return dense * (1.0 + max([*cfg.ffn_sparsity.values(), *cfg.attn_sparsity.values()]))

    monkeypatch.setattr(C, "frozen_loss", fake)


def test_cli_backs_off_a_config_over_the_bound(model_dir, tmp_path, capsys, monkeypatch):
    """The chosen config raises the probe's loss +90% (its highest level, 0.9): above --loss-bound 0.3 it is scaled
    by calibrate's rounds (x0.7 each) until within, and the YAML written is the backed-off config."""
    from sparselora.calibrate import scaled_config

    path, data = model_dir
    _fake_probe(monkeypatch)
    out = tmp_path / "backed"
    code = run_cli("--model", str(path), "--data", str(data), *COMMON, "--probe", "loss", "--loss-bound", "0.3",
                   "--output", str(out))
    assert code == 0
    printed = capsys.readouterr()
    rec = json.loads((out / "sensitivity.json").read_text())
    ch = rec["choice"]
    chosen = SparseLoRAConfig.from_dict(ch["chosen_config"])
    assert max([*chosen.ffn_sparsity.values(), *chosen.attn_sparsity.values()]) == 0.9
    probe = ch["probe"]
    scales = [r["scale"] for r in probe["rounds"]]
    assert scales == pytest.approx([1.0, 0.7, 0.49, 0.343, 0.2401])  # +90%, +63%, +44%, +31%, +22%
    assert probe["within_bound"] and probe["rounds"][-1]["increase"] <= 0.3 < probe["rounds"][-2]["increase"]
    assert ch["measured_increase"] == pytest.approx(0.9) and ch["predicted_delta"] < 0.9  # additive vs joint
    written = SparseLoRAConfig.from_yaml(out / "sparsity.yaml")
    assert written.to_dict() == ch["config"] == scaled_config(chosen, scales[-1]).to_dict()
    assert written.to_dict() != chosen.to_dict()
    f = rec["flops"]
    assert ch["ratio"] == pytest.approx(flops(_arch(rec), written, tuple(f["batch_shape"]), f["labelled_tokens"])["ratio"])
    assert ch["ratio"] > ch["chosen_ratio"]  # less sparse costs more: said
    for line in ("dense loss 1.0000", "sparsity x1.00: sparse loss 1.9000 (+90.0%)", "sparsity x0.24",
                 "writing sparsity x0.24", "above the budget 0.93: the loss bound wins"):
        assert line in printed.out, line
    assert "above the bound" not in printed.out + printed.err
    # x0.24 of these levels saves less than the sampled selector costs on this tiny model: said
    assert ("costs more than a dense one" in printed.err) == (ch["ratio"] >= 1.0)
    header = (out / "sparsity.yaml").read_text()
    assert "backed off (sparselora.calibrate) in 5 rounds to x0.24" in header


def test_cli_warns_when_the_bound_cannot_be_met(model_dir, tmp_path, capsys, monkeypatch):
    path, data = model_dir
    _fake_probe(monkeypatch)
    out = tmp_path / "unmet"
    code = run_cli("--model", str(path), "--data", str(data), *COMMON, "--probe", "loss", "--loss-bound", "0.01",
                   "--output", str(out))
    assert code == 0
    err = capsys.readouterr().err
    assert "WARNING: even x0.17 raises the loss" in err and "above the bound" in err
    rec = json.loads((out / "sensitivity.json").read_text())
    probe = rec["choice"]["probe"]
    assert not probe["within_bound"] and len(probe["rounds"]) == 6  # calibrate's max_rounds
    assert SparseLoRAConfig.from_yaml(out / "sparsity.yaml").to_dict() == rec["choice"]["config"]
    assert "WARNING: above the bound" in (out / "sparsity.yaml").read_text()


def test_cli_real_probe_backs_off(model_dir, tmp_path, capsys):
    """Without fakes: a bound below the chosen config's measured joint increase makes the command back off."""
    path, data = model_dir
    args = ["--model", str(path), "--data", str(data), *COMMON, "--probe", "loss"]
    assert run_cli(*args, "--loss-bound", "off", "--output", str(tmp_path / "off")) == 0
    off = json.loads((tmp_path / "off" / "sensitivity.json").read_text())["choice"]
    assert off["config"] == off["chosen_config"] and len(off["probe"]["rounds"]) == 1 and off["loss_bound"] is None
    increase = off["measured_increase"]
    assert increase > 0.005  # this tiny model at budget 0.93 (about +4%)
    assert run_cli(*args, "--loss-bound", f"{increase / 2}", "--output", str(tmp_path / "half")) == 0
    half = json.loads((tmp_path / "half" / "sensitivity.json").read_text())["choice"]
    assert half["chosen_config"] == off["chosen_config"]
    assert half["measured_increase"] == pytest.approx(increase)  # the same batches, the same config
    assert len(half["probe"]["rounds"]) > 1 and half["config"] != half["chosen_config"]
    assert SparseLoRAConfig.from_yaml(tmp_path / "half" / "sparsity.yaml").to_dict() == half["config"]


def test_cli_kl_probe_backs_off_and_says_so(model_dir, tmp_path, capsys):
    """The default criterion, without fakes: a KL bound below the chosen config's measured KL backs it off until
    within (or says it could not), and the YAML header states the KL bound; --loss-bound off still turns the
    back-off off."""
    path, data = model_dir
    args = ["--model", str(path), "--data", str(data), *COMMON]
    assert run_cli(*args, "--loss-bound", "off", "--output", str(tmp_path / "off")) == 0
    off = json.loads((tmp_path / "off" / "sensitivity.json").read_text())["choice"]
    assert off["config"] == off["chosen_config"] and len(off["probe"]["rounds"]) == 1
    kl = off["probe"]["rounds"][0]["kl"]
    assert kl > 0
    assert run_cli(*args, "--kl-bound", f"{kl / 3}", "--output", str(tmp_path / "kl")) == 0
    rec = json.loads((tmp_path / "kl" / "sensitivity.json").read_text())["choice"]
    probe = rec["probe"]
    assert probe["criterion"] == "kl" and probe["bound"] == pytest.approx(kl / 3)
    assert probe["rounds"][0]["kl"] == pytest.approx(kl)  # the same batches, the same config
    assert len(probe["rounds"]) > 1 and rec["config"] != rec["chosen_config"]
    assert probe["within_bound"] == (probe["rounds"][-1]["kl"] <= kl / 3)
    header = (tmp_path / "kl" / "sparsity.yaml").read_text()
    assert f"bound KL <= {kl / 3:g} nats/token: backed off" in header
    assert "bound KL(dense || sparse) <=" in capsys.readouterr().out


def test_cli_loss_bound_validates(model_dir, tmp_path, capsys):
    from sparselora.train import RunConfig

    path, data = model_dir
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    defaults = parser.parse_args(["sensitivity", "--budget", "0.5"])
    assert defaults.loss_bound == DEFAULT_LOSS_BOUND == RunConfig().loss_bound  # finetune's, from one place
    assert defaults.probe == RunConfig().probe and defaults.kl_bound == DEFAULT_KL_BOUND == RunConfig().kl_bound
    for bad in ("-0.1", "nan"):
        assert run_cli("--model", str(path), "--data", str(data), "--budget", "0.93", "--kl-bound", bad,
                       "--output", str(tmp_path / "negkl")) == cli.EXIT_ERROR
        err = capsys.readouterr().err
        assert "--kl-bound" in err and ">= 0" in err and "loading" not in err, err
    for bad in ("-0.1", "nan", "inf"):
        out = tmp_path / "neg"
        assert run_cli("--model", str(path), "--data", str(data), "--budget", "0.93", "--loss-bound", bad,
                       "--output", str(out)) == cli.EXIT_ERROR
        err = capsys.readouterr().err
        assert "--loss-bound" in err and ">= 0" in err and "loading" not in err, err  # refused before loading
        assert not out.exists()
    with pytest.raises(SystemExit) as e:
        run_cli("--model", str(path), "--budget", "0.5", "--loss-bound", "lots")
    assert e.value.code == 2 and "--loss-bound takes a number" in capsys.readouterr().err


def _arch(rec):
    from sparselora.models.registry import ArchInfo

    return ArchInfo(**rec["arch"])


def test_cli_errors(model_dir, tmp_path, capsys):
    path, data = model_dir
    common = ["--model", str(path), "--data", str(data), "--samples", "3", "--dtype", "float32"]
    # infeasible budget: refused before any measuring, nothing written
    out = tmp_path / "x"
    assert run_cli(*common, "--levels", "0.5", "--budget", "0.1", "--output", str(out)) == cli.EXIT_INFEASIBLE
    assert "infeasible" in capsys.readouterr().err and not out.exists()
    assert run_cli(*common, "--budget", "1.5") == cli.EXIT_ERROR
    assert run_cli(*common, "--levels", "0.5,1.0", "--budget", "0.5") == cli.EXIT_ERROR
    assert run_cli("--model", str(path), "--data", str(tmp_path / "missing.jsonl"), "--budget", "0.5") == cli.EXIT_ERROR
    assert run_cli("--model", str(tmp_path / "nope"), "--data", str(data), "--budget", "0.5") == cli.EXIT_ERROR
    assert run_cli("--budget", "0.5") == cli.EXIT_ERROR  # neither --model/--data nor --from-json
    with pytest.raises(SystemExit) as e:  # argparse usage error
        run_cli("--model", str(path), "--budget", "half")
    assert e.value.code == 2
