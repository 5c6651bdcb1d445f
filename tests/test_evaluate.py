"""The evaluation entry point (train=false, stages=[policies]) on a saved model, and bad exit settings."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from eetrain.config import compose
from eetrain.errors import ConfigError
from eetrain.exits.classifiers import save_classifier
from eetrain.exits.evaluation import _candidates, best_rows, calibrate, evaluate_records, format_policy_table
from eetrain.exits.measures import ExitRecords
from eetrain.exits.settings import calibration_settings, check_config, policy_specs
from eetrain.exits.training import make_classifier
from eetrain.losses import ExitCrossEntropy, JointLoss
from eetrain.module import EarlyExitModule
from eetrain.train import load_module_weights
from tests import in_process
from tests.conftest import examples, make_backbone
from tests.test_adaptive_threshold import free_threshold

FAST = ["exit.min_exit_layer=2", "exit.record.max_tokens=400", "data.eval_batch_size=64"]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A tiny T5 (3 decoder layers, d=32) saved as a `transformers` export."""
    where = tmp_path_factory.mktemp("model") / "export"
    make_backbone("t5").save_pretrained(str(where))
    return where


def _evaluate(tmp_path: Path, model: Path, *overrides: str, module: str = "eetrain",
              subprocess_run: bool = False) -> subprocess.CompletedProcess:
    """`python -m <module> ...` in this process (tests.in_process), or with `subprocess_run` in a new one."""
    args = ["+experiment=evaluate"] if module == "eetrain" else []
    args += [f"model.name_or_path={model}", f"hydra.run.dir={tmp_path / 'run'}", *overrides]
    if not subprocess_run:
        return in_process.cli(*args, cwd=tmp_path, module=module)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)


def test_evaluate_experiment_composes_without_training():
    cfg = compose(["+experiment=evaluate", "model.name_or_path=/some/export"])
    assert cfg.train is False and cfg.export is False and list(cfg.stages) == ["policies"]
    assert cfg.model.config is None and cfg.model.tokenizer is None


@pytest.mark.slow
def test_evaluate_a_saved_model(tmp_path, saved_model):
    clf_dir = tmp_path / "classifiers"
    save_classifier(make_classifier("calm", 32), clf_dir / "calm.pt")
    r = _evaluate(tmp_path, saved_model, *FAST, f"exit.classifiers.dir={clf_dir}", module="eetrain.evaluate",
                  subprocess_run=True)  # the entry point as a shell runs it (the other runs are in-process)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "run"
    with (out / "policies.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    for column in ("measure", "threshold", "mean_exit_layer", "consistency", "accuracy"):
        assert column in rows[0]
    measures = {row["measure"] for row in rows}
    assert {"softmax_gap", "softmax_gap_decaying", "softmax_max", "entropy", "normalized_entropy",
            "hidden_saturation", "patience", "monotonic", "classifier:calm"} == measures
    assert all(2 <= float(row["mean_exit_layer"]) <= 3 for row in rows)
    assert (out / "policies.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration[0]["policy"] == "softmax_gap" and calibration[0]["epsilon"] == 0.05
    assert "Exit policies on the validation set" in r.stdout and "Learn-then-Test" in r.stdout
    assert not (out / "export").exists() and not (out / "checkpoints").exists()  # nothing trained


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["exit.policies.softmax_gap.thresholds=[0.5,1.5]"],
         "exit.policies.softmax_gap.thresholds[1]: threshold must lie in [0.0, 1.0] for this measure, got 1.5"),
        (["exit.policies.patience.thresholds=[0]"],
         "exit.policies.patience.thresholds[0]: patience must be an integer >= 1, got 0"),
        (["exit.policies.softmax_max.measure=softmax_maximum"],
         "exit.policies.softmax_max.measure='softmax_maximum' is not an exit measure; allowed: entropy,"),
        (["exit.calibration.epsilon=1.5"], "exit.calibration.epsilon=1.5 must lie in (0, 1)"),
        (["CLASSIFIER_DIR"], "but the model has hidden size 32"),
    ],
)
def test_bad_exit_settings_one_clear_message(tmp_path, saved_model, overrides, message):
    if overrides == ["CLASSIFIER_DIR"]:
        save_classifier(make_classifier("lstm", 16, lstm_hidden_size=4), tmp_path / "clf" / "lstm.pt")
        overrides = [f"exit.classifiers.dir={tmp_path / 'clf'}"]
        message = f"exit.classifiers.dir: classifier checkpoint {tmp_path / 'clf' / 'lstm.pt'} has hidden size 16 " + message
    r = _evaluate(tmp_path, saved_model, "exit.min_exit_layer=2", *overrides)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "policies.csv").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stages=[nope]"], "stages: unknown stage 'nope'; allowed: analyze, classify, curve, exit_classifiers, exit_heads, generate, policies"),
        (["stages=[policies]", "exit.calibration.delta=0"], "exit.calibration.delta=0.0 must lie in (0, 1)"),
        (["stages=[policies]", "exit.calibration.delta=1"], "exit.calibration.delta=1.0 must lie in (0, 1)"),
        (["stages=[policies]", "exit.calibration.epsilon=0"], "exit.calibration.epsilon=0.0 must lie in (0, 1)"),
        (["stages=[policies]", "exit.min_exit_layer=5"],
         "exit.min_exit_layer=5 exceeds the model depth: it has 3 exit layers"),
        (["stages=[policies]", "exit.policies.patience.thresholds=[2,-1]"],
         "exit.policies.patience.thresholds[1]: patience must be an integer >= 1, got -1"),
        (["stages=[policies]", "exit.policies.hidden_saturation.thresholds=[1.01]"],
         "exit.policies.hidden_saturation.thresholds[0]: threshold must lie in [-1.0, 1.0]"),
        (["stages=[policies]", "+exit.policies.x={measure: softmax_gap, thresold: [0.5]}"],
         "exit.policies.x: unknown key(s) ['thresold']"),
        (["stages=[exit_classifiers]", "exit.min_exit_layer=3"],
         "exit.min_exit_layer=3: min_exit_layer=3 leaves no layer below the last (3) for an exit classifier"),
        (["stages=[exit_classifiers]", "exits.layers={shallow: 1}", "exits.train_below_min=true"],
         "leaves no layer below the last (3) among the exit points [1, 3]"),
        (["stages=[policies]", "exit.calibration.policies=[patience]", "exit.calibration.candidates=[3,2.5]"],
         "exit.calibration.candidates[1] for 'patience': patience must be an integer >= 1, got 2.5"),
        (["stages=[policies]", "exit.calibration.policies=[classifier:mlp]"],
         "exit.calibration.policies[0]='classifier:mlp' is not a configured policy"),
        (["stages=[policies]", "exit.policies.entropy.thresholds=[0.5]"],
         "exit.policies.entropy.thresholds[0]: threshold must lie in [-inf, 0.0]"),
        (["stages=[policies]", "exit.policies.monotonic.thresholds=[2]"],
         "exit.policies.monotonic.thresholds[0]: min_confidence must lie in [0, 1], got 2"),
        (["stages=[policies]", "exit.policies.softmax_gap_decaying.decay.form=exp"],
         "exit.policies.softmax_gap_decaying.decay.form='exp' is not a decaying-threshold form"),
        (["stages=[policies]", "exit.classifiers.thresholds=[1.2]"],
         "exit.classifiers.thresholds[0]=1.2: a classifier's P(exit) threshold must lie in [0, 1]"),
        (["stages=[policies]", "exits.min_layer=4"], "exits.min_layer=4 exceeds the model depth"),
    ],
)
def test_stage_checks_before_training(overrides, message):
    from eetrain.stages import check_stages

    cfg = compose(["+experiment=demo", "exit.min_exit_layer=2", *overrides], return_hydra_config=True)
    with pytest.raises(ConfigError) as info:
        check_stages(cfg, make_backbone("t5"))
    assert message in str(info.value)


def hand_record() -> ExitRecords:
    """L = 3, four tokens whose layer-2 prediction agrees with layer 3 for tokens 0 and 1 only; layer 2's
    top-1 probabilities 0.99, 0.97, 0.6, 0.5; labels 1, 2, 3, 9 (layer 3 right for tokens 0, 1, 3)."""
    preds = torch.tensor([[0, 0, 0, 0], [1, 2, 3, 4], [1, 2, 9, 9]])
    top1 = torch.tensor([[0.2] * 4, [0.99, 0.97, 0.6, 0.5], [0.9] * 4])
    return ExitRecords(
        predictions=preds, top2=torch.stack([top1, torch.zeros_like(top1)], -1), entropies=torch.zeros(3, 4),
        vocab_size=10, labels=torch.tensor([1, 2, 3, 9]), positions=torch.ones(4, dtype=torch.long),
        sequence_ids=torch.arange(4),
    )


def test_policy_table_helpers_on_a_hand_record():
    # softmax_max >= 0.95 exits tokens 0, 1 at layer 2
    rec = hand_record()
    cfg = compose(["+experiment=demo", "exit.min_exit_layer=2", "exit.policies.softmax_max.thresholds=[0.95,0.55]"])
    specs = [s for s in policy_specs(cfg, 3, horizon=4) if s.name == "softmax_max"]
    rows = evaluate_records(specs, rec)
    assert [(r["threshold"], r["mean_exit_layer"], r["consistency"], r["accuracy"]) for r in rows] == [
        (0.95, 2.5, 1.0, 0.75), (0.55, 2.25, 0.75, 1.0)]
    assert best_rows(rows, 0.99, below=3) == [rows[0]]
    assert best_rows(rows, 0.99, below=2.5) == []
    table = format_policy_table(rows)
    assert table.splitlines()[0].split() == ["measure", "threshold", "min_layer", "mean_exit", "consistency",
                                             "accuracy", "saving"]
    # LTT on this record: per-sequence consistency risk, all sequences calibrate
    cfg = compose(["+experiment=demo", "exit.min_exit_layer=2", "exit.calibration.policies=[softmax_max]",
                   "exit.calibration.calibration_fraction=1.0", "exit.calibration.delta=0.5",
                   "exit.calibration.epsilon=0.5", "exit.calibration.candidates=[1.0,0.95,0.55]"])
    (result,) = calibrate(specs, rec, calibration_settings(cfg))
    # risks: 1.0 -> 0/4, 0.95 -> 0/4, 0.55 -> 1/4 (token 2 exits with a wrong prediction)
    assert [row["risk_hat"] for row in result["scan"]] == [0.0, 0.0, 0.25]
    # n = 4, delta = 0.5 (LTT's Hoeffding-Bentkus): risk 0 passes (exp(-4 KL(0||0.5)) = 0.5^4 = 0.0625 <= 0.5),
    # risk 0.25 fails (min(exp(-4 KL(0.25||0.5)) = exp(-0.5232) = 0.593, e * 5/16 = 0.849) > 0.5)
    assert result["threshold"] == 0.95 and result["evaluated_on"] == "the calibration set"
    assert result["mean_exit_layer"] == 2.5 and result["empirical_risk"] == 0.0
    # FREE's threshold on the same records: pairs at layer 2 (the only check below L = 3), confidences
    # 0.99, 0.97 agreeing with layer 3 and 0.6, 0.5 not. Beta fits by moments: agree m 0.98, var 1e-4 ->
    # (191.1, 3.9); disagree m 0.55, var 0.0025 -> (53.9, 44.1); with equal priors the posterior of agreement
    # is 2e-22 at 0.7, 1.5e-12 at 0.767, 0.095 at 0.833 and 1 - 3e-13 at 0.9: the threshold is the grid's top
    # point, 0.9, and softmax_max >= 0.9 exits tokens 0 and 1 at layer 2
    free = result["beta_mixture"]
    assert free["pairs"] == 4 and free["agree_share"] == 0.5
    assert free["threshold"] == pytest.approx(free_threshold(np.array([0.99, 0.97, 0.6, 0.5]),
                                                             np.array([True, True, False, False])))
    assert free["threshold"] == pytest.approx(0.9)
    assert (free["mean_exit_layer"], free["consistency"]) == (2.5, 1.0)


def test_a_grid_can_hold_per_layer_thresholds():
    rec = hand_record()
    cfg = compose(["+experiment=demo", "exit.min_exit_layer=2", "exit.policies.softmax_max.thresholds=[0.95,[1,0.98,0.5]]"])
    (spec,) = [s for s in policy_specs(cfg, 3, horizon=4) if s.name == "softmax_max"]
    assert spec.values == (0.95, (1.0, 0.98, 0.5))
    rows = evaluate_records([spec], rec)
    # layer 2 needs 0.98 now: only token 0 (0.99) leaves there, the others at 3
    assert [(r["threshold"], r["mean_exit_layer"], r["consistency"], r["accuracy"]) for r in rows] == [
        (0.95, 2.5, 1.0, 0.75), ("per-layer[1,0.98,0.5]", 2.75, 1.0, 0.75)]
    for grid, message in (
        ("[[0.9,0.8]]", "exit.policies.softmax_max.thresholds[0] has 2 values; a per-layer threshold needs one per layer (3)"),
        ("[[0.9,0.8,x]]", "exit.policies.softmax_max.thresholds[0][2]='x' must be a number"),
        ("[[0.9,0.8,1.5]]", "exit.policies.softmax_max.thresholds[0]: threshold[2] must lie in [0.0, 1.0]"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            policy_specs(compose(["+experiment=demo", "exit.min_exit_layer=2", f"exit.policies.softmax_max.thresholds={grid}"]), 3)
    for name in ("patience", "softmax_gap_decaying"):
        with pytest.raises(ConfigError, match=rf"exit.policies.{name}.thresholds\[0\]=\[1, 2, 3\]: a per-layer threshold"):
            policy_specs(compose(["+experiment=demo", "exit.min_exit_layer=2", f"exit.policies.{name}.thresholds=[[1,2,3]]"]), 3)
    # Learn-then-Test scans numbers: a grid of per-layer thresholds alone cannot be calibrated
    only = ["+experiment=demo", "exit.min_exit_layer=2", "exit.policies.hidden_saturation.thresholds=[[0.9,0.9,0.9]]",
            "exit.calibration.policies=[hidden_saturation]"]
    with pytest.raises(ConfigError, match=r"exit.calibration.policies\[0\]='hidden_saturation': exit.policies.hidden_sat"):
        check_config(compose(only), make_backbone("t5"))
    check_config(compose(only + ["exit.calibration.candidates=[0.99,0.9]"]), make_backbone("t5"))
    mixed = compose(only[:2] + ["exit.policies.hidden_saturation.thresholds=[[0.9,0.9,0.9],0.95]", only[3]])
    check_config(mixed, make_backbone("t5"))
    (spec,) = [s for s in policy_specs(mixed, 3) if s.name == "hidden_saturation"]
    assert _candidates(spec, calibration_settings(mixed)) == [0.95]


def test_calibrate_a_patience_policy_on_records_by_hand():
    # 5 layers, 4 one-token sequences; the same case as tests/test_exits_calibration.py, through the stage's path
    preds = torch.tensor([[7, 1, 3, 5], [7, 1, 3, 5], [7, 2, 3, 5], [7, 2, 4, 5], [7, 2, 4, 5]])
    rec = ExitRecords(predictions=preds, sequence_ids=torch.arange(4), positions=torch.ones(4, dtype=torch.long))
    cfg = compose(["+experiment=demo", "exit.min_exit_layer=1", "exit.policies.patience.thresholds=[1,2,3]",
                   "exit.calibration.policies=[patience]", "exit.calibration.calibration_fraction=1.0",
                   "exit.calibration.delta=0.5", "exit.calibration.epsilon=0.6"])
    check_config(cfg, make_backbone("t5", num_layers=5, num_decoder_layers=5))
    specs = [s for s in policy_specs(cfg, 5, horizon=4) if s.name == "patience"]
    (result,) = calibrate(specs, rec, calibration_settings(cfg))
    # the policy's grid from the most patient down: P=3 risk 0, P=2 0.25 (p 0.593 <= 0.6), P=1 0.5 (fails)
    assert [(r["threshold"], r["risk_hat"], r["passed"]) for r in result["scan"]] == [
        (3.0, 0.0, True), (2.0, 0.25, True), (1.0, 0.5, False)]
    assert result["threshold"] == 2.0
    assert result["mean_exit_layer"] == 3.5 and result["empirical_risk"] == 0.25  # exits 3, 5, 3, 3


def test_check_config_accepts_every_shipped_experiment_with_a_deep_enough_model():
    for experiment in ("demo", "mee_demo", "calm_t5"):
        cfg = compose([f"+experiment={experiment}"], return_hydra_config=True)
        check_config(cfg, make_backbone("t5", num_layers=8, num_decoder_layers=8))


def test_load_module_weights_from_a_lightning_checkpoint(tmp_path):
    bb = make_backbone("t5")
    module = EarlyExitModule(bb, JointLoss({"ce": ExitCrossEntropy()}), optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    loader = torch.utils.data.DataLoader(examples(), batch_size=2, collate_fn=bb.collate)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=loader)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    fresh = EarlyExitModule(make_backbone("t5"), JointLoss({"ce": ExitCrossEntropy()}), optimizer=None)
    assert not torch.equal(fresh.backbone.head_weight, bb.head_weight)
    load_module_weights(fresh, str(tmp_path / "last.ckpt"))
    for key, value in module.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    with pytest.raises(ConfigError, match="ckpt_path='/no/such.ckpt': no such checkpoint file"):
        load_module_weights(fresh, "/no/such.ckpt")


def test_policies_exit_only_at_the_configured_exit_points():
    # exits.layers={every: 2} on 6 layers: exits at 2, 4, 6; a rule firing at layer 3 waits for 4
    cfg = compose(["+experiment=demo", "exit.min_exit_layer=2", "exits.layers={every: 2}",
                   "exit.policies.softmax_max.thresholds=[0.5]"])
    (spec,) = [s for s in policy_specs(cfg, 6, horizon=4) if s.name == "softmax_max"]
    assert spec.policy.exit_points == (2, 4, 6)

    def record(top1: list[float]) -> ExitRecords:
        t = torch.tensor(top1)[:, None]
        return ExitRecords(predictions=torch.zeros(6, 1, dtype=torch.long), top2=torch.stack([t, 0 * t], -1))

    (row,) = evaluate_records([spec], record([0.9, 0.1, 0.9, 0.1, 0.9, 0.1]))  # fires at layers 1, 3, 5
    assert row["mean_exit_layer"] == 6.0  # 3 and 5 carry no exit, 1 is below the minimum
    (row,) = evaluate_records([spec], record([0.9, 0.1, 0.9, 0.7, 0.9, 0.1]))
    assert row["mean_exit_layer"] == 4.0


def test_on_an_export_the_minimum_exit_layer_is_the_exports_own(tmp_path, saved_model):
    from eetrain.exits.settings import min_exit_layer

    export = tmp_path / "export"
    export.mkdir()
    (export / "early_exit.json").write_text(json.dumps({"policy": {"measure": "softmax_gap", "min_exit_layer": 2}}))
    for experiment in ("evaluate", "curve"):
        cfg = compose([f"+experiment={experiment}", f"model.name_or_path={export}"])
        assert cfg.exit.min_exit_layer is None and min_exit_layer(cfg, 4) == 2
        assert min_exit_layer(compose([f"+experiment={experiment}", f"model.name_or_path={export}",
                                       "exit.min_exit_layer=3"]), 4) == 3  # the command line wins
        assert min_exit_layer(compose([f"+experiment={experiment}", f"model.name_or_path={export}",
                                       "exits.min_layer=3"]), 4) == 3  # the shared floor still applies
    plain = compose(["+experiment=evaluate", f"model.name_or_path={saved_model}"])  # no early_exit.json: 4
    assert min_exit_layer(plain, 8) == 4
    with pytest.raises(ConfigError, match=re.escape(
            "exit.min_exit_layer=4 (null, and model.name_or_path stores no policy in an early_exit.json: CALM's 4) "
            "exceeds the model depth: it has 3 exit layers")):
        min_exit_layer(plain, 3)
