"""Exit decisions taken layer by layer while decoding, from what has been computed so far.

`eetrain.exits` scores whole records `(L, N)` after the fact; a decoder must decide at layer i with
only h_1..h_i. :class:`LayerDecider` keeps, per batch row, the little state each rule needs across
layers (the previous hidden state for saturation, the last two for the three-state MLP, the LSTM's
(h, c), the per-layer argmax / top-2 history for patience and the monotonic rule) and scores the
layer through the same registered measures and classifiers, so a decoded exit layer equals
`eetrain.exits.policy.exit_layers` on the same states (tested).

:class:`ScheduledExits` is the other kind of decider: exit layers fixed in advance (`fixed:K`,
`random:MEAN`), for benchmarks and exactness tests; deciding costs nothing.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from eetrain.errors import ConfigError
from eetrain.exits.classifiers import EXIT_INDEX, ExitClassifier, LSTMClassifier, ThreeStateMLP
from eetrain.exits.measures import ExitRecords, compute_measure, get_measure, summarize_logits
from eetrain.exits.policy import ExitPolicy
from eetrain.exits.thresholds import resolve_threshold

# measures whose score at layer i reads earlier layers' predictions or probabilities
_HISTORY_MEASURES = ("patience", "monotonic")


class LayerDecider:
    """An :class:`ExitPolicy` evaluated incrementally over the layers of one decoding step.

    Per step: :meth:`begin` with the rows' decoding positions and their input states h_0; then
    :meth:`observe` once per computed layer, in order, for the rows whose token is still deciding.
    """

    def __init__(self, policy: ExitPolicy | None, backbone: object, num_layers: int) -> None:
        self.policy = policy
        self.backbone = backbone
        self.num_layers = num_layers
        self.last_logits: Tensor | None = None
        if policy is None:
            self.check_layers: frozenset[int] = frozenset()
            return
        check_policy(policy, num_layers, getattr(backbone, "hidden_size", None))
        points = policy.exit_points
        self.check_layers = frozenset(
            i for i in range(policy.min_exit_layer, num_layers) if points is None or i in points
        )
        measure = policy.measure
        self.classifier = measure if isinstance(measure, ExitClassifier) else None
        self.name = None if self.classifier is not None else str(measure)
        if self.classifier is not None:
            param = next(self.classifier.parameters())
            device = next(backbone.parameters()).device  # type: ignore[attr-defined]
            if param.device != device:
                self.classifier.to(device)
            self.classifier.eval()
        # Which layers must be observed even when they cannot exit:
        self.every_layer = self.name in _HISTORY_MEASURES or isinstance(
            self.classifier, ThreeStateMLP | LSTMClassifier
        )
        self.needs_logits = self.name is not None and self.name != "hidden_saturation"

    # --- per step ------------------------------------------------------------------------------
    def begin(self, positions: Tensor, h0: Tensor) -> None:
        """positions: `(B,)` 1-based decoding position t of each row's token; h0: `(B, d)` its input state."""
        policy = self.policy
        if policy is None:
            return
        size = positions.shape[0]
        self.thresholds = (
            None
            if policy.is_boolean
            else resolve_threshold(policy.threshold, self.num_layers, size, positions.cpu()).to(h0.device)
        )
        # h_{i-1} and h_{i-2}: saturation compares layer 1 with the input state h0; the three-state MLP
        # reads zeros below layer 1 (as ThreeStateMLP.stack_states does on records)
        self.prev = h0 if self.name == "hidden_saturation" else torch.zeros_like(h0)
        self.prev2 = torch.zeros_like(h0)
        self.history: list[tuple[Tensor, Tensor]] = []  # per layer: (predictions (B,), top2 (B, 2))
        if isinstance(self.classifier, LSTMClassifier):
            lstm = self.classifier.lstm
            zeros = h0.new_zeros((lstm.num_layers, size, lstm.hidden_size))
            self.lstm_state = (zeros, zeros.clone())

    def wants(self, layer: int) -> bool:
        """Whether :meth:`observe` must see this layer (a check, or history a later check reads)."""
        if self.policy is None:
            return False
        if layer in self.check_layers or self.every_layer:
            return True
        return self.name == "hidden_saturation" and layer + 1 in self.check_layers  # h_{i-1} of a check

    @torch.no_grad()
    def observe(self, layer: int, h: Tensor, rows: Tensor | None) -> Tensor | None:
        """States `h (n, d)` after `layer` of the rows `rows` (`(n,)`, None = all B rows).

        Returns `(n,)` bool, True where the token exits here, or None when this layer cannot exit.
        When the measure computed the exit head, its logits stay in `last_logits` `(n, V)` (the
        exiting tokens need not recompute them).
        """
        self.last_logits = None
        if not self.wants(layer):
            return None
        check = layer in self.check_layers
        name, clf = self.name, self.classifier

        def take(x: Tensor) -> Tensor:
            return x if rows is None else x[rows]

        def store(full: Tensor, part: Tensor) -> Tensor:
            if rows is None:
                return part
            full = full.clone()
            full[rows] = part
            return full

        scores: Tensor | None = None
        if clf is not None:
            if isinstance(clf, LSTMClassifier):
                state = tuple(take_dim1(s, rows) for s in self.lstm_state)
                out, (hn, cn) = clf.lstm(clf._check_hidden(h[None]).transpose(0, 1), state)
                self.lstm_state = tuple(put_dim1(s, rows, new) for s, new in zip(self.lstm_state, (hn, cn), strict=False))
                logits = clf.head(out[:, 0])
            elif isinstance(clf, ThreeStateMLP):
                x = torch.cat([take(self.prev2), take(self.prev), h], dim=-1)
                logits = clf(x.to(next(clf.parameters()).dtype))
            else:
                logits = clf(h.to(next(clf.parameters()).dtype))
            if check:
                scores = torch.softmax(logits.float(), dim=-1)[..., EXIT_INDEX]
        elif name == "hidden_saturation":
            if check:
                rec = ExitRecords(hidden=h[None], h0=take(self.prev))
                scores = compute_measure(name, rec)[0]
        elif name in _HISTORY_MEASURES:
            logits = self.backbone.exit_logits(h)  # type: ignore[attr-defined]
            self.last_logits = logits
            pred, top2, _ = summarize_logits(logits)
            self.history.append((store(self._hist_fill(), pred), store(self._hist_fill(2), top2)))
            if check:
                preds = torch.stack([p for p, _ in self.history])
                tops = torch.stack([t for _, t in self.history])
                if rows is not None:
                    preds, tops = preds[:, rows], tops[:, rows]
                rec = ExitRecords(predictions=preds, top2=tops)
                return compute_measure(name, rec, **self.policy.measure_kwargs)[-1]  # type: ignore[union-attr]
            return None
        else:
            logits = self.backbone.exit_logits(h)  # type: ignore[attr-defined]
            self.last_logits = logits
            scores = compute_measure(name, ExitRecords(logits=logits[None]), **self.policy.measure_kwargs)[0]  # type: ignore[union-attr,arg-type]
        if self.every_layer or name == "hidden_saturation":  # keep h_{i-1}, h_{i-2} for the next layer
            self.prev2 = store(self.prev2, take(self.prev))
            self.prev = store(self.prev, h)
        if scores is None:
            return None
        thr = take(self.thresholds[layer - 1]).to(scores.dtype)  # type: ignore[index]
        return scores >= thr

    def _hist_fill(self, *trailing: int) -> Tensor:
        """A full-batch placeholder row of the history (rows not observed keep their earlier values)."""
        size = self.prev.shape[0]
        if self.history:
            last = self.history[-1][0 if not trailing else 1]
            return last
        shape = (size, *trailing)
        return torch.zeros(shape, dtype=torch.long if not trailing else torch.float32, device=self.prev.device)


def take_dim1(x: Tensor, rows: Tensor | None) -> Tensor:
    return x if rows is None else x[:, rows]


def put_dim1(full: Tensor, rows: Tensor | None, part: Tensor) -> Tensor:
    if rows is None:
        return part
    full = full.clone()
    full[:, rows] = part
    return full


def check_policy(policy: ExitPolicy, num_layers: int, hidden_size: int | None) -> None:
    """A policy made for another model fails here, naming what differs."""
    if policy.min_exit_layer > num_layers:
        raise ConfigError(
            f"decoding.policy.min_exit_layer={policy.min_exit_layer} exceeds the model's {num_layers} layers; "
            f"allowed: 1..{num_layers}"
        )
    if policy.exit_points is not None and policy.exit_points[-1] > num_layers:
        raise ConfigError(
            f"decoding.policy.exit_points={list(policy.exit_points)} exceed the model's {num_layers} layers"
        )
    clf = policy.measure
    if isinstance(clf, ExitClassifier) and hidden_size is not None and clf.hidden_size != hidden_size:
        raise ConfigError(
            f"decoding.policy: the {clf.kind} exit classifier reads hidden size {clf.hidden_size}, "
            f"but the model has hidden size {hidden_size}"
        )
    if isinstance(clf, str):
        get_measure(clf)


class ScheduledExits:
    """Exit layers fixed in advance: `fixed:K` (every token at layer K) or `random:MEAN` (a seeded
    per-token draw, uniform on 1..2*MEAN-1, clipped to the depth: its mean is MEAN when 2*MEAN-1 <= L)."""

    def __init__(self, spec: str, num_layers: int, seed: int = 0) -> None:
        match = re.fullmatch(r"(fixed|random):(\d+(?:\.\d+)?)", spec)
        if match is None:
            raise ConfigError(f"exits={spec!r}: allowed forms are fixed:K and random:MEAN (e.g. fixed:4, random:4)")
        self.kind, value = match.group(1), float(match.group(2))
        if not 1 <= value <= num_layers:
            raise ConfigError(f"exits={spec!r}: {value:g} outside 1..{num_layers} (the model's layers)")
        self.value, self.num_layers, self.spec = value, num_layers, spec
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, size: int) -> Tensor:
        """`(size,)` exit layers for one step's tokens."""
        if self.kind == "fixed":
            return torch.full((size,), int(self.value), dtype=torch.long)
        top = max(1, round(2 * self.value - 1))
        return torch.randint(1, top + 1, (size,), generator=self.generator).clamp_max(self.num_layers)


def describe(policy: ExitPolicy | ScheduledExits | None) -> str:
    """A short label: `full`, `fixed:4`, `softmax_gap:0.9`, `classifier:lstm:0.7`."""
    if policy is None:
        return "full"
    if isinstance(policy, ScheduledExits):
        return policy.spec
    from eetrain.exits.thresholds import describe_threshold

    thr = describe_threshold(policy.threshold)
    label = policy.label
    if policy.is_boolean:
        kwargs = ",".join(f"{k}={v}" for k, v in policy.measure_kwargs.items())
        return f"{label}({kwargs})" if kwargs else label
    return f"{label}:{thr:g}" if isinstance(thr, float) else f"{label}:{thr}"
