"""Answer extraction from free-form completions, and scoring against gold labels.

Kept deliberately forgiving (commas, "$", fractions, missing "The answer is") because a model that is
right but phrases its answer oddly should not count as wrong; kept deterministic so scores compare.
"""

from __future__ import annotations

import math
import re

__all__ = [
    "COMMONSENSE_LABELS",
    "extract_number",
    "parse_number",
    "extract_choice",
    "extract_label",
    "label_set_for",
    "is_correct",
    "wilson_interval",
]

# a number: optional minus (not part of "3-4"), thousands with commas, decimals; or ".5"
_NUM = r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<![\w.])-?\.\d+"
_FRACTION = re.compile(rf"({_NUM})\s*/\s*({_NUM})(?![\d.]*\d)")
_NUMBER = re.compile(_NUM)
_MARKER = re.compile(r"the (?:final )?answer is|answer:|####", re.I)


def parse_number(text: str) -> float | None:
    """A number written as text ("1,234", "-3.5", "$5", "3/4", "576.0"), or None."""
    text = str(text).strip().replace("$", "").rstrip(".").strip()
    m = _FRACTION.fullmatch(text)
    if m:
        den = float(m.group(2).replace(",", ""))
        return float(m.group(1).replace(",", "")) / den if den else None
    m = _NUMBER.fullmatch(text) or _NUMBER.search(text)
    return float(m.group(0).replace(",", "")) if m else None


def _numbers(text: str) -> list[float]:
    """All numbers in order; "a/b" counts as one number a/b."""
    out: list[tuple[int, float]] = []
    taken: list[tuple[int, int]] = []
    for m in _FRACTION.finditer(text):
        den = float(m.group(2).replace(",", ""))
        if den:
            out.append((m.start(), float(m.group(1).replace(",", "")) / den))
            taken.append(m.span())
    for m in _NUMBER.finditer(text):
        if not any(a <= m.start() < b for a, b in taken):
            out.append((m.start(), float(m.group(0).replace(",", ""))))
    return [v for _, v in sorted(out)]


def extract_number(completion: str) -> float | None:
    """The predicted number: the first number after the last "The answer is"/"####", else the last number."""
    text = completion.replace("$", "").replace("\u2212", "-")
    markers = list(_MARKER.finditer(text))
    if markers:
        after = _numbers(text[markers[-1].end():])
        if after:
            return after[0]
    nums = _numbers(text)
    return nums[-1] if nums else None


_CHOICE_AFTER_MARKER = re.compile(r"(?i:answer\s*(?:is|:)?)\s*:?\s*\(?([A-E])\)?(?![A-Za-z])")
_CHOICE_PAREN = re.compile(r"\(([A-E])\)")
# a lone capital, but not the article in "A train leaves..."
_CHOICE_BARE = re.compile(r"(?<![A-Za-z'])([A-E])(?![A-Za-z'])(?!(?<=A) [a-z])")


def extract_choice(completion: str, letters: str = "ABCDE") -> str | None:
    """An AQuA option letter: after the last "answer is", else the last "(X)", else the last lone capital."""
    found = [m.group(1) for m in _CHOICE_AFTER_MARKER.finditer(completion)]
    found = [x for x in found if x in letters]
    if found:
        return found[-1]
    for pattern in (_CHOICE_PAREN, _CHOICE_BARE):
        found = [m.group(1) for m in pattern.finditer(completion) if m.group(1) in letters]
        if found:
            return found[-1]
    return None


COMMONSENSE_LABELS: dict[str, tuple[str, ...]] = {
    "boolean": ("true", "false"),
    "solution": ("solution1", "solution2"),
    "answer": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "option": ("option1", "option2"),
    "ending": ("ending1", "ending2", "ending3", "ending4"),
}


def label_set_for(gold: str) -> tuple[str, ...]:
    """The label words a gold answer's data set uses (all of them when the gold's form is unknown)."""
    g = str(gold).strip().lower()
    for labels in COMMONSENSE_LABELS.values():
        if g in labels:
            return labels
    for name, labels in COMMONSENSE_LABELS.items():
        if name != "boolean" and g.startswith(name):
            return labels
    return tuple(x for labels in COMMONSENSE_LABELS.values() for x in labels)


def extract_label(completion: str, labels: tuple[str, ...]) -> str | None:
    """The first of `labels` that occurs as a whole word (case-insensitive), as LLM-Adapters scores it."""
    pattern = re.compile(r"(?<![A-Za-z0-9])(" + "|".join(map(re.escape, labels)) + r")(?![A-Za-z0-9])", re.I)
    m = pattern.search(completion)
    return m.group(1).lower() if m else None


def is_correct(pred, gold, task: str, tol: float = 1e-3) -> bool:
    if pred is None or gold is None:
        return False
    if task == "math":
        g = parse_number(gold) if not isinstance(gold, (int, float)) else float(gold)
        return g is not None and math.isfinite(pred) and abs(float(pred) - g) <= tol
    return str(pred).strip().lower() == str(gold).strip().lower()


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval for k successes in n: sane at 0% and 100%, unlike the normal one."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)  # exact ends: rounding must not make 0%/100% look open
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)
