"""Plain text for decoder-only models (LLaMA): documents packed into equal blocks, every token scored.

Rows come from a hub dataset (`hf_name`) or local JSON/JSONL/CSV/Parquet files with a `text_column`
(or a `text_template` over several columns), or TXT files (one document per blank-line-separated
paragraph, column `text`). Every document is tokenised as the tokenizer does it (LLaMA: bos first),
ends with eos (appended unless the tokenizer already put one there), and the documents of a split are
concatenated and cut into blocks of `block_size` tokens; the tokens after the last full block are
dropped (the `[data]` summary says how many). Attention crosses document boundaries inside a block
(standard packing): the eos between two documents is what says that one ended.

Blocks go through the backbone's collate as `{"source_ids": [], "target_ids": block}`: every token is
a label, and the LLaMA adapter's shift scores position t on token t + 1 (so a block's first token is
context only), with no padding since all blocks have the same length.

Generation (`split_examples`: the `generate` and `curve` stages, the task-metric callback, online
calibration) continues documents: the prompt is the first `prompt_length` tokens of each document that
has more, the reference the rest of that document, at most `max_target_length` tokens (its eos
included when it fits), so a model that learned where documents end stops there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from eetrain.data.text2text import TEXT_FORMATS, SplitDataModule, check_headline_metric, template_fields
from eetrain.errors import ConfigError, DataError
from eetrain.hub import check_dataset_reachable

#: documents tokenised per tokenizer call: bounds the Python lists held at once on large corpora
_CHUNK = 1000


def pack(documents: Sequence[Sequence[int]], eos_id: int) -> tuple[Tensor, Tensor]:
    """Concatenate tokenised documents, each ending with `eos_id` (appended where missing).

    Returns `stream` (N,) int32, all tokens in order, and `starts` (D + 1,) int64, the offset of each
    document in `stream` followed by N.
    """
    lengths, parts = [], []
    for ids in documents:
        ids = list(ids) if ids and ids[-1] == eos_id else [*ids, eos_id]
        lengths.append(len(ids))
        parts.append(torch.tensor(ids, dtype=torch.int32))
    stream = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32)
    starts = torch.zeros(len(lengths) + 1, dtype=torch.long)
    starts[1:] = torch.tensor(lengths, dtype=torch.long).cumsum(0)
    return stream, starts


class PackedBlocks(Dataset):
    """The blocks of one split. stream (N,): the split's tokens, documents concatenated with eos;
    starts (D + 1,): each document's offset in `stream`, then N. Item i is
    `{"source_ids": [], "target_ids": stream[i * block_size : (i + 1) * block_size]}`; the last
    `N % block_size` tokens are in no block."""

    def __init__(self, stream: Tensor, starts: Tensor, block_size: int):
        self.stream, self.starts, self.block_size = stream, starts, int(block_size)

    def __len__(self) -> int:
        return self.stream.numel() // self.block_size

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if not 0 <= i < len(self):
            raise IndexError(f"block {i} of {len(self)}")
        b = self.block_size
        return {"source_ids": [], "target_ids": self.stream[i * b : (i + 1) * b].tolist()}

    @property
    def dropped(self) -> int:
        """Tokens after the last full block."""
        return self.stream.numel() % self.block_size

    def documents(self) -> Iterator[Tensor]:
        """Each document's tokens (n,), its eos last."""
        bounds = self.starts.tolist()
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            yield self.stream[a:b]


def continuations(blocks: PackedBlocks, prompt_length: int, max_target_length: int) -> list[dict[str, Any]]:
    """Generation examples of a split: for every document with more than `prompt_length` tokens before
    its eos, `source_ids` = its first `prompt_length` tokens, `target_ids` = the next ones, at most
    `max_target_length` (the eos included when the document ends within them)."""
    out = []
    for doc in blocks.documents():
        if doc.numel() - 1 <= prompt_length:  # nothing but the eos would be left to continue
            continue
        out.append({
            "source_ids": doc[:prompt_length].tolist(),
            "target_ids": doc[prompt_length : prompt_length + max_target_length].tolist(),
        })
    return out


class PackedTextDataModule(SplitDataModule):
    """Plain text, packed (see the module docstring). metric / metrics: text metrics of the
    continuations against the documents' own (e.g. rougeL); None (the default) means no task metric:
    the per-layer report and the generate stage's speed and consistency still apply."""

    formats = TEXT_FORMATS
    has_source = False  # a decoder-only model's prompt is the text itself

    def __init__(
        self,
        tokenizer: Any,
        collate_fn: Callable[[list[dict[str, Any]]], Any],
        hf_name: str | None = None,
        hf_config: str | None = None,
        files: Mapping[str, str] | None = None,
        text_column: str = "text",
        text_template: str | None = None,
        block_size: int = 1024,
        prompt_length: int = 32,
        max_target_length: int = 64,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        train_split: str = "train",
        val_split: str = "validation",
        test_split: str = "test",
        metric: str | None = None,
        metrics: Sequence[str] = (),
    ):
        for key, value, low in (("data.block_size", block_size, 2), ("data.prompt_length", prompt_length, 1),
                                ("data.max_target_length", max_target_length, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{key}={value!r}; allowed: an integer >= {low}")
        super().__init__(tokenizer, collate_fn, hf_name, hf_config, files, batch_size, eval_batch_size, num_workers,
                         {"train": train_split, "validation": val_split, "test": test_split})
        if tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has no eos token; packed text needs one to end each document")
        if metric is None:
            if metrics:
                raise ConfigError(f"data.metrics={list(metrics)} needs data.metric (the headline one, e.g. rougeL)")
            self.metric, self.metrics = None, ()
        else:
            self.metric, self.metrics = check_headline_metric(metric, metrics or [metric], "text")
        self.template = text_template
        if text_template is not None:
            columns = template_fields(text_template, key="data.text_template")
            self.fields = {c: f"{c!r} (named in data.text_template)" for c in columns}
            self.column_keys = f"data.text_template={text_template!r}"
        else:
            self.fields = {text_column: f"data.text_column={text_column!r}"}
            self.column_keys = f"data.text_column={text_column!r}"
        self.text_column = text_column
        self.block_size, self.prompt_length, self.max_target_length = block_size, prompt_length, max_target_length
        self._prompts: dict[str, list[dict[str, Any]]] = {}
        if hf_name is not None:
            # offline, stop now (before the model is moved or the trainer is built), not at setup
            check_dataset_reachable(hf_name, columns=self.column_keys)

    def check_fits(self, backbone: Any) -> None:
        super().check_fits(backbone)
        trained = getattr(backbone.model.config, "max_position_embeddings", None)
        longest = max(self.block_size, self.prompt_length + self.max_target_length)
        if isinstance(trained, int) and longest > trained:
            # rotary positions run past it (no index error), but the model never saw them: a note, not an error
            print(f"[data] note: data.block_size={self.block_size} / data.prompt_length + data.max_target_length="
                  f"{self.prompt_length + self.max_target_length} reach position {longest}, past the model's "
                  f"{trained} positions (model.config.max_position_embeddings); rotary embeddings extrapolate "
                  "there: lower data.block_size, or extend the model's positions (rope_scaling)")

    def texts(self, rows: list[dict[str, Any]]) -> list[str]:
        """Each row's document, stripped (whitespace at a document's ends carries nothing)."""
        if self.template is None:
            return [str(r[self.text_column]).strip() for r in rows]
        out = []
        for i, r in enumerate(rows):
            try:
                out.append(self.template.format_map(r).strip())
            except (KeyError, IndexError, TypeError, AttributeError) as e:
                raise DataError(f"row {i}: data.text_template={self.template!r} cannot be filled: {e!r}") from None
        return out

    def tokenize(self, rows: list[dict[str, Any]]) -> tuple[PackedBlocks, dict[str, int]]:
        texts = [t for t in self.texts(rows) if t]
        if not texts:
            raise DataError(f"every document is empty ({self.column_keys})")
        eos = self.tokenizer.eos_token_id
        parts, starts, offset = [], [torch.zeros(1, dtype=torch.long)], 0
        for i in range(0, len(texts), _CHUNK):
            ids = self.tokenizer(texts[i : i + _CHUNK], add_special_tokens=True)["input_ids"]
            stream, doc_starts = pack(ids, eos)
            parts.append(stream)
            starts.append(doc_starts[1:] + offset)
            offset += stream.numel()
        blocks = PackedBlocks(torch.cat(parts), torch.cat(starts), self.block_size)
        stats = {"documents": len(texts), "empty": len(rows) - len(texts), "tokens": offset,
                 "blocks": len(blocks), "dropped": blocks.dropped}
        if not len(blocks):
            raise DataError(
                f"{offset} tokens in {len(texts)} documents make no block of data.block_size={self.block_size} "
                "tokens; lower data.block_size or add text"
            )
        return blocks, stats

    def describe(self, stats: dict[str, int]) -> str:
        empty = f" ({stats['empty']} empty skipped)" if stats["empty"] else ""
        return (
            f"{stats['documents']} documents{empty}, {stats['tokens']} tokens with an eos after each -> "
            f"{stats['blocks']} blocks of {self.block_size} tokens; the last {stats['dropped']} tokens "
            "(less than a block) dropped"
        )

    def split_examples(self, split: str, key: str | None = None) -> list[dict[str, Any]]:
        """Continuation prompts of a split (see `continuations`), not its training blocks."""
        if split not in self._prompts:
            blocks = super().split_examples(split, key)
            examples = continuations(blocks, self.prompt_length, self.max_target_length)
            if not examples:
                raise DataError(
                    f"split {split!r}: no document is longer than data.prompt_length={self.prompt_length} tokens "
                    "(plus its eos), so there is nothing to continue; lower data.prompt_length"
                )
            skipped = len(blocks.starts) - 1 - len(examples)
            print(f"[data] {split}: {len(examples)} continuation prompts (the first {self.prompt_length} tokens "
                  f"of each document; {skipped} documents not longer than that skipped)")
            self._prompts[split] = examples
        return self._prompts[split]
