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
    task_heads = ("classifier",)  # new in every fine-tuning of a pretrained BERT
    lora_targets = ("query", "value")

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

    def head_modules(self) -> tuple[nn.Module, nn.Module]:
        return self.model.bert.pooler, self.model.classifier

    def head_features(self, features: nn.Module, h: Tensor) -> Tensor:
        """(B, T, d) layer state -> (B, d) pooled first-token feature (BERT is post-norm: no extra norm)."""
        return self.model.dropout(features(h))

    def final_norm(self, h: Tensor) -> Tensor:
        """BERT is post-norm: every layer's output already went through its own LayerNorm."""
        return h

    def sublayers(self, layer: int) -> list[tuple[str, nn.Module, nn.Module | None]]:
        block = self.blocks[layer - 1]  # post-norm: the stream is LayerNorm(stream + projected branch)
        return [("attention", block.attention.output.dense, block.attention), ("mlp", block.output.dense, block.output)]

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

    # --- encoder early exit (sequence heads; see eetrain/classify.py) ----------------------------
    # The encoder keeps no cache, so rows that exited simply leave the batch: `encode_rows` gathers
    # the running rows' states and attention inputs, and later layers compute only those.
    def encode_embed(self, batch: dict[str, Tensor]) -> tuple[Tensor, tuple[Tensor, Any]]:
        """Embeddings `(B, T, d)` of `batch` (input_ids, attention_mask, token_type_ids) and the
        attention inputs every layer takes: `(attention_mask (B, T), the model's layer mask)`."""
        inputs = self.model_inputs(batch)
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = ids.new_ones(ids.shape)
        h = self.model.bert.embeddings(input_ids=ids, token_type_ids=inputs.get("token_type_ids"))
        return h, (mask, self._layer_mask(h, mask))

    def encode_layer(self, layer: int, h: Tensor, ctx: tuple[Tensor, Any]) -> Tensor:
        """Run the 1-based encoder `layer` on states `h (n, T, d)` with `ctx` from `encode_embed` /
        `encode_rows`; returns `(n, T, d)`."""
        out = self.blocks[layer - 1](h, ctx[1])
        return out[0] if isinstance(out, tuple) else out

    def encode_rows(self, h: Tensor, ctx: tuple[Tensor, Any], keep: Tensor) -> tuple[Tensor, tuple[Tensor, Any]]:
        """The rows `keep` (`(n,)` bool or indices) of states `h (n, T, d)` and of their attention inputs.
        Trailing columns that are padding in every kept row are cut (masked keys weigh nothing, so the
        real positions' states do not change), so a batch gets cheaper as its long rows exit."""
        mask = ctx[0][keep]
        h = h[keep]
        real = mask.any(0).nonzero()
        width = int(real[-1]) + 1 if real.numel() else mask.shape[1]
        if width < mask.shape[1]:
            h, mask = h[:, :width], mask[:, :width]
        return h, (mask, self._layer_mask(h, mask))

    def _layer_mask(self, h: Tensor, mask: Tensor) -> Any:
        """The bidirectional mask the model's attention implementation takes (None: no padding)."""
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.model.config, inputs_embeds=h, attention_mask=mask)

    @property
    def max_positions(self) -> int:
        return int(self.model.config.max_position_embeddings)

    @property
    def regression(self) -> bool:
        """Float labels: `transformers`' rule (problem_type "regression", or num_labels == 1 when unset)."""
        cfg = self.model.config
        return cfg.problem_type == "regression" or (cfg.problem_type is None and cfg.num_labels == 1)
