"""BERT (encoder-only): exits on the encoder layers, shared pooler + classification head."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from torch import Tensor, nn
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerBase

from eetrain.backbones.base import ExitBackbone, ExitStates, pad


class BertBackbone(ExitBackbone):
    family = "bert"
    model_class = BertForSequenceClassification
    config_class = BertConfig
    head_kind = "sequence"

    @classmethod
    def config_defaults(cls, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        return {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.bert.encoder.layer

    def forward(
        self, batch: dict[str, Tensor], layers: Sequence[int] | None = None, skip: Collection[int] = frozenset()
    ) -> ExitStates:
        """batch: input_ids, attention_mask (B, T), optional labels (B,). States are (B, T, d).

        Skipped layers need no care: the extended attention mask is built once and passed to every layer.
        """
        with self.capture(layers) as cap, self.skipping(skip):
            self.model.bert(**self.model_inputs(batch))
        order = sorted(cap.states)
        return ExitStates(tuple(order), [cap.states[i] for i in order], batch.get("labels"))

    def exit_features(self, h: Tensor) -> Tensor:
        """(B, T, d) layer state -> (B, d) pooled first-token feature (BERT is post-norm: no extra norm)."""
        return self.model.dropout(self.model.bert.pooler(h))

    def final_norm(self, h: Tensor) -> Tensor:
        """BERT is post-norm: every layer's output already went through its own LayerNorm."""
        return h

    @property
    def head_weight(self) -> Tensor:
        return self.model.classifier.weight

    @property
    def head_bias(self) -> Tensor | None:
        return self.model.classifier.bias

    def model_inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
        import torch

        batch = {
            "input_ids": pad([e["source_ids"] for e in examples], self.tokenizer.pad_token_id or 0),
            "attention_mask": pad([[1] * len(e["source_ids"]) for e in examples], 0),
        }
        if "token_type_ids" in examples[0]:  # sentence pairs: segment 0 / 1
            batch["token_type_ids"] = pad([e["token_type_ids"] for e in examples], 0)
        if "label" in examples[0]:
            if self.regression:
                batch["labels"] = torch.tensor([float(e["label"]) for e in examples], dtype=torch.float)
            else:
                batch["labels"] = torch.tensor([int(e["label"]) for e in examples], dtype=torch.long)
        return batch

    @property
    def regression(self) -> bool:
        """Float labels: `transformers`' rule (problem_type "regression", or num_labels == 1 when unset)."""
        cfg = self.model.config
        return cfg.problem_type == "regression" or (cfg.problem_type is None and cfg.num_labels == 1)
