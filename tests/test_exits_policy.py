"""Tests for eetrain.exits.thresholds and eetrain.exits.policy."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eetrain.exits.classifiers import CalmClassifier
from eetrain.exits.measures import ExitRecords
from eetrain.exits.policy import (
    POLICY_TABLE_COLUMNS,
    ExitPolicy,
    deebert_expected_saving,
    evaluate_policy,
    exit_layers,
    plot_consistency_vs_exit,
    sweep,
    write_policy_table,
)
from eetrain.exits.thresholds import (
    DecayingThreshold,
    FixedThreshold,
    PerLayerThreshold,
    decaying_threshold,
    make_threshold,
    resolve_threshold,
)

# ------------------------------------------------------------------------------------------------
# Decaying threshold
# ------------------------------------------------------------------------------------------------


def test_decaying_threshold_paper_form() -> None:
    # t = 0: 0.9 * 0.8 + 0.1 = 0.82
    assert decaying_threshold(0.8, 0, 10) == pytest.approx(0.82)
    # t = N: 0.72 + 0.1 * e^-4 = 0.7218316
    assert decaying_threshold(0.8, 10, 10) == pytest.approx(0.72 + 0.1 * math.exp(-4.0))
    assert decaying_threshold(0.8, 10, 10) == pytest.approx(0.7218316, abs=1e-7)
    # hand value t = N/2: 0.72 + 0.1 * e^-2 = 0.7335335
    assert decaying_threshold(0.8, 5, 10) == pytest.approx(0.7335335, abs=1e-7)
    # tau changes the decay: tau = 2, t = N/2 -> 0.72 + 0.1 e^-1
    assert decaying_threshold(0.8, 5, 10, tau=2.0) == pytest.approx(0.72 + 0.1 * math.exp(-1.0))
    # clipped to [0, 1]
    assert decaying_threshold(1.5, 0, 10) == 1.0
    assert decaying_threshold(-1.0, 10, 10) == 0.0


def test_decaying_threshold_code_form() -> None:
    assert decaying_threshold(0.8, 0, 10, form="code") == pytest.approx(0.8)
    # t = N: 0.8 * (0.9 + 0.1 e^-4) = 0.72146525
    assert decaying_threshold(0.8, 10, 10, form="code") == pytest.approx(0.72146525, abs=1e-7)
    # t = N/2: 0.8 * (0.9 + 0.1 e^-2) = 0.7308268
    assert decaying_threshold(0.8, 5, 10, form="code") == pytest.approx(0.7308268, abs=1e-7)
    assert decaying_threshold(1.5, 0, 10, form="code") == pytest.approx(1.5)  # no clipping


def test_decaying_threshold_tensors_and_errors() -> None:
    t = torch.tensor([0, 5, 10])
    for form in ("paper", "code"):
        out = decaying_threshold(0.8, t, 10, form=form)
        assert isinstance(out, torch.Tensor) and out.shape == (3,)
        expected = [decaying_threshold(0.8, int(v), 10, form=form) for v in t]
        torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float32))
    # broadcast a per-layer lam against positions
    grid = decaying_threshold(torch.tensor([[0.5], [0.8]]), t, 10)
    assert grid.shape == (2, 3)
    with pytest.raises(ValueError, match=r"allowed: \['paper', 'code'\]"):
        decaying_threshold(0.8, 0, 10, form="linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="N"):
        decaying_threshold(0.8, 0, 0)


def test_make_and_resolve_thresholds() -> None:
    assert make_threshold(0.5) == FixedThreshold(0.5)
    assert make_threshold([0.1, 0.2]) == PerLayerThreshold((0.1, 0.2))
    assert make_threshold(torch.tensor([0.1, 0.2])) == PerLayerThreshold(
        (pytest.approx(0.1), pytest.approx(0.2))
    )
    spec = make_threshold({"lam": 0.8, "N": 10, "form": "code"})
    assert spec == DecayingThreshold(0.8, 10, 4.0, "code")
    with pytest.raises(ValueError, match=r"allowed: \['paper', 'code'\]"):
        make_threshold({"lam": 0.8, "N": 10, "form": "bogus"})
    assert resolve_threshold(FixedThreshold(0.3), 2, 3).shape == (2, 3)
    per_layer = resolve_threshold(PerLayerThreshold((0.1, 0.2)), 2, 3)
    torch.testing.assert_close(per_layer[:, 0], torch.tensor([0.1, 0.2], dtype=torch.float64))
    with pytest.raises(ValueError, match="L=3"):
        resolve_threshold(PerLayerThreshold((0.1, 0.2)), 3, 3)
    with pytest.raises(ValueError, match="positions"):
        resolve_threshold(DecayingThreshold(0.8, 10), 2, 3)  # never silently skip the decay
    dec = resolve_threshold(DecayingThreshold(0.8, 10), 2, 3, positions=torch.tensor([0, 5, 10]))
    assert dec.dtype == torch.float64
    torch.testing.assert_close(dec[1], torch.tensor([0.82, 0.7335335, 0.7218316], dtype=torch.float64))
    # equality counts as >=: a float64 score of exactly 0.8 passes a fixed 0.8 threshold
    thr32 = resolve_threshold(FixedThreshold(0.8), 1, 1, dtype=torch.float32)
    assert bool(torch.tensor([0.8]) >= thr32) and bool(
        torch.tensor([0.8], dtype=torch.float64) >= dec.new_full((1,), 0.8)
    )


# ------------------------------------------------------------------------------------------------
# ExitPolicy and exit_layers
# ------------------------------------------------------------------------------------------------

# softmax_max scores, L = 4 layers x N = 3 tokens
TOP1 = torch.tensor(
    [
        [0.95, 0.50, 0.50],
        [0.60, 0.80, 0.50],
        [0.90, 0.85, 0.50],
        [0.70, 0.60, 0.50],
    ],
    dtype=torch.float64,
)


def _records(top1: torch.Tensor = TOP1) -> ExitRecords:
    rest = (1 - top1) / 2
    return ExitRecords(probs=torch.stack([top1, rest, rest], dim=-1))


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="allowed:.*softmax_gap"):
        ExitPolicy("confidence", 0.5)
    with pytest.raises(ValueError, match="threshold"):
        ExitPolicy("softmax_gap", 1.5)
    with pytest.raises(ValueError, match=r"threshold\[1\]"):
        ExitPolicy("softmax_max", [0.5, 1.2, 0.3, 0.3])
    with pytest.raises(ValueError, match=r"threshold\.lam"):
        ExitPolicy("softmax_max", {"lam": 1.3, "N": 10})
    with pytest.raises(ValueError, match="threshold"):
        ExitPolicy("hidden_saturation", -1.5)
    with pytest.raises(ValueError, match="threshold"):
        ExitPolicy("entropy", 0.5)  # the entropy score is -H <= 0
    ExitPolicy("entropy", -0.5)
    ExitPolicy("hidden_saturation", -0.5)
    with pytest.raises(ValueError, match="no threshold"):
        ExitPolicy("patience", 0.5)
    with pytest.raises(ValueError, match="patience"):
        ExitPolicy("patience", measure_kwargs={"patience": 0})
    with pytest.raises(ValueError, match="min_exit_layer"):
        ExitPolicy("softmax_max", 0.5, min_exit_layer=0)
    with pytest.raises(ValueError, match=r"min_exit_layer=5.*L=4"):
        exit_layers(ExitPolicy("softmax_max", 0.5, min_exit_layer=5), _records())
    with pytest.raises(ValueError, match="no threshold"):
        exit_layers(ExitPolicy("softmax_max"), _records())
    assert ExitPolicy("softmax_max", 0.5).min_exit_layer == 4


def test_exit_layers_fixed_threshold_and_min_exit_layer() -> None:
    rec = _records()
    assert exit_layers(ExitPolicy("softmax_max", 0.8, min_exit_layer=1), rec).tolist() == [1, 2, 4]
    assert exit_layers(ExitPolicy("softmax_max", 0.8, min_exit_layer=2), rec).tolist() == [3, 2, 4]
    assert exit_layers(ExitPolicy("softmax_max", 0.8, min_exit_layer=3), rec).tolist() == [3, 3, 4]
    assert exit_layers(ExitPolicy("softmax_max", 0.8), rec).tolist() == [4, 4, 4]  # default 4
    out = exit_layers(ExitPolicy("softmax_max", 0.8, min_exit_layer=1), probs=rec.probs)
    assert out.dtype == torch.long and out.tolist() == [1, 2, 4]


def test_exit_layers_per_layer_and_decaying_thresholds() -> None:
    rec = _records()
    per_layer = ExitPolicy("softmax_max", [0.99, 0.9, 0.85, 0.5], min_exit_layer=1)
    assert exit_layers(per_layer, rec).tolist() == [3, 3, 4]
    # decaying, paper form, lam = 0.8, N = 10: t = 0 -> 0.82, t = 1 -> 0.72 + 0.1 e^-0.4 = 0.787
    decay = ExitPolicy("softmax_max", {"lam": 0.8, "N": 10, "tau": 4.0}, min_exit_layer=1)
    assert exit_layers(decay, rec, positions=torch.tensor([0, 0, 0])).tolist() == [1, 3, 4]
    assert exit_layers(decay, rec, positions=torch.tensor([1, 1, 1])).tolist() == [1, 2, 4]
    # positions are per token
    assert exit_layers(decay, rec, positions=torch.tensor([0, 1, 0])).tolist() == [1, 2, 4]
    with pytest.raises(ValueError, match="positions"):
        exit_layers(decay, rec)


def test_exit_layers_boolean_and_classifier_measures() -> None:
    # patience P=1 on argmax: token 0 predictions 0 0 1 1, token 1: 0 1 0 1
    preds = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])
    rec = ExitRecords(logits=torch.nn.functional.one_hot(preds, 2).float())
    pol = ExitPolicy("patience", min_exit_layer=1, measure_kwargs={"patience": 1})
    assert exit_layers(pol, rec).tolist() == [2, 4]
    pol3 = ExitPolicy("patience", min_exit_layer=3, measure_kwargs={"patience": 1})
    assert exit_layers(pol3, rec).tolist() == [4, 4]
    # classifier: P(exit) = sigmoid(h[0])
    clf = CalmClassifier(2)
    with torch.no_grad():
        clf.net.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
        clf.net.bias.zero_()
    hidden = torch.zeros(3, 2, 2)
    hidden[..., 0] = torch.tensor([[-5.0, 5.0], [5.0, -5.0], [5.0, -5.0]])
    cpol = ExitPolicy(clf, 0.5, min_exit_layer=1)
    assert cpol.label == "classifier:calm"
    assert exit_layers(cpol, hidden=hidden).tolist() == [2, 1]
    with pytest.raises(ValueError, match="threshold"):
        ExitPolicy(clf, 1.5)


# ------------------------------------------------------------------------------------------------
# evaluate_policy and DeeBERT saving
# ------------------------------------------------------------------------------------------------

# predictions (L = 3, N = 4): layer 1 [0 1 2 3], layer 2 [0 1 1 3], layer 3 [0 2 1 0]
EVAL_PREDS = torch.tensor([[0, 1, 2, 3], [0, 1, 1, 3], [0, 2, 1, 0]])
EVAL_EXIT = torch.tensor([1, 2, 3, 1])  # predictions at exit: [0, 1, 1, 3]; last layer: [0, 2, 1, 0]


def test_evaluate_policy_by_hand() -> None:
    stats = evaluate_policy(EVAL_EXIT, EVAL_PREDS, None, 3)
    assert stats["mean_exit_layer"] == pytest.approx(1.75)  # (1 + 2 + 3 + 1) / 4
    assert stats["consistency"] == pytest.approx(0.5)  # tokens 0 and 2 agree with the last layer
    assert stats["accuracy"] is None
    assert stats["expected_saving"] == pytest.approx(1 - 1.75 / 3)  # 0.416667
    # labels: token 2 is padding (-100) and is dropped everywhere
    labels = torch.tensor([0, 1, -100, 3])
    stats = evaluate_policy(EVAL_EXIT, EVAL_PREDS, labels, 3)
    assert stats["mean_exit_layer"] == pytest.approx(4 / 3)
    assert stats["consistency"] == pytest.approx(1 / 3)
    assert stats["accuracy"] == pytest.approx(1.0)
    assert stats["expected_saving"] == pytest.approx(5 / 9)
    assert stats["n_tokens"] == 3
    # logits give the same as predictions
    logits = torch.nn.functional.one_hot(EVAL_PREDS, 4).float()
    assert evaluate_policy(EVAL_EXIT, logits, labels) == stats
    with pytest.raises(ValueError, match="L=4"):
        evaluate_policy(EVAL_EXIT, EVAL_PREDS, None, 4)
    with pytest.raises(ValueError, match="exit layers"):
        evaluate_policy(torch.tensor([0, 1, 1, 1]), EVAL_PREDS)


def test_deebert_expected_saving_by_hand() -> None:
    # N_1 = 1, N_2 = 0, N_3 = 2, N_4 = 1: 1 - (1*1 + 3*2 + 4*1) / (4 * 4) = 1 - 11/16 = 0.3125
    assert deebert_expected_saving([1, 0, 2, 1]) == pytest.approx(0.3125)
    # agrees with 1 - mean_exit_layer / L
    exits = torch.tensor([1, 3, 3, 4])
    preds = torch.zeros(4, 4, dtype=torch.long)
    assert evaluate_policy(exits, preds)["expected_saving"] == pytest.approx(0.3125)
    assert deebert_expected_saving([0, 0, 5]) == pytest.approx(0.0)  # all at the last layer
    assert deebert_expected_saving([7, 0, 0, 0]) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        deebert_expected_saving([0, 0])
    with pytest.raises(ValueError):
        deebert_expected_saving([])


# ------------------------------------------------------------------------------------------------
# Sweep, CSV and plot
# ------------------------------------------------------------------------------------------------


def _synthetic_records(L: int = 6, N: int = 300, V: int = 12, seed: int = 0) -> ExitRecords:  # noqa: N803
    g = torch.Generator().manual_seed(seed)
    final = torch.randn(N, V, generator=g) * 3
    layers = []
    for i in range(1, L + 1):
        w = i / L
        layers.append(w * final + (1 - w) * torch.randn(N, V, generator=g) * 3)
    logits = torch.stack(layers)
    labels = final.argmax(-1)
    labels[::10] = -100
    flip = torch.arange(N) % 7 == 3
    labels[flip] = (labels[flip] + 1) % V
    hidden = torch.randn(L, N, 5, generator=g).cumsum(0)
    return ExitRecords(hidden=hidden, logits=logits, labels=labels)


def test_sweep_rows_csv_and_plot(tmp_path) -> None:
    rec = _synthetic_records()
    policies = [
        ExitPolicy("softmax_max", min_exit_layer=2),
        ExitPolicy("softmax_gap", min_exit_layer=2),
        ExitPolicy("entropy", min_exit_layer=2),
        ExitPolicy("hidden_saturation", min_exit_layer=2),
        ExitPolicy("patience", min_exit_layer=2, measure_kwargs={"patience": 2}),
        ExitPolicy("monotonic", min_exit_layer=3),
    ]
    grid = [0.99, 0.9, 0.7, 0.5, 0.3]
    thresholds = {
        "softmax_max": grid,
        "softmax_gap": grid,
        "entropy": [-0.1, -0.5, -1.0, -2.0],
        "hidden_saturation": [0.9, 0.5, 0.0],
        "patience": [1, 2, 3],
    }
    rows = sweep(policies, thresholds, rec)
    assert len(rows) == 5 + 5 + 4 + 3 + 3 + 1
    for row in rows:
        assert tuple(row) == POLICY_TABLE_COLUMNS
        assert 1 <= row["mean_exit_layer"] <= 6
        assert 0 <= row["consistency"] <= 1 and 0 <= row["accuracy"] <= 1
        assert row["expected_saving"] == pytest.approx(1 - row["mean_exit_layer"] / 6)
    smax = [r for r in rows if r["measure"] == "softmax_max"]
    assert [r["threshold"] for r in smax] == grid
    exits = [r["mean_exit_layer"] for r in smax]
    assert exits == sorted(exits, reverse=True) and exits[0] > exits[-1]  # lower threshold -> earlier
    assert [r["threshold"] for r in rows if r["measure"] == "patience"] == [1, 2, 3]
    assert [r["threshold"] for r in rows if r["measure"] == "monotonic"] == [None]
    # a row equals a direct evaluation
    direct = evaluate_policy(
        exit_layers(ExitPolicy("softmax_gap", 0.7, min_exit_layer=2), rec), rec.logits, rec.labels
    )
    row = next(r for r in rows if r["measure"] == "softmax_gap" and r["threshold"] == 0.7)
    assert row["consistency"] == pytest.approx(direct["consistency"])
    assert row["mean_exit_layer"] == pytest.approx(direct["mean_exit_layer"])
    # a plain threshold list applies to score measures only
    plain = sweep([ExitPolicy("softmax_max", min_exit_layer=2), policies[4]], [0.9, 0.5], rec)
    assert [r["threshold"] for r in plain] == [0.9, 0.5, 2]

    csv_path = write_policy_table(rows, tmp_path / "out" / "policies.csv")
    with open(csv_path, newline="") as fh:
        read = list(csv.DictReader(fh))
    assert len(read) == len(rows) and tuple(read[0]) == POLICY_TABLE_COLUMNS
    assert float(read[0]["consistency"]) == pytest.approx(rows[0]["consistency"])

    png = plot_consistency_vs_exit(rows, tmp_path / "out" / "consistency.png")
    data = png.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in png.parent.iterdir()) == ["consistency.png", "policies.csv"]


def test_sweep_with_decaying_threshold_uses_positions() -> None:
    rec = _synthetic_records(N=100)
    pol = ExitPolicy("softmax_max", {"lam": 0.9, "N": 50}, min_exit_layer=2)
    early = sweep([pol], (), rec, positions=torch.full((100,), 50))
    late = sweep([pol], (), rec, positions=torch.zeros(100, dtype=torch.long))
    assert early[0]["threshold"].startswith("decaying")
    assert early[0]["mean_exit_layer"] <= late[0]["mean_exit_layer"]
    with pytest.raises(ValueError, match="positions"):
        sweep([pol], (), rec)


def test_package_init_is_lazy() -> None:
    code = (
        "import sys, eetrain.exits as E\n"
        "assert 'eetrain.exits.policy' not in sys.modules and 'matplotlib' not in sys.modules\n"
        "assert E.ExitPolicy is __import__('eetrain.exits.policy', fromlist=['x']).ExitPolicy\n"
        "assert callable(E.calibrate_threshold) and 'matplotlib' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(Path(__file__).parents[1]))
