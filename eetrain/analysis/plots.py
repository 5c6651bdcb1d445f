"""Shared plotting glue: a figure of panels, one line per model, written atomically."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from eetrain.files import atomic_file


def figure(panels: int, title: str, width: float = 5.0):
    """A row of ``panels`` axes under ``title`` (matplotlib's Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(width * panels, 4.2), squeeze=False)
    fig.suptitle(title, fontsize=10)
    return fig, list(axes[0])


def save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    for ax in fig.axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def by_model(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Rows grouped by their ``model`` column, in first-seen order (one group "" without the column)."""
    out: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        out.setdefault(str(r.get("model", "")), []).append(r)
    return out


def lines(ax: Any, rows: Sequence[Mapping[str, Any]], x: str, y: str, label: str = "", **kw: Any) -> None:
    """One line of ``y`` against ``x`` over ``rows`` (missing values skipped)."""
    pts = [(r[x], r[y]) for r in rows if r.get(y) is not None and r[y] == r[y]]
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=label or None, **kw)
