"""One teacher-forced pass of a model over examples, reduced on the fly to what every analysis reads.

Per scored token (``N``) and layer (``L``) only a few numbers are kept -- never a layer's logits beyond
one chunk of tokens -- so a 128k vocabulary costs ``chunk_size x V`` floats at a time, not
``L x N x V``. The hidden states ``(L, N, d)`` are kept only when trained exit classifiers are to be
scored (gating).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from eetrain.exits.classifiers import feature_states
from eetrain.exits.measures import ExitRecords, summarize_logits
from eetrain.exits.record import InputCapture, token_view


@dataclass
class LayerRecords:
    """Per-layer statistics of ``N`` scored tokens of one model (CPU tensors).

    preds ``(L, N)`` long top-1 of every layer's exit head; top2 ``(L, N, 2)`` the two largest
    probabilities; entropies ``(L, N)`` in nats; p_final ``(L, N)`` the probability each layer gives to
    the last layer's top-1 (MEE Fig. 2); top10_final ``(L, N)`` the share of the last layer's top-k
    (k = ``top_k``, at most V - 1) in the layer's top-k; cos_final ``(L + 1, N)`` cos(h_i, h_L) for i = 0..L (row 0:
    the input of layer 1, NaN where it was not captured; raw residual states); saturation ``(L, N)``
    cos(h_i, h_{i-1}) in the space ``features`` (``exit.features``: what hidden-state saturation reads).
    labels ``(N,)`` the token teacher-forced at each position (the reference or the greedy output; class
    labels for sequence heads); positions ``(N,)`` 1-based position among its sequence's scored tokens;
    sequence_ids ``(N,)``. hidden ``(L, N, d)`` and h0 ``(N, d)`` only with ``keep_hidden``, in the space
    ``features`` (what exit classifiers read).
    sublayer: ``{point: (L, N, 3)}`` per sub-layer point (``<name>.stream``, ``<name>.output``): top-1
    equal to the last layer's, top-k overlap with the last layer's top-k, top-k overlap with the stream
    before the sub-layer.
    """

    preds: Tensor
    top2: Tensor
    entropies: Tensor
    p_final: Tensor
    top10_final: Tensor
    cos_final: Tensor
    saturation: Tensor
    labels: Tensor
    positions: Tensor
    sequence_ids: Tensor
    vocab_size: int
    head_kind: str = "token"
    hidden: Tensor | None = None
    h0: Tensor | None = None
    sublayer: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return self.preds.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.preds.shape[1]

    def exit_records(self) -> ExitRecords:
        """The same tokens as :class:`ExitRecords`, for the registered measures, classifiers and policies."""
        return ExitRecords(
            predictions=self.preds, top2=self.top2, entropies=self.entropies, saturation=self.saturation,
            vocab_size=self.vocab_size, labels=self.labels, positions=self.positions,
            sequence_ids=self.sequence_ids, hidden=self.hidden, h0=self.h0,
        )


def _logits(backbone: Any, h: Tensor, layer: int) -> Tensor:
    """Exit logits ``(n, V)`` of token states ``h (n, d)`` at ``layer`` (sequence heads pool a length-1 row)."""
    if backbone.head_kind == "sequence":
        return backbone.exit_logits(h[:, None, :], layer).float()
    return backbone.exit_logits(h, layer).float()


def _overlap(a: Tensor, b: Tensor) -> Tensor:
    """Share of the ids in each row of ``b (n, k)`` that are also in the same row of ``a (n, k)``."""
    return (a[:, :, None] == b[:, None, :]).any(1).float().mean(-1)


def _first(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple | list) else output


class _SublayerCapture:
    """Forward hooks keeping every block's input and each sub-layer's branch and stream outputs."""

    def __init__(self, backbone: Any) -> None:
        self.inputs: dict[int, Tensor] = {}
        self.outputs: dict[tuple[int, str, str], Tensor] = {}
        self.points: list[tuple[int, str, bool]] = []  # (layer, name, stream given by a module)
        self._handles = []
        for layer in range(1, backbone.num_layers + 1):
            block = backbone.blocks[layer - 1]
            self._handles.append(block.register_forward_pre_hook(self._pre(layer), with_kwargs=True))
            for name, branch, stream in backbone.sublayers(layer):
                self._handles.append(branch.register_forward_hook(self._keep((layer, name, "output"))))
                if stream is not None:
                    self._handles.append(stream.register_forward_hook(self._keep((layer, name, "stream"))))
                self.points.append((layer, name, stream is not None))

    def _pre(self, layer: int):
        def hook(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.inputs[layer] = args[0] if args else kwargs["hidden_states"]
        return hook

    def _keep(self, key: tuple[int, str, str]):
        def hook(_m: Any, _inputs: Any, output: Any) -> None:
            self.outputs[key] = _first(output)
        return hook

    def __enter__(self) -> _SublayerCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()

    def states(self) -> list[tuple[str, Tensor, Tensor, Tensor]]:
        """(point name, stream before, branch output, stream after) per sub-layer, all ``(B, T, d)``."""
        out, before, last = [], None, None
        for layer, name, has_stream in self.points:
            if layer != last:
                before, last = self.inputs[layer], layer
            branch = self.outputs[(layer, name, "output")]
            after = self.outputs[(layer, name, "stream")] if has_stream else before + branch
            out.append((f"{layer}:{name}", before, branch, after))
            before = after
        return out


@torch.no_grad()
def collect(
    backbone: Any,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    keep_hidden: bool = False,
    sublayer: bool = False,
    top_k: int = 10,
    max_tokens: int | None = None,
    chunk_size: int = 2048,
    progress: Any = None,
    features: str = "raw",
) -> LayerRecords:
    """Run ``backbone`` (eval, no grad) over ``batches`` (its ``collate`` output, labels ``-100`` = not
    scored) and keep the per-layer statistics of :class:`LayerRecords`.

    ``sublayer``: also project every sub-layer's residual stream and own output through the exit head of
    its block (``backbone.sublayers``). ``progress``: a bar to ``update(1)`` per batch. ``features``:
    ``raw`` or ``normed`` (through the final norm), the space of ``hidden``, ``h0`` and ``saturation``.
    """
    L = backbone.num_layers
    device = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    parts: dict[str, list[Tensor]] = {}
    sub_parts: dict[str, list[Tensor]] = {}
    total, offset, vocab = 0, 0, int(backbone.head_weight.shape[0])
    k = min(top_k, max(vocab - 1, 1))  # a top-k of every class (a small classifier) would overlap by construction

    def add(key: str, value: Tensor, into: dict[str, list[Tensor]] = parts) -> None:
        into.setdefault(key, []).append(value.cpu())

    try:
        for batch in batches:
            batch = {key: v.to(device) if isinstance(v, Tensor) else v for key, v in batch.items()}
            with InputCapture(backbone.blocks[0]) as inp, (_SublayerCapture(backbone) if sublayer
                                                           else _Null()) as cap:
                states = backbone(batch)
            if tuple(states.layers) != tuple(range(1, L + 1)):
                raise ValueError(f"the analysis needs every layer 1..{L}, got {states.layers}")
            hs, h0, labels, positions, rows = token_view(backbone, states.hidden, inp.value, states.labels)
            m = labels.shape[0]
            if max_tokens is not None:
                m = min(m, max_tokens - total)
                hs, h0 = [h[:m] for h in hs], None if h0 is None else h0[:m]
                labels, positions, rows = labels[:m], positions[:m], rows[:m]
            b_parts: dict[str, list[Tensor]] = {}
            for start in range(0, m, chunk_size):
                sl = slice(start, start + chunk_size)
                final = _logits(backbone, hs[-1][sl], L)
                final_top1 = final.argmax(-1)
                final_topk = final.topk(k, -1).indices
                hL = hs[-1][sl].float()
                cols: dict[str, list[Tensor]] = {}
                previous = None if h0 is None else feature_states(backbone, h0[sl], features).float()
                for layer, h in zip(range(1, L + 1), hs, strict=True):
                    h = h[sl].float()
                    f = feature_states(backbone, hs[layer - 1][sl], features).float()
                    z = final if layer == L else _logits(backbone, h, layer)
                    p, t2, e = summarize_logits(z)
                    cols.setdefault("preds", []).append(p)
                    cols.setdefault("top2", []).append(t2)
                    cols.setdefault("entropies", []).append(e)
                    cols.setdefault("p_final", []).append(z.softmax(-1).gather(-1, final_top1[:, None])[:, 0])
                    cols.setdefault("top10_final", []).append(_overlap(z.topk(k, -1).indices, final_topk))
                    cols.setdefault("cos_final", []).append(F.cosine_similarity(h, hL, dim=-1))
                    cols.setdefault("saturation", []).append(
                        torch.full((h.shape[0],), float("-inf"), device=h.device) if previous is None
                        else F.cosine_similarity(f, previous, dim=-1))
                    previous = f
                first = (torch.full((hL.shape[0],), float("nan"), device=hL.device) if h0 is None
                         else F.cosine_similarity(h0[sl].float(), hL, dim=-1))
                cols["cos_final"].insert(0, first)
                for key, values in cols.items():
                    b_parts.setdefault(key, []).append(torch.stack(values))
                if sublayer:
                    for point, tensor in _sublayer_stats(backbone, cap, states.labels, sl, m, final_top1,
                                                         final_topk, k):
                        b_parts.setdefault(f"sub:{point}", []).append(tensor)
            for key, values in b_parts.items():
                if key.startswith("sub:"):
                    add(key[4:], torch.cat(values, dim=0), sub_parts)
                else:
                    add(key, torch.cat(values, dim=1))
            if keep_hidden:
                add("hidden", torch.stack([feature_states(backbone, h, features) for h in hs]))
                if h0 is not None:
                    add("h0", feature_states(backbone, h0, features))
            add("labels", labels.long())
            add("positions", positions.long())
            add("sequence_ids", rows.long() + offset)
            offset += states.labels.shape[0]
            total += m
            if progress is not None:
                progress.update(1)
            if max_tokens is not None and total >= max_tokens:
                break
    finally:
        backbone.train(was_training)
    if total == 0:
        raise ValueError("the examples gave no scored tokens (every label is -100)")
    cat = {key: torch.cat(v, dim=1 if key in _LAYER_FIRST else 0) for key, v in parts.items()}
    sub = _sublayer_tensors(sub_parts, L)
    if "h0" in cat and cat["h0"].shape[0] != total:
        del cat["h0"]
    return LayerRecords(vocab_size=vocab, head_kind=backbone.head_kind, sublayer=sub, **cat)


_LAYER_FIRST = ("preds", "top2", "entropies", "p_final", "top10_final", "cos_final", "saturation", "hidden")


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _select(backbone: Any, x: Tensor, labels: Tensor) -> Tensor:
    """The scored tokens of a captured ``(B, T, d)`` tensor, as ``token_view`` selects them."""
    return token_view(backbone, [x], None, labels)[0][0]


def _sublayer_stats(
    backbone: Any, cap: _SublayerCapture, labels: Tensor, sl: slice, m: int, final_top1: Tensor,
    final_topk: Tensor, k: int,
) -> list[tuple[str, Tensor]]:
    """Per sub-layer point ``(n, 3)``: top-1 == last layer's, top-k overlap with the last layer's,
    top-k overlap with the stream before the sub-layer."""
    out = []
    for point, before, branch, after in cap.states():
        layer = int(point.split(":")[0])
        before_k = _logits(backbone, _select(backbone, before, labels)[:m][sl].float(), layer).topk(k, -1).indices
        for kind, x in (("stream", after), ("output", branch)):
            z = _logits(backbone, _select(backbone, x, labels)[:m][sl].float(), layer)
            top = z.topk(k, -1).indices
            stats = torch.stack([(top[:, 0] == final_top1).float(), _overlap(top, final_topk),
                                 _overlap(top, before_k)], dim=-1)
            out.append((f"{point}.{kind}", stats))
    return out


def _sublayer_tensors(parts: dict[str, list[Tensor]], num_layers: int) -> dict[str, Tensor]:
    """``{"<layer>:<name>.<kind>": [(n, 3)]}`` -> ``{"<name>.<kind>": (L, N, 3)}``."""
    by_point: dict[str, dict[int, Tensor]] = {}
    for key, values in parts.items():
        layer, point = key.split(":", 1)
        by_point.setdefault(point, {})[int(layer)] = torch.cat(values, dim=0)
    return {p: torch.stack([rows[i] for i in range(1, num_layers + 1)]) for p, rows in by_point.items()}


def example_batches(backbone: Any, examples: Sequence[Mapping[str, Any]], size: int) -> list[dict[str, Tensor]]:
    """Teacher-forced batches of ``size`` examples through the backbone's own ``collate``."""
    return [backbone.collate([dict(e) for e in examples[i : i + size]]) for i in range(0, len(examples), size)]


@torch.no_grad()
def greedy_examples(
    backbone: Any, examples: Sequence[Mapping[str, Any]], size: int, max_new_tokens: int, progress: Any = None,
) -> list[dict[str, Any]]:
    """The examples with ``target_ids`` replaced by the model's own greedy output (full model, KV-cached;
    eos included), so the analyses see what the model generates rather than the reference."""
    from eetrain.decoding.calibration import batches
    from eetrain.decoding.generate import generate

    out: list[dict[str, Any]] = []
    for i, prompt in enumerate(batches(backbone, list(examples), size)):
        chunk = examples[i * size : (i + 1) * size]
        seqs = generate(backbone, prompt, None, max_new_tokens=max_new_tokens).sequences()
        out += [{**e, "target_ids": s} for e, s in zip(chunk, seqs, strict=True) if s]
        if progress is not None:
            progress.update(1)
    return out
