"""T5 (encoder-decoder): exits on the decoder blocks, shared LM head."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase, T5Config, T5ForConditionalGeneration

from eetrain.backbones import kv
from eetrain.backbones.base import ExitBackbone, ExitStates, pad
from eetrain.backbones.kv import DecodeContext, Slots


class T5Backbone(ExitBackbone):
    family = "t5"
    needs_source = True
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

    def head_modules(self) -> tuple[nn.Module, nn.Module]:
        return self.model.decoder.final_layer_norm, self.model.lm_head

    def head_features(self, features: nn.Module, h: Tensor) -> Tensor:
        out = self.model.decoder.dropout(features(h))
        if self.model.config.scale_decoder_outputs:
            # T5 with tied embeddings rescales before the LM head.
            out = out * (self.model.config.d_model**-0.5)
        return out

    def final_norm(self, h: Tensor) -> Tensor:
        return self.model.decoder.final_layer_norm(h)

    def sublayers(self, layer: int) -> list[tuple[str, nn.Module, nn.Module | None]]:
        block = self.blocks[layer - 1].layer  # [self-attention, cross-attention, feed-forward]
        return [
            ("attention", block[0].SelfAttention, block[0]),
            ("cross_attention", block[1].EncDecAttention, block[1]),
            ("mlp", block[-1].DenseReluDense, block[-1]),
        ]

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

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
        input_ids = pad([e["source_ids"] for e in examples], self.tokenizer.pad_token_id)
        return {
            "input_ids": input_ids,
            "attention_mask": (pad([[1] * len(e["source_ids"]) for e in examples], 0)),
            "labels": pad([e["target_ids"] for e in examples], -100),
        }

    # --- early-exit decoding -------------------------------------------------------------------
    def decode_init(self, batch: dict[str, Tensor], max_new_tokens: int) -> DecodeContext:
        """Encode the sources; decoder slot t holds the input of generated token t + 1 (slot 0: the
        decoder start token). Cross-attention keys/values are projected per layer on first use, so
        layers no token reaches cost nothing."""
        cfg = self.model.config
        mask = batch["attention_mask"]
        enc = self.model.encoder(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
        size = enc.shape[0]
        k, v = kv.empty_cache(self.num_layers, size, cfg.num_heads, max_new_tokens, cfg.d_kv, like=enc)
        attn = self.blocks[0].layer[0].SelfAttention
        distance = torch.arange(max_new_tokens, device=enc.device)  # query slot minus key slot
        buckets = attn._relative_position_bucket(
            -distance,
            bidirectional=False,
            num_buckets=attn.relative_attention_num_buckets,
            max_distance=attn.relative_attention_max_distance,
        )
        start = cfg.decoder_start_token_id
        return DecodeContext(
            k=k,
            v=v,
            key_valid=torch.ones(size, max_new_tokens, dtype=torch.bool, device=enc.device),
            position_offset=torch.zeros(size, dtype=torch.long, device=enc.device),
            first_slot=0,
            start_ids=torch.full((size,), start, dtype=torch.long, device=enc.device),
            extra={
                "encoder": enc,
                "encoder_mask": mask.bool()[:, None, None, :],
                "cross": [None] * self.num_layers,
                "bias": attn.relative_attention_bias(buckets),  # (T_max, H): bias by distance
            },
        )

    def decode_embed(self, ids: Tensor) -> Tensor:
        return self.model.decoder.embed_tokens(ids)

    def decode_layer(
        self, ctx: DecodeContext, layer: int, h: Tensor, rows: Tensor | None, slots: Slots,
        qmask: Tensor | None = None, copy_kv: kv.Copied | None = None,
    ) -> Tensor:
        block = self.blocks[layer - 1]
        self_attn, cross_attn, ff = block.layer
        attn = self_attn.SelfAttention
        b, q, _ = h.shape
        heads, dk = attn.n_heads, attn.key_value_proj_dim
        i = layer - 1

        joint = self_attn.layer_norm(kv.with_copied(h, copy_kv))
        key, copied_key = kv.project(attn.k, joint, b, q, heads)
        value, copied_value = kv.project(attn.v, joint, b, q, heads)
        kv.write_kv(ctx, i, key, value, rows, slots, qmask)
        if copy_kv is not None:
            kv.write_copied(ctx, i, copied_key, copied_value, copy_kv)
        normed = joint if copy_kv is None else joint[: b * q].view(b, q, -1)
        query = attn.q(normed).view(b, q, heads, dk).transpose(1, 2)
        table = ctx.extra["bias"]

        def bias(slots: Slots, upto: int) -> Tensor:
            key = (slots, q, upto) if isinstance(slots, int) else None
            if key is not None and ctx.extra.get("bias_key") == key:
                return ctx.extra["bias_value"]  # every layer of a step shares it
            if isinstance(slots, int):
                slots = torch.arange(slots, slots + q, device=h.device)[None, :]
            distance = (slots[:, :, None] - torch.arange(upto, device=h.device)).clamp_min(0)
            value = table[distance].permute(0, 3, 1, 2)  # (b or 1, H, q, upto)
            if key is not None:
                ctx.extra["bias_key"], ctx.extra["bias_value"] = key, value
            return value

        h = h + attn.o(kv.cached_attention(ctx, i, query, rows, slots, scale=1.0, bias=bias))

        cross = cross_attn.EncDecAttention
        if ctx.extra["cross"][i] is None:
            enc = ctx.extra["encoder"]
            shape = (enc.shape[0], enc.shape[1], heads, dk)
            ctx.extra["cross"][i] = (
                cross.k(enc).view(shape).transpose(1, 2),
                cross.v(enc).view(shape).transpose(1, 2),
            )
        ck, cv = ctx.extra["cross"][i]
        normed = cross_attn.layer_norm(h)
        query = cross.q(normed).view(b, q, heads, dk).transpose(1, 2)
        h = h + cross.o(kv.cross_attention(query, ck, cv, ctx.extra["encoder_mask"], rows, scale=1.0))
        return ff(h)
