"""Prompt formatting and tokenization with loss only on the target.

The prompt is rendered exactly as evaluation renders it (`prompt_ids`), so a fine-tuned model sees the
same text at train and test time. Truncation never cuts the answer: the prompt loses its left part
first, and an example whose target alone does not fit is dropped and counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..tokens import IGNORE_INDEX
from .readers import Example

__all__ = [
    "IGNORE_INDEX",
    "PLAIN_TEMPLATE",
    "TokenizeStats",
    "has_chat_template",
    "prompt_messages",
    "prompt_text",
    "prompt_ids",
    "target_ids",
    "tokenize_example",
    "tokenize_examples",
]

logger = logging.getLogger(__name__)

PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_messages(example: Example | str | list) -> list[dict[str, str]]:
    prompt = example.prompt if isinstance(example, Example) else example
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _plain_prompt(messages: list[dict[str, str]]) -> str:
    """Without a chat template: system text first, earlier turns as context, last user turn as instruction."""
    parts = []
    for m in messages[:-1]:
        title = {"system": "System", "assistant": "Response"}.get(m["role"], "Instruction")
        parts.append(f"### {title}:\n{m['content']}\n\n")
    return "".join(parts) + PLAIN_TEMPLATE.format(prompt=messages[-1]["content"])


def prompt_text(example: Example | str | list, tokenizer, use_chat_template: bool | None = None) -> str:
    """The prompt as text, ending where the model's answer starts."""
    messages = prompt_messages(example)
    if use_chat_template is None:
        use_chat_template = has_chat_template(tokenizer)
    if use_chat_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return _plain_prompt(messages)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids(example: Example | str | list, tokenizer, use_chat_template: bool | None = None) -> list[int]:
    """Token ids of the prompt; a chat template writes its own BOS, the plain template gets the tokenizer's."""
    if use_chat_template is None:
        use_chat_template = has_chat_template(tokenizer)
    ids = _encode(tokenizer, prompt_text(example, tokenizer, use_chat_template))
    bos = tokenizer.bos_token_id
    if not use_chat_template and bos is not None and _adds_bos(tokenizer) and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer itself prepends BOS (llama-style) -- then the plain prompt should have it too."""
    with_special = tokenizer("x")["input_ids"]
    return bool(with_special) and with_special[0] == tokenizer.bos_token_id != tokenizer("x", add_special_tokens=False)["input_ids"][0]


def _eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("The tokenizer has no eos_token; the target must end with one")
    return eos


def target_ids(example: Example, tokenizer, use_chat_template: bool | None = None, prompt: str | None = None) -> list[int]:
    """Token ids of the target, ending with EOS.

    With a chat template the assistant turn is rendered by the template (so any wrapper it adds is
    learnt) and cut right after its EOS; the trailing newline some templates add is not trained on.
    """
    if use_chat_template is None:
        use_chat_template = has_chat_template(tokenizer)
    eos = _eos_id(tokenizer)
    text = example.target
    if use_chat_template:
        messages = prompt_messages(example)
        if prompt is None:
            prompt = prompt_text(example, tokenizer, True)
        full = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": example.target}], tokenize=False
        )
        if full.startswith(prompt):
            text = full[len(prompt):]
    ids = _encode(tokenizer, text)
    if eos in ids:
        ids = ids[: len(ids) - ids[::-1].index(eos)]  # up to and including the last EOS
    else:
        ids.append(eos)
    return ids


@dataclass
class TokenizeStats:
    """What tokenization did to a data set: counts, and prompt/target token length percentiles."""

    n_examples: int = 0
    n_kept: int = 0
    n_prompt_truncated: int = 0
    n_dropped: int = 0
    n_empty_target: int = 0
    max_length: int | None = None
    prompt_len: dict[str, float] = field(default_factory=dict)
    target_len: dict[str, float] = field(default_factory=dict)
    dropped_lines: list[Any] = field(default_factory=list)

    def summary(self) -> str:
        def fmt(d):
            return " ".join(f"{k}={v:g}" for k, v in d.items())

        return (
            f"{self.n_kept}/{self.n_examples} examples kept (max_length={self.max_length}): "
            f"{self.n_prompt_truncated} prompt-truncated, {self.n_dropped} dropped (target too long), "
            f"{self.n_empty_target} dropped (empty target); "
            f"prompt tokens [{fmt(self.prompt_len)}], target tokens [{fmt(self.target_len)}]"
        )

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "dropped_lines"} | {
            "dropped_lines": self.dropped_lines[:100]
        }


def _percentiles(values: Sequence[int]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)

    def q(p: float) -> float:  # linear interpolation, as numpy's default
        x = (len(s) - 1) * p
        lo = int(x)
        hi = min(lo + 1, len(s) - 1)
        return float(s[lo] + (s[hi] - s[lo]) * (x - lo))

    return {"min": float(s[0]), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": float(s[-1])}


def tokenize_example(
    example: Example, tokenizer, max_length: int | None = None, use_chat_template: bool | None = None
) -> tuple[dict[str, list[int]] | None, bool, int, int]:
    """`(features or None if dropped, prompt_truncated, prompt_len, target_len)` for one example."""
    if use_chat_template is None:
        use_chat_template = has_chat_template(tokenizer)
    p_text = prompt_text(example, tokenizer, use_chat_template)
    p = prompt_ids(example, tokenizer, use_chat_template)
    t = target_ids(example, tokenizer, use_chat_template, prompt=p_text)
    n_p, n_t = len(p), len(t)
    truncated = False
    if max_length is not None and n_p + n_t > max_length:
        bos = tokenizer.bos_token_id
        keep_bos = bool(p) and bos is not None and p[0] == bos
        room = max_length - n_t - int(keep_bos)
        if room < 1:  # not even one prompt token fits next to the target
            return None, False, n_p, n_t
        p = ([bos] if keep_bos else []) + p[len(p) - room:]
        truncated = True
    ids = p + t
    feats = {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": [IGNORE_INDEX] * len(p) + t,
    }
    return feats, truncated, n_p, n_t


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer,
    max_length: int | None = 1024,
    use_chat_template: bool | None = None,
    drop_empty_targets: bool = True,
) -> tuple[list[dict[str, list[int]]], TokenizeStats]:
    """Tokenize for causal-LM fine-tuning: `input_ids`, `attention_mask`, `labels` (-100 on the prompt).

    `use_chat_template=None` uses the tokenizer's chat template when it has one, else `PLAIN_TEMPLATE`.
    Examples with an empty target (some test files have no rationale) teach nothing but EOS and are
    dropped by default (`n_empty_target`). Raises `ValueError` when nothing is left.
    """
    if not examples:
        raise ValueError("No examples to tokenize (empty data set)")
    if use_chat_template is None:
        use_chat_template = has_chat_template(tokenizer)
    stats = TokenizeStats(n_examples=len(examples), max_length=max_length)
    out, p_lens, t_lens = [], [], []
    for ex in examples:
        if drop_empty_targets and not ex.target.strip():
            stats.n_empty_target += 1
            continue
        feats, truncated, n_p, n_t = tokenize_example(ex, tokenizer, max_length, use_chat_template)
        p_lens.append(n_p)
        t_lens.append(n_t)
        if feats is None:
            stats.n_dropped += 1
            stats.dropped_lines.append(ex.meta.get("line"))
            continue
        stats.n_prompt_truncated += int(truncated)
        out.append(feats)
    stats.n_kept = len(out)
    stats.prompt_len = _percentiles(p_lens)
    stats.target_len = _percentiles(t_lens)
    if stats.n_dropped or stats.n_prompt_truncated or stats.n_empty_target:
        logger.warning(stats.summary())
    if not out:
        raise ValueError(f"All {len(examples)} examples were dropped: {stats.summary()}")
    return out, stats
