"""The floating-point operations a decode really runs: FLOPs saved, beside the time saved.

Counted, not modelled: torch's FLOP formulas (those of `FlopCounterMode`) applied to every matrix product
and attention call that runs, so the count includes what an analytic "layers x tokens" estimate leaves
out -- the exit checks' head products, the keys/values `copy` projects for skipped layers, `parallel`'s
deep passes over waiting positions, rows that ride along past their exit, padding rows, drafts that were
rejected. A multiply-add counts 2. Element-wise operations (norms, activations, softmax) are not counted,
as in the papers' counts. Counting slows the decode down (a Python hook per operation, ~4x on a tiny
model): time a decode, or count it, not both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_flop_count, shape_wrapper


def _cpu_attention_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


#: torch's FLOP formulas by operator (`torch.utils.flop_counter`: products, convolutions, CUDA's attention
#: kernels), and CPU's fused attention kernel, which they leave out
FORMULAS = {
    **flop_registry,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: shape_wrapper(_cpu_attention_flops),
}


class FlopCount(TorchDispatchMode):
    """Context manager counting the FLOPs of what runs inside it, operator by operator (`FORMULAS`).

    torch's `FlopCounterMode` applies the same formulas but also tracks modules for its per-module
    table: about twice the slowdown (8x against ~4.5x a plain decode of a tiny T5), for nothing a total
    needs. `total`: FLOPs so far; `mark()` remembers the count at a point (e.g. after the prefill) as
    `marked`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.marked: int | None = None

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        formula = FORMULAS.get(func._overloadpacket)
        if formula is None:
            # a composite op reaches the mode whole under inference_mode (aten.matmul): count its parts
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out

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
