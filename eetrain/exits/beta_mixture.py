"""FREE's adaptive threshold estimator: a Beta mixture over (confidence, agrees with the deep model).

FREE (Bae et al. 2023) sets the exit threshold while it decodes instead of calibrating it per dataset:
each exit check gives a pair ``(c, a)`` -- the exit's confidence ``c in [0, 1]`` and ``a = 1`` when the
exit's prediction equals the last layer's. The confidences of each class are modelled by a Beta
distribution fitted by the method of moments (``mean m``, variance ``s^2``)::

    alpha = m * (m (1 - m) / s^2 - 1),    beta = alpha * (1 - m) / m

and the threshold is the smallest confidence on a grid (10 points on ``[0.3, 0.9]``) from which on the
posterior of agreement stays at or above ``zeta`` (0.4)::

    P(a = 1 | c) = pi_1 Beta(c; alpha_1, beta_1) / sum_k pi_k Beta(c; alpha_k, beta_k)

``prior="equal"`` (``pi_0 = pi_1 = 1/2``) is what FREE's public code computes -- its supervised fit
never updates the mixture weights from their initial 1/2, and its reported results come from it;
``prior="empirical"`` uses the class frequencies (the Bayes posterior). Differences from that code,
on purpose: the agreeing class is the one labelled so (the code takes the component with the larger
mean), and the threshold is the start of the grid's top run of passing points (the code counts the
passing points, the same when the posterior grows with ``c``). Confidences are clipped to
``[1e-4, 1 - 1e-4]`` as there (a Beta density is 0 or infinite at the ends).

Pure functions; :func:`agreement_pairs` takes the pairs of a policy from :class:`ExitRecords`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .measures import MEASURES, ExitRecords
from .policy import ExitPolicy, policy_scores

__all__ = [
    "BetaMixture",
    "PRIORS",
    "beta_moments",
    "beta_log_pdf",
    "fit_beta_mixture",
    "agreement_posterior",
    "mixture_threshold",
    "estimate_threshold",
    "agreement_pairs",
    "check_adaptive_policy",
    "is_confidence",
]

PRIORS = ("equal", "empirical")
_CLIP = 1e-4


@dataclass(frozen=True)
class BetaMixture:
    """Two Beta components, index 0 = disagrees with the last layer, 1 = agrees."""

    alpha: tuple[float, float]
    beta: tuple[float, float]
    prior: tuple[float, float]


def beta_moments(x: Tensor) -> tuple[float, float] | None:
    """Method-of-moments ``(alpha, beta)`` of samples `x (n,)` in (0, 1); None when they cannot
    define a Beta (fewer than two samples, or no spread)."""
    x = x.double()
    if x.numel() < 2:
        return None
    m = float(x.mean())
    var = float(((x - m) ** 2).mean())  # the population variance, as FREE's code
    if var <= 0.0 or not 0.0 < m < 1.0:
        return None
    alpha = m * (m * (1.0 - m) / var - 1.0)
    if alpha <= 0.0:
        return None
    return alpha, alpha * (1.0 - m) / m


def beta_log_pdf(x: Tensor, alpha: float, beta: float) -> Tensor:
    """``log Beta(x; alpha, beta)`` for `x` in (0, 1) (float64)."""
    x = x.double()
    log_norm = math.lgamma(alpha) + math.lgamma(beta) - math.lgamma(alpha + beta)
    return (alpha - 1.0) * torch.log(x) + (beta - 1.0) * torch.log1p(-x) - log_norm


def fit_beta_mixture(confidence: Tensor, agree: Tensor, prior: str = "equal") -> BetaMixture | None:
    """Fit one Beta per class of `agree (n,)` bool to `confidence (n,)`; None when a class cannot be fitted."""
    if prior not in PRIORS:
        raise ValueError(f"prior={prior!r}; allowed: {', '.join(PRIORS)}")
    c = confidence.double().clamp(_CLIP, 1.0 - _CLIP)
    agree = agree.bool()
    fits = [beta_moments(c[~agree]), beta_moments(c[agree])]
    if fits[0] is None or fits[1] is None:
        return None
    share = float(agree.double().mean())
    weights = (0.5, 0.5) if prior == "equal" else (1.0 - share, share)
    return BetaMixture(alpha=(fits[0][0], fits[1][0]), beta=(fits[0][1], fits[1][1]), prior=weights)


def agreement_posterior(mixture: BetaMixture, confidence: Tensor) -> Tensor:
    """``P(agree | c)`` for `confidence (n,)` (float64)."""
    c = confidence.double().clamp(_CLIP, 1.0 - _CLIP)
    logs = [math.log(mixture.prior[k]) + beta_log_pdf(c, mixture.alpha[k], mixture.beta[k]) for k in (0, 1)]
    return torch.sigmoid(logs[1] - logs[0])


def mixture_threshold(
    mixture: BetaMixture, zeta: float = 0.4, low: float = 0.3, high: float = 0.9, points: int = 10
) -> float:
    """The smallest grid point (``points`` on ``[low, high]``) from which on every grid point has
    ``P(agree | c) >= zeta``; ``high`` when the highest does not."""
    grid = torch.linspace(low, high, points, dtype=torch.float64)
    passing = (agreement_posterior(mixture, grid) >= zeta).tolist()
    i = points
    while i > 0 and passing[i - 1]:
        i -= 1
    return float(grid[min(i, points - 1)])


def estimate_threshold(
    confidence: Tensor, agree: Tensor, zeta: float = 0.4, low: float = 0.3, high: float = 0.9, points: int = 10,
    prior: str = "equal",
) -> float | None:
    """FREE's threshold from pairs `confidence (n,)`, `agree (n,)`. Every exit agreeing gives ``low``,
    none ``high``; None (keep the current threshold) while a class has too few pairs to fit."""
    if agree.numel() and bool(agree.all()):
        return low
    if agree.numel() and not bool(agree.any()):
        return high
    mixture = fit_beta_mixture(confidence, agree, prior)
    if mixture is None:
        return None
    return mixture_threshold(mixture, zeta, low, high, points)


def is_confidence(policy: ExitPolicy) -> bool:
    """Whether `policy`'s score is a confidence in [0, 1] (a probability-type measure or a classifier)."""
    return not isinstance(policy.measure, str) or MEASURES[policy.measure].is_probability


def check_adaptive_policy(policy: ExitPolicy | None, key: str) -> None:
    """A policy the estimator can set: a score in [0, 1] (a probability-type measure or a classifier)."""
    from eetrain.errors import ConfigError

    if policy is None:
        raise ConfigError(f"{key}: FREE's adaptive threshold sets an exit policy's threshold, and this run decodes "
                          "without one (full model or self_speculative); allowed with a policy: copy, parallel")
    if not is_confidence(policy):
        allowed = sorted(n for n, s in MEASURES.items() if s.kind == "score" and s.is_probability)
        raise ConfigError(
            f"{key}: FREE's adaptive threshold models a confidence in [0, 1]; measure {policy.measure!r} is not one "
            f"(allowed: {', '.join(allowed)}, classifier:<kind>)"
        )


def agreement_pairs(
    policy: ExitPolicy, records: ExitRecords, exit_layers: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The estimator's pairs of every token at every layer where `policy` checks (its minimum exit layer
    up to ``L - 1``, its exit points only; with `exit_layers (N,)`, the tokens' exits when decoded, only
    the checks made before leaving, at layers ``<=`` the exit): `confidence (n,)` the policy's score and
    `agree (n,)` bool, the layer's prediction equals the last layer's. Token-major order (a token's
    checks together)."""
    scores = policy_scores(policy, records)  # (L, N)
    preds = records.preds()
    L = scores.shape[0]
    checked = torch.zeros(L, dtype=torch.bool)
    checked[policy.min_exit_layer - 1 : L - 1] = True
    if policy.exit_points is not None:
        carries = torch.zeros(L, dtype=torch.bool)
        carries[[i - 1 for i in policy.exit_points if 1 <= i <= L]] = True
        checked &= carries
    layers = torch.nonzero(checked)[:, 0]
    made = torch.ones(len(layers), scores.shape[1], dtype=torch.bool)
    if exit_layers is not None:
        made = (layers[:, None] + 1) <= exit_layers.to(layers.device)[None, :]
    confidence = scores[layers].t()[made.t()].double()
    agree = (preds[layers] == preds[-1]).t()[made.t()]
    return confidence, agree
