"""End to end: `+experiment=analyze_demo` (shortened) trains the CALM model, trains a second model with
the given overrides into the cache, analyses both and writes every table, plot and W&B entry; a second
stage run reuses the cached model instead of training it again."""

from __future__ import annotations

import csv
import json

import pytest

from eetrain.analysis import ANALYSES
from eetrain.analysis.stage import _trained_export, analyze_settings
from eetrain.config import compose
from tests.in_process import cli

SHORT = ["trainer.max_epochs=1", "++trainer.limit_train_batches=5", "++trainer.limit_val_batches=2"]
PLAIN = ("analyze.models=[{name: plain, overrides: ['+experiment=demo', 'loss=last_layer', 'trainer.max_epochs=1', "
         "'++trainer.limit_train_batches=5', '++trainer.limit_val_batches=2', 'callbacks=none']}]")


@pytest.mark.slow
def test_analyze_demo_two_models_offline(tmp_path):
    args = ["+experiment=analyze_demo", *SHORT, "model.config.num_layers=4", "model.config.num_decoder_layers=4",
            PLAIN, "analyze.max_examples=16", f"analyze.cache_dir={tmp_path / 'cache'}", "exit.classifiers.epochs=1",
            "exit.classifiers.max_train_tokens=2000", "logger=wandb"]
    r = cli(*args, "hydra.run.dir=run", cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "run"
    for name in ANALYSES:
        assert (out / f"{name}.png").stat().st_size > 5_000, name
    for table in ("agreement", "oracle", "confidence", "gating", "gating_summary", "saturation", "saturation_layers",
                  "subword", "sublayer", "suitability"):
        rows = list(csv.DictReader((out / f"{table}.csv").open()))
        assert {r["model"] for r in rows} == {"calm", "plain"}, table
    suit = list(csv.DictReader((out / "suitability.csv").open()))
    assert [int(r["rank"]) for r in suit] == [1, 2]
    gates = {r["policy"] for r in csv.DictReader((out / "gating_summary.csv").open()) if r["model"] == "calm"}
    assert "classifier:calm" in gates and "softmax_gap" in gates  # the run's trained classifier is scored too
    summary = json.loads((out / "analysis_summary.json").read_text())
    assert [m["model"] for m in summary["models"]] == ["calm", "plain"]
    assert "Early-exit suitability" in r.stdout and "== plain: 4 layers" in r.stdout
    (run,) = (out / "wandb").glob("offline-run-*")
    record = next(run.glob("run-*.wandb")).read_bytes()
    assert b"analysis/oracle" in record and b"analysis/suitability" in record
    # the second model was trained once: the stage finds it in the cache and does not train it again
    cfg = compose(["+experiment=analyze_demo", PLAIN, f"analyze.cache_dir={tmp_path / 'cache'}"])
    (entry,) = analyze_settings(cfg).models
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    export = _trained_export(entry, analyze_settings(cfg))
    assert export.startswith(str(tmp_path / "cache" / "plain-")) and export.endswith("export")
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()}
