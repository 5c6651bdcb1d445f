"""Exit decisions taken layer by layer while decoding, from what has been computed so far.

`eetrain.exits` scores whole records `(L, N)` after the fact; a decoder must decide at layer i with
only h_1..h_i. :class:`LayerDecider` keeps, per batch row, the little state each rule needs across
layers (the previous hidden state for saturation, the last two for the three-state MLP, the LSTM's
(h, c), the per-layer argmax / top-2 history for patience and the monotonic rule) and scores the
layer through the same registered measures and classifiers, so a decoded exit layer equals
`eetrain.exits.policy.exit_layers` on the same states (tested). Classifiers and saturation read the
states in the policy's feature space (`ExitPolicy.features`, `exit.features`): the residual stream as
it is (`raw`) or through the family's final norm (`normed`), as `record_exits` records them.

:class:`ScheduledExits` is the other kind of decider: exit layers fixed in advance (`fixed:K`,
`random:MEAN`), for benchmarks and exactness tests; deciding costs nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from eetrain.errors import ConfigError
from eetrain.exits.classifiers import EXIT_INDEX, ExitClassifier, LSTMClassifier, ThreeStateMLP
from eetrain.exits.measures import (
    ExitRecords,
    _full,
    compute_measure,
    cosine,
    entropy_score,
    get_measure,
    normalized_entropy_score,
    softmax_gap,
    softmax_max,
    summarize_logits,
)
from eetrain.exits.policy import ExitPolicy
from eetrain.exits.thresholds import resolve_threshold

# measures whose score at layer i reads earlier layers' predictions or probabilities
_HISTORY_MEASURES = ("patience", "monotonic")
# the registered scores of one layer's logits `(1, n, V)`, called directly (no record to build)
_MEASURE_FNS = {
    "softmax_gap": softmax_gap,
    "softmax_max": softmax_max,
    "entropy": entropy_score,
    "normalized_entropy": normalized_entropy_score,
}
CANDIDATE_MEASURES = tuple(_MEASURE_FNS)


def schedule_for(policy: ExitPolicy | None, schedule: Mapping[str, Any]) -> dict[str, Any]:
    """`generate`'s check-schedule keywords for one of several swept policies: `candidates` (top-k scoring
    of softmax-type checks) only for the measures it applies to, so a curve or an online calibration over
    softmax measures and classifiers alike uses it where it can (a single decoding policy is checked)."""
    if policy is not None and isinstance(policy.measure, str) and policy.measure in CANDIDATE_MEASURES:
        return dict(schedule)
    return {k: v for k, v in schedule.items() if k != "candidates"}


class LayerDecider:
    """An :class:`ExitPolicy` evaluated incrementally over the layers of one decoding step.

    Per step: :meth:`begin` with the rows' decoding positions and their input states h_0; then
    :meth:`observe` once per computed layer, in order, for the rows whose token is still deciding.

    candidates: for `softmax_gap` / `softmax_max` / `entropy` / `normalized_entropy`, score later
    checks on a small candidate set (see :meth:`_candidate_logits`) instead of the whole vocabulary.
    """

    def __init__(
        self, policy: ExitPolicy | None, backbone: object, num_layers: int, candidates: int | None = None
    ) -> None:
        self.policy = policy
        self.backbone = backbone
        self.num_layers = num_layers
        self.last_logits: Tensor | None = None
        self.last_candidates: Tensor | None = None
        self.checks = 0  # (row, layer) checks scored, for the cost per check
        self.last_scores: Tensor | None = None  # the last decide()'s (n,) scores
        self.candidates = None
        if policy is None:
            self.check_layers: frozenset[int] = frozenset()
            self.observed: frozenset[int] = frozenset()
            return
        check_policy(policy, num_layers, getattr(backbone, "hidden_size", None))
        points = policy.exit_points
        self.check_layers = frozenset(
            i for i in range(policy.min_exit_layer, num_layers) if points is None or i in points
        )
        self.first_check = min(self.check_layers, default=None)
        measure = policy.measure
        self.classifier = measure if isinstance(measure, ExitClassifier) else None
        self.name = None if self.classifier is not None else str(measure)
        if candidates is not None:
            vocab = backbone.head_weight.shape[0]  # type: ignore[attr-defined]
            # one candidate has no runner-up and always all the probability: every check would pass
            if isinstance(candidates, bool) or not isinstance(candidates, int) or not 2 <= candidates <= vocab:
                raise ConfigError(
                    f"decoding.policy.candidates={candidates!r}; allowed: an integer in 2..{vocab} (the vocabulary)"
                )
            if self.name not in CANDIDATE_MEASURES:
                raise ConfigError(
                    f"decoding.policy.candidates applies to {', '.join(CANDIDATE_MEASURES)}, not {policy.label!r}"
                )
            self.candidates = candidates
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
        # PABEE's regression patience: the history keeps each layer's score r_i, not an argmax
        self.scores_history = self.name == "patience" and policy.measure_kwargs.get("tolerance") is not None
        outputs = int(backbone.head_weight.shape[0]) if self.scores_history else 1  # type: ignore[attr-defined]
        if outputs != 1:
            raise ConfigError(f"policy {policy.label!r}: kwargs.tolerance compares a regression head's scores, and "
                              f"this head has {outputs} outputs: drop the tolerance (patience then compares the argmax)")
        self.three_states = isinstance(self.classifier, ThreeStateMLP)
        self.keeps_states = self.three_states or self.name == "hidden_saturation"
        # the states classifiers / saturation read: final-normed ones for features=normed
        self.normed = policy.features == "normed" and (self.classifier is not None or self.name == "hidden_saturation")
        self.clf_dtype = next(self.classifier.parameters()).dtype if self.classifier is not None else None
        self.observed = frozenset(i for i in range(1, num_layers + 1) if self.wants(i))

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
            # float32, as the scores are (and as exit_layers compares them)
            else resolve_threshold(policy.threshold, self.num_layers, size, positions.cpu(), dtype=torch.float32).to(
                h0.device
            )
        )
        # decide() compares on the host on the CPU (a view of the same values: no copy)
        on_cpu = h0.device.type == "cpu"
        self.host_thresholds = self.thresholds.numpy() if on_cpu and self.thresholds is not None else None
        # h_{i-1} and h_{i-2}: saturation compares layer 1 with the input state h0; the three-state MLP
        # reads zeros below layer 1 (as ThreeStateMLP.stack_states does on records)
        if self.normed:
            h0 = self.backbone.final_norm(h0)  # type: ignore[attr-defined]
        self.prev = h0 if self.name == "hidden_saturation" else torch.zeros_like(h0)
        self.prev2 = torch.zeros_like(h0)
        self.history: list[tuple[Tensor, Tensor]] = []  # per layer: (predictions (B,), top2 (B, 2))
        if self.candidates is not None:
            self.cand = torch.zeros((size, self.candidates), dtype=torch.long, device=h0.device)
        if isinstance(self.classifier, LSTMClassifier):
            lstm = self.classifier.lstm
            zeros = h0.new_zeros((lstm.num_layers, size, lstm.hidden_size))
            self.lstm_state = [zeros.to(self.clf_dtype), zeros.clone().to(self.clf_dtype)]

    def wants(self, layer: int) -> bool:
        """Whether :meth:`observe` must see this layer (a check, or history a later check reads)."""
        if self.policy is None:
            return False
        if layer in self.check_layers or self.every_layer:
            return True
        return self.name == "hidden_saturation" and layer + 1 in self.check_layers  # h_{i-1} of a check

    def _candidate_logits(self, layer: int, h: Tensor, rows: Tensor | None) -> Tensor:
        """Logits `(n, k)` of each row's candidate tokens only: a `k x d` product instead of `V x d`.

        The candidates are the top-k tokens of the row's first check, which saw the whole vocabulary.
        A softmax over them approximates the full softmax *renormalised to those k tokens*: exact when
        the probability outside them is negligible, overconfident when a later layer moves mass to a
        token outside the set (with k = V it is the full-vocabulary measure)."""
        bb = self.backbone
        cand = self.cand if rows is None else self.cand[rows]
        full_weight, bias = bb.head_params(layer)  # type: ignore[attr-defined]
        weight = full_weight[cand]  # (n, k, d)
        logits = torch.einsum("nd,nkd->nk", bb.exit_features(h, layer).to(weight.dtype), weight)  # type: ignore[attr-defined]
        return logits if bias is None else logits + bias[cand]

    @property
    def needs_logits(self) -> bool:
        """Whether the measure reads the exit head's logits (else only hidden states)."""
        return self.name in _HISTORY_MEASURES or self.name in _MEASURE_FNS

    @torch.no_grad()
    def observe(self, layer: int, h: Tensor, rows: Tensor | None, logits: Tensor | None = None) -> Tensor | None:
        """States `h (n, d)` after `layer` of the rows `rows` (`(n,)`, None = all B rows).

        logits: `(n, V)` exit logits of these rows at `layer` when the caller has them (a sequence head
        pools a whole sequence, not the one state per row in `h`); else the measure applies the exit
        head to `h` where it needs logits (`needs_logits`).

        Returns `(n,)` bool, True where the token exits here, or None when this layer cannot exit.
        When the measure computed the exit head, its logits stay in `last_logits` `(n, V)` (the
        exiting tokens need not recompute them); with candidates, `last_logits` is `(n, k)` over the
        token ids in `last_candidates` `(n, k)`.
        """
        scores = self._score(layer, h, rows, logits)
        if scores is None or self.thresholds is None:  # a boolean rule decides itself
            return scores
        return self._compare(layer, scores, rows)

    @torch.no_grad()
    def decide(self, layer: int, h: Tensor, rows: Tensor | None, logits: Tensor | None = None) -> np.ndarray | None:
        """:meth:`observe`'s decisions as a host `(n,)` bool array, for a decoder that must know them to
        stop its layer loop. On the CPU the scores are compared with the thresholds on the host: a
        tensor operation costs tens of microseconds right after a layer has streamed its weights
        through the caches, the host comparison of a few floats almost nothing (same float32 values,
        same result). On an accelerator: compared there, one transfer."""
        scores = self.last_scores = self._score(layer, h, rows, logits)
        if scores is None:
            return None
        if self.host_thresholds is None:  # a boolean rule, or an accelerator
            return (scores if self.thresholds is None else self._compare(layer, scores, rows)).cpu().numpy()
        thresholds = self.host_thresholds[layer - 1]
        return scores.numpy() >= (thresholds if rows is None else thresholds[rows.numpy()])

    def _compare(self, layer: int, scores: Tensor, rows: Tensor | None) -> Tensor:
        """`(n,)` bool: scores at or above the rows' thresholds at `layer`."""
        thresholds = self.thresholds[layer - 1]
        return scores >= (thresholds if rows is None else thresholds[rows])

    def _score(self, layer: int, h: Tensor, rows: Tensor | None, logits: Tensor | None) -> Tensor | None:
        """The measure's `(n,)` float32 scores at `layer` (a boolean rule: its `(n,)` bool decisions), or
        None when this layer cannot exit; keeps the state later layers read."""
        self.last_logits = self.last_candidates = None
        if layer not in self.observed:
            return None
        check = layer in self.check_layers
        name, clf = self.name, self.classifier
        if check:
            self.checks += h.shape[0]

        def take(x: Tensor) -> Tensor:
            return x if rows is None else x[rows]

        def store(full: Tensor, part: Tensor) -> Tensor:
            if rows is None:
                return part
            full = full.clone()
            full[rows] = part
            return full

        scores: Tensor | None = None
        if self.normed:  # classifier or saturation in the final-normed space (exit logits still use h)
            h = self.backbone.final_norm(h)  # type: ignore[attr-defined]
        if clf is not None:
            x = h if h.dtype == self.clf_dtype else h.to(self.clf_dtype)
            if isinstance(clf, LSTMClassifier):
                state = [take_dim1(s, rows) for s in self.lstm_state]
                out, state = lstm_step(clf, x, state)
                self.lstm_state = [put_dim1(s, rows, new) for s, new in zip(self.lstm_state, state, strict=True)]
                logits = clf.head(out)
            elif isinstance(clf, ThreeStateMLP):
                # the kept states are in the model's dtype: a float64 model with a float32 classifier
                logits = clf(torch.cat([take(self.prev2), take(self.prev), h], dim=-1).to(self.clf_dtype))
            else:
                logits = clf(x)
            if check:
                scores = torch.softmax(logits.float(), dim=-1)[..., EXIT_INDEX]
        elif name == "hidden_saturation":
            if check:  # as the registered measure computes it: cos(h_i, h_{i-1}) in float32
                scores = cosine(_full(h), take(self.prev).to(_full(h).dtype))
        elif name in _HISTORY_MEASURES:
            if logits is None:
                logits = self.backbone.exit_logits(h, layer)  # type: ignore[attr-defined]
            self.last_logits = logits
            if self.scores_history:  # a regression head: (n, 1) scores, no distribution to summarise
                pred, top2 = logits[:, 0].float(), logits.new_zeros((logits.shape[0], 2), dtype=torch.float32)
            else:
                pred, top2, _ = summarize_logits(logits)
            self.history.append((store(self._hist_fill(pred, 0), pred), store(self._hist_fill(top2, 1), top2)))
            if check:
                preds = torch.stack([p for p, _ in self.history])
                tops = torch.stack([t for _, t in self.history])
                if rows is not None:
                    preds, tops = preds[:, rows], tops[:, rows]
                rec = ExitRecords(logits=preds[..., None]) if self.scores_history else ExitRecords(predictions=preds, top2=tops)
                return compute_measure(name, rec, **self.policy.measure_kwargs)[-1]  # type: ignore[union-attr]
            return None
        elif self.candidates is not None and layer != self.first_check:
            logits = self._candidate_logits(layer, h, rows)
            self.last_logits, self.last_candidates = logits, take(self.cand)
            scores = _MEASURE_FNS[name](logits[None])[0]
        else:
            if logits is None:
                logits = self.backbone.exit_logits(h, layer)  # type: ignore[attr-defined]
            self.last_logits = logits
            scores = _MEASURE_FNS[name](logits[None])[0]  # type: ignore[index]
            if self.candidates is not None:
                self.cand = store(self.cand, logits.topk(self.candidates, dim=-1).indices)
        if self.keeps_states:  # h_{i-1}, h_{i-2} for the next layer
            if self.three_states:
                self.prev2 = store(self.prev2, take(self.prev))
            self.prev = store(self.prev, h)
        return scores

    def _hist_fill(self, like: Tensor, index: int) -> Tensor:
        """A full-batch placeholder for entry `index` of a history step (0: predictions, 1: top-2), shaped
        and typed as `like (n, ...)`: rows not observed keep their earlier values."""
        if self.history:
            return self.history[-1][index]
        # `like`'s dtype: top-2 probabilities are float64 for a float64 model, float32 otherwise
        return like.new_zeros((self.prev.shape[0], *like.shape[1:]))


def lstm_step(clf: LSTMClassifier, x: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """One step of the classifier's `nn.LSTM` (batch-first, unidirectional) on `x (n, d)`, written out
    with its own weights: on a single step `nn.LSTM`'s call costs several times the arithmetic.
    state: `[h (layers, n, hidden), c (layers, n, hidden)]`. Returns the top layer's output `(n, hidden)`
    and the new state (PyTorch's gate order: input, forget, cell, output)."""
    lstm = clf.lstm
    hs, cs = state
    new_h, new_c = [], []
    for i in range(lstm.num_layers):
        gates = F.linear(x, getattr(lstm, f"weight_ih_l{i}"), getattr(lstm, f"bias_ih_l{i}"))
        gates = gates + F.linear(hs[i], getattr(lstm, f"weight_hh_l{i}"), getattr(lstm, f"bias_hh_l{i}"))
        ig, fg, gg, og = gates.chunk(4, dim=-1)
        c = torch.sigmoid(fg) * cs[i] + torch.sigmoid(ig) * torch.tanh(gg)
        x = torch.sigmoid(og) * torch.tanh(c)
        new_h.append(x)
        new_c.append(c)
    return x, [torch.stack(new_h), torch.stack(new_c)]


def take_dim1(x: Tensor, rows: Tensor | None) -> Tensor:
    return x if rows is None else x[:, rows]


def put_dim1(full: Tensor, rows: Tensor | None, part: Tensor) -> Tensor:
    if rows is None:
        return part
    full = full.clone()
    full[:, rows] = part
    return full


def with_check_every(policy: ExitPolicy, every: int | None, num_layers: int) -> ExitPolicy:
    """The policy checked only at every `every`-th layer from its minimum exit layer (within its exit
    points): as exit points, so the offline policy table and the decoder agree on where checks run."""
    if every is None or every == 1:
        return policy
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigError(f"decoding.policy.check_every={every!r}; allowed: an integer >= 1")
    start = policy.min_exit_layer
    layers = [i for i in range(start, num_layers + 1) if (i - start) % every == 0]
    if policy.exit_points is not None:
        checked = layers
        layers = [i for i in layers if i in policy.exit_points]
        if not layers:  # (falling back to the last layer alone would switch early exit off unsaid)
            raise ConfigError(
                f"decoding.policy.check_every={every} checks layers {checked} (every {every}-th from "
                f"min_exit_layer={start}), none of them an exit point {sorted(policy.exit_points)}; choose a "
                "check_every or min_exit_layer that meets an exit point, or check_every=null"
            )
    return replace(policy, exit_points=tuple(layers), measure_kwargs=dict(policy.measure_kwargs))


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
    values = getattr(policy.threshold, "values", None)  # a per-layer threshold: one value per layer
    if values is not None and len(values) != num_layers:
        raise ConfigError(
            f"decoding.policy.threshold has {len(values)} values, one per layer is needed: the model has "
            f"{num_layers} layers (the last one's value is never read: every token leaves there)"
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
    per-token draw, uniform on 1..2*MEAN-1, whose mean is MEAN: 2*MEAN-1 must be a whole number of
    layers no deeper than the model, so MEAN is one of 1, 1.5, ..., (L+1)/2)."""

    def __init__(self, spec: str, num_layers: int, seed: int = 0) -> None:
        match = re.fullmatch(r"(fixed|random):(\d+(?:\.\d+)?)", spec)
        if match is None:
            raise ConfigError(f"exits={spec!r}: allowed forms are fixed:K and random:MEAN (e.g. fixed:4, random:4)")
        self.kind, value = match.group(1), float(match.group(2))
        if not 1 <= value <= num_layers:
            raise ConfigError(f"exits={spec!r}: {value:g} outside 1..{num_layers} (the model's layers)")
        if self.kind == "fixed" and not value.is_integer():
            raise ConfigError(f"exits={spec!r}: fixed:K exits every token at layer K, a whole layer in 1..{num_layers}")
        # A draw clipped at L, or a range rounded to whole layers, would have a mean other than MEAN, and
        # whatever reports the spec (benchmark rows, labels) would claim the wrong mean exit.
        if self.kind == "random" and (not (2 * value - 1).is_integer() or 2 * value - 1 > num_layers):
            raise ConfigError(
                f"exits={spec!r}: random:MEAN draws uniform on 1..2*MEAN-1, which must be a whole number of layers "
                f"<= {num_layers}; allowed MEAN: 1 to {(num_layers + 1) / 2:g} in steps of 0.5"
            )
        self.value, self.num_layers, self.spec = value, num_layers, spec
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, size: int) -> Tensor:
        """`(size,)` exit layers for one step's tokens."""
        if self.kind == "fixed":
            return torch.full((size,), int(self.value), dtype=torch.long)
        top = int(2 * self.value - 1)  # a whole number <= num_layers (checked in __init__)
        return torch.randint(1, top + 1, (size,), generator=self.generator)


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
