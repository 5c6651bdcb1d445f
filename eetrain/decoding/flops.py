"""The floating-point operations a decode really runs: FLOPs saved, beside the time saved.

Counted, not modelled: torch's `FlopCounterMode` sees every matrix product and attention call that runs,
so the count includes what an analytic "layers x tokens" estimate leaves out -- the exit checks' head
products, the keys/values `copy` projects for skipped layers, `parallel`'s deep passes over waiting
positions, rows that ride along past their exit, padding rows, drafts that were rejected. A multiply-add
counts 2. Element-wise operations (norms, activations, softmax) are not counted, as in the papers' counts.
Counting slows the decode down (a Python hook per operation): time a decode, or count it, not both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_attention_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    # CPU's fused attention kernel is not among FlopCounterMode's formulas (CUDA's kernels are)
    return sdpa_flop_count(query_shape, key_shape, value_shape)


class FlopCount:
    """Context manager counting the FLOPs of what runs inside it.

    `total`: FLOPs so far; `mark()` remembers the count at a point (e.g. after the prefill) as `marked`.
    """

    def __init__(self) -> None:
        self.mode = FlopCounterMode(
            display=False, custom_mapping={torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}
        )
        self.marked: int | None = None

    def __enter__(self) -> FlopCount:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.mode.__exit__(*exc)

    @property
    def total(self) -> int:
        return int(self.mode.get_total_flops())

    def mark(self) -> None:
        self.marked = self.total


def flops_per_token(outs: Sequence[Any]) -> float:
    """Decoding FLOPs per generated token over counted `GenerateOutput`s (NaN without any)."""
    tokens = sum(o.num_tokens for o in outs)
    return sum(o.decode_flops for o in outs) / tokens if tokens else float("nan")


def format_flops(n: float) -> str:
    """`1234567` -> `'1.23 M'` (k, M, G, T)."""
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.3g}"
