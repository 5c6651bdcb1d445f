"""`generate`: the stage, the experiment on an export, the stored policy, the consistency metrics."""

from __future__ import annotations

import json
import re

import pytest

from eetrain.config import compose
from eetrain.decoding.metrics import sequence_consistency, token_consistency
from eetrain.decoding.settings import build_policy, decoding_settings, policy_fields
from eetrain.errors import ConfigError
from tests.conftest import make_backbone
from tests.in_process import cli

SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=6", "trainer.limit_val_batches=2",
         "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger=none",
         "callbacks=none"]


def test_token_and_sequence_consistency_hand_checked():
    ee = [[1, 2, 3], [4], [7, 8]]
    full = [[1, 2, 4], [4, 5], [7, 8]]
    # position-wise matches: 2 of 3, 1 of 2, 2 of 2 -> 5 of 7 full-model tokens
    assert token_consistency(ee, full) == pytest.approx(5 / 7)
    assert sequence_consistency(ee, full) == pytest.approx(1 / 3)
    assert token_consistency([[9, 9, 9, 9]], [[9, 9]]) == 1.0  # extra early-exit tokens are not counted
    with pytest.raises(ValueError):
        token_consistency([[1]], [])
    with pytest.raises(ValueError, match="1 early-exit sequences but 0 full-model sequences"):
        sequence_consistency([[1]], [])


def test_task_scores_hand_checked():
    from eetrain.decoding.stage import format_summary, task_scores

    rows = [{"output": "the cat sat", "full_output": "the cat ran", "reference": "the cat sat"},
            {"output": "a dog", "full_output": "a dog", "reference": ["a dog", "one dog"]}]
    s = task_scores(rows, ["rougeL", "rouge1"])
    # rougeL F1 per example: 1.0 and 1.0 early exit; full: LCS 2 of 3 -> 2/3, and 1.0 -> mean 5/6
    assert s["metric"] == "rougeL" and s["rougeL"] == pytest.approx(100.0)
    assert s["full_rougeL"] == pytest.approx(100 * 5 / 6) and s["rougeL_ratio"] == pytest.approx(1.2)
    assert s["rouge1"] == pytest.approx(100.0) and s["full_rouge1"] == pytest.approx(100 * 5 / 6)
    assert "full_rougeL" not in task_scores([{k: r[k] for k in ("output", "reference")} for r in rows], ["rougeL"])
    assert task_scores(rows, []) == {}
    summary = {"policy": "softmax_gap:0.9", "strategy": "copy", "batch_mode": "ride_along", "batch_size": 1,
               "examples": 3, "num_layers": 4, "tokens_per_second": 10.0, "mean_exit_layer": 2.5,
               "decision_fraction": 0.1, "metrics": ["rougeL", "rouge1"], "scored_examples": 2, **s}
    text = format_summary(summary)
    assert "task metrics over the 2 of 3 examples that have a reference" in text
    assert re.search(r"rougeL vs references +: early exit +100.00 +full model +83.33 +ratio 1.200", text)
    assert "no token left" not in text and "no token left" not in format_summary({**summary, "min_exit_layer": 2})


def test_the_summary_says_why_no_token_left_early():
    from eetrain.decoding.stage import format_summary

    summary = {"policy": "softmax_gap:0.9", "strategy": "copy", "batch_mode": "ride_along", "batch_size": 1,
               "examples": 3, "num_layers": 4, "tokens_per_second": 10.0, "mean_exit_layer": 4.0,
               "decision_fraction": 0.01}
    assert "no token left" not in format_summary(summary)  # no policy (full model, self-speculative drafts)
    assert format_summary(summary).startswith("policy softmax_gap:0.9, strategy copy, batch mode ride_along (batch 1), ")
    text = format_summary({**summary, "min_exit_layer": 4})
    assert text.startswith("policy softmax_gap:0.9 from layer 4, strategy copy, ")
    assert "no token left before the last layer: the minimum exit layer is the model's depth (4): set " \
           "decoding.policy.min_exit_layer lower" in text
    text = format_summary({**summary, "min_exit_layer": 2})
    assert "no token left before the last layer: no check reached the threshold: lower decoding.policy.threshold" in text
    text = format_summary({**summary, "min_exit_layer": 3, "exit_points": [2, 4]})
    assert "no token left before the last layer: the policy's exit points [2, 4] (the trained exits) leave none from " \
           "layer 3 below the last" in text
    text = format_summary({**summary, "min_exit_layer": 2, "exit_points": [2, 4]})
    assert "no check reached the threshold" in text
    text = format_summary({**summary, "min_exit_layer": 2, "calibrated_here": True})
    assert "no check reached the threshold, and this run's policies stage certified none (calibration.json): " \
           "lower decoding.policy.threshold, or allow more risk (exit.calibration.delta" in text
    assert "+experiment=evaluate" not in text  # natural_llama-like runs write no export to point at


def test_policy_fields_fill_from_the_export_then_the_fallback(tmp_path):
    (tmp_path / "early_exit.json").write_text(json.dumps(
        {"family": "t5", "policy": {"measure": "softmax_gap", "threshold": 0.37, "min_exit_layer": 2, "calibrated": True}}
    ))
    cfg = compose(["+experiment=generate", f"model.name_or_path={tmp_path}"])
    assert policy_fields(cfg, str(tmp_path))["threshold"] == 0.37
    cfg = compose(["+experiment=generate", f"model.name_or_path={tmp_path}", "decoding.policy.threshold=0.5"])
    fields = policy_fields(cfg, str(tmp_path))
    assert fields["threshold"] == 0.5 and fields["min_exit_layer"] == 2
    # another measure: the stored threshold belongs to the stored measure, so it is not reused
    cfg = compose(["+experiment=generate", f"model.name_or_path={tmp_path}", "decoding.policy.measure=hidden_saturation"])
    assert policy_fields(cfg, str(tmp_path))["threshold"] == 0.9
    cfg = compose(["+experiment=generate", f"model.name_or_path={tmp_path}", "decoding.policy.measure=full"])
    assert build_policy(policy_fields(cfg, str(tmp_path)), make_backbone("t5"), str(tmp_path)) is None


def test_load_export_policy_decodes_from_python_as_the_cli_would(tmp_path):
    import torch

    from eetrain.backbones import load_backbone
    from eetrain.checkpointing import export_pretrained
    from eetrain.decoding import generate, load_export_policy
    from eetrain.exits.classifiers import save_classifier
    from eetrain.exits.policy import ExitPolicy
    from eetrain.exits.training import make_classifier

    export = export_pretrained(make_backbone("t5"), tmp_path / "export", {"family": "t5", "num_layers": 3})
    settings = json.loads((export / "early_exit.json").read_text())
    settings["policy"] = {"measure": "softmax_gap", "threshold": 0.37, "min_exit_layer": 2, "check_every": 1,
                          "strategy": "parallel", "calibrated": True, "calibration": {"delta": 0.1}}
    (export / "early_exit.json").write_text(json.dumps(settings))
    bb = load_backbone(str(export)).eval()
    policy, kw = load_export_policy(export, bb)
    assert (policy.measure, policy.threshold.value, policy.min_exit_layer) == ("softmax_gap", 0.37, 2)
    assert kw == {"strategy": "parallel", "check_every": 1}
    batch = bb.collate([{"source_ids": [5, 17, 33, 1], "target_ids": [1]}, {"source_ids": [40, 1], "target_ids": [1]}])
    batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
    got = generate(bb, batch, policy, max_new_tokens=6, **kw)
    want = generate(bb, batch, ExitPolicy("softmax_gap", 0.37, min_exit_layer=2), max_new_tokens=6, strategy="parallel")
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.exit_layers, want.exit_layers)
    # the README's example: the tokenizer's padded batch goes in as is, the texts come out
    enc = bb.tokenizer(["an article to summarise", "another one"], return_tensors="pt", padding=True)
    out = generate(bb, enc, policy, max_new_tokens=6, **kw)
    texts = bb.tokenizer.batch_decode(out.sequences(), skip_special_tokens=True)
    alone = generate(bb, bb.tokenizer(["another one"], return_tensors="pt"), policy, max_new_tokens=6, **kw)
    assert len(texts) == 2 and texts[1] == bb.tokenizer.decode(alone.sequences()[0], skip_special_tokens=True)
    # a classifier policy reads its weights beside the model; "full" means no policy
    save_classifier(make_classifier("calm", bb.hidden_size), export / "exit_classifier_calm.pt")
    settings["policy"] = {"measure": "classifier:calm", "threshold": 0.8, "min_exit_layer": 1}
    (export / "early_exit.json").write_text(json.dumps(settings))
    policy, kw = load_export_policy(export, bb)
    assert policy.label == "classifier:calm" and kw == {"strategy": "copy"}
    settings["policy"] = {"measure": "full"}
    (export / "early_exit.json").write_text(json.dumps(settings))
    assert load_export_policy(export, bb)[0] is None
    with pytest.raises(ConfigError, match=r"no exit policy \(early_exit.json with a 'policy'\)"):
        load_export_policy(tmp_path, bb)


def test_an_interrupted_write_keeps_the_previous_generations(tmp_path, monkeypatch):
    export, run = tmp_path / "export", tmp_path / "gen"
    make_backbone("t5").save_pretrained(export)
    run.mkdir()
    (run / "generations.jsonl").write_text('{"earlier": "run"}\n')
    real, rows = json.dumps, []

    def dumps(obj, *args, **kwargs):  # the disk fills up at the second row
        if isinstance(obj, dict) and "exit_layers" in obj:
            rows.append(obj)
            if len(rows) == 2:
                raise OSError(28, "No space left on device")
        return real(obj, *args, **kwargs)

    monkeypatch.setattr(json, "dumps", dumps)
    r = cli("+experiment=generate", f"model.name_or_path={export}", f"hydra.run.dir={run}", "exit.min_exit_layer=2",
            "decoding.max_examples=3", "decoding.max_new_tokens=4", "decoding.flops_examples=0", cwd=tmp_path)
    assert r.returncode == 1 and "No space left on device" in r.stderr
    assert (run / "generations.jsonl").read_text() == '{"earlier": "run"}\n'  # not half of the new one
    assert not list(run.glob(".generations.jsonl.*"))


def test_the_export_s_strategy_is_the_default(tmp_path):
    (tmp_path / "early_exit.json").write_text(json.dumps(
        {"family": "t5", "policy": {"measure": "softmax_gap", "threshold": 0.3, "strategy": "parallel"}}
    ))
    cfg = compose(["+experiment=generate", f"model.name_or_path={tmp_path}"])
    assert decoding_settings(cfg, str(tmp_path)).strategy == "parallel"
    assert "strategy" not in policy_fields(cfg, str(tmp_path))
    cfg = compose(["+experiment=generate", f"model.name_or_path={tmp_path}", "decoding.strategy=copy"])
    assert decoding_settings(cfg, str(tmp_path)).strategy == "copy"
    assert decoding_settings(compose([]), None).strategy == "copy"


def test_the_export_s_feature_space_reaches_the_decoder(tmp_path):
    """exit.features travels with the policy (saturation) or the classifier file; decoding uses it."""
    from eetrain.decoding.settings import export_policy
    from eetrain.exits.classifiers import save_classifier
    from eetrain.exits.training import make_classifier

    bb = make_backbone("t5")
    (tmp_path / "early_exit.json").write_text(json.dumps({"family": "t5"}))
    cfg = compose(["exit.features=normed", "decoding.policy.measure=hidden_saturation",
                   "decoding.policy.threshold=0.9", "exit.min_exit_layer=2"])
    stored = export_policy(cfg, bb, tmp_path / "run", tmp_path)
    assert stored["features"] == "normed" and stored["calibrated"] is False
    cfg = compose(["+experiment=generate", f"model.name_or_path={tmp_path}"])
    policy = build_policy(policy_fields(cfg, str(tmp_path)), bb, str(tmp_path))
    assert policy.measure == "hidden_saturation" and policy.features == "normed"
    cfg = compose(["+experiment=generate", f"model.name_or_path={tmp_path}", "decoding.policy.features=raw"])
    assert build_policy(policy_fields(cfg, str(tmp_path)), bb, str(tmp_path)).features == "raw"
    # no stored policy: exit.features, as the offline table of the same run used it
    cfg = compose(["exit.features=normed", "decoding.policy.measure=hidden_saturation"])
    assert policy_fields(cfg, None)["features"] == "normed"
    assert policy_fields(compose(["decoding.policy.measure=hidden_saturation"]), None)["features"] == "raw"
    # a classifier reads the space saved with it; a contradicting override names the key
    save_classifier(make_classifier("calm", bb.hidden_size, features="normed"), tmp_path / "calm.pt")
    cfg = compose(["+experiment=generate", "model.name_or_path=nowhere", "decoding.policy.measure=classifier:calm",
                   f"decoding.policy.classifier={tmp_path / 'calm.pt'}"])
    assert build_policy(policy_fields(cfg, None), bb, None).features == "normed"
    cfg = compose(["+experiment=generate", "model.name_or_path=nowhere", "decoding.policy.measure=classifier:calm",
                   f"decoding.policy.classifier={tmp_path / 'calm.pt'}", "decoding.policy.features=raw"])
    with pytest.raises(ConfigError, match="decoding.policy: features='raw', but the calm classifier was trained on "
                                          "normed states"):
        build_policy(policy_fields(cfg, None), bb, None)
    cfg = compose(["+experiment=generate", "model.name_or_path=nowhere", "decoding.policy.features=both"])
    with pytest.raises(ConfigError, match=r"decoding.policy.features='both'; allowed: null, raw, normed"):
        build_policy(policy_fields(cfg, None), bb, None)
    # the file must hold the kind the measure names (a calm.pt given for classifier:lstm is refused)
    cfg = compose(["+experiment=generate", "model.name_or_path=nowhere", "decoding.policy.measure=classifier:lstm",
                   f"decoding.policy.classifier={tmp_path / 'calm.pt'}"])
    with pytest.raises(ConfigError, match=r"calm.pt' holds a calm classifier, and decoding.policy.measure="
                                          r"'classifier:lstm' asks for lstm"):
        build_policy(policy_fields(cfg, None), bb, None)


@pytest.mark.parametrize(
    "override,match",
    [
        ("decoding.policy.measure=vibes", "decoding.policy.measure='vibes'; allowed"),
        ("decoding.policy.measure=classifier:lstm", "decoding.policy.classifier: no saved lstm classifier"),
        ("decoding.policy.threshold=1.5", "decoding.policy: threshold"),
        ("decoding.policy.min_exit_layer=[1,2]", r"decoding.policy.min_exit_layer=\[1, 2\]; allowed: an integer >= 1"),
        ("decoding.policy.min_exit_layer=2.5", r"decoding.policy.min_exit_layer=2.5; allowed: an integer >= 1"),
        ("decoding.policy.kwargs=abc", r"decoding.policy.kwargs='abc'; allowed: null or a mapping"),
        ("decoding.policy.kwargs=[1,2]", r"decoding.policy.kwargs=\[1, 2\]; allowed: null or a mapping"),
        ("decoding.policy.exit_points=3", r"decoding.policy.exit_points=3; allowed: null \(every layer\) or a list"),
        # an empty list had become null (every layer): tokens exited at layer 1
        ("decoding.policy.exit_points=[]", r"decoding.policy: exit_points must be ascending distinct integers >= 1, "
                                           r"got \[\]"),
    ],
)
def test_bad_policy_names_the_key(override, match):
    cfg = compose(["+experiment=generate", "model.name_or_path=nowhere", override])
    with pytest.raises(ConfigError, match=match):
        build_policy(policy_fields(cfg, None), make_backbone("t5"), None)


def test_a_decaying_policy_threshold_takes_n_from_the_decoding_length():
    bb = make_backbone("t5")
    for decay in ("{tau: 2.0}", "{tau: 2.0, N: null}"):
        cfg = compose(["+experiment=generate", "model.name_or_path=nowhere", "decoding.policy.threshold=0.9",
                       f"decoding.policy.decay={decay}", "decoding.max_new_tokens=12"])
        thr = build_policy(policy_fields(cfg, None), bb, None, horizon=12).threshold
        assert (thr.lam, thr.N, thr.tau, thr.form) == (0.9, 12, 2.0, "paper")
    cfg = compose(["+experiment=generate", "model.name_or_path=nowhere", "decoding.policy.threshold=0.9",
                   "decoding.policy.decay={N: 5, form: steep}"])
    with pytest.raises(ConfigError, match=r"decoding.policy.decay.form='steep' is not a decaying-threshold form"):
        build_policy(policy_fields(cfg, None), bb, None)
    cfg = compose(["+experiment=generate", "model.name_or_path=nowhere", "decoding.policy.threshold=[0.9,0.8,0.7]",
                   "decoding.policy.decay={N: 5}"])
    with pytest.raises(ConfigError, match=r"decoding.policy.decay decays one base threshold, and "
                                          r"decoding.policy.threshold=\[0.9, 0.8, 0.7\] is not a number"):
        build_policy(policy_fields(cfg, None), bb, None)


def test_a_per_layer_policy_threshold_needs_one_value_per_layer():
    from eetrain.decoding.stage import check_config

    bb = make_backbone("t5")  # 3 decoder layers
    cfg = compose(["+experiment=generate", "model.name_or_path=nowhere", "decoding.policy.threshold=[0.9,0.8]",
                   "decoding.policy.min_exit_layer=1"])
    with pytest.raises(ConfigError, match=r"decoding.policy.threshold has 2 values, one per layer is needed: the "
                                          r"model has 3 layers"):
        check_config(cfg, bb)
    check_config(compose(["+experiment=generate", "model.name_or_path=nowhere",
                          "decoding.policy.threshold=[0.9,0.8,0.7]", "decoding.policy.min_exit_layer=1"]), bb)


def test_bad_decoding_settings_name_the_key():
    cfg = compose(["decoding.max_new_tokens=0"])
    with pytest.raises(ConfigError, match=r"decoding.max_new_tokens=0; allowed: an integer >= 1"):
        decoding_settings(cfg)
    with pytest.raises(ConfigError, match=r"decoding.max_examples=0; allowed: null"):
        decoding_settings(compose(["decoding.max_examples=0"]))
    for key, value, allowed in (("gather_min_batch", "abc", "null (the measured crossover) or an integer >= 1"),
                                ("draft_layer", "0", "null (half the model's layers) or an integer >= 1"),
                                ("temperature", "-1", "a number >= 0"), ("temperature", "nan", "a number >= 0"),
                                ("temperature", "inf", "a number >= 0"), ("top_p", "0", "0 < top_p <= 1"),
                                ("top_p", "high", "0 < top_p <= 1"),
                                ("flops_examples", "-1", "null (every example), 0 (no FLOP count) or a number")):
        with pytest.raises(ConfigError, match=rf"decoding.{key}=.*; allowed: {re.escape(allowed)}"):
            decoding_settings(compose([f"decoding.{key}={value}"]))
    cfg = compose(["+decoding.speed=11"])
    with pytest.raises(ConfigError, match=r"decoding: unknown key\(s\) \['speed'\]"):
        decoding_settings(cfg)
    with pytest.raises(ConfigError, match=r"decoding.compare_full='maybe'; allowed: true or false"):
        decoding_settings(compose(["decoding.compare_full=maybe"]))
    with pytest.raises(ConfigError, match=r"decoding.batch_mode='gather': self_speculative decodes every row at "
                                          r"once.*allowed with it: auto"):
        decoding_settings(compose(["decoding.strategy=self_speculative", "decoding.batch_mode=gather"]))
    with pytest.raises(ConfigError, match=r"decoding.gather_min_batch=8: self_speculative decodes every row at "
                                          r"once.*allowed with it: null"):
        decoding_settings(compose(["decoding.strategy=self_speculative", "decoding.gather_min_batch=8"]))


def test_self_speculative_refuses_an_exit_policy_it_would_not_use():
    from eetrain.decoding.stage import check_config

    bb = make_backbone("t5")
    cfg = compose(["+experiment=generate", "model.name_or_path=nowhere", "decoding.strategy=self_speculative",
                   "decoding.policy.measure=hidden_saturation", "decoding.policy.threshold=0.9"])
    with pytest.raises(ConfigError, match=r"decoding.policy.measure='hidden_saturation': decoding.strategy="
                                          r"self_speculative takes no exit policy"):
        check_config(cfg, bb)
    check_config(compose(["+experiment=generate", "model.name_or_path=nowhere", "decoding.strategy=self_speculative",
                          "decoding.policy.measure=full"]), bb)


def test_a_bad_stored_policy_names_the_export_s_file(tmp_path):
    bb = make_backbone("t5")
    cfg = compose(["+experiment=generate", f"model.name_or_path={tmp_path}"])
    for policy, match in (({"measure": "bogus"}, r"decoding.policy.measure='bogus'; allowed"),
                          ({"measure": "softmax_gap", "threshold": 0.5, "min_exit_layer": "x"},
                           r"decoding.policy.min_exit_layer='x'; allowed")):
        (tmp_path / "early_exit.json").write_text(json.dumps({"family": "t5", "policy": policy}))
        where = re.escape(str(tmp_path / "early_exit.json"))
        with pytest.raises(ConfigError, match=rf"{match}.*the decoding.policy keys not set on the command line "
                                              rf"come from {where}"):
            build_policy(policy_fields(cfg, str(tmp_path)), bb, str(tmp_path))
    from eetrain.decoding.stage import check_config

    (tmp_path / "early_exit.json").write_text(json.dumps({"family": "t5", "policy": {"min_exit_layer": 9}}))
    bb.name_or_path = str(tmp_path)  # as if loaded from there
    with pytest.raises(ConfigError, match=rf"decoding.policy.min_exit_layer=9 exceeds the model's 3 layers; allowed: "
                                          rf"1..3 \(the decoding.policy keys not set on the command line come from {where}"):
        check_config(cfg, bb)
    (tmp_path / "early_exit.json").write_text('{"family": "t5",\n')  # cut short
    with pytest.raises(ConfigError, match=rf"{where} is not a JSON object"):
        policy_fields(cfg, str(tmp_path))


def test_flops_examples_choose_the_batches_counted():
    counted = {n: decoding_settings(compose(["decoding.batch_size=4", f"decoding.flops_examples={n}"])).flops_batches
               for n in ("0", "1", "8", "10", "null")}
    assert counted == {"0": 0, "1": 1, "8": 2, "10": 3, "null": None}


@pytest.mark.slow
def test_train_calibrate_export_policy_then_generate_on_the_export(tmp_path):
    out = tmp_path / "train"
    r = cli(
        "+experiment=demo", f"hydra.run.dir={out}", *SHORT, "stages=[policies,generate]", "exit.min_exit_layer=2",
        "exit.calibration.delta=0.5", "decoding.max_examples=6", "decoding.max_new_tokens=12",
        cwd=tmp_path, timeout=400,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    settings = json.loads((out / "export" / "early_exit.json").read_text())
    policy = settings["policy"]
    calibration = json.loads((out / "calibration.json").read_text())
    assert policy["measure"] == "softmax_gap" and policy["calibrated"] is True
    assert policy["threshold"] == calibration[0]["threshold"] and policy["min_exit_layer"] == 2
    summary = json.loads((out / "generation_summary.json").read_text())
    assert summary["policy"] == f"softmax_gap:{policy['threshold']:g}"  # the stage used the calibrated policy
    assert summary["min_exit_layer"] == 2
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {"source", "output", "reference", "exit_layers", "full_output"} <= set(rows[0])
    assert all(2 <= e <= 4 for row in rows for e in row["exit_layers"])
    for key in ("tokens_per_second", "full_tokens_per_second", "speedup", "mean_exit_layer", "token_consistency",
                "decision_fraction"):
        assert summary[key] == summary[key], key  # not NaN
    assert "Early-exit generation (greedy)" in r.stdout and "speed-up" in r.stdout
    # the data's text metrics against the references, early exit and full model (the demo: ROUGE)
    assert summary["metric"] == "rougeL" and 0 <= summary["rougeL"] <= 100 and summary["full_rougeL"] >= 0
    assert re.search(r"rougeL vs references +: early exit +[\d.]+ +full model", r.stdout)

    gen = tmp_path / "gen"
    r = cli(
        "+experiment=generate", f"model.name_or_path={out / 'export'}", f"hydra.run.dir={gen}",
        "decoding.max_examples=4", "decoding.batch_size=4", "decoding.strategy=parallel",
        "decoding.policy.measure=hidden_saturation", "decoding.policy.threshold=0.99", cwd=tmp_path, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((gen / "generation_summary.json").read_text())
    assert summary["policy"] == "hidden_saturation:0.99" and summary["strategy"] == "parallel"
    assert summary["examples"] == 4 and summary["batch_size"] == 4
    assert "token consistency with the full model" in r.stdout
    # FLOPs counted on the first 32 examples (decoding.flops_examples, the default): all four here
    assert summary["flops_examples"] == 4 and summary["prefill_flops_per_example"] > 0
    assert 0 < summary["flops_per_token"] and summary["flops_ratio"] == pytest.approx(
        summary["flops_per_token"] / summary["full_flops_per_token"])
    assert re.search(r"FLOPs per token \(decoding, counted on 4 examples\): early exit [\d.]+ [kMG], full model "
                     r"[\d.]+ [kMG] \([\d.]+ of it\)", r.stdout)

    r = cli(  # LayerSkip's draft-and-verify with sampling: speculative sampling
        "+experiment=generate", f"model.name_or_path={out / 'export'}", f"hydra.run.dir={gen}",
        "decoding.max_examples=4", "decoding.strategy=self_speculative", "decoding.draft_layer=2",
        "decoding.temperature=0.8", "decoding.top_p=0.9", cwd=tmp_path, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((gen / "generation_summary.json").read_text())
    assert summary["strategy"] == "self_speculative" and summary["policy"] == "draft:2x4"
    assert "Early-exit generation (sampled)" in r.stdout and "(sampled: two independent draws)" in r.stdout
    assert summary["temperature"] == 0.8

    r = cli("+experiment=generate", f"model.name_or_path={out / 'export'}", f"hydra.run.dir={gen}",
            "decoding.strategy=self_speculative", "decoding.draft_layer=4", cwd=tmp_path)
    assert r.returncode == 2 and "decoding.draft_layer=4; allowed: 1..3" in r.stderr


@pytest.mark.slow
def test_train_calibrate_patience_then_generate_with_it(tmp_path):
    out = tmp_path / "train"
    r = cli(
        "+experiment=demo", f"hydra.run.dir={out}", *SHORT, "stages=[policies,generate]", "exit.min_exit_layer=2",
        "exit.calibration.policies=[patience]", "exit.policies.patience.thresholds=[1,2,3]",
        "exit.calibration.delta=0.1", "decoding.max_examples=4", "decoding.max_new_tokens=8",
        cwd=tmp_path, timeout=400,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (calibration,) = json.loads((out / "calibration.json").read_text())
    # the most patient first: P=3 never fires on 4 layers from layer 2, P=2 keeps ~98 % of the tokens, P=1 ~75 %
    assert [(row["threshold"], row["passed"]) for row in calibration["scan"]] == [(3.0, True), (2.0, True), (1.0, False)]
    policy = json.loads((out / "export" / "early_exit.json").read_text())["policy"]
    assert policy["measure"] == "patience" and policy["calibrated"] is True and policy["kwargs"] == {"patience": 2}
    summary = json.loads((out / "generation_summary.json").read_text())
    assert summary["policy"] == "patience(patience=2)"  # the generate stage decoded with the calibrated P


def test_a_run_s_own_calibration_wins_over_the_loaded_export_s_policy(tmp_path):
    from eetrain.decoding.settings import run_policy_fields

    export = tmp_path / "export"
    export.mkdir()
    (export / "early_exit.json").write_text(json.dumps(
        {"family": "t5", "policy": {"measure": "softmax_gap", "threshold": 0.9, "min_exit_layer": 2}}))
    run = tmp_path / "run"
    run.mkdir()
    cfg = compose(["+experiment=generate", f"model.name_or_path={export}", "exit.min_exit_layer=2"])
    bb = make_backbone("t5")
    assert run_policy_fields(cfg, bb, run, str(export))[0]["threshold"] == 0.9  # nothing calibrated here
    (run / "calibration.json").write_text(json.dumps([{"policy": "softmax_gap", "threshold": 0.37}]))
    fields, where = run_policy_fields(cfg, bb, run, str(export))
    assert fields["threshold"] == 0.37 and fields["measure"] == "softmax_gap" and where == str(run)
    cfg = compose(["+experiment=generate", f"model.name_or_path={export}", "decoding.policy.threshold=0.5"])
    assert run_policy_fields(cfg, bb, run, str(export))[0]["threshold"] == 0.5  # the command line wins


def test_a_calibrated_patience_is_exported_as_the_rule_s_parameter(tmp_path):
    from eetrain.decoding.settings import export_policy, run_policy_fields

    run, export = tmp_path / "run", tmp_path / "export"
    run.mkdir(), export.mkdir()
    (export / "early_exit.json").write_text(json.dumps({"family": "t5"}))
    (run / "calibration.json").write_text(json.dumps([{"policy": "patience", "threshold": 2.0}]))
    cfg = compose(["+experiment=demo", "exit.min_exit_layer=2"])
    bb = make_backbone("t5")
    stored = export_policy(cfg, bb, run, export)
    assert stored["measure"] == "patience" and stored["kwargs"] == {"patience": 2} and stored["threshold"] is None
    assert json.loads((export / "early_exit.json").read_text())["policy"]["kwargs"] == {"patience": 2}
    cfg = compose(["+experiment=generate", f"model.name_or_path={export}", "exit.min_exit_layer=2"])
    fields, _ = run_policy_fields(cfg, bb, run, str(export))
    policy = build_policy(fields, bb, str(export))
    assert policy.measure == "patience" and policy.measure_kwargs == {"patience": 2} and policy.min_exit_layer == 2


def test_a_re_export_keeps_the_loaded_exports_minimum_and_leaves_an_uncertified_schedule_out(tmp_path, capsys):
    from eetrain.decoding.settings import export_policy

    source, run, export = tmp_path / "source", tmp_path / "run", tmp_path / "export"
    for d in (source, run, export):
        d.mkdir()
    (source / "early_exit.json").write_text(json.dumps(
        {"family": "t5", "policy": {"measure": "softmax_gap", "threshold": 0.9, "min_exit_layer": 2}}))
    (export / "early_exit.json").write_text(json.dumps({"family": "t5"}))
    bb = make_backbone("t5")
    # +experiment=evaluate (exit.min_exit_layer: null = the export's own): the fallback became 4, the depth
    cfg = compose(["+experiment=evaluate", f"model.name_or_path={source}", "model.config=null"])
    assert export_policy(cfg, bb, run, export)["min_exit_layer"] == 2
    # an offline-calibrated threshold was certified with a check at every layer: check_every is not attached
    (run / "calibration.json").write_text(json.dumps([{"policy": "softmax_gap", "threshold": 0.4}]))
    cfg = compose(["+experiment=demo", "exit.min_exit_layer=2", "decoding.policy.check_every=2"])
    stored = export_policy(cfg, bb, run, export)
    assert stored["threshold"] == 0.4 and "check_every" not in stored
    assert "[export] decoding.policy.check_every left out of the calibrated policy" in capsys.readouterr().out
    # calibrated online, it decoded with the schedule: kept
    (run / "calibration.json").write_text(json.dumps([{"policy": "softmax_gap", "threshold": 0.3, "online": {
        "threshold": 0.4, "decoded": {}, "scan": [{"n": 8}]}}]))
    stored = export_policy(cfg, bb, run, export)
    assert stored["calibrated"] == "online" and stored["check_every"] == 2


def test_an_unknown_split_names_the_setting_that_chose_it():
    from hydra.utils import instantiate

    cfg = compose(["+experiment=demo"])
    bb = make_backbone("t5")
    data = instantiate(cfg.data, tokenizer=bb.tokenizer, collate_fn=bb.collate)
    with pytest.raises(ConfigError, match=r"^decoding.split='nosuch': data.files.nosuch is not set"):
        data.split_examples("nosuch", "decoding.split")


@pytest.mark.parametrize("strategy", ["copy", "self_speculative"])
def test_task_metric_callback_logs_early_exit_only_where_a_policy_decides(strategy):
    from types import SimpleNamespace

    from eetrain.decoding.callback import GenerationMetrics

    examples = [{"source_ids": [5, 17, 33, 1], "target_ids": [9, 10, 1]}, {"source_ids": [40, 1], "target_ids": [12, 1]}]
    data = SimpleNamespace(metric="rougeL", metrics=["rougeL"], split_examples=lambda split: examples)
    logged = {}
    module = SimpleNamespace(backbone=make_backbone("t5").eval(), log=lambda k, v, **kw: logged.setdefault(k, v))
    callback = GenerationMetrics(strategy=strategy, max_new_tokens=4)
    callback.on_validation_epoch_end(SimpleNamespace(sanity_checking=False, datamodule=data), module)
    # self_speculative takes no exit policy (and its text is the full model's): no early-exit metric
    want = {"val/rougeL"} | ({"val/rougeL_early_exit", "val/early_exit_mean_layer"} if strategy == "copy" else set())
    assert set(logged) == want


def test_an_uncalibrated_export_keeps_the_trained_exits_only(tmp_path):
    """exits.min_layer / exits.layers say which exits were trained: the exported policy exits at those only."""
    from eetrain.decoding.settings import export_policy

    bb = make_backbone("t5", num_decoder_layers=4, num_layers=2)
    (tmp_path / "early_exit.json").write_text(json.dumps({"family": "t5"}))
    stored = export_policy(compose(["exit.min_exit_layer=1", "exits.min_layer=3", "exits.layers=[2,3,4]"]), bb,
                           tmp_path / "run", tmp_path)
    assert stored["min_exit_layer"] == 3 and stored["exit_points"] == [3, 4] and stored["calibrated"] is False
    policy = build_policy(policy_fields(compose(["+experiment=generate", f"model.name_or_path={tmp_path}"]),
                                        str(tmp_path)), bb, str(tmp_path))
    assert policy.min_exit_layer == 3 and tuple(policy.exit_points) == (3, 4)  # what generate decodes with
    stored = export_policy(compose(["exit.min_exit_layer=2", "exits.layers=[2,4]"]), bb, tmp_path / "run", tmp_path)
    assert stored["min_exit_layer"] == 2 and stored["exit_points"] == [2, 4]
    stored = export_policy(compose(["exit.min_exit_layer=2"]), bb, tmp_path / "run", tmp_path)  # every layer
    assert stored["min_exit_layer"] == 2 and stored.get("exit_points") is None
    policy = build_policy(policy_fields(compose(["+experiment=generate", f"model.name_or_path={tmp_path}"]),
                                        str(tmp_path)), bb, str(tmp_path))
    assert policy.min_exit_layer == 2


def test_an_export_says_when_calibration_found_no_threshold(tmp_path, capsys):
    from eetrain.decoding.settings import export_policy

    bb = make_backbone("t5")
    (tmp_path / "early_exit.json").write_text(json.dumps({"family": "t5"}))
    run = tmp_path / "run"
    run.mkdir()
    (run / "calibration.json").write_text(json.dumps([{"policy": "softmax_gap", "threshold": None}]))
    stored = export_policy(compose(["exit.min_exit_layer=2"]), bb, run, tmp_path)
    assert stored["calibrated"] is False and stored["threshold"] == 0.9
    assert "[export] LTT calibration found no threshold that holds (calibration.json)" in capsys.readouterr().out


@pytest.mark.parametrize("override, message", [
    ("exit.min_exit_layer=9", "exit.min_exit_layer=9 exceeds the model depth: it has 4 exit layers; allowed: 1..4"),
    ("decoding.policy.min_exit_layer=7", "decoding.policy.min_exit_layer=7 exceeds the model's 4 layers; allowed: 1..4"),
])
def test_a_minimum_exit_layer_beyond_the_depth_fails_whatever_the_stages(tmp_path, override, message):
    # without stages the export's policy still uses it: it was clamped to the depth, a policy that never exits
    r = cli("+experiment=demo", override, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_export_says_when_its_policy_cannot_exit_early(tmp_path, capsys):
    from eetrain.decoding.settings import export_policy

    (tmp_path / "early_exit.json").write_text(json.dumps({"family": "t5", "num_layers": 3}))
    policy = export_policy(compose([]), make_backbone("t5"), tmp_path, tmp_path)  # CALM's default 4, 3 layers
    assert policy["min_exit_layer"] == 3
    assert "[export] note: the exported policy's minimum exit layer is the model's depth (3; configured 4), so it " \
           "never exits early: set exit.min_exit_layer" in capsys.readouterr().out
    export_policy(compose(["exit.min_exit_layer=2"]), make_backbone("t5"), tmp_path, tmp_path)
    assert "note" not in capsys.readouterr().out
    # a one-layer model has no earlier layer to advise (1..0)
    (tmp_path / "early_exit.json").write_text(json.dumps({"family": "t5", "num_layers": 1}))
    policy = export_policy(compose([]), make_backbone("t5", num_decoder_layers=1), tmp_path, tmp_path)
    assert policy["min_exit_layer"] == 1 and "note" not in capsys.readouterr().out
