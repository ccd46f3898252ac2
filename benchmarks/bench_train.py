"""Training throughput through transformers.Trainer on real, variable-length data (see sparselora/bench/train.py).

    python benchmarks/bench_train.py --shape llama3-8b --mix math
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparselora.bench.train import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
