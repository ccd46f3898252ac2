"""A model folder of a benchmark shape with random weights and a real tokenizer, for timing `sparselora finetune`
on shapes without a checkpoint here (docs/performance.md, "sparselora finetune against the Trainer path"):

    python benchmarks/random_model.py --shape llama3-8b --tokenizer TOKENIZER_FOLDER --out /tmp/l8b
    sparselora finetune --model /tmp/l8b --data ../shared/data/gsm8k/train.jsonl --sparsity llama3-8b-math10k ...
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparselora.bench.shapes import SHAPES, save_random_model  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", required=True, choices=sorted(SHAPES))
    ap.add_argument("--tokenizer", required=True, help="a folder with tokenizer files (e.g. a converted smollm2-135m)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print("wrote", save_random_model(a.shape, a.tokenizer, a.out, a.seed))
