"""FREE's adaptive threshold while decoding a split (`decoding.adaptive_threshold`).

FREE needs no calibration set: as it decodes, it gathers (confidence, shallow prediction == deep
prediction) pairs and refits a Beta mixture (`eetrain.exits.beta_mixture`) before each new input,
up to 300 times; the next inputs decode at the threshold it gives. FREE reads the deep predictions
of exited tokens off its synchronized parallel pass, and so does `strategy=parallel` here
(`generate(..., agreement=True)`: a check's score and prediction are kept until the token's last layer
runs, for itself or in the deep pass of a later token of its row; costs a head product per deep pass).
`copy` never runs an exited token's deep layers, so there the pairs come from one teacher-forced pass of
the full model over each decoded batch (prompt + output) while updates remain. Either way the cost is
early exit's (`adaptive_seconds` in the summary: refits, and the passes with `copy`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from eetrain.errors import ConfigError, check_keys, positive_int
from eetrain.exits.beta_mixture import PRIORS, agreement_pairs, estimate_threshold
from eetrain.exits.classifiers import ExitClassifier
from eetrain.exits.measures import ExitRecords
from eetrain.exits.policy import ExitPolicy
from eetrain.exits.record import record_exits

from .decisions import with_check_every
from .flops import FlopCount
from .generate import GenerateOutput, generate

KEY = "decoding.adaptive_threshold"


@dataclass(frozen=True)
class AdaptiveSettings:
    """FREE's defaults: posterior of agreement >= zeta, 10 grid points on [0.3, 0.9], 300 refits."""

    zeta: float = 0.4
    low: float = 0.3
    high: float = 0.9
    points: int = 10
    max_updates: int = 300
    prior: str = "equal"


def adaptive_settings(node: Any) -> AdaptiveSettings | None:
    """`decoding.adaptive_threshold`: null or false (off), true (FREE's defaults) or a mapping of
    :class:`AdaptiveSettings` fields."""
    if node is None or node is False:
        return None
    if node is True:
        return AdaptiveSettings()
    if not isinstance(node, Mapping):
        raise ConfigError(f"{KEY}={node!r}; allowed: null, true or a mapping of {list(AdaptiveSettings.__dataclass_fields__)}")
    check_keys(node, set(AdaptiveSettings.__dataclass_fields__), KEY)
    out = AdaptiveSettings(**node)
    for name in ("zeta", "low", "high"):
        value = getattr(out, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < value < 1.0:
            raise ConfigError(f"{KEY}.{name}={value!r}; allowed: a number in (0, 1)")
    if not out.low < out.high:
        raise ConfigError(f"{KEY}: low={out.low} must lie below high={out.high} (the threshold grid [low, high])")
    points = positive_int(out.points, f"{KEY}.points")
    if points < 2:
        raise ConfigError(f"{KEY}.points={points}; allowed: an integer >= 2 (grid points on [low, high])")
    positive_int(out.max_updates, f"{KEY}.max_updates")
    if out.prior not in PRIORS:
        raise ConfigError(f"{KEY}.prior={out.prior!r}; allowed: {', '.join(PRIORS)} (equal: FREE's code)")
    return out


def decoded_records(backbone: Any, batch: Mapping[str, Tensor], out: GenerateOutput, policy: ExitPolicy) -> ExitRecords:
    """Per-layer records of the generated tokens of `out`, from one teacher-forced pass of the full
    model over each row's prompt (`batch`'s unpadded `input_ids`) and output. Tokens as in `out`: row
    by row, `out.lengths[r]` each (a row with no token adds none)."""
    ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu().bool()
    examples = [
        {"source_ids": ids[r][mask[r]].tolist(), "target_ids": seq}
        for r, seq in enumerate(out.sequences()) if seq
    ]
    if not examples:
        return ExitRecords(predictions=torch.zeros((backbone.num_layers, 0), dtype=torch.long))
    device = next(backbone.parameters()).device
    collated = {k: v.to(device) for k, v in backbone.collate(examples).items()}
    return record_exits(
        backbone, [collated], store_hidden=isinstance(policy.measure, ExitClassifier), features=policy.features or "raw"
    )


@dataclass
class AdaptiveThreshold:
    """The pairs gathered so far and the threshold they give (FREE refits on all of them)."""

    settings: AdaptiveSettings
    confidence: list[Tensor]
    agree: list[Tensor]
    thresholds: list[float | None]

    @classmethod
    def start(cls, settings: AdaptiveSettings) -> AdaptiveThreshold:
        return cls(settings, [], [], [])

    @property
    def updating(self) -> bool:
        return len(self.thresholds) < self.settings.max_updates

    @property
    def current(self) -> float | None:
        return next((t for t in reversed(self.thresholds) if t is not None), None)

    @property
    def num_pairs(self) -> int:
        return sum(c.numel() for c in self.confidence)

    def update(self, confidence: Tensor, agree: Tensor) -> float | None:
        """Add pairs and refit on all so far: the new threshold (the base of a decaying one), or None
        (keep the current one) while a class has too few pairs to fit."""
        self.confidence.append(confidence)
        self.agree.append(agree)
        s = self.settings
        value = estimate_threshold(torch.cat(self.confidence), torch.cat(self.agree), zeta=s.zeta, low=s.low,
                                   high=s.high, points=s.points, prior=s.prior)
        self.thresholds.append(value)
        return value


def adaptive_generate(
    backbone: Any, batch: Mapping[str, Tensor], policy: ExitPolicy, estimator: AdaptiveThreshold,
    **kwargs: Any,
) -> tuple[GenerateOutput, ExitPolicy, float]:
    """`generate` one batch at `policy`'s threshold, then, while the estimator updates, add the batch's pairs
    and refit. Returns the output, the policy for the next batch (at the new threshold, the base of a
    decaying one) and the estimator's seconds beyond decoding (refit; with `copy`, the teacher-forced pass)."""
    updating = estimator.updating
    parallel = kwargs.get("strategy", "copy") == "parallel"
    out = generate(backbone, batch, policy, **kwargs, agreement=updating and parallel)
    if not updating:
        return out, policy, 0.0
    start = time.perf_counter()
    checked = with_check_every(policy, kwargs.get("check_every"), backbone.num_layers)
    value = estimator.update(*batch_pairs(backbone, batch, out, checked))
    if value is not None:
        policy = policy.with_base_threshold(value)
    return out, policy, time.perf_counter() - start


def count_adaptive(
    backbone: Any, batch: Mapping[str, Tensor], policy: ExitPolicy, updating: bool, **kwargs: Any,
) -> GenerateOutput:
    """One batch's :func:`adaptive_generate` decode again at the `policy` it used, its FLOPs counted
    (`generate(..., count_flops=True)`), the estimator's work included while it was `updating` (as its time
    is early exit's): `parallel`'s agreement pairs (a head product per deep pass); `copy`'s teacher-forced
    pass, added to the output's `flops`. Decodes only: the estimator does not refit."""
    parallel = kwargs.get("strategy", "copy") == "parallel"
    out = generate(backbone, batch, policy, **kwargs, agreement=updating and parallel, count_flops=True)
    if updating and not parallel and out.num_tokens:
        with FlopCount() as counter:
            decoded_records(backbone, batch, out, policy)
        out.flops += counter.total
    return out


def batch_pairs(backbone: Any, batch: Mapping[str, Tensor], out: GenerateOutput, policy: ExitPolicy) -> tuple[Tensor, Tensor]:
    """The pairs of the checks one batch decoded with `policy` (`check_every` applied) made: read off
    decoding when it collected them (`generate(..., agreement=True)`, parallel), else from
    :func:`decoded_records` at the layers each token was checked at (up to its exit)."""
    if out.agreement is not None:
        return out.agreement.confidence, out.agreement.agree
    if out.num_tokens == 0:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool)
    exits = out.exit_layers[out.exit_layers > 0]  # the records' tokens, row by row
    return agreement_pairs(policy, decoded_records(backbone, batch, out, policy), exit_layers=exits)
