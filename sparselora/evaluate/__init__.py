"""Evaluation: batched greedy generation, answer extraction (math / AQuA / commonsense), Wilson 95% CI.

Typical use::

    scores = evaluate(model, tokenizer, load_examples(".../gsm8k/test.jsonl"), task="math", out_dir="runs/eval")
"""

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
from .runner import TASKS, evaluate, extract_prediction, generate

__all__ = [
    "COMMONSENSE_LABELS",
    "TASKS",
    "evaluate",
    "extract_choice",
    "extract_label",
    "extract_number",
    "extract_prediction",
    "generate",
    "is_correct",
    "label_set_for",
    "parse_number",
    "wilson_interval",
]
