"""MEE's hidden-state saturation study (Table 1) and top-1 stability (Fig. 1).

Each scored token is one of MEE's "sequences" (the prefix fed to the decoder; its length is the token's
position). Its curve s_i = cos(h_i, h_L), i = 0..L (0: the input of layer 1). Per token: the first layer
i < L with s_i >= threshold (L if none), the number of such layers, and whether s increases strictly
from layer 0 / 4 / 8 to L. Tokens sorted by the mean of s_1..s_{L-1}: the top n are "easy", the bottom
n "difficult"."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .collect import LayerRecords
from .plots import by_model, figure, lines, save


def token_saturation(cos_final: Tensor, threshold: float = 0.9, starts: Sequence[int] = (0, 4, 8)) -> dict[str, Tensor]:
    """Per token of ``cos_final (L + 1, N)``: ``mean`` (s_1..s_{L-1}, s_L when L = 1), ``first_similar``,
    ``similar_states`` and ``monotonic_<k>`` (float 1/0, NaN where s_k is not known or k >= L)."""
    L = cos_final.shape[0] - 1
    inner = cos_final[1:L] if L > 1 else cos_final[1:]
    similar = cos_final[1:L] >= threshold  # layers i < L: none when L = 1
    never = torch.full((cos_final.shape[1],), L, dtype=torch.long)
    first = torch.where(similar.any(0), similar.int().argmax(0) + 1, never) if L > 1 else never
    out = {"mean": inner.double().mean(0), "first_similar": first.double(), "similar_states": similar.double().sum(0)}
    for k in starts:
        if k >= L:
            out[f"monotonic_{k}"] = torch.full((cos_final.shape[1],), float("nan"), dtype=torch.float64)
            continue
        seg = cos_final[k:]
        inc = (seg[1:] > seg[:-1]).all(0).double()
        out[f"monotonic_{k}"] = torch.where(seg.isnan().any(0), torch.nan, inc)
    return out


def _stats(name: str, index: Tensor, per: dict[str, Tensor], lengths: Tensor) -> dict[str, Any]:
    row: dict[str, Any] = {"set": name, "tokens": int(index.numel())}
    for key, x in [("first_similar", per["first_similar"]), ("similar_states", per["similar_states"]),
                   ("length", lengths.double())]:
        v = x[index]
        row[key] = float(v.mean())
        row[f"{key}_std"] = float(v.std(unbiased=False))
    for key in [k for k in per if k.startswith("monotonic_")]:
        v = per[key][index]
        v = v[~v.isnan()]
        row[key] = float(v.mean()) if v.numel() else None
    return row


def saturation_rows(
    rec: LayerRecords, oracle: Tensor, threshold: float = 0.9, set_size: int | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Table rows (sets ``easy``, ``difficult``, ``all``) and layer rows (0..L: mean similarity of each set,
    ``top1_stability`` = share of tokens whose top-1 no longer changes from the layer on)."""
    per = token_saturation(rec.cos_final, threshold)
    n = rec.num_tokens
    size = set_size or max(1, min(1000, n // 4))
    order = per["mean"].argsort(descending=True)
    sets = {"easy": order[:size], "difficult": order[-size:], "all": order}
    table = [_stats(name, idx, per, rec.positions) for name, idx in sets.items()]
    layers = []
    for i in range(rec.num_layers + 1):
        row: dict[str, Any] = {"layer": i}
        for name, idx in sets.items():
            v = rec.cos_final[i, idx].double()
            row[f"similarity_{name}"] = None if bool(v.isnan().all()) else float(v.nanmean())
        row["top1_stability"] = None if i == 0 else float((oracle <= i).double().mean())
        layers.append(row)
    return table, layers


def plot(layer_rows: list[dict[str, Any]], path: Path, threshold: float) -> Path:
    fig, (a, b) = figure(2, "Hidden-state saturation (MEE Table 1) and top-1 stability (MEE Fig. 1)")
    for j, (model, rs) in enumerate(by_model(layer_rows).items()):
        color = f"C{j}"
        lines(a, rs, "layer", "similarity_easy", f"{model} easy".strip(), color=color)
        lines(a, rs, "layer", "similarity_difficult", f"{model} difficult".strip(), linestyle="--", color=color)
        lines(b, [r for r in rs if r["layer"] > 0], "layer", "top1_stability", model, color=color)
    a.axhline(threshold, color="grey", linewidth=0.8, linestyle=":")
    a.set(xlabel="layer (0: input of layer 1)", ylabel="mean cos(h_i, h_L)")
    b.set(xlabel="layer", ylabel="share of tokens whose top-1 no longer changes", ylim=(0, 1.02))
    return save(fig, path)
