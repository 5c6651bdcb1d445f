"""The oracle exit layer of every token: the earliest layer from which its top-1 stays equal to the last
layer's (the natural-capability paper's "where could it exit"), its histogram and summary."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from eetrain.layer_metrics import oracle_exit_layers

from .collect import LayerRecords
from .plots import by_model, figure, save


def oracle_layers(rec: LayerRecords) -> Tensor:
    """``(N,)`` long oracle exit layer per token (1..L)."""
    return oracle_exit_layers(rec.preds)


def oracle_rows(rec: LayerRecords, before_last: Sequence[int] = (1, 2, 5, 10)) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows per layer 1..L: ``tokens`` whose oracle layer it is, their ``share`` and the ``cumulative``
    share (= tokens whose top-1 no longer changes from this layer on: MEE's top-1 stability). Summary:
    ``mean``, ``median``, ``before_last_<k>`` = share of tokens that could exit at least k layers
    before the last (oracle <= L - k; only k < L)."""
    L = rec.num_layers
    layers = oracle_layers(rec)
    counts = torch.bincount(layers, minlength=L + 1)[1:].double()
    n = float(counts.sum())
    cum = counts.cumsum(0)
    rows = [{"layer": i + 1, "tokens": int(counts[i]), "share": float(counts[i] / n), "cumulative": float(cum[i] / n)}
            for i in range(L)]
    summary: dict[str, Any] = {
        "tokens": int(n),
        "num_layers": L,
        "mean": float(layers.double().mean()),
        "median": float(layers.double().quantile(0.5)),
    }
    for k in before_last:
        if k < L:
            summary[f"before_last_{k}"] = float((layers <= L - k).double().mean())
    return rows, summary


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    fig, (a, b) = figure(2, "Oracle exit layer (earliest layer whose top-1 stays the last layer's)")
    groups = by_model(rows)
    width = 0.8 / max(len(groups), 1)
    for j, (model, rs) in enumerate(groups.items()):
        a.bar([r["layer"] + (j - (len(groups) - 1) / 2) * width for r in rs], [r["share"] for r in rs],
              width=width, label=model or None)
        b.plot([r["layer"] for r in rs], [r["cumulative"] for r in rs], marker="o", markersize=3, label=model or None)
    a.set(xlabel="oracle exit layer", ylabel="share of tokens")
    b.set(xlabel="layer", ylabel="share of tokens settled", ylim=(0, 1.02), title="top-1 no longer changes")
    return save(fig, path)
