"""A joint-optimization loss is a sum of named terms, each a function of the per-layer states.

Terms are built by Hydra from `conf/loss/*.yaml` (and `conf/loss/terms/`); each returns its value and
what to log. Terms are `nn.Module`s held in an `nn.ModuleDict`, so a term with parameters (e.g. the
distillation's student projection) is trained by the optimizer and saved in checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from eetrain.backbones.base import ExitBackbone, ExitStates
from eetrain.errors import ConfigError, check_keys, positive_int
from eetrain.losses.curriculum import Curriculum, LayerDropout
from eetrain.losses.exit_points import resolve_exit_points
from eetrain.losses.fused_ce import IMPLS, _load_cce, _load_liger, multi_exit_cross_entropy
from eetrain.losses.weights import SCHEMES, layer_weights, renormalise


@dataclass
class LossOutput:
    """total: the scalar to backpropagate; logs: detached scalars or (n,) per-layer vectors by name."""

    total: Tensor
    logs: dict[str, Tensor] = field(default_factory=dict)
    #: per-exit CE of the exits that had a loss: {layer: value}
    layer_ce: dict[int, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainStep:
    """Where training is: optimizer step `index` (0-based, the trainer's global step) of `total`."""

    index: int
    total: int


class LossTerm(Protocol):
    def __call__(self, states: ExitStates, backbone: ExitBackbone, step: TrainStep | None = None) -> LossOutput: ...


def token_rows(states: ExitStates, backbone: ExitBackbone, layers: Sequence[int]) -> tuple[list[Tensor], Tensor]:
    """Exit features of the scored positions: n tensors (N, d) and labels (N,), padding dropped."""
    labels = states.labels
    if labels is None:
        raise ConfigError(
            f"the {backbone.family} batches have no labels: this model family needs data with a label "
            "for its head (BERT: a class label per example); a cross-entropy term cannot train without them"
        )
    by_layer = dict(zip(states.layers, states.hidden, strict=True))
    keep = labels != -100
    feats = []
    for i in layers:
        h = by_layer[i]
        if backbone.head_kind == "sequence":
            feats.append(backbone.exit_features(h, i)[keep])
        else:
            feats.append(backbone.exit_features(h[keep], i))
    return feats, labels[keep]


def multi_exit_mse(
    feats: Sequence[Tensor], labels: Tensor, backbone: ExitBackbone, layers: Sequence[int], weights: Tensor
) -> tuple[Tensor, Tensor]:
    """A regression head's (num_labels=1, GLUE STS-B) counterpart of `multi_exit_cross_entropy`:
    `sum_i alpha_i * MSE_i`, MSE_i the mean squared error of exit `layers[i]`'s score `(N,)` (float32)
    against the float `labels (N,)` -- transformers' loss for one label. feats: `(N, d)` per exit.
    Returns the loss and the detached `(n,)` per-exit MSEs."""
    per = []
    for k, layer in enumerate(layers):
        score = nn.functional.linear(feats[k], *backbone.head_params(layer)).float()[:, 0]
        per.append(nn.functional.mse_loss(score, labels.float()))
    per_layer = torch.stack(per)
    return (weights.float() * per_layer).sum(), per_layer.detach()


class ExitCrossEntropy(nn.Module):
    """Weighted cross-entropy of the shared head at several exits (CALM when weights="calm"); on a
    regression head (one output, float labels) each exit's mean squared error instead.

    layers: the exit points (`resolve_exit_points`: null/all, last, a list, {every: k}, {shallow: L_s});
    the shipped configs wire them to `exits.layers`, with `min_layer` / `train_below_min` from the same
    node: exits below `min_layer` get no loss unless `train_below_min`. FREE's shallow/deep CE
    (L_s * CE_{L_s} + L * CE_L) / (L_s + L) is layers={shallow: L_s} with weights="calm".
    weights: see `layer_weights` (`ratio` for geometric, `e_scale` for sum_l).
    curriculum: optional `Curriculum`; in training steps only its active exits get a loss, their weights
    renormalised to the same total. Validation always scores every exit.

    The head's logits are never materialised for backward (see `fused_ce`).
    """

    def __init__(
        self,
        weights: str | Sequence[float] = "calm",
        layers: Any = None,
        min_layer: int = 1,
        train_below_min: bool = False,
        ratio: float = 0.5,
        e_scale: float = 1.0,
        curriculum: Curriculum | Mapping[str, Any] | None = None,
        label_smoothing: float = 0.0,
        impl: str = "auto",
        chunk_size: int | None = None,  # None: fused_ce sizes chunks to ~256 MiB of logits
    ):
        super().__init__()
        key = "loss.terms.ce"
        if not isinstance(weights, str) and (
            not isinstance(weights, Sequence) or any(isinstance(w, bool) or not isinstance(w, int | float) for w in weights)
        ):
            raise ConfigError(f"{key}.weights={weights!r}; allowed: {', '.join(SCHEMES)} or a list of numbers, one per "
                              "exit layer")
        if weights == "geometric" and (isinstance(ratio, bool) or not isinstance(ratio, int | float) or not ratio > 0):
            raise ConfigError(f"{key}.ratio={ratio!r}: the geometric weights' ratio must be a number > 0")
        if weights == "sum_l" and (isinstance(e_scale, bool) or not isinstance(e_scale, int | float) or not e_scale > 0):
            raise ConfigError(f"{key}.e_scale={e_scale!r}: the sum_l weights' e_scale must be a number > 0")
        if not isinstance(train_below_min, bool):
            raise ConfigError(f"exits.train_below_min={train_below_min!r}; allowed: true or false")
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, int | float) or not 0 <= label_smoothing < 1:
            raise ConfigError(f"{key}.label_smoothing={label_smoothing!r}; allowed: a number in [0, 1)")
        if impl not in IMPLS:
            raise ConfigError(f"{key}.impl={impl!r}; allowed: {', '.join(IMPLS)}")
        positive_int(chunk_size, f"{key}.chunk_size", null="~256 MiB of logits per chunk")
        if impl in ("liger", "cce"):  # GPU kernels: say so now, not at the first training step
            package = {"liger": "liger-kernel", "cce": "cut-cross-entropy"}[impl]
            if not torch.cuda.is_available():
                raise ConfigError(f"{key}.impl={impl!r} is a CUDA kernel and there is no GPU; use auto (chunked on "
                                  "the CPU) or chunked")
            if (_load_liger() if impl == "liger" else _load_cce()) is None:
                raise ConfigError(f"{key}.impl={impl!r} needs the {package} package (pip install {package}); or use auto")
            if impl == "cce" and label_smoothing:
                raise ConfigError(f"{key}.impl='cce' does not support label_smoothing; use liger, chunked or auto")
        if isinstance(curriculum, Mapping):
            check_keys(curriculum, ("kind", "every"), f"{key}.curriculum")
        self.weights = weights if isinstance(weights, str) else [float(w) for w in weights]
        if isinstance(layers, Mapping):
            layers = dict(layers)
        elif isinstance(layers, Sequence) and not isinstance(layers, str):
            layers = list(layers)
        self.layers = layers
        self.min_layer = min_layer
        self.train_below_min = bool(train_below_min)
        self.ratio = ratio
        self.e_scale = e_scale
        # A plain mapping (an override without _target_) is accepted like the instantiated object.
        self.curriculum = Curriculum(**curriculum) if isinstance(curriculum, Mapping) else curriculum
        if self.curriculum is not None and not isinstance(self.curriculum, Curriculum):
            raise ConfigError(f"{key}.curriculum={curriculum!r}; allowed: null or a mapping {{kind: rotational|gradual, "
                              "every: R}} (e.g. loss.terms.ce.curriculum={kind: rotational})")
        self.label_smoothing = label_smoothing
        self.impl = impl
        self.chunk_size = chunk_size
        if isinstance(layers, str) and layers not in ("all", "last"):
            # Fail at construction for a typo; depth-dependent checks wait for `resolve`.
            resolve_exit_points(layers, 1)

    def resolve(self, num_layers: int) -> tuple[tuple[int, ...], Tensor]:
        """The exit layers that get a loss and their weights, validated against the model depth."""
        min_layer = 1 if self.train_below_min else self.min_layer
        if self.train_below_min:
            resolve_exit_points(None, num_layers, self.min_layer)  # still a valid exits.min_layer
        layers = resolve_exit_points(self.layers, num_layers, min_layer)
        weights = layer_weights(
            self.weights, layers, ratio=self.ratio, e_scale=self.e_scale, last_layer=num_layers
        )
        return layers, weights

    def setup(self, backbone: ExitBackbone) -> None:
        self.resolve(backbone.num_layers)

    def forward(self, states: ExitStates, backbone: ExitBackbone, step: TrainStep | None = None) -> LossOutput:
        layers, weights = self.resolve(backbone.num_layers)
        if step is not None and self.curriculum is not None:
            active = self.curriculum.active(layers, step.index, step.total)
            keep = torch.tensor([i in active for i in layers])
            weights = renormalise(weights, keep)
            layers = active
        feats, labels = token_rows(states, backbone, layers)
        weights = weights.to(feats[0].device)
        kw = dict(label_smoothing=self.label_smoothing, impl=self.impl, chunk_size=self.chunk_size)
        if backbone.regression:
            if self.label_smoothing:
                raise ConfigError(f"loss label_smoothing={self.label_smoothing}: smoothing applies to classes, and "
                                  "this head is a regression (num_labels=1); set it to 0")
            loss, per_layer = multi_exit_mse(feats, labels, backbone, layers, weights)
        elif backbone.exit_heads is None:
            loss, per_layer = multi_exit_cross_entropy(
                feats, backbone.head_weight, labels, weights, bias=backbone.head_bias, **kw
            )
        else:  # every exit has its own head: one fused CE each (still one exit's logits at a time)
            parts = []
            for k, layer in enumerate(layers):
                weight, bias = backbone.head_params(layer)
                parts.append(multi_exit_cross_entropy([feats[k]], weight, labels, weights[k : k + 1], bias=bias, **kw))
            loss = torch.stack([p[0] for p in parts]).sum()
            per_layer = torch.cat([p[1] for p in parts])
        # Exits with weight 0 are not computed (NaN): they had no loss, so they are not reported.
        layer_ce = {i: v for i, v, w in zip(layers, per_layer, weights.tolist(), strict=True) if w > 0}
        logs = {"exits": loss.new_tensor(float(len(layer_ce)))} if self.curriculum is not None else {}
        return LossOutput(loss, logs, layer_ce)

    def extra_repr(self) -> str:
        return (
            f"weights={self.weights!r}, layers={self.layers!r}, min_layer={self.min_layer}, "
            f"train_below_min={self.train_below_min}, curriculum={self.curriculum!r}"
        )


class JointLoss(nn.Module):
    """Sum of named terms: `JointLoss({"ce": ExitCrossEntropy("calm"), "kd": LayerwiseDistillation(...)})`.

    layer_dropout: LayerSkip's layer dropout, applied by the training step to the backbone's forward
    (it belongs to the training objective's recipe, so it is configured with the loss).
    """

    def __init__(
        self, terms: Mapping[str, nn.Module], layer_dropout: LayerDropout | Mapping[str, Any] | None = None
    ):
        super().__init__()
        if not terms:
            raise ValueError("loss.terms is empty: configure at least one term (e.g. loss=calm)")
        bad = [name for name, t in terms.items() if not isinstance(t, nn.Module)]
        if bad:
            raise ConfigError(f"loss.terms {bad} are not torch.nn.Module terms (e.g. eetrain.losses.ExitCrossEntropy)")
        self.terms = nn.ModuleDict(dict(terms))
        self.layer_dropout = LayerDropout(**layer_dropout) if isinstance(layer_dropout, Mapping) else layer_dropout
        if self.layer_dropout is not None and not isinstance(self.layer_dropout, LayerDropout):
            raise ConfigError(f"loss.layer_dropout={layer_dropout!r}; allowed: null or a mapping {{p_max: P}} "
                              "(e.g. loss.layer_dropout={p_max: 0.2})")

    def extra_repr(self) -> str:
        return f"layer_dropout={self.layer_dropout!r}" if self.layer_dropout is not None else ""

    def setup(self, backbone: ExitBackbone) -> None:
        """Validate every term against the model and create parameters that depend on it."""
        for term in self.terms.values():
            if hasattr(term, "setup"):
                term.setup(backbone)

    def dropped_layers(self, step: int, num_layers: int) -> frozenset[int]:
        """The layers the training forward skips at optimizer step `step` (none without layer dropout)."""
        if self.layer_dropout is None:
            return frozenset()
        return self.layer_dropout.dropped(step, num_layers)

    def forward(self, states: ExitStates, backbone: ExitBackbone, step: TrainStep | None = None) -> LossOutput:
        """step: the training step (curricula apply); None in validation."""
        total, logs, layer_ce = None, {}, {}
        for name, term in self.terms.items():
            out = term(states, backbone, step)
            total = out.total if total is None else total + out.total
            logs[name] = out.total.detach()
            for key, value in out.logs.items():
                logs[f"{name}/{key}"] = value
            layer_ce.update(out.layer_ce)
        return LossOutput(total, logs, layer_ce)
