"""Calibrating an exit policy on real early-exit decoding, not on teacher-forced records.

Records score every layer of every token with the *full* model's keys/values for the earlier tokens.
While decoding, earlier tokens exited too, and with CALM's state copying the skipped layers' keys/values
are projections of exit states: what a classifier reads shifts, and errors compound over the sequence.
So a threshold certified on records can miss its target in use. Here each candidate threshold decodes
a calibration split with the decoder's own strategy, per-sequence risks are measured against
full-model greedy decoding, and Learn-then-Test (`eetrain.exits.calibration`) picks the threshold.

The risk is token consistency (the share of the full model's tokens not reproduced) or, with a task
metric such as ROUGE-L, CALM's textual consistency `1 - m(early exit, full) / 100` (no labels needed) or
its risk consistency `max(0, m(full, ref) - m(early exit, ref)) / 100` (`against="reference"`), so
`delta` is the allowed drop of the metric on a 0-1 scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from eetrain.backbones.base import pad
from eetrain.exits.calibration import calibrate_threshold, ltt_scan

from .generate import GenerateOutput, generate
from .metrics import token_consistency


def batches(backbone: Any, examples: Sequence[dict[str, Any]], size: int) -> list[dict[str, torch.Tensor]]:
    """Source-only batches `{input_ids, attention_mask}` of `size` examples (the prompts to decode)."""
    device = next(backbone.parameters()).device
    out = []
    for i in range(0, len(examples), size):
        sources = [e["source_ids"] for e in examples[i : i + size]]
        out.append({
            "input_ids": pad(sources, backbone.pad_token_id).to(device),
            "attention_mask": pad([[1] * len(s) for s in sources], 0).to(device),
        })
    return out


def decode_all(backbone: Any, prompts: Sequence[dict[str, torch.Tensor]], policy: Any, **kwargs: Any) -> list[GenerateOutput]:
    return [generate(backbone, batch, policy, **kwargs) for batch in prompts]


def sequences(outputs: Sequence[GenerateOutput]) -> list[list[int]]:
    return [s for o in outputs for s in o.sequences()]


def sequence_risks(outputs: Sequence[list[int]], full: Sequence[list[int]], reduction: str = "share") -> torch.Tensor:
    """Per-sequence risk in [0, 1] against the full model's output: the share of its tokens not reproduced
    at the same position (`share`) or 1 if any is not (`any`)."""
    risks = [1.0 - token_consistency([o], [f]) for o, f in zip(outputs, full, strict=True)]
    if reduction == "any":
        risks = [float(r > 0) for r in risks]
    return torch.tensor(risks, dtype=torch.float64)


def metric_risks(
    metric: str, outputs: Sequence[str], full: Sequence[str], references: Sequence[Any] | None = None
) -> torch.Tensor:
    """Per-sequence task-metric risk in [0, 1] (metric on 0-100): `1 - m(output, full)/100` without
    references (textual consistency; 0 for an output identical to the full model's, which some metrics
    score 0: empty text, one word under rouge2, text ROUGE's tokenizer drops), `max(0, m(full, ref) -
    m(output, ref))/100` with them. Scores are clipped to [0, 100] (sacrebleu gives 100.00000000000004)."""
    from eetrain.task_metrics import sentence_scores

    def scores(texts: Sequence[str], against: Sequence[Any]) -> torch.Tensor:
        return torch.tensor(sentence_scores(metric, texts, against), dtype=torch.float64).clamp(0.0, 100.0)

    if references is None:
        identical = torch.tensor([o == f for o, f in zip(outputs, full, strict=True)])
        return torch.where(identical, 0.0, 1.0 - scores(outputs, list(full)) / 100.0)
    return (scores(full, references) - scores(outputs, references)).clamp(min=0.0) / 100.0


def calibrate_online(
    backbone: Any,
    examples: Sequence[dict[str, Any]],
    template: Any,
    thresholds: Sequence[float],
    *,
    epsilon: float,
    delta: float,
    pvalue: str,
    reduction: str = "share",
    batch_size: int = 16,
    risk: str = "consistency",
    references: Sequence[Any] | None = None,
    **decode: Any,
) -> dict[str, Any]:
    """Learn-then-Test over `thresholds` (descending, stopping at the first failure) with risks measured
    on real decoding of `examples` with `template.at_value(t)` (a boolean rule: its parameter).

    risk: `consistency` (tokens) or a text metric (see `metric_risks`; `references` given: against them).
    decode: `generate`'s keyword arguments (strategy, max_new_tokens, batch_mode, check_every, ...).
    Returns `{threshold, scan, decoded}`: the certified threshold (None: none), the LTT rows, and per
    decoded threshold its token consistency and mean exit layer.
    """
    prompts = batches(backbone, examples, batch_size)
    full = sequences(decode_all(backbone, prompts, None, **{k: v for k, v in decode.items()
                                                              if k not in ("check_every", "candidates")}))
    tok = backbone.tokenizer
    full_text = [tok.decode(s, skip_special_tokens=True) for s in full]
    decoded: dict[float, dict[str, float]] = {}

    def risk_at(threshold: float) -> torch.Tensor:
        outs = decode_all(backbone, prompts, template.at_value(threshold), **decode)
        seqs = sequences(outs)
        layers = torch.cat([o.exit_layers[o.exit_layers > 0] for o in outs]).double()
        decoded[threshold] = {
            "consistency": token_consistency(seqs, full),
            "mean_exit_layer": float(layers.mean()) if layers.numel() else float("nan"),
        }
        if risk == "consistency":
            return sequence_risks(seqs, full, reduction)
        per = metric_risks(risk, [tok.decode(s, skip_special_tokens=True) for s in seqs], full_text, references)
        decoded[threshold][f"{risk}_risk"] = float(per.mean())
        return per

    candidates = sorted({float(t) for t in thresholds}, reverse=True)
    cache: dict[float, torch.Tensor] = {}

    def cached(threshold: float) -> torch.Tensor:
        if threshold not in cache:
            cache[threshold] = risk_at(threshold)
        return cache[threshold]

    scan = ltt_scan(cached, candidates, epsilon, delta, pvalue)  # type: ignore[arg-type]
    chosen = calibrate_threshold(cached, candidates, epsilon, delta, pvalue)  # type: ignore[arg-type]
    against = "" if risk == "consistency" else (" vs references" if references is not None else " vs full model")
    return {"threshold": chosen, "scan": scan, "decoded": {str(k): v for k, v in decoded.items()},
            "risk": risk + against}
