"""Per-layer loss, top-1 accuracy and agreement with the last layer, accumulated over batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from eetrain.backbones.base import ExitBackbone, ExitStates


@torch.no_grad()
def layer_predictions(states: ExitStates, backbone: ExitBackbone) -> tuple[Tensor, Tensor, Tensor]:
    """Top-1 predictions and token CE of every captured exit at the scored positions.

    Returns preds (n, N) long, token_ce (n, N) float, labels (N,), n = len(states.layers). One layer's
    logits exist at a time, so this is cheap in memory even for a large vocabulary. A regression head
    (one output, float labels): preds are the scores (n, N) float and token_ce the squared errors.
    """
    labels = states.labels
    keep = labels != -100
    regression = backbone.regression
    preds, ces = [], []
    for layer, h in zip(states.layers, states.hidden, strict=True):
        if backbone.head_kind == "sequence":
            logits = backbone.exit_logits(h, layer)[keep]
        else:
            logits = backbone.exit_logits(h[keep], layer)
        logits = logits.float()
        if regression:
            preds.append(logits[:, 0])
            ces.append((logits[:, 0] - labels[keep].float()) ** 2)
            continue
        preds.append(logits.argmax(-1))
        ces.append(F.cross_entropy(logits, labels[keep], reduction="none"))
    return torch.stack(preds), torch.stack(ces), labels[keep]


def oracle_exit_layers(preds: Tensor, layers: tuple[int, ...] | None = None) -> Tensor:
    """The oracle exit layer of every token: the earliest layer from which its top-1 stays equal to the
    last layer's top-1 through the last layer.

    preds: (n, N) top-1 ids of n exit layers (the last row is the reference), as `layer_predictions`
    gives. layers: the n layer numbers (default 1..n). Returns (N,) long layer numbers.
    """
    n = preds.shape[0]
    layer_ids = torch.tensor(layers if layers is not None else range(1, n + 1), device=preds.device)
    agree = preds == preds[-1]  # (n, N)
    # agrees from row k on = the reversed cumulative AND; the oracle row = the first such k
    from_here = agree.flip(0).cumprod(0).flip(0).bool()
    first = from_here.int().argmax(0)  # the last row always agrees, so some row is True
    return layer_ids[first]


class LayerStats:
    """Sums over batches; `compute()` gives one row per exit layer:
    loss (mean token CE), acc (top-1 == label), agree (top-1 == the last layer's top-1). For a
    regression head's float scores: loss (mean squared error) alone."""

    def __init__(self, layers: tuple[int, ...]):
        self.layers = layers
        self.reset()

    def reset(self) -> None:
        n = len(self.layers)
        self.ce_sum = torch.zeros(n, dtype=torch.float64)
        self.correct = torch.zeros(n, dtype=torch.long)
        self.agree = torch.zeros(n, dtype=torch.long)
        self.count = 0
        self.regression = False

    def update(self, preds: Tensor, token_ce: Tensor, labels: Tensor) -> None:
        """preds, token_ce: (n, N); labels: (N,). The last row is the reference for agreement."""
        self.ce_sum += token_ce.double().sum(-1).cpu()
        self.count += labels.numel()
        if preds.is_floating_point():  # regression scores: no classes to be right about
            self.regression = True
            return
        self.correct += (preds == labels).sum(-1).cpu()
        self.agree += (preds == preds[-1]).sum(-1).cpu()

    def compute(self) -> list[dict[str, float]]:
        n = max(self.count, 1)
        if self.regression:
            return [{"layer": layer, "loss": float(self.ce_sum[k] / n)} for k, layer in enumerate(self.layers)]
        return [
            {
                "layer": layer,
                "loss": float(self.ce_sum[k] / n),
                "acc": float(self.correct[k]) / n,
                "agree": float(self.agree[k]) / n,
            }
            for k, layer in enumerate(self.layers)
        ]


def format_table(rows: list[dict[str, float]]) -> str:
    """A fixed-width text table of `LayerStats.compute()` rows."""
    if "acc" not in rows[0]:  # a regression head
        return "\n".join([f"{'layer':>5}  {'mse':>8}"] + [f"{r['layer']:>5}  {r['loss']:>8.4f}" for r in rows])
    lines = [f"{'layer':>5}  {'loss':>8}  {'top1_acc':>8}  {'agree_last':>10}"]
    for r in rows:
        lines.append(f"{r['layer']:>5}  {r['loss']:>8.4f}  {r['acc']:>8.4f}  {r['agree']:>10.4f}")
    return "\n".join(lines)
