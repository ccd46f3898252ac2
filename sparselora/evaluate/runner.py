"""Batched greedy generation and accuracy scoring, with predictions kept for inspection.

Prompts are built by `sparselora.data.prompt_ids`, the same code that builds training prompts, so a
fine-tuned model is evaluated on exactly the format it learnt.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..data.readers import Example
from ..io import atomic_write_text
from ..data.tokenize import has_chat_template, prompt_ids
from .extract import (
    COMMONSENSE_LABELS,
    extract_choice,
    extract_label,
    extract_number,
    is_correct,
    label_set_for,
    parse_number,
    wilson_interval,
)

__all__ = ["TASKS", "generate", "extract_prediction", "evaluate", "gold_fits", "check_gold"]

logger = logging.getLogger(__name__)
TASKS = ("math", "aqua", "commonsense")


def _eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a turn: the tokenizer's EOS plus the generation config's (chat models have several)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    cfg = getattr(model, "generation_config", None)
    extra = getattr(cfg, "eos_token_id", None) if cfg is not None else None
    if extra is not None:
        ids.update(int(i) for i in (extra if isinstance(extra, (list, tuple)) else [extra]))
    return sorted(ids)


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    batch_size: int = 16,
    max_new_tokens: int = 256,
    progress: bool = False,
) -> list[str]:
    """Greedy completions (text after the prompt, cut at EOS) for tokenized prompts.

    Prompts are sorted by length so that batches carry little padding (left padding, as decoder-only
    generation needs); results come back in input order.
    """
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str | None] = [None] * len(prompts)
    start = time.time()
    bar = None
    if progress:
        import sys

        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc="generate", unit="example", dynamic_ncols=True, file=sys.stderr)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(prompts[i])
            ids[row, width - n :] = torch.tensor(prompts[i], dtype=torch.long)
            mask[row, width - n :] = 1
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=eos or None,
        )
        for row, i in enumerate(idx):
            new = gen[row, width:].tolist()
            cut = next((k for k, t in enumerate(new) if t in eos), len(new))
            out[i] = tokenizer.decode(new[:cut], skip_special_tokens=True)
        if bar is not None:
            bar.update(len(idx))
        logger.debug("generated %d/%d (%.1fs)", min(b + batch_size, len(order)), len(order), time.time() - start)
    if bar is not None:
        bar.close()
    return out  # type: ignore[return-value]


_ALL_LABELS = {x for labels in COMMONSENSE_LABELS.values() for x in labels}


def gold_fits(gold: str | None, task: str) -> bool:
    """Whether a gold answer has the form the task's scoring compares with: a number (math), a letter A-E
    (aqua), one of the label words of a commonsense data set (commonsense)."""
    if gold is None:
        return False
    g = str(gold).strip()
    if task == "math":
        return parse_number(g) is not None
    if task == "aqua":
        return len(g) == 1 and g.upper() in "ABCDE"
    if task == "commonsense":
        return g.lower() in _ALL_LABELS
    raise ValueError(f"Unknown task {task!r}; expected one of {TASKS}")


_TASK_FORMS = {"math": "a number", "aqua": "a letter A-E", "commonsense": "a label word (true/false, option1, ...)"}


def check_gold(examples: Sequence[Example], task: str) -> list[int]:
    """Indices of examples whose gold answer does not fit ``task``: an error when none fits (the data is of
    another task), a warning when some do not (they can only score as wrong)."""
    bad = [i for i, ex in enumerate(examples) if not gold_fits(ex.answer, task)]
    if not bad:
        return bad
    first = examples[bad[0]]
    where = f"line {first.meta['line']}" if first.meta.get("line") else f"example {bad[0]}"
    if len(bad) == len(examples):
        fitting = [t for t in TASKS if t != task and all(gold_fits(ex.answer, t) for ex in examples[:50])]
        hint = f"; the answers look like --task {fitting[0]}" if fitting else ""
        raise ValueError(
            f"no gold answer fits --task {task} (it compares with {_TASK_FORMS[task]}; {where} has "
            f"{first.answer!r}){hint}. Pass the --task of this data."
        )
    logger.warning("%d of %d gold answers do not fit --task %s (%s); they score as wrong (first: %s, %r)",
                   len(bad), len(examples), task, _TASK_FORMS[task], where, first.answer)
    return bad


def extract_prediction(completion: str, task: str, gold: str | None = None):
    """The answer a completion gives: a float (math), a letter (aqua) or a label word (commonsense)."""
    if task == "math":
        return extract_number(completion)
    if task == "aqua":
        return extract_choice(completion)
    if task == "commonsense":
        return extract_label(completion, label_set_for(gold or ""))
    raise ValueError(f"Unknown task {task!r}; expected one of {TASKS}")


def evaluate(
    model,
    tokenizer,
    examples: Sequence[Example],
    task: str = "math",
    batch_size: int = 16,
    max_new_tokens: int = 256,
    out_dir: str | os.PathLike | None = None,
    name: str | None = None,
    use_chat_template: bool | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Greedy-generate for `examples`, extract answers, score them against `example.answer`.

    Returns `{"task", "n", "correct", "accuracy", "ci95": [lo, hi], "n_unparsed", "seconds", "hits", ...}`; ``hits``
    is a string of "1"/"0", one per example in order.
    With `out_dir`, writes `<name>.predictions.jsonl` (one line per example) and `<name>.scores.json`
    (name defaults to the task), each atomically.
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; expected one of {TASKS}")
    if not examples:
        raise ValueError("No examples to evaluate (empty data set)")
    missing = [i for i, ex in enumerate(examples) if ex.answer is None]
    if missing:
        raise ValueError(f"{len(missing)} examples have no gold answer (first index {missing[0]})")
    unfit = check_gold(examples, task)
    if use_chat_template is None:
        use_chat_template = has_chat_template(tokenizer)
    was_training = model.training
    model.eval()
    start = time.time()
    try:
        prompts = [prompt_ids(ex, tokenizer, use_chat_template) for ex in examples]
        completions = generate(model, tokenizer, prompts, batch_size, max_new_tokens, progress)
    finally:
        model.train(was_training)
    seconds = time.time() - start

    records, correct, unparsed = [], 0, 0
    for i, (ex, completion) in enumerate(zip(examples, completions)):
        pred = extract_prediction(completion, task, ex.answer)
        ok = is_correct(pred, ex.answer, task)
        correct += ok
        unparsed += pred is None
        records.append(
            {
                "index": i,
                "line": ex.meta.get("line"),
                "prompt": ex.prompt,
                "completion": completion,
                "prediction": pred,
                "gold": ex.answer,
                "correct": ok,
            }
        )
    n = len(examples)
    lo, hi = wilson_interval(correct, n)
    scores = {
        "task": task,
        "name": name or task,
        "n": n,
        "correct": correct,
        "accuracy": correct / n,
        "ci95": [lo, hi],
        "n_unparsed": unparsed,
        "seconds": round(seconds, 3),
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "chat_template": use_chat_template,
        "n_gold_unfit": len(unfit),
        # per example, in the given order: "1" correct, "0" not (what a paired comparison of two models reads)
        "hits": "".join("1" if r["correct"] else "0" for r in records),
    }
    if out_dir is not None:
        out = Path(out_dir)
        stem = name or task
        atomic_write_text(
            out / f"{stem}.predictions.jsonl",
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
        )
        atomic_write_text(out / f"{stem}.scores.json", json.dumps(scores, indent=2) + "\n")
        scores["predictions_path"] = str(out / f"{stem}.predictions.jsonl")
    return scores
