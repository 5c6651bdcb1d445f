"""LLaMA (decoder-only): exits on the decoder layers, shared final norm + LM head.

Text-to-text examples become one sequence `source + target`; only target tokens get a loss.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from eetrain.backbones.base import ExitBackbone, ExitStates, pad


class LlamaBackbone(ExitBackbone):
    family = "llama"
    model_class = LlamaForCausalLM
    config_class = LlamaConfig

    @classmethod
    def config_defaults(cls, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        return {
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
        }

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.model.layers

    def forward(
        self, batch: dict[str, Tensor], layers: Sequence[int] | None = None, skip: Collection[int] = frozenset()
    ) -> ExitStates:
        """batch: input_ids, attention_mask, labels (B, T); labels[t] is the token at t, -100 = no loss.

        Returned labels are shifted: position t is scored on the token at t + 1. Skipped layers need no
        care: rotary position embeddings and the mask are computed once by the model and passed to
        every layer.
        """
        with self.capture(layers) as cap, self.skipping(skip):
            self.model.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            )
        labels = batch.get("labels")
        if labels is not None:
            labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        order = sorted(cap.states)
        return ExitStates(tuple(order), [cap.states[i] for i in order], labels)

    def exit_features(self, h: Tensor) -> Tensor:
        return self.model.model.norm(h)

    def final_norm(self, h: Tensor) -> Tensor:
        return self.model.model.norm(h)

    @property
    def head_weight(self) -> Tensor:
        return self.model.lm_head.weight

    @property
    def head_bias(self) -> Tensor | None:
        return self.model.lm_head.bias

    def model_inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
        ids = [e["source_ids"] + e["target_ids"] for e in examples]
        labels = [[-100] * len(e["source_ids"]) + e["target_ids"] for e in examples]
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        return {
            "input_ids": pad(ids, pad_id),
            "attention_mask": pad([[1] * len(s) for s in ids], 0),
            "labels": pad(labels, -100),
        }
