"""Oracle exit layer by a token's place inside its word (the natural-capability paper's sub-word view:
word-initial pieces of split words exit later than their continuations).

Conventions: SentencePiece marks a word-initial piece with a leading ``▁``, byte-level BPE with ``Ġ``,
WordPiece marks a continuation with a leading ``##``. Classes: ``whole_word`` (a word of one piece),
``word_initial`` (first piece of a split word), ``continuation`` (any later piece), ``punctuation`` (a
piece of punctuation only), ``special`` (eos, pad, ...)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .plots import by_model, figure, save

PIECE_CLASSES: tuple[str, ...] = ("whole_word", "word_initial", "continuation", "punctuation", "special")
_MARKERS = {"sentencepiece": "▁", "bpe": "Ġ"}


def piece_convention(vocab: Iterable[str]) -> str:
    """``sentencepiece``, ``bpe`` or ``wordpiece``: the marker most pieces of ``vocab`` carry."""
    counts = {"sentencepiece": 0, "bpe": 0, "wordpiece": 0}
    for piece in vocab:
        if piece.startswith("▁"):
            counts["sentencepiece"] += 1
        elif piece.startswith("Ġ"):
            counts["bpe"] += 1
        elif piece.startswith("##"):
            counts["wordpiece"] += 1
    return max(counts, key=counts.get)  # type: ignore[arg-type]


def _starts_word(piece: str, convention: str) -> bool:
    if convention == "wordpiece":
        return not piece.startswith("##")
    return piece.startswith(_MARKERS[convention])


def _text(piece: str, convention: str) -> str:
    if convention == "wordpiece":
        return piece[2:] if piece.startswith("##") else piece
    return piece.lstrip(_MARKERS[convention])


def piece_classes(
    pieces: Sequence[str], sequence_ids: Sequence[int], convention: str, special: Iterable[str] = ()
) -> list[str]:
    """The class of each piece of token sequences laid end to end (``sequence_ids`` says where one ends;
    a sequence's first piece starts a word)."""
    special = set(special)
    n = len(pieces)
    starts = [
        i == 0 or sequence_ids[i] != sequence_ids[i - 1] or _starts_word(p, convention) for i, p in enumerate(pieces)
    ]
    out = []
    for i, p in enumerate(pieces):
        text = _text(p, convention)
        if p in special:
            out.append("special")
        elif text and not any(c.isalnum() for c in text):
            out.append("punctuation")
        elif not starts[i]:
            out.append("continuation")
        else:
            nxt = i + 1
            split = (nxt < n and sequence_ids[nxt] == sequence_ids[i] and not starts[nxt]
                     and pieces[nxt] not in special and any(c.isalnum() for c in _text(pieces[nxt], convention)))
            out.append("word_initial" if split else "whole_word")
    return out


def subword_rows(
    classes: Sequence[str], oracle: Tensor, num_layers: int
) -> list[dict[str, Any]]:
    """One row per class present: ``tokens``, ``share``, ``mean_oracle_layer`` (and std), ``can_exit``
    (share with an oracle layer below the last)."""
    cls = list(classes)
    rows = []
    for name in PIECE_CLASSES:
        idx = torch.tensor([i for i, c in enumerate(cls) if c == name], dtype=torch.long)
        if idx.numel() == 0:
            continue
        v = oracle[idx].double()
        rows.append({"piece": name, "tokens": int(idx.numel()), "share": idx.numel() / len(cls),
                     "mean_oracle_layer": float(v.mean()), "mean_oracle_layer_std": float(v.std(unbiased=False)),
                     "can_exit": float((v < num_layers).double().mean())})
    return rows


def tokenizer_classes(tokenizer: Any, ids: Sequence[int], sequence_ids: Sequence[int]) -> list[str]:
    """:func:`piece_classes` of token ids under a Hugging Face tokenizer (convention read from its vocabulary)."""
    convention = piece_convention(tokenizer.get_vocab())
    pieces = tokenizer.convert_ids_to_tokens(list(ids))
    return piece_classes(pieces, list(sequence_ids), convention, tokenizer.all_special_tokens)


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    fig, (a,) = figure(1, "Oracle exit layer by place in the word", width=6)
    groups = by_model(rows)
    names = [c for c in PIECE_CLASSES if any(r["piece"] == c for r in rows)]
    width = 0.8 / max(len(groups), 1)
    for j, (model, rs) in enumerate(groups.items()):
        got = {r["piece"]: r for r in rs}
        xs = [i + (j - (len(groups) - 1) / 2) * width for i, c in enumerate(names) if c in got]
        a.bar(xs, [got[c]["mean_oracle_layer"] for c in names if c in got],
              yerr=[got[c]["mean_oracle_layer_std"] for c in names if c in got], width=width, capsize=2,
              label=model or None)
    a.set_xticks(range(len(names)), [f"{c}" for c in names], fontsize=8)
    a.set(ylabel="mean oracle exit layer")
    return save(fig, path)
