"""Readers turning benchmark files into uniform `Example`s (prompt, target, gold answer).

Supported: GSM8K JSONL (`question`/`answer` with `#### N`), LLM-Adapters JSON (`instruction`/`input`/
`output`/`answer`), and generic JSON/JSONL with `prompt`/`completion`, `instruction`/`input`/`output`
or chat `messages`. Training and evaluation read the same records, so the gold answer travels along.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import SparseLoRAError

__all__ = ["Example", "Examples", "DataFormatError", "FORMATS", "load_examples", "parse_record"]

logger = logging.getLogger(__name__)

# format name -> keys a record must have (auto-detection checks them in this order)
FORMATS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "gsm8k": ("question", "answer"),
    "instruction": ("instruction", "output"),  # LLM-Adapters / Alpaca style; `input`, `answer` optional
    "prompt_completion": ("prompt", "completion"),
}
_FORMAT_ALIASES = {"llm_adapters": "instruction", "llm-adapters": "instruction", "alpaca": "instruction"}
_CALCULATOR = re.compile(r"<<[^<>]*>>")
_GSM8K_FINAL = re.compile(r"\n?\s*####\s*(.+?)\s*$", re.S)


class DataFormatError(SparseLoRAError, ValueError):
    """A data file or record cannot be read; the message names the file and line."""


@dataclass
class Example:
    """One supervised example: `prompt` is a string, or for chat data the list of messages before the target."""

    prompt: str | list[dict[str, str]]
    target: str
    answer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Examples(list):
    """A list of `Example`s that also remembers what was skipped while reading (`skipped`: (line, reason))."""

    def __init__(self, items: Iterable[Example] = (), skipped: list[tuple[int, str]] | None = None):
        super().__init__(items)
        self.skipped: list[tuple[int, str]] = skipped or []

    @property
    def n_bad_lines(self) -> int:
        return len(self.skipped)


def _detect(record: dict) -> str | None:
    for name, keys in FORMATS.items():
        if all(k in record for k in keys):
            return name
    return None


def _accepted() -> str:
    return "; ".join(f"{name}: keys {', '.join(keys)}" for name, keys in FORMATS.items())


def _gsm8k_answer(solution: str) -> str | None:
    m = _GSM8K_FINAL.search(solution)
    return m.group(1).replace(",", "").strip() if m else None


def parse_record(record: dict, fmt: str, clean_gsm8k: bool = True) -> Example:
    """One record in format `fmt` as an `Example`; raises `KeyError`/`ValueError`/`TypeError` if malformed."""
    if not isinstance(record, dict):
        raise TypeError(f"expected a JSON object, got {type(record).__name__}")
    missing = [k for k in FORMATS[fmt] if k not in record]
    if missing:
        raise KeyError(f"missing key(s) {missing} for format {fmt!r}")
    if fmt == "gsm8k":
        solution = str(record["answer"])
        answer = _gsm8k_answer(solution)
        if answer is None:
            raise ValueError("GSM8K answer has no final '#### N' line")
        target = solution
        if clean_gsm8k:  # calculator notes are tool markup, and "The answer is N." matches LLM-Adapters' style
            body = _GSM8K_FINAL.sub("", _CALCULATOR.sub("", solution)).rstrip()
            target = f"{body}\nThe answer is {answer}." if body else f"The answer is {answer}."
        return Example(str(record["question"]), target, answer)
    if fmt == "instruction":
        prompt = str(record["instruction"]).strip()
        extra = str(record.get("input") or "").strip()
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        answer = record.get("answer")
        return Example(prompt, str(record["output"]).strip(), None if answer is None else str(answer))
    if fmt == "prompt_completion":
        answer = record.get("answer")
        return Example(str(record["prompt"]), str(record["completion"]), None if answer is None else str(answer))
    if fmt == "chat":
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError("each message needs 'role' and 'content'")
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise ValueError("no assistant message to use as target")
        if last == 0:
            raise ValueError("the assistant message has no prompt before it")
        prompt = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages[:last]]
        answer = record.get("answer")
        return Example(prompt, str(messages[last]["content"]), None if answer is None else str(answer))
    raise ValueError(f"unknown format {fmt!r}")


def _iter_records(path: Path) -> Iterable[tuple[int, Any, str | None]]:
    """(line number or index, record or None, error) for each record; JSON files count records from 1."""
    if path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line), None
                except json.JSONDecodeError as exc:
                    yield lineno, None, f"invalid JSON ({exc.msg} at column {exc.colno})"
        return
    text = path.read_text(encoding="utf-8-sig")  # a UTF-8 BOM is read, not refused
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # a JSONL file named .json: read it line by line instead
            with open(path, encoding="utf-8-sig") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield lineno, json.loads(line), None
                        except json.JSONDecodeError as e:
                            yield lineno, None, f"invalid JSON ({e.msg} at column {e.colno})"
            return
        raise DataFormatError(f"{path}: line {exc.lineno}: invalid JSON ({exc.msg})") from exc
    if isinstance(data, dict):  # a few dumps wrap the list: {"data": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataFormatError(f"{path}: expected a JSON list of records (or JSONL)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of records (or JSONL)")
    for i, rec in enumerate(data, 1):
        yield i, rec, None


def load_examples(
    path: str | os.PathLike,
    fmt: str = "auto",
    skip_bad_lines: bool = False,
    clean_gsm8k: bool = True,
    limit: int | None = None,
) -> Examples:
    """Read `path` (.json or .jsonl) into `Examples`.

    `fmt`: "auto" (from the first record's keys), or one of `FORMATS` ("llm_adapters"/"alpaca" mean
    "instruction"). A malformed record raises `DataFormatError` naming file and line, unless
    `skip_bad_lines`, which counts it in `.skipped`. `clean_gsm8k` drops `<<calc>>` notes and turns the
    final `#### N` into "The answer is N.". An empty result raises.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in (".json", ".jsonl"))
        hint = f" (it holds {', '.join(inside[:5])}{', ...' if len(inside) > 5 else ''})" if inside else ""
        raise DataFormatError(f"Data path {path} is a folder, not a data file; pass the .jsonl/.json file{hint}")
    if not path.is_file():
        raise DataFormatError(f"Data file {path} does not exist")
    fmt = _FORMAT_ALIASES.get(fmt, fmt)
    if fmt != "auto" and fmt not in FORMATS:
        raise DataFormatError(f"Unknown data format {fmt!r}; accepted: auto, {', '.join(FORMATS)}")
    unit = "line" if path.suffix.lower() == ".jsonl" else "record"
    examples = Examples()
    for lineno, rec, err in _iter_records(path):
        if err is None and fmt == "auto" and isinstance(rec, dict):
            detected = _detect(rec)
            if detected is None:
                raise DataFormatError(
                    f"{path}: {unit} {lineno}: cannot tell the format from keys {sorted(rec)}. "
                    f"Accepted formats: {_accepted()}"
                )
            fmt = detected
        if err is None:
            try:
                if fmt == "auto":
                    raise TypeError(f"expected a JSON object, got {type(rec).__name__}")
                ex = parse_record(rec, fmt, clean_gsm8k=clean_gsm8k)
            except (KeyError, ValueError, TypeError) as exc:
                err = str(exc).strip("\"'")
        if err is not None:
            if not skip_bad_lines:
                raise DataFormatError(
                    f"{path}: {unit} {lineno}: {err} (--skip-bad-lines, or skip_bad_lines=True in Python, skips "
                    f"such {unit}s)"
                )
            examples.skipped.append((lineno, err))
            continue
        ex.meta.update(source=str(path), line=lineno, format=fmt)
        examples.append(ex)
        if limit is not None and len(examples) >= limit:
            break
    if examples.skipped:
        first_line, first_err = examples.skipped[0]
        logger.warning("skipped %d bad %s(s) of %s (first: %s %d: %s)", len(examples.skipped), unit, path, unit,
                       first_line, first_err)
    if not examples:
        raise DataFormatError(
            f"{path}: no usable examples" + (f" ({len(examples.skipped)} bad {unit}s skipped)" if examples.skipped else "")
        )
    return examples
