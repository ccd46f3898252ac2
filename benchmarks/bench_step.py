"""One LoRA fine-tuning step of several methods on a fixed batch, kernel-level (see sparselora/bench/step.py).

    python benchmarks/bench_step.py --shape llama3-8b --batch-preset math     # or: sparselora bench ...
    python benchmarks/bench_step.py --shape tiny --device cpu                 # smoke test, seconds
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparselora.bench.step import main  # noqa: E402

if __name__ == "__main__":
    main()
