"""Per layer: how often the top-1 already equals the last layer's, and how close the hidden state is to
the last one (the diminishing-returns paper's layer-to-final similarity)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .collect import LayerRecords
from .plots import by_model, figure, lines, save


def agreement_rows(rec: LayerRecords) -> list[dict[str, Any]]:
    """One row per layer 1..L: ``agree`` (share of tokens whose top-1 equals the last layer's),
    ``accuracy`` (top-1 equals the teacher-forced token), ``similarity`` / ``similarity_std``
    (cos(h_i, h_L) over tokens), ``topk_final`` (mean share of the last layer's top-k in the layer's
    top-k, k = analyze.top_k)."""
    final = rec.preds[-1]
    rows = []
    for i in range(rec.num_layers):
        cos = rec.cos_final[i + 1].double()
        rows.append({
            "layer": i + 1,
            "agree": float((rec.preds[i] == final).double().mean()),
            "accuracy": float((rec.preds[i] == rec.labels).double().mean()),
            "similarity": float(cos.mean()),
            "similarity_std": float(cos.std(unbiased=False)),
            "topk_final": float(rec.top10_final[i].double().mean()),
        })
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    fig, (a, b) = figure(2, "Agreement with the last layer")
    for j, (model, rs) in enumerate(by_model(rows).items()):
        color = f"C{j}"
        lines(a, rs, "layer", "agree", f"{model} top-1 = last".strip(), color=color)
        lines(a, rs, "layer", "accuracy", f"{model} top-1 = target".strip(), linestyle="--", color=color)
        lines(b, rs, "layer", "similarity", model, color=color)
    a.set(xlabel="layer", ylabel="share of tokens", ylim=(0, 1.02))
    b.set(xlabel="layer", ylabel="mean cos(h_i, h_L)", title="layer-to-final similarity")
    return save(fig, path)
