"""LLaMA (decoder-only): exits on the decoder layers, shared final norm + LM head.

Text-to-text examples become one sequence `source + target`; only target tokens get a loss.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from eetrain.backbones import kv
from eetrain.backbones.base import ExitBackbone, ExitStates, pad
from eetrain.backbones.kv import DecodeContext, Slots


class LlamaBackbone(ExitBackbone):
    family = "llama"
    model_class = LlamaForCausalLM
    config_class = LlamaConfig
    lora_targets = ("q_proj", "v_proj")

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

    def head_modules(self) -> tuple[nn.Module, nn.Module]:
        return self.model.model.norm, self.model.lm_head

    def final_norm(self, h: Tensor) -> Tensor:
        return self.model.model.norm(h)

    def sublayers(self, layer: int) -> list[tuple[str, nn.Module, nn.Module | None]]:
        block = self.blocks[layer - 1]  # pre-norm: stream after a sub-layer = stream before + its output
        return [("attention", block.self_attn, None), ("mlp", block.mlp, None)]

    def model_inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
        """input_ids, attention_mask, labels (B, T_max), right-padded: each row is `source + target`,
        labelled on the target only (-100 on the source and the padding). A packed plain-text block is
        `{"source_ids": [], "target_ids": block}`: every token labelled, and equal blocks need no padding.
        `forward` shifts the labels, so a row's first token is never a target."""
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

    # --- early-exit decoding -------------------------------------------------------------------
    def decode_init(self, batch: dict[str, Tensor], max_new_tokens: int) -> DecodeContext:
        """Prefill the prompts (input_ids with right or left padding, attention_mask) at full depth.

        Prompts are laid out left-padded, ending at slot T0 - 1, so every row's generated token t sits
        at slot T0 + t - 1; a row's positions are its slots minus its padding. The prompt's last
        position after every layer gives the first new token's states (its exit is decided on them).
        """
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        size, width = ids.shape
        lengths = mask.sum(dim=1)
        offset = width - lengths  # left padding of each row
        if bool((~mask).any()):
            # left-align: padding first, then the row's tokens in their order (a stable sort on the mask)
            ids = ids.gather(1, torch.argsort(mask.long(), dim=1, stable=True))
        total = width + max_new_tokens
        key_valid = torch.arange(total, device=ids.device)[None, :] >= offset[:, None]
        cfg = self.model.config
        head_dim = self.blocks[0].self_attn.head_dim
        embed = self.decode_embed(ids)
        k, v = kv.empty_cache(self.num_layers, size, cfg.num_key_value_heads, total, head_dim, like=embed)
        ctx = DecodeContext(
            k=k, v=v, key_valid=key_valid, position_offset=offset, first_slot=width, prefill_input=embed[:, -1]
        )
        h, states = embed, []
        for layer in range(1, self.num_layers + 1):
            h = self.decode_layer(ctx, layer, h, None, 0)
            states.append(h[:, -1])
        ctx.prefill_states = states
        return ctx

    def decode_embed(self, ids: Tensor) -> Tensor:
        return self.model.model.embed_tokens(ids)

    def decode_layer(
        self, ctx: DecodeContext, layer: int, h: Tensor, rows: Tensor | None, slots: Slots,
        qmask: Tensor | None = None, copy_kv: kv.Copied | None = None,
    ) -> Tensor:
        block = self.blocks[layer - 1]
        i = layer - 1
        attn, norm = block.self_attn, block.input_layernorm
        b, q, _ = h.shape
        joint = norm(kv.with_copied(h, copy_kv))
        normed = joint if copy_kv is None else joint[: b * q].view(b, q, -1)
        heads, kv_heads = self.model.config.num_attention_heads, self.model.config.num_key_value_heads
        query = attn.q_proj(normed).view(b, q, heads, -1).transpose(1, 2)
        key, copied_key = kv.project(attn.k_proj, joint, b, q, kv_heads)
        value, copied_value = kv.project(attn.v_proj, joint, b, q, kv_heads)
        cos, sin = self.model.model.rotary_emb(normed, ctx.positions(slots, rows, q))
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        kv.write_kv(ctx, i, key, value, rows, slots, qmask)
        if copy_kv is not None:
            cos, sin = self.model.model.rotary_emb(joint, ctx.positions(copy_kv.slots[:, None], copy_kv.rows, 1))
            _, copied_key = apply_rotary_pos_emb(copied_key, copied_key, cos, sin)
            kv.write_copied(ctx, i, copied_key, copied_value, copy_kv)
        out = kv.cached_attention(ctx, i, query, rows, slots, scale=attn.scaling)
        h = h + attn.o_proj(out)
        return h + block.mlp(block.post_attention_layernorm(h))
