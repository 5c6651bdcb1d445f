"""Record a frozen backbone's per-layer states once, to evaluate any number of exit policies offline.

:func:`record_exits` runs an :class:`~eetrain.backbones.base.ExitBackbone` over a data loader (eval
mode, no grad) and returns :class:`~eetrain.exits.measures.ExitRecords` for the *scored* tokens
(label != -100), ``N`` tokens and ``L`` exit layers:

==================  ================  ====================================================================
field               shape / dtype     what
==================  ================  ====================================================================
``hidden``          (L, N, d)         h_1..h_L in the space ``features`` (``store_hidden``; dtype
                                      ``hidden_dtype``); classifiers read it
``h0``              (N, d)            the input of layer 1 (saturation at layer 1), with ``hidden``, same space
``predictions``     (L, N) long       argmax of every exit
``top2``            (L, N, 2) f32     the two largest probabilities of every exit
``entropies``       (L, N) f32        H(p_i) in nats
``saturation``      (L, N) f32        cos(h_i, h_{i-1}) in float32 and in the space ``features`` (so
                                      saturation works without ``hidden``)
``vocab_size``      int               V (for the normalised entropy)
``labels``          (N,) long         gold tokens (a regression head's: float scores)
``positions``       (N,) long         1-based decoding position t of the token among its sequence's
                                      scored tokens (the t of CALM's decaying threshold)
``sequence_ids``    (N,) long         running index of the example in the loader (sequence-level risks)
``logits``          (L, N, V)         only with ``keep_logits=True`` (small vocabularies, analyses); always
                                      for a regression head (V = 1), which has no summaries
==================  ================  ====================================================================

Why summaries and not logits: full logits cost ``L * N * V`` floats -- 24 layers x 100k tokens x 32k
vocabulary is 300 GiB -- while every registered measure needs only the argmax, the top-2
probabilities and the entropy (4 numbers per layer and token, computed exactly as from the logits).
The logits of one layer are materialised for at most ``chunk_size`` tokens at a time.  The hidden
states (``L * N * d``) are the remaining big item: keep them only when exit classifiers are to be
trained or evaluated, in half precision if need be, or cap ``max_tokens``.

``features`` (``exit.features``): ``raw`` keeps the residual streams h_i (CALM), ``normed`` the
family's final norm of them, ``backbone.final_norm(h_i)`` (FREE, MEE), for ``hidden``, ``h0`` and
``saturation``; the exit logits (and so every softmax measure) are the same either way. The decoder
applies the same space (:class:`eetrain.decoding.decisions.LayerDecider`), so decoded exits equal the
offline ones.

Sequence-classification backbones (``head_kind == "sequence"``, BERT) give one "token" per example:
the first-token state ``h[:, 0]`` that the pooler reads, position 1.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from eetrain.files import atomic_file

from .classifiers import check_features, feature_states
from .measures import ExitRecords, cosine, summarize_logits

__all__ = [
    "record_exits", "save_records", "load_records", "records_nbytes", "RECORD_FIELDS", "token_view", "InputCapture",
]

_FORMAT = "eetrain.exit_records"
_VERSION = 1

#: tensor fields of ExitRecords that are saved (``vocab_size`` is saved as an int).
RECORD_FIELDS: tuple[str, ...] = (
    "hidden",
    "logits",
    "probs",
    "labels",
    "h0",
    "predictions",
    "top2",
    "entropies",
    "saturation",
    "positions",
    "sequence_ids",
)


class InputCapture:
    """Forward pre-hook on block 1 that keeps its input hidden states (``h0``, e.g. the embeddings)."""

    def __init__(self, block: torch.nn.Module) -> None:
        self.value: Tensor | None = None
        self._handle = block.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.value = args[0] if args else kwargs.get("hidden_states")

    def __enter__(self) -> InputCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


def token_view(
    backbone: Any, hidden: list[Tensor], h0: Tensor | None, labels: Tensor
) -> tuple[list[Tensor], Tensor | None, Tensor, Tensor, Tensor]:
    """Select the scored tokens of one batch.

    Returns per-layer states ``(M, d)``, ``h0 (M, d)`` or ``None``, labels ``(M,)``, positions ``(M,)``
    and the row (example within the batch) of each token ``(M,)``.
    """
    if backbone.head_kind == "sequence":
        # one decision per example, on the state the pooler reads
        rows = torch.arange(labels.shape[0], device=labels.device)
        keep = labels != -100
        states = [h[:, 0][keep] for h in hidden]
        first = None if h0 is None else h0[:, 0][keep]
        return states, first, labels[keep], torch.ones_like(rows[keep]), rows[keep]
    keep = labels != -100  # (B, T)
    positions = keep.long().cumsum(dim=1)[keep]  # t = rank among the sequence's scored tokens
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)[keep]
    states = [h[keep] for h in hidden]
    first = None if h0 is None or h0.shape[:2] != labels.shape else h0[keep]
    return states, first, labels[keep], positions, rows


@torch.no_grad()
def record_exits(
    backbone: Any,
    loader: Iterable[dict[str, Tensor]],
    *,
    store_hidden: bool = True,
    hidden_dtype: torch.dtype | str | None = None,
    keep_logits: bool = False,
    max_tokens: int | None = None,
    chunk_size: int = 4096,
    features: str = "raw",
) -> ExitRecords:
    """Run a frozen backbone once over ``loader`` and collect the per-layer records of scored tokens.

    Args:
        backbone: an ``ExitBackbone``; put in eval mode for the pass (its mode is restored after).
        loader: batches as the backbone's ``collate`` makes them (labels ``-100`` = not scored).
        store_hidden: keep ``hidden (L, N, d)`` and ``h0 (N, d)`` (needed by exit classifiers).
        hidden_dtype: dtype of the kept hidden states (``"float16"``/``"bfloat16"`` halve memory);
            default: the backbone's.
        keep_logits: also keep the full ``(L, N, V)`` logits (small vocabularies only).
        max_tokens: stop after this many scored tokens (``None``: the whole loader).
        chunk_size: tokens per head application (bounds the ``(chunk, V)`` logits in memory).
        features: ``raw`` or ``normed``: the space of ``hidden``, ``h0`` and ``saturation`` (module
            docstring).

    Returns:
        :class:`ExitRecords` on the CPU (see the module docstring for the fields).
    """
    if max_tokens is not None and int(max_tokens) < 1:
        raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens!r}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    check_features(features, "features")
    if isinstance(hidden_dtype, str):
        dtype = getattr(torch, hidden_dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"hidden_dtype must be a floating dtype name, got {hidden_dtype!r}")
        hidden_dtype = dtype
    num_layers = backbone.num_layers
    device = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    parts: dict[str, list[Tensor]] = {k: [] for k in RECORD_FIELDS}
    vocab_size: int | None = None
    # one output: a regression head's score (BERT on STS-B) has no distribution to summarise; its
    # (L, N, 1) logits are kept instead (the rules for it read the score itself)
    regression = int(backbone.head_weight.shape[0]) == 1
    keep_logits = keep_logits or regression
    total = 0
    example_offset = 0
    try:
        for batch in loader:
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            with InputCapture(backbone.blocks[0]) as inp:
                states = backbone(batch)
            if tuple(states.layers) != tuple(range(1, num_layers + 1)):
                raise ValueError(f"recording needs every exit layer 1..{num_layers}, got {states.layers}")
            if states.labels is None:
                raise ValueError("recording needs labels in the batches (the scored tokens)")
            batch_size = states.labels.shape[0]
            hs, h0, labels, positions, rows = token_view(backbone, states.hidden, inp.value, states.labels)
            m = labels.shape[0]
            if max_tokens is not None:
                m = min(m, int(max_tokens) - total)
                hs, labels, positions, rows = [h[:m] for h in hs], labels[:m], positions[:m], rows[:m]
                h0 = None if h0 is None else h0[:m]
            preds, top2, ents, sats, logits = [], [], [], [], []
            # the states classifiers and saturation read (the exit logits always start from h itself)
            fs = [feature_states(backbone, h, features) for h in hs]
            h0 = None if h0 is None else feature_states(backbone, h0, features)
            previous = h0
            for layer, h, f in zip(states.layers, hs, fs, strict=True):
                p_parts, t_parts, e_parts, z_parts = [], [], [], []
                for start in range(0, m, chunk_size):
                    chunk = h[start : start + chunk_size]
                    if backbone.head_kind == "sequence":
                        # the head pools (B, T, d) itself: give it the first token as a length-1 sequence
                        z = backbone.exit_logits(chunk[:, None, :], layer)
                    else:
                        z = backbone.exit_logits(chunk, layer)
                    z = z.float()
                    if not regression:
                        p, t2, e = summarize_logits(z)
                        p_parts.append(p.cpu())
                        t_parts.append(t2.cpu())
                        e_parts.append(e.cpu())
                    if keep_logits:
                        z_parts.append(z.cpu())
                vocab_size = int(backbone.head_weight.shape[0])
                if not regression:
                    preds.append(torch.cat(p_parts) if p_parts else torch.empty(0, dtype=torch.long))
                    top2.append(torch.cat(t_parts) if t_parts else torch.empty(0, 2))
                    ents.append(torch.cat(e_parts) if e_parts else torch.empty(0))
                if keep_logits:
                    logits.append(torch.cat(z_parts) if z_parts else torch.empty(0, vocab_size))
                if previous is None:
                    sats.append(torch.full((m,), float("-inf")))
                else:
                    sats.append(cosine(f.float(), previous.float()).cpu())
                previous = f
            if not regression:
                parts["predictions"].append(torch.stack(preds))
                parts["top2"].append(torch.stack(top2))
                parts["entropies"].append(torch.stack(ents))
            parts["saturation"].append(torch.stack(sats))
            if keep_logits:
                parts["logits"].append(torch.stack(logits))
            if store_hidden:
                parts["hidden"].append(torch.stack([f.to(hidden_dtype or f.dtype).cpu() for f in fs]))
                if h0 is not None:
                    parts["h0"].append(h0.to(hidden_dtype or h0.dtype).cpu())
            parts["labels"].append((labels.float() if regression else labels.long()).cpu())
            parts["positions"].append(positions.long().cpu())
            parts["sequence_ids"].append((rows + example_offset).long().cpu())
            example_offset += batch_size
            total += m
            if max_tokens is not None and total >= int(max_tokens):
                break
    finally:
        backbone.train(was_training)
    if total == 0:
        raise ValueError("the loader gave no scored tokens (every label is -100)")
    fields: dict[str, Any] = {}
    for key, values in parts.items():
        if not values:
            continue
        dim = 1 if key in ("hidden", "logits", "predictions", "top2", "entropies", "saturation") else 0
        fields[key] = torch.cat(values, dim=dim)
    if "h0" in fields and fields["h0"].shape[0] != total:
        del fields["h0"]  # a backbone whose block 1 input could not be captured for every batch
    return ExitRecords(vocab_size=vocab_size, **fields)


def records_nbytes(records: ExitRecords) -> int:
    """Bytes held by the tensors of ``records``."""
    return sum(
        t.numel() * t.element_size()
        for t in (getattr(records, k) for k in RECORD_FIELDS)
        if isinstance(t, Tensor)
    )


def save_records(
    records: ExitRecords, path: str | os.PathLike[str], meta: dict[str, Any] | None = None
) -> Path:
    """Save records (and a small ``meta`` dict of plain values) to one file, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": _FORMAT,
        "version": _VERSION,
        "vocab_size": records.vocab_size,
        "meta": dict(meta or {}),
        "tensors": {
            k: getattr(records, k).detach().cpu()
            for k in RECORD_FIELDS
            if isinstance(getattr(records, k), Tensor)
        },
    }
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_records(path: str | os.PathLike[str], with_meta: bool = False) -> Any:
    """Load records written by :func:`save_records` (``weights_only``).

    Returns:
        ``ExitRecords``, or ``(ExitRecords, meta)`` with ``with_meta=True``.
    """
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(f"{path} is not an eetrain exit-records file")
    if payload.get("version") != _VERSION:
        raise ValueError(f"{path}: unsupported exit-records version {payload.get('version')!r}")
    unknown = sorted(set(payload["tensors"]) - set(RECORD_FIELDS))
    if unknown:
        raise ValueError(f"{path}: unknown record fields {unknown}")
    records = ExitRecords(vocab_size=payload["vocab_size"], **payload["tensors"])
    return (records, dict(payload["meta"])) if with_meta else records
