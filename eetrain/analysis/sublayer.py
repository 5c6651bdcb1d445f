"""Top-1 and top-k stability through each block (the natural-capability paper's sub-layer view): the
residual stream after every sub-layer (attention, T5's cross-attention, MLP) and each sub-layer's own
output, all projected through the block's exit head. The paper's finding: the skip connection carries
the stable hypotheses, the module outputs vary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .collect import LayerRecords
from .plots import by_model, figure, lines, save


def sublayer_rows(rec: LayerRecords) -> list[dict[str, Any]]:
    """One row per (layer, point): ``top1_final`` (top-1 equals the last layer's), ``topk_final``
    (overlap of top-k with the last layer's top-k), ``topk_before`` (overlap with the top-k of the stream
    entering the sub-layer)."""
    rows = []
    for point, stats in rec.sublayer.items():
        name, kind = point.rsplit(".", 1)
        means = stats.double().mean(1)  # (L, 3)
        for i in range(rec.num_layers):
            rows.append({"layer": i + 1, "sublayer": name, "kind": kind, "top1_final": float(means[i, 0]),
                         "topk_final": float(means[i, 1]), "topk_before": float(means[i, 2])})
    return sorted(rows, key=lambda r: r["layer"])  # stable: each sub-layer in block order, stream then output


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    fig, (a, b) = figure(2, "Sub-layers: residual stream (solid) vs module output (dashed)", width=5.5)
    for model, rs in by_model(rows).items():
        for name in dict.fromkeys(r["sublayer"] for r in rs):
            for kind, style in (("stream", "-"), ("output", "--")):
                sel = [r for r in rs if r["sublayer"] == name and r["kind"] == kind]
                label = f"{model} {name} {kind}".strip()
                lines(a, sel, "layer", "topk_before", label, linestyle=style)
                lines(b, sel, "layer", "top1_final", label, linestyle=style)
    a.set(xlabel="layer", ylabel="top-k overlap with the stream before", ylim=(0, 1.02), title="top-k stability")
    b.set(xlabel="layer", ylabel="top-1 = last layer's", ylim=(0, 1.02), title="top-1 agreement")
    return save(fig, path)
