"""How well a gate finds the oracle exit layer (the natural-capability paper's gating comparison).

For every policy (confidence measure or trained classifier) and threshold: the exit layer the gate picks
against the oracle -- shares of tokens it sends out too early, exactly at, or too late -- the mean exit
layer and the consistency with the last layer. Per policy, the **gating efficiency**

    eta = (L - mean exit at the best threshold) / (L - oracle mean exit)

where the best threshold is the one with the lowest mean exit among those with consistency >= c (0.99 by
default): the share of the oracle's skippable layers the gate really skips at that consistency (1 = as
good as the oracle, 0 = no saving; NaN when no threshold reaches c or no token can skip).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from eetrain.exits.measures import ExitRecords
from eetrain.exits.policy import evaluate_policy, exit_layers
from eetrain.exits.settings import PolicySpec
from eetrain.exits.thresholds import describe_threshold, value_label

from .plots import by_model, figure, save


def gate_row(exit_layer: Tensor, oracle: Tensor, preds: Tensor) -> dict[str, float]:
    """Shares too early / exact / too late against ``oracle (N,)``, mean exit layer, consistency."""
    stats = evaluate_policy(exit_layer, preds)
    return {
        "mean_exit_layer": stats["mean_exit_layer"],
        "consistency": stats["consistency"],
        "too_early": float((exit_layer < oracle).double().mean()),
        "exact": float((exit_layer == oracle).double().mean()),
        "too_late": float((exit_layer > oracle).double().mean()),
    }


def efficiency(num_layers: int, mean_exit: float, oracle_mean: float) -> float:
    """(L - mean_exit) / (L - oracle_mean); NaN when the oracle skips nothing."""
    room = num_layers - oracle_mean
    return (num_layers - mean_exit) / room if room > 0 else float("nan")


def gating_rows(
    records: ExitRecords, specs: Sequence[PolicySpec], oracle: Tensor, consistency: float = 0.99
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows per (policy, value) and one summary row per policy (``best_threshold`` at consistency >= c,
    its mean exit, ``gating_efficiency``, and the shares too early / exact / too late there)."""

    L = records.num_layers
    preds = records.preds()
    oracle_mean = float(oracle.double().mean())
    rows, summary = [], []
    for spec in specs:
        mine = []
        for value in spec.values or (None,):
            policy = spec.policy if value is None else spec.policy.at_value(value)
            # a policy as configured reports its own threshold (so a qualifying one is named as best)
            shown = describe_threshold(policy.threshold) if value is None else value_label(value)
            row = {"policy": spec.name, "threshold": shown, **gate_row(exit_layers(policy, records), oracle, preds)}
            row["skip_ratio"] = 1.0 - row["mean_exit_layer"] / L
            mine.append(row)
        rows += mine
        ok = [r for r in mine if r["consistency"] >= consistency]
        best = min(ok, key=lambda r: r["mean_exit_layer"]) if ok else None
        summary.append({
            "policy": spec.name,
            "best_threshold": None if best is None else best["threshold"],
            "mean_exit_layer": float("nan") if best is None else best["mean_exit_layer"],
            "consistency": float("nan") if best is None else best["consistency"],
            "oracle_mean_exit_layer": oracle_mean,
            "gating_efficiency": float("nan") if best is None else efficiency(L, best["mean_exit_layer"], oracle_mean),
            **({k: best[k] for k in ("too_early", "exact", "too_late")} if best else {}),
        })
    return rows, summary


def plot(rows: list[dict[str, Any]], summary: list[dict[str, Any]], path: Path, consistency: float) -> Path:
    fig, (a, b) = figure(2, f"Gates against the oracle (best threshold: consistency >= {consistency:g})", width=5.5)
    groups = by_model(rows)
    styles = ["-", "--", ":", "-."]
    for j, (model, rs) in enumerate(groups.items()):
        for name in dict.fromkeys(r["policy"] for r in rs):
            pts = sorted((r["mean_exit_layer"], r["consistency"]) for r in rs if r["policy"] == name)
            a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3,
                   linestyle=styles[j % len(styles)], label=f"{model} {name}".strip())
    for j, (model, rs) in enumerate(by_model(summary).items()):
        a.axvline(rs[0]["oracle_mean_exit_layer"], color="black", linestyle=styles[j % len(styles)], linewidth=0.8,
                  label=f"{model} oracle".strip())
        names = [r["policy"] for r in rs]
        eff = [0.0 if math.isnan(r["gating_efficiency"]) else r["gating_efficiency"] for r in rs]
        width = 0.8 / max(len(groups), 1)
        b.bar([i + (j - (len(groups) - 1) / 2) * width for i in range(len(names))], eff, width=width,
              label=model or None)
        b.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    a.axhline(consistency, color="grey", linewidth=0.8, linestyle=":")
    a.set(xlabel="mean exit layer", ylabel="consistency with the last layer")
    b.set(ylabel="gating efficiency (0 if no threshold qualifies)")
    return save(fig, path)
