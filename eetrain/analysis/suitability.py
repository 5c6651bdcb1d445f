"""A model's intrinsic early-exit suitability on a workload (after "The Diminishing Returns of Early-Exit
Decoding in Modern LLMs"), and the ranking of several models on the same data.

With S_l the mean over tokens of cos(h_l, h_L) (the layer-to-final similarity) and w_l = (L - l) / L
the share of the model a token exiting at l skips,

    ee_score = sum_{l=1}^{L-1} w_l * S_l / sum_{l=1}^{L-1} w_l        (in [-1, 1]; 1: every layer is
                                                                        already the last one)

weights a layer's similarity by what exiting there saves. ``relative_score`` = ee_score / ee_score of the
reference model (the first one, as the paper reports scores relative to Llama-2-7B). Beside it, what the
similarity promises is checked against decisions: ``skip_ratio`` = 1 - mean exit / L of the best
training-free measure at consistency >= c (gating), and ``oracle_skip`` = 1 - oracle mean exit / L."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .plots import figure, save


def ee_score(similarity: Sequence[float]) -> float:
    """``similarity``: S_1..S_L (S_L = 1). Returns the skip-weighted mean of S_1..S_{L-1} (NaN if L = 1)."""
    L = len(similarity)
    weights = [(L - l) / L for l in range(1, L)]  # noqa: E741 - l as in the formula
    if not weights:
        return float("nan")
    return sum(w * s for w, s in zip(weights, similarity[: L - 1], strict=True)) / sum(weights)


def suitability_rows(models: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``models``: name -> {``similarity`` (S_1..S_L), ``num_layers``, ``skip_ratio``, ``skip_policy``,
    ``oracle_mean_exit_layer``}, the reference first. Rows ranked by ``ee_score`` (best first)."""
    rows = []
    ref = None
    for name, m in models.items():
        score = ee_score(m["similarity"])
        ref = score if ref is None else ref
        rows.append({
            "model": name, "num_layers": m["num_layers"], "ee_score": score,
            "relative_score": score / ref if ref and not math.isnan(ref) else float("nan"),
            "skip_ratio": m.get("skip_ratio", float("nan")), "skip_policy": m.get("skip_policy"),
            "oracle_skip": 1.0 - m["oracle_mean_exit_layer"] / m["num_layers"],
        })
    rows.sort(key=lambda r: -r["ee_score"] if not math.isnan(r["ee_score"]) else math.inf)
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    return rows


def plot(rows: list[dict[str, Any]], path: Path, consistency: float) -> Path:
    fig, (a,) = figure(1, "Early-exit suitability", width=6.5)
    names = [r["model"] for r in rows]
    xs = range(len(names))
    for off, key, label in ((-0.27, "ee_score", "ee_score (skip-weighted similarity)"),
                            (0.0, "skip_ratio", f"skip ratio at consistency >= {consistency:g} (no training)"),
                            (0.27, "oracle_skip", "oracle skip ratio")):
        a.bar([x + off for x in xs], [0.0 if r[key] != r[key] else r[key] for r in rows], width=0.27, label=label)
    a.set_xticks(list(xs), names, fontsize=8)
    a.set(ylabel="score / share of layers skipped")
    return save(fig, path)
