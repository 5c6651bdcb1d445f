"""T5 (encoder-decoder): exits on the decoder blocks, shared LM head."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase, T5Config, T5ForConditionalGeneration

from eetrain.backbones.base import ExitBackbone, ExitStates, pad


class T5Backbone(ExitBackbone):
    family = "t5"
    model_class = T5ForConditionalGeneration
    config_class = T5Config

    @classmethod
    def config_defaults(cls, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        # Without these ids a T5Config from a dict fails in the forward pass with labels.
        return {
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "decoder_start_token_id": tokenizer.pad_token_id,
        }

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.decoder.block

    def forward(
        self, batch: dict[str, Tensor], layers: Sequence[int] | None = None, skip: Collection[int] = frozenset()
    ) -> ExitStates:
        """batch: input_ids, attention_mask (B, S); labels (B, T) with -100 padding. skip: decoder layers."""
        labels = batch["labels"]
        encoder_states = self.model.encoder(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        decoder_input_ids = self.model._shift_right(labels)
        with self.capture(layers) as cap, self.skipping(skip):
            self.model.decoder(
                input_ids=decoder_input_ids,
                encoder_hidden_states=encoder_states,
                encoder_attention_mask=batch["attention_mask"],
                use_cache=False,
            )
        order = sorted(cap.states)
        return ExitStates(tuple(order), [cap.states[i] for i in order], labels)

    def exit_features(self, h: Tensor) -> Tensor:
        out = self.model.decoder.dropout(self.final_norm(h))
        if self.model.config.scale_decoder_outputs:
            # T5 with tied embeddings rescales before the LM head.
            out = out * (self.model.config.d_model**-0.5)
        return out

    def final_norm(self, h: Tensor) -> Tensor:
        return self.model.decoder.final_layer_norm(h)

    def skipped_block_output(
        self,
        block: nn.Module,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        position_bias: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        encoder_decoder_position_bias: Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """A T5Block's (hidden, self-attention bias, cross-attention bias) without running it.

        Only the first block owns the relative position embedding and computes the bias that every later
        block reuses; skipped, it still computes that bias (cheap: a (1, H, T, T) lookup), or the later
        blocks would attend without relative positions. Handing on a None cross-attention bias is
        equivalent to the first block's: it has no relative bias there, and the next block makes the
        same zeros itself.
        """
        attn = block.layer[0].SelfAttention
        if position_bias is None and attn.has_relative_attention_bias:
            length = hidden_states.shape[1]
            position_bias = attn.compute_bias(length, length, device=hidden_states.device)
        return hidden_states, position_bias, encoder_decoder_position_bias

    @property
    def head_weight(self) -> Tensor:
        return self.model.lm_head.weight

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
        input_ids = pad([e["source_ids"] for e in examples], self.tokenizer.pad_token_id)
        return {
            "input_ids": input_ids,
            "attention_mask": (pad([[1] * len(e["source_ids"]) for e in examples], 0)),
            "labels": pad([e["target_ids"] for e in examples], -100),
        }
