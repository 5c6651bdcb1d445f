"""Exit thresholds: fixed, per-layer and CALM's decaying threshold.

A threshold spec is resolved to an ``(L, N)`` tensor that is compared with an ``(L, N)`` score
(exit iff ``score >= threshold``, see :mod:`eetrain.exits.measures`).

CALM's decaying threshold depends on the decoding position ``t`` of each token, so resolving a
:class:`DecayingThreshold` *requires* ``positions``; it raises instead of silently ignoring the
decay (the public CALM code never passes the position, so its decay does nothing).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "DECAY_FORMS",
    "decaying_threshold",
    "FixedThreshold",
    "PerLayerThreshold",
    "DecayingThreshold",
    "ThresholdSpec",
    "make_threshold",
    "validate_threshold",
    "resolve_threshold",
    "describe_threshold",
]

DECAY_FORMS: tuple[str, ...] = ("paper", "code")
DecayForm = Literal["paper", "code"]


def _check_form(form: str) -> None:
    if form not in DECAY_FORMS:
        raise ValueError(f"unknown decaying-threshold form {form!r}; allowed: {list(DECAY_FORMS)}")


def decaying_threshold(
    lam: float | Tensor,
    t: int | float | Tensor,
    N: int,  # noqa: N803 - notation of the CALM paper
    tau: float = 4.0,
    form: DecayForm = "paper",
) -> float | Tensor:
    """CALM decaying threshold at decoding position ``t``.

    * ``form="paper"``: ``clip_[0,1](0.9 * lam + 0.1 * exp(-tau * t / N))``
    * ``form="code"`` (public CALM and FREE code): ``lam * (0.9 + 0.1 * exp(-tau * t / N))``

    At ``t = 0`` the paper form gives ``0.9 lam + 0.1`` and the code form gives ``lam``; both decay
    towards ``0.9 lam`` (paper, plus ``0.1 e^{-tau}`` at ``t = N``).

    Args:
        lam: base threshold (scalar, or a tensor broadcastable against ``t``).
        t: 1-based decoding position(s); a tensor of positions gives a tensor of thresholds.
        N: horizon (maximum output length), ``> 0``.
        tau: decay temperature, ``>= 0`` (4 is usual).
        form: ``"paper"`` or ``"code"``.

    Returns:
        A float when ``lam`` and ``t`` are Python numbers, else a float tensor of the broadcast shape.
    """
    _check_form(form)
    if N <= 0:
        raise ValueError(f"N must be > 0, got {N!r}")
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau!r}")
    if not isinstance(lam, Tensor) and not isinstance(t, Tensor):
        decay = math.exp(-tau * float(t) / N)
        if form == "paper":
            return min(1.0, max(0.0, 0.9 * float(lam) + 0.1 * decay))
        return float(lam) * (0.9 + 0.1 * decay)
    dtype = (
        torch.float64
        if torch.float64 in {getattr(t, "dtype", None), getattr(lam, "dtype", None)}
        else torch.float32
    )
    t_ = torch.as_tensor(t, dtype=dtype)
    lam_ = torch.as_tensor(lam, dtype=dtype, device=t_.device)
    decay = torch.exp(-tau * t_ / N)
    if form == "paper":
        return (0.9 * lam_ + 0.1 * decay).clamp(0.0, 1.0)
    return lam_ * (0.9 + 0.1 * decay)


@dataclass(frozen=True)
class FixedThreshold:
    """One threshold for every layer and token."""

    value: float


@dataclass(frozen=True)
class PerLayerThreshold:
    """One threshold per exit layer; ``values[i-1]`` applies to layer ``i`` (length must be ``L``)."""

    values: tuple[float, ...]


@dataclass(frozen=True)
class DecayingThreshold:
    """CALM decaying threshold (see :func:`decaying_threshold`); needs per-token positions."""

    lam: float
    N: int
    tau: float = 4.0
    form: DecayForm = "paper"

    def __post_init__(self) -> None:
        _check_form(self.form)
        if self.N <= 0:
            raise ValueError(f"threshold N must be > 0, got {self.N!r}")
        if self.tau < 0:
            raise ValueError(f"threshold tau must be >= 0, got {self.tau!r}")


ThresholdSpec = FixedThreshold | PerLayerThreshold | DecayingThreshold


def make_threshold(spec: Any) -> ThresholdSpec | None:
    """Normalise a user threshold to a spec.

    Accepted: ``None``; a number (fixed); a sequence / 1-D tensor (per layer); a mapping with key
    ``"lam"`` (plus ``"N"``, optional ``"tau"``, ``"form"``; decaying) or ``"value"`` (fixed) or
    ``"values"`` (per layer); or an existing spec.
    """
    if spec is None or isinstance(spec, FixedThreshold | PerLayerThreshold | DecayingThreshold):
        return spec
    if isinstance(spec, bool):
        raise ValueError(f"threshold must be a number, sequence or mapping, got {spec!r}")
    if isinstance(spec, numbers.Real):
        return FixedThreshold(float(spec))
    if isinstance(spec, Tensor):
        if spec.dim() == 0:
            return FixedThreshold(float(spec))
        if spec.dim() != 1:
            raise ValueError(f"a per-layer threshold must be 1-D (L,), got shape {tuple(spec.shape)}")
        return PerLayerThreshold(tuple(float(v) for v in spec.tolist()))
    if isinstance(spec, Mapping):
        keys = set(spec)
        if "lam" in keys:
            allowed = {"lam", "N", "tau", "form"}
            if keys - allowed or "N" not in keys:
                raise ValueError(
                    f"a decaying threshold takes keys {sorted(allowed)} (lam and N required), got {sorted(keys)}"
                )
            return DecayingThreshold(
                lam=float(spec["lam"]),
                N=int(spec["N"]),
                tau=float(spec.get("tau", 4.0)),
                form=spec.get("form", "paper"),
            )
        if keys == {"value"}:
            return FixedThreshold(float(spec["value"]))
        if keys == {"values"}:
            return make_threshold(list(spec["values"]))
        raise ValueError(f"cannot interpret threshold mapping with keys {sorted(keys)}")
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        if len(spec) == 0:
            raise ValueError("a per-layer threshold needs one value per layer, got an empty sequence")
        return PerLayerThreshold(tuple(float(v) for v in spec))
    raise ValueError(f"threshold must be a number, sequence or mapping, got {type(spec).__name__}")


def _check_value(value: float, lo: float, hi: float, key: str) -> None:
    if math.isnan(value) or not lo <= value <= hi:
        raise ValueError(f"{key} must lie in [{lo}, {hi}] for this measure, got {value!r}")


def validate_threshold(
    spec: ThresholdSpec | None, value_range: tuple[float, float] | None = (0.0, 1.0), key: str = "threshold"
) -> None:
    """Raise ``ValueError`` (naming ``key``) when a threshold lies outside ``value_range``.

    ``value_range=(0, 1)`` is the range of probability-type measures; ``None`` skips range checks.
    Decaying thresholds are only meaningful for probability-type measures (the paper form clips to
    ``[0, 1]``), so they are rejected for any other range.
    """
    if spec is None:
        return
    lo, hi = value_range if value_range is not None else (-math.inf, math.inf)
    if isinstance(spec, FixedThreshold):
        _check_value(spec.value, lo, hi, key)
    elif isinstance(spec, PerLayerThreshold):
        for i, v in enumerate(spec.values):
            _check_value(v, lo, hi, f"{key}[{i}]")
    elif isinstance(spec, DecayingThreshold):
        if value_range != (0.0, 1.0):
            raise ValueError(
                f"{key}: a decaying threshold needs a probability-type measure (scores in [0, 1])"
            )
        _check_value(spec.lam, lo, hi, f"{key}.lam")
    else:  # pragma: no cover - guarded by make_threshold
        raise ValueError(f"{key}: unsupported threshold spec {spec!r}")


def resolve_threshold(
    spec: ThresholdSpec,
    num_layers: int,
    num_tokens: int,
    positions: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Resolve a spec to an ``(L, N)`` threshold tensor.

    Compare it with scores in the scores' dtype (pass ``dtype=scores.dtype``) so that a score equal
    to the threshold, e.g. ``0.8`` in float64 against ``0.8`` given as a Python float, counts as
    ``>=`` (a float32 threshold would be ``0.800000012``).

    Args:
        spec: the threshold spec.
        num_layers: ``L``.
        num_tokens: ``N``.
        positions: ``(N,)`` 1-based decoding positions ``t`` per token; required for
            :class:`DecayingThreshold` (``ValueError`` if missing), ignored otherwise.
        dtype: dtype of the result (computed in float64, then cast).
    """
    shape = (num_layers, num_tokens)
    if isinstance(spec, FixedThreshold):
        return torch.full(shape, spec.value, dtype=torch.float64).to(dtype)
    if isinstance(spec, PerLayerThreshold):
        if len(spec.values) != num_layers:
            raise ValueError(
                f"per-layer threshold has {len(spec.values)} values but there are L={num_layers} layers"
            )
        return torch.tensor(spec.values, dtype=torch.float64)[:, None].expand(shape).to(dtype)
    if isinstance(spec, DecayingThreshold):
        if positions is None:
            raise ValueError(
                "a decaying threshold needs positions: pass the (N,) decoding positions t of the tokens"
            )
        pos = torch.as_tensor(positions).reshape(-1)
        if pos.shape[0] != num_tokens:
            raise ValueError(f"positions has {pos.shape[0]} entries, records have N={num_tokens} tokens")
        lam_t = decaying_threshold(
            torch.tensor(spec.lam, dtype=torch.float64), pos.cpu().double(), spec.N, spec.tau, spec.form
        )
        assert isinstance(lam_t, Tensor)
        return lam_t[None, :].expand(shape).to(dtype)
    raise ValueError(f"unsupported threshold spec {spec!r}")


def describe_threshold(spec: ThresholdSpec | None) -> float | str | None:
    """A table-friendly value: the float of a fixed threshold, else a short string."""
    if spec is None:
        return None
    if isinstance(spec, FixedThreshold):
        return spec.value
    if isinstance(spec, PerLayerThreshold):
        return "per-layer[" + ",".join(f"{v:g}" for v in spec.values) + "]"
    return f"decaying(lam={spec.lam:g},N={spec.N},tau={spec.tau:g},form={spec.form})"


def value_label(value: Any) -> Any:
    """A swept grid value as tables show it: a number as it is, a per-layer list as ``per-layer[...]``."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return describe_threshold(make_threshold(list(value)))
    return value
