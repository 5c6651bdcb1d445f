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


def test_online_calibration_picks_what_a_hand_run_of_the_decoder_confirms():
    model = make_backbone("t5", num_layers=4, num_decoder_layers=4, initializer_factor=8.0).eval()
    g = torch.Generator().manual_seed(0)
    examples = [{"source_ids": torch.randint(5, 400, (int(n),), generator=g).tolist() + [1]}
                for n in torch.randint(3, 9, (24,), generator=g)]
    template = ExitPolicy("hidden_saturation", 0.5, min_exit_layer=1)
    grid = [0.99, 0.95, 0.9, 0.8, 0.6, 0.4, 0.2, 0.0]
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
