"""Stage ``policies``: record the validation set once, sweep every policy, calibrate, write the table.

Outputs in the run directory:

* ``policies.csv`` -- one row per (policy, threshold): ``measure, threshold, min_exit_layer,
  mean_exit_layer, consistency, accuracy, expected_saving`` (printed as a table too);
* ``policies.png`` -- consistency against mean exit layer, one curve per policy;
* ``calibration.json`` -- Learn-then-Test thresholds for ``exit.calibration.policies`` and how the
  chosen threshold does on the held-out part of the validation set;
* ``records/validation.pt`` -- the recorded per-layer summaries (``exit.record.save``), reloadable
  with :func:`eetrain.exits.record.load_records` to evaluate more policies without the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from eetrain.errors import ConfigError
from eetrain.files import write_json

from .beta_mixture import agreement_pairs, estimate_threshold, is_confidence
from .calibration import calibrate_threshold, consistency_risk, ltt_scan, make_risk_fn, task_risk
from .classifiers import ExitClassifier
from .measures import ExitRecords, get_measure
from .policy import (
    ExitPolicy,
    evaluate_policy,
    exit_layers,
    plot_consistency_vs_exit,
    sweep,
    write_policy_table,
)
from .record import record_exits, records_nbytes, save_records
from .settings import (
    CLASSIFIER_LABEL,
    CalibrationSettings,
    PolicySpec,
    calibration_settings,
    classifier_settings,
    exit_points,
    load_classifiers,
    min_exit_layer,
    policy_specs,
    record_settings,
    scalar_values,
)

__all__ = [
    "load_classifiers",
    "evaluate_records",
    "calibrate",
    "best_rows",
    "format_policy_table",
    "run_stage",
]


def _classifier_specs(
    classifiers: Mapping[str, ExitClassifier],
    floor: int,
    thresholds: Sequence[float],
    points: tuple[int, ...] | None = None,
) -> list[PolicySpec]:
    return [
        PolicySpec(
            CLASSIFIER_LABEL.format(kind=kind),
            ExitPolicy(clf, min_exit_layer=floor, name=CLASSIFIER_LABEL.format(kind=kind), exit_points=points),
            tuple(thresholds),
        )
        for kind, clf in classifiers.items()
    ]


def evaluate_records(specs: Sequence[PolicySpec], records: ExitRecords) -> list[dict[str, Any]]:
    """Sweep every policy over its values on ``records``: rows with ``POLICY_TABLE_COLUMNS``."""
    rows: list[dict[str, Any]] = []
    for spec in specs:
        values = {spec.name: list(spec.values)} if spec.values else {}
        rows.extend(sweep([spec.policy], values, records))
    return rows


def _candidates(spec: PolicySpec, settings: CalibrationSettings) -> list[float]:
    if settings.candidates is not None:
        return list(settings.candidates)
    measure = spec.policy.measure
    probability = not isinstance(measure, str) or get_measure(measure).is_probability
    if probability:
        return [round(1.0 - i / 100, 2) for i in range(101)]
    return sorted(set(scalar_values(spec.values)), reverse=True)


def _split_sequences(records: ExitRecords, fraction: float, seed: int) -> tuple[ExitRecords, ExitRecords | None]:
    if fraction >= 1.0 or records.sequence_ids is None:
        return records, None
    ids = records.sequence_ids.unique()
    gen = torch.Generator().manual_seed(seed)
    n_cal = max(1, min(ids.numel() - 1, int(round(fraction * ids.numel()))))
    if ids.numel() < 2:
        return records, None
    cal_ids = ids[torch.randperm(ids.numel(), generator=gen)[:n_cal]]
    is_cal = torch.isin(records.sequence_ids, cal_ids)
    return records.subset(is_cal), records.subset(~is_cal)


def calibrate(
    specs: Sequence[PolicySpec], records: ExitRecords, settings: CalibrationSettings, seed: int = 0
) -> list[dict[str, Any]]:
    """Learn-then-Test for every policy named in ``settings.policies``.

    The validation record is split by sequence: ``calibration_fraction`` of the sequences calibrate,
    the rest test the returned threshold (its empirical risk there should stay ``<= delta``).
    Returns one dict per policy: ``policy, threshold`` (``None``: nothing certified -- run the full
    model), the scan, and the held-out ``mean_exit_layer, consistency, accuracy, risk``.
    """
    by_name = {s.name: s for s in specs}
    cal, test = _split_sequences(records, settings.calibration_fraction, seed)
    results = []
    for name in settings.policies:
        spec = by_name.get(name)
        if spec is None:
            raise ConfigError(
                f"exit.calibration.policies: {name!r} is not among the evaluated policies {sorted(by_name)}"
            )
        seq = cal.sequence_ids if settings.per_sequence else None
        risk = make_risk_fn(spec.policy, cal, kind=settings.offline_risk, sequence_ids=seq, reduction=settings.reduction)
        candidates = _candidates(spec, settings)
        scan = ltt_scan(risk, candidates, settings.epsilon, settings.delta, settings.pvalue)
        chosen = calibrate_threshold(risk, candidates, settings.epsilon, settings.delta, settings.pvalue)
        result: dict[str, Any] = {
            "policy": name,
            "threshold": chosen,
            "epsilon": settings.epsilon,
            "delta": settings.delta,
            "risk": settings.offline_risk,
            "per_sequence": settings.per_sequence,
            "reduction": settings.reduction,
            "pvalue": settings.pvalue,
            "n_calibration": int(scan[0]["n"]) if scan else 0,
            "scan": scan,
        }
        target = test if test is not None else cal
        result["evaluated_on"] = "held-out validation sequences" if test is not None else "the calibration set"
        if chosen is not None and target.num_tokens:
            policy = spec.policy.at_value(chosen)
            ex = exit_layers(policy, target)
            stats = evaluate_policy(ex, target.preds(), target.labels, target.num_layers)
            tseq = target.sequence_ids if settings.per_sequence else None
            if settings.offline_risk == "consistency":
                per = consistency_risk(ex, target.preds(), sequence_ids=tseq, labels=target.labels,
                                       reduction=settings.reduction)
            else:
                assert target.labels is not None
                per = task_risk(ex, target.preds(), target.labels, sequence_ids=tseq, reduction=settings.reduction)
            result.update({k: stats[k] for k in ("mean_exit_layer", "consistency", "accuracy", "expected_saving")})
            result["empirical_risk"] = float(per.mean()) if per.numel() else float("nan")
        if is_confidence(spec.policy):
            result["beta_mixture"] = _beta_mixture_result(spec.policy, cal, target)
        results.append(result)
    return results


def _beta_mixture_result(policy: ExitPolicy, cal: ExitRecords, target: ExitRecords) -> dict[str, Any]:
    """FREE's adaptive threshold (its defaults) fitted on the calibration records' pairs -- every token at
    every layer the policy checks -- and how it does on `target`, beside LTT's certified threshold."""
    confidence, agree = agreement_pairs(policy, cal)
    threshold = estimate_threshold(confidence, agree)
    out: dict[str, Any] = {"threshold": threshold, "pairs": int(confidence.numel()),
                           "agree_share": float(agree.double().mean()) if agree.numel() else float("nan")}
    if threshold is not None and target.num_tokens:
        stats = evaluate_policy(exit_layers(policy.at_value(threshold), target), target.preds(), target.labels,
                                target.num_layers)
        out.update({k: stats[k] for k in ("mean_exit_layer", "consistency", "accuracy")})
    return out


def best_rows(
    rows: Sequence[Mapping[str, Any]], min_consistency: float = 0.99, below: float | None = None
) -> list[dict[str, Any]]:
    """Per measure, the row with the lowest mean exit layer among those with consistency >= the bar
    (and, with ``below``, a mean exit layer ``< below``, e.g. ``L``: rows that save something)."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        c, m = row.get("consistency"), row.get("mean_exit_layer")
        if c is None or m is None or math.isnan(c) or c < min_consistency:
            continue
        if below is not None and not m < below:
            continue
        cur = best.get(row["measure"])
        if cur is None or (m, -c) < (cur["mean_exit_layer"], -cur["consistency"]):
            best[row["measure"]] = dict(row)
    return sorted(best.values(), key=lambda r: (r["mean_exit_layer"], -r["consistency"]))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def format_policy_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A fixed-width text table of sweep rows."""
    columns = list(columns or ("measure", "threshold", "min_exit_layer", "mean_exit_layer", "consistency",
                               "accuracy", "expected_saving"))
    header = {"min_exit_layer": "min_layer", "mean_exit_layer": "mean_exit", "expected_saving": "saving"}
    cells = [[header.get(c, c) for c in columns]] + [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _horizon(cfg: Any, records: ExitRecords) -> int:
    """``N`` of the decaying threshold: the configured maximum output length, else the longest record."""
    data = cfg.get("data") or {}
    n = data.get("max_target_length") if hasattr(data, "get") else None
    if n:
        return int(n)
    return int(records.positions.max()) if records.positions is not None and records.positions.numel() else 1


def run_stage(cfg: Any, backbone: Any, data: Any, out_dir: Path) -> list[dict[str, Any]]:
    """Stage ``policies``: returns the table rows (also written to ``policies.csv``)."""
    out_dir = Path(out_dir)
    num_layers = backbone.num_layers
    floor = min_exit_layer(cfg, num_layers)
    rec_settings = record_settings(cfg)
    clf_settings = classifier_settings(cfg)
    cal_settings = calibration_settings(cfg)
    classifiers = load_classifiers(clf_settings, backbone, out_dir, required=False)
    if floor == num_layers:
        print(
            f"[policies] note: the minimum exit layer {floor} is the model's last layer, so no token can "
            "exit early; lower exit.min_exit_layer to see savings"
        )
    data.setup("validate")
    records = record_exits(
        backbone,
        data.val_dataloader(),
        store_hidden=bool(classifiers),  # hidden states are only needed by the classifiers
        hidden_dtype=rec_settings.hidden_dtype,
        max_tokens=rec_settings.max_tokens,
        features=clf_settings.features,  # exit.features: the states classifiers and saturation read
    )
    print(
        f"\n[policies] recorded {records.num_tokens} validation tokens of "
        f"{int(records.sequence_ids.unique().numel())} sequences x {num_layers} layers "
        f"({records_nbytes(records) / 2**20:.1f} MiB)"
    )
    if rec_settings.save:
        where = save_records(
            records if not classifiers else _without_hidden(records),
            out_dir / "records" / "validation.pt",
            meta={"num_layers": num_layers, "hidden_size": backbone.hidden_size, "family": backbone.family,
                  "features": clf_settings.features},
        )
        print(f"[policies] saved the record (without hidden states) to {where}")
    specs = policy_specs(cfg, num_layers, horizon=_horizon(cfg, records))
    points = exit_points(cfg, num_layers)
    specs += _classifier_specs(classifiers, floor, clf_settings.thresholds, points)
    missing = [k for k in clf_settings.kinds if k not in classifiers]
    if missing:
        print(f"[policies] no saved classifier for {missing} under {clf_settings.path('x', out_dir).parent}: skipped")
    rows = evaluate_records(specs, records)
    csv_path = write_policy_table(rows, out_dir / "policies.csv")
    png_path = plot_consistency_vs_exit(
        rows, out_dir / "policies.png", title=f"exit policies ({num_layers} layers, min exit layer {floor})"
    )
    where = "" if points is None or len(points) == num_layers else f"; exits at layers {list(points)}"
    print(
        f"\nExit policies on the validation set (L={num_layers}{where}; consistency = agrees with layer "
        f"{num_layers})"
    )
    print(format_policy_table(rows))
    best = best_rows(rows, 0.99, below=num_layers)
    print(f"\nLowest mean exit layer with consistency >= 0.99 (and below L={num_layers}), per policy:")
    print(format_policy_table(best) if best else "  (no policy reaches 0.99 consistency below the last layer)")
    calibration = []
    if cal_settings.policies:
        calibration = calibrate(specs, records, cal_settings, seed=int(cfg.get("seed", 0) or 0))
        write_json(out_dir / "calibration.json", calibration)
        print(f"\nLearn-then-Test (epsilon={cal_settings.epsilon}, delta={cal_settings.delta}, "
              f"{cal_settings.offline_risk} risk per {'sequence' if cal_settings.per_sequence else 'token'}):")
        for r in calibration:
            if r["threshold"] is None:
                print(f"  {r['policy']}: no threshold certified (run the full model)")
            else:
                print(
                    f"  {r['policy']}: threshold {r['threshold']:g} on {r['n_calibration']} examples; "
                    f"on {r['evaluated_on']}: mean exit {r['mean_exit_layer']:.3f}, consistency "
                    f"{r['consistency']:.4f}, risk {r['empirical_risk']:.4f}"
                )
            free = r.get("beta_mixture")
            if free is not None and free["threshold"] is not None and "consistency" in free:
                print(f"    FREE's Beta-mixture threshold on the same records: {free['threshold']:.3f} "
                      f"({free['pairs']} pairs); mean exit {free['mean_exit_layer']:.3f}, consistency "
                      f"{free['consistency']:.4f}")
    if cal_settings.online and calibration:
        calibrate_online_stage(cfg, backbone, data, specs, calibration, rows, cal_settings)
        write_json(out_dir / "calibration.json", calibration)
        csv_path = write_policy_table(rows, out_dir / "policies.csv")
    from eetrain.wandb_panels import log_policies

    log_policies(rows, png_path, calibration)  # W&B: policies/table, policies/plot, ... (when a run is active)
    print(f"\nWrote {csv_path} and {png_path}" + (f" and {out_dir / 'calibration.json'}" if calibration else ""))
    return rows


def calibrate_online_stage(
    cfg: Any,
    backbone: Any,
    data: Any,
    specs: Sequence[PolicySpec],
    calibration: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    settings: CalibrationSettings,
) -> None:
    """LTT again, on real early-exit decoding (eetrain.decoding.calibration): adds ``online`` to each
    calibration result and ``online_consistency`` / ``online_mean_exit_layer`` to the decoded rows."""
    from eetrain.decoding.calibration import calibrate_online
    from eetrain.decoding.decisions import schedule_for
    from eetrain.decoding.settings import check_schedule, decoding_settings, policy_fields

    dec = decoding_settings(cfg)
    schedule = {k: v for k, v in check_schedule(policy_fields(cfg, None)).items() if v is not None}
    examples = data.split_examples(settings.online_split, "exit.calibration.online_split")[: settings.online_examples]
    by_name = {s.name: s for s in specs}
    if settings.risk in ("consistency", "task"):
        what = "share of the full model's tokens not reproduced"
    elif settings.risk_against == "full":
        what = f"1 - {settings.risk}(early exit, full model) / 100, CALM's textual consistency"
    else:
        what = f"drop of {settings.risk} against the references / 100, CALM's risk consistency"
    refs = None
    if settings.risk_against == "reference" and settings.risk not in ("consistency", "task"):
        from eetrain.decoding.curve import references

        refs = references(backbone, examples)
    print(f"\n[policies] online calibration: decoding {len(examples)} {settings.online_split} examples per "
          f"threshold with strategy {dec.strategy} (risk: {what})")
    for result in calibration:
        spec = by_name[result["policy"]]
        grid = scalar_values(spec.values) or _candidates(spec, settings)
        online = calibrate_online(
            backbone, examples, spec.policy, grid, epsilon=settings.epsilon, delta=settings.delta,
            pvalue=settings.pvalue, reduction=settings.reduction, batch_size=max(dec.batch_size, 16),
            risk="consistency" if settings.risk == "task" else settings.risk, references=refs,
            strategy=dec.strategy, max_new_tokens=dec.max_new_tokens, batch_mode=dec.batch_mode,
            **schedule_for(spec.policy, schedule),
        )
        result["online"] = online
        table = []
        for row in rows:
            got = online["decoded"].get(str(float(row["threshold"]))) if row["measure"] == spec.name else None
            if got is not None:
                row["online_consistency"] = got["consistency"]
                row["online_mean_exit_layer"] = got["mean_exit_layer"]
                table.append(row)
        print(f"  {spec.name}: offline (records) vs online (decoding) per threshold; online LTT threshold "
              f"{online['threshold']} (offline {result['threshold']})")
        print(format_policy_table(table, ("measure", "threshold", "mean_exit_layer", "consistency",
                                          "online_mean_exit_layer", "online_consistency")))


def _without_hidden(records: ExitRecords) -> ExitRecords:
    from dataclasses import replace

    return replace(records, hidden=None, h0=None)
