"""Learned exit classifiers (CALM, MEE) and their training targets.

Every classifier is an ``nn.Module`` producing 2-class exit logits (index 1 = exit, index 0 = go on)
with ``bias=True`` everywhere (the public code trained a head without bias and deployed one with
bias).  Besides ``forward`` on its natural input, each class has ``record_logits(hidden)`` mapping a
full record ``(L, N, d)`` to ``(L, N, 2)``; :func:`exit_probabilities` turns that into ``P(exit)``
``(L, N)`` in ``[0, 1]`` (exit iff ``P(exit) >= threshold``).

Training targets (CALM/FREE/MEE): :func:`exit_labels` (consistency oracle against the *last* layer)
and :func:`class_balanced_cross_entropy`.

Feature space (``features``, saved with the classifier): ``raw`` -- the residual stream h_i, as CALM
reads it -- or ``normed`` -- the family's final norm of it, ``backbone.final_norm(h_i)``, as FREE and
MEE read it. Records (:func:`eetrain.exits.record.record_exits`) and the decoder
(:class:`eetrain.decoding.decisions.LayerDecider`) hand a classifier states in its own space
(:func:`feature_states`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eetrain.files import atomic_file

__all__ = [
    "FEATURES",
    "check_features",
    "feature_states",
    "ExitClassifier",
    "CalmClassifier",
    "ThreeStateMLP",
    "LSTMClassifier",
    "CLASSIFIERS",
    "exit_probabilities",
    "save_classifier",
    "load_classifier",
    "exit_labels",
    "class_balanced_cross_entropy",
]

EXIT_INDEX = 1

#: the spaces a classifier (and hidden-state saturation) can read layer states in (module docstring)
FEATURES = ("raw", "normed")


def check_features(features: object, key: str = "exit.features") -> str:
    """``features`` if it is a known feature space, else ``ValueError`` naming ``key``."""
    if features not in FEATURES:
        raise ValueError(f"{key}={features!r}; allowed: {', '.join(FEATURES)}")
    return str(features)


def feature_states(backbone: Any, hidden: Tensor, features: str) -> Tensor:
    """Layer states ``(..., d)`` in the space ``features``: as they are (``raw``) or through the family's
    final norm (``normed``; BERT is post-norm, so its two spaces coincide)."""
    if check_features(features) == "raw":
        return hidden
    return backbone.final_norm(hidden)


class ExitClassifier(nn.Module):
    """Base class: remembers its constructor kwargs (``self.config``) for saving."""

    kind: str = ""

    def __init__(self, **config: Any) -> None:
        super().__init__()
        config["features"] = check_features(config.get("features", "raw"), f"{self.kind} classifier features")
        self.config: dict[str, Any] = dict(config)

    @property
    def hidden_size(self) -> int:
        """The backbone hidden size ``d`` the classifier reads."""
        return int(self.config["d"])

    @property
    def features(self) -> str:
        """The space of the states it reads: ``raw`` or ``normed`` (module docstring)."""
        return str(self.config.get("features", "raw"))

    def record_logits(self, hidden: Tensor) -> Tensor:  # pragma: no cover - abstract
        """``(L, N, d) -> (L, N, 2)`` exit logits for every layer of every token."""
        raise NotImplementedError

    def _check_hidden(self, hidden: Tensor) -> Tensor:
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden must have shape (L, N, {self.hidden_size}), got {tuple(hidden.shape)}")
        param = next(self.parameters())
        return hidden.to(device=param.device, dtype=param.dtype)


class CalmClassifier(ExitClassifier):
    """CALM's classifier on ``h_i``, shared across layers.

    ``hidden=None``: ``Linear(d, 2)``; else ``Linear(d, hidden) -> ReLU -> Linear(hidden, 2)``.
    ``forward``: ``(..., d) -> (..., 2)``.
    """

    kind = "calm"

    def __init__(self, d: int, hidden: int | None = None, features: str = "raw") -> None:
        super().__init__(d=d, hidden=hidden, features=features)
        if hidden is None:
            self.net: nn.Module = nn.Linear(d, 2, bias=True)
        else:
            self.net = nn.Sequential(
                nn.Linear(d, hidden, bias=True), nn.ReLU(), nn.Linear(hidden, 2, bias=True)
            )

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)

    def record_logits(self, hidden: Tensor) -> Tensor:
        """``(L, N, d) -> (L, N, 2)``."""
        return self(self._check_hidden(hidden))


class ThreeStateMLP(ExitClassifier):
    """MEE classifier on ``concat(h_{i-2}, h_{i-1}, h_i)``: ``Linear(3d, w) -> ReLU -> Linear(w, 2)``.

    ``w`` = ``width``, default ``d`` (MEE's size: a check then costs ``3d^2`` multiply-adds, about a
    fifth of a T5 layer; a narrower width makes it cheaper). ``forward``: ``(..., 3d) -> (..., 2)``.
    For layers ``i < 3`` the missing states ``h_0``/``h_{-1}`` are **zeros** (see :meth:`stack_states`);
    with the usual minimum exit layer 4 this is moot.
    """

    kind = "three_state_mlp"

    def __init__(self, d: int, width: int | None = None, features: str = "raw") -> None:
        if width is not None and width < 1:
            raise ValueError(f"three_state_mlp width must be >= 1, got {width!r}")
        if width is None:
            super().__init__(d=d, features=features)
        else:
            super().__init__(d=d, width=width, features=features)
        w = d if width is None else width
        self.net = nn.Sequential(nn.Linear(3 * d, w, bias=True), nn.ReLU(), nn.Linear(w, 2, bias=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    @staticmethod
    def stack_states(hidden: Tensor) -> Tensor:
        """``(L, N, d) -> (L, N, 3d)``: row ``i-1`` is ``concat(h_{i-2}, h_{i-1}, h_i)``, zero-padded."""
        pad = hidden.new_zeros((2, *hidden.shape[1:]))
        padded = torch.cat([pad, hidden], dim=0)
        L = hidden.shape[0]
        return torch.cat([padded[0:L], padded[1 : L + 1], padded[2 : L + 2]], dim=-1)

    def record_logits(self, hidden: Tensor) -> Tensor:
        """``(L, N, d) -> (L, N, 2)``."""
        return self(self.stack_states(self._check_hidden(hidden)))


class LSTMClassifier(ExitClassifier):
    """MEE classifier: an LSTM over ``h_1..h_i``; the output at step ``i`` -> ``Linear(hidden_size, 2)``.

    ``nn.LSTM(d, hidden_size, num_layers, batch_first=True)`` (bias on, no dropout, unidirectional,
    zero initial state).  ``forward``: ``(B, T, d) -> (B, T, 2)``, the logits after every step; since
    the LSTM is causal, step ``i`` only sees ``h_1..h_i``.  :meth:`record_logits` runs the LSTM once
    over the ``L`` states of all ``N`` tokens (batch = tokens) and reads every step.
    """

    kind = "lstm"

    def __init__(self, d: int, hidden_size: int = 250, num_layers: int = 1, features: str = "raw") -> None:
        super().__init__(d=d, hidden_size=hidden_size, num_layers=num_layers, features=features)
        self.lstm = nn.LSTM(d, hidden_size, num_layers=num_layers, bias=True, batch_first=True)
        self.head = nn.Linear(hidden_size, 2, bias=True)

    def forward(self, seq: Tensor) -> Tensor:
        out, _ = self.lstm(seq)
        return self.head(out)

    def record_logits(self, hidden: Tensor) -> Tensor:
        """``(L, N, d) -> (L, N, 2)``: one LSTM pass over the layers, batch = tokens."""
        seq = self._check_hidden(hidden).transpose(0, 1)  # (N, L, d)
        return self(seq).transpose(0, 1)


CLASSIFIERS: dict[str, type[ExitClassifier]] = {
    cls.kind: cls for cls in (CalmClassifier, ThreeStateMLP, LSTMClassifier)
}


def exit_probabilities(classifier: ExitClassifier, hidden: Tensor) -> Tensor:
    """``P(exit)`` per layer and token: ``(L, N, d) -> (L, N)`` float in ``[0, 1]`` (no grad)."""
    with torch.no_grad():
        logits = classifier.record_logits(hidden)
    return torch.softmax(logits.float(), dim=-1)[..., EXIT_INDEX]


# ---------------------------------------------------------------------------------------------------
# Persistence
# ---------------------------------------------------------------------------------------------------

_FORMAT = "eetrain.exit_classifier"
_VERSION = 1


def save_classifier(module: ExitClassifier, path: str | os.PathLike[str]) -> None:
    """Save kind, constructor kwargs and state_dict in one file, atomically (``eetrain.files.atomic_file``)."""
    if not isinstance(module, ExitClassifier) or module.kind not in CLASSIFIERS:
        raise ValueError(
            f"can only save registered exit classifiers {sorted(CLASSIFIERS)}, got {type(module).__name__}"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": _FORMAT,
        "version": _VERSION,
        "kind": module.kind,
        "kwargs": dict(module.config),
        "state_dict": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
    }
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())


def load_classifier(
    path: str | os.PathLike[str],
    expected_hidden_size: int | None = None,
    map_location: str | torch.device = "cpu",
) -> ExitClassifier:
    """Load a classifier written by :func:`save_classifier` (strict state_dict, ``weights_only``).

    Raises:
        ValueError: not a classifier file, unknown kind, or ``expected_hidden_size`` given and
            different from the checkpoint's hidden size (both sizes are named).
    """
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(f"{path} is not an eetrain exit-classifier checkpoint")
    kind = payload["kind"]
    if kind not in CLASSIFIERS:
        raise ValueError(f"unknown classifier kind {kind!r} in {path}; allowed: {sorted(CLASSIFIERS)}")
    kwargs = dict(payload["kwargs"])
    if expected_hidden_size is not None and int(kwargs["d"]) != int(expected_hidden_size):
        raise ValueError(
            f"classifier checkpoint {path} has hidden size {kwargs['d']} but the model has hidden size "
            f"{expected_hidden_size}"
        )
    module = CLASSIFIERS[kind](**kwargs)
    module.load_state_dict(payload["state_dict"], strict=True)
    return module


# ---------------------------------------------------------------------------------------------------
# Training targets
# ---------------------------------------------------------------------------------------------------


def exit_labels(logits: Tensor) -> Tensor:
    """Consistency oracle: ``(L, N, V) -> (L, N)`` bool, ``label_i = argmax z_i == argmax z_L``.

    The reference is the **last** layer ``L`` (index ``-1``), not ``L - 1`` (a bug in public code).
    Also accepts ``(L, N)`` integer predictions.  Layer ``L`` is always labelled True.
    """
    if logits.dim() == 3:
        preds = logits.argmax(dim=-1)
    elif logits.dim() == 2 and not logits.is_floating_point():
        preds = logits
    else:
        raise ValueError(
            f"expected (L, N, V) logits or (L, N) integer predictions, got {tuple(logits.shape)}"
        )
    return preds == preds[-1:]


def class_balanced_cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Cross-entropy with class weights inversely proportional to class frequency in the batch.

    With ``M`` valid examples (targets != ``ignore_index``), ``K`` classes *present* and ``n_c`` examples
    of class ``c``, example ``j`` gets weight ``w_{y_j} = M / (K * n_{y_j})`` and the loss is
    ``(1/M) * sum_j w_{y_j} * CE_j`` -- equivalently the mean over present classes of each class's
    mean CE, so every present class counts equally.  Absent classes get no weight, so a batch with one
    class present reduces to the plain mean CE; an empty batch gives ``0`` (still differentiable).

    Args:
        logits: ``(M, C)`` (``C = 2`` for exit classifiers; index 1 = exit).
        targets: ``(M,)`` integer or bool class indices.
        ignore_index: targets to skip.

    Returns:
        A scalar tensor.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits (M, C) and targets (M,), got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    targets = targets.long()
    valid = targets != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    logits_v = logits[valid].float()
    targets_v = targets[valid]
    ce = F.cross_entropy(logits_v, targets_v, reduction="none")
    counts = torch.bincount(targets_v, minlength=logits.shape[1]).to(ce.dtype)
    present = int((counts > 0).sum())
    weights = torch.where(
        counts > 0, targets_v.numel() / (present * counts.clamp_min(1)), torch.zeros_like(counts)
    )
    return (weights[targets_v] * ce).sum() / targets_v.numel()
