"""The picture of a search: the found front against the uniform widths' curve."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from ..profile.plots import save_figure
from .core import SearchRow, SearchRows

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_AXES = {'macs': ('macs', 1e6, 'MACs (M, fvcore conv+linear)'), 'params': ('params', 1e6, 'parameters (M)'),
         'latency_ms': ('predicted_latency_ms', 1.0, 'latency (ms, per-stage table)')}


def _x(row: SearchRow, kind: str) -> float:
    attr, scale, _ = _AXES[kind]
    return getattr(row, attr) / scale


def plot_search(rows: SearchRows, path: Optional[str] = None, title: Optional[str] = None) -> Figure:
    """Validation top-1 against the budget's cost: the Pareto front of every configuration the
    search evaluated, the uniform grid widths, and the picks; saved atomically to ``path``."""
    import matplotlib

    if path is not None:
        matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    kind = rows.kind
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.plot([_x(r, kind) for r in rows.uniform], [r.val_top1 for r in rows.uniform], 'o-', color='tab:blue',
            label='uniform widths')
    ax.plot([_x(r, kind) for r in rows.front], [r.val_top1 for r in rows.front], '.--', color='tab:gray',
            label=f'{rows.method} front ({rows.evaluated} configurations)')
    for row in rows:
        ax.plot([_x(row, kind)], [row.val_top1], 's', color='tab:red', markersize=8)
        ax.annotate(row.name, (_x(row, kind), row.val_top1), textcoords='offset points', xytext=(4, -12), fontsize=8)
        ax.axvline(row.budget / _AXES[kind][1], color='tab:red', alpha=0.15)
    ax.plot([], [], 's', color='tab:red', label='picks')
    ax.set_xlabel(_AXES[kind][2])
    ax.set_ylabel('validation top-1 (%)')
    ax.set_title(title or f'search by {kind}')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc='lower right')
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
        plt.close(fig)
    return fig
