"""End-to-end runs of the loss recipes through the CLI (slow tier)."""

import csv
import json

import pytest

from tests.in_process import cli

SHORT = ["trainer.max_epochs=1", "++trainer.limit_train_batches=5", "++trainer.limit_val_batches=2"]


@pytest.mark.slow
def test_free_demo_runs_offline(tmp_path):
    r = cli("+experiment=free_demo", *SHORT, "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "run"
    rows = list(csv.DictReader((run / "layer_report.csv").open()))
    assert [int(row["layer"]) for row in rows] == [1, 2, 3, 4]
    settings = json.loads((run / "export" / "early_exit.json").read_text())
    assert settings["trained_exits"]["ce"] == {"layers": [2, 4], "weights": [pytest.approx(1 / 3), pytest.approx(2 / 3)]}
    metrics = (next(run.glob("csv/**/metrics.csv"))).read_text()
    header = metrics.splitlines()[0].split(",")
    assert "val/kd/mse" in header and "val/layer_02/ce" in header and "val/layer_03/ce" not in header


@pytest.mark.slow
def test_layerskip_recipe_runs(tmp_path):
    r = cli("loss=layerskip", "trainer.max_epochs=1", "++trainer.limit_train_batches=3", "trainer.log_every_n_steps=1",
            "++trainer.limit_val_batches=1", "export=false", "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = (next((tmp_path / "run").glob("csv/**/metrics.csv"))).read_text()
    assert "train/skipped_layers" in metrics and "train/ce/exits" in metrics


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+experiment=free_demo", "exits.layers={shallow:4}"], "exits.layers.shallow=4 must be within 1..3"),
        (["+experiment=free_demo", "exits.layers.shallow=abc"], "exits.layers.shallow='abc' must be an integer >= 1"),
        (["+experiment=free_demo", "loss.terms.kd.shallow_layer=4"], "loss.terms.kd.shallow_layer=4 must be within 1..3"),
        (["+experiment=free_demo", "loss.terms.kd.alpha=-0.5"], "loss.terms.kd.alpha=-0.5 must be a finite number >= 0"),
        (["+experiment=free_demo", "loss.terms.kd.mapping=nearest"], "allowed: last, uniform, uniform_deep, closest"),
        (["loss=layerskip", "loss.terms.ce.curriculum.every=0"], "loss.terms.ce.curriculum.every=0 must be an integer >= 1"),
        (["exits.layers=[1,2]", "exits.min_layer=3"], "exits.min_layer=3 is above every exit layer [1, 2]"),
        (["exits.layers={every:0}"], "exits.layers.every=0 must be >= 1"),
        (["loss=free"], "loss.terms.kd.shallow_layer is not set: set exits.layers={shallow: L_s}"),
    ],
)
def test_bad_loss_config_one_clear_message(tmp_path, overrides, message):
    r = cli("logger=none", *overrides, cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr
    assert "Traceback" not in r.stderr
