"""The quality-versus-speed curve (stage `curve`), the oracle exit layer, task-metric calibration and
the task metrics logged during training."""

from __future__ import annotations

import csv
import json
import os
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from hydra.utils import instantiate

from eetrain.config import compose
from eetrain.decoding.calibration import calibrate_online, metric_risks
from eetrain.decoding.curve import best_point, curve_row, curve_settings, curve_specs
from eetrain.errors import ConfigError
from eetrain.exits.calibration import hoeffding_bentkus_pvalue
from eetrain.exits.policy import ExitPolicy
from eetrain.exits.settings import calibration_settings
from eetrain.layer_metrics import oracle_exit_layers
from eetrain.task_metrics import sentence_scores
from tests.conftest import make_backbone
from tests.in_process import cli
from tests.test_online_calibration import calibration_case


def test_oracle_exit_layer_hand_checked():
    # 4 layers x 5 tokens; the last row is the final prediction
    preds = torch.tensor([
        [7, 1, 3, 9, 2],
        [7, 2, 3, 9, 4],
        [5, 2, 3, 8, 4],
        [7, 2, 3, 8, 5],
    ])
    # token 0: agrees at 1, 2, not 3 -> stays from 4; token 1: from 2; token 2: from 1; token 3: from 3;
    # token 4: only the last
    assert oracle_exit_layers(preds).tolist() == [4, 2, 1, 3, 4]
    assert oracle_exit_layers(preds, layers=(2, 4, 6, 8)).tolist() == [8, 4, 2, 6, 8]


def _out(tokens: int, seconds: float, decision: float, exits: list[int]):
    return SimpleNamespace(num_tokens=tokens, seconds=seconds, decision_seconds=decision,
                           exit_layers=torch.tensor([exits]), sequences=lambda: [[1] * tokens])


def test_curve_row_hand_checked():
    ee = [_out(10, 1.0, 0.1, [2] * 10), _out(10, 1.0, 0.1, [4] * 10)]
    full = [_out(10, 1.5, 0.0, [8] * 10), _out(10, 1.5, 0.0, [8] * 10)]
    row = curve_row("softmax_gap", 0.5, ee, full, [[1] * 10, [1] * 12], {"rougeL": 30.0}, {"rougeL": 40.0},
                    "rougeL")
    # 20 tokens in 2 s against 20 tokens in 3 s: 10 vs 6.67 tokens/s
    assert row["speedup"] == pytest.approx(1.5) and row["normalized_latency"] == pytest.approx(2 / 3)
    assert row["mean_exit_layer"] == pytest.approx(3.0)
    assert row["decision_fraction"] == pytest.approx(0.1)
    assert row["consistency"] == pytest.approx(20 / 22)  # the second full sequence is 2 tokens longer
    assert row["sequence_consistency"] == pytest.approx(0.5)
    assert row["rougeL_ratio"] == pytest.approx(0.75)
    # early exit's output is half as long: per token 1.5x as fast, in total a third of the time (FREE's latency)
    row = curve_row("softmax_gap", 0.5, [_out(10, 1.0, 0.0, [2] * 10)], [_out(20, 3.0, 0.0, [8] * 20)],
                    [[1] * 20], {}, {}, "rougeL")
    assert row["speedup"] == pytest.approx(1.5) and row["normalized_latency"] == pytest.approx(1 / 3)
    rows = [{"policy": "full", "speedup": 1.0, "rougeL_ratio": 1.0}, row,
            {**row, "speedup": 2.0, "rougeL_ratio": 0.9}, {**row, "speedup": 1.2, "rougeL_ratio": 0.98}]
    assert best_point(rows, "rougeL", 0.97)["speedup"] == 1.2
    assert best_point(rows, "rougeL", 0.99) is None
    never = {**row, "speedup": 1.3, "rougeL_ratio": 1.0, "mean_exit_layer": 8.0}  # no token left early: noise
    assert best_point([*rows, never], "rougeL", 0.97)["speedup"] == 1.3
    assert best_point([*rows, never], "rougeL", 0.97, num_layers=8)["speedup"] == 1.2
    # a full model that scores 0: every point "keeps" 0.97 of it, and the ratio is nan: no fastest point
    zero = [{"policy": "full", "speedup": 1.0, "rougeL": 0.0, "rougeL_ratio": float("nan")},
            {"policy": "softmax_gap", "threshold": 0.5, "speedup": 4.7, "rougeL": 0.0, "rougeL_ratio": float("nan"),
             "mean_exit_layer": 2.1}]
    assert best_point(zero, "rougeL", 0.97, num_layers=8) is None


def test_at_value_sets_the_threshold_or_the_boolean_parameter():
    assert ExitPolicy("softmax_gap", 0.9, min_exit_layer=2).at_value(0.3).threshold.value == 0.3
    patience = ExitPolicy("patience", None, min_exit_layer=1, measure_kwargs={"patience": 2}).at_value(4)
    assert patience.measure_kwargs["patience"] == 4
    # calibration scans candidates as floats: an integral one is still a layer count
    got = ExitPolicy("patience", None, min_exit_layer=1, measure_kwargs={"patience": 2}).at_value(3.0)
    assert got.measure_kwargs["patience"] == 3 and isinstance(got.measure_kwargs["patience"], int)
    with pytest.raises(ValueError, match="patience must be an integer >= 1"):
        ExitPolicy("patience", None, min_exit_layer=1).at_value(2.5)
    assert ExitPolicy("monotonic", None, min_exit_layer=1).at_value(0.8).measure_kwargs == {"min_confidence": 0.8}


def test_candidates_go_to_the_softmax_type_policies_of_a_sweep():
    from eetrain.decoding.decisions import schedule_for

    schedule = {"candidates": 8, "check_every": 2}
    assert schedule_for(ExitPolicy("softmax_gap", 0.9), schedule) == schedule
    assert schedule_for(ExitPolicy("hidden_saturation", 0.9), schedule) == {"check_every": 2}
    assert schedule_for(ExitPolicy("patience", measure_kwargs={"patience": 2}), schedule) == {"check_every": 2}


def test_curve_settings_and_policies_name_the_key(tmp_path):
    bb = make_backbone("t5")
    cfg = compose(["curve.policies=[softmax_gap,patience]", "exit.min_exit_layer=2"])
    specs = curve_specs(cfg, bb, curve_settings(cfg).policies, tmp_path, None)
    assert [s.name for s in specs] == ["softmax_gap", "patience"] and specs[1].values == (1, 2, 3, 4, 5, 6, 7, 8)
    with pytest.raises(ConfigError, match=r"curve.policies\[0\]='vibes'; allowed: labels of exit.policies"):
        curve_specs(cfg, bb, ["vibes"], tmp_path, None)
    with pytest.raises(ConfigError, match=r"curve.policies\[0\]='classifier:calm': no saved calm classifier"):
        curve_specs(cfg, bb, ["classifier:calm"], tmp_path, None)
    with pytest.raises(ConfigError, match=r"curve: unknown key\(s\) \['speed'\]"):
        curve_settings(compose(["+curve.speed=1"]))
    with pytest.raises(ConfigError, match=r"curve.max_examples=0; allowed"):
        curve_settings(compose(["curve.max_examples=0"]))
    with pytest.raises(ConfigError, match=r"exit.policies.softmax_gap.thresholds\[0\]"):
        curve_specs(compose(["exit.policies.softmax_gap.thresholds=[1.5]", "exit.min_exit_layer=2"]), bb, ["softmax_gap"], tmp_path, None)


def test_metric_risks_hand_checked():
    out = ["the cat sat", "a dog"]
    full = ["the cat ran", "a dog"]
    # textual consistency: 1 - ROUGE-L(out, full) / 100; "the cat" of 3 words each -> F = 2/3
    assert metric_risks("rougeL", out, full).tolist() == pytest.approx([1 - 2 / 3, 0.0])
    refs = ["the cat sat", "the dog"]
    # risk consistency: the drop against the references, never negative
    ee = sentence_scores("rougeL", out, refs)
    base = sentence_scores("rougeL", full, refs)
    want = [max(0.0, b - e) / 100 for b, e in zip(base, ee, strict=True)]
    assert metric_risks("rougeL", out, full, refs).tolist() == pytest.approx(want)
    assert want == pytest.approx([0.0, 0.0])  # here early exit matched or beat the full model


def test_metric_risks_stay_in_0_1_and_identical_outputs_carry_none():
    from eetrain.exits.calibration import ltt_scan

    # sacrebleu scores identical texts 100.00000000000004: risks were -4e-16 and 1 + 4e-16, and LTT refused them
    risks = metric_risks("bleu", ["the cat sat", "a dog"], ["the cat sat", "a cat"])
    assert risks[0] == 0.0 and 0.0 <= float(risks[1]) <= 1.0
    assert metric_risks("bleu", ["zzz qqq"], ["the cat sat on the mat"], ["the cat sat on the mat"]).tolist() == [1.0]
    ltt_scan({0.9: risks}, [0.9], 0.05, 0.1)
    # outputs identical to the full model's are consistent, even where the metric scores them 0
    same = ["", "北京欢迎你", "ok"]
    for metric in ("rougeL", "rouge2", "squad_f1", "bleu"):
        assert metric_risks(metric, same, same).tolist() == [0.0, 0.0, 0.0], metric


def test_metric_risk_settings():
    with pytest.raises(ConfigError, match=r"exit.calibration.risk=rougeL is measured on decoded text: set "
                                          r"exit.calibration.online=true"):
        calibration_settings(compose(["exit.calibration.risk=rougeL"]))
    with pytest.raises(ConfigError, match=r"exit.calibration.risk='vibes'; allowed: consistency, task or a text metric"):
        calibration_settings(compose(["exit.calibration.risk=vibes"]))
    s = calibration_settings(compose(["exit.calibration.risk=rougeL", "exit.calibration.online=true"]))
    assert s.offline_risk == "consistency" and s.risk_against == "full"


def test_online_calibration_on_rouge_picks_what_a_hand_run_confirms():
    model, examples, template, grid = calibration_case()
    epsilon, delta = 0.1, 0.3
    got = calibrate_online(model, examples, template, grid, epsilon=epsilon, delta=delta, pvalue="hoeffding_bentkus",
                           batch_size=8, strategy="copy", max_new_tokens=6, risk="rougeL")
    from eetrain.decoding import generate
    from eetrain.decoding.calibration import batches

    tok = model.tokenizer
    prompts = batches(model, examples, 8)
    text = lambda seqs: [tok.decode(s, skip_special_tokens=True) for s in seqs]  # noqa: E731
    full = text([s for b in prompts for s in generate(model, b, None, max_new_tokens=6).sequences()])
    chosen = None
    for t in grid:
        out = text([s for b in prompts for s in generate(model, b, template.with_threshold(t), max_new_tokens=6).sequences()])
        # an output identical to the full model's carries no risk, even where ROUGE scores it below 100
        scores = sentence_scores("rougeL", out, full)
        risks = [0.0 if o == f else 1 - r / 100 for o, f, r in zip(out, full, scores, strict=True)]
        risk = sum(risks) / len(full)
        if hoeffding_bentkus_pvalue(risk, delta, len(full)) > epsilon:
            break
        chosen = t
    assert got["threshold"] == chosen and got["risk"] == "rougeL vs full model"
    assert len(got["scan"]) > 1


SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=6", "trainer.limit_val_batches=2",
         "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


@pytest.mark.slow
def test_train_then_curve_then_curve_on_the_export(tmp_path):
    assert os.environ["WANDB_MODE"] == "offline"
    out = tmp_path / "train"
    r = cli(
        "+experiment=demo", f"hydra.run.dir={out}", *SHORT, "logger=csv",
        "callbacks.generation_metrics.max_examples=4", "exit.min_exit_layer=2", "exit.classifiers.kinds=[calm]",
        "exit.classifiers.epochs=1", "curve.policies=[softmax_gap,classifier:calm]",
        "exit.policies.softmax_gap.thresholds=[0.2,0.9]", "exit.classifiers.thresholds=[0.5]", "curve.max_examples=6",
        "decoding.max_new_tokens=10", "exit.calibration.risk=rougeL", "exit.calibration.online=true",
        "exit.calibration.online_examples=8", "exit.calibration.delta=0.5", "decoding.policy.candidates=4",
        "stages=[exit_classifiers,policies,curve]", cwd=tmp_path, timeout=400,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # top-k candidates speed up the softmax checks; the classifier's points decode without them
    assert "classifier:calm decode(s) without it" in r.stdout
    # the task metric during training, for the last layer and the configured exit policy
    metrics = pd.read_csv(out / "csv" / "metrics.csv")
    for col in ("val/rougeL", "val/rouge1", "val/rougeL_early_exit", "val/early_exit_mean_layer"):
        assert col in metrics.columns and metrics[col].notna().any(), col
    rows = list(csv.DictReader((out / "quality_speed.csv").open()))
    assert [(r["policy"], r["threshold"]) for r in rows] == [
        ("full", ""), ("oracle", ""), ("softmax_gap", "0.2"), ("softmax_gap", "0.9"), ("classifier:calm", "0.5")]
    for col in ("mean_exit_layer", "speedup", "normalized_latency", "consistency", "decision_fraction", "rougeL",
                "rouge2", "rougeL_ratio"):
        assert col in rows[0], col
    full, oracle = rows[0], rows[1]
    assert float(full["speedup"]) == 1.0 and float(full["mean_exit_layer"]) == 4
    assert 1.0 <= float(oracle["mean_exit_layer"]) <= 4.0
    for row in rows[2:]:
        assert 2.0 <= float(row["mean_exit_layer"]) <= 4.0 and float(row["speedup"]) > 0
        assert 0.0 <= float(row["consistency"]) <= 1.0 and 0.0 < float(row["decision_fraction"]) < 1.0
        assert float(row["flops_ratio"]) > 0
    # FLOPs counted on the first 32 examples (all 6): a lower threshold leaves earlier, fewer layers and checks
    assert float(full["flops_ratio"]) == 1.0 and oracle["flops_ratio"] == ""
    assert float(rows[2]["flops_ratio"]) < float(rows[3]["flops_ratio"])
    assert (out / "quality_speed.png").stat().st_size > 10_000
    assert "quality-vs-speed sweep" in r.stderr and "Quality vs speed (rougeL" in r.stdout
    # the export carries the trained classifier: the curve on the export sweeps it too, with W&B on
    assert (out / "export" / "exit_classifier_calm.pt").is_file()
    again = tmp_path / "curve"
    r = cli("+experiment=curve", f"model.name_or_path={out / 'export'}", f"hydra.run.dir={again}", "logger=wandb",
            "exit.min_exit_layer=2", "curve.policies=[classifier:calm]", "exit.classifiers.thresholds=[0.5]",
            "curve.max_examples=4", "curve.oracle=false", "decoding.max_new_tokens=8", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader((again / "quality_speed.csv").open()))
    assert [r["policy"] for r in rows] == ["full", "classifier:calm"]
    (run,) = (again / "wandb").glob("offline-run-*")
    assert b"curve/quality_speed" in next(run.glob("run-*.wandb")).read_bytes()
    r = cli("+experiment=curve", f"model.name_or_path={out / 'export'}", f"hydra.run.dir={again}",
            "curve.policies=[nope]", cwd=tmp_path)
    assert r.returncode == 2 and "curve.policies[0]='nope'; allowed" in r.stderr
    # LTT on ROUGE-L of real decoding: the risk is recorded, and the export carries what it chose
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration[0]["risk"] == "consistency" and calibration[0]["online"]["risk"] == "rougeL vs full model"
    assert "rougeL_risk" in next(iter(calibration[0]["online"]["decoded"].values()))
    policy = json.loads((out / "export" / "early_exit.json").read_text())["policy"]
    if calibration[0]["online"]["threshold"] is not None:
        assert policy["threshold"] == calibration[0]["online"]["threshold"]
        assert policy["calibration"]["risk"] == "online rougeL vs full model"


def test_a_curve_over_per_layer_thresholds(tmp_path):
    from eetrain.decoding.curve import run_stage

    bb = make_backbone("t5").eval()
    cfg = compose(["+experiment=curve", "model.name_or_path=unused", "exit.min_exit_layer=2", "curve.max_examples=2",
                   "curve.policies=[softmax_gap]", "exit.policies.softmax_gap.thresholds=[0.5,[1,0,1]]",
                   "curve.oracle=false", "decoding.max_new_tokens=4"])
    data = instantiate(cfg.data, tokenizer=bb.tokenizer, collate_fn=bb.collate)
    data.setup("validate")
    rows = run_stage(cfg, bb, data, tmp_path)
    assert [r["threshold"] for r in rows] == [None, 0.5, "per-layer[1,0,1]"]
    assert rows[2]["mean_exit_layer"] == 2.0  # threshold 0 at layer 2: every token leaves there
    text = (tmp_path / "quality_speed.csv").read_text()
    assert "per-layer[1,0,1]" in text and (tmp_path / "quality_speed.png").is_file()


@pytest.mark.parametrize("override,message", [
    ("exit.policies.softmax_gap.thresholds=[1.5]", "exit.policies.softmax_gap.thresholds[0]"),
    ("curve.split=nope", "data.files.nope is not set"),
    ("data.metrics=[rougeX]", "data.metrics: unknown metric 'rougeX' for a text task; allowed: rouge1"),
    ("data.source_column=body", "data.source_column='body'"),
    ("curve.oracle=maybe", "curve.oracle='maybe'; allowed: true or false"),
    ("curve.policies=[softmax_gap,classifier:calm]", "curve.policies[1]='classifier:calm': no saved calm classifier"),
    ("decoding.strategy=self_speculative", "decoding.strategy=self_speculative is lossless"),
])
def test_curve_bad_input_names_the_key(tmp_path, override, message):
    from eetrain.__main__ import user_error
    from eetrain.decoding.curve import check_config, run_stage

    bb = make_backbone("t5").eval()
    cfg = compose(["+experiment=curve", "model.name_or_path=unused", "exit.min_exit_layer=2", "curve.max_examples=2",
                   override])
    with pytest.raises(Exception) as info:  # noqa: B017 - Hydra wraps errors raised inside instantiate
        check_config(cfg, bb)
        data = instantiate(cfg.data, tokenizer=bb.tokenizer, collate_fn=bb.collate)
        data.setup("validate")
        run_stage(cfg, bb, data, tmp_path)
    err = user_error(info.value)
    assert err is not None and message in str(err)


@pytest.mark.slow
def test_curve_bad_input_exits_with_code_2_and_one_line(tmp_path):
    from eetrain.checkpointing import export_pretrained

    export = export_pretrained(make_backbone("t5"), tmp_path / "export", {"family": "t5", "num_layers": 3})
    r = cli("+experiment=curve", f"model.name_or_path={export}", f"hydra.run.dir={tmp_path / 'run'}",
            "exit.min_exit_layer=2", "exit.policies.softmax_gap.thresholds=[1.5]", cwd=tmp_path)
    assert r.returncode == 2 and "exit.policies.softmax_gap.thresholds[0]" in r.stderr
    assert "Traceback" not in r.stderr


def test_atomic_file_keeps_the_old_file_on_failure_and_plain_permissions(tmp_path):
    from eetrain.files import atomic_file

    path = tmp_path / "table.csv"
    path.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        open(tmp, "w").write("half")
        raise RuntimeError("crash mid-write")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["table.csv"]
    with atomic_file(path) as tmp:
        open(tmp, "w").write("new\n")
    umask = os.umask(0)
    os.umask(umask)
    assert path.read_text() == "new\n" and path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_the_curve_adds_free_s_adaptive_threshold_as_a_point(tmp_path):
    from eetrain.decoding import generate
    from eetrain.decoding.adaptive import AdaptiveSettings, AdaptiveThreshold, batch_pairs
    from eetrain.decoding.calibration import batches
    from eetrain.decoding.curve import run_stage

    bb = make_backbone("t5", initializer_factor=2.0).eval()
    cfg = compose(["+experiment=curve", "model.name_or_path=unused", "exit.min_exit_layer=1", "curve.max_examples=6",
                   "curve.policies=[softmax_max,hidden_saturation]", "exit.policies.softmax_max.thresholds=[0.8]",
                   "exit.policies.hidden_saturation.thresholds=[0.9]",
                   "curve.oracle=false", "decoding.max_new_tokens=8", "decoding.batch_size=2",
                   "decoding.strategy=parallel", "decoding.adaptive_threshold={max_updates:2}"])
    data = instantiate(cfg.data, tokenizer=bb.tokenizer, collate_fn=bb.collate)
    data.setup("validate")
    rows = run_stage(cfg, bb, data, tmp_path)
    # hidden saturation is no confidence in [0, 1]: no adaptive point for it
    assert [r["policy"] for r in rows] == ["full", "softmax_max", "hidden_saturation", "softmax_max (adaptive)"]
    # the same decode by hand: the first batch at the top of FREE's grid, then the refits (two allowed)
    policy = ExitPolicy("softmax_max", 0.9, min_exit_layer=1)
    estimator, layers, flops, tokens, full = AdaptiveThreshold.start(AdaptiveSettings(max_updates=2)), [], 0, 0, []
    for b in batches(bb, data.split_examples("test")[:6], 2):
        out = generate(bb, b, policy, strategy="parallel", max_new_tokens=8, agreement=estimator.updating)
        layers += out.exit_layers[out.exit_layers > 0].tolist()
        # FLOPs (every batch counted: flops_examples 32): the same decode counted, FREE's pairs included
        counted = generate(bb, b, policy, strategy="parallel", max_new_tokens=8, agreement=estimator.updating,
                           count_flops=True)
        assert torch.equal(counted.tokens, out.tokens)
        flops, tokens = flops + counted.decode_flops, tokens + counted.num_tokens
        full.append(generate(bb, b, None, strategy="parallel", max_new_tokens=8, count_flops=True))
        if estimator.updating:
            value = estimator.update(*batch_pairs(bb, b, out, policy))
            policy = policy if value is None else policy.with_base_threshold(value)
    assert rows[-1]["mean_exit_layer"] == pytest.approx(sum(layers) / len(layers))
    full_per_token = sum(o.decode_flops for o in full) / sum(o.num_tokens for o in full)
    assert rows[-1]["flops_ratio"] == pytest.approx(flops / tokens / full_per_token)
    assert rows[-1]["threshold"] == (f"adaptive:{estimator.current:g}" if estimator.current is not None else "adaptive")
    assert (tmp_path / "quality_speed.csv").read_text().count("(adaptive)") == 1
