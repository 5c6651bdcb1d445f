"""`python -m eetrain +experiment=mee_demo`: joint CALM training, exit classifiers, policy table and plot."""

from __future__ import annotations

import csv
import json

import pytest
from hydra.utils import instantiate

from eetrain.config import compose
from eetrain.exits.classifiers import load_classifier
from eetrain.exits.record import load_records
from eetrain.exits.settings import check_config, classifier_settings, min_exit_layer
from tests.in_process import cli

MEASURES = {"softmax_gap", "softmax_gap_decaying", "softmax_max", "entropy", "normalized_entropy",
            "hidden_saturation", "patience", "monotonic"}
KINDS = ("calm", "three_state_mlp", "lstm")


def test_mee_demo_config():
    cfg = compose(["+experiment=mee_demo"], return_hydra_config=True)
    assert cfg.task_name == "mee_demo" and list(cfg.stages) == ["exit_classifiers", "policies"]
    assert cfg.exit.calibration.online and cfg.decoding.strategy == "parallel"
    assert cfg.loss.terms.ce.weights == "calm" and cfg.data.hf_name is None
    # deep enough for the minimum exit layer 4 to leave layers 4..7 to exit at; equal T5 depths
    assert cfg.model.config.num_decoder_layers == cfg.model.config.num_layers == 8
    backbone = instantiate(cfg.model)
    assert backbone.num_layers == 8 and backbone.hidden_size == 64
    assert min_exit_layer(cfg, backbone.num_layers) == 4
    settings = classifier_settings(cfg)
    assert settings.kinds == KINDS and settings.lstm_hidden_size == 250
    check_config(cfg, backbone)


@pytest.mark.slow
def test_mee_demo_short_run_writes_table_plot_and_classifiers(tmp_path):
    out = tmp_path / "run"
    r = cli(
        "+experiment=mee_demo", f"hydra.run.dir={out}", "logger=none", "callbacks=none", "export=false",
        "trainer.max_epochs=1", "trainer.limit_train_batches=8", "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "exit.classifiers.epochs=1", "exit.classifiers.max_train_tokens=600", "exit.record.max_tokens=1500",
        "exit.calibration.online_examples=6", "decoding.max_new_tokens=12",
        cwd=tmp_path, timeout=420,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for kind in KINDS:
        assert load_classifier(out / "exit_classifiers" / f"{kind}.pt", expected_hidden_size=64).kind == kind
        assert f"[exit_classifiers] {kind}:" in r.stdout
    with (out / "policies.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {row["measure"] for row in rows} == MEASURES | {f"classifier:{k}" for k in KINDS}
    assert all(4 <= float(row["mean_exit_layer"]) <= 8 and row["min_exit_layer"] == "4" for row in rows)
    assert all(0.0 <= float(row["consistency"]) <= 1.0 and row["accuracy"] != "" for row in rows)
    # the highest thresholds exit nowhere early: consistency 1 at mean exit layer L
    top = [row for row in rows if row["measure"] == "softmax_gap" and float(row["threshold"]) == 0.9999]
    assert float(top[0]["consistency"]) == 1.0
    assert (out / "policies.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration[0]["policy"] == "softmax_gap" and calibration[0]["delta"] == 0.1
    assert [c["policy"] for c in calibration] == ["softmax_gap", "classifier:three_state_mlp"]
    # online: real decoding of the calibration examples, consistency beside the offline one
    for c in calibration:
        assert c["online"]["scan"] and c["online"]["decoded"]
    online = [row for row in rows if row.get("online_consistency")]
    assert online and all(0.0 <= float(row["online_consistency"]) <= 1.0 for row in online)
    assert "offline (records) vs online (decoding)" in r.stdout
    records = load_records(out / "records" / "validation.pt")
    assert records.num_layers == 8 and records.num_tokens == 1500 and records.positions is not None
    assert "Exit policies on the validation set (L=8" in r.stdout
    assert "Learn-then-Test (epsilon=0.05, delta=0.1" in r.stdout
