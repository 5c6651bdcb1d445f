"""CALM's weighted cross-entropy over the exits of a shared head: L = sum_i alpha_i * CE(g(h_i), y)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def weighted_cross_entropy(
    logits: Sequence[Tensor],
    labels: Tensor,
    weights: Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Reference (materialising) CALM loss.

    logits: n tensors (..., V), one per exit; labels: (...) with `ignore_index` for padding;
    weights: (n,). Returns (scalar loss = sum_i w_i * mean CE_i, per-exit CE (n,) detached).
    """
    ces = torch.stack(
        [
            F.cross_entropy(
                z.reshape(-1, z.shape[-1]).float(),
                labels.reshape(-1),
                ignore_index=ignore_index,
                label_smoothing=label_smoothing,
            )
            for z in logits
        ]
    )
    return (weights.to(ces) * ces).sum(), ces.detach()
