"""Calibration on real early-exit decoding (eetrain.decoding.calibration)."""

from __future__ import annotations

import pytest
import torch

from eetrain.decoding import generate
from eetrain.decoding.calibration import batches, calibrate_online, sequence_risks
from eetrain.decoding.metrics import token_consistency
from eetrain.exits.calibration import hoeffding_bentkus_pvalue
from eetrain.exits.policy import ExitPolicy
from tests.conftest import make_backbone


def test_sequence_risks_hand_checked():
    out = [[1, 2, 3], [4, 5], [6]]
    full = [[1, 2, 4], [4, 5], [7, 8]]
    assert sequence_risks(out, full).tolist() == pytest.approx([1 / 3, 0.0, 1.0])
    assert sequence_risks(out, full, reduction="any").tolist() == [1.0, 0.0, 1.0]


def calibration_case():
    """A sharp tiny T5 (copied keys/values change its tokens), 24 prompts, a saturation template, a grid."""
    model = make_backbone("t5", num_layers=4, num_decoder_layers=4, initializer_factor=8.0).eval()
    g = torch.Generator().manual_seed(0)
    examples = [{"source_ids": torch.randint(5, 400, (int(n),), generator=g).tolist() + [1]}
                for n in torch.randint(3, 9, (24,), generator=g)]
    return model, examples, ExitPolicy("hidden_saturation", 0.5, min_exit_layer=1), [0.99, 0.95, 0.9, 0.8, 0.6, 0.4, 0.2, 0.0]


def test_online_calibration_picks_what_a_hand_run_of_the_decoder_confirms():
    model, examples, template, grid = calibration_case()
    epsilon, delta = 0.1, 0.3
    got = calibrate_online(model, examples, template, grid, epsilon=epsilon, delta=delta,
                           pvalue="hoeffding_bentkus", batch_size=8, strategy="copy", max_new_tokens=6)
    # by hand: decode each threshold, risk per sequence, the fixed-sequence test from the top
    prompts = batches(model, examples, 8)
    full = [s for b in prompts for s in generate(model, b, None, max_new_tokens=6).sequences()]
    chosen, consistency = None, []
    for t in grid:
        seqs = [s for b in prompts for s in generate(model, b, template.with_threshold(t), max_new_tokens=6).sequences()]
        risk = sum(1 - token_consistency([s], [f]) for s, f in zip(seqs, full, strict=True)) / len(full)
        consistency.append(token_consistency(seqs, full))
        if hoeffding_bentkus_pvalue(risk, delta, len(full)) > epsilon:
            break
        chosen = t
    assert got["threshold"] == chosen
    assert [r["threshold"] for r in got["scan"]] == grid[: len(got["scan"])]
    for t, c in zip(grid, consistency, strict=False):
        assert got["decoded"][str(t)]["consistency"] == pytest.approx(c)
    assert len(consistency) > 1 and min(consistency) < 1.0  # the scan really went down the grid


def test_online_calibration_of_patience_scans_p_from_the_most_patient_down():
    model, examples, _, _ = calibration_case()
    template = ExitPolicy("patience", min_exit_layer=1, measure_kwargs={"patience": 1})
    got = calibrate_online(model, examples, template, [1, 2, 3], epsilon=0.1, delta=0.3, pvalue="hoeffding_bentkus",
                           batch_size=8, strategy="copy", max_new_tokens=6)
    prompts = batches(model, examples, 8)
    full = [s for b in prompts for s in generate(model, b, None, max_new_tokens=6).sequences()]
    chosen = None
    for p in (3, 2, 1):
        policy = ExitPolicy("patience", min_exit_layer=1, measure_kwargs={"patience": p})
        seqs = [s for b in prompts for s in generate(model, b, policy, max_new_tokens=6).sequences()]
        risk = sum(1 - token_consistency([s], [f]) for s, f in zip(seqs, full, strict=True)) / len(full)
        assert got["decoded"][str(float(p))]["consistency"] == pytest.approx(token_consistency(seqs, full))
        if hoeffding_bentkus_pvalue(risk, 0.3, len(full)) > 0.1:
            break
        chosen = p
    assert got["threshold"] == chosen and [r["threshold"] for r in got["scan"]] == [3.0, 2.0, 1.0]


def test_collect_on_policy_records_of_a_batch():
    from eetrain.decoding.onpolicy import collect

    model = make_backbone("llama", num_hidden_layers=4, initializer_range=0.3).eval()
    examples = [{"source_ids": [5, 17, 33, 1]}, {"source_ids": [40, 41, 1]}, {"source_ids": [7, 8, 9, 10, 11, 1]}]
    policy = ExitPolicy("hidden_saturation", 0.6, min_exit_layer=1)
    rec = collect(model, examples, policy, strategy="copy", max_new_tokens=5, batch_size=2)
    outs = [generate(model, b, policy, max_new_tokens=5) for b in batches(model, examples, 2)]
    n = sum(o.num_tokens for o in outs)
    assert rec.hidden.shape == (4, n, model.hidden_size) and rec.predictions.shape == (4, n)
    assert sorted(set(rec.sequence_ids.tolist())) == [0, 1, 2]  # batch rows offset into example ids
    assert rec.positions.min() == 1


@pytest.mark.slow
def test_on_policy_classifiers_stage(tmp_path):
    import json

    from eetrain.exits.classifiers import load_classifier
    from tests.in_process import cli

    out = tmp_path / "run"
    r = cli(
        "+experiment=demo", f"hydra.run.dir={out}", "logger=none", "callbacks=none", "export=false",
        "trainer.max_epochs=1", "trainer.limit_train_batches=6", "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false", "stages=[exit_classifiers]", "exit.min_exit_layer=2",
        "exit.classifiers.kinds=[calm]", "exit.classifiers.epochs=1", "exit.classifiers.max_train_tokens=500",
        "exit.classifiers.on_policy=true", "exit.classifiers.on_policy_examples=6", "decoding.max_new_tokens=8",
        cwd=tmp_path, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "exit_classifiers" / "on_policy.json").read_text())
    assert report["strategy"] == "copy" and report["examples"] == 6
    row = report["calm"]
    assert row["tokens"] > 0
    for kind in ("offline", "on_policy"):
        assert 0.0 <= row[kind]["consistency"] <= 1.0 and 2.0 <= row[kind]["mean_exit_layer"] <= 4.0
    assert row["kept"] in ("offline", "on_policy")
    kept = load_classifier(out / "exit_classifiers" / f"calm_{row['kept']}.pt")
    current = load_classifier(out / "exit_classifiers" / "calm.pt")
    for a, b in zip(kept.state_dict().values(), current.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert load_classifier(out / "exit_classifiers" / "calm_on_policy.pt").kind == "calm"
    assert "[exit_classifiers] on-policy:" in r.stdout
