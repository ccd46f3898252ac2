"""Data: benchmark readers, chat-template/plain formatting, loss-masked tokenization and padding.

Typical use::

    examples = load_examples("../shared/data/gsm8k/train.jsonl")
    features, stats = tokenize_examples(examples, tokenizer, max_length=512)
    batch = DataCollator(tokenizer)(features[:8])
"""

from .collator import DataCollator
from .packing import PackedCollator, pack_features
from .readers import FORMATS, DataFormatError, Example, Examples, load_examples, parse_record
from .tokenize import (
    IGNORE_INDEX,
    PLAIN_TEMPLATE,
    TokenizeStats,
    has_chat_template,
    prompt_ids,
    prompt_text,
    target_ids,
    tokenize_example,
    tokenize_examples,
)

__all__ = [
    "DataCollator",
    "PackedCollator",
    "pack_features",
    "DataFormatError",
    "Example",
    "Examples",
    "FORMATS",
    "IGNORE_INDEX",
    "PLAIN_TEMPLATE",
    "TokenizeStats",
    "has_chat_template",
    "load_examples",
    "parse_record",
    "prompt_ids",
    "prompt_text",
    "target_ids",
    "tokenize_example",
    "tokenize_examples",
]
