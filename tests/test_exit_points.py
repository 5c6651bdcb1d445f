"""Exit points from `exits.layers` and the minimum exit layer, and their use in the CE term."""

import pytest
import torch

from eetrain.errors import ConfigError
from eetrain.losses import (
    ExitCrossEntropy,
    JointLoss,
    layer_weights,
    resolve_exit_points,
    weighted_cross_entropy,
)
from tests.conftest import examples, make_backbone


@pytest.mark.parametrize(
    "spec, n, min_layer, expected",
    [
        (None, 4, 1, (1, 2, 3, 4)),
        ("all", 3, 1, (1, 2, 3)),
        ("last", 24, 1, (24,)),
        ([2, 4], 4, 1, (2, 4)),
        ({"every": 2}, 6, 1, (2, 4, 6)),
        ({"every": 4}, 10, 1, (4, 8, 10)),  # the last layer always
        ({"every": 1}, 3, 1, (1, 2, 3)),
        ({"every": 7}, 6, 1, (6,)),
        ({"shallow": 6}, 24, 1, (6, 24)),
        ({"shallow": 2}, 4, 2, (2, 4)),
        # the minimum exit layer drops the exits below it
        (None, 6, 4, (4, 5, 6)),
        ([1, 3, 5, 6], 6, 4, (5, 6)),
        ({"every": 2}, 8, 3, (4, 6, 8)),
    ],
)
def test_resolve_exit_points(spec, n, min_layer, expected):
    assert resolve_exit_points(spec, n, min_layer) == expected


@pytest.mark.parametrize(
    "spec, n, min_layer, match",
    [
        ([0, 2], 4, 1, r"exits.layers=\[0, 2\]: \[0\] outside 1..4"),
        ([2, 5], 4, 1, r"\[5\] outside 1..4"),
        ([3, 2], 4, 1, "must be sorted ascending without duplicates"),
        ([2, 2, 3], 4, 1, "must be sorted ascending without duplicates"),
        ([], 4, 1, "exits.layers is empty"),
        ([1, 2], 4, 3, r"exits.min_layer=3 is above every exit layer \[1, 2\]"),
        (None, 4, 5, r"exits.min_layer=5 must be within 1..4"),
        (None, 4, 0, r"exits.min_layer=0 must be within 1..4"),
        ({"every": 0}, 4, 1, r"exits.layers.every=0 must be >= 1"),
        ({"every": -2}, 4, 1, r"exits.layers.every=-2 must be >= 1"),
        ({"shallow": 4}, 4, 1, r"exits.layers.shallow=4 must be within 1..3"),
        ({"shallow": 30}, 24, 1, r"exits.layers.shallow=30 must be within 1..23"),
        ({"shallow": 2}, 6, 4, r"exits.layers.shallow=2 is below exits.min_layer=4.*train_below_min"),
        ({"shallow": 2.5}, 6, 1, r"exits.layers.shallow=2.5 must be an integer"),
        ({"deep": 2}, 6, 1, r"exits.layers=\{'deep': 2\} is unknown; allowed: .*\{every: k\}, \{shallow: L_s\}"),
        ("first", 6, 1, r"exits.layers='first' is unknown; allowed: null or 'all'"),
    ],
)
def test_bad_exit_points_name_the_key(spec, n, min_layer, match):
    with pytest.raises(ConfigError, match=match):
        resolve_exit_points(spec, n, min_layer)


def test_min_layer_applies_to_training_unless_train_below_min():
    bb = make_backbone("t5")  # 3 layers
    states = bb(bb.collate(examples()))
    term = ExitCrossEntropy(weights="calm", min_layer=2)
    layers, weights = term.resolve(3)
    assert layers == (2, 3)
    torch.testing.assert_close(weights, torch.tensor([2 / 5, 3 / 5]))
    out = JointLoss({"ce": term})(states, bb)
    assert sorted(out.layer_ce) == [2, 3]
    ref, _ = weighted_cross_entropy(
        [bb.exit_logits(h) for h in states.hidden[1:]], states.labels, layer_weights("calm", [2, 3])
    )
    torch.testing.assert_close(out.total, ref, rtol=1e-5, atol=1e-6)

    below = ExitCrossEntropy(weights="calm", min_layer=2, train_below_min=True)
    assert below.resolve(3)[0] == (1, 2, 3)
    with pytest.raises(ConfigError, match="exits.min_layer=4 must be within 1..3"):
        ExitCrossEntropy(min_layer=4, train_below_min=True).resolve(3)


def test_ce_term_accepts_every_form():
    assert ExitCrossEntropy(layers={"every": 2}).resolve(6)[0] == (2, 4, 6)
    assert ExitCrossEntropy(layers="last").resolve(6)[0] == (6,)
    assert ExitCrossEntropy(layers=[1, 6]).resolve(6)[0] == (1, 6)
    with pytest.raises(ConfigError, match="allowed"):
        ExitCrossEntropy(layers="first")
