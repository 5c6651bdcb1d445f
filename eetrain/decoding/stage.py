"""Stage `generate`: decode a data split with early exit and with the full model, in the same run.

Writes `generations.jsonl` (source, output, reference, per-token exit layers, the full model's output)
and `generation_summary.json`, and prints the summary: tokens/s of both, speed-up, mean exit layer,
decision share of the time, token consistency with the full model, FLOPs per token of both (counted on
the batches of the first `decoding.flops_examples` examples, decoded once more untimed). With W&B on:
the histogram of the tokens' exit layers and the summary (`generate/...`,
`eetrain.wandb_panels.log_generation`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from eetrain.backbones.base import pad
from eetrain.errors import ConfigError
from eetrain.exits.beta_mixture import check_adaptive_policy
from eetrain.exits.policy import ExitPolicy
from eetrain.files import atomic_file, write_json

from .adaptive import KEY as ADAPTIVE_KEY
from .adaptive import AdaptiveThreshold, adaptive_generate, count_adaptive
from .decisions import LayerDecider, check_policy, describe, with_check_every
from .flops import flops_per_token, format_flops
from .generate import GenerateOutput, generate, require_token_head
from .metrics import sequence_consistency, token_consistency
from .settings import (
    build_policy,
    check_schedule,
    decoding_settings,
    naming_the_export,
    policy_fields,
    run_policy_fields,
)


def check_config(cfg: Any, backbone: Any) -> None:
    """Validate `decoding` before any training (and the policy against the model)."""
    require_token_head(backbone, "stages=[generate] decodes text: it")
    settings = decoding_settings(cfg, backbone.name_or_path)
    E, L = settings.draft_layer, backbone.num_layers
    if settings.strategy == "self_speculative" and E is not None and not 1 <= E < L:
        raise ConfigError(f"decoding.draft_layer={E}; allowed: 1..{L - 1} (below the model's {L} layers)")
    node = (cfg.get("decoding") or {}).get("policy") or {}
    if settings.strategy == "self_speculative" and node.get("measure") not in (None, "full"):
        raise ConfigError(f"decoding.policy.measure={node.get('measure')!r}: decoding.strategy=self_speculative takes no "
                          "exit policy (it drafts at decoding.draft_layer and verifies every draft with the full "
                          "model); allowed with a policy: copy, parallel")
    fields = policy_fields(cfg, backbone.name_or_path)
    policy = build_policy(fields, backbone, backbone.name_or_path, horizon=settings.max_new_tokens)
    if policy is not None:
        with naming_the_export(backbone.name_or_path):
            check_policy(policy, backbone.num_layers, backbone.hidden_size)
        LayerDecider(with_check_every(policy, fields.get("check_every"), backbone.num_layers), backbone,
                     backbone.num_layers, candidates=fields.get("candidates"))
    if settings.adaptive_threshold is not None:
        check_adaptive_policy(None if settings.strategy == "self_speculative" else policy, ADAPTIVE_KEY)
    if settings.rollback is not None and policy is None:
        raise ConfigError("decoding.rollback needs an exit policy (decoding.policy.measure=full decodes without "
                          "exits: nothing to roll back)")


def _batches(backbone: Any, examples: list[dict[str, Any]], size: int, device: torch.device):
    pad_id = backbone.pad_token_id
    for i in range(0, len(examples), size):
        chunk = examples[i : i + size]
        sources = [e["source_ids"] for e in chunk]
        yield chunk, {
            "input_ids": pad(sources, pad_id).to(device),
            "attention_mask": pad([[1] * len(s) for s in sources], 0).to(device),
        }


def _summary(
    ee: list[GenerateOutput], full: list[GenerateOutput] | None, settings: Any, label: str,
    adaptive: AdaptiveThreshold | None = None, adaptive_seconds: float = 0.0,
) -> dict[str, Any]:
    tokens = sum(o.num_tokens for o in ee)
    seconds = sum(o.seconds for o in ee) + adaptive_seconds  # the estimator's pass is early exit's cost
    layers = torch.cat([o.exit_layers[o.exit_layers > 0] for o in ee]).double()
    out: dict[str, Any] = {
        "policy": label,
        "strategy": settings.strategy,
        "batch_mode": ee[0].batch_mode if ee else settings.batch_mode,
        "batch_size": settings.batch_size,
        "examples": sum(o.tokens.shape[0] for o in ee),
        "num_layers": ee[0].num_layers if ee else None,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds else float("nan"),
        "mean_exit_layer": float(layers.mean()) if layers.numel() else float("nan"),
        "decision_seconds": sum(o.decision_seconds for o in ee),
        "layer_seconds": sum(o.layer_seconds for o in ee),
        "prefill_seconds": sum(o.prefill_seconds for o in ee),
        "head_seconds": sum(o.head_seconds for o in ee),
        "checks": sum(o.checks for o in ee),
        "decision_fraction": sum(o.decision_seconds for o in ee) / seconds if seconds else float("nan"),
        "temperature": settings.temperature,
    }
    if settings.rollback is not None:
        out.update(rollback=settings.rollback, rollbacks=sum(o.rollbacks for o in ee),
                   discarded_tokens=sum(o.discarded_tokens for o in ee))
    if adaptive is not None:
        out.update(
            adaptive_threshold=adaptive.current,
            adaptive_thresholds=adaptive.thresholds,
            adaptive_updates=len(adaptive.thresholds),
            adaptive_pairs=adaptive.num_pairs,
            adaptive_seconds=adaptive_seconds,
        )
    if full:
        f_tokens = sum(o.num_tokens for o in full)
        f_seconds = sum(o.seconds for o in full)
        ee_seqs = [s for o in ee for s in o.sequences()]
        full_seqs = [s for o in full for s in o.sequences()]
        out.update(
            full_tokens=f_tokens,
            full_seconds=f_seconds,
            full_tokens_per_second=f_tokens / f_seconds if f_seconds else float("nan"),
            speedup=(tokens / seconds) / (f_tokens / f_seconds) if seconds and f_seconds else float("nan"),
            token_consistency=token_consistency(ee_seqs, full_seqs),
            sequence_consistency=sequence_consistency(ee_seqs, full_seqs),
        )
    return out


def flops_summary(counted: list[tuple[GenerateOutput, GenerateOutput | None]]) -> dict[str, Any]:
    """FLOPs of the counted batches' decodes (early exit, and the full model where it ran): per generated
    token of decoding, their ratio, and the prefill's per example (the same for both)."""
    if not counted:
        return {}
    ee = [e for e, _ in counted]
    examples = sum(o.tokens.shape[0] for o in ee)
    out: dict[str, Any] = {
        "flops_examples": examples,
        "flops_per_token": flops_per_token(ee),
        "prefill_flops_per_example": sum(o.prefill_flops for o in ee) / examples,
    }
    full = [f for _, f in counted if f is not None]
    if full:
        out["full_flops_per_token"] = flops_per_token(full)
        out["flops_ratio"] = out["flops_per_token"] / out["full_flops_per_token"]
    return out


def task_scores(rows: list[dict[str, Any]], metrics: list[str]) -> dict[str, Any]:
    """The data's text metrics (0-100) of the early-exit outputs against the references, and with
    full-model outputs in `rows` the full model's (`full_<name>`) and the ratio (`<name>_ratio`)."""
    if not metrics or not rows:
        return {}
    from eetrain.task_metrics import corpus_scores

    refs = [row["reference"] for row in rows]
    out: dict[str, Any] = {"metric": metrics[0], **corpus_scores(metrics, [row["output"] for row in rows], refs)}
    if "full_output" in rows[0]:
        full = corpus_scores(metrics, [row["full_output"] for row in rows], refs)
        for name in metrics:
            out[f"full_{name}"] = full[name]
            out[f"{name}_ratio"] = out[name] / full[name] if full[name] else float("nan")
    return out


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"policy {s['policy']}" + (f" from layer {s['min_exit_layer']}" if s.get("min_exit_layer") else "")
        + f", strategy {s['strategy']}, batch mode {s['batch_mode']} (batch {s['batch_size']}), "
        f"{s['examples']} examples, {s['num_layers']} layers",
        f"  early exit : {s['tokens_per_second']:8.1f} tokens/s  mean exit layer {s['mean_exit_layer']:.2f}  "
        f"decisions {100 * s['decision_fraction']:.1f}% of the time",
    ]
    if "speedup" in s:
        lines += [
            f"  full model : {s['full_tokens_per_second']:8.1f} tokens/s",
            f"  speed-up {s['speedup']:.3f}x   token consistency with the full model {s['token_consistency']:.4f}   "
            f"identical sequences {s['sequence_consistency']:.3f}"
            + (" (sampled: two independent draws)" if s.get("temperature") else ""),
        ]
    if "flops_per_token" in s:
        full = (f", full model {format_flops(s['full_flops_per_token'])} ({s['flops_ratio']:.3f} of it)"
                if "flops_ratio" in s else "")
        lines.append(f"  FLOPs per token (decoding, counted on {s['flops_examples']} examples): early exit "
                     f"{format_flops(s['flops_per_token'])}{full}; prefill {format_flops(s['prefill_flops_per_example'])}"
                     " per example")
    if "rollbacks" in s:
        lines.append(f"  rollback (FREE, > {s['rollback']:g} nats): replaced by the last layer's token {s['rollbacks']}, "
                     f"decoded tokens discarded {s['discarded_tokens']}")
    if "adaptive_updates" in s:
        value = s["adaptive_threshold"]
        lines.append(
            f"  adaptive threshold (FREE): {'not fitted yet' if value is None else f'{value:.3f}'} after "
            f"{s['adaptive_updates']} updates on {s['adaptive_pairs']} pairs; the estimator took "
            f"{s['adaptive_seconds']:.2f} s more (counted in early exit's time)"
        )
    if s.get("min_exit_layer") is not None and s["mean_exit_layer"] >= s["num_layers"]:
        L, floor = s["num_layers"], s["min_exit_layer"]
        points = s.get("exit_points")
        if floor >= L:
            why = f"the minimum exit layer is the model's depth ({L}): set decoding.policy.min_exit_layer lower"
        elif points is not None and not any(floor <= p < L for p in points):
            why = (f"the policy's exit points {points} (the trained exits) leave none from layer {floor} below the "
                   f"last; decoding.policy.exit_points names others")
        elif s.get("calibrated_here"):
            why = ("no check reached the threshold, and this run's policies stage certified none "
                   "(calibration.json): lower decoding.policy.threshold, or allow more risk "
                   "(exit.calibration.delta, exit.calibration.epsilon)")
        else:
            why = ("no check reached the threshold: lower decoding.policy.threshold, or calibrate one "
                   "(stages=[policies,generate] in this run, or +experiment=evaluate model.name_or_path=<export>)")
        lines.append(f"  no token left before the last layer: {why}")
    if s.get("scored_examples", s["examples"]) < s["examples"]:
        lines.append(f"  task metrics over the {s['scored_examples']} of {s['examples']} examples that have a reference")
    for name in s.get("metrics", []):
        full = f"   full model {s[f'full_{name}']:6.2f}   ratio {s[f'{name}_ratio']:.3f}" if f"full_{name}" in s else ""
        lines.append(f"  {name + ' vs references':<24}: early exit {s[name]:6.2f}{full}")
    return "\n".join(lines)


def run_stage(cfg: Any, backbone: Any, data: Any, out_dir: Path) -> dict[str, Any]:
    model_dir = backbone.name_or_path
    if model_dir is None and (Path(out_dir) / "export").is_dir():
        model_dir = str(Path(out_dir) / "export")  # this run's export (and the policy it stores)
    settings = decoding_settings(cfg, model_dir)
    fields, policy_dir = run_policy_fields(cfg, backbone, Path(out_dir), model_dir)
    policy = build_policy(fields, backbone, policy_dir, horizon=settings.max_new_tokens)
    schedule = check_schedule(fields) if policy is not None else {}
    label = describe(policy) + "".join(f" {k}={v}" for k, v in schedule.items() if v is not None)
    if settings.strategy == "self_speculative":  # drafts at a fixed depth: no exit policy decides
        label = f"draft:{settings.draft_layer or backbone.num_layers // 2}x{settings.draft_tokens}"
        policy, schedule = None, {}
    adaptive, adaptive_seconds = None, 0.0
    if settings.adaptive_threshold is not None:
        check_adaptive_policy(policy, ADAPTIVE_KEY)
        adaptive = AdaptiveThreshold.start(settings.adaptive_threshold)
        label += " (the first batch; then FREE's adaptive threshold)"
    examples = data.split_examples(settings.split, "decoding.split")
    if settings.max_examples is not None:
        examples = examples[: int(settings.max_examples)]
    device = next(backbone.parameters()).device
    tok = backbone.tokenizer
    kwargs = dict(
        max_new_tokens=settings.max_new_tokens, batch_mode=settings.batch_mode, temperature=settings.temperature,
        top_p=settings.top_p, seed=int(cfg.get("seed", 0) or 0), draft_layer=settings.draft_layer,
        draft_tokens=settings.draft_tokens, gather_min_batch=settings.gather_min_batch,
    )
    print(f"\n[generate] {len(examples)} examples of split {settings.split!r}; policy {label}, "
          f"strategy {settings.strategy}" + ("; full-model decoding in the same run" if settings.compare_full else ""))
    from eetrain.progress import progress

    ee, full, rows, counted = [], [], [], []
    n_batches = -(-len(examples) // settings.batch_size)
    for i, (chunk, batch) in enumerate(progress(_batches(backbone, examples, settings.batch_size, device),
                                                "early-exit generation", total=n_batches, unit="batch")):
        # early exit and full decoding alternate batch by batch, so machine load hits both alike
        used = policy  # (FREE's estimator refits after the batch)
        updating = adaptive is not None and adaptive.updating
        if adaptive is None:
            out = generate(backbone, batch, policy, strategy=settings.strategy, **kwargs, **schedule,
                           rollback=settings.rollback)
        else:
            out, policy, seconds = adaptive_generate(backbone, batch, policy, adaptive, strategy=settings.strategy,
                                                     **kwargs, **schedule, rollback=settings.rollback)
            adaptive_seconds += seconds
        ee.append(out)
        ref = generate(backbone, batch, None, strategy="copy", **kwargs) if settings.compare_full else None
        if ref is not None:
            full.append(ref)
        if settings.flops_batches is None or i < settings.flops_batches:  # the same decodes again, counted
            same = dict(strategy=settings.strategy, **kwargs, **schedule, rollback=settings.rollback)
            counted.append((
                generate(backbone, batch, used, **same, count_flops=True) if adaptive is None
                else count_adaptive(backbone, batch, used, updating, **same),
                generate(backbone, batch, None, strategy="copy", **kwargs, count_flops=True) if ref else None,
            ))
        for r, example in enumerate(chunk):
            rows.append({
                "source": tok.decode(example["source_ids"], skip_special_tokens=True),
                "output": tok.decode(out.sequences()[r], skip_special_tokens=True),
                "reference": example.get("reference") or tok.decode(example["target_ids"], skip_special_tokens=True),
                "exit_layers": out.row_exit_layers()[r],
                **({"full_output": tok.decode(ref.sequences()[r], skip_special_tokens=True)} if ref else {}),
            })
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_dir / "generations.jsonl") as tmp:  # first: the decoded text is the costly part
        Path(tmp).write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = _summary(ee, full or None, settings, label, adaptive, adaptive_seconds)
    if isinstance(policy, ExitPolicy):
        summary["min_exit_layer"] = policy.min_exit_layer
        if policy.exit_points is not None:
            summary["exit_points"] = sorted(policy.exit_points)
    summary.update(flops_summary(counted))
    node = (cfg.get("decoding") or {}).get("policy") or {}
    if (Path(out_dir) / "calibration.json").is_file() and policy_dir != str(out_dir) \
            and node.get("measure") is None and node.get("threshold") is None:
        summary["calibrated_here"] = True  # this run's policies stage ran and certified no threshold
    from eetrain.task_metrics import TEXT_METRICS

    headline = getattr(data, "metric", None)  # text tasks; none for plain text (causal LM packing)
    metrics = [headline, *[m for m in getattr(data, "metrics", ()) or () if m != headline]] if headline else []
    metrics = [m for m in metrics if m in TEXT_METRICS]
    scored = [row for row in rows if row["reference"]]  # examples without a reference are not scored
    scores = task_scores(scored, metrics)
    if scores:
        summary.update(scores, metrics=metrics, scored_examples=len(scored))
    write_json(out_dir / "generation_summary.json", summary)
    from eetrain.wandb_panels import log_generation

    layers = [e for o in ee for e in o.exit_layers[o.exit_layers > 0].tolist()]
    logged = log_generation(summary, layers, backbone.num_layers)
    print("\nEarly-exit generation (" + ("greedy" if settings.temperature == 0 else "sampled") + ")")
    print(format_summary(summary))
    print(f"\nWrote {out_dir / 'generations.jsonl'} and {out_dir / 'generation_summary.json'}"
          + (" (and to W&B)" if logged else ""))
    return summary
