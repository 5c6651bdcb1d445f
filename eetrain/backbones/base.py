"""The one interface between eetrain and a model family.

An `ExitBackbone` wraps a Hugging Face model and gives, for a batch, the hidden state after every
layer that can carry an exit, and the *shared exit head* that turns such a state into logits:
`exit_logits(h) = exit_features(h) @ head_weight.T + head_bias`. Everything outside `backbones/`
(losses, training, exit decisions) talks only to this interface and never asks which family it has.

Exit layers are numbered 1..L (L = `num_layers`); layer i is the state after the i-th block that can
carry an exit (T5: decoder blocks, BERT: encoder layers, LLaMA: decoder layers).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from eetrain.backbones.kv import DecodeContext, Slots
from eetrain.errors import ConfigError
from eetrain.hub import resolve_model


@dataclass
class ExitStates:
    """Per-layer states of one batch.

    layers: the 1-based exit layers that were captured, ascending.
    hidden: one tensor per entry of `layers`, (B, T, d) for token-level heads, (B, d) for sequence heads.
    labels: (B, T) or (B,), aligned with the positions of `hidden`; -100 marks positions without a loss.
    """

    layers: tuple[int, ...]
    hidden: list[Tensor]
    labels: Tensor | None


def check_layers(layers: Sequence[int] | None, num_layers: int, key: str = "exit layers") -> tuple[int, ...]:
    """Validate 1-based exit layers: sorted, unique, within 1..num_layers. None means all layers."""
    if layers is None:
        return tuple(range(1, num_layers + 1))
    out = tuple(int(i) for i in layers)
    if not out:
        raise ConfigError(f"{key} is empty; allowed: layers in 1..{num_layers}")
    bad = [i for i in out if not 1 <= i <= num_layers]
    if bad:
        raise ConfigError(f"{key}={list(out)}: {bad} outside 1..{num_layers} (the model has {num_layers} layers)")
    if list(out) != sorted(set(out)):
        raise ConfigError(f"{key}={list(out)} must be sorted ascending without duplicates")
    return out


class LayerCapture:
    """Forward hooks that keep the output of selected blocks, so no other layer's output is stored.

    `output_hidden_states=True` keeps every layer and, for the last entry, returns the *final-normed*
    state; capturing block outputs ourselves gives raw residual streams for every layer, uniformly.
    """

    def __init__(self, blocks: nn.ModuleList, layers: Sequence[int]):
        self.states: dict[int, Tensor] = {}
        self._handles = [
            blocks[i - 1].register_forward_hook(self._hook(i)) for i in layers
        ]

    def _hook(self, layer: int):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self.states[layer] = output[0] if isinstance(output, tuple) else output

        return hook

    def __enter__(self) -> LayerCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()


@contextlib.contextmanager
def skip_blocks(
    blocks: nn.ModuleList, skip: Collection[int], passthrough: Callable[..., Any]
) -> Iterator[None]:
    """While active, the 1-based blocks in `skip` do not run: each returns `passthrough(block, *args,
    **kwargs)` (its input, in the block's output format) instead.

    The block's `forward` is replaced on the instance rather than the block being swapped out of the
    ModuleList: forward hooks (LayerCapture's, FSDP2's) still run, so a skipped layer's captured state is
    its input, and the module tree and state dict never change.
    """
    missing = object()
    patched: list[tuple[nn.Module, Any]] = []
    try:
        for i in sorted(skip):
            block = blocks[i - 1]
            patched.append((block, block.__dict__.get("forward", missing)))
            block.forward = functools.partial(passthrough, block)
        yield
    finally:
        for block, old in patched:
            if old is missing:
                del block.forward
            else:
                block.forward = old


class ExitBackbone(nn.Module):
    """Base class of the family adapters. Subclasses set `family`, `model_class`, `config_class`."""

    family: ClassVar[str]
    model_class: ClassVar[type[PreTrainedModel]]
    config_class: ClassVar[type]
    #: "token" heads predict every position (LM), "sequence" heads one label per example.
    head_kind: ClassVar[str] = "token"

    def __init__(
        self,
        name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        seed: int = 0,
        model_kwargs: dict[str, Any] | None = None,
        lora: dict[str, Any] | None = None,
    ):
        super().__init__()
        if (name_or_path is None) == (config is None):
            raise ConfigError(
                "set exactly one of model.name_or_path (a hub name or local directory) "
                "and model.config (a dict of config values for a randomly initialised model)"
            )
        self.name_or_path = name_or_path
        tok_source = tokenizer or name_or_path
        if tok_source is None:
            raise ConfigError("model.tokenizer is required when the model is built from model.config")
        tok_path, tok_local = resolve_model(tok_source, key="model.tokenizer" if tokenizer else "model.name_or_path")
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
            tok_path, local_files_only=tok_local
        )
        if name_or_path is not None:
            path, local = resolve_model(name_or_path)
            self.model = self.model_class.from_pretrained(path, local_files_only=local, **(model_kwargs or {}))
        else:
            values = dict(self.config_defaults(self.tokenizer))
            values.update(config or {})
            try:
                cfg = self.config_class(**values)
            except Exception as e:  # transformers 5 raises its own validation errors
                raise ConfigError(f"model.config is not a valid {self.config_class.__name__}: {e}") from e
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.model = self.model_class(cfg)
        self.num_layers: int = self._num_layers()
        self.hidden_size: int = self.model.config.hidden_size
        if lora:
            self._add_lora(dict(lora))

    def _add_lora(self, lora: dict[str, Any]) -> None:
        """Inject LoRA adapters in place and freeze everything else (peft's LoraConfig arguments).

        `self.model` stays the Hugging Face model, so the blocks, norms and head keep their paths; the
        PeftModel wrapper is kept outside the module tree so parameters are not registered twice.
        """
        from peft import LoraConfig, get_peft_model

        try:
            config = LoraConfig(**lora)
        except TypeError as e:
            raise ConfigError(f"model.lora is not a valid peft LoraConfig: {e}") from e
        try:
            self.__dict__["_peft"] = get_peft_model(self.model, config)
        except ValueError as e:
            raise ConfigError(f"model.lora: {e}") from e

    # --- family-specific parts -------------------------------------------------------------
    @classmethod
    def config_defaults(cls, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        """Config values a randomly initialised model needs besides the user's (vocab, special ids)."""
        return {"vocab_size": len(tokenizer)}

    def _num_layers(self) -> int:
        return len(self.blocks)

    @property
    def blocks(self) -> nn.ModuleList:
        """The blocks whose outputs carry exits, in order."""
        raise NotImplementedError

    def forward(
        self, batch: dict[str, Tensor], layers: Sequence[int] | None = None, skip: Collection[int] = frozenset()
    ) -> ExitStates:
        """Run the model on `batch` and capture the states after `layers` (default: all).

        skip: 1-based layers that do not run (layer dropout, training only): a skipped layer's state is
        its input. The forward must not use a KV cache while skipping.
        """
        raise NotImplementedError

    def exit_features(self, h: Tensor) -> Tensor:
        """Map a layer's state (..., d) to the head's input (..., d): final norm, rescale, pooling."""
        raise NotImplementedError

    def final_norm(self, h: Tensor) -> Tensor:
        """The family's final norm of a layer state (..., d) -> (..., d), without rescale, dropout or
        pooling: the space in which layer states are compared (e.g. layerwise distillation)."""
        raise NotImplementedError

    def skipped_block_output(self, block: nn.Module, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        """What a skipped block returns instead of running: its input, in the block's output format."""
        return hidden_states

    @property
    def head_weight(self) -> Tensor:
        """(V, d) weight of the shared exit head (V = vocab or number of classes)."""
        raise NotImplementedError

    @property
    def head_bias(self) -> Tensor | None:
        return None

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Pad tokenised examples (`source_ids`, `target_ids` lists, or `label`) into a batch."""
        raise NotImplementedError

    # --- early-exit decoding (token heads; see eetrain/decoding and backbones/kv.py) ------------
    def decode_init(self, batch: dict[str, Tensor], max_new_tokens: int) -> DecodeContext:
        """Start generation for `batch` (input_ids, attention_mask (B, S)): caches for
        `max_new_tokens` steps, and the first step's input (or, after a prompt prefill, its states)."""
        raise ConfigError(f"early-exit decoding needs a token head; the {self.family} adapter has none")

    def decode_embed(self, ids: Tensor) -> Tensor:
        """Input states `(b, q, d)` of token ids `(b, q)`."""
        raise NotImplementedError

    def decode_layer(
        self, ctx: DecodeContext, layer: int, h: Tensor, rows: Tensor | None, slots: Slots,
        qmask: Tensor | None = None,
    ) -> Tensor:
        """Run the 1-based `layer` on states `h (b, q, d)` of queries at `slots` of the rows `rows`
        (`(b,)` indices into the batch, None = all): write their keys/values (only where `qmask (b, q)`
        is True), attend over the cache, return the layer's output `(b, q, d)`."""
        raise NotImplementedError

    def decode_kv(
        self, ctx: DecodeContext, layer: int, h: Tensor, rows: Tensor | None, slots: Slots,
        qmask: Tensor | None = None,
    ) -> None:
        """Write only the keys/values that `layer` projects from the states `h (b, q, d)` (CALM's state
        copying: no attention or MLP is computed)."""
        raise NotImplementedError

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    # --- shared -------------------------------------------------------------------------------
    def exit_logits(self, h: Tensor) -> Tensor:
        """Logits (..., V) of the shared exit head for a layer state (..., d)."""
        return nn.functional.linear(self.exit_features(h), self.head_weight, self.head_bias)

    def model_logits(self, batch: dict[str, Tensor]) -> Tensor:
        """The wrapped model's own logits for `batch` (reference for the last exit)."""
        return self.model(**self.model_inputs(batch)).logits

    def model_inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return dict(batch)

    def capture(self, layers: Sequence[int] | None) -> LayerCapture:
        return LayerCapture(self.blocks, check_layers(layers, self.num_layers))

    def skipping(self, skip: Collection[int]) -> contextlib.AbstractContextManager:
        """Context in which the layers in `skip` (1-based) pass their input through."""
        if not skip:
            return contextlib.nullcontext()
        layers = check_layers(sorted(skip), self.num_layers, key="skipped layers")
        return skip_blocks(self.blocks, layers, self.skipped_block_output)

    def save_pretrained(self, directory: str) -> None:
        """Save model and tokenizer so plain `transformers` loads them with `from_pretrained`.

        With LoRA the adapters are merged into the weights first (the module keeps working, merged).
        """
        peft_model = self.__dict__.pop("_peft", None)
        if peft_model is not None:
            peft_model.merge_and_unload()
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)


def pad(seqs: list[list[int]], value: int) -> Tensor:
    """Right-pad lists of ids into a (B, T_max) long tensor."""
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for row, s in enumerate(seqs):
        out[row, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out
