"""What early-exit generation is judged by, besides speed: agreement with the full model's output."""

from __future__ import annotations

from collections.abc import Sequence


def token_consistency(outputs: Sequence[Sequence[int]], full: Sequence[Sequence[int]]) -> float:
    """Share of the full model's tokens that early exit reproduces at the same position.

    Position i of a full-model sequence counts as consistent when the early-exit sequence has the same
    token at i (a shorter early-exit sequence misses the rest). CALM's token-level consistency.
    """
    if len(outputs) != len(full):
        raise ValueError(f"{len(outputs)} early-exit sequences but {len(full)} full-model sequences")
    total = sum(len(f) for f in full)
    if total == 0:
        return float("nan")
    same = sum(sum(a == b for a, b in zip(o, f, strict=False)) for o, f in zip(outputs, full, strict=True))
    return same / total


def sequence_consistency(outputs: Sequence[Sequence[int]], full: Sequence[Sequence[int]]) -> float:
    """Share of sequences identical to the full model's."""
    if len(outputs) != len(full):
        raise ValueError(f"{len(outputs)} early-exit sequences but {len(full)} full-model sequences")
    if not full:
        return float("nan")
    return sum(list(o) == list(f) for o, f in zip(outputs, full, strict=True)) / len(full)
