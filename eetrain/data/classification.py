"""Sentence and sentence-pair classification / regression data (GLUE) for encoder backbones (BERT).

Rows come from a hub dataset (`hf_name`, e.g. nyu-mll/glue with the task as `hf_config`) or local
JSON/JSONL/CSV/Parquet files (`files`) with the same columns. Examples are
{"source_ids", "token_type_ids", "label"}; the backbone's collate batches them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from eetrain.data.text2text import SplitDataModule, check_headline_metric
from eetrain.errors import ConfigError, DataError, positive_int


class ClassificationDataModule(SplitDataModule):
    """text_columns: one column (a sentence) or two (a pair, encoded as a pair with token_type_ids).
    num_labels: the number of classes (labels 0..num_labels-1), or 1 for regression (float labels)."""

    head_kind = "sequence"

    def __init__(
        self,
        tokenizer: Any,
        collate_fn: Callable[[list[dict[str, Any]]], Any],
        hf_name: str | None = None,
        hf_config: str | None = None,
        files: Mapping[str, str] | None = None,
        text_columns: Sequence[str] = ("sentence",),
        label_column: str = "label",
        num_labels: int = 2,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        train_split: str = "train",
        val_split: str = "validation",
        test_split: str = "test",
        metric: str = "accuracy",
        metrics: Sequence[str] = ("accuracy",),
    ):
        columns = [text_columns] if isinstance(text_columns, str) else [str(c) for c in text_columns]
        if len(columns) not in (1, 2):
            raise ConfigError(f"data.text_columns={columns} must name one column (a sentence) or two (a pair)")
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ConfigError(f"data.num_labels={num_labels!r}; allowed: an integer >= 1 (1 = regression)")
        positive_int(max_length, "data.max_length")
        super().__init__(tokenizer, collate_fn, hf_name, hf_config, files, batch_size, eval_batch_size, num_workers,
                         {"train": train_split, "validation": val_split, "test": test_split})
        self.metric, self.metrics = check_headline_metric(metric, metrics, "label")
        classes = [m for m in self.metrics if m in ("accuracy", "f1", "matthews")]
        if num_labels == 1 and classes:
            raise ConfigError(f"data.metrics={list(self.metrics)}: {', '.join(classes)} score(s) class ids, and "
                              "data.num_labels=1 is regression (real scores); allowed there: pearson, spearman")
        if num_labels > 2 and "f1" in self.metrics:  # (GLUE's F1 is the binary F1 of class 1: MRPC, QQP)
            raise ConfigError(f"data.metrics={list(self.metrics)}: f1 is the binary F1 of class 1, and "
                              f"data.num_labels={num_labels}; allowed there: accuracy, matthews")
        self.text_columns = tuple(columns)
        self.label_column = label_column
        self.num_labels = int(num_labels)
        self.max_length = int(max_length)
        self.fields = {c: f"data.text_columns[{i}]={c!r}" for i, c in enumerate(columns)}
        if label_column in self.fields:
            raise ConfigError(f"data.label_column={label_column!r} is also one of data.text_columns={columns}")
        self.fields[label_column] = f"data.label_column={label_column!r}"
        self.column_keys = f"data.text_columns={columns} and data.label_column={label_column!r}"

    @property
    def text_fields(self) -> list[str]:
        return list(self.text_columns)

    def check_fits(self, backbone: Any) -> None:
        super().check_fits(backbone)
        outputs = getattr(backbone.model.config, "num_labels", self.num_labels)
        if outputs != self.num_labels:  # too few outputs index out of range; one reads class ids as scores
            raise ConfigError(
                f"model.config.num_labels={outputs} (the head's outputs) differs from data.num_labels={self.num_labels} "
                "(the data's classes; 1 = regression): set them alike (model/bert_*.yaml take data.num_labels unless "
                "model.config.num_labels is set; an export keeps the head it was trained with)"
            )
        limit = backbone.max_positions
        if limit is not None and self.max_length > limit:
            raise ConfigError(f"data.max_length={self.max_length} is longer than the {backbone.family} model's "
                              f"{limit} positions (model.config.max_position_embeddings); lower data.max_length")

    def label(self, value: Any, i: int) -> int | float:
        if self.num_labels == 1:
            try:
                score = float(value)
            except (TypeError, ValueError):
                score = math.nan
            if not math.isfinite(score):  # (json.dumps writes NaN; a NaN score would surface as a NaN loss)
                raise DataError(f"row {i}: data.label_column={self.label_column!r} is {value!r}, not a finite "
                                "number (data.num_labels=1 is regression)") from None
            return score
        try:
            label = int(value)
            ok = label == value and 0 <= label < self.num_labels
        except (TypeError, ValueError):
            ok = False
        if not ok:
            unlabelled = value == -1 and getattr(self, "loading", None) == "test"
            hint = " (GLUE's test splits are unlabelled: set data.test_split=validation)" if unlabelled else ""
            raise DataError(f"row {i}: data.label_column={self.label_column!r} is {value!r}; allowed: integers "
                            f"0..{self.num_labels - 1} (data.num_labels={self.num_labels}){hint}")
        return label

    def tokenize(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
        labels = [self.label(r[self.label_column], i) for i, r in enumerate(rows)]
        texts = [[str(r[c]) for r in rows] for c in self.text_columns]
        enc = self.tokenizer(*texts, return_token_type_ids=True)
        ids, types = enc["input_ids"], enc["token_type_ids"]
        long = [i for i, s in enumerate(ids) if len(s) > self.max_length]
        if long:
            # only overlong rows are encoded again, truncated the tokenizer's way (longest text first for a
            # pair, special tokens kept), so the truncation count stays cheap to get
            cut = self.tokenizer(*[[t[i] for i in long] for t in texts], truncation=True,
                                 max_length=self.max_length, return_token_type_ids=True)
            for j, i in enumerate(long):
                ids[i], types[i] = cut["input_ids"][j], cut["token_type_ids"][j]
        examples = [
            {"source_ids": s, "token_type_ids": t, "label": y} for s, t, y in zip(ids, types, labels, strict=True)
        ]
        return examples, {"examples": len(rows), "truncated": len(long)}

    def describe(self, stats: dict[str, int]) -> str:
        return f"{stats['examples']} examples; truncated {stats['truncated']} (> {self.max_length} tokens)"


class DemoStoryClassification(ClassificationDataModule):
    """The shipped demo paragraphs as a classification task, offline and without a file of its own: the
    label of an example is read off its summary (`label_column`, the demo's `target`) by
    `eetrain.data.make_demo.story_label`: the story type, the event stories split by their outcome
    (`STORY_LABELS`, 8 classes)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        from eetrain.data.make_demo import STORY_LABELS

        if self.num_labels != len(STORY_LABELS):
            raise ConfigError(
                f"data.num_labels={self.num_labels}: the demo stories have {len(STORY_LABELS)} classes "
                f"({', '.join(STORY_LABELS)})"
            )

    def label(self, value: Any, i: int) -> int:
        from eetrain.data.make_demo import STORY_LABELS, story_label

        try:
            return STORY_LABELS.index(story_label(str(value)))
        except ValueError as e:
            raise DataError(f"row {i}: data.label_column={self.label_column!r}: {e}") from None
