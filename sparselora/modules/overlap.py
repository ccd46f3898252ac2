"""Channel selection beside the dense rows' work, on a second CUDA stream.

A sparse layer's selection (the sampled rows' true projections, their scores, the top-k) is on the critical path
only for the context rows: the dense rows' projections do not depend on it. While a CUDA graph is captured, the
selection is issued on a side stream forked from the current one, and the fused op joins it (`join`) right before
its first use of the kept channels, after the dense rows' GEMMs. The graph then runs the two branches at once:
the selection's small, latency-bound kernels (scores, top-k) fill the SMs the dense GEMMs leave idle.

Eager runs select inline: there the step waits on the host, not on the GPU, and a stream switch only adds host
work. The kept channels are the same either way (the same kernels on the same inputs).
"""

from __future__ import annotations

import torch

ENABLED = True  # benchmarks turn it off to measure what it saves (`bench_step.py`, method sparselora_graph_inline)
_side: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    s = _side.get(device)
    if s is None:
        s = _side[device] = torch.cuda.Stream(device)
    return s


def _tensors(out):
    return list(out.values()) if isinstance(out, dict) else [out]


def select_beside(x: torch.Tensor, fn):
    """``(fn(), join)`` for a selection ``fn`` that reads activations ``x``. While a CUDA graph is being captured,
    ``fn`` runs on a side stream and ``join()`` makes the current stream wait for it (call it before reading the
    result); otherwise it runs inline and ``join`` is None."""
    if not (ENABLED and x.is_cuda and torch.cuda.is_current_stream_capturing()):
        return fn(), None
    main = torch.cuda.current_stream(x.device)
    side = _side_stream(x.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        out = fn()
    x.record_stream(side)  # read there: its memory is not reused until the side stream is past it
    for t in _tensors(out):
        t.record_stream(main)  # made there, read here (and in the backward)
    return out, lambda: main.wait_stream(side)
