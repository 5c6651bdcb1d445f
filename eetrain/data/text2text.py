"""Text-to-text data (summarisation, translation, QA as generation) for any backbone.

Rows come from a hub dataset (`hf_name`) or local JSON/JSONL/CSV/Parquet files (`files`). The
backbone supplies the tokenizer and the collate function, so this module knows no model family.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from eetrain.errors import ConfigError, DataError
from eetrain.hub import check_dataset_reachable

_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_rows(
    split: str,
    hf_name: str | None,
    hf_config: str | None,
    files: Mapping[str, str] | None,
    columns: tuple[str, str],
) -> list[dict[str, Any]]:
    """Load one split as a list of {source_column: str, target_column: str} rows."""
    import datasets

    if hf_name is not None:
        check_dataset_reachable(hf_name)
        ds = datasets.load_dataset(hf_name, hf_config, split=split)
        where = f"data.hf_name={hf_name!r} split {split!r}"
    else:
        if not files or split not in files or files[split] is None:
            raise ConfigError(
                f"data.files.{split} is not set; set data.hf_name or data.files.{split} to a "
                f"{'/'.join(sorted(_FORMATS))} file"
            )
        path = Path(str(files[split])).expanduser()
        if not path.exists():
            raise DataError(f"data.files.{split}={str(path)!r}: no such file")
        fmt = _FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise DataError(f"data.files.{split}={str(path)!r}: unknown format; allowed: {', '.join(sorted(_FORMATS))}")
        where = f"data.files.{split}={str(path)!r}"
        if path.stat().st_size == 0:
            raise DataError(f"{where} is empty")
        try:
            ds = datasets.load_dataset(fmt, data_files={split: str(path)}, split=split)
        except ValueError as e:
            # datasets reports a header-only file as "Instruction ... corresponds to no data"
            raise DataError(f"{where} is empty or unreadable as {fmt}: {e}") from e
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        keys = {columns[0]: "data.source_column", columns[1]: "data.target_column"}
        named = ", ".join(f"{keys[c]}={c!r}" for c in missing)
        raise DataError(f"{where} has no column {named}; its columns are {ds.column_names}")
    if len(ds) == 0:
        raise DataError(f"{where} is empty")
    return ds.select_columns(list(columns)).to_list()


def truncate(ids: list[int], max_length: int, eos_id: int | None) -> list[int]:
    """Cut to `max_length`, keeping a trailing eos so the model still learns to stop."""
    if len(ids) <= max_length:
        return ids
    out = ids[:max_length]
    if eos_id is not None and ids[-1] == eos_id:
        out[-1] = eos_id
    return out


class Text2TextDataModule(L.LightningDataModule):
    def __init__(
        self,
        tokenizer: Any,
        collate_fn: Callable[[list[dict[str, Any]]], Any],
        hf_name: str | None = None,
        hf_config: str | None = None,
        files: Mapping[str, str] | None = None,
        source_column: str = "source",
        target_column: str = "target",
        prefix: str = "",
        max_source_length: int = 512,
        max_target_length: int = 128,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        train_split: str = "train",
        val_split: str = "validation",
    ):
        super().__init__()
        if hf_name is None and not files:
            raise ConfigError("set data.hf_name (a hub dataset) or data.files (local train/validation files)")
        for key, v in (("data.max_source_length", max_source_length), ("data.max_target_length", max_target_length),
                       ("data.batch_size", batch_size)):
            if int(v) < 1:
                raise ConfigError(f"{key}={v} must be >= 1")
        self.tokenizer = tokenizer
        self.collate_fn = collate_fn
        self.source = dict(hf_name=hf_name, hf_config=hf_config, files=dict(files) if files else None)
        self.columns = (source_column, target_column)
        self.prefix = prefix
        self.max_lengths = (int(max_source_length), int(max_target_length))
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = num_workers
        self.splits = {"train": train_split, "validation": val_split}
        self.datasets: dict[str, list[dict[str, Any]]] = {}
        #: per split: {"examples", "source_truncated", "target_truncated"}
        self.truncation: dict[str, dict[str, int]] = {}

    def tokenize(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
        src_col, tgt_col = self.columns
        sources = [self.prefix + str(r[src_col]) for r in rows]
        targets = [str(r[tgt_col]) for r in rows]
        src_ids = self.tokenizer(sources, add_special_tokens=True)["input_ids"]
        tgt_ids = self.tokenizer(targets, add_special_tokens=True)["input_ids"]
        eos = self.tokenizer.eos_token_id
        max_src, max_tgt = self.max_lengths
        stats = {
            "examples": len(rows),
            "source_truncated": sum(len(s) > max_src for s in src_ids),
            "target_truncated": sum(len(t) > max_tgt for t in tgt_ids),
        }
        examples = [
            {"source_ids": truncate(s, max_src, eos), "target_ids": truncate(t, max_tgt, eos)}
            for s, t in zip(src_ids, tgt_ids, strict=True)
        ]
        return examples, stats

    def setup(self, stage: str | None = None) -> None:
        for name, split in self.splits.items():
            if name in self.datasets:
                continue
            rows = load_rows(split, columns=self.columns, **self.source)
            self.datasets[name], self.truncation[name] = self.tokenize(rows)
            t = self.truncation[name]
            print(
                f"[data] {name}: {t['examples']} examples; truncated sources {t['source_truncated']} "
                f"(> {self.max_lengths[0]} tokens), targets {t['target_truncated']} (> {self.max_lengths[1]} tokens)"
            )

    def split_examples(self, split: str) -> list[dict[str, Any]]:
        """The tokenised examples of one split by its name (`train`, `validation`, or another split such
        as `test`: `data.files.test` or the hub dataset's split), loaded on first use."""
        key = {v: k for k, v in self.splits.items()}.get(split, split)
        if key not in self.datasets:
            rows = load_rows(split, columns=self.columns, **self.source)
            self.datasets[key], self.truncation[key] = self.tokenize(rows)
        return self.datasets[key]

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.datasets[name],
            batch_size=self.batch_size if shuffle else self.eval_batch_size,
            shuffle=shuffle,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)
