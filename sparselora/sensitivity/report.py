"""Reporting measured sensitivities: a table (with the chosen config), a heatmap, the YAML header of a chosen
config."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from sparselora.config import SparseLoRAConfig
from sparselora.sensitivity.measure import KIND_NAMES, KINDS, Sensitivity


def table_rows(sens: Sensitivity, cfg: SparseLoRAConfig | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-layer table: loss increase per level for FFN and attention, and the choice."""
    lv = [f"{v:g}" for v in sens.levels]
    header = ["layer"] + [f"FFN {v}" for v in lv] + [f"attn {v}" for v in lv]
    if cfg is not None:
        header += ["FFN chosen", "attn chosen"]
    d = {k: sens.delta(k) for k in KINDS}
    rows = []
    for i in range(sens.num_layers):
        row = [str(i)] + [f"{v:+.4f}" for v in d["ffn"][i]] + [f"{v:+.4f}" for v in d["attn"][i]]
        if cfg is not None:
            row += [f"{cfg.ffn_sparsity[i]:g}" if i in cfg.ffn_sparsity else "-",
                    f"{cfg.attn_sparsity[i]:g}" if i in cfg.attn_sparsity else "-"]
        rows.append(row)
    return header, rows


def format_table(sens: Sensitivity, cfg: SparseLoRAConfig | None = None) -> str:
    """Plain-text (markdown) table."""
    header, rows = table_rows(sens, cfg)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def print_table(sens: Sensitivity, cfg: SparseLoRAConfig | None = None, title: str | None = None) -> None:
    """The table with rich when it is installed, else plain text."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        if title:
            print(title)
        print(format_table(sens, cfg))
        return
    header, rows = table_rows(sens, cfg)
    t = Table(title=title)
    for h in header:
        t.add_column(h, justify="right")
    worst = max([abs(float(x)) for r in rows for x in r[1 : 1 + 2 * len(sens.levels)]] + [1e-12])
    for r in rows:
        cells = [r[0]]
        for x in r[1 : 1 + 2 * len(sens.levels)]:
            v = float(x)
            style = "red" if v > 0.5 * worst else "yellow" if v > 0.1 * worst else "green"
            cells.append(f"[{style}]{x}[/{style}]")
        cells += [f"[bold]{x}[/bold]" for x in r[1 + 2 * len(sens.levels) :]]
        t.add_row(*cells)
    console = Console()
    width = sum(max(len(h), 7) + 3 for h in header) + 1  # never squeeze numbers into ellipses
    if console.width < width:
        console = Console(width=width)
    console.print(t)


def fit_title(title: str, width_inches: float, fontsize: float = 9) -> str:
    """``title`` wrapped onto lines that fit a figure ``width_inches`` wide (a long one-line suptitle is clipped
    at both edges). An average character is taken as 0.6 of the font size wide, with a margin."""
    import textwrap

    per_line = max(20, int(width_inches * 72 / (0.6 * fontsize) * 0.9))
    return "\n".join(textwrap.wrap(title, per_line)) or title


def write_heatmap(sens: Sensitivity, path: str | Path, cfg: SparseLoRAConfig | None = None, title: str = "") -> bool:
    """PNG heatmap (layers x levels, FFN and attention panels, chosen levels boxed); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import SymLogNorm
    except ImportError:
        return False
    from sparselora.io import atomic_write

    import numpy as np

    n, L = sens.num_layers, len(sens.levels)
    data = {k: np.array(sens.delta(k), dtype=float) for k in KINDS}
    vmax = max(float(np.nanmax(np.abs(d))) for d in data.values()) or 1e-6
    norm = SymLogNorm(linthresh=max(vmax * 1e-3, 1e-6), vmin=-vmax, vmax=vmax)
    fig, axes = plt.subplots(1, 2, figsize=(3 + 1.1 * L * 2, 1.5 + 0.28 * n), sharey=True, constrained_layout=True)
    im = None
    for ax, kind in zip(axes, KINDS):
        im = ax.imshow(data[kind], aspect="auto", cmap="RdBu_r", norm=norm, origin="upper")
        ax.set_xticks(range(L), [f"{v:g}" for v in sens.levels])
        ax.set_xlabel("sparsity level")
        ax.set_title(f"{KIND_NAMES[kind]}: loss increase")
        if cfg is not None:
            chosen = cfg.ffn_sparsity if kind == "ffn" else cfg.attn_sparsity
            for i, s in chosen.items():
                if s in sens.levels:
                    j = sens.levels.index(s)
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=1.5, ec="black"))
        if n <= 48:
            for i in range(n):
                for j in range(L):
                    ax.text(j, i, f"{data[kind][i, j]:.3f}", ha="center", va="center", fontsize=6)
    axes[0].set_ylabel("layer")
    axes[0].set_yticks(range(n))
    fig.colorbar(im, ax=axes, label="loss - dense loss (symlog)", shrink=0.8)
    if title:
        fig.suptitle(fit_title(title, fig.get_size_inches()[0], fontsize=9), fontsize=9)
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return True


def yaml_header(lines: Sequence[str]) -> str:
    return "".join(f"# {line}".rstrip() + "\n" for line in lines)
