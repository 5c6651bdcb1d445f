"""Stage `curve`: the task metric against the measured speed-up, over a sweep of exit thresholds.

CALM, FREE and MEE judge an early-exit model by this picture. For every policy of `curve.policies`
(measures of `exit.policies`, trained classifiers as `classifier:<kind>`) and every value of its grid,
the split is decoded with early exit, and each early-exit batch is followed by the full model on the
same batch: the speed-up is the ratio of the two throughputs summed over the run (paired timing, so
the machine's drift between rows of the sweep cancels), decisions included.

Writes to the run directory:

* `quality_speed.csv`: one row per (policy, threshold) with `policy, threshold, mean_exit_layer,
  speedup` (tokens per second over the full model's), `normalized_latency` (FREE's: the split's total
  early-exit decoding time over the full model's; it differs from 1 / speedup when exits change the
  output's length), `consistency` (token
  agreement with the full model's output), `sequence_consistency`, `decision_fraction` (share of the
  decode time spent deciding), `flops_ratio` (decoding FLOPs per token over the full model's, counted on
  the batches of the first `decoding.flops_examples` examples, decoded once more untimed;
  `eetrain.decoding.flops`), the task metrics (0-100) and `<metric>_ratio` (over the full model's);
  a `full` row, and an `oracle` row whose mean exit layer is the earliest layer from which each token of
  the full model's output keeps the last layer's top-1 (teacher-forced);
* `quality_speed.png`: the headline metric against the speed-up and against the FLOPs ratio, one line
  per policy, the full model as a point; with W&B on, the table, the plot and one line per policy go to
  the run too (`curve/...`).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eetrain.analysis import plots
from eetrain.errors import ConfigError, boolean, check_keys, positive_int
from eetrain.exits.classifiers import CLASSIFIERS, load_classifier
from eetrain.exits.policy import ExitPolicy
from eetrain.exits.settings import PolicySpec, classifier_settings, exit_points, min_exit_layer, policy_specs
from eetrain.exits.thresholds import value_label
from eetrain.files import atomic_file
from eetrain.layer_metrics import layer_predictions, oracle_exit_layers
from eetrain.task_metrics import corpus_scores

from .calibration import batches
from .decisions import CANDIDATE_MEASURES, schedule_for
from .flops import flops_per_token
from .generate import GenerateOutput, generate, require_token_head
from .metrics import sequence_consistency, token_consistency
from .settings import CLASSIFIER_FILE, check_schedule, decoding_settings, policy_fields


@dataclass(frozen=True)
class CurveSettings:
    policies: tuple[str, ...]
    split: str
    max_examples: int | None
    oracle: bool


def curve_settings(cfg: Any) -> CurveSettings:
    node = dict(cfg.get("curve") or {})
    check_keys(node, set(CurveSettings.__dataclass_fields__), "curve")
    policies = node.get("policies") or []
    if isinstance(policies, str):
        policies = [policies]
    if not policies:
        raise ConfigError("curve.policies is empty; name labels of exit.policies or classifier:<kind>")
    max_examples = positive_int(node.get("max_examples"), "curve.max_examples", null="the whole split")
    return CurveSettings(
        policies=tuple(str(p) for p in policies),
        split=str(node.get("split") or "test"),
        max_examples=max_examples,
        oracle=boolean(node.get("oracle", True), "curve.oracle"),
    )


def curve_specs(
    cfg: Any, backbone: Any, names: Sequence[str], out_dir: Path, model_dir: str | None, key: str = "curve.policies"
) -> list[PolicySpec]:
    """The policies of `curve.policies` (or another list, named `key` in errors) with their grids:
    `exit.policies.<label>.thresholds` (or `exit.thresholds`), `exit.classifiers.thresholds` for
    `classifier:<kind>`. A classifier is loaded from `exit.classifiers.dir` / this run's
    `exit_classifiers/`, else from the export."""
    L = backbone.num_layers
    horizon = (cfg.get("data") or {}).get("max_target_length")
    measures = {s.name: s for s in policy_specs(cfg, L, horizon=horizon)}
    clf_settings = classifier_settings(cfg)
    floor, points = min_exit_layer(cfg, L), exit_points(cfg, L)
    allowed = f"labels of exit.policies ({', '.join(measures)}) or classifier:<{'|'.join(sorted(CLASSIFIERS))}>"
    specs = []
    for i, name in enumerate(names):
        entry = f"{key}[{i}]"
        if name.startswith("classifier:"):
            kind = name.split(":", 1)[1]
            if kind not in CLASSIFIERS:
                raise ConfigError(f"{entry}={name!r}; allowed: {allowed}")
            paths = [clf_settings.path(kind, out_dir)]
            if model_dir is not None:
                paths.append(Path(model_dir) / CLASSIFIER_FILE.format(kind=kind))
            path = next((p for p in paths if p.is_file()), None)
            if path is None:
                stage = key.split(".", 1)[0]  # curve or classify
                raise ConfigError(
                    f"{entry}={name!r}: no saved {kind} classifier at {' or '.join(map(str, paths))}; train it "
                    f"with stages=[exit_classifiers,{stage}] or set exit.classifiers.dir"
                )
            try:
                clf = load_classifier(path, expected_hidden_size=backbone.hidden_size).eval()
            except ValueError as e:
                raise ConfigError(f"{entry}: {e}") from e
            policy = ExitPolicy(clf, min_exit_layer=floor, name=name, exit_points=points)
            specs.append(PolicySpec(name, policy, clf_settings.thresholds))
        elif name in measures:
            specs.append(measures[name])
        else:
            raise ConfigError(f"{entry}={name!r}; allowed: {allowed}")
    return specs


def references(backbone: Any, examples: Sequence[Mapping[str, Any]]) -> list[Any]:
    """Each example's reference text(s): the raw `reference` the data module kept, else the decoded target."""
    tok = backbone.tokenizer
    return [e.get("reference") or tok.decode(e["target_ids"], skip_special_tokens=True) for e in examples]


def texts(backbone: Any, sequences: Sequence[Sequence[int]]) -> list[str]:
    return [backbone.tokenizer.decode(s, skip_special_tokens=True) for s in sequences]


@torch.no_grad()
def oracle_mean_exit_layer(
    backbone: Any, examples: Sequence[Mapping[str, Any]], outputs: Sequence[Sequence[int]], batch_size: int
) -> float:
    """Mean oracle exit layer over the tokens of `outputs` (the full model's), teacher-forced: for each
    token the earliest layer from which its top-1 equals the last layer's through the end."""
    device = next(backbone.parameters()).device
    layers = []
    for i in range(0, len(examples), batch_size):
        chunk = [
            {"source_ids": list(e["source_ids"]), "target_ids": list(o)}
            for e, o in zip(examples[i : i + batch_size], outputs[i : i + batch_size], strict=True)
            if len(o)
        ]
        if not chunk:
            continue
        batch = {k: v.to(device) for k, v in backbone.collate(chunk).items()}
        preds, _, _ = layer_predictions(backbone(batch), backbone)
        layers.append(oracle_exit_layers(preds))
    return float(torch.cat(layers).double().mean()) if layers else float("nan")


def _sum(outs: Sequence[GenerateOutput], attr: str) -> float:
    return float(sum(getattr(o, attr) for o in outs))


def _mean_exit(outs: Sequence[GenerateOutput]) -> float:
    layers = torch.cat([o.exit_layers[o.exit_layers > 0] for o in outs]).double()
    return float(layers.mean()) if layers.numel() else float("nan")


def curve_row(
    policy: str, threshold: Any, ee: Sequence[GenerateOutput], full: Sequence[GenerateOutput],
    full_seqs: Sequence[Sequence[int]], scores: Mapping[str, float], full_scores: Mapping[str, float], metric: str,
) -> dict[str, Any]:
    """One row of `quality_speed.csv`. ee, full: the paired outputs (same batches, full right after)."""
    ee_rate = _sum(ee, "num_tokens") / _sum(ee, "seconds")
    full_rate = _sum(full, "num_tokens") / _sum(full, "seconds")
    seqs = [s for o in ee for s in o.sequences()]
    base = full_scores.get(metric, float("nan"))
    return {
        "policy": policy,
        "threshold": threshold,
        "mean_exit_layer": _mean_exit(ee),
        "speedup": ee_rate / full_rate,
        # FREE's: the total decoding time over the full model's (not per token: exits can change the length)
        "normalized_latency": _sum(ee, "seconds") / _sum(full, "seconds"),
        "consistency": token_consistency(seqs, full_seqs),
        "sequence_consistency": sequence_consistency(seqs, full_seqs),
        "decision_fraction": _sum(ee, "decision_seconds") / _sum(ee, "seconds"),
        **scores,
        f"{metric}_ratio": scores.get(metric, float("nan")) / base if base else float("nan"),
        "tokens": int(_sum(ee, "num_tokens")),
        "seconds": _sum(ee, "seconds"),
    }


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _fmt(v) for k, v in r.items()})
    return path


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return "" if v is None else v


def plot_quality_speed(
    rows: Sequence[Mapping[str, Any]], path: Path, metric: str, title: str,
    xlabel: str = "measured speed-up over full-model decoding (x)",
) -> Path:
    """The headline metric against the speed-up: one line per policy (threshold labels), the full model
    as a star at 1.0x; where the rows carry `flops_ratio`, a second panel against the FLOPs."""
    points = [r for r in rows if r["policy"] not in ("full", "oracle")]
    panels = [("speedup", xlabel)]
    if any(isinstance(r.get("flops_ratio"), float) and math.isfinite(r["flops_ratio"]) for r in points):
        panels.append(("flops_ratio", "decoding FLOPs per token over the full model's"))
    fig, axes = plots.figure(len(panels), title, width=7.0)
    full = next((r for r in rows if r["policy"] == "full"), None)
    for ax, (x_key, label) in zip(axes, panels, strict=True):
        for name in dict.fromkeys(r["policy"] for r in points):
            pts = sorted((r[x_key], r[metric], r["threshold"]) for r in points
                         if r["policy"] == name and r.get(x_key) is not None)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            for x, y, t in pts:
                ax.annotate(f"{t:g}" if isinstance(t, int | float) else str(t), (x, y), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        if full is not None:
            ax.plot([1.0], [full[metric]], marker="*", markersize=14, color="black", linestyle="none",
                    label="full model")
            ax.axhline(0.97 * full[metric], color="grey", linewidth=0.8, linestyle=":", label="97% of the full model")
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
    return plots.save(fig, path)


def log_wandb(rows: Sequence[Mapping[str, Any]], png: Path, metric: str, key: str = "curve/quality_speed") -> bool:
    """The table and the plot into the active W&B run under `key`, if one is active (logger=wandb)."""
    try:
        import wandb
    except ImportError:
        return False
    if wandb.run is None:
        return False
    from eetrain.wandb_panels import table as wandb_table

    table = wandb_table(rows)  # thresholds mix numbers and labels (per-layer, adaptive)
    logs = {
        key: table,
        f"{key}_plot": wandb.plot.scatter(table, "speedup", metric, title=f"{metric} vs speed-up"),
        f"{key}_png": wandb.Image(str(png)),
    }
    if any(isinstance(r.get("flops_ratio"), float) and math.isfinite(r["flops_ratio"]) for r in rows):
        logs[f"{key}_flops_plot"] = wandb.plot.scatter(table, "flops_ratio", metric,
                                                        title=f"{metric} vs decoding FLOPs (of the full model's)")
    # one line per policy over its thresholds, as in the PNG
    names = list(dict.fromkeys(r["policy"] for r in rows if r["policy"] not in ("full", "oracle")))
    if names:
        lines = [sorted((r["speedup"], r[metric]) for r in rows if r["policy"] == n) for n in names]
        logs[f"{key}_lines"] = wandb.plot.line_series(
            xs=[[p[0] for p in pts] for pts in lines], ys=[[p[1] for p in pts] for pts in lines], keys=names,
            title=f"{metric} vs speed-up, per policy", xname="speed-up over the full model (x)")
    wandb.log(logs)
    return True


def format_rows(rows: Sequence[Mapping[str, Any]], metric: str) -> str:
    cols = ("policy", "threshold", "mean_exit_layer", "speedup", "flops_ratio", "consistency", "decision_fraction",
            metric, f"{metric}_ratio")
    widths = (28, 10, 10, 10, 8, 10, 8, 10, 8)
    names = ("policy", "threshold", "mean exit", "speed-up", "FLOPs", "consist.", "decide", metric, "ratio")
    lines = [names[0].ljust(widths[0]) + "".join(n.rjust(w) for n, w in zip(names[1:], widths[1:], strict=True))]
    for r in rows:
        v = [r.get(c) for c in cols]
        num = [("" if x is None or (isinstance(x, float) and math.isnan(x)) else
                (f"{x:.3f}" if isinstance(x, float) else str(x))) for x in v[1:]]
        lines.append(str(v[0]).ljust(widths[0]) + "".join(x.rjust(w) for x, w in zip(num, widths[1:], strict=True)))
    return "\n".join(lines)


def check_config(cfg: Any, backbone: Any) -> None:
    """Validate `curve` and `decoding` before any training."""
    require_token_head(backbone, "stages=[curve] decodes text: it")
    settings = curve_settings(cfg)
    if decoding_settings(cfg, backbone.name_or_path).strategy == "self_speculative":
        raise ConfigError(SPECULATIVE_CURVE)
    names = [n for n in settings.policies if not n.startswith("classifier:")]
    curve_specs(cfg, backbone, names, Path("."), None)
    for i, n in enumerate(settings.policies):
        if n.startswith("classifier:") and n.split(":", 1)[1] not in CLASSIFIERS:
            raise ConfigError(f"curve.policies[{i}]={n!r}; classifier kinds: {sorted(CLASSIFIERS)}")
    check_saved_classifiers(cfg, backbone, settings.policies, "curve.policies")


SPECULATIVE_CURVE = ("decoding.strategy=self_speculative is lossless (no threshold to sweep); allowed for the curve: "
                     "copy, parallel")


def check_saved_classifiers(cfg: Any, backbone: Any, names: Sequence[str], key: str) -> None:
    """Before any training: a `classifier:<kind>` policy that no stage of this run trains must be saved
    where the stage will look (exit.classifiers.dir or the run's exit_classifiers/, the loaded export)."""
    if "exit_classifiers" in list(cfg.get("stages") or []):
        return
    settings = classifier_settings(cfg)
    try:
        out_dir: Path | None = Path(str(cfg.paths.output_dir))
    except Exception:  # noqa: BLE001 - composed outside a Hydra run (tests, notebooks): no run directory yet
        out_dir = None
    for i, name in enumerate(names):
        kind = name.split(":", 1)[1] if name.startswith("classifier:") else None
        if kind not in CLASSIFIERS:
            continue  # measures, and unknown kinds (refused with the allowed ones by the callers)
        paths = [settings.path(kind, out_dir)] if out_dir is not None or settings.dir is not None else []
        if backbone.name_or_path is not None:
            paths.append(Path(str(backbone.name_or_path)) / CLASSIFIER_FILE.format(kind=kind))
        if not any(p.is_file() for p in paths):
            stage = key.split(".", 1)[0]
            where = " or ".join(map(str, paths)) or "exit.classifiers.dir (not set)"
            raise ConfigError(f"{key}[{i}]={name!r}: no saved {kind} classifier at {where}; train it with "
                              f"stages=[exit_classifiers,{stage}] or set exit.classifiers.dir")


def run_stage(cfg: Any, backbone: Any, data: Any, out_dir: Path) -> list[dict[str, Any]]:
    from eetrain.progress import progress

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = backbone.name_or_path
    if model_dir is None and (out_dir / "export").is_dir():
        model_dir = str(out_dir / "export")
    settings = curve_settings(cfg)
    dec = decoding_settings(cfg, model_dir)
    if dec.strategy == "self_speculative":
        raise ConfigError(SPECULATIVE_CURVE)
    specs = curve_specs(cfg, backbone, settings.policies, out_dir, model_dir)
    schedule = {k: v for k, v in check_schedule(policy_fields(cfg, None)).items() if v is not None}
    metric = str(getattr(data, "metric", None) or "rougeL")
    metrics = list(getattr(data, "metrics", None) or [metric])
    examples = data.split_examples(settings.split, "curve.split")
    if settings.max_examples is not None:
        examples = examples[: settings.max_examples]
    refs = references(backbone, examples)
    prompts = batches(backbone, examples, dec.batch_size)
    kwargs = dict(strategy=dec.strategy, max_new_tokens=dec.max_new_tokens, batch_mode=dec.batch_mode,
                  gather_min_batch=dec.gather_min_batch)
    L = backbone.num_layers
    grid = [(spec, v) for spec in specs for v in (spec.values or [None])]
    print(f"\n[curve] {len(examples)} examples of split {settings.split!r}, {len(grid)} (policy, threshold) "
          f"points, strategy {dec.strategy}, batch {dec.batch_size}; each early-exit batch is timed against "
          f"the full model on the same batch")
    if schedule.get("candidates") is not None:
        without = [s.name for s in specs if "candidates" not in schedule_for(s.policy, schedule)]
        if without:
            print(f"[curve] decoding.policy.candidates={schedule['candidates']} scores {', '.join(CANDIDATE_MEASURES)} "
                  f"checks on top-k tokens; {', '.join(without)} decode(s) without it")
    generate(backbone, prompts[0], None, **kwargs)  # warm-up: first-call costs stay out of the table
    counted = prompts if dec.flops_batches is None else prompts[: dec.flops_batches]
    full_flops = flops_per_token([generate(backbone, b, None, **kwargs, count_flops=True) for b in counted])
    full = [generate(backbone, b, None, **kwargs) for b in progress(prompts, "full-model decoding", unit="batch")]
    full_seqs = [s for o in full for s in o.sequences()]
    full_scores = corpus_scores(metrics, texts(backbone, full_seqs), refs)
    rows: list[dict[str, Any]] = [{
        "policy": "full", "threshold": None, "mean_exit_layer": float(L), "speedup": 1.0,
        "normalized_latency": 1.0, "consistency": 1.0, "sequence_consistency": 1.0,
        "decision_fraction": 0.0, "flops_ratio": 1.0 if counted else float("nan"), **full_scores,
        f"{metric}_ratio": 1.0,
        "tokens": int(_sum(full, "num_tokens")), "seconds": _sum(full, "seconds"),
    }]
    if settings.oracle:
        mean = oracle_mean_exit_layer(backbone, examples, full_seqs, max(dec.batch_size, 16))
        rows.append({"policy": "oracle", "threshold": None, "mean_exit_layer": mean, "consistency": 1.0})
    for spec, value in progress(grid, "quality-vs-speed sweep", unit="point"):
        policy = spec.policy if value is None else spec.policy.at_value(value)
        ee, paired = [], []
        for b in prompts:
            ee.append(generate(backbone, b, policy, **kwargs, **schedule_for(policy, schedule)))
            paired.append(generate(backbone, b, None, **kwargs))
        seqs = [s for o in ee for s in o.sequences()]
        scores = corpus_scores(metrics, texts(backbone, seqs), refs)
        rows.append(curve_row(spec.name, value_label(value), ee, paired, full_seqs, scores, full_scores, metric))
        kw = {**kwargs, **schedule_for(policy, schedule)}
        rows[-1]["flops_ratio"] = flops_per_token([generate(backbone, b, policy, **kw, count_flops=True)
                                                   for b in counted]) / full_flops
    if dec.adaptive_threshold is not None:
        rows += adaptive_rows(backbone, specs, prompts, dec.adaptive_threshold, kwargs, schedule, full_seqs, metrics,
                              refs, full_scores, metric, len(counted), full_flops)
    csv_path = write_csv(rows, out_dir / "quality_speed.csv")
    floor = min_exit_layer(cfg, L)
    png = plot_quality_speed(rows, out_dir / "quality_speed.png", metric,
                             f"{metric} vs speed-up{' and FLOPs' if counted else ''} ({L} layers, min exit {floor}, "
                             f"{dec.strategy}, "
                             f"{len(examples)} {settings.split} examples)")
    logged = log_wandb(rows, png, metric)
    print(f"\nQuality vs speed ({metric}; speed-up measured against full decoding of the same batches, "
          "decisions included)")
    print(format_rows(rows, metric))
    best = best_point(rows, metric, 0.97, L)
    if best is not None:
        print(f"\nFastest point with {metric} >= 0.97 x the full model's: {best['policy']} at {best['threshold']}: "
              f"{best['speedup']:.3f}x, mean exit {best['mean_exit_layer']:.2f}, {metric} "
              f"{best[metric]:.2f} ({score_against_full(best, rows, metric)})")
    elif any(r["policy"] == "full" and r.get(metric) == 0 for r in rows):
        print(f"\nNo fastest point: the full model's {metric} is 0, so no point's share of it means anything")
    print(f"\nWrote {csv_path} and {png}" + (" (and to W&B)" if logged else ""))
    return rows


def adaptive_rows(
    backbone: Any, specs: Sequence[PolicySpec], prompts: Sequence[Mapping[str, torch.Tensor]], settings: Any,
    kwargs: Mapping[str, Any], schedule: Mapping[str, Any], full_seqs: Sequence[Sequence[int]],
    metrics: Sequence[str], refs: Sequence[Any], full_scores: Mapping[str, float], metric: str,
    counted: int = 0, full_flops: float = float("nan"),
) -> list[dict[str, Any]]:
    """`decoding.adaptive_threshold`: one more point per confidence policy, `<policy> (adaptive)`, whose
    threshold FREE's estimator sets batch by batch (the first batch at the top of its grid); its
    `threshold` is the last one, the estimator's time is early exit's, and so are its FLOPs (`flops_ratio`
    over `full_flops`: the first `counted` batches decoded again at the thresholds they had)."""
    from eetrain.exits.beta_mixture import is_confidence

    from .adaptive import AdaptiveThreshold, adaptive_generate, count_adaptive

    rows = []
    for spec in specs:
        if spec.policy.is_boolean or not is_confidence(spec.policy):
            continue
        estimator = AdaptiveThreshold.start(settings)
        policy = spec.policy.at_value(settings.high)
        ee, paired, used = [], [], []
        for b in prompts:
            used.append((policy, estimator.updating))
            out, policy, seconds = adaptive_generate(backbone, b, policy, estimator, **kwargs,
                                                     **schedule_for(policy, schedule))
            out.seconds += seconds
            ee.append(out)
            paired.append(generate(backbone, b, None, **kwargs))
        seqs = [s for o in ee for s in o.sequences()]
        scores = corpus_scores(metrics, texts(backbone, seqs), refs)
        last = estimator.current
        label = "adaptive" if last is None else f"adaptive:{last:g}"
        rows.append(curve_row(f"{spec.name} (adaptive)", label, ee, paired, full_seqs, scores, full_scores, metric))
        if counted:
            outs = [count_adaptive(backbone, b, p, updating, **kwargs, **schedule_for(p, schedule))
                    for b, (p, updating) in zip(prompts[:counted], used, strict=False)]
            rows[-1]["flops_ratio"] = flops_per_token(outs) / full_flops
    return rows


def score_against_full(row: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], metric: str) -> str:
    """`row`'s score as a share of the full model's, or, for a negative full score (pearson, matthews),
    where a share turns over, the full model's score itself."""
    full = next((r.get(metric) for r in rows if r["policy"] == "full"), None)
    if isinstance(full, int | float) and full < 0:
        return f"full model {full:.2f}"
    return f"{row[f'{metric}_ratio']:.3f} x"


def best_point(
    rows: Sequence[Mapping[str, Any]], metric: str, ratio: float, num_layers: int | None = None
) -> Mapping[str, Any] | None:
    """The fastest (policy, threshold) row whose metric is at least `ratio` x the full model's; with
    `num_layers`, among rows where some token left early (a point that never exits is the full model, and
    only timing noise could make it the fastest). None as well when the full model scores 0: a share of
    it is then no bar at all (every point "keeps" it)."""
    full = next((r.get(metric) for r in rows if r["policy"] == "full"), None)
    if full == 0:
        return None

    def good(r: Mapping[str, Any]) -> bool:
        if full is None or not isinstance(r.get(metric), int | float):
            return r.get(f"{metric}_ratio", 0) >= ratio
        # within (1 - ratio) of the full model's |score|: a plain ratio turns over for a negative score
        # (pearson, matthews), where a worse point has the larger ratio
        return r[metric] >= full - (1 - ratio) * abs(full)

    ok = [r for r in rows if r["policy"] not in ("full", "oracle") and good(r)
          and (num_layers is None or r.get("mean_exit_layer", 0) < num_layers)]
    return max(ok, key=lambda r: r["speedup"]) if ok else None
