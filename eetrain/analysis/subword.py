"""Oracle exit layer by a token's place inside its word (the natural-capability paper's sub-word view:
word-initial pieces of split words exit later than their continuations).

Conventions: SentencePiece marks a word-initial piece with a leading ``▁``, byte-level BPE with ``Ġ``,
WordPiece marks a continuation with a leading ``##``. Classes: ``whole_word`` (a word of one piece),
``word_initial`` (first piece of a split word), ``continuation`` (any later piece), ``punctuation`` (a
piece without letters or digits: punctuation, and whitespace such as a newline piece), ``special`` (eos,
pad, ...)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .plots import by_model, figure, save

PIECE_CLASSES: tuple[str, ...] = ("whole_word", "word_initial", "continuation", "punctuation", "special")


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


def _bpe_byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins -> bytes (GPT-2's `bytes_to_unicode`, inverted): ``Ġ`` is the
    space, ``Ċ`` the newline, ``ĉ`` the tab."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {chr(b): b for b in kept}, 0
    for b in range(256):
        if b not in kept:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BPE_BYTES = _bpe_byte_decoder()


def _surface(piece: str, convention: str) -> str:
    """The text a piece stands for, a word start as a leading space: ``▁cat`` / ``Ġcat`` -> " cat",
    ``Ċ`` / ``<0x0A>`` -> "\\n", ``##able`` -> "able", ``un`` (WordPiece) -> " un". Bytes of a multi-byte
    character split across pieces read as U+FFFD (a word character here)."""
    if convention == "wordpiece":
        return piece[2:] if piece.startswith("##") else " " + piece
    if convention == "bpe":
        if not all(c in _BPE_BYTES for c in piece):  # an added token: its own text
            return piece
        return bytes(_BPE_BYTES[c] for c in piece).decode("utf-8", errors="replace")
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
        byte = int(piece[3:5], 16)
        return chr(byte) if byte < 128 else "\ufffd"
    return piece.replace("▁", " ")


def _kind(piece: str, surface: str, special: set[str]) -> str:
    """special | blank (whitespace only) | punct (no letter or digit) | word (letters or digits, or
    bytes of a character split across pieces)."""
    if piece in special:
        return "special"
    text = surface.strip()
    if surface and not text:
        return "blank"
    if text and not any(c.isalnum() or c == "\ufffd" for c in text):
        return "punct"
    return "word"


def piece_classes(
    pieces: Sequence[str], sequence_ids: Sequence[int], convention: str, special: Iterable[str] = ()
) -> list[str]:
    """The class of each piece of token sequences laid end to end (``sequence_ids`` says where one ends).

    A piece starts a word when it opens its sequence, carries the word-start marker (SentencePiece
    ``▁``, byte-BPE ``Ġ``; in WordPiece any piece without ``##``), or follows whitespace (a newline
    piece), a special token, or punctuation that itself starts a word (``Ġ(`` + ``cat``); after
    punctuation inside a word (``don`` ``'`` ``t``) it continues. A word piece followed by a continuation
    is ``word_initial``; whitespace pieces count as ``punctuation``."""
    special = set(special)
    n = len(pieces)
    surfaces = [_surface(p, convention) for p in pieces]
    kinds = [_kind(p, t, special) for p, t in zip(pieces, surfaces, strict=True)]
    starts: list[bool] = []
    for i, t in enumerate(surfaces):
        opens = i == 0 or sequence_ids[i] != sequence_ids[i - 1]
        after = not opens and (kinds[i - 1] in ("special", "blank") or (kinds[i - 1] == "punct" and starts[i - 1]))
        starts.append(opens or (t[:1].isspace()) or after)
    out = []
    for i in range(n):
        if kinds[i] == "special":
            out.append("special")
        elif kinds[i] != "word":
            out.append("punctuation")
        elif not starts[i]:
            out.append("continuation")
        else:
            nxt = i + 1
            split = nxt < n and sequence_ids[nxt] == sequence_ids[i] and kinds[nxt] == "word" and not starts[nxt]
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
