"""Sequence classification with per-sample early exit (BERT), and the stage `classify`.

:func:`classify` runs the encoder layer by layer. After each layer that can carry an exit, the policy
decides for every row still running, from that exit's logits (`backbone.exit_logits(h, layer)`: the
exit's own head when the model has per-layer heads) and what earlier layers left (PABEE's patience
counter, the previous state for saturation), through the registered measures and classifiers
(`eetrain.decoding.decisions.LayerDecider`), so a row's exit layer equals
`eetrain.exits.policy.exit_layers` on the same per-layer states (tested). A row that exits is answered by
the logits of its exit layer. The encoder keeps no cache, so rows that exited simply stop being computed:
`gather` (default) hands the next layer only the running rows' states and attention inputs (trailing
padding cut); `ride_along` keeps every row in the batch until the deepest exit, exited rows riding
along: the same outputs, for comparison.

Measures for a sequence head: PABEE's `patience` (argmax unchanged for P layers), DeeBERT's `entropy`
(threshold -S exits when H <= S), `softmax_max`, `softmax_gap`, `normalized_entropy`, `monotonic`,
`hidden_saturation` and exit classifiers (on the first token's state, which the pooler reads, as in the
records of `eetrain.exits.record`).

Stage `classify` (settings `classify.*`, conf/classify/default.yaml), on a labelled split:

* `layer_scores.csv`: every layer's task metrics (`data.metrics`, 0-100) and `agree_last` (share of
  examples whose prediction equals the last layer's), layers outside `exits.layers` included;
* `accuracy_speed.csv`: one row per (policy, value) of `classify.policies` (grids from `exit.policies`)
  with `mean_exit_layer`, `expected_saving` (DeeBERT's, 1 - mean / L), `speedup` (the full model's time
  over early exit's, each batch classified with early exit and then by the full model through the same
  code: paired timing, decisions included; with `classify.repeats` > 1 the fastest of that many runs
  each way), `normalized_latency`, `consistency` (predictions equal to the full model's),
  `decision_fraction` (share of the time spent deciding), the metrics and
  `<metric>_ratio`; a `full` row and an `oracle` row (mean of the earliest layer from which each
  example's prediction stays the last layer's);
* `accuracy_speed.png`: the headline metric (`data.metric`) against the speed-up, one line per policy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from eetrain.decoding.decisions import LayerDecider, ScheduledExits
from eetrain.errors import ConfigError, check_keys, positive_int
from eetrain.exits.policy import ExitPolicy
from eetrain.exits.settings import PolicySpec
from eetrain.exits.thresholds import value_label

BATCH_MODES = ("gather", "ride_along")
#: the output files of the stage
LAYER_FILE, TABLE_FILE, PLOT_FILE = "layer_scores.csv", "accuracy_speed.csv", "accuracy_speed.png"


@dataclass
class ClassifyOutput:
    """What :func:`classify` returns for a batch of B rows.

    logits: `(B, C)` float32, each row's exit logits at its exit layer; predictions: `(B,)` the argmax
    (long), or the score `logits[:, 0]` of a regression head; exit_layers: `(B,)` long, 1..L.
    Time (host wall clock; on CUDA the parts are indicative, the total is synchronised): seconds =
    layer_seconds (encoder layers) + decision_seconds (exit checks, the exit head where a check reads it)
    + other_seconds (embeddings, attention masks, gathering rows, the head for rows that exit without
    logits). row_layers: (row, layer) pairs computed (B * L for the full model).
    """

    logits: Tensor
    predictions: Tensor
    exit_layers: Tensor
    num_layers: int
    seconds: float
    layer_seconds: float
    decision_seconds: float
    batch_mode: str
    row_layers: int

    @property
    def other_seconds(self) -> float:
        return self.seconds - self.layer_seconds - self.decision_seconds

    @property
    def mean_exit_layer(self) -> float:
        return float(self.exit_layers.double().mean())

    @property
    def decision_fraction(self) -> float:
        return self.decision_seconds / self.seconds if self.seconds > 0 else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: the rules that read no class probabilities, so apply to a regression head's score
REGRESSION_RULES = "patience with kwargs.tolerance (PABEE's regression rule: |r_i - r_(i-1)| < tau) or hidden_saturation"


def head_mismatch(policy: ExitPolicy, backbone: Any) -> str | None:
    """Why `policy` cannot decide on this head (a regression head has no class probabilities; a
    tolerance compares regression scores), or None."""
    regression = backbone.regression
    tolerance = policy.measure_kwargs.get("tolerance") is not None
    if regression and not (policy.measure == "hidden_saturation" or (policy.measure == "patience" and tolerance)):
        needs = "class predictions (argmax)" if policy.measure == "patience" else "class probabilities"
        return (f"needs {needs}, and this head is a regression (num_labels=1); on it use {REGRESSION_RULES}, "
                "or classify with the full model or a fixed exit layer")
    if tolerance and not regression:
        return ("kwargs.tolerance compares a regression head's scores, and this head has "
                f"{int(backbone.head_weight.shape[0])} classes: drop the tolerance (patience then compares the argmax)")
    return None


def _check(backbone: Any, policy: Any, batch_mode: str) -> None:
    if backbone.head_kind != "sequence":
        raise ConfigError(
            f"classify needs a sequence-classification head with encoder early exit (BERT); the "
            f"{backbone.family} adapter has a {backbone.head_kind} head (early-exit generation: eetrain.decoding)"
        )
    if batch_mode not in BATCH_MODES:
        raise ConfigError(f"classify.batch_mode={batch_mode!r}; allowed: {', '.join(BATCH_MODES)}")
    if isinstance(policy, ExitPolicy):
        problem = head_mismatch(policy, backbone)
        if problem:
            raise ConfigError(f"exit policy {policy.label!r}: {problem}")
    if policy is not None and not isinstance(policy, ExitPolicy | ScheduledExits):
        raise TypeError(f"policy must be an ExitPolicy, ScheduledExits or None, got {type(policy).__name__}")


@torch.no_grad()
def classify(
    backbone: Any,
    batch: Mapping[str, Tensor],
    policy: ExitPolicy | ScheduledExits | None = None,
    batch_mode: str = "gather",
) -> ClassifyOutput:
    """Classify `batch` (input_ids, attention_mask (B, T), token_type_ids) with per-row early exit.

    policy: an :class:`ExitPolicy` (measure or classifier, threshold, minimum exit layer, exit points),
    a :class:`ScheduledExits` (`fixed:K`: every row at layer K; no decisions), or None (the full model).
    batch_mode: `gather` (only running rows are computed) or `ride_along` (every row runs to the
    batch's deepest exit). The backbone runs in eval mode (its mode is restored after).
    """
    _check(backbone, policy, batch_mode)
    was_training = backbone.training
    if was_training:
        backbone.eval()
    try:
        return _classify(backbone, batch, policy, batch_mode)
    finally:
        if was_training:
            backbone.train()


def _classify(backbone: Any, batch: Mapping[str, Tensor], policy: Any, batch_mode: str) -> ClassifyOutput:
    L = backbone.num_layers
    device = batch["input_ids"].device
    size = batch["input_ids"].shape[0]
    decider = LayerDecider(policy, backbone, L) if isinstance(policy, ExitPolicy) else None
    schedule = policy.draw(size).to(device) if isinstance(policy, ScheduledExits) else None
    layer_s = decision_s = 0.0
    row_layers = 0
    _sync(device)
    start = time.perf_counter()
    h, ctx = backbone.encode_embed(dict(batch))
    rows = torch.arange(size, device=device)  # the batch row of every row of h
    live: Tensor | None = None  # ride_along: the rows of h still running (None: all)
    exit_at = torch.full((size,), L, dtype=torch.long, device=device)
    out: Tensor | None = None
    if decider is not None:
        # one decision per example, on the first token's state (what the pooler reads, as in the records)
        decider.begin(torch.ones(size, dtype=torch.long, device=device), h[:, 0])
    for layer in range(1, L + 1):
        t0 = time.perf_counter()
        h = backbone.encode_layer(layer, h, ctx)
        layer_s += time.perf_counter() - t0
        row_layers += h.shape[0]
        hs, at = (h, rows) if live is None else (h[live], rows[live])
        logits = None
        if layer == L:
            fires = torch.ones(hs.shape[0], dtype=torch.bool, device=device)
        elif schedule is not None:
            fires = schedule[at] == layer  # a schedule costs nothing to decide
        elif decider is not None and layer in decider.observed:
            t0 = time.perf_counter()
            logits = backbone.exit_logits(hs, layer) if decider.needs_logits else None
            fired = decider.observe(layer, hs[:, 0], None if at.shape[0] == size else at, logits)
            decision_s += time.perf_counter() - t0
            if fired is None:
                continue
            fires = fired
        else:
            continue
        if not bool(fires.any()):
            continue
        z = (logits[fires] if logits is not None else backbone.exit_logits(hs[fires], layer)).float()
        if out is None:
            out = z.new_empty((size, z.shape[-1]))
        out[at[fires]] = z
        exit_at[at[fires]] = layer
        if bool(fires.all()):
            break
        if batch_mode == "gather":
            h, ctx = backbone.encode_rows(h, ctx, ~fires)
            rows = rows[~fires]
        else:
            live = (torch.arange(h.shape[0], device=device) if live is None else live)[~fires]
    assert out is not None  # every row exits by layer L
    preds = out[:, 0] if backbone.regression else out.argmax(-1)
    _sync(device)
    seconds = time.perf_counter() - start
    return ClassifyOutput(out, preds, exit_at, L, seconds, layer_s, decision_s, batch_mode, row_layers)


# --------------------------------------------------------------------------------------------------
# Stage `classify`
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassifySettings:
    policies: tuple[str, ...]
    split: str
    max_examples: int | None
    batch_size: int | None
    batch_mode: str
    repeats: int


def classify_settings(cfg: Any) -> ClassifySettings:
    node = dict(cfg.get("classify") or {})
    check_keys(node, set(ClassifySettings.__dataclass_fields__), "classify")
    policies = node.get("policies") or []
    if isinstance(policies, str):
        policies = [policies]
    mode = node.get("batch_mode") or "gather"
    if mode not in BATCH_MODES:
        raise ConfigError(f"classify.batch_mode={mode!r}; allowed: {', '.join(BATCH_MODES)}")
    return ClassifySettings(
        policies=tuple(str(p) for p in policies),
        split=str(node.get("split") or "validation"),
        max_examples=positive_int(node.get("max_examples"), "classify.max_examples", null="the whole split"),
        batch_size=positive_int(node.get("batch_size"), "classify.batch_size", null="data.eval_batch_size"),
        batch_mode=mode,
        repeats=positive_int(node.get("repeats", 1), "classify.repeats"),
    )


def classify_specs(
    cfg: Any, backbone: Any, names: Sequence[str], out_dir: Path, model_dir: str | None
) -> list[PolicySpec]:
    """The policies of `classify.policies` with their grids (as the curve reads them: labels of
    `exit.policies`, or `classifier:<kind>`)."""
    from eetrain.decoding.curve import curve_specs

    return curve_specs(cfg, backbone, names, out_dir, model_dir, key="classify.policies")


def check_config(cfg: Any, backbone: Any) -> None:
    """Validate `classify` and the policies it names before any training."""
    settings = classify_settings(cfg)
    _check(backbone, None, settings.batch_mode)
    regression = backbone.regression
    measures = [n for n in settings.policies if not n.startswith("classifier:")]
    specs = dict(zip(measures, classify_specs(cfg, backbone, measures, Path("."), None), strict=True))
    from eetrain.exits.classifiers import CLASSIFIERS

    for i, name in enumerate(settings.policies):
        key = f"classify.policies[{i}]={name!r}"
        if name.startswith("classifier:"):
            if name.split(":", 1)[1] not in CLASSIFIERS:
                raise ConfigError(f"{key}; classifier kinds: {sorted(CLASSIFIERS)}")
            if regression:
                raise ConfigError(f"{key}: an exit classifier learns when a layer's class agrees with the last "
                                  f"layer's, and this head is a regression (num_labels=1); on it use {REGRESSION_RULES}")
            continue
        problem = head_mismatch(specs[name].policy, backbone)
        if problem:
            raise ConfigError(f"{key} (exit.policies.{name}): {problem}; or set classify.policies=[] for the "
                              "per-layer scores alone")
    from eetrain.decoding.curve import check_saved_classifiers

    check_saved_classifiers(cfg, backbone, settings.policies, "classify.policies")


def _batches(
    backbone: Any, examples: Sequence[Mapping[str, Any]], size: int, device: torch.device
) -> list[dict[str, Tensor]]:
    out = []
    for i in range(0, len(examples), size):
        batch = backbone.collate(list(examples[i : i + size]))
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


@torch.no_grad()
def exit_layer_predictions(backbone: Any, batches: Sequence[Mapping[str, Tensor]]) -> tuple[Tensor, Tensor]:
    """Every exit layer's predictions `(L, N)` (argmax; a regression head's score) and the labels `(N,)`,
    from one full forward per batch and each layer's own exit head."""
    was_training = backbone.training
    backbone.eval()
    preds, labels = [], []
    try:
        for batch in batches:
            states = backbone(dict(batch))
            z = [backbone.exit_logits(h, layer).float() for layer, h in zip(states.layers, states.hidden, strict=True)]
            stacked = torch.stack(z)  # (L, B, C)
            preds.append(stacked[..., 0] if backbone.regression else stacked.argmax(-1))
            labels.append(batch["labels"])
    finally:
        backbone.train(was_training)
    return torch.cat(preds, dim=1).cpu(), torch.cat(labels).cpu()


def _scores(metrics: Sequence[str], preds: Tensor, labels: Tensor, num_classes: int | None) -> dict[str, float]:
    from eetrain.task_metrics import label_scores

    return label_scores(metrics, preds, labels, num_classes=num_classes)


def layer_rows(preds: Tensor, labels: Tensor, metrics: Sequence[str], num_classes: int | None) -> list[dict[str, Any]]:
    """One row per exit layer: its metrics and, for classes, agreement with the last layer."""
    rows = []
    for k in range(preds.shape[0]):
        row: dict[str, Any] = {"layer": k + 1, **_scores(metrics, preds[k], labels, num_classes)}
        if not preds.is_floating_point():
            row["agree_last"] = float((preds[k] == preds[-1]).double().mean())
        rows.append(row)
    return rows


def speed_row(
    policy: str, value: Any, ee: Sequence[ClassifyOutput], full: Sequence[ClassifyOutput],
    full_preds: Tensor, labels: Tensor, metrics: Sequence[str], metric: str, full_scores: Mapping[str, float],
    num_classes: int | None,
) -> dict[str, Any]:
    """One row of `accuracy_speed.csv`. ee, full: the paired outputs (same batches, the full model right
    after each early-exit batch); full_preds: the full model's predictions `(N,)`."""
    ee_s, full_s = sum(o.seconds for o in ee), sum(o.seconds for o in full)
    preds = torch.cat([o.predictions for o in ee]).cpu()
    exits = torch.cat([o.exit_layers for o in ee]).cpu().double()
    L = ee[0].num_layers
    scores = _scores(metrics, preds, labels, num_classes)
    base = full_scores.get(metric, float("nan"))
    return {
        "policy": policy,
        "threshold": value,
        "mean_exit_layer": float(exits.mean()),
        "expected_saving": 1.0 - float(exits.mean()) / L,
        "speedup": full_s / ee_s,
        "normalized_latency": ee_s / full_s,
        # the share of rows answered with the full model's class (a regression score: not defined)
        "consistency": float("nan") if preds.is_floating_point() else float((preds == full_preds).double().mean()),
        "decision_fraction": sum(o.decision_seconds for o in ee) / ee_s,
        **scores,
        f"{metric}_ratio": scores[metric] / base if base else float("nan"),
        "examples": int(preds.shape[0]),
        "seconds": ee_s,
    }


def format_layers(rows: Sequence[Mapping[str, Any]]) -> str:
    cols = [c for c in rows[0] if c != "layer"]
    lines = [f"{'layer':>5}" + "".join(f"{c:>12}" for c in cols)]
    for r in rows:
        lines.append(f"{r['layer']:>5}" + "".join(f"{r[c]:>12.4f}" for c in cols))
    return "\n".join(lines)


def format_speed(rows: Sequence[Mapping[str, Any]], metric: str, L: int) -> str:
    cols = ("threshold", "mean_exit_layer", "speedup", "consistency", "decision_fraction", metric, f"{metric}_ratio")
    head = (f"{'policy':<14}{'value':>8}{f'exit (of {L})':>12}{'speed-up':>10}{'consist.':>10}{'decide':>8}"
            f"{metric:>10}{'ratio':>8}")
    lines = [head]
    for r in rows:
        cells = []
        for c in cols:
            x = r.get(c)
            if x is None or (isinstance(x, float) and math.isnan(x)):
                cells.append("")
            elif c == "threshold":
                cells.append(f"{x:g}" if isinstance(x, int | float) else str(x))
            elif c in (metric,):
                cells.append(f"{x:.2f}")
            else:
                cells.append(f"{x:.3f}")
        widths = (8, 12, 10, 10, 8, 10, 8)
        lines.append(f"{str(r['policy']):<14}" + "".join(f"{v:>{w}}" for v, w in zip(cells, widths, strict=True)))
    return "\n".join(lines)


def run_stage(cfg: Any, backbone: Any, data: Any, out_dir: Path) -> list[dict[str, Any]]:
    from eetrain.decoding.curve import (
        best_point,
        log_wandb,
        plot_quality_speed,
        score_against_full,
        write_csv,
    )
    from eetrain.exits.settings import min_exit_layer
    from eetrain.layer_metrics import oracle_exit_layers
    from eetrain.progress import progress

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_config(cfg, backbone)
    settings = classify_settings(cfg)
    model_dir = backbone.name_or_path
    if model_dir is None and (out_dir / "export").is_dir():
        model_dir = str(out_dir / "export")
    specs = classify_specs(cfg, backbone, settings.policies, out_dir, model_dir)
    metric = str(data.metric)
    metrics = list(data.metrics)
    regression = backbone.regression
    num_classes = None if regression else int(backbone.head_weight.shape[0])
    examples = data.split_examples(settings.split, "classify.split")
    if settings.max_examples is not None:
        examples = examples[: settings.max_examples]
    device = next(backbone.parameters()).device
    size = settings.batch_size or data.eval_batch_size
    batches = _batches(backbone, examples, size, device)
    L = backbone.num_layers
    grid = [(spec, v) for spec in specs for v in (spec.values or [None])]
    print(f"\n[classify] {len(examples)} examples of split {settings.split!r}, batch {size}, {L} layers, batch mode "
          f"{settings.batch_mode}; {len(grid)} (policy, value) points, each early-exit batch timed against the "
          "full model on the same batch" + (f" (fastest of {settings.repeats} runs each)" if settings.repeats > 1 else ""))

    preds, labels = exit_layer_predictions(backbone, batches)
    layers = layer_rows(preds, labels, metrics, num_classes)
    layer_csv = write_csv(layers, out_dir / LAYER_FILE)
    agree = "; agree_last: prediction equals the last layer's" if "agree_last" in layers[0] else ""
    print(f"\nPer-layer scores on {settings.split} (each exit layer's own head{agree})")
    print(format_layers(layers))

    def run(policy: Any) -> list[ClassifyOutput]:
        return [classify(backbone, b, policy, settings.batch_mode) for b in batches]

    classify(backbone, batches[0], None, settings.batch_mode)  # warm-up: first-call costs stay out of the table
    full = run(None)
    full_preds = torch.cat([o.predictions for o in full]).cpu()
    full_scores = _scores(metrics, full_preds, labels, num_classes)
    rows: list[dict[str, Any]] = [{
        "policy": "full", "threshold": None, "mean_exit_layer": float(L), "expected_saving": 0.0, "speedup": 1.0,
        "normalized_latency": 1.0, "consistency": 1.0, "decision_fraction": 0.0, **full_scores,
        f"{metric}_ratio": 1.0, "examples": len(examples), "seconds": sum(o.seconds for o in full),
    }]
    if not regression:
        oracle = float(oracle_exit_layers(preds).double().mean())
        rows.append({"policy": "oracle", "threshold": None, "mean_exit_layer": oracle,
                     "expected_saving": 1.0 - oracle / L, "consistency": 1.0})
    for spec, value in progress(grid, "accuracy-vs-speed sweep", unit="point", disable=not grid):
        policy = spec.policy if value is None else spec.policy.at_value(value)
        ee, paired = [], []
        for b in batches:
            ee_runs, full_runs = zip(*[
                (classify(backbone, b, policy, settings.batch_mode), classify(backbone, b, None, settings.batch_mode))
                for _ in range(settings.repeats)
            ], strict=True)
            # the fastest run of each: other processes on the machine only ever add time
            ee.append(min(ee_runs, key=lambda o: o.seconds))
            paired.append(min(full_runs, key=lambda o: o.seconds))
        rows.append(speed_row(spec.name, value_label(value), ee, paired, full_preds, labels, metrics, metric, full_scores,
                              num_classes))
    csv_path = write_csv(rows, out_dir / TABLE_FILE)
    floor = min_exit_layer(cfg, L)
    png = plot_quality_speed(
        rows, out_dir / PLOT_FILE, metric,
        f"{metric} vs speed-up: {L} layers, min exit {floor}, batch {size}, {len(examples)} {settings.split}",
        xlabel="measured speed-up over the full model (x)",
    )
    logged = log_wandb(rows, png, metric, key="classify/accuracy_speed")
    from eetrain.wandb_panels import log_table

    log_table("classify/layers", layers)  # the per-layer scores
    print(f"\nAccuracy vs speed ({metric}; per-sample exits at batch {size}, speed-up measured against the full "
          "model on the same batches, decisions included)")
    print(format_speed(rows, metric, L))
    best = best_point(rows, metric, 0.99, L)
    if best is not None:
        print(f"\nFastest point with {metric} >= 0.99 x the full model's: {best['policy']} at {best['threshold']}: "
              f"{best['speedup']:.3f}x, mean exit {best['mean_exit_layer']:.2f} of {L}, {metric} "
              f"{best[metric]:.2f} ({score_against_full(best, rows, metric)})")
    print(f"\nWrote {layer_csv}, {csv_path} and {png}" + (" (and to W&B)" if logged else ""))
    return rows
