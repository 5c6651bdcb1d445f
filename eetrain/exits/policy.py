"""Exit policies: which layer each token exits at, how good that is, and sweeps over thresholds.

An :class:`ExitPolicy` names a measure (or holds an exit classifier), a threshold and a minimum
exit layer.  :func:`exit_layers` returns, per token, the first layer ``i >= min_exit_layer`` where
the exit rule fires (``score >= threshold`` or a boolean rule), and ``L`` if it never fires.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from eetrain.files import atomic_file

from .classifiers import ExitClassifier, check_features, exit_probabilities
from .measures import ExitRecords, compute_measure, get_measure, to_preds
from .thresholds import (
    DecayingThreshold,
    describe_threshold,
    make_threshold,
    resolve_threshold,
    validate_threshold,
)

__all__ = [
    "ExitPolicy",
    "policy_scores",
    "first_exit",
    "policy_first_exit",
    "exit_layers",
    "evaluate_policy",
    "deebert_expected_saving",
    "sweep",
    "POLICY_TABLE_COLUMNS",
    "write_policy_table",
    "plot_consistency_vs_exit",
]

POLICY_TABLE_COLUMNS: tuple[str, ...] = (
    "measure",
    "threshold",
    "min_exit_layer",
    "mean_exit_layer",
    "consistency",
    "accuracy",
    "expected_saving",
)


@dataclass
class ExitPolicy:
    """An exit rule.

    Attributes:
        measure: a registered measure name (see ``eetrain.exits.measures.MEASURES``) or an
            :class:`~eetrain.exits.classifiers.ExitClassifier` (score ``P(exit)`` on ``h_i``).
        threshold: for score measures: a number, a per-layer sequence/tensor ``(L,)``, a decaying
            spec ``{"lam", "N", "tau", "form"}`` or a ``ThresholdSpec``; ``None`` is allowed for a
            template (e.g. for :func:`sweep`) but :func:`exit_layers` then raises.  Must be ``None``
            for boolean measures (``patience``, ``monotonic``): set ``measure_kwargs`` instead.
            Normalised to a ``ThresholdSpec`` on construction and range-checked: probability-type
            measures (and classifiers) need ``[0, 1]``, ``hidden_saturation`` ``[-1, 1]``,
            ``entropy`` (score ``-H``) ``<= 0``.
        min_exit_layer: smallest layer (1-based) allowed to exit, ``>= 1``; checked against ``L``
            when records are seen (``> L`` raises).  Default 4 (CALM/MEE).
        measure_kwargs: keyword arguments of the measure, e.g. ``{"patience": 3}`` or
            ``{"min_confidence": 0.9}``.
        name: label for tables/plots; defaults to the measure name or the classifier kind.
        exit_points: the 1-based layers that carry an exit (``exits.layers``, e.g. ``(2, 4, 6, 8)``
            or FREE's ``(6, L)``); a token can only leave at one of them (and at ``L``).  ``None``:
            every layer.
        features: the space of the layer states a classifier or ``hidden_saturation`` reads:
            ``raw`` (residual streams, CALM) or ``normed`` (``backbone.final_norm``, FREE/MEE);
            ``exit.features``. ``None``: the classifier's own space (saved with it), else ``raw``.
            Records are recorded in one space (``record_exits(features=...)``); the decoder applies
            the policy's space to the states it hands the classifier or the cosine.
    """

    measure: str | nn.Module
    threshold: Any = None
    min_exit_layer: int = 4
    measure_kwargs: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    exit_points: tuple[int, ...] | None = None
    features: str | None = None

    def __post_init__(self) -> None:
        if self.features is not None:
            check_features(self.features, "features")
        if isinstance(self.measure, nn.Module):
            if not isinstance(self.measure, ExitClassifier):
                raise ValueError(
                    "a classifier measure must be an eetrain ExitClassifier (with record_logits)"
                )
            if self.features is not None and self.features != self.measure.features:
                raise ValueError(
                    f"features={self.features!r}, but the {self.measure.kind} classifier was trained on "
                    f"{self.measure.features} states"
                )
            self.features = self.measure.features
            if self.measure_kwargs:
                raise ValueError("measure_kwargs are not used with a classifier measure")
            kind, score_range = "score", (0.0, 1.0)
        else:
            spec = get_measure(self.measure)
            spec.validate_kwargs(self.measure_kwargs)
            kind, score_range = spec.kind, spec.score_range
            if self.features is None:
                self.features = "raw"
        if (
            isinstance(self.min_exit_layer, bool)
            or not isinstance(self.min_exit_layer, int)
            or self.min_exit_layer < 1
        ):
            raise ValueError(f"min_exit_layer must be an integer >= 1, got {self.min_exit_layer!r}")
        if self.exit_points is not None:
            points = tuple(self.exit_points)
            if (
                not points
                or any(isinstance(i, bool) or not isinstance(i, int) or i < 1 for i in points)
                or list(points) != sorted(set(points))
            ):
                raise ValueError(
                    f"exit_points must be ascending distinct integers >= 1, got {list(self.exit_points)}"
                )
            self.exit_points = points
        self.threshold = make_threshold(self.threshold)
        if kind == "bool":
            if self.threshold is not None:
                raise ValueError(
                    f"measure {self.measure!r} is a boolean rule and takes no threshold; "
                    f"use measure_kwargs (allowed: {list(get_measure(self.measure).params)})"  # type: ignore[arg-type]
                )
        else:
            validate_threshold(self.threshold, score_range, key="threshold")

    @property
    def label(self) -> str:
        """Name for tables/plots."""
        if self.name is not None:
            return self.name
        if isinstance(self.measure, ExitClassifier):
            return f"classifier:{self.measure.kind}"
        return str(self.measure)

    @property
    def is_boolean(self) -> bool:
        """True for rules without a threshold (``patience``, ``monotonic``)."""
        return isinstance(self.measure, str) and get_measure(self.measure).kind == "bool"

    def with_threshold(self, threshold: Any) -> ExitPolicy:
        """A copy with another threshold (validated)."""
        return replace(self, threshold=threshold, measure_kwargs=dict(self.measure_kwargs))

    def with_base_threshold(self, value: Any) -> ExitPolicy:
        """A copy for a swept value: a number replaces the *base* ``lam`` of a decaying threshold
        (keeping its decay), and the whole threshold otherwise."""
        if isinstance(self.threshold, DecayingThreshold) and isinstance(value, int | float):
            return self.with_threshold(replace(self.threshold, lam=float(value)))
        return self.with_threshold(value)

    def at_value(self, value: Any) -> ExitPolicy:
        """A copy at one swept or calibrated value: the threshold of a score measure (the base ``lam``
        of a decaying one, see :meth:`with_base_threshold`), the parameter of a boolean rule
        (``patience`` -> P, an integer; ``monotonic`` -> ``min_confidence``), validated."""
        if not self.is_boolean:
            return self.with_base_threshold(value)
        param = get_measure(self.measure).sweep_param  # type: ignore[arg-type]
        if param == "patience" and isinstance(value, float) and value.is_integer():
            value = int(value)  # calibration scans numbers as floats; P counts layers
        return replace(self, measure_kwargs={**self.measure_kwargs, param: value})


def _as_records(
    records: ExitRecords | None,
    hidden: Tensor | None,
    logits: Tensor | None,
    probs: Tensor | None,
    h0: Tensor | None,
    labels: Tensor | None,
) -> ExitRecords:
    if records is not None:
        if any(x is not None for x in (hidden, logits, probs, h0, labels)):
            raise ValueError("pass either records or the individual tensors, not both")
        return records
    return ExitRecords(hidden=hidden, logits=logits, probs=probs, labels=labels, h0=h0)


def _check_min_exit_layer(policy: ExitPolicy, num_layers: int) -> None:
    if policy.min_exit_layer > num_layers:
        raise ValueError(
            f"min_exit_layer={policy.min_exit_layer} exceeds the number of exit layers L={num_layers}"
        )
    if policy.exit_points is not None and policy.exit_points[-1] > num_layers:
        raise ValueError(f"exit_points {list(policy.exit_points)} exceed the number of exit layers L={num_layers}")


def policy_first_exit(policy: ExitPolicy, fires: Tensor) -> Tensor:
    """:func:`first_exit` with the policy's minimum exit layer and exit points."""
    return first_exit(fires, policy.min_exit_layer, policy.exit_points)


def policy_scores(policy: ExitPolicy, records: ExitRecords) -> Tensor:
    """The policy's raw ``(L, N)`` scores (float) or fires (bool), before thresholding."""
    if isinstance(policy.measure, ExitClassifier):
        if records.hidden is None:
            raise ValueError("a classifier measure needs hidden states in the records")
        return exit_probabilities(policy.measure, records.hidden).cpu()
    return compute_measure(policy.measure, records, **policy.measure_kwargs)  # type: ignore[arg-type]


def first_exit(
    fires: Tensor, min_exit_layer: int = 1, exit_points: Sequence[int] | None = None
) -> Tensor:
    """``(L, N)`` bool -> ``(N,)`` long: first 1-based layer ``i >= min_exit_layer`` that fires, else ``L``.

    With ``exit_points`` only those layers (and ``L``) can be exit layers.
    """
    num_layers = fires.shape[0]
    if not 1 <= min_exit_layer <= num_layers:
        raise ValueError(f"min_exit_layer={min_exit_layer} must lie in [1, L={num_layers}]")
    allowed = fires.clone()
    allowed[: min_exit_layer - 1] = False
    if exit_points is not None:
        carries = torch.zeros(num_layers, dtype=torch.bool, device=fires.device)
        carries[[i - 1 for i in exit_points if 1 <= i <= num_layers]] = True
        allowed &= carries[:, None]
    allowed[-1] = True  # the last layer always "exits"
    return allowed.long().argmax(dim=0) + 1  # argmax returns the first maximum


def _fires(
    policy: ExitPolicy, scores: Tensor, num_layers: int, num_tokens: int, positions: Tensor | None
) -> Tensor:
    if scores.dtype == torch.bool:
        return scores
    if policy.threshold is None:
        raise ValueError(f"policy {policy.label!r} has no threshold")
    thr = resolve_threshold(policy.threshold, num_layers, num_tokens, positions, dtype=scores.dtype)
    thr = thr.to(scores.device)
    return scores >= thr


def exit_layers(
    policy: ExitPolicy,
    records: ExitRecords | None = None,
    *,
    hidden: Tensor | None = None,
    logits: Tensor | None = None,
    probs: Tensor | None = None,
    h0: Tensor | None = None,
    positions: Tensor | None = None,
) -> Tensor:
    """Exit layer per token.

    Args:
        policy: the exit policy.
        records: an :class:`ExitRecords`, or pass ``hidden (L, N, d)``, ``logits (L, N, V)``,
            ``probs (L, N, V)``, ``h0 (N, d)`` directly.
        positions: ``(N,)`` 1-based decoding positions ``t``; needed (and used) by a decaying
            threshold.  Default: ``records.positions``.

    Returns:
        ``(N,)`` long: the first layer ``i >= min_exit_layer`` where the rule fires, ``L`` if never.
    """
    rec = _as_records(records, hidden, logits, probs, h0, None)
    if positions is None:
        positions = rec.positions
    num_layers, num_tokens = rec.num_layers, rec.num_tokens
    _check_min_exit_layer(policy, num_layers)
    scores = policy_scores(policy, rec)
    return policy_first_exit(policy, _fires(policy, scores, num_layers, num_tokens, positions))


def evaluate_policy(
    exit_layer: Tensor,
    logits_or_preds: Tensor,
    labels: Tensor | None = None,
    L: int | None = None,  # noqa: N803
) -> dict[str, float | int | None]:
    """Quality and cost of per-token exit layers.

    Args:
        exit_layer: ``(N,)`` 1-based exit layer per token.
        logits_or_preds: ``(L, N, V)`` logits/probs or ``(L, N)`` integer predictions per layer.
        labels: ``(N,)`` gold labels or ``None``; tokens with ``-100`` are dropped from *every*
            statistic (they are padding).
        L: number of exit layers (inferred from ``logits_or_preds`` if ``None``; must agree).

    Returns:
        ``mean_exit_layer``; ``consistency`` (share of tokens whose prediction at their exit layer
        equals the last layer's); ``accuracy`` (vs labels, ``None`` without labels); ``expected_saving``
        ``= 1 - mean_exit_layer / L``; ``n_tokens``.  Statistics over zero tokens are NaN.
    """
    preds = to_preds(logits_or_preds)
    num_layers, num_tokens = preds.shape
    if L is not None and L != num_layers:
        raise ValueError(f"L={L} but the predictions have {num_layers} layers")
    exit_layer = torch.as_tensor(exit_layer).long().reshape(-1).to(preds.device)
    if exit_layer.shape[0] != num_tokens:
        raise ValueError(f"exit_layer has {exit_layer.shape[0]} tokens, predictions have {num_tokens}")
    if num_tokens and (int(exit_layer.min()) < 1 or int(exit_layer.max()) > num_layers):
        raise ValueError(f"exit layers must lie in [1, L={num_layers}]")
    mask = torch.ones(num_tokens, dtype=torch.bool, device=preds.device)
    if labels is not None:
        labels = torch.as_tensor(labels).reshape(-1).to(preds.device)
        if labels.shape[0] != num_tokens:
            raise ValueError(f"labels has {labels.shape[0]} tokens, predictions have {num_tokens}")
        mask = labels != -100
    n = int(mask.sum())
    at_exit = preds.gather(0, (exit_layer - 1)[None]).squeeze(0)
    if n == 0:
        nan = float("nan")
        return {
            "mean_exit_layer": nan,
            "consistency": nan,
            "accuracy": None if labels is None else nan,
            "expected_saving": nan,
            "n_tokens": 0,
        }
    mean_exit = float(exit_layer[mask].double().mean())
    consistency = float((at_exit == preds[-1])[mask].double().mean())
    accuracy = None if labels is None else float((at_exit == labels)[mask].double().mean())
    return {
        "mean_exit_layer": mean_exit,
        "consistency": consistency,
        "accuracy": accuracy,
        "expected_saving": 1.0 - mean_exit / num_layers,
        "n_tokens": n,
    }


def deebert_expected_saving(exit_counts: Sequence[int] | Tensor) -> float:
    """DeeBERT's expected saving ``1 - sum_i i * N_i / (L * sum_i N_i)``.

    Args:
        exit_counts: length-``L`` counts; ``exit_counts[i-1] = N_i`` tokens exiting at layer ``i``.
    """
    counts = torch.as_tensor(exit_counts, dtype=torch.float64).reshape(-1)
    if counts.numel() == 0:
        raise ValueError("exit_counts must have one entry per layer (L >= 1)")
    if bool((counts < 0).any()):
        raise ValueError("exit_counts must be non-negative")
    total = float(counts.sum())
    if total == 0:
        raise ValueError("exit_counts sums to zero: no samples")
    layers = torch.arange(1, counts.numel() + 1, dtype=torch.float64)
    return 1.0 - float((layers * counts).sum()) / (counts.numel() * total)


def sweep(
    policies: Sequence[ExitPolicy],
    thresholds: Sequence[Any] | Mapping[str, Sequence[Any]] = (),
    records: ExitRecords | None = None,
    *,
    positions: Tensor | None = None,
) -> list[dict[str, Any]]:
    """Evaluate every policy at every threshold.

    Args:
        policies: template policies (their own threshold is used when no values are given for them).
        thresholds: values applied to every *score* policy, or a mapping ``label -> values`` (policy
            label, falling back to the measure name).  For a policy with a decaying threshold a
            number replaces its base ``lam`` (the decay is kept).  For a *boolean* measure the mapped values vary
            its ``sweep_param`` (``patience`` -> P, ``monotonic`` -> ``min_confidence``) and the
            ``threshold`` column records that value; a plain sequence is not applied to boolean
            measures (one row with the policy as is).
        records: the records (``labels`` in them give ``accuracy`` and drop ``-100`` tokens).
        positions: ``(N,)`` decoding positions for decaying thresholds (default ``records.positions``).

    Returns:
        One row per (policy, value) with columns ``POLICY_TABLE_COLUMNS``.
    """
    if records is None:
        raise ValueError("sweep needs records")
    if positions is None:
        positions = records.positions
    rec = records.with_probs()
    preds = rec.preds()
    num_layers, num_tokens = rec.num_layers, rec.num_tokens
    rows: list[dict[str, Any]] = []
    for policy in policies:
        _check_min_exit_layer(policy, num_layers)
        if isinstance(thresholds, Mapping):
            values = thresholds.get(policy.label)
            if values is None and isinstance(policy.measure, str):
                values = thresholds.get(policy.measure)
        else:
            values = None if policy.is_boolean else thresholds
        values = list(values) if values else []
        if policy.is_boolean:
            param = get_measure(policy.measure).sweep_param  # type: ignore[arg-type]
            variants = [(v, policy.at_value(v)) for v in values]
            if not variants:
                variants = [(policy.measure_kwargs.get(param), policy)]
            for value, variant in variants:
                fires = policy_scores(variant, rec)
                ex = policy_first_exit(variant, fires)
                rows.append(_row(policy, value, ex, preds, rec.labels, num_layers))
        else:
            scores = policy_scores(policy, rec)  # computed once per policy
            variants = [(v, policy.with_base_threshold(v)) for v in values] or [
                (describe_threshold(policy.threshold), policy)
            ]
            for value, variant in variants:
                fires = _fires(variant, scores, num_layers, num_tokens, positions)
                ex = policy_first_exit(variant, fires)
                shown = value if isinstance(value, int | float) else describe_threshold(variant.threshold)
                rows.append(_row(policy, shown, ex, preds, rec.labels, num_layers))
    return rows


def _row(
    policy: ExitPolicy, threshold: Any, ex: Tensor, preds: Tensor, labels: Tensor | None, L: int
) -> dict[str, Any]:  # noqa: N803
    stats = evaluate_policy(ex, preds, labels, L)
    return {
        "measure": policy.label,
        "threshold": threshold,
        "min_exit_layer": policy.min_exit_layer,
        "mean_exit_layer": stats["mean_exit_layer"],
        "consistency": stats["consistency"],
        "accuracy": stats["accuracy"],
        "expected_saving": stats["expected_saving"],
    }


def write_policy_table(rows: Sequence[Mapping[str, Any]], csv_path: str | os.PathLike[str]) -> Path:
    """Write sweep rows as CSV (columns ``POLICY_TABLE_COLUMNS`` first, then any extras; ``None`` -> empty)."""
    path = Path(csv_path)
    extras = [k for row in rows for k in row if k not in POLICY_TABLE_COLUMNS]
    columns = list(POLICY_TABLE_COLUMNS) + list(dict.fromkeys(extras))
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return path


def plot_consistency_vs_exit(
    rows: Sequence[Mapping[str, Any]], png_path: str | os.PathLike[str], title: str | None = None
) -> Path:
    """Plot consistency (y) against mean exit layer (x), one curve per measure, to a PNG.

    Uses matplotlib's Agg canvas directly (no pyplot / global backend change).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(png_path)
    fig = Figure(figsize=(7.0, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    groups: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        x, y = row.get("mean_exit_layer"), row.get("consistency")
        if (
            x is None
            or y is None
            or (isinstance(x, float) and math.isnan(x))
            or (isinstance(y, float) and math.isnan(y))
        ):
            continue
        groups.setdefault(str(row["measure"]), []).append((float(x), float(y)))
    # 10 colours x 4 marker/line styles, so that more than 10 curves stay distinguishable
    colors = [f"C{i}" for i in range(10)]
    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":")]
    for k, (measure, points) in enumerate(groups.items()):
        points.sort()
        marker, line = styles[(k // len(colors)) % len(styles)]
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            color=colors[k % len(colors)],
            linestyle=line,
            marker=marker,
            markersize=3,
            label=measure,
        )
    ax.set_xlabel("mean exit layer")
    ax.set_ylabel("consistency with the last layer")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if groups:
        ax.legend(fontsize="x-small", loc="best")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
