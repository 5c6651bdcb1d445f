"""Per-exit loss weights alpha_i over the exit layers that get a loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from eetrain.errors import ConfigError

SCHEMES = ("calm", "uniform", "geometric")


def layer_weights(
    scheme: str | Sequence[float],
    layers: Sequence[int],
    ratio: float = 0.5,
    key: str = "loss.ce.weights",
) -> Tensor:
    """Weights (n,) for the 1-based exit `layers` (n of them).

    calm:      alpha_i = i / sum_j j over the layers used (CALM, PABEE); deeper layers weigh more.
    uniform:   alpha_i = 1 / n.
    geometric: alpha_i proportional to ratio ** (L_last - i), normalised; ratio < 1 favours depth.
    a list:    taken as given (length n, non-negative, not all zero); not renormalised.
    """
    n = len(layers)
    if isinstance(scheme, str):
        if scheme == "calm":
            w = torch.tensor([float(i) for i in layers])
        elif scheme == "uniform":
            w = torch.ones(n)
        elif scheme == "geometric":
            if not 0 < ratio:
                raise ConfigError(f"{key}: geometric ratio must be > 0, got {ratio}")
            w = torch.tensor([ratio ** (layers[-1] - i) for i in layers], dtype=torch.float64).float()
        else:
            raise ConfigError(f"{key}={scheme!r} is unknown; allowed: {', '.join(SCHEMES)} or a list of {n} numbers")
        return w / w.sum()
    values = [float(v) for v in scheme]
    if len(values) != n:
        raise ConfigError(f"{key} has {len(values)} values but there are {n} exit layers {list(layers)}")
    if any(v < 0 for v in values) or not any(v > 0 for v in values):
        raise ConfigError(f"{key}={values}: weights must be >= 0 and not all zero")
    return torch.tensor(values)
