"""Confidence measures for exit decisions, computed for many tokens at once.

Notation (see ``shared/reference/methods.md``, "Exit decisions"): ``L`` exit layers with 1-based
index ``i = 1..L``; for ``N`` tokens a record holds ``hidden: (L, N, d)``, exit ``logits: (L, N, V)``
from a shared head (or precomputed ``probs: (L, N, V)``) and optional ``labels: (N,)``.

Full ``(L, N, V)`` logits do not fit in memory for a 32k vocabulary over a validation set, so a
record may instead hold per-layer *summaries* (see :func:`summarize_logits`): the argmax
``predictions (L, N)``, the two largest probabilities ``top2 (L, N, 2)`` and the entropy
``entropies (L, N)`` (with ``vocab_size``), plus ``saturation (L, N)`` when ``hidden`` is not kept.
Every registered measure is computed from these as exactly as from the full logits.

Score convention
----------------
Every *registered* measure (``MEASURES``) returns an ``(L, N)`` tensor whose entry ``[i-1, n]``
concerns token ``n`` at layer ``i``, and the exit rule is always

    exit at layer i  iff  score[i-1, n] >= threshold          (score measures), or
    exit at layer i  iff  fires[i-1, n]                        (boolean measures).

=====================  =================================  ================  ===========================
registered name        score                              range             threshold meaning
=====================  =================================  ================  ===========================
``softmax_gap``        p_top1 - p_top2                    [0, 1]            exit iff gap >= lambda
``softmax_max``        p_top1                             [0, 1]            exit iff p_top1 >= lambda
``entropy``            **-H(p)** (nats)                   [-log V, 0]       pass ``-S``: exit iff H <= S
``normalized_entropy`` **1 - H(p) / log V**               [0, 1]            pass ``1 - S``: exit iff
                                                                            H / log V <= S
``hidden_saturation``  cos(h_i, h_{i-1})                  [-1, 1]           exit iff cos >= lambda
``patience``           bool: PABEE counter >= P           --                no threshold
                       (regression: ``tolerance`` tau)
``monotonic``          bool: MEE heuristic                --                no threshold
=====================  =================================  ================  ===========================

The raw helpers :func:`entropy` and :func:`normalized_entropy` return the *raw* (lower = more
confident) values; only the registry entries flip them into the ``>=`` convention.  DeeBERT's
rule "exit when H < S" therefore becomes ``ExitPolicy("entropy", threshold=-S)`` (non-strict).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "ExitRecords",
    "MeasureSpec",
    "MEASURES",
    "get_measure",
    "compute_measure",
    "to_probs",
    "to_preds",
    "top1_probs",
    "summarize_logits",
    "monotonic_from_top1",
    "softmax_gap",
    "softmax_max",
    "entropy",
    "normalized_entropy",
    "entropy_score",
    "normalized_entropy_score",
    "hidden_saturation",
    "patience",
    "monotonic",
]


# ---------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------


@dataclass
class ExitRecords:
    """Per-layer records for ``N`` tokens.

    Attributes:
        hidden: ``(L, N, d)`` hidden states ``h_1..h_L`` at the exit layers, or ``None``.
        logits: ``(L, N, V)`` exit logits ``z_i = g(h_i)``, or ``None``.
        probs: ``(L, N, V)`` precomputed ``softmax(z_i)``, or ``None`` (computed from ``logits``).
        labels: ``(N,)`` gold labels with ``-100`` for padding tokens to drop, or ``None``.
        h0: ``(N, d)`` the state before layer 1 (e.g. the embeddings), used only by
            ``hidden_saturation`` at layer 1, or ``None``.
        predictions: ``(L, N)`` long argmax of every layer (summary; used when there are no
            logits/probs, and preferred over them when given).
        top2: ``(L, N, 2)`` float, the largest and second-largest probability of every layer.
        entropies: ``(L, N)`` float, the entropy ``H(p_i)`` in nats.
        saturation: ``(L, N)`` float, ``cos(h_i, h_{i-1})`` as :func:`hidden_saturation` gives it
            (preferred over recomputing it from ``hidden``).
        vocab_size: ``V``, needed by ``normalized_entropy`` on summaries.
        positions: ``(N,)`` long, the 1-based decoding position ``t`` of each token (decaying
            thresholds use it when no ``positions`` are passed explicitly).
        sequence_ids: ``(N,)`` long, the sequence each token belongs to (sequence-level risks).
    """

    hidden: Tensor | None = None
    logits: Tensor | None = None
    probs: Tensor | None = None
    labels: Tensor | None = None
    h0: Tensor | None = None
    predictions: Tensor | None = None
    top2: Tensor | None = None
    entropies: Tensor | None = None
    saturation: Tensor | None = None
    vocab_size: int | None = None
    positions: Tensor | None = None
    sequence_ids: Tensor | None = None
    _preds: Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        shapes = {}
        for key, dims in (
            ("hidden", 3),
            ("logits", 3),
            ("probs", 3),
            ("top2", 3),
            ("predictions", 2),
            ("entropies", 2),
            ("saturation", 2),
        ):
            value = getattr(self, key)
            if value is not None:
                if value.dim() != dims:
                    want = "(L, N, ...)" if dims == 3 else "(L, N)"
                    raise ValueError(f"{key} must have shape {want}, got {tuple(value.shape)}")
                shapes[key] = tuple(value.shape[:2])
        if len(set(shapes.values())) > 1:
            raise ValueError(f"records disagree on (L, N): {shapes}")
        if self.top2 is not None and self.top2.shape[-1] != 2:
            raise ValueError(f"top2 must have shape (L, N, 2), got {tuple(self.top2.shape)}")
        num_tokens = next(iter(shapes.values()))[1] if shapes else None
        for key in ("labels", "positions", "sequence_ids"):
            value = getattr(self, key)
            if value is None:
                continue
            if value.dim() != 1:
                raise ValueError(f"{key} must have shape (N,), got {tuple(value.shape)}")
            if num_tokens is not None and value.shape[0] != num_tokens:
                raise ValueError(f"{key} has {value.shape[0]} tokens, records have {num_tokens}")
        if self.h0 is not None and self.hidden is not None and self.h0.shape != self.hidden.shape[1:]:
            raise ValueError(
                f"h0 must have shape (N, d) = {tuple(self.hidden.shape[1:])}, got {tuple(self.h0.shape)}"
            )
        if self.vocab_size is not None and int(self.vocab_size) < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size!r}")

    @property
    def num_layers(self) -> int:
        """``L``."""
        return self._first().shape[0]

    @property
    def num_tokens(self) -> int:
        """``N``."""
        return self._first().shape[1]

    def _first(self) -> Tensor:
        for value in (
            self.logits,
            self.probs,
            self.hidden,
            self.predictions,
            self.top2,
            self.entropies,
            self.saturation,
        ):
            if value is not None:
                return value
        raise ValueError("records hold neither hidden states, logits, probs nor per-layer summaries")

    @property
    def has_distribution(self) -> bool:
        """True when full ``(L, N, V)`` logits or probs are held."""
        return self.logits is not None or self.probs is not None

    def get_probs(self) -> Tensor:
        """``(L, N, V)`` probabilities (``probs`` if given, else ``softmax(logits)`` in float32)."""
        if self.probs is not None:
            return to_probs(probs=self.probs)
        if self.logits is None:
            raise ValueError(
                "these records hold per-layer summaries (top2/entropies), not full logits or probs"
            )
        return to_probs(self.logits)

    def preds(self) -> Tensor:
        """``(L, N)`` long argmax prediction of every layer (cached)."""
        if self.predictions is not None:
            return self.predictions.long()
        if self._preds is None:
            source = self.logits if self.logits is not None else self.probs
            if source is None:
                raise ValueError("predictions need logits, probs or predictions in the records")
            self._preds = source.argmax(dim=-1)
        return self._preds

    def summarized(self) -> ExitRecords:
        """A copy holding per-layer summaries instead of the ``(L, N, V)`` logits/probs.

        Measures give the same values on the copy (see :func:`summarize_logits`).
        """
        if not self.has_distribution:
            return self
        if self.logits is not None:
            pred, top2, ent = summarize_logits(self.logits)
        else:
            pred, top2, ent = summarize_logits(probs=self.probs)
        vocab = (self.logits if self.logits is not None else self.probs).shape[-1]  # type: ignore[union-attr]
        return replace(
            self,
            logits=None,
            probs=None,
            predictions=self.preds() if self.predictions is not None else pred,
            top2=top2,
            entropies=ent,
            vocab_size=vocab,
            _preds=None,
        )

    def subset(self, index: Tensor) -> ExitRecords:
        """The records of some tokens: ``index`` is an ``(M,)`` long index or ``(N,)`` bool mask."""
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            index = index.nonzero().squeeze(-1)

        def take(value: Tensor | None, dim: int) -> Tensor | None:
            return None if value is None else value.index_select(dim, index.to(value.device))

        return replace(
            self,
            hidden=take(self.hidden, 1),
            logits=take(self.logits, 1),
            probs=take(self.probs, 1),
            labels=take(self.labels, 0),
            h0=take(self.h0, 0),
            predictions=take(self.predictions, 1),
            top2=take(self.top2, 1),
            entropies=take(self.entropies, 1),
            saturation=take(self.saturation, 1),
            positions=take(self.positions, 0),
            sequence_ids=take(self.sequence_ids, 0),
            _preds=take(self._preds, 1),
        )

    def with_probs(self) -> ExitRecords:
        """A copy with ``probs`` filled in (so repeated measures do not recompute the softmax)."""
        if self.probs is not None or self.logits is None:
            return self
        return replace(self, probs=to_probs(self.logits), _preds=self._preds)


# ---------------------------------------------------------------------------------------------------
# Tensor-level helpers
# ---------------------------------------------------------------------------------------------------


def _full(x: Tensor) -> Tensor:
    """Upcast half/bfloat16/integer tensors to float32; keep float32/float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def to_probs(logits: Tensor | None = None, *, probs: Tensor | None = None) -> Tensor:
    """Return ``(..., V)`` probabilities from exactly one of ``logits`` or ``probs`` (float32+)."""
    if (logits is None) == (probs is None):
        raise ValueError("pass exactly one of logits or probs")
    if probs is not None:
        return _full(probs)
    assert logits is not None
    return torch.softmax(_full(logits), dim=-1)


def to_preds(logits_or_preds: Tensor) -> Tensor:
    """``(L, N)`` long predictions from ``(L, N, V)`` logits/probs (argmax) or ``(L, N)`` integer preds."""
    if logits_or_preds.dim() == 3:
        return logits_or_preds.argmax(dim=-1)
    if logits_or_preds.dim() == 2 and not logits_or_preds.is_floating_point():
        return logits_or_preds.long()
    raise ValueError(
        "expected (L, N, V) logits/probs or (L, N) integer predictions, "
        f"got shape {tuple(logits_or_preds.shape)} dtype {logits_or_preds.dtype}"
    )


def top1_probs(logits: Tensor | None = None, *, probs: Tensor | None = None) -> Tensor:
    """``(L, N)`` each layer's own top-1 probability ``max_v p_i[v]``."""
    return to_probs(logits, probs=probs).amax(dim=-1)


def summarize_logits(
    logits: Tensor | None = None, *, probs: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-layer summaries that every registered measure can be computed from.

    ``(..., V)`` logits (or probs) -> ``predictions (...)`` long argmax, ``top2 (..., 2)`` float32
    largest two probabilities, ``entropies (...)`` float32 entropy in nats.  Computed exactly as the
    measures compute them from full logits (float32 softmax, ``log_softmax`` entropy), so a summary
    record gives identical scores while storing 4 numbers per layer and token instead of ``V``.
    """
    source = logits if logits is not None else probs
    if source is None or (logits is not None and probs is not None):
        raise ValueError("pass exactly one of logits or probs")
    if source.shape[-1] < 2:
        raise ValueError(f"summaries need a vocabulary of at least 2, got V={source.shape[-1]}")
    p = to_probs(logits, probs=probs)
    top2 = p.topk(2, dim=-1).values
    return source.argmax(dim=-1), top2, entropy(logits, probs=probs)


def softmax_max(logits: Tensor | None = None, *, probs: Tensor | None = None) -> Tensor:
    """Softmax max (``p_top1``): ``(L, N, V) -> (L, N)`` in ``[0, 1]``; exit iff score >= lambda."""
    return top1_probs(logits, probs=probs)


def softmax_gap(logits: Tensor | None = None, *, probs: Tensor | None = None) -> Tensor:
    """CALM softmax gap ``p_top1 - p_top2``: ``(L, N, V) -> (L, N)`` in ``[0, 1]``; exit iff >= lambda."""
    p = to_probs(logits, probs=probs)
    if p.shape[-1] < 2:
        raise ValueError(f"softmax_gap needs a vocabulary of at least 2, got V={p.shape[-1]}")
    top2 = p.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def entropy(logits: Tensor | None = None, *, probs: Tensor | None = None) -> Tensor:
    """Raw Shannon entropy ``H(p_i) = -sum_v p log p`` in nats: ``(L, N, V) -> (L, N)``.

    Lower = more confident (DeeBERT exits when ``H < S``).  The registered measure ``"entropy"``
    uses :func:`entropy_score` ``= -H`` so that the rule is ``-H >= threshold``, i.e. pass ``-S``.
    """
    if logits is not None and probs is None:
        logp = torch.log_softmax(_full(logits), dim=-1)
        # a masked (-inf) logit has p = 0 and contributes 0, not 0 * -inf = NaN
        return -(logp.exp() * logp.clamp_min(torch.finfo(logp.dtype).min)).sum(dim=-1)
    p = to_probs(logits, probs=probs)
    return -torch.special.xlogy(p, p).sum(dim=-1)


def normalized_entropy(logits: Tensor | None = None, *, probs: Tensor | None = None) -> Tensor:
    """Raw normalised entropy ``H(p_i) / log V`` in ``[0, 1]`` (FastBERT): ``(L, N, V) -> (L, N)``.

    Lower = more confident.  The registered measure ``"normalized_entropy"`` uses
    :func:`normalized_entropy_score` ``= 1 - H / log V``; exit iff ``H / log V <= 1 - threshold``.
    """
    h = entropy(logits, probs=probs)
    vocab = (logits if logits is not None else probs).shape[-1]  # type: ignore[union-attr]
    if vocab < 2:
        raise ValueError(f"normalized_entropy needs V >= 2, got V={vocab}")
    return h / math.log(vocab)


def entropy_score(logits: Tensor | None = None, *, probs: Tensor | None = None) -> Tensor:
    """``-H(p_i)``: ``(L, N)``, higher = more confident (score of the registered ``"entropy"``)."""
    return -entropy(logits, probs=probs)


def normalized_entropy_score(logits: Tensor | None = None, *, probs: Tensor | None = None) -> Tensor:
    """``1 - H(p_i)/log V``: ``(L, N)`` in ``[0, 1]`` (score of the registered ``"normalized_entropy"``)."""
    return (1.0 - normalized_entropy(logits, probs=probs)).clamp(0.0, 1.0)


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """``cos(a, b)`` over the last dimension: ``(..., d), (..., d) -> (...)``; a zero vector gives 0.

    The one formula of hidden-state saturation, for records and for the decoder alike (so a decoded
    exit equals the recorded one bit for bit). Fewer kernels than ``F.cosine_similarity`` (which
    normalises both inputs first): a decoder pays each kernel at every check, right after a layer has
    streamed its weights through the caches.
    """
    norms = torch.linalg.vecdot(a, a) * torch.linalg.vecdot(b, b)
    return torch.linalg.vecdot(a, b) * torch.rsqrt(norms.clamp_min(1e-16))


def hidden_saturation(hidden: Tensor, h0: Tensor | None = None) -> Tensor:
    """CALM hidden-state saturation ``cos(h_i, h_{i-1})``: ``(L, N, d) -> (L, N)`` in ``[-1, 1]``.

    Layer 1 is compared with ``h0: (N, d)`` (the state before layer 1, e.g. the embeddings) when
    given; otherwise its score is ``-inf`` so that layer 1 never exits under any threshold (with the
    default minimum exit layer of 4 this is moot).  Zero vectors give cosine 0.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape (L, N, d), got {tuple(hidden.shape)}")
    h = _full(hidden)
    out = torch.empty(h.shape[:2], dtype=h.dtype, device=h.device)
    if h.shape[0] > 1:
        out[1:] = cosine(h[1:], h[:-1])
    if h0 is not None:
        if h0.shape != h.shape[1:]:
            raise ValueError(f"h0 must have shape (N, d) = {tuple(h.shape[1:])}, got {tuple(h0.shape)}")
        out[0] = cosine(h[0], h0.to(h.dtype))
    else:
        out[0] = float("-inf")
    return out


def _check_patience(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"patience must be an integer >= 1, got {value!r}")
    return value


def _check_tolerance(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"tolerance must be a number > 0 (a regression score's unchanged margin), got {value!r}")
    return float(value)


def patience(preds: Tensor, P: int, tolerance: float | None = None) -> Tensor:  # noqa: N803 - P as in PABEE
    """PABEE patience rule: ``(L, N)`` bool, True where the exit rule fires.

    Follows PABEE's counter: at layer 1 the counter is 0; at layer ``i >= 2`` it is incremented if
    the prediction is unchanged, ``argmax_i == argmax_{i-1}``, and reset to 0 otherwise.  The rule
    fires at layer ``i`` iff the counter is ``>= P``, i.e. iff ``argmax_{i-P} == ... == argmax_i``
    (``P`` unchanged transitions, ``P + 1`` equal predictions).  The earliest possible exit is layer
    ``P + 1``.  (``>=`` rather than ``==`` so that a rule already satisfied below the minimum exit
    layer still fires there while the prediction stays unchanged.)

    A regression head (PABEE on STS-B) predicts a score ``r_i``; with ``tolerance`` tau "unchanged"
    means ``|r_i - r_{i-1}| < tau``.

    Args:
        preds: ``(L, N)`` integer argmax per layer, or ``(L, N, V)`` logits/probs (argmax taken);
            with ``tolerance``: ``(L, N)`` float scores, or ``(L, N, 1)`` regression logits.
        P: patience, an integer ``>= 1``.
        tolerance: ``None`` (classes) or tau ``> 0`` (regression scores).
    """
    _check_patience(P)
    if tolerance is None:
        p = to_preds(preds)
        unchanged = p[1:] == p[:-1]
    else:
        tau = _check_tolerance(tolerance)
        if preds.dim() == 3:
            if preds.shape[-1] != 1:
                raise ValueError(f"patience with a tolerance compares regression scores: (L, N) or (L, N, 1), "
                                 f"got {tuple(preds.shape)}")
            preds = preds[..., 0]
        r = preds.double()
        unchanged = (r[1:] - r[:-1]).abs() < tau
    same = torch.zeros(unchanged.shape[0] + 1, unchanged.shape[1], dtype=torch.long, device=preds.device)
    counter = torch.zeros(unchanged.shape[1], dtype=torch.long, device=preds.device)
    for i in range(1, same.shape[0]):
        counter = torch.where(unchanged[i - 1], counter + 1, torch.zeros_like(counter))
        same[i] = counter
    return same >= P


def monotonic(
    logits: Tensor | None = None, *, probs: Tensor | None = None, min_confidence: float = 0.9
) -> Tensor:
    """MEE heuristic: ``(L, N, V) -> (L, N)`` bool.

    With ``c_i`` each layer's own top-1 probability, the rule fires at layer ``i`` iff
    ``i >= 3`` and ``c_{i-2} < c_{i-1} < c_i`` (strictly increasing) and ``c_i >= min_confidence``.
    """
    return monotonic_from_top1(top1_probs(logits, probs=probs), min_confidence)


def monotonic_from_top1(c: Tensor, min_confidence: float = 0.9) -> Tensor:
    """:func:`monotonic` from each layer's own top-1 probability ``c: (L, N)`` -> ``(L, N)`` bool."""
    if not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"min_confidence must lie in [0, 1], got {min_confidence!r}")
    fires = torch.zeros(c.shape, dtype=torch.bool, device=c.device)
    if c.shape[0] >= 3:
        fires[2:] = (c[:-2] < c[1:-1]) & (c[1:-1] < c[2:]) & (c[2:] >= min_confidence)
    return fires


_patience_rule = patience


# ---------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeasureSpec:
    """A registered measure.

    Attributes:
        name: registry key.
        fn: ``fn(records, **kwargs) -> (L, N)`` score (float) or fires (bool) tensor.
        kind: ``"score"`` (exit iff score >= threshold) or ``"bool"`` (exit iff True, no threshold).
        score_range: closed range of the score for score measures, used to validate thresholds
            (``(0, 1)`` marks a probability-type measure); ``None`` for boolean measures.
        params: keyword arguments ``fn`` accepts (``ExitPolicy.measure_kwargs``).
        sweep_param: for boolean measures, the keyword that ``sweep`` varies in place of a threshold.
        description: one line for documentation/tables.
    """

    name: str
    fn: Callable[..., Tensor]
    kind: Literal["score", "bool"]
    score_range: tuple[float, float] | None
    params: tuple[str, ...] = ()
    sweep_param: str | None = None
    description: str = ""

    @property
    def is_probability(self) -> bool:
        """True for measures whose score (and therefore threshold) lies in ``[0, 1]``."""
        return self.score_range == (0.0, 1.0)

    def validate_kwargs(self, kwargs: dict[str, Any]) -> None:
        """Raise ``ValueError`` for unknown or invalid keyword arguments."""
        unknown = sorted(set(kwargs) - set(self.params))
        if unknown:
            raise ValueError(
                f"measure {self.name!r} got unknown keyword(s) {unknown}; allowed: {list(self.params)}"
            )
        if "patience" in kwargs:
            _check_patience(kwargs["patience"])
        if kwargs.get("tolerance") is not None:
            _check_tolerance(kwargs["tolerance"])
        if "min_confidence" in kwargs and not 0.0 <= float(kwargs["min_confidence"]) <= 1.0:
            raise ValueError(f"min_confidence must lie in [0, 1], got {kwargs['min_confidence']!r}")


def _need(records: ExitRecords, key: str) -> Tensor:
    if key == "probs":
        if records.probs is None and records.logits is None:
            raise ValueError("this measure needs logits or probs in the records")
        return records.get_probs()
    value = getattr(records, key)
    if value is None:
        raise ValueError(f"this measure needs {key} in the records")
    return value


def _top2(records: ExitRecords) -> Tensor:
    if records.top2 is None:
        raise ValueError("this measure needs logits, probs or top2 summaries in the records")
    return records.top2


def _m_softmax_gap(records: ExitRecords) -> Tensor:
    if records.has_distribution:
        return softmax_gap(probs=_need(records, "probs"))
    top2 = _full(_top2(records))
    return top2[..., 0] - top2[..., 1]


def _m_softmax_max(records: ExitRecords) -> Tensor:
    if records.has_distribution:
        return softmax_max(probs=_need(records, "probs"))
    return _full(_top2(records)[..., 0])


def _entropies(records: ExitRecords) -> Tensor:
    if records.entropies is None:
        raise ValueError("this measure needs logits, probs or entropies in the records")
    return _full(records.entropies)


def _m_entropy(records: ExitRecords) -> Tensor:
    if records.probs is None and records.logits is not None:
        return entropy_score(records.logits)
    if records.probs is not None:
        return entropy_score(probs=records.probs)
    return -_entropies(records)


def _m_normalized_entropy(records: ExitRecords) -> Tensor:
    if records.probs is None and records.logits is not None:
        return normalized_entropy_score(records.logits)
    if records.probs is not None:
        return normalized_entropy_score(probs=records.probs)
    if records.vocab_size is None or records.vocab_size < 2:
        raise ValueError("normalized_entropy on summaries needs vocab_size >= 2 in the records")
    return (1.0 - _entropies(records) / math.log(records.vocab_size)).clamp(0.0, 1.0)


def _m_hidden_saturation(records: ExitRecords) -> Tensor:
    if records.saturation is not None:
        # recorded in float32 from the live states: exact even when ``hidden`` was kept in fp16
        return _full(records.saturation)
    return hidden_saturation(_need(records, "hidden"), records.h0)


def _m_patience(records: ExitRecords, patience: int = 3, tolerance: float | None = None) -> Tensor:
    if tolerance is None:
        return _patience_rule(records.preds(), patience)
    if records.logits is None or records.logits.shape[-1] != 1:
        raise ValueError("patience with a tolerance needs a regression head's scores: logits (L, N, 1) in the records")
    return _patience_rule(records.logits, patience, tolerance)


def _m_monotonic(records: ExitRecords, min_confidence: float = 0.9) -> Tensor:
    if records.has_distribution:
        return monotonic(probs=_need(records, "probs"), min_confidence=min_confidence)
    return monotonic_from_top1(_full(_top2(records)[..., 0]), min_confidence)


_INF = float("inf")

MEASURES: dict[str, MeasureSpec] = {
    spec.name: spec
    for spec in (
        MeasureSpec("softmax_gap", _m_softmax_gap, "score", (0.0, 1.0), description="p_top1 - p_top2"),
        MeasureSpec("softmax_max", _m_softmax_max, "score", (0.0, 1.0), description="p_top1"),
        MeasureSpec(
            "entropy", _m_entropy, "score", (-_INF, 0.0), description="-H(p) in nats (threshold = -S)"
        ),
        MeasureSpec(
            "normalized_entropy",
            _m_normalized_entropy,
            "score",
            (0.0, 1.0),
            description="1 - H(p)/log V (threshold = 1 - S)",
        ),
        MeasureSpec(
            "hidden_saturation", _m_hidden_saturation, "score", (-1.0, 1.0), description="cos(h_i, h_{i-1})"
        ),
        MeasureSpec(
            "patience",
            _m_patience,
            "bool",
            None,
            params=("patience", "tolerance"),
            sweep_param="patience",
            description="PABEE: argmax (regression: score within `tolerance`) unchanged over `patience` layers",
        ),
        MeasureSpec(
            "monotonic",
            _m_monotonic,
            "bool",
            None,
            params=("min_confidence",),
            sweep_param="min_confidence",
            description="MEE: top-1 probs of the last 3 layers strictly increasing and p_i >= min_confidence",
        ),
    )
}


def get_measure(name: str) -> MeasureSpec:
    """Look up a registered measure; unknown names raise ``ValueError`` listing the allowed ones."""
    try:
        return MEASURES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown exit measure {name!r}; allowed: {sorted(MEASURES)}") from None


def compute_measure(name: str, records: ExitRecords, **kwargs: Any) -> Tensor:
    """Compute a registered measure on records: ``(L, N)`` float scores or bool fires."""
    spec = get_measure(name)
    spec.validate_kwargs(kwargs)
    return spec.fn(records, **kwargs)
