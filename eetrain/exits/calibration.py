"""CALM's Learn-then-Test (LTT) threshold calibration.

Goal: pick the smallest threshold ``lambda`` such that, with probability ``>= 1 - epsilon`` over the
calibration set, the expected risk ``R(lambda)`` (dissimilarity to the full model -- textual
consistency, no labels needed -- or the drop of the task metric) stays ``<= delta``.

Procedure (fixed-sequence testing, which controls the family-wise error at ``epsilon`` without a
multiplicity correction): test the null ``H_lambda: R(lambda) > delta`` for the candidates from the
highest (1.0) downward with a valid p-value from the empirical risk on ``n`` examples; **stop at the
first candidate whose p-value exceeds epsilon** and return the last one that passed.

P-values (risks bounded in ``[0, 1]``):

* Hoeffding: ``exp(-2 n (delta - R_hat)_+^2)`` (the quadratic bound)
* Bentkus: ``e * P(Binom(n, delta) <= ceil(n * R_hat))`` (binomial CDF from ``lgamma``; no scipy)
* Hoeffding-Bentkus (the default, Learn-then-Test's): for ``R_hat < delta``
  ``min(exp(-n KL(R_hat || delta)), Bentkus)`` with the relative entropy
  ``KL(a || b) = a log(a/b) + (1-a) log((1-a)/(1-b))`` (Hoeffding's tighter form); 1 otherwise.
* Hoeffding-Bentkus quadratic: ``min(Hoeffding, Bentkus)`` with the quadratic bound (looser; kept
  as an explicit option, ``exit.calibration.pvalue=hoeffding_bentkus_quadratic``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from .measures import ExitRecords, to_preds
from .policy import ExitPolicy, _check_min_exit_layer, _fires, policy_first_exit, policy_scores

__all__ = [
    "hoeffding_pvalue",
    "bentkus_pvalue",
    "hoeffding_kl_pvalue",
    "hoeffding_bentkus_pvalue",
    "hoeffding_bentkus_quadratic_pvalue",
    "bernoulli_kl",
    "PVALUES",
    "binomial_cdf",
    "ltt_scan",
    "calibrate_threshold",
    "consistency_risk",
    "task_risk",
    "make_risk_fn",
]

RiskSource = Mapping[float, Any] | Sequence[tuple[float, Any]] | Callable[[float], Any]


def _check_open_unit(value: float, key: str) -> float:
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{key} must lie in (0, 1), got {value!r}")
    return value


def _check_n(n: int) -> int:
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    return int(n)


def _check_risk_hat(risk_hat: float) -> float:
    risk_hat = float(risk_hat)
    if math.isnan(risk_hat) or not 0.0 <= risk_hat <= 1.0:
        raise ValueError(f"risk_hat must lie in [0, 1], got {risk_hat!r}")
    return risk_hat


def hoeffding_pvalue(risk_hat: float, delta: float, n: int) -> float:
    """Hoeffding p-value ``exp(-2 n (delta - risk_hat)_+^2)`` for ``H: R > delta``."""
    risk_hat, delta, n = _check_risk_hat(risk_hat), _check_open_unit(delta, "delta"), _check_n(n)
    return math.exp(-2.0 * n * max(delta - risk_hat, 0.0) ** 2)


def binomial_cdf(k: int, n: int, p: float) -> float:
    """``P(Binom(n, p) <= k)`` via log-pmfs from ``lgamma`` and a log-sum-exp (float64)."""
    n = _check_n(n)
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    j = torch.arange(0, k + 1, dtype=torch.float64)
    log_pmf = (
        math.lgamma(n + 1)
        - torch.lgamma(j + 1)
        - torch.lgamma(n - j + 1)
        + j * math.log(p)
        + (n - j) * math.log1p(-p)
    )
    return min(1.0, float(torch.logsumexp(log_pmf, dim=0).exp()))


def bentkus_pvalue(risk_hat: float, delta: float, n: int) -> float:
    """Bentkus p-value ``e * P(Binom(n, delta) <= ceil(n * risk_hat))`` for ``H: R > delta``.

    Not clipped to 1 (as in the LTT reference code).  ``n * risk_hat`` is rounded to 9 decimals
    before the ceiling, so an empirical risk ``k / n`` maps to ``k`` despite floating-point error.
    """
    risk_hat, delta, n = _check_risk_hat(risk_hat), _check_open_unit(delta, "delta"), _check_n(n)
    k = math.ceil(round(n * risk_hat, 9))
    return math.e * binomial_cdf(k, n, delta)


def bernoulli_kl(a: float, b: float) -> float:
    """Relative entropy ``KL(a || b) = a log(a/b) + (1-a) log((1-a)/(1-b))`` of two Bernoulli laws
    (``0 log 0 = 0``); ``b`` in ``(0, 1)``, ``a`` in ``[0, 1]``."""
    out = 0.0
    if a > 0.0:
        out += a * math.log(a / b)
    if a < 1.0:
        out += (1.0 - a) * math.log((1.0 - a) / (1.0 - b))
    return out


def hoeffding_kl_pvalue(risk_hat: float, delta: float, n: int) -> float:
    """Hoeffding's relative-entropy p-value ``exp(-n KL(risk_hat || delta))`` for ``H: R > delta``
    (``risk_hat < delta``; 1 otherwise). Never larger than the quadratic form, since
    ``KL(a || b) >= 2 (a - b)^2`` (Pinsker)."""
    risk_hat, delta, n = _check_risk_hat(risk_hat), _check_open_unit(delta, "delta"), _check_n(n)
    if risk_hat >= delta:
        return 1.0
    return math.exp(-n * bernoulli_kl(risk_hat, delta))


def hoeffding_bentkus_pvalue(risk_hat: float, delta: float, n: int) -> float:
    """Learn-then-Test's Hoeffding-Bentkus p-value: for ``risk_hat < delta``
    ``min(exp(-n KL(risk_hat || delta)), e * P(Binom(n, delta) <= ceil(n * risk_hat)))``, else 1."""
    risk_hat, delta, n = _check_risk_hat(risk_hat), _check_open_unit(delta, "delta"), _check_n(n)
    if risk_hat >= delta:
        return 1.0
    return min(hoeffding_kl_pvalue(risk_hat, delta, n), bentkus_pvalue(risk_hat, delta, n))


def hoeffding_bentkus_quadratic_pvalue(risk_hat: float, delta: float, n: int) -> float:
    """``min(hoeffding_pvalue, bentkus_pvalue)`` with the quadratic Hoeffding bound (looser than
    :func:`hoeffding_bentkus_pvalue`; ``exit.calibration.pvalue=hoeffding_bentkus_quadratic``)."""
    return min(hoeffding_pvalue(risk_hat, delta, n), bentkus_pvalue(risk_hat, delta, n))


PVALUES: dict[str, Callable[[float, float, int], float]] = {
    "hoeffding": hoeffding_pvalue,
    "bentkus": bentkus_pvalue,
    "hoeffding_bentkus": hoeffding_bentkus_pvalue,
    "hoeffding_bentkus_quadratic": hoeffding_bentkus_quadratic_pvalue,
}

PValueName = Literal["hoeffding", "bentkus", "hoeffding_bentkus", "hoeffding_bentkus_quadratic"]


def _risk_array(value: Any, threshold: float) -> Tensor:
    risks = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
    if risks.numel() == 0:
        raise ValueError(f"no calibration examples for threshold {threshold!r}")
    if bool(torch.isnan(risks).any()) or bool((risks < 0).any()) or bool((risks > 1).any()):
        raise ValueError(f"per-example risks must lie in [0, 1] (threshold {threshold!r})")
    return risks


def ltt_scan(
    risks: RiskSource,
    candidates: Iterable[float] | None = None,
    epsilon: float = 0.05,
    delta: float = 0.1,
    pvalue: PValueName = "hoeffding_bentkus",
) -> list[dict[str, float | int | bool]]:
    """Fixed-sequence scan; returns the tested rows ``{threshold, risk_hat, n, pvalue, passed}``.

    Candidates are tested in descending order and the scan stops after the first failure (the
    failing row is included).  See :func:`calibrate_threshold` for the arguments.
    """
    epsilon = _check_open_unit(epsilon, "epsilon")
    delta = _check_open_unit(delta, "delta")
    if pvalue not in PVALUES:
        raise ValueError(f"unknown pvalue {pvalue!r}; allowed: {sorted(PVALUES)}")
    pfn = PVALUES[pvalue]
    if callable(risks):
        risk_fn: Callable[[float], Any] = risks
        if candidates is None:
            candidates = [round(1.0 - i / 100, 2) for i in range(101)]
    else:
        table = dict(risks.items()) if isinstance(risks, Mapping) else {float(t): r for t, r in risks}
        table = {float(t): r for t, r in table.items()}
        if candidates is None:
            candidates = table.keys()
        missing = [c for c in candidates if float(c) not in table]
        if missing:
            raise ValueError(f"no risks given for candidate thresholds {missing}")

        def risk_fn(threshold: float) -> Any:
            return table[threshold]

    ordered = sorted({float(c) for c in candidates}, reverse=True)
    if not ordered:
        raise ValueError("candidates is empty")
    rows: list[dict[str, float | int | bool]] = []
    for threshold in ordered:
        per_example = _risk_array(risk_fn(threshold), threshold)
        n = per_example.numel()
        risk_hat = float(per_example.mean().clamp(0.0, 1.0))
        p = pfn(risk_hat, delta, n)
        passed = p <= epsilon
        rows.append({"threshold": threshold, "risk_hat": risk_hat, "n": n, "pvalue": p, "passed": passed})
        if not passed:
            break
    return rows


def calibrate_threshold(
    risks: RiskSource,
    candidates: Iterable[float] | None = None,
    epsilon: float = 0.05,
    delta: float = 0.1,
    pvalue: PValueName = "hoeffding_bentkus",
) -> float | None:
    """Learn-then-Test: the smallest certified threshold, or ``None``.

    Args:
        risks: per-example risks in ``[0, 1]`` per threshold: a mapping ``threshold -> (n,) array``,
            a sequence of ``(threshold, array)`` pairs, or a callable ``threshold -> array``.
        candidates: thresholds to test; sorted descending here (start from 1.0).  Default: the
            mapping's thresholds, or ``1.00, 0.99, ..., 0.00`` for a callable.
        epsilon: allowed probability of failing the guarantee, in ``(0, 1)``.
        delta: risk tolerance, in ``(0, 1)``.
        pvalue: ``"hoeffding_bentkus"`` (default, LTT's relative-entropy form), ``"hoeffding"``,
            ``"bentkus"`` or ``"hoeffding_bentkus_quadratic"`` (see :data:`PVALUES`).

    Returns:
        The last (smallest) threshold that passed before the first failure.  ``None`` when even the
        highest candidate fails: no threshold is certified, so the caller should not exit early
        (run the full model).  The guarantee: ``P(R(returned) > delta) <= epsilon``.

    Raises:
        ValueError: ``epsilon``/``delta`` outside ``(0, 1)`` (naming the key), risks outside ``[0, 1]``.
    """
    rows = ltt_scan(risks, candidates, epsilon, delta, pvalue)
    passed = [r["threshold"] for r in rows if r["passed"]]
    return float(passed[-1]) if passed else None


# ---------------------------------------------------------------------------------------------------
# Risks from records
# ---------------------------------------------------------------------------------------------------


def _aggregate(loss: Tensor, mask: Tensor, sequence_ids: Tensor | None, reduction: str) -> Tensor:
    if reduction not in ("share", "any"):
        raise ValueError(f"unknown reduction {reduction!r}; allowed: ['any', 'share']")
    if sequence_ids is None:
        return loss[mask]
    seq = torch.as_tensor(sequence_ids).reshape(-1).to(loss.device)
    if seq.shape != loss.shape:
        raise ValueError(f"sequence_ids has {seq.shape[0]} entries, there are {loss.shape[0]} tokens")
    seq, loss = seq[mask], loss[mask]
    uniq, inverse = torch.unique(seq, return_inverse=True)
    sums = torch.zeros(uniq.numel(), dtype=torch.float64, device=loss.device).index_add_(0, inverse, loss)
    if reduction == "any":
        return (sums > 0).double()
    counts = torch.bincount(inverse, minlength=uniq.numel()).double()
    return sums / counts


def _mask(num_tokens: int, labels: Tensor | None, mask: Tensor | None, device: torch.device) -> Tensor:
    out = torch.ones(num_tokens, dtype=torch.bool, device=device)
    if labels is not None:
        out &= torch.as_tensor(labels).reshape(-1).to(device) != -100
    if mask is not None:
        out &= torch.as_tensor(mask, dtype=torch.bool).reshape(-1).to(device)
    return out


def consistency_risk(
    exit_layer: Tensor,
    logits_or_preds: Tensor,
    *,
    sequence_ids: Tensor | None = None,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    reduction: Literal["share", "any"] = "share",
) -> Tensor:
    """Textual-consistency risk per example (no labels needed), values in ``[0, 1]``.

    The per-token loss is ``1[pred at exit layer != pred at layer L]``.

    Args:
        exit_layer: ``(N,)`` 1-based exit layers.
        logits_or_preds: ``(L, N, V)`` or ``(L, N)`` integer predictions.
        sequence_ids: ``(N,)`` sequence id per token; ``None``: each token is an example.
        labels: optional ``(N,)``, used only to drop ``-100`` (padding) tokens.
        mask: optional ``(N,)`` bool of tokens to keep.
        reduction: per sequence, ``"share"`` of differing tokens or ``"any"`` (indicator that the
            sequence differs anywhere).

    Returns:
        ``(M,)`` float64: per token (``M`` kept tokens) or per sequence (sorted by id).
    """
    preds = to_preds(logits_or_preds)
    ex = torch.as_tensor(exit_layer).long().reshape(-1).to(preds.device)
    at_exit = preds.gather(0, (ex - 1)[None]).squeeze(0)
    loss = (at_exit != preds[-1]).double()
    return _aggregate(loss, _mask(preds.shape[1], labels, mask, preds.device), sequence_ids, reduction)


def task_risk(
    exit_layer: Tensor,
    logits_or_preds: Tensor,
    labels: Tensor,
    *,
    sequence_ids: Tensor | None = None,
    mask: Tensor | None = None,
    reduction: Literal["share", "any"] = "share",
    relative_to_full: bool = True,
) -> Tensor:
    """Task (risk-consistency) risk per example from labels, values in ``[0, 1]``.

    Per token, the error ``e = 1[pred != label]``; with ``relative_to_full`` (CALM's risk
    consistency) the loss is ``(e_exit - e_full)_+`` -- errors that the full model does not make --
    else plain ``e_exit``.  Tokens with label ``-100`` are dropped.  Aggregation as in
    :func:`consistency_risk`.
    """
    preds = to_preds(logits_or_preds)
    lab = torch.as_tensor(labels).reshape(-1).to(preds.device)
    ex = torch.as_tensor(exit_layer).long().reshape(-1).to(preds.device)
    at_exit = preds.gather(0, (ex - 1)[None]).squeeze(0)
    err = (at_exit != lab).double()
    if relative_to_full:
        err = (err - (preds[-1] != lab).double()).clamp_min(0.0)
    return _aggregate(err, _mask(preds.shape[1], lab, mask, preds.device), sequence_ids, reduction)


def make_risk_fn(
    policy: ExitPolicy,
    records: ExitRecords,
    *,
    kind: Literal["consistency", "task"] = "consistency",
    positions: Tensor | None = None,
    sequence_ids: Tensor | None = None,
    reduction: Literal["share", "any"] = "share",
) -> Callable[[float], Tensor]:
    """A callable ``threshold -> per-example risk`` for :func:`calibrate_threshold`.

    For a threshold ``lam`` the policy is evaluated with ``policy.with_threshold(lam)`` (a float,
    or -- if the policy holds a decaying threshold -- the same decay with base ``lam``). A boolean
    rule is evaluated at ``policy.at_value(value)``: its parameter (``patience`` -> P,
    ``monotonic`` -> ``min_confidence``), larger values being the more conservative, so the
    fixed-sequence scan from the largest down is Learn-then-Test for them too.
    ``kind="task"`` needs ``records.labels``.  ``positions`` defaults to ``records.positions``;
    ``sequence_ids`` is *not* taken from the records (``None`` = token-level risk): pass
    ``records.sequence_ids`` for a sequence-level risk.
    """
    if kind not in ("consistency", "task"):
        raise ValueError(f"unknown risk kind {kind!r}; allowed: ['consistency', 'task']")
    if kind == "task" and records.labels is None:
        raise ValueError("kind='task' needs labels in the records")
    rec = records.with_probs()
    preds = rec.preds()
    if positions is None:
        positions = rec.positions
    _check_min_exit_layer(policy, rec.num_layers)
    # a score measure is computed once (only the threshold varies); a boolean rule fires per parameter
    scores = None if policy.is_boolean else policy_scores(policy, rec)

    def risk(threshold: float) -> Tensor:
        variant = policy.at_value(float(threshold))
        if scores is None:
            fires = policy_scores(variant, rec)
        else:
            fires = _fires(variant, scores, rec.num_layers, rec.num_tokens, positions)
        ex = policy_first_exit(variant, fires)
        if kind == "consistency":
            return consistency_risk(
                ex, preds, sequence_ids=sequence_ids, labels=rec.labels, reduction=reduction
            )
        assert rec.labels is not None
        return task_risk(ex, preds, rec.labels, sequence_ids=sequence_ids, reduction=reduction)

    return risk
