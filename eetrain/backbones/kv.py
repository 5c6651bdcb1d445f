"""Slot-addressed key/value caches and the attention over them, for early-exit decoding.

A decoder that exits tokens at different layers must write a layer's keys/values for *some* positions
of *some* rows (a token that went deeper, positions whose skipped layers are filled in later, the
rows still running in a batch). Hugging Face's caches append per layer and assume every position
reaches every layer, so eetrain keeps its own: one preallocated `(B, H_kv, T_max, d_head)` tensor pair
per layer, addressed by *slot* (column). A query at slot `s` attends to the keys at slots `<= s` that
are valid (not left padding). Nothing here knows a model family: the adapters in `backbones/` compute
q/k/v with their own projections and call `write` / `attend`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

Slots = int | Tensor
"""Where queries sit: an int `s` (every row, `q` contiguous slots `s..s+q-1`) or a `(b, q)` long tensor."""


@dataclass
class DecodeContext:
    """Everything one generation call keeps across steps.

    k, v: per layer `(B, H_kv, T_max, d_head)`. key_valid: `(B, T_max)` bool, False for left padding.
    position_offset: `(B,)` long, subtracted from a slot to get the token's position (left padding).
    first_slot: the slot of the first generated step's input. start_ids: `(B,)` that input's ids, or
    None when the prompt's prefill already produced the first token's states (`prefill_states`, one
    `(B, d)` per layer, the raw state of the prompt's last position after each layer).
    extra: family-specific values (T5: encoder output, lazily projected cross-attention keys/values).
    """

    k: list[Tensor]
    v: list[Tensor]
    key_valid: Tensor
    position_offset: Tensor
    first_slot: int
    start_ids: Tensor | None = None
    prefill_states: list[Tensor] | None = None
    prefill_input: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.key_valid.shape[0]

    @property
    def max_slots(self) -> int:
        return self.key_valid.shape[1]

    def positions(self, slots: Slots, rows: Tensor | None, q: int) -> Tensor:
        """`(b, q)` token positions of queries at `slots` (slot minus the row's left padding)."""
        offset = self.position_offset if rows is None else self.position_offset.index_select(0, rows)
        if isinstance(slots, int):
            slots = torch.arange(slots, slots + q, device=offset.device)[None, :]
        return slots - offset[:, None]


def empty_cache(
    num_layers: int, batch: int, heads: int, slots: int, head_dim: int, like: Tensor
) -> tuple[list[Tensor], list[Tensor]]:
    """Per-layer key and value tensors `(batch, heads, slots, head_dim)` on `like`'s device/dtype.

    Uninitialised (zeroing them costs a pass over the whole cache): a real query only attends to
    slots whose keys/values were written; only the throwaway rows of `cached_attention`'s widened
    batch may read unwritten memory, and their outputs are dropped.
    """
    shape = (batch, heads, slots, head_dim)
    k = [like.new_empty(shape) for _ in range(num_layers)]
    v = [like.new_empty(shape) for _ in range(num_layers)]
    return k, v


def write(cache: Tensor, new: Tensor, rows: Tensor | None, slots: Slots, qmask: Tensor | None) -> None:
    """Store `new (b, H, q, d_head)` into `cache (B, H, T, d_head)` at the queries' slots.

    qmask `(b, q)` bool: only True queries are written (padding of ragged query sets).
    """
    if isinstance(slots, int) and qmask is None:
        q = new.shape[2]
        if rows is None:
            cache[:, :, slots : slots + q] = new
        else:
            cache.narrow(2, slots, q).index_copy_(0, rows, new)
        return
    b, _, q, _ = new.shape
    if isinstance(slots, int):
        slots = torch.arange(slots, slots + q, device=new.device).expand(b, q)
    row_idx = (torch.arange(b, device=new.device) if rows is None else rows)[:, None].expand(b, q)
    vals = new.transpose(1, 2)  # (b, q, H, d_head)
    if qmask is not None:
        row_idx, slots, vals = row_idx[qmask], slots[qmask], vals[qmask]
    cache[row_idx, :, slots] = vals


def write_kv(
    ctx: DecodeContext, index: int, key: Tensor, value: Tensor, rows: Tensor | None, slots: Slots,
    qmask: Tensor | None,
) -> None:
    """Store a layer's new keys and values `(b, H_kv, q, d_head)` (see `write`)."""
    write(ctx.k[index], key, rows, slots, qmask)
    write(ctx.v[index], value, rows, slots, qmask)


@dataclass
class Copied:
    """Positions whose keys/values a layer projects from given states without running on them (CALM's
    state copying): `states (n, d)` (the residual stream before the layer), `rows (n,)`, `slots (n,)`.
    The layer projects them in the same calls as its own tokens' keys/values, so each projection's
    weights are read once (decoding is bound by reading weights)."""

    states: Tensor
    rows: Tensor
    slots: Tensor


def with_copied(h: Tensor, copy: Copied | None) -> Tensor:
    """The queries' states `h (b, q, d)` and the copied positions' states `(n, d)` as one `(b*q + n, d)`
    tensor, so that a layer normalises them in one call and each projection reads its weights once (decoding
    is bound by reading weights); `h` itself without copied states."""
    if copy is None:
        return h
    return torch.cat([h.reshape(-1, h.shape[-1]), copy.states])


def project(proj: Callable[[Tensor], Tensor], joint: Tensor, b: int, q: int, heads: int) -> tuple[Tensor, Tensor | None]:
    """`proj` on `joint`: `(b, q, d)`, or `(b*q + n, d)` from :func:`with_copied`.

    Returns the queries' `(b, heads, q, d_head)` and the copied positions' `(n, heads, 1, d_head)` (None
    without copied states)."""
    out = proj(joint)
    if joint.dim() == 3:
        return out.view(b, q, heads, -1).transpose(1, 2), None
    d_head = out.shape[-1] // heads
    return out[: b * q].view(b, q, heads, d_head).transpose(1, 2), out[b * q :].view(-1, 1, heads, d_head).transpose(1, 2)


def write_copied(ctx: DecodeContext, index: int, key: Tensor, value: Tensor, copy: Copied) -> None:
    """Store the copied positions' keys and values `(n, H_kv, 1, d_head)` of a layer."""
    write_kv(ctx, index, key, value, copy.rows, copy.slots[:, None], None)


def attention_mask(key_valid: Tensor, rows: Tensor | None, slots: Slots, q: int, upto: int) -> Tensor:
    """`(b, 1, q, upto)` bool: key slot `<=` query slot and the key is valid."""
    valid = key_valid[:, :upto] if rows is None else key_valid[:, :upto].index_select(0, rows)
    if isinstance(slots, int):
        if q == 1:
            return valid[:, None, None, :]
        slots = torch.arange(slots, slots + q, device=valid.device)[None, :]
    keys = torch.arange(upto, device=valid.device)[None, None, :]
    causal = keys <= slots[:, :, None]  # (b or 1, q, upto)
    # A padding query attends to itself alone: a row of all-masked keys would give NaN, and NaN times
    # a zero attention weight is still NaN once that padding slot's values are read.
    return ((causal & valid[:, None, :]) | (keys == slots[:, :, None]))[:, None]


def last_slot(slots: Slots, q: int) -> int:
    """The largest query slot (a host int: it sizes the attended key range)."""
    if isinstance(slots, int):
        return slots + q - 1
    return int(slots.max())


def attend(
    query: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor,
    scale: float,
    bias: Tensor | None = None,
) -> Tensor:
    """Scaled dot-product attention of `query (b, H, q, d)` over `k, v (b, H_kv, S, d)`.

    mask: `(b, 1, q, S)` bool (True = attend). bias: additive `(b or 1, H, q, S)` (T5's relative
    positions). Grouped-query attention when `H_kv < H`. Returns `(b, q, H * d)`.
    """
    groups = query.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if bias is not None:
        attn_mask = bias.to(query.dtype).masked_fill(~mask, torch.finfo(query.dtype).min)
    else:
        attn_mask = mask
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=attn_mask, scale=scale)
    b, h, q, d = out.shape
    return out.transpose(1, 2).reshape(b, q, h * d)


def _widen(query: Tensor, rows: Tensor, batch: int) -> Tensor:
    """`query (b, H, q, d)` of `rows` placed among all `batch` rows (the others: zero queries)."""
    return query.new_zeros((batch, *query.shape[1:])).index_copy_(0, rows, query)


def _reads_all_rows(rows: Tensor | None, batch: int) -> bool:
    # Attending for every row reads each row's keys/values once; gathering `b` rows first copies them
    # (a read and a write) and then reads the copy: past a third of the batch the plain read is cheaper.
    return rows is not None and 3 * rows.shape[0] > batch


def cached_attention(
    ctx: DecodeContext,
    layer_index: int,
    query: Tensor,
    rows: Tensor | None,
    slots: Slots,
    scale: float,
    bias: Callable[[Slots, int], Tensor] | None = None,
) -> Tensor:
    """Self-attention of `query (b, H, q, d)` (at `slots` of `rows`) over the cache of a layer, whose
    keys/values for these queries are already written. `bias(slots, upto)` gives an additive bias
    `(b or 1, H, q, upto)` (T5). Returns `(b, q, H * d)`."""
    q = query.shape[2]
    if _reads_all_rows(rows, ctx.batch_size):
        if not isinstance(slots, int):
            full = torch.zeros((ctx.batch_size, q), dtype=slots.dtype, device=slots.device)
            full[rows] = slots
            slots = full
        out = cached_attention(ctx, layer_index, _widen(query, rows, ctx.batch_size), None, slots, scale, bias)
        return out.index_select(0, rows)
    upto = last_slot(slots, q) + 1
    k, v = ctx.k[layer_index], ctx.v[layer_index]
    keys, values = k[:, :, :upto], v[:, :, :upto]
    if rows is not None:
        keys, values = keys.index_select(0, rows), values.index_select(0, rows)
    mask = attention_mask(ctx.key_valid, rows, slots, q, upto)
    return attend(query, keys, values, mask, scale, None if bias is None else bias(slots, upto))


def cross_attention(query: Tensor, k: Tensor, v: Tensor, mask: Tensor, rows: Tensor | None, scale: float) -> Tensor:
    """Attention of `query (b, H, q, d)` of `rows` over every row's fixed `k, v (B, H, S, d)` (the
    encoder's), `mask (B, 1, 1, S)` bool. Returns `(b, q, H * d)`."""
    if rows is None:
        return attend(query, k, v, mask, scale)
    if _reads_all_rows(rows, k.shape[0]):
        return attend(_widen(query, rows, k.shape[0]), k, v, mask, scale).index_select(0, rows)
    return attend(query, *(x.index_select(0, rows) for x in (k, v, mask)), scale)
