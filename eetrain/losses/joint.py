"""A joint-optimization loss is a sum of named terms, each a function of the per-layer states.

Terms are built by Hydra from `conf/loss/*.yaml`; each returns its value and what to log.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

from eetrain.backbones.base import ExitBackbone, ExitStates, check_layers
from eetrain.errors import ConfigError
from eetrain.losses.fused_ce import multi_exit_cross_entropy
from eetrain.losses.weights import layer_weights


@dataclass
class LossOutput:
    """total: the scalar to backpropagate; logs: detached scalars or (n,) per-layer vectors by name."""

    total: Tensor
    logs: dict[str, Tensor] = field(default_factory=dict)
    #: per-exit CE of the exits that had a loss: {layer: value}
    layer_ce: dict[int, Tensor] = field(default_factory=dict)


class LossTerm(Protocol):
    def __call__(self, states: ExitStates, backbone: ExitBackbone) -> LossOutput: ...


def token_rows(states: ExitStates, backbone: ExitBackbone, layers: Sequence[int]) -> tuple[list[Tensor], Tensor]:
    """Exit features of the scored positions: n tensors (N, d) and labels (N,), padding dropped."""
    labels = states.labels
    if labels is None:
        raise ValueError("the batch has no labels: a cross-entropy term needs them")
    by_layer = dict(zip(states.layers, states.hidden, strict=True))
    keep = labels != -100
    feats = []
    for i in layers:
        h = by_layer[i]
        if backbone.head_kind == "sequence":
            feats.append(backbone.exit_features(h)[keep])
        else:
            feats.append(backbone.exit_features(h[keep]))
    return feats, labels[keep]


class ExitCrossEntropy:
    """Weighted cross-entropy of the shared head at several exits (CALM when weights="calm").

    The head's logits are never materialised for backward (see `fused_ce`).
    """

    def __init__(
        self,
        weights: str | Sequence[float] = "calm",
        layers: Sequence[int] | str | None = None,
        ratio: float = 0.5,
        label_smoothing: float = 0.0,
        impl: str = "auto",
        chunk_size: int = 4096,
    ):
        self.weights = weights if isinstance(weights, str) else [float(w) for w in weights]
        if isinstance(layers, str) and layers != "last":
            raise ConfigError(f"loss.ce.layers={layers!r}; allowed: null (all), 'last', or a list of layers")
        self.layers = layers if layers is None or isinstance(layers, str) else [int(i) for i in layers]
        self.ratio = ratio
        self.label_smoothing = label_smoothing
        self.impl = impl
        self.chunk_size = chunk_size

    def resolve(self, num_layers: int) -> tuple[tuple[int, ...], Tensor]:
        """The exit layers that get a loss and their weights, validated against the model depth."""
        wanted = [num_layers] if self.layers == "last" else self.layers
        layers = check_layers(wanted, num_layers, key="loss.ce.layers")
        return layers, layer_weights(self.weights, layers, ratio=self.ratio)

    def __call__(self, states: ExitStates, backbone: ExitBackbone) -> LossOutput:
        layers, weights = self.resolve(backbone.num_layers)
        feats, labels = token_rows(states, backbone, layers)
        loss, per_layer = multi_exit_cross_entropy(
            feats,
            backbone.head_weight,
            labels,
            weights.to(feats[0].device),
            bias=backbone.head_bias,
            label_smoothing=self.label_smoothing,
            impl=self.impl,
            chunk_size=self.chunk_size,
        )
        return LossOutput(loss, {"ce": loss.detach()}, dict(zip(layers, per_layer, strict=True)))


class JointLoss:
    """Sum of named terms: `JointLoss({"ce": ExitCrossEntropy("calm"), "kd": ...})`."""

    def __init__(self, terms: Mapping[str, LossTerm]):
        if not terms:
            raise ValueError("loss.terms is empty: configure at least one term (e.g. loss=calm)")
        self.terms = dict(terms)

    def __call__(self, states: ExitStates, backbone: ExitBackbone) -> LossOutput:
        total, logs, layer_ce = None, {}, {}
        for name, term in self.terms.items():
            out = term(states, backbone)
            total = out.total if total is None else total + out.total
            logs[name] = out.total.detach()
            layer_ce.update(out.layer_ce)
        return LossOutput(total, logs, layer_ce)
