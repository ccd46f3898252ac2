"""The masked dense reference of SparseLoRA's semantics, written independently of the library's index ops.

Given the kept channels of each sparse layer and the context mask, it runs the *dense* PEFT model and zeroes
what the semantics say is absent for context tokens:
  FFN:  intermediate channels outside S are zero (so down sees zeros there; LoRA branches included);
  q/k/v: base outputs outside the kept channels are zero, the LoRA branch is added in full;
  o:    the base reads only the kept input columns, the LoRA branch reads the full input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparselora.tokens import context_mask


def _base(module):
    return getattr(module, "base_layer", module)


def _channel_mask(ctx: torch.Tensor, keep: torch.Tensor, width: int, dtype) -> torch.Tensor:
    """(batch, seq, width): 0 where a context token's channel is not kept, 1 elsewhere."""
    m = torch.zeros(width, dtype=dtype, device=ctx.device)
    m[keep.to(ctx.device)] = 1
    return torch.where(ctx[..., None], m, torch.ones((), dtype=dtype, device=ctx.device))


def install_reference(model, kept: dict[int, dict[str, torch.Tensor]], batch, dense_output_tokens=True):
    """Hooks on a dense copy of the model that implement the semantics; returns the handles."""
    ctx = context_mask(batch["labels"], batch.get("attention_mask"), dense_output_tokens)
    layers = model.get_base_model().model.layers if hasattr(model, "get_base_model") else model.model.layers
    handles = []
    for i, entry in kept.items():
        layer = layers[i]
        if "ffn" in entry:
            mlp = layer.mlp

            def mlp_hook(mod, args, out, keep=entry["ffn"]):
                (x,) = args
                h = mod.act_fn(mod.gate_proj(x)) * mod.up_proj(x)
                h = h * _channel_mask(ctx, keep, h.shape[-1], h.dtype)
                return mod.down_proj(h)

            handles.append(mlp.register_forward_hook(mlp_hook))
        if "q" in entry:
            attn = layer.self_attn
            for p in "qkv":
                proj = getattr(attn, f"{p}_proj")

                def out_hook(mod, args, out, keep=entry[p]):
                    (x,) = args
                    b = _base(mod)
                    base = F.linear(x, b.weight, b.bias)
                    return out - base * (1 - _channel_mask(ctx, keep, out.shape[-1], out.dtype))

                handles.append(proj.register_forward_hook(out_hook))

            def o_hook(mod, args, out, keep=entry["o"]):
                (a,) = args
                dropped = a * (1 - _channel_mask(ctx, keep, a.shape[-1], a.dtype))
                return out - F.linear(dropped, _base(mod).weight)

            handles.append(attn.o_proj.register_forward_hook(o_hook))
    return handles


def assert_bf16_close_to_reference(sparse, ref_model, kept, batch, run, factor: float = 4.0, slack: float = 1e-2):
    """bf16 rounding depends on the order of operations, so judge the sparse bf16 run (``sparse`` = run's
    (logits, loss, grads)) against the reference in float64 with the same channels: it may not be much further
    from it than the reference's own bf16 run. Measured on tiny models, the per-tensor ratio of the two errors
    ranges 1-3 with the same code on different batches, so this guards against wrong math (errors of 10-100%),
    while exactness is checked in float32/float64."""
    import copy

    handles = install_reference(ref_model, kept, batch)
    bf16 = run(ref_model, batch)
    for h in handles:
        h.remove()
    exact = copy.deepcopy(ref_model).double()
    handles = install_reference(exact, kept, batch)
    truth = run(exact, batch)
    for h in handles:
        h.remove()

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    pairs = [("logits", sparse[0], bf16[0], truth[0]), ("loss", sparse[1], bf16[1], truth[1])]
    pairs += [(f"grad {n}", sparse[2][n], bf16[2][n], truth[2][n]) for n in truth[2]]
    for name, a, b, t in pairs:
        assert rel(a, t) <= factor * rel(b, t) + slack, (
            f"{name}: bf16 sparse error {rel(a, t):.3g} vs the bf16 reference's {rel(b, t):.3g} (float64 truth)"
        )
