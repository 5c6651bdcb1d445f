"""Per layer: the confidence a gate would read (max probability, top-1/top-2 gap, entropy), split by
whether the layer's top-1 is already the final one, and the probability of the final token (MEE Fig. 2).
Two models side by side show the natural-capability paper's finding: with joint optimization the
confidence grows smoothly with depth instead of jumping at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from .collect import LayerRecords
from .plots import by_model, figure, lines, save


def _mean(x: Tensor, mask: Tensor) -> float | None:
    return float(x[mask].double().mean()) if bool(mask.any()) else None


def confidence_rows(rec: LayerRecords) -> list[dict[str, Any]]:
    """One row per layer: ``max_prob``, ``gap``, ``entropy`` (nats) over all tokens and over those whose
    top-1 equals the last layer's (``_agree``) or not (``_disagree``; empty = None), ``p_final`` (mean and
    std of the probability given to the final top-1), ``share_agree``."""
    final = rec.preds[-1]
    rows = []
    for i in range(rec.num_layers):
        agree = rec.preds[i] == final
        values = {"max_prob": rec.top2[i, :, 0], "gap": rec.top2[i, :, 0] - rec.top2[i, :, 1],
                  "entropy": rec.entropies[i]}
        row: dict[str, Any] = {"layer": i + 1, "share_agree": float(agree.double().mean())}
        for name, x in values.items():
            row[name] = float(x.double().mean())
            row[f"{name}_agree"] = _mean(x, agree)
            row[f"{name}_disagree"] = _mean(x, ~agree)
        row["p_final"] = float(rec.p_final[i].double().mean())
        row["p_final_std"] = float(rec.p_final[i].double().std(unbiased=False))
        rows.append(row)
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    fig, axes = figure(4, "Confidence by layer (solid: top-1 already final; dashed: not yet)", width=4.2)
    for j, (model, rs) in enumerate(by_model(rows).items()):
        color = f"C{j}"  # one colour per model in every panel
        for ax, name in zip(axes[:3], ("max_prob", "gap", "entropy"), strict=True):
            lines(ax, rs, "layer", f"{name}_agree", f"{model} final".strip(), color=color)
            lines(ax, rs, "layer", f"{name}_disagree", f"{model} not final".strip(), linestyle="--", color=color)
            ax.set(xlabel="layer", title=name)
        xs = [r["layer"] for r in rs]
        mean = [r["p_final"] for r in rs]
        std = [r["p_final_std"] for r in rs]
        axes[3].plot(xs, mean, marker="o", markersize=3, label=model or None, color=color)
        axes[3].fill_between(xs, [m - s for m, s in zip(mean, std, strict=True)],
                             [m + s for m, s in zip(mean, std, strict=True)], alpha=0.1, color=color)
    axes[3].set(xlabel="layer", title="p(final top-1): mean +- std")
    return save(fig, path)
