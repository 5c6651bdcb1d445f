"""W&B dashboards: every exit in one panel, the stages' tables and plots, the export as an artifact.

`WandbPanels` (`callbacks.wandb_panels`; a no-op unless a `WandbLogger` is attached, rank 0 only):

* at setup: `define_metric` for `train/*`, `val/*`, `train/layer_*`, `val/layer_*` against
  `trainer/global_step`, and per-layer summaries (`val/layer_XX/loss`: min, `acc` / `agree`: max);
* after every `every_n_validations`-th validation: one line-series chart per metric with a line per
  exit layer, `exits/val_loss`, `exits/val_acc`, `exits/val_agree` (x: trainer/global_step), and from
  the training steps logged so far `exits/train_ce`, `exits/train_acc`;
* at the end of fit: `exits/layer_report` (the last validation's per-layer rows, `layer_report.csv`'s
  columns) and `exits/layer_report_plot` (accuracy and agreement against the exit layer).

The stages call the helpers below when a run is active: `log_generation` (`generate/...`),
`log_policies` (`policies/...`), `eetrain.decoding.curve.log_wandb` (`curve/...`, `classify/...`),
`log_table` (`classify/layers`);
`log_export_artifact` uploads the export when `callbacks.wandb_panels.export_artifact=true`.
Every key and how to build a workspace from them: docs/wandb.md.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L

VAL_METRICS = ("loss", "acc", "agree")
TRAIN_METRICS = ("ce", "mse", "acc")  # mse: a regression head's per-exit loss
#: summary aggregation per metric (the best value and the last one)
SUMMARY = {"loss": "min,last", "ce": "min,last", "mse": "min,last", "acc": "max,last", "agree": "max,last"}
MAX_POINTS = 500  # points per line of a line-series chart (W&B charts 10k rows at most)


def active_run() -> Any:
    """The active W&B run (logger=wandb), or None (no run, or wandb not installed)."""
    try:
        import wandb
    except ImportError:
        return None
    return wandb.run


def _cell(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, Mapping | list | tuple):
        return json.dumps(v, default=str)
    return v


def table(rows: Sequence[Mapping[str, Any]]) -> Any:
    """A `wandb.Table` of dict rows (columns: the union of their keys, in order of appearance)."""
    import wandb

    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    # a column may hold numbers and labels (a curve's thresholds: 0.9, per-layer[...], adaptive:0.3)
    return wandb.Table(columns=columns, data=[[_cell(r.get(c)) for c in columns] for r in rows],
                       allow_mixed_types=True)


def log_table(key: str, rows: Sequence[Mapping[str, Any]], run: Any = None) -> bool:
    """`rows` as a table under `key` in the active run (if any)."""
    run = run or active_run()
    if run is None or not rows:
        return False
    run.log({key: table(rows)})
    return True


def _thin(xs: list[Any], ys: list[list[Any]]) -> tuple[list[Any], list[list[Any]]]:
    step = max(1, math.ceil(len(xs) / MAX_POINTS))
    if step == 1:
        return xs, ys
    keep = list(range(0, len(xs), step))
    if keep[-1] != len(xs) - 1:
        keep.append(len(xs) - 1)  # always the latest point
    return [xs[i] for i in keep], [[y[i] for i in keep] for y in ys]


def layer_series(history: Sequence[Mapping[str, Any]], prefix: str, metric: str, layers: Sequence[int],
                 x: str = "trainer/global_step") -> tuple[list[Any], list[list[Any]], list[str]]:
    """xs, one list of values per exit layer and their keys (`layer 01`...), from history rows that hold
    `<prefix>/layer_XX/<metric>`; layers missing from every row are left out."""
    rows = [h for h in history if any(f"{prefix}/layer_{i:02d}/{metric}" in h for i in layers)]
    xs = [h[x] for h in rows]
    ys, keys = [], []
    for i in layers:
        key = f"{prefix}/layer_{i:02d}/{metric}"
        if any(key in h for h in rows):
            ys.append([h.get(key) for h in rows])
            keys.append(f"layer {i:02d}")
    return xs, ys, keys


def layer_rows(metrics: Mapping[str, Any], prefix: str = "val",
               names: Sequence[str] = VAL_METRICS) -> list[dict[str, Any]]:
    """Per-layer rows `{layer, loss, acc, agree}` from logged metrics `<prefix>/layer_XX/<name>` (e.g.
    `trainer.callback_metrics`): `layer_report.csv`'s rows for the last validation."""
    pattern = re.compile(rf"^{re.escape(prefix)}/layer_(\d+)/({'|'.join(map(re.escape, names))})$")
    by_layer: dict[int, dict[str, Any]] = {}
    for key, value in metrics.items():
        m = pattern.match(key)
        if m:
            by_layer.setdefault(int(m.group(1)), {"layer": int(m.group(1))})[m.group(2)] = float(value)
    return [{"layer": i, **{n: by_layer[i].get(n) for n in names}} for i in sorted(by_layer)]


def log_layer_report(rows: Sequence[Mapping[str, Any]], run: Any = None, key: str = "exits/layer_report") -> bool:
    """`layer_report.csv` rows (layer, loss, acc, agree) as a table, and accuracy / agreement against the
    exit layer as a chart (`<key>_plot`)."""
    import wandb

    run = run or active_run()
    if run is None or not rows:
        return False
    layers = [r["layer"] for r in rows]
    series = [n for n in ("acc", "agree") if any(r.get(n) is not None for r in rows)]
    logs: dict[str, Any] = {key: table(rows)}
    if series:
        logs[f"{key}_plot"] = wandb.plot.line_series(
            xs=layers, ys=[[r.get(n) for r in rows] for n in series], keys=series,
            title="accuracy and agreement with the last layer, per exit layer", xname="exit layer",
        )
    run.log(logs)
    return True


def log_generation(summary: Mapping[str, Any], exit_layers: Sequence[int], num_layers: int,
                   run: Any = None) -> bool:
    """The `generate` stage: `generate/exit_layers` (histogram of the tokens' exit layers, one bin per
    layer), `generate/exit_layer_counts` (+ `_plot`, a bar chart), `generate/summary` (one row), with FREE's
    adaptive threshold its value after every refit (`generate/adaptive_threshold` + `_plot`, a line), and
    the summary's numbers in the run summary (`generate/<name>`)."""
    import numpy as np
    import wandb

    run = run or active_run()
    if run is None:
        return False
    layers = np.asarray(list(exit_layers), dtype=np.int64)
    edges = np.arange(0.5, num_layers + 1.5)
    counts, _ = np.histogram(layers, bins=edges)
    total = max(int(counts.sum()), 1)
    count_rows = [{"layer": i + 1, "tokens": int(c), "share": float(c) / total} for i, c in enumerate(counts)]
    counts_table = table(count_rows)
    run.log({
        "generate/exit_layers": wandb.Histogram(np_histogram=(counts, edges)),
        "generate/exit_layer_counts": counts_table,
        "generate/exit_layer_counts_plot": wandb.plot.bar(counts_table, "layer", "tokens",
                                                          title="generated tokens per exit layer"),
        "generate/summary": table([summary]),
    })
    refits = [{"update": i + 1, "threshold": t} for i, t in enumerate(summary.get("adaptive_thresholds") or [])
              if t is not None]
    if refits:
        refit_table = table(refits)
        run.log({"generate/adaptive_threshold": refit_table,
                 "generate/adaptive_threshold_plot": wandb.plot.line(
                     refit_table, "update", "threshold", title="FREE's adaptive threshold after each refit")})
    for k, v in summary.items():
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            run.summary[f"generate/{k}"] = v
    return True


def log_policies(rows: Sequence[Mapping[str, Any]], png: Path | None = None,
                 calibration: Sequence[Mapping[str, Any]] | None = None, run: Any = None) -> bool:
    """The `policies` stage: `policies/table` (policies.csv), `policies/plot` (policies.png),
    `policies/consistency_vs_exit` (a scatter of the table) and `policies/calibration` (LTT results)."""
    import wandb

    run = run or active_run()
    if run is None or not rows:
        return False
    t = table(rows)
    logs: dict[str, Any] = {"policies/table": t}
    if {"mean_exit_layer", "consistency"} <= set(t.columns):
        logs["policies/consistency_vs_exit"] = wandb.plot.scatter(
            t, "mean_exit_layer", "consistency", title="consistency vs mean exit layer")
    if png is not None and Path(png).is_file():
        logs["policies/plot"] = wandb.Image(str(png))
    if calibration:
        logs["policies/calibration"] = table(calibration)
    run.log(logs)
    return True


def _artifact_name(run: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{run.name or run.id}-export").strip("-")


def log_export_artifact(export_dir: Path | str, trainer: L.Trainer | None = None, *, force: bool = False) -> bool:
    """Upload `export_dir` (model, tokenizer, early_exit.json, classifiers) as a W&B `model` artifact,
    when `callbacks.wandb_panels.export_artifact=true` (a `WandbPanels` on `trainer` with the switch on)
    or `force`. Run after the stages, which add the classifiers and the calibrated policy to the export."""
    if not force:
        panels = [c for c in (trainer.callbacks if trainer is not None else []) if isinstance(c, WandbPanels)]
        if not any(p.export_artifact for p in panels):
            return False
        if trainer is not None and not trainer.is_global_zero:
            return False
    run = active_run()
    export_dir = Path(export_dir)
    if run is None or not export_dir.is_dir():
        return False
    import wandb

    meta: dict[str, Any] = {}
    settings = export_dir / "early_exit.json"
    if settings.is_file():
        meta = json.loads(settings.read_text())
    art = wandb.Artifact(_artifact_name(run), type="model", metadata=meta,
                         description="eetrain export: transformers model, tokenizer, early_exit.json")
    art.add_dir(str(export_dir))
    run.log_artifact(art, aliases=["latest"])
    return True


class WandbPanels(L.Callback):
    """Per-exit W&B charts during training; see the module docstring. Does nothing without a WandbLogger.

    every_n_validations: charts after every n-th validation (the last one is always charted at the end).
    export_artifact: `log_export_artifact(export_dir, trainer)` uploads the export (train.py, after the
    stages).
    """

    def __init__(self, every_n_validations: int = 1, export_artifact: bool = False):
        from eetrain.errors import positive_int

        positive_int(every_n_validations, "callbacks.wandb_panels.every_n_validations")
        self.every = int(every_n_validations)
        self.export_artifact = bool(export_artifact)
        self.val_history: list[dict[str, Any]] = []
        self.train_history: list[dict[str, Any]] = []
        self.validations = 0
        self._last_train_step = -1
        self._layers: tuple[int, ...] = ()

    # the history goes into checkpoints, so the charts of a resumed run start at step 0
    def state_dict(self) -> dict[str, Any]:
        return {"val_history": self.val_history, "train_history": self.train_history,
                "validations": self.validations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.val_history = list(state.get("val_history", []))
        self.train_history = list(state.get("train_history", []))
        self.validations = int(state.get("validations", 0))

    # -- the run -------------------------------------------------------------------------------------
    @staticmethod
    def run(trainer: L.Trainer) -> Any:
        """The W&B run of trainer's WandbLogger (rank 0), else None."""
        if not trainer.is_global_zero:
            return None
        from lightning.pytorch.loggers import WandbLogger

        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                return lg.experiment
        return None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        run = self.run(trainer)
        backbone = getattr(pl_module, "backbone", None)
        self._layers = tuple(range(1, int(getattr(backbone, "num_layers", 0)) + 1))
        if run is None:
            return
        step = "trainer/global_step"
        run.define_metric(step)
        for glob in ("train/layer_*", "val/layer_*", "train/*", "val/*"):
            run.define_metric(glob, step_metric=step, step_sync=True)
        for i in self._layers:
            for prefix, names in (("val", VAL_METRICS), ("train", TRAIN_METRICS)):
                for n in names:
                    run.define_metric(f"{prefix}/layer_{i:02d}/{n}", step_metric=step, summary=SUMMARY[n])

    def _record(self, trainer: L.Trainer, prefix: str, names: Sequence[str], **extra: Any) -> dict[str, Any]:
        row: dict[str, Any] = {"trainer/global_step": int(trainer.global_step), "epoch": int(trainer.current_epoch),
                               **extra}
        for key, value in trainer.callback_metrics.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == prefix and parts[1].startswith("layer_") and parts[2] in names:
                row[key] = float(value)
        return row

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # the module logs per-layer accuracy on steps divisible by log_every_n_steps: sample those steps
        step = int(trainer.global_step) - 1  # the optimizer step this batch made
        if step == self._last_train_step or step % max(trainer.log_every_n_steps, 1) or not trainer.is_global_zero:
            return
        self._last_train_step = step
        row = self._record(trainer, "train", TRAIN_METRICS)
        row["trainer/global_step"] = step
        if len(row) > 2:
            self.train_history.append(row)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        self.validations += 1
        row = self._record(trainer, "val", VAL_METRICS)
        if len(row) > 2:
            self.val_history.append(row)
        if (self.validations - 1) % self.every == 0:
            self.log_charts(trainer)

    def log_charts(self, trainer: L.Trainer) -> bool:
        """The per-exit line-series charts from the history so far."""
        import wandb

        run = self.run(trainer)
        if run is None:
            return False
        layers = self._layers or tuple(r["layer"] for r in layer_rows(trainer.callback_metrics))
        logs: dict[str, Any] = {}
        for prefix, names, history in (("val", VAL_METRICS, self.val_history),
                                       ("train", TRAIN_METRICS, self.train_history)):
            for n in names:
                xs, ys, keys = layer_series(history, prefix, n, layers)
                if not xs or not ys:
                    continue
                xs, ys = _thin(xs, ys)
                logs[f"exits/{prefix}_{n}"] = wandb.plot.line_series(
                    xs=xs, ys=ys, keys=keys, title=f"{prefix} {n} per exit layer", xname="trainer/global_step")
        if not logs:
            return False
        run.log({**logs, "trainer/global_step": int(trainer.global_step)})
        return True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run = self.run(trainer)
        if run is None:
            return
        if self.validations and (self.validations - 1) % self.every:
            self.log_charts(trainer)  # the last validation's charts
        log_layer_report(layer_rows(trainer.callback_metrics), run=run)
