"""Summaries and plots of finished runs: `loss.png` (dense vs sparse overlaid) and a text comparison."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from sparselora.io import atomic_write


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    p = Path(run_dir) / "summary.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def sibling_runs(run_dir: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """Runs in ``run_dir``'s parent folder on the same data and model (including ``run_dir`` itself, first)."""
    run_dir = Path(run_dir).resolve()
    own = read_summary(run_dir)
    if own is None:
        return []
    out = [(run_dir, own)]
    parent = run_dir.parent
    for d in sorted(p for p in parent.iterdir() if p.is_dir() and p != run_dir):
        s = read_summary(d)
        if s is None:
            continue
        same = (s.get("data", {}).get("path") == own.get("data", {}).get("path")
                and s.get("config", {}).get("model") == own.get("config", {}).get("model"))
        if same:
            out.append((d, s))
    return out


MODE_LINES = {"dense": "-", "sparse": "--"}


def line_styles(runs: list[tuple[Path, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One colour per run (sibling runs of one mode must not share one), the line style per mode."""
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
               "tab:gray", "tab:olive", "tab:cyan"]
    return [dict(color=palette[i % len(palette)], ls=MODE_LINES.get(s.get("mode"), ":")) for i, (_, s) in
            enumerate(runs)]


def plot_losses(run_dir: str | Path, runs: list[tuple[Path, dict[str, Any]]] | None = None,
                out: str | Path | None = None, title: str | None = None) -> Path | None:
    """Write ``loss.png`` (training loss per step) for ``run_dir``, with sibling runs overlaid."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    runs = runs if runs is not None else sibling_runs(run_dir)
    runs = [(d, s) for d, s in runs if s.get("losses")]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for (d, s), style in zip(runs, line_styles(runs)):
        xs = [p["step"] for p in s["losses"]]
        ys = [p["loss"] for p in s["losses"]]
        mode = s.get("mode", "?")
        label = f"{d.name} ({mode})" if d.name != mode else mode
        step_s = s.get("median_sparse_step_seconds") if mode == "sparse" else s.get("median_step_seconds")
        if step_s:
            label += f", {step_s:.2f} s/step"
        line, = ax.plot(xs, ys, marker="o" if len(xs) < 40 else None, ms=3, label=label, **style)
        held = (s.get("heldout") or {}).get("dense_loss")
        if held is not None:  # the fair comparison: each adapter evaluated dense on the same held-out examples
            ax.axhline(held, color=line.get_color(), ls=":", lw=1.2,
                       label=f"{d.name if d.name != mode else mode}: held-out loss, evaluated dense {held:.3f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (dotted: held-out, dense)")
    first = runs[0][1]
    ax.set_title(title or f"{Path(str(first.get('config', {}).get('model', ''))).name}: "
                          f"{Path(str(first.get('data', {}).get('path', ''))).name}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    target = Path(out) if out is not None else Path(run_dir) / "loss.png"
    atomic_write(target, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return target


def _fmt_flops(x: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} FLOP"


def paired_speedup(dense: dict[str, Any], sparse: dict[str, Any]) -> float | None:
    """Median over the steps both runs took on the same batch (same step, same token count; the sparse run's
    sparse steps only) of dense / sparse seconds. Batches differ in size by a third in a short run, so the two
    runs' median steps are often different batches; the paired ratio compares the same work."""
    d = {(t["step"], t["tokens"]): t["seconds"] for t in dense.get("step_times") or []}
    ratios = [d[(t["step"], t["tokens"])] / t["seconds"] for t in sparse.get("step_times") or []
              if t.get("sparse") and (t["step"], t["tokens"]) in d and t["seconds"] > 0]
    return statistics.median(ratios) if ratios else None


def compare(dense: dict[str, Any], sparse: dict[str, Any]) -> dict[str, Any]:
    """Measured and analytic speed-up of a sparse run over a dense one: the paired per-step ratio where both runs
    saw the same batches (`paired_speedup`), else the ratio of their median steps."""
    d_step = dense.get("median_step_seconds")
    s_step = sparse.get("median_sparse_step_seconds") or sparse.get("median_step_seconds")
    median_ratio = (d_step / s_step) if d_step and s_step else None
    paired = paired_speedup(dense, sparse)
    return {
        "dense_step_seconds": d_step,
        "sparse_step_seconds": s_step,
        "measured_speedup": paired if paired is not None else median_ratio,
        "measured_by": "median of per-step ratios on the same batches" if paired is not None else "median steps",
        "median_step_speedup": median_ratio,
        "analytic_speedup": sparse["flops"]["dense"] / sparse["flops"]["sparse"],
        "dense_flops_per_step": sparse["flops"]["dense"],
        "sparse_flops_per_step": sparse["flops"]["sparse"],
        "dense_final_loss": dense.get("final_loss"),
        "sparse_final_loss": sparse.get("final_loss"),
        "dense_heldout_loss": (dense.get("heldout") or {}).get("dense_loss"),
        "sparse_heldout_loss": (sparse.get("heldout") or {}).get("dense_loss"),
    }


def format_comparison(c: dict[str, Any]) -> str:
    def num(v, f):
        return f.format(v) if v is not None else "n/a"

    by = c.get("measured_by", "median steps")
    also = (f"; {c['median_step_speedup']:.2f}x by median steps"
            if by != "median steps" and c.get("median_step_speedup") else "")

    return "\n".join([
        f"{'':24}{'dense':>14}{'sparse':>14}",
        f"{'wall time / step':24}{num(c['dense_step_seconds'], '{:.3f} s'):>14}"
        f"{num(c['sparse_step_seconds'], '{:.3f} s'):>14}",
        f"{'FLOPs / step':24}{_fmt_flops(c['dense_flops_per_step']):>14}{_fmt_flops(c['sparse_flops_per_step']):>14}",
        f"{'final training loss':24}{num(c['dense_final_loss'], '{:.4f}'):>14}"
        f"{num(c['sparse_final_loss'], '{:.4f}'):>14}",
        f"{'held-out loss (dense)':24}{num(c.get('dense_heldout_loss'), '{:.4f}'):>14}"
        f"{num(c.get('sparse_heldout_loss'), '{:.4f}'):>14}",
        f"speed-up: {num(c['measured_speedup'], '{:.2f}x')} measured ({by}{also}), "
        f"{c['analytic_speedup']:.2f}x analytic (FLOPs)",
    ])
