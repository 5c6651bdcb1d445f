"""Task metrics of the early-exit papers, computed with well-kept libraries.

Every metric is on a 0-100 scale and higher is better:

- ``rouge1``, ``rouge2``, ``rougeL``, ``rougeLsum``: the ``rouge-score`` package (Porter stemming, its
  default tokeniser: lowercase, ASCII letters and digits only). Corpus score = mean over examples of the
  F-measure x 100, as HF ``evaluate`` and the papers (CALM, FREE) report. ``rougeLsum`` is summary-level
  LCS over sentences separated by ``"\\n"``; a text without any newline is split into sentences after
  ``.``, ``!``, ``?`` (optionally followed by a closing quote or bracket) and whitespace, instead of
  nltk's punkt, which would need a download.
- ``bleu``: sacrebleu's BLEU (13a tokenisation) as is; ``corpus_bleu`` for a corpus, ``sentence_bleu``
  (effective order) per example.
- ``squad_em``, ``squad_f1``: SQuAD v1.1's official exact match / token F1 (lowercase, no punctuation,
  no articles a/an/the, single spaces) x 100, max over the ground truths of each example.
- ``accuracy``, ``f1`` (binary F1 of class 1: GLUE MRPC / QQP): ``torchmetrics.functional`` x 100;
  ``matthews`` (CoLA): sklearn's (GLUE's) formula on the confusion matrix, 0 when the predictions or the
  labels are all one class (torchmetrics gives +-8 for an exit that always says the majority class);
  ``pearson`` and ``spearman`` (STS-B): Pearson's r of the scores / of their average ranks (ties share
  the mean rank, as scipy), NaN for a constant side, a NaN input or a single example.

With several references per example, ROUGE and SQuAD take the best reference per example, BLEU counts
n-grams against all of them (multi-reference BLEU).
"""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

import sacrebleu
import torch
from rouge_score import rouge_scorer
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_f1_score,
    multiclass_accuracy,
    multiclass_confusion_matrix,
)

from eetrain.errors import ConfigError

TEXT_METRICS: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "squad_em", "squad_f1")
LABEL_METRICS: tuple[str, ...] = ("accuracy", "f1", "matthews", "pearson", "spearman")

Reference = str | Sequence[str]

_ROUGE = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_CLASSIFICATION = ("accuracy", "f1", "matthews")
# A sentence ends at . ! ? (or one of them followed by a closing quote / bracket) before whitespace.
# Two fixed-width look-behinds, since `re` has no variable-width ones.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'\u201d\u2019)\]])\s+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def check_metrics(names: Sequence[str], kind: str, key: str = "data.metrics") -> None:
    """Raise ConfigError naming `key` and the allowed values if a name is not a metric of `kind`.

    kind: "text" (generated sequences: TEXT_METRICS) or "label" (class ids / scores: LABEL_METRICS).
    """
    allowed = {"text": TEXT_METRICS, "label": LABEL_METRICS}.get(kind)
    if allowed is None:
        raise ValueError(f"kind must be 'text' or 'label', not {kind!r}")
    if isinstance(names, str):
        # A bare string would be iterated character by character.
        raise ConfigError(
            f"{key}: expected a list of metric names, got the string {names!r}; allowed: {', '.join(allowed)}"
        )
    for name in names:
        if name not in allowed:
            raise ConfigError(
                f"{key}: unknown metric {name!r} for a {kind} task; allowed: {', '.join(allowed)}"
            )


def corpus_scores(
    names: Sequence[str], predictions: Sequence[str], references: Sequence[Reference]
) -> dict[str, float]:
    """Corpus-level TEXT_METRICS, each on 0-100.

    predictions: one string per example; references: per example one string or a non-empty sequence of
    strings (all count). Returns {name: score} for the requested names.
    """
    check_metrics(names, "text", key="metrics")
    refs = _check_text(predictions, references)
    out: dict[str, float] = {}
    rouge = [n for n in _ROUGE if n in names]
    if rouge:
        per_example = _rouge(tuple(rouge), predictions, refs)
        out.update({n: sum(v) / len(v) for n, v in per_example.items()})
    if "bleu" in names:
        out["bleu"] = sacrebleu.corpus_bleu(list(predictions), _reference_streams(refs)).score
    for name in ("squad_em", "squad_f1"):
        if name in names:
            values = _squad(name, predictions, refs)
            out[name] = sum(values) / len(values)
    return {n: out[n] for n in names}


def sentence_scores(name: str, predictions: Sequence[str], references: Sequence[Reference]) -> list[float]:
    """One TEXT_METRICS score per example on 0-100 (e.g. per-sequence risks for calibration).

    ROUGE and SQuAD scores average to `corpus_scores`; BLEU is sacrebleu's `sentence_bleu` (effective
    order), whose mean is not the corpus BLEU.
    """
    check_metrics([name], "text", key="metrics")
    refs = _check_text(predictions, references)
    if name in _ROUGE:
        return _rouge((name,), predictions, refs)[name]
    if name == "bleu":
        pairs = zip(predictions, refs, strict=True)
        return [sacrebleu.sentence_bleu(p, r, use_effective_order=True).score for p, r in pairs]
    return _squad(name, predictions, refs)


def label_scores(
    names: Sequence[str], predictions: Tensor, labels: Tensor, num_classes: int | None = None
) -> dict[str, float]:
    """LABEL_METRICS on 0-100.

    predictions, labels: (N,). For accuracy / f1 / matthews both are integer class ids (f1 needs {0, 1});
    for pearson / spearman any real scores. num_classes defaults to 1 + the largest id seen (at least 2).
    """
    check_metrics(names, "label", key="metrics")
    if predictions.ndim != 1 or labels.ndim != 1:
        raise ValueError(
            f"predictions and labels must be 1-D (N,), got {tuple(predictions.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if len(predictions) == 0:
        raise ValueError("no predictions to score")
    preds, target = predictions.detach().cpu(), labels.detach().cpu()
    out: dict[str, float] = {}
    if any(n in _CLASSIFICATION for n in names):
        if preds.is_floating_point() or target.is_floating_point():
            raise ValueError("accuracy, f1 and matthews need integer class ids; argmax the logits first")
        preds, target = preds.long(), target.long()
        if min(int(preds.min()), int(target.min())) < 0:
            raise ValueError("class ids must be >= 0")
        k = num_classes or max(int(preds.max()), int(target.max()), 1) + 1
        if "accuracy" in names:
            out["accuracy"] = float(multiclass_accuracy(preds, target, num_classes=k, average="micro"))
        if "f1" in names:
            if max(int(preds.max()), int(target.max())) > 1:
                raise ValueError("f1 is the binary F1 of class 1 and needs class ids in {0, 1}")
            out["f1"] = float(binary_f1_score(preds, target))
        if "matthews" in names:
            out["matthews"] = matthews(multiclass_confusion_matrix(preds, target, num_classes=k))
    if "pearson" in names:
        out["pearson"] = pearson(preds.double(), target.double())
    if "spearman" in names:
        out["spearman"] = spearman(preds.double(), target.double())
    return {n: 100.0 * out[n] for n in names}


def matthews(confusion: Tensor) -> float:
    """Matthews correlation of a (K, K) confusion matrix (rows: labels, columns: predictions), the
    K-class form sklearn and GLUE use: (c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)) with c the correct
    count, s the total, t / p the per-class label / prediction counts; 0 when a factor is 0."""
    cm = confusion.double()
    t, p, c, s = cm.sum(1), cm.sum(0), cm.trace(), cm.sum()
    denominator = (s * s - p @ p) * (s * s - t @ t)
    return float((c * s - t @ p) / denominator.sqrt()) if denominator > 0 else 0.0


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson's r of (N,) float64 tensors; NaN when either is constant, holds a NaN, or N < 2."""
    if len(x) < 2 or bool(x.isnan().any() or y.isnan().any()):
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denominator = (dx @ dx * (dy @ dy)).sqrt()
    return float((dx @ dy) / denominator) if denominator > 0 else float("nan")


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman's rho of (N,) float64 tensors: Pearson's r of their average ranks; NaN as `pearson`."""
    if bool(x.isnan().any() or y.isnan().any()):  # ranking would place a NaN as the largest value
        return float("nan")
    return pearson(average_ranks(x), average_ranks(y))


def average_ranks(x: Tensor) -> Tensor:
    """(N,) ranks 1..N of `x`, tied values sharing the mean of their ranks (scipy's `rankdata`)."""
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    first = counts.cumsum(0) - counts + 1
    return (first + (counts - 1) / 2).double()[inverse]


def _check_text(predictions: Sequence[str], references: Sequence[Reference]) -> list[list[str]]:
    """Validate lengths and give each example's references as a non-empty list."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise ValueError(
            "predictions and references must be sequences with one entry per example, not a string"
        )
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if len(predictions) == 0:
        raise ValueError("no predictions to score")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    for i, r in enumerate(refs):
        if not r:
            raise ValueError(f"example {i} has no reference")
    return refs


@lru_cache(maxsize=16)
def _scorer(types: tuple[str, ...]) -> rouge_scorer.RougeScorer:
    # rouge-score announces its default tokenizer through absl at INFO, which Hydra's logging prints
    logging.getLogger("absl").setLevel(logging.WARNING)
    return rouge_scorer.RougeScorer(list(types), use_stemmer=True)


def _sentences(text: str) -> str:
    """Text with one sentence per line (rougeLsum's unit); text that already has newlines is kept."""
    if "\n" in text:
        return text
    return "\n".join(_SENTENCE_END.split(text.strip()))


def _rouge(
    types: tuple[str, ...], predictions: Sequence[str], refs: list[list[str]]
) -> dict[str, list[float]]:
    """Per-example F-measure x 100 of each ROUGE type, best reference per example and type."""
    scorer = _scorer(types)
    split = "rougeLsum" in types  # newlines are whitespace to the other types' tokeniser, so no harm
    out: dict[str, list[float]] = {t: [] for t in types}
    for pred, rs in zip(predictions, refs, strict=True):
        if split:
            pred, rs = _sentences(pred), [_sentences(r) for r in rs]
        scores = scorer.score_multi(rs, pred)
        for t in types:
            out[t].append(100.0 * scores[t].fmeasure)
    return out


def _reference_streams(refs: list[list[str]]) -> list[list[str]]:
    """sacrebleu's layout: stream j holds every example's j-th reference; a missing one repeats the first
    (a duplicate reference changes no clipped count and no closest length, so BLEU is unchanged)."""
    width = max(len(r) for r in refs)
    return [[r[j] if j < len(r) else r[0] for r in refs] for j in range(width)]


def _normalize_answer(text: str) -> str:
    """SQuAD v1.1 official normalisation: lowercase, drop punctuation, articles, extra whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _squad_f1(prediction: str, truth: str) -> float:
    pred_tokens, truth_tokens = _normalize_answer(prediction).split(), _normalize_answer(truth).split()
    same = sum((Counter(pred_tokens) & Counter(truth_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def _squad(name: str, predictions: Sequence[str], refs: list[list[str]]) -> list[float]:
    """Per-example SQuAD EM or F1 x 100, max over the example's ground truths."""
    if name == "squad_em":
        return [
            100.0 * max(float(_normalize_answer(p) == _normalize_answer(t)) for t in ts)
            for p, ts in zip(predictions, refs, strict=True)
        ]
    return [100.0 * max(_squad_f1(p, t) for t in ts) for p, ts in zip(predictions, refs, strict=True)]
