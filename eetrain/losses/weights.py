"""Per-exit loss weights alpha_i over the exit layers that get a loss."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from eetrain.errors import ConfigError

SCHEMES = ("calm", "uniform", "geometric", "sum_l")


def layer_weights(
    scheme: str | Sequence[float],
    layers: Sequence[int],
    ratio: float = 0.5,
    key: str = "loss.terms.ce.weights",
    e_scale: float = 1.0,
    last_layer: int | None = None,
) -> Tensor:
    """Weights (n,) for the 1-based exit `layers` (n of them), ascending.

    calm:      alpha_i = i / sum_j j over the layers used (CALM, PABEE); deeper layers weigh more.
    uniform:   alpha_i = 1 / n.
    geometric: alpha_i proportional to ratio ** (L_last - i), normalised; ratio < 1 favours depth.
    sum_l:     LayerSkip's e_i = e_scale * sum_{k<=i} k = e_scale * i (i + 1) / 2, except the model's
               last layer (`last_layer`, default the deepest of `layers`), which keeps its full weight
               i (i + 1) / 2 without e_scale; normalised over `layers`.
    a list:    taken as given (length n, non-negative, not all zero); not renormalised.

    With a curriculum only some of the exits get a loss in a step; callers renormalise the weights of
    those exits to the same total (see `renormalise`).
    """
    n = len(layers)
    if isinstance(scheme, str):
        if scheme == "calm":
            w = torch.tensor([float(i) for i in layers])
        elif scheme == "uniform":
            w = torch.ones(n)
        elif scheme == "geometric":
            if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio:
                raise ConfigError(f"{key}: geometric ratio must be > 0, got {ratio}")
            w = torch.tensor([ratio ** (layers[-1] - i) for i in layers], dtype=torch.float64).float()
        elif scheme == "sum_l":
            if isinstance(e_scale, bool) or not isinstance(e_scale, int | float) or not e_scale > 0:
                raise ConfigError(f"{key}: sum_l needs e_scale > 0, got {e_scale}")
            last = layers[-1] if last_layer is None else last_layer
            w = torch.tensor(
                [i * (i + 1) / 2 * (1.0 if i == last else e_scale) for i in layers], dtype=torch.float64
            ).float()
        else:
            raise ConfigError(f"{key}={scheme!r} is unknown; allowed: {', '.join(SCHEMES)} or a list of {n} numbers")
        return w / w.sum()
    if not isinstance(scheme, Sequence) or any(isinstance(v, bool) or not isinstance(v, int | float) for v in scheme):
        raise ConfigError(f"{key}={scheme!r}; allowed: {', '.join(SCHEMES)} or a list of {n} numbers (one per exit layer)")
    values = [float(v) for v in scheme]
    if len(values) != n:
        raise ConfigError(f"{key} has {len(values)} values but there are {n} exit layers {list(layers)}")
    if any(not math.isfinite(v) or v < 0 for v in values) or not any(v > 0 for v in values):
        raise ConfigError(f"{key}={values}: weights must be finite, >= 0 and not all zero")
    return torch.tensor(values)


def renormalise(weights: Tensor, keep: Tensor) -> Tensor:
    """Weights (n,) of the exits that get a loss this step, rescaled to the total of all n.

    weights: (n,) from `layer_weights`; keep: (n,) bool, the exits active this step. Returns (k,),
    k = keep.sum(). For the normalised schemes this is the scheme computed over the active exits alone
    (e.g. calm: i / sum of the active i). If every active exit has weight 0 the zeros are returned.
    """
    kept = weights[keep]
    total = kept.sum()
    if total <= 0:
        return kept
    return kept * (weights.sum() / total)
