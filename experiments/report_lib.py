"""Shared by `experiments/*/report.py`: read eetrain run directories, write the results tables (markdown
and CSV) and the plots.

A run directory is what `python -m eetrain ...` writes (`hydra.run.dir`, by default
`outputs/<task_name>/<time>`). A report reads whichever of these files a run holds:

==========================  ================  =========================================================
file                        written by        columns / keys used here
==========================  ================  =========================================================
layer_report.csv            training          layer, loss, acc, agree (top-1 equals the last layer's)
layer_scores.csv            stage classify    layer, <task metrics>, agree_last
policies.csv                stage policies    measure, threshold, min_exit_layer, mean_exit_layer,
                                              consistency, accuracy, expected_saving
                                              [, online_consistency, online_mean_exit_layer]
calibration.json            stage policies    [{policy, threshold, epsilon, delta, risk, ...}]
quality_speed.csv           stage curve       policy, threshold, mean_exit_layer, speedup, consistency,
                                              decision_fraction, flops_ratio, <metrics>, <metric>_ratio (rows
                                              `full` and `oracle` too)
accuracy_speed.csv          stage classify    the same for classification
generation_summary.json     stage generate    policy, strategy, num_layers, mean_exit_layer, speedup,
                                              token_consistency, sequence_consistency, decision_fraction,
                                              flops_ratio
analysis_summary.json       stage analyze     models: headline numbers per analysed model
suitability.csv             stage analyze     rank, model, num_layers, ee_score, relative_score,
                                              skip_ratio, skip_policy, oracle_skip
saturation.csv              stage analyze     model, set (easy / difficult / all), first_similar,
                                              similar_states, length (+ _std), monotonic_0/4/8
saturation_layers.csv       stage analyze     model, layer, similarity_<set>, top1_stability
==========================  ================  =========================================================

Output (`--out`, default `outputs/reports/<experiment>`): `results.md` (every table below, also printed),
`results.csv` (the headline: one row per run), one CSV per other table (`points.csv`, `layers.csv`,
`policies.csv`, `analysis.csv`, `saturation.csv`, `suitability.csv`, `paper.csv`) and the plots
(`quality_speed.png`, `layers.png`, `policies.png`, `stability.png`), each only when some run has its data.

The standard library and matplotlib only (no eetrain, no torch): a report runs wherever the run
directories were copied to.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CSV_FILES = ("layer_report", "layer_scores", "policies", "quality_speed", "accuracy_speed", "suitability",
             "saturation", "saturation_layers")
JSON_FILES = ("generation_summary", "analysis_summary", "calibration")
#: the fastest point must keep at least this share of the full model's score (README: 97 % for
#: generation, the classify stage's 99 % for classification); --quality overrides both
QUALITY = {"quality_speed": 0.97, "accuracy_speed": 0.99}
CONSISTENCY = 0.99  # policies: the lowest mean exit layer at this consistency with the last layer


# ---------------------------------------------------------------------------------------------- reading

def value(text: str) -> Any:
    """A CSV cell: "" -> None, else int, float or the string."""
    if text == "":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def read_csv(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as fh:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(fh)]


@dataclass
class Run:
    """One run directory: its CSV tables and JSON summaries by file stem."""

    name: str
    path: Path
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    summaries: dict[str, Any] = field(default_factory=dict)

    @property
    def files(self) -> list[str]:
        return [f"{k}.csv" for k in self.tables] + [f"{k}.json" for k in self.summaries]

    @property
    def num_layers(self) -> int | None:
        """L: the deepest layer any file names."""
        found = [r["layer"] for key in ("layer_report", "layer_scores") for r in self.tables.get(key, [])]
        found += [r["mean_exit_layer"] for key in ("quality_speed", "accuracy_speed")
                  for r in self.tables.get(key, []) if r["policy"] == "full"]
        found += [(self.summaries.get("generation_summary") or {}).get("num_layers")]
        found += [m.get("num_layers") for m in (self.summaries.get("analysis_summary") or {}).get("models", [])[:1]]
        found = [int(x) for x in found if isinstance(x, int | float)]
        return max(found) if found else None


def run_name(path: Path) -> str:
    """The directory's name; `<task>/<time>` for Hydra's default `outputs/<task>/<time>` directories."""
    if re.match(r"\d{4}-\d\d-\d\d", path.name) and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name


def read_run(path: str | Path, name: str | None = None) -> Run:
    path = Path(path)
    run = Run(name or run_name(path.resolve()), path)
    for key in CSV_FILES:
        if (path / f"{key}.csv").is_file():
            run.tables[key] = read_csv(path / f"{key}.csv")
    for key in JSON_FILES:
        if (path / f"{key}.json").is_file():
            run.summaries[key] = json.loads((path / f"{key}.json").read_text())
    return run


def read_runs(args: Iterable[str]) -> list[Run]:
    """`DIR` or `NAME=DIR` for each argument; what holds no results file is skipped with a note."""
    runs = []
    for arg in args:
        name, sep, where = arg.partition("=")
        name, where = (name, where) if sep and not Path(arg).exists() else (None, arg)
        path = Path(where)
        if not path.is_dir():
            print(f"[report] skipped {arg}: not a directory", file=sys.stderr)
            continue
        run = read_run(path, name)
        if not run.files:
            print(f"[report] skipped {arg}: no results file ({', '.join(CSV_FILES + JSON_FILES)})", file=sys.stderr)
            continue
        runs.append(run)
    return runs


# ------------------------------------------------------------------------------------------- the tables

def metric_of(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """The headline metric of a speed table: the column X that has an X_ratio beside it."""
    cols = list(rows[0]) if rows else []
    return next((c for c in cols if f"{c}_ratio" in cols), None)


def is_num(x: Any) -> bool:
    return isinstance(x, int | float) and not (isinstance(x, float) and math.isnan(x))


def points(run: Run) -> list[dict[str, Any]]:
    """Every operating point with a measured speed: the curve's / classify's rows (full model, oracle,
    every policy and threshold) and the generate stage's summary."""
    out = []
    L = run.num_layers
    for source in ("quality_speed", "accuracy_speed"):
        rows = run.tables.get(source) or []
        metric = metric_of(rows)
        for r in rows:
            out.append({
                "run": run.name, "source": source, "policy": r["policy"], "threshold": r.get("threshold"),
                "mean_exit_layer": r.get("mean_exit_layer"), "num_layers": L, "speedup": r.get("speedup"),
                "consistency": r.get("consistency"), "decision_fraction": r.get("decision_fraction"),
                "flops_ratio": r.get("flops_ratio"), "metric": metric, "score": r.get(metric) if metric else None,
                "ratio": r.get(f"{metric}_ratio") if metric else None,
            })
    g = run.summaries.get("generation_summary")
    if g:
        out.append({
            "run": run.name, "source": "generate", "policy": f"{g.get('policy')} ({g.get('strategy')})",
            "threshold": None, "mean_exit_layer": g.get("mean_exit_layer"), "num_layers": g.get("num_layers") or L,
            "speedup": g.get("speedup"), "consistency": g.get("token_consistency"),
            "decision_fraction": g.get("decision_fraction"), "flops_ratio": g.get("flops_ratio"), "metric": None, "score": None, "ratio": None,
        })
    return out


def best_point(rows: Sequence[Mapping[str, Any]], floor: float) -> Mapping[str, Any] | None:
    """The fastest policy point whose score is at least `floor` x the full model's."""
    ok = [r for r in rows if r["policy"] not in ("full", "oracle") and is_num(r.get("speedup"))
          and is_num(r.get("ratio")) and r["ratio"] >= floor]
    return max(ok, key=lambda r: r["speedup"]) if ok else None


HEADLINE_COLUMNS = ("run", "layers", "val_loss", "val_acc", "metric", "full", "floor", "best", "speedup", "mean_exit",
                    "x_full", "oracle_exit", "generate", "gen_speedup", "gen_mean_exit", "gen_consistency", "ee_score")


def headline(run: Run, quality: float | None = None) -> dict[str, Any]:
    """One row per run: the last layer's validation numbers, the full model's score, the fastest point
    within `quality` x the full model's score, early-exit generation, the oracle and the ee_score."""
    row: dict[str, Any] = {"run": run.name, "layers": run.num_layers}
    last = (run.tables.get("layer_report") or [None])[-1]
    row["val_loss"] = last.get("loss") if last else None
    row["val_acc"] = last.get("acc") if last else None
    pts = points(run)
    for source in ("quality_speed", "accuracy_speed"):
        mine = [p for p in pts if p["source"] == source]
        if not mine or "metric" in row:
            continue
        floor = quality if quality is not None else QUALITY[source]
        full = next((p for p in mine if p["policy"] == "full"), None)
        oracle = next((p for p in mine if p["policy"] == "oracle"), None)
        best = best_point(mine, floor)
        row.update({
            "metric": mine[0]["metric"], "full": full["score"] if full else None, "floor": floor,
            "best": f"{best['policy']}@{threshold(best['threshold'])}" if best else None,
            "speedup": best["speedup"] if best else None,
            "mean_exit": best["mean_exit_layer"] if best else None,
            "x_full": best["ratio"] if best else None,
            "oracle_exit": oracle["mean_exit_layer"] if oracle else None,
        })
    g = next((p for p in pts if p["source"] == "generate"), None)
    if g:
        row.update({"generate": g["policy"], "gen_speedup": g["speedup"], "gen_mean_exit": g["mean_exit_layer"],
                    "gen_consistency": g["consistency"]})
    models = (run.summaries.get("analysis_summary") or {}).get("models") or []
    if models:
        main = models[0]
        if row.get("oracle_exit") is None and "oracle" in main:
            row["oracle_exit"] = main["oracle"].get("mean")
        suit = {r["model"]: r for r in run.tables.get("suitability", [])}
        if main.get("model") in suit:
            row["ee_score"] = suit[main["model"]]["ee_score"]
    return row


def layer_rows(run: Run) -> list[dict[str, Any]]:
    out = [{"run": run.name, "source": "layer_report", **r} for r in run.tables.get("layer_report", [])]
    out += [{"run": run.name, "source": "layer_scores", **r} for r in run.tables.get("layer_scores", [])]
    return out


def policy_rows(run: Run, consistency: float = CONSISTENCY) -> list[dict[str, Any]]:
    """Per measure of policies.csv: the lowest mean exit layer at consistency >= `consistency` (offline, on
    the validation records), and the LTT-calibrated threshold of calibration.json."""
    rows = run.tables.get("policies") or []
    calibrated = {c.get("policy"): c for c in run.summaries.get("calibration") or [] if isinstance(c, Mapping)}
    out = []
    for measure in dict.fromkeys(r["measure"] for r in rows):
        ok = [r for r in rows if r["measure"] == measure and is_num(r.get("consistency"))
              and r["consistency"] >= consistency]
        best = min(ok, key=lambda r: r["mean_exit_layer"]) if ok else None
        cal = calibrated.get(measure)
        out.append({
            "run": run.name, "measure": measure, "min_exit_layer": rows[0].get("min_exit_layer"),
            "threshold": best["threshold"] if best else None,
            "mean_exit_layer": best["mean_exit_layer"] if best else None,
            "consistency": best["consistency"] if best else None,
            "accuracy": best.get("accuracy") if best else None,
            "expected_saving": best.get("expected_saving") if best else None,
            "ltt_threshold": cal.get("threshold") if cal else None,
        })
    return out


def analysis_rows(run: Run) -> list[dict[str, Any]]:
    """analysis_summary.json flattened: one row per analysed model."""
    out = []
    for m in (run.summaries.get("analysis_summary") or {}).get("models") or []:
        row: dict[str, Any] = {"run": run.name, "model": m.get("model"), "layers": m.get("num_layers"),
                               "tokens": m.get("tokens"), "agree_half": m.get("agree_at_half_depth"),
                               "cos_half": m.get("similarity_at_half_depth")}
        o = m.get("oracle") or {}
        row["oracle_mean"] = o.get("mean")
        row.update({f"early_{k[len('before_last_'):]}": v for k, v in o.items() if k.startswith("before_last_")})
        gates = {p: g.get("efficiency") for p, g in (m.get("gating") or {}).items() if is_num(g.get("efficiency"))}
        if gates:
            top = max(gates, key=gates.get)
            row["best_gate"], row["gating_eff"] = top, gates[top]
        sat = m.get("saturation") or {}
        for s in ("easy", "difficult"):
            if s in sat:
                row[f"first_similar_{s}"] = sat[s].get("first_similar")
        sub = m.get("sublayer_topk_before") or {}
        if sub:
            row["topk_stream"], row["topk_module"] = sub.get("stream"), sub.get("output")
        out.append(row)
    return out


def tagged(run: Run, key: str) -> list[dict[str, Any]]:
    return [{"run": run.name, **r} for r in run.tables.get(key, [])]


# ------------------------------------------------------------------------------------- paper numbers

@dataclass
class PaperNumber:
    """A number a paper reports, where it reports it, and (optionally) how to read ours from the runs."""

    quantity: str
    paper: str
    source: str
    measured: Callable[[Sequence[Run]], Any] | None = None


def first(runs: Sequence[Run], get: Callable[[Run], Any]) -> Any:
    """The first run's value that is not None (errors in a getter count as missing)."""
    for run in runs:
        try:
            v = get(run)
        except (KeyError, IndexError, TypeError, StopIteration):
            continue
        if v is not None:
            return v
    return None


def best_speedup(runs: Sequence[Run], quality: float | None = None) -> Any:
    def get(run: Run) -> Any:
        h = headline(run, quality)
        return None if h.get("speedup") is None else (
            f"{h['speedup']:.2f}x at {100 * h['x_full']:.1f}% of full {h['metric']} ({h['best']})")
    return first(runs, get)


def generate_speedup(runs: Sequence[Run]) -> Any:
    def get(run: Run) -> Any:
        g = run.summaries["generation_summary"]
        return (f"{g['speedup']:.2f}x, token consistency {g['token_consistency']:.4f}, "
                f"mean exit {g['mean_exit_layer']:.2f} of {g['num_layers']}")
    return first(runs, get)


def saturation_value(runs: Sequence[Run], set_name: str, column: str, percent: bool = False) -> Any:
    """saturation.csv of the first analysed model (the run's own): `column` of the set `set_name`."""
    def get(run: Run) -> Any:
        rows = run.tables["saturation"]
        row = next(r for r in rows if r["model"] == rows[0]["model"] and r["set"] == set_name)
        v = row[column]
        if v is None:
            return None
        if percent:
            return f"{100 * v:.0f}%"
        std = row.get(f"{column}_std")
        return f"{v:.2f} ({std:.2f})" if is_num(std) else f"{v:.2f}"
    return first(runs, get)


def stability_after(runs: Sequence[Run], layer: int) -> Any:
    """saturation_layers.csv of the first analysed model: share of tokens whose top-1 no longer changes
    after `layer` (MEE Fig. 1)."""
    def get(run: Run) -> Any:
        rows = run.tables["saturation_layers"]
        row = next(r for r in rows if r["model"] == rows[0]["model"] and r["layer"] == layer)
        return None if row["top1_stability"] is None else f"{100 * row['top1_stability']:.0f}%"
    return first(runs, get)


# ------------------------------------------------------------------------------------------ formatting

def fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) >= 10 else f"{v:.3f}" if abs(v) >= 0.001 or v == 0 else f"{v:.2g}"
    return str(v)


def threshold(t: Any) -> str:
    return f"{t:g}" if is_num(t) else fmt(t)


def columns(rows: Sequence[Mapping[str, Any]], order: Sequence[str] = ()) -> list[str]:
    """Every column, those of `order` first in that order, the others in first-seen order; without the
    columns empty in every row."""
    cols: list[str] = [c for c in order if any(c in r for r in rows)]
    for r in rows:
        cols += [k for k in r if k not in cols]
    return [c for c in cols if any(r.get(c) not in (None, "") for r in rows)]


def markdown(rows: Sequence[Mapping[str, Any]], order: Sequence[str] = ()) -> str:
    cols = columns(rows, order)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    cell = {c: threshold if c.endswith("threshold") else fmt for c in cols}  # thresholds as given: 0.5, 1e-3
    lines += ["| " + " | ".join(cell[c](r.get(c)).replace("|", "\\|") for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path, order: Sequence[str] = ()) -> Path:
    cols = columns(rows, order)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: "" if r.get(c) is None else r.get(c) for c in cols})
    return path


# ---------------------------------------------------------------------------------------------- plots

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    plt = _pyplot()
    for ax in fig.axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_quality_speed(pts: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """Score against measured speed-up, one panel per metric, a line per (run, policy), the full model
    as a star (one colour per policy for one run in a panel; per run, with a line style per policy, for
    several)."""
    pts = [p for p in pts if p["source"] != "generate" and p["metric"]]
    metrics = list(dict.fromkeys(p["metric"] for p in pts))
    if not metrics:
        return None
    plt = _pyplot()
    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-"), ("P", "--")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        mine = [p for p in pts if p["metric"] == metric]
        runs = list(dict.fromkeys(p["run"] for p in mine))
        single = len(runs) == 1  # one run in this panel: a colour per policy
        for i, run in enumerate(runs):
            policies = [q for q in dict.fromkeys(p["policy"] for p in mine if p["run"] == run) if q != "oracle"]
            for j, policy in enumerate(q for q in policies if q != "full"):
                xy = sorted((p["speedup"], p["score"], p["threshold"]) for p in mine if p["run"] == run
                            and p["policy"] == policy and is_num(p["speedup"]) and is_num(p["score"]))
                marker, line = styles[j % len(styles)]
                ax.plot([x[0] for x in xy], [x[1] for x in xy], marker=marker, markersize=4, linestyle=line,
                        color=None if single else f"C{i % 10}", label=policy if single else f"{run}: {policy}")
                for x, y, t in xy:
                    ax.annotate(threshold(t), (x, y), fontsize=6, textcoords="offset points", xytext=(3, 3))
            full = [p for p in mine if p["run"] == run and p["policy"] == "full" and is_num(p["score"])]
            if full:
                ax.plot([1.0], [full[0]["score"]], marker="*", markersize=13, linestyle="none",
                        color="black" if single else f"C{i % 10}", label="full model" if single else f"{run}: full")
        ax.set(xlabel="measured speed-up over the full model (x)", ylabel=metric, title=f"{metric} vs speed-up")
    return _save(fig, path)


def plot_layers(rows: Sequence[Mapping[str, Any]], path: Path, single: bool) -> Path | None:
    """Per layer: agreement of the exit's top-1 with the last layer's, and its accuracy."""
    if not rows:
        return None
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (run, source) in dict.fromkeys((r["run"], r["source"]) for r in rows):
        mine = [r for r in rows if r["run"] == run and r["source"] == source]
        label = source if single else f"{run} ({source})"
        agree = [(r["layer"], r.get("agree", r.get("agree_last"))) for r in mine]
        # training's acc is a share, the classify stage's accuracy a percentage
        acc = [(r["layer"], r["acc"] if "acc" in r else r["accuracy"] / 100 if is_num(r.get("accuracy")) else None)
               for r in mine]
        for ax, xy in ((a, agree), (b, acc)):
            xy = [p for p in xy if is_num(p[1])]
            if xy:
                ax.plot([p[0] for p in xy], [p[1] for p in xy], marker="o", markersize=4, label=label)
    a.set(xlabel="exit layer", ylabel="top-1 equals the last layer's", title="agreement with the last layer")
    b.set(xlabel="exit layer", ylabel="accuracy (token top-1, or the task's)", title="accuracy per exit")
    return _save(fig, path)


def plot_policies(runs: Sequence[Run], path: Path) -> Path | None:
    """Offline consistency against mean exit layer, a line per (run, measure) of policies.csv."""
    if not any(r.tables.get("policies") for r in runs):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    single = sum(bool(r.tables.get("policies")) for r in runs) == 1
    for run in runs:
        rows = run.tables.get("policies") or []
        for measure in dict.fromkeys(r["measure"] for r in rows):
            xy = sorted((r["mean_exit_layer"], r["consistency"]) for r in rows if r["measure"] == measure
                        and is_num(r["mean_exit_layer"]) and is_num(r["consistency"]))
            ax.plot([p[0] for p in xy], [p[1] for p in xy], marker="o", markersize=3,
                    label=measure if single else f"{run.name}: {measure}")
    ax.set(xlabel="mean exit layer", ylabel="consistency with the last layer",
           title="exit policies on the validation records (offline)")
    return _save(fig, path)


def plot_stability(rows: Sequence[Mapping[str, Any]], path: Path, single: bool) -> Path | None:
    """MEE Fig. 1: the share of tokens whose top-1 no longer changes after each layer, per model."""
    rows = [r for r in rows if is_num(r.get("top1_stability"))]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run, model in dict.fromkeys((r["run"], r["model"]) for r in rows):
        xy = [(r["layer"], r["top1_stability"]) for r in rows if r["run"] == run and r["model"] == model]
        ax.plot([p[0] for p in xy], [p[1] for p in xy], marker="o", markersize=4,
                label=model if single else f"{run}: {model}")
    ax.set(xlabel="layer", ylabel="share of tokens whose top-1 no longer changes", ylim=(0, 1.02),
           title="top-1 stability (MEE Fig. 1)")
    return _save(fig, path)


# ------------------------------------------------------------------------------------------- the report

HEADLINE_HELP = {
    "val_loss": "`val_loss` / `val_acc`: the last layer on the validation split (training's layer_report.csv)",
    "full": "`full`: the full model's `metric`",
    "best": "`best`: the fastest policy@threshold whose `metric` is at least `floor` x the full model's, with "
            "its measured `speedup`, `mean_exit` layer and `x_full` (its score / the full model's)",
    "oracle_exit": "`oracle_exit`: the mean earliest layer from which the top-1 stays the last layer's",
    "generate": "`gen_*`: early-exit generation against full decoding in the same run (speed-up, mean exit "
                "layer, token consistency)",
    "ee_score": "`ee_score`: the analysis' skip-weighted layer-to-final similarity",
}


def headline_help(rows: Sequence[Mapping[str, Any]]) -> str:
    present = columns(rows)
    return "; ".join(text for col, text in HEADLINE_HELP.items() if col in present) + "."


def report(runs: Sequence[Run], out: Path, title: str, paper: Sequence[PaperNumber] = (),
           quality: float | None = None, consistency: float = CONSISTENCY, notes: str = "") -> str:
    """Write the tables (results.md, results.csv and one CSV per table) and plots into `out`; return the
    markdown."""
    out.mkdir(parents=True, exist_ok=True)
    single = len(runs) == 1
    heads = [headline(r, quality) for r in runs]
    sections: list[tuple[str, str, list[dict[str, Any]], str]] = [
        ("results", "Results", heads, headline_help(heads)),
    ]
    if paper:
        sections.append(("paper", "Paper and this reproduction", [
            {"quantity": p.quantity, "paper": p.paper, "source": p.source,
             "measured": fmt(p.measured(runs)) if p.measured else ""} for p in paper], ""))
    pts = [p for r in runs for p in points(r)]
    layers = [row for r in runs for row in layer_rows(r)]
    stability = [row for r in runs for row in tagged(r, "saturation_layers")]
    sections += [
        ("points", "Operating points (measured speed-up)", pts,
         "`source`: quality_speed (stage curve), accuracy_speed (stage classify) or generate; `consistency`: "
         "agreement with the full model's tokens / predictions; `decision_fraction`: share of the time spent "
         "deciding; `flops_ratio`: decoding FLOPs per token / the full model's (counted); `ratio`: score / the "
         "full model's."),
        ("layers", "Per-layer validation report", layers,
         "`agree` / `agree_last`: the exit's top-1 equals the last layer's."),
        ("policies", f"Exit policies (offline, validation records): lowest mean exit at consistency >= {consistency:g}",
         [row for r in runs for row in policy_rows(r, consistency)],
         "`ltt_threshold`: the Learn-then-Test threshold of calibration.json."),
        ("analysis", "Analyses (analysis_summary.json)", [row for r in runs for row in analysis_rows(r)],
         "`agree_half` / `cos_half`: top-1 agreement and cos(h, h_L) at half depth; `oracle_mean`: mean oracle "
         "exit layer; `early_k`: share of tokens that could exit at least k layers before the last; `gating_eff`: "
         "the best gate's share of the oracle's savings at consistency >= 0.99; `topk_*`: top-k kept through a "
         "sub-layer by the residual stream / the module output."),
        ("saturation", "Hidden-state saturation (MEE Table 1)", [row for r in runs for row in tagged(r, "saturation")],
         "Per token: first layer with cos(h_i, h_L) >= 0.9, number of such layers, prefix length, and whether "
         "the similarity increases strictly from layer 0 / 4 / 8; easy / difficult: top / bottom quarter by mean "
         "similarity (at most 1000 tokens)."),
        ("suitability", "Early-exit suitability", [row for r in runs for row in tagged(r, "suitability")], ""),
    ]
    md = [f"# {title}", ""]
    if notes:
        md += [notes.strip(), ""]
    md += ["Runs: " + "; ".join(f"`{r.name}` ({r.path}: {', '.join(r.files)})" for r in runs), ""]
    for key, heading, rows, help_text in sections:
        if not rows:
            continue
        order = HEADLINE_COLUMNS if key == "results" else ()
        write_csv(rows, out / f"{key}.csv", order)
        md += [f"## {heading}", "", markdown(rows, order), ""]
        if help_text:
            md += [help_text, ""]
    images = [p for p in (
        plot_quality_speed(pts, out / "quality_speed.png"),
        plot_layers(layers, out / "layers.png", single),
        plot_policies(runs, out / "policies.png"),
        plot_stability(stability, out / "stability.png", len({r["run"] for r in stability}) == 1),
    ) if p is not None]
    if images:
        md += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images] + [""]
    text = "\n".join(md)
    (out / "results.md").write_text(text)
    return text


def main(experiment: str, title: str, paper: Sequence[PaperNumber] = (), notes: str = "",
         argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=f"{title}: the results tables (markdown + CSV) and plots of eetrain run directories.")
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="a run directory (hydra.run.dir), or NAME=DIR to name it in the tables")
    parser.add_argument("--out", type=Path, default=Path("outputs/reports") / experiment,
                        help="where to write results.md, the CSVs and the PNGs (default: %(default)s)")
    parser.add_argument("--quality", type=float, default=None,
                        help="the fastest point must keep this share of the full model's score "
                             "(default: 0.97 for generation, 0.99 for classification)")
    parser.add_argument("--consistency", type=float, default=CONSISTENCY,
                        help="policies: the lowest mean exit layer at this consistency (default: %(default)s)")
    args = parser.parse_args(argv)
    runs = read_runs(args.runs)
    if not runs:
        parser.error("no run directory with results among the arguments")
    print(report(runs, args.out, title, paper, args.quality, args.consistency, notes))
    print(f"\n[report] wrote results.md, the CSVs and the plots to {args.out}", file=sys.stderr)
    return 0
