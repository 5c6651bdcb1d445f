"""The one interface between eetrain and a model family.

An `ExitBackbone` wraps a Hugging Face model and gives, for a batch, the hidden state after every
layer that can carry an exit, and the *exit head* that turns such a state into logits:
`exit_logits(h, i) = exit_features(h, i) @ W_i.T + b_i` (`head_params(i)`). With `exit_head="shared"`
every exit uses the model's own final norm (or pooler) and head; with `"per_layer"` each exit below the
last has its own copy of them (`ExitHead`: DeeBERT/PABEE's internal classifiers, EE-LLM's exit heads),
initialised from the final ones and saved beside the export (`exit_heads.safetensors`), while the last
layer keeps the model's own head, so the export still loads in plain `transformers` at full depth.
Everything outside `backbones/` (losses, training, exit decisions) talks only to this interface and
never asks which family it has.

Exit layers are numbered 1..L (L = `num_layers`); layer i is the state after the i-th block that can
carry an exit (T5: decoder blocks, BERT: encoder layers, LLaMA: decoder layers).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from eetrain.backbones.kv import Copied, DecodeContext, Slots
from eetrain.errors import ConfigError, number, positive_int
from eetrain.hub import resolve_model

EXIT_HEADS = ("shared", "per_layer")
#: per-layer exit heads of an export, beside the model's own weights (keys `<layer>.<param>`)
HEADS_FILE = "exit_heads.safetensors"


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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "tokenizer.model", "vocab.txt",
                   "vocab.json")


@contextlib.contextmanager
def _local_files(key: str, value: str, local: bool) -> Iterator[None]:
    """Loading from a local directory: a missing, truncated or corrupt file is the user's input (one line
    naming `key`), not a traceback from inside transformers."""
    try:
        yield
    except Exception as e:
        if not local or isinstance(e, ConfigError):
            raise
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "ignore_mismatched_sizes" in str(e) or "size mismatch" in str(e):
            raise ConfigError(f"{key}={value!r}: its weights have other shapes than the model this config builds "
                              f"({_stored_sizes(value)}); model.model_kwargs / model.config override its config.json "
                              "(a classifier's num_labels comes from data.num_labels): set them as it has them") from e
        raise ConfigError(f"{key}={value!r} does not load ({type(e).__name__}: {reason}); it must be a directory "
                          "written by save_pretrained (config.json, the weights, the tokenizer), such as a "
                          "run's export/") from e


def _stored_sizes(directory: str) -> str:
    """What a saved model's config.json says of the sizes a config override may change."""
    try:
        stored = json.loads((Path(directory).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return "its config.json does not read"
    labels = stored.get("num_labels", len(stored.get("id2label") or {}) or None)
    keys = {k: stored[k] for k in ("vocab_size", "d_model", "hidden_size") if k in stored}
    sizes = ", ".join(f"{k}={v}" for k, v in keys.items())
    return f"its config.json: num_labels={labels}, {sizes}" if labels is not None else f"its config.json: {sizes}"


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


class ExitHead(nn.Module):
    """One exit's own head: copies of the family's final feature map (`features`: norm or pooler) and
    of its output projection (`proj`, (V, d)), trained apart from the model's head."""

    def __init__(self, features: nn.Module, proj: nn.Module):
        super().__init__()
        self.features = copy.deepcopy(features)
        weight, bias = proj.weight, getattr(proj, "bias", None)
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                              device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.proj.weight.copy_(weight)
            if bias is not None:
                self.proj.bias.copy_(bias)
        for p in self.parameters():
            p.requires_grad_(True)  # trainable even when the model's own head is frozen (LoRA)


#: config sizes that must be positive integers when given (Hugging Face's names across the families)
SIZES = ("num_layers", "num_decoder_layers", "num_hidden_layers", "d_model", "hidden_size", "d_ff",
         "intermediate_size", "d_kv", "num_heads", "num_attention_heads", "num_key_value_heads", "vocab_size",
         "num_labels")


def _refuse_unread_keys(cfg: Any, given: Mapping[str, Any]) -> None:
    """A `model.config` key that the config class neither declares nor converts (e.g. a misspelt
    `num_layer`) is stored as is and read by nothing: the model would silently be built without it.
    Legacy names the class converts (LLaMA's `rope_theta`) are consumed, so they pass."""
    import difflib

    known = set(type(cfg)().to_dict()) | set(getattr(type(cfg), "attribute_map", {}))
    stored = cfg.to_dict()
    for key in given:
        if key not in known and key in stored:
            near = difflib.get_close_matches(key, sorted(known), n=3)
            raise ConfigError(
                f"model.config.{key}: not a {type(cfg).__name__} setting, so nothing would read it"
                + (f" (did you mean {', '.join(near)}?)" if near else "")
                + f"; the settings are {type(cfg).__name__}'s arguments (transformers)"
            )


class ExitBackbone(nn.Module):
    """Base class of the family adapters. Subclasses set `family`, `model_class`, `config_class`."""

    family: ClassVar[str]
    model_class: ClassVar[type[PreTrainedModel]]
    config_class: ClassVar[type]
    #: "token" heads predict every position (LM), "sequence" heads one label per example.
    head_kind: ClassVar[str] = "token"
    #: an encoder-decoder reads every example's source with its encoder: an empty one cannot run
    needs_source: ClassVar[bool] = False
    #: modules a pretrained checkpoint leaves untrained (a task's new classifier): under LoRA they train
    #: whole (peft's `modules_to_save`, as its SEQ_CLS task type does), else they would stay random
    task_heads: ClassVar[tuple[str, ...]] = ()
    #: the attention projections to put LoRA on, in examples and messages (`model.lora.target_modules`)
    lora_targets: ClassVar[tuple[str, ...]] = ("q", "v")

    @property
    def max_positions(self) -> int | None:
        """The longest input the model can embed (learned absolute positions), or None (relative / rotary)."""
        return None

    @property
    def regression(self) -> bool:
        """A one-score regression head (float labels, MSE, PABEE's tolerance rule); LM heads never are."""
        return False

    def __init__(
        self,
        name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        seed: int = 0,
        model_kwargs: dict[str, Any] | None = None,
        lora: dict[str, Any] | None = None,
        exit_head: str | None = None,
        exit_head_layers: Any = None,
    ):
        """exit_head: `shared` | `per_layer` (None: per_layer when `name_or_path` holds per-layer heads,
        else shared). exit_head_layers: the exits that get their own head, as `exits.layers` names them
        (None: every layer below the last; the last layer always keeps the model's head)."""
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
        tok_key = "model.tokenizer" if tokenizer else "model.name_or_path"
        tok_path, tok_local = resolve_model(tok_source, key=tok_key)
        if tok_local and Path(tok_path).is_dir() and not any((Path(tok_path) / f).is_file() for f in TOKENIZER_FILES):
            # transformers would build a default tokenizer of another vocabulary without a word
            raise ConfigError(f"{tok_key}={tok_source!r}: no tokenizer files there ({', '.join(TOKENIZER_FILES)}); "
                              "set model.tokenizer to the directory of the model's tokenizer")
        with _local_files(tok_key, tok_source, tok_local):
            self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
                tok_path, local_files_only=tok_local
            )
        if name_or_path is not None:
            path, local = resolve_model(name_or_path)
            with _local_files("model.name_or_path", name_or_path, local):
                self.model = self.model_class.from_pretrained(path, local_files_only=local, **(model_kwargs or {}))
        else:
            values = dict(self.config_defaults(self.tokenizer))
            values.update(config or {})
            for name in SIZES:  # counts and widths that transformers takes as given (0 layers: an empty stack)
                v = (config or {}).get(name)
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                    source = " (model/bert_*.yaml take it from data.num_labels)" if name == "num_labels" else ""
                    raise ConfigError(f"model.config.{name}={v!r} must be an integer >= 1{source}")
            try:
                cfg = self.config_class(**values)
            except Exception as e:  # transformers 5 raises its own validation errors
                raise ConfigError(f"model.config is not a valid {self.config_class.__name__}: {e}") from e
            _refuse_unread_keys(cfg, config or {})
            heads, groups = getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None)
            if heads and groups and heads % groups:  # grouped-query attention shares each key/value head
                raise ConfigError(f"model.config.num_key_value_heads={groups} must divide num_attention_heads={heads}")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                try:
                    self.model = self.model_class(cfg)
                except (KeyError, ValueError, ArithmeticError) as e:  # e.g. an unknown activation name
                    raise ConfigError(f"model.config: a {self.config_class.__name__} with these settings does not "
                                      f"build ({type(e).__name__}: {e}); check model.config.*") from e
        self.num_layers: int = self._num_layers()
        self.hidden_size: int = self.model.config.hidden_size
        self.exit_heads: nn.ModuleDict | None = self._exit_heads(exit_head, exit_head_layers, name_or_path)
        if lora:
            if not isinstance(lora, Mapping):
                raise ConfigError(f"model.lora={lora!r} must be a mapping of peft LoraConfig arguments, e.g. "
                                  f"{{r: 8, lora_alpha: 16, target_modules: [{', '.join(self.lora_targets)}]}}")
            self._add_lora(dict(lora))

    def _exit_heads(self, kind: str | None, layers: Any, name_or_path: str | None) -> nn.ModuleDict | None:
        from pathlib import Path

        stored = None
        if name_or_path is not None and (Path(name_or_path).expanduser() / HEADS_FILE).is_file():
            from safetensors.torch import load_file

            stored = load_file(str(Path(name_or_path).expanduser() / HEADS_FILE))
        kind = kind or ("per_layer" if stored is not None else "shared")
        if kind not in EXIT_HEADS:
            raise ConfigError(f"model.exit_head={kind!r}; allowed: {', '.join(EXIT_HEADS)}")
        if kind == "shared":
            return None
        L = self.num_layers
        if layers is None and stored is not None:
            chosen = sorted({int(k.split(".", 1)[0]) for k in stored})
        else:
            from eetrain.losses.exit_points import resolve_exit_points

            chosen = [i for i in resolve_exit_points(layers, L, key="model.exit_head_layers") if i < L]
        features, proj = self.head_modules()
        heads = nn.ModuleDict({str(i): ExitHead(features, proj) for i in chosen})
        if stored is not None:
            missing, unexpected = heads.load_state_dict(stored, strict=False)
            if missing or unexpected:
                have = sorted({int(k.split(".", 1)[0]) for k in stored})
                raise ConfigError(
                    f"model.exit_head_layers (by default exits.layers): the heads in {name_or_path}/{HEADS_FILE} "
                    f"are for layers {have}, not {chosen}; set exits.layers (or model.exit_head_layers) to "
                    f"{have}, or model.exit_head=shared to decide with the model's own head"
                )
        return heads

    def _add_lora(self, lora: dict[str, Any]) -> None:
        """Inject LoRA adapters in place and freeze everything else (peft's LoraConfig arguments).

        `self.model` stays the Hugging Face model, so the blocks, norms and head keep their paths; the
        PeftModel wrapper is kept outside the module tree so parameters are not registered twice.
        """
        from peft import LoraConfig, get_peft_model

        # peft checks none of these by name (a string rank fails deep inside it with "'<=' not supported ...")
        unknown = sorted(set(lora) - {f.name for f in dataclasses.fields(LoraConfig)})
        if unknown:
            raise ConfigError(f"model.lora: unknown key(s) {', '.join(unknown)}; peft's LoraConfig takes e.g. r, "
                              "lora_alpha, lora_dropout, target_modules, modules_to_save, bias, use_rslora, use_dora, "
                              "init_lora_weights, rank_pattern, alpha_pattern, layers_to_transform")
        if "r" in lora:
            positive_int(lora["r"], "model.lora.r")
        if "lora_alpha" in lora:
            number(lora["lora_alpha"], "model.lora.lora_alpha", above=0)
        if "lora_dropout" in lora and not 0 <= number(lora["lora_dropout"], "model.lora.lora_dropout") < 1:
            raise ConfigError(f"model.lora.lora_dropout={lora['lora_dropout']!r}; allowed: a probability in [0, 1)")
        if lora.get("bias", "none") not in ("none", "all", "lora_only"):
            raise ConfigError(f"model.lora.bias={lora['bias']!r}; allowed: none, all, lora_only")
        for key in ("rank_pattern", "alpha_pattern"):
            if lora.get(key) is not None and not isinstance(lora[key], Mapping):
                raise ConfigError(f"model.lora.{key}={lora[key]!r}; allowed: a mapping of module name (or regex) -> value")
        self._check_lora_names(lora, "target_modules")
        if self.task_heads:
            # a task's new head trains whole under LoRA, whatever else is listed (peft's SEQ_CLS task type
            # adds it too); only an explicit modules_to_save=null keeps it frozen
            given = lora.get("modules_to_save", [])
            given = [given] if isinstance(given, str) else given
            if given is not None:
                self._check_lora_names(lora, "modules_to_save")
                lora["modules_to_save"] = list(dict.fromkeys([*given, *self.task_heads]))
        else:
            self._check_lora_names(lora, "modules_to_save")
        try:
            config = LoraConfig(**lora)
        except (TypeError, ValueError, AttributeError, NotImplementedError) as e:
            raise ConfigError(f"model.lora is not a valid peft LoraConfig: {e}") from e
        try:
            self.__dict__["_peft"] = get_peft_model(self.model, config)
        except (TypeError, ValueError, AttributeError, NotImplementedError) as e:
            raise ConfigError(f"model.lora: {e}") from e
        from peft.tuners.lora import LoraLayer

        head = self.head_modules()[1]
        if isinstance(head, LoraLayer):
            # every exit reads the head as one weight matrix (exit_logits, the fused CE): a LoRA delta
            # on it would train nothing and be left out of every exit's logits
            name = next(n for n, m in self.model.named_modules() if m is head)
            raise ConfigError(
                f"model.lora.target_modules={lora.get('target_modules')!r} puts LoRA on the model's head "
                f"{name!r}, which the exits read as one weight matrix; train it whole with "
                f"model.lora.modules_to_save=[{name}], or leave it out of target_modules"
            )

    def _check_lora_names(self, lora: dict[str, Any], key: str) -> None:
        """Each name in `model.lora.<key>` (a list) matches a module the way peft matches it (the name, or
        its dotted suffix): peft needs only one name of the list to match, so a misspelt one was dropped
        unsaid. A string is peft's regex over full names, left to peft."""
        names = lora.get(key)
        if names is None or isinstance(names, str):
            return
        if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"model.lora.{key}={names!r}; allowed: a list of module names, e.g. "
                              f"[{', '.join(self.lora_targets)}], or one regex string")
        modules = [n for n, _ in self.model.named_modules() if n]
        missing = [t for t in names if not any(n == t or n.endswith("." + t) for n in modules)]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in self.model.named_modules() if isinstance(m, nn.Linear)})
            raise ConfigError(f"model.lora.{key}: {', '.join(map(repr, missing))} match(es) no module of the "
                              f"{self.family} model; its linear layers are named {', '.join(linear)}")

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

    def head_modules(self) -> tuple[nn.Module, nn.Module]:
        """The model's own final feature map (norm or pooler) and output projection (`.weight` (V, d))."""
        raise NotImplementedError

    def head_features(self, features: nn.Module, h: Tensor) -> Tensor:
        """Apply a feature map (`head_modules()[0]` or a per-layer head's copy) to a layer state (..., d),
        with the family's extras (T5: dropout and the tied-embedding rescale; BERT: pooling)."""
        return features(h)

    def final_norm(self, h: Tensor) -> Tensor:
        """The family's final norm of a layer state (..., d) -> (..., d), without rescale, dropout or
        pooling: the space in which layer states are compared (e.g. layerwise distillation)."""
        raise NotImplementedError

    def skipped_block_output(self, block: nn.Module, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        """What a skipped block returns instead of running: its input, in the block's output format."""
        return hidden_states

    @property
    def head_weight(self) -> Tensor:
        """(V, d) weight of the model's own head (V = vocab or number of classes)."""
        return self.head_modules()[1].weight

    @property
    def head_bias(self) -> Tensor | None:
        return getattr(self.head_modules()[1], "bias", None)

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
        qmask: Tensor | None = None, copy_kv: Copied | None = None,
    ) -> Tensor:
        """Run the 1-based `layer` on states `h (b, q, d)` of queries at `slots` of the rows `rows`
        (`(b,)` indices into the batch, None = all): write their keys/values (only where `qmask (b, q)`
        is True), attend over the cache, return the layer's output `(b, q, d)`. `copy_kv`: positions whose
        keys/values the layer only projects from given states (CALM's state copying), in the same
        projection calls as the queries' own."""
        raise NotImplementedError

    # --- encoder early exit (sequence heads; see eetrain/classify.py) ------------------------------
    def encode_embed(self, batch: dict[str, Tensor]) -> tuple[Tensor, Any]:
        """Input states `(B, T, d)` of `batch` and the attention inputs every layer takes."""
        raise ConfigError(f"encoder early exit needs a sequence head; the {self.family} adapter has none")

    def encode_layer(self, layer: int, h: Tensor, ctx: Any) -> Tensor:
        """Run the 1-based `layer` on `h (n, T, d)` with `ctx`; returns `(n, T, d)`."""
        raise NotImplementedError

    def encode_rows(self, h: Tensor, ctx: Any, keep: Tensor) -> tuple[Tensor, Any]:
        """The rows `keep` of `h` and of their attention inputs."""
        raise NotImplementedError

    # --- analysis (eetrain/analysis/sublayer.py) ---------------------------------------------------
    def sublayers(self, layer: int) -> list[tuple[str, nn.Module, nn.Module | None]]:
        """The sub-layers of the 1-based block `layer`, in order, as `(name, branch, stream)`: `branch`'s
        output (first element if a tuple) is the sub-layer's own contribution `(B, T, d)` before the skip
        connection adds it; `stream`'s output is the residual stream after the sub-layer, or None where
        that is the stream before it plus the branch (pre-norm blocks)."""
        raise ConfigError(f"the {self.family} adapter does not name its sub-layers (sub-layer analysis)")

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    # --- shared -------------------------------------------------------------------------------
    def exit_head(self, layer: int | None) -> ExitHead | None:
        """Exit `layer`'s own head, or None where it uses the model's (shared heads, the last layer)."""
        if self.exit_heads is None or layer is None:
            return None
        return self.exit_heads[str(layer)] if str(layer) in self.exit_heads else None

    def exit_features(self, h: Tensor, layer: int | None = None) -> Tensor:
        """The head input (..., d) of exit `layer` (None: the last layer's) for a layer state (..., d)."""
        head = self.exit_head(layer)
        return self.head_features(head.features if head is not None else self.head_modules()[0], h)

    def head_params(self, layer: int | None = None) -> tuple[Tensor, Tensor | None]:
        """Weight (V, d) and bias (V,) or None of exit `layer`'s head."""
        head = self.exit_head(layer)
        if head is None:
            return self.head_weight, self.head_bias
        return head.proj.weight, head.proj.bias

    def exit_logits(self, h: Tensor, layer: int | None = None) -> Tensor:
        """Logits (..., V) of exit `layer`'s head (None: the last layer's) for a layer state (..., d)."""
        return nn.functional.linear(self.exit_features(h, layer), *self.head_params(layer))

    def exit_logits_at(self, h: Tensor, layers: Tensor) -> Tensor:
        """Logits (n, V) of states `h (n, d)` that left at different exit `layers (n,)`."""
        if self.exit_heads is None or h.shape[0] == 0:
            return self.exit_logits(h)
        out = None
        for layer in layers.unique().tolist():
            sel = layers == layer
            z = self.exit_logits(h[sel], int(layer))
            if out is None:
                out = z.new_empty((h.shape[0], z.shape[-1]))
            out[sel] = z
        assert out is not None, "exit_logits_at needs at least one state"
        return out

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
        self.save_exit_heads(directory)

    def save_exit_heads(self, directory: str) -> None:
        """Write the per-layer exit heads (if any) to `directory/exit_heads.safetensors`, atomically."""
        if self.exit_heads is None:
            return
        from pathlib import Path

        from safetensors.torch import save_file

        from eetrain.files import atomic_file

        state = {k: v.detach().cpu().contiguous() for k, v in self.exit_heads.state_dict().items()}
        with atomic_file(Path(directory) / HEADS_FILE) as tmp:
            save_file(state, tmp)


def pad(seqs: list[list[int]], value: int) -> Tensor:
    """Right-pad lists of ids into a (B, T_max) long tensor."""
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for row, s in enumerate(seqs):
        out[row, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out
