"""Hand-checked tests for eetrain.exits.measures."""

from __future__ import annotations

import math

import pytest
import torch

from eetrain.exits.measures import (
    MEASURES,
    ExitRecords,
    compute_measure,
    entropy,
    get_measure,
    hidden_saturation,
    monotonic,
    normalized_entropy,
    patience,
    softmax_gap,
    softmax_max,
)
from eetrain.exits.policy import ExitPolicy

# A 3-layer, 2-token record with V = 3, given as probabilities (logits = log p).
#   token 0: layer 1 [0.5, 0.3, 0.2], layer 2 [0.6, 0.3, 0.1], layer 3 [0.8, 0.1, 0.1]
#   token 1: layer 1 [0.4, 0.4, 0.2], layer 2 [0.2, 0.7, 0.1], layer 3 [1/3, 1/3, 1/3]
PROBS = torch.tensor(
    [
        [[0.5, 0.3, 0.2], [0.4, 0.4, 0.2]],
        [[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]],
        [[0.8, 0.1, 0.1], [1 / 3, 1 / 3, 1 / 3]],
    ],
    dtype=torch.float64,
)
LOGITS = PROBS.log()


def _h(*p: float) -> float:
    return -sum(x * math.log(x) for x in p)


def test_softmax_gap_and_max_by_hand() -> None:
    expected_gap = torch.tensor([[0.2, 0.0], [0.3, 0.5], [0.7, 0.0]], dtype=torch.float64)
    expected_max = torch.tensor([[0.5, 0.4], [0.6, 0.7], [0.8, 1 / 3]], dtype=torch.float64)
    torch.testing.assert_close(softmax_gap(LOGITS), expected_gap, rtol=0, atol=1e-6)
    torch.testing.assert_close(softmax_gap(probs=PROBS), expected_gap, rtol=0, atol=1e-12)
    torch.testing.assert_close(softmax_max(LOGITS), expected_max, rtol=0, atol=1e-6)
    torch.testing.assert_close(softmax_max(probs=PROBS), expected_max, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="exactly one"):
        softmax_gap(LOGITS, probs=PROBS)


def test_entropy_raw_and_registered_scores_by_hand() -> None:
    raw = torch.tensor(
        [
            [_h(0.5, 0.3, 0.2), _h(0.4, 0.4, 0.2)],  # 1.029653, 1.054920
            [_h(0.6, 0.3, 0.1), _h(0.2, 0.7, 0.1)],  # 0.897946, 0.801819
            [_h(0.8, 0.1, 0.1), math.log(3)],  # 0.639032, 1.098612
        ],
        dtype=torch.float64,
    )
    assert raw[0, 0].item() == pytest.approx(1.029653, abs=1e-6)
    assert raw[2, 1].item() == pytest.approx(1.098612, abs=1e-6)
    torch.testing.assert_close(entropy(LOGITS), raw, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy(probs=PROBS), raw, rtol=0, atol=1e-9)
    torch.testing.assert_close(normalized_entropy(probs=PROBS), raw / math.log(3), rtol=0, atol=1e-9)
    # zero probabilities contribute 0 (0 log 0 = 0)
    assert entropy(probs=torch.tensor([[[1.0, 0.0, 0.0]]])).item() == 0.0

    rec = ExitRecords(probs=PROBS)
    # registered "entropy" = -H (exit iff -H >= threshold, i.e. H <= S with threshold = -S)
    torch.testing.assert_close(compute_measure("entropy", rec), -raw, rtol=0, atol=1e-9)
    # registered "normalized_entropy" = 1 - H/log V (uniform -> 0, never above a positive threshold)
    ne = compute_measure("normalized_entropy", rec)
    torch.testing.assert_close(ne, 1 - raw / math.log(3), rtol=0, atol=1e-6)
    assert ne[2, 1].item() == pytest.approx(0.0, abs=1e-7)
    # the registry computes the same thing from logits
    torch.testing.assert_close(
        compute_measure("entropy", ExitRecords(logits=LOGITS)), -raw, rtol=0, atol=1e-5
    )


def test_entropy_of_masked_logits_equals_that_of_their_probabilities() -> None:
    """A -inf logit (a masked token) has p = 0 and adds nothing: H([0.9, 0.1, 0]) = 0.3251 nats."""
    logits = torch.tensor([[[math.log(0.9), math.log(0.1), float("-inf")]]])
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert entropy(logits).item() == pytest.approx(h, abs=1e-6)
    assert entropy(probs=torch.softmax(logits, -1)).item() == pytest.approx(h, abs=1e-6)
    assert normalized_entropy(logits).item() == pytest.approx(h / math.log(3), abs=1e-6)


def test_hidden_saturation_by_hand() -> None:
    # token 0: [1,0] -> [1,1] -> [0,1];  token 1: [1,0] -> [2,0] -> [-1,0]
    hidden = torch.tensor(
        [[[1.0, 0.0], [1.0, 0.0]], [[1.0, 1.0], [2.0, 0.0]], [[0.0, 1.0], [-1.0, 0.0]]],
    )
    s = hidden_saturation(hidden)
    r = 1 / math.sqrt(2)
    assert torch.isinf(s[0]).all() and (s[0] < 0).all()  # layer 1 without h0: -inf, never exits
    torch.testing.assert_close(s[1:], torch.tensor([[r, 1.0], [r, -1.0]]))
    h0 = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    s0 = hidden_saturation(hidden, h0)
    torch.testing.assert_close(s0[0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(compute_measure("hidden_saturation", ExitRecords(hidden=hidden, h0=h0)), s0)
    with pytest.raises(ValueError, match="needs hidden"):
        compute_measure("hidden_saturation", ExitRecords(probs=PROBS))


# Predictions over L = 6 layers:
#   token 0: a a b b b b -> PABEE counter 0 1 0 1 2 3
#   token 1: a b a b a b -> counter 0 0 0 0 0 0
#   token 2: c c c c c c -> counter 0 1 2 3 4 5
PREDS = torch.tensor([[0, 0, 2], [0, 1, 2], [1, 0, 2], [1, 1, 2], [1, 0, 2], [1, 1, 2]])


@pytest.mark.parametrize(
    ("P", "expected_layers"),
    [
        (1, [[2, 4, 5, 6], [], [2, 3, 4, 5, 6]]),
        (2, [[5, 6], [], [3, 4, 5, 6]]),
        (3, [[6], [], [4, 5, 6]]),
    ],
)
def test_patience_by_hand(P: int, expected_layers: list[list[int]]) -> None:  # noqa: N803
    fires = patience(PREDS, P)
    assert fires.dtype == torch.bool and fires.shape == (6, 3)
    for n, layers in enumerate(expected_layers):
        assert (torch.nonzero(fires[:, n]).flatten() + 1).tolist() == layers


def test_patience_accepts_logits_and_rejects_bad_values() -> None:
    logits = torch.nn.functional.one_hot(PREDS, 3).float()
    assert torch.equal(patience(logits, 2), patience(PREDS, 2))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="patience"):
            patience(PREDS, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="patience"):
        compute_measure("patience", ExitRecords(logits=logits), patience=0)
    assert torch.equal(
        compute_measure("patience", ExitRecords(logits=logits), patience=3), patience(PREDS, 3)
    )


# A regression head's scores r_i over L = 5 layers (PABEE on STS-B), tau = 0.25 (all binary fractions):
#   row 0: 1.0 1.125 1.5 1.625 1.75 -> |r_i - r_(i-1)| 0.125 0.375 0.125 0.125 -> counter 0 1 0 1 2
#   row 1: 2.0 2.25 2.5 2.75 3.0    -> differences exactly tau (not < tau)    -> counter 0 0 0 0 0
SCORES = torch.tensor([[1.0, 2.0], [1.125, 2.25], [1.5, 2.5], [1.625, 2.75], [1.75, 3.0]])


def test_regression_patience_by_hand() -> None:
    assert patience(SCORES, 1, tolerance=0.25).T.tolist() == [[False, True, False, True, True], [False] * 5]
    assert patience(SCORES, 2, tolerance=0.25).T.tolist() == [[False, False, False, False, True], [False] * 5]
    # a wider margin: row 1's steps of 0.25 now count as unchanged
    assert patience(SCORES, 4, tolerance=0.5).T.tolist() == [[False, False, False, False, True]] * 2
    records = ExitRecords(logits=SCORES[..., None])  # (L, N, 1): a regression head's logits
    assert torch.equal(compute_measure("patience", records, patience=2, tolerance=0.25),
                       patience(SCORES, 2, tolerance=0.25))
    # without a tolerance patience compares the argmax, always 0 on one output: never what a regression wants
    assert compute_measure("patience", records, patience=1)[1:].all()


def test_regression_patience_rejects_bad_input() -> None:
    for bad in (0, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="tolerance must be a number > 0"):
            patience(SCORES, 1, tolerance=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="tolerance must be a number > 0"):
            ExitPolicy("patience", None, measure_kwargs={"patience": 1, "tolerance": bad})
    with pytest.raises(ValueError, match=r"regression scores: \(L, N\) or \(L, N, 1\)"):
        patience(torch.zeros(5, 2, 3), 1, tolerance=0.1)
    with pytest.raises(ValueError, match=r"needs a regression head's scores: logits \(L, N, 1\)"):
        compute_measure("patience", ExitRecords(logits=torch.zeros(5, 2, 3)), patience=1, tolerance=0.1)


def _probs_from_top1(top1: list[list[float]]) -> torch.Tensor:
    """(L, N) top-1 probabilities -> (L, N, 3) probs [c, (1-c)/2, (1-c)/2] (top-1 = c for c > 1/3)."""
    c = torch.tensor(top1, dtype=torch.float64)
    rest = (1 - c) / 2
    return torch.stack([c, rest, rest], dim=-1)


def test_monotonic_heuristic_by_hand() -> None:
    # columns = tokens, rows = layers 1..4
    top1 = [
        [0.50, 0.35, 0.50, 0.91],
        [0.60, 0.45, 0.95, 0.95],
        [0.70, 0.60, 0.92, 0.99],
        [0.95, 0.80, 0.96, 0.999],
    ]
    fires = monotonic(probs=_probs_from_top1(top1))
    assert fires.dtype == torch.bool and fires.shape == (4, 4)
    # token 0: increasing; 0.70 < 0.9 at layer 3 -> no; 0.60 < 0.70 < 0.95 >= 0.9 at layer 4 -> yes
    assert fires[:, 0].tolist() == [False, False, False, True]
    # token 1: increasing but always < 0.9 -> never
    assert fires[:, 1].tolist() == [False] * 4
    # token 2: high but not increasing (0.95 > 0.92) -> layers 3 and 4 both fail
    assert fires[:, 2].tolist() == [False] * 4
    # token 3: increasing and >= 0.9 from layer 1, but i < 3 never fires
    assert fires[:, 3].tolist() == [False, False, True, True]
    # configurable confidence
    low = monotonic(probs=_probs_from_top1(top1), min_confidence=0.6)
    assert low[:, 1].tolist() == [False, False, True, True]
    # equal consecutive values are not strictly increasing
    flat = monotonic(probs=_probs_from_top1([[0.95], [0.95], [0.99]]))
    assert flat[:, 0].tolist() == [False, False, False]
    with pytest.raises(ValueError, match="min_confidence"):
        monotonic(probs=_probs_from_top1(top1), min_confidence=1.5)
    rec = ExitRecords(logits=_probs_from_top1(top1).log())
    assert torch.equal(compute_measure("monotonic", rec), fires)


def test_registry_and_errors() -> None:
    assert set(MEASURES) == {
        "softmax_gap",
        "softmax_max",
        "entropy",
        "normalized_entropy",
        "hidden_saturation",
        "patience",
        "monotonic",
    }
    assert get_measure("softmax_gap").is_probability
    assert not get_measure("entropy").is_probability
    assert get_measure("patience").kind == "bool"
    with pytest.raises(ValueError, match="allowed:.*softmax_gap"):
        get_measure("softmax_gapp")
    with pytest.raises(ValueError, match="unknown keyword"):
        compute_measure("softmax_gap", ExitRecords(probs=PROBS), patience=2)
    with pytest.raises(ValueError, match="disagree"):
        ExitRecords(probs=PROBS, hidden=torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match="labels"):
        ExitRecords(probs=PROBS, labels=torch.zeros(3, dtype=torch.long))


def test_scores_are_per_layer_for_many_tokens() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, 11, generator=g)
    hidden = torch.randn(5, 7, 4, generator=g)
    rec = ExitRecords(hidden=hidden, logits=logits)
    for name in MEASURES:
        out = compute_measure(name, rec)
        assert out.shape == (5, 7), name
    # each token's score only depends on that token and layer
    single = softmax_gap(logits[:, 3:4])
    torch.testing.assert_close(single[:, 0], softmax_gap(logits)[:, 3])


def test_cosine_by_hand_and_zero_vectors() -> None:
    from eetrain.exits.measures import cosine

    a = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[4.0, 3.0], [-2.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(cosine(a, b), torch.tensor([24 / 25, -1.0, 0.0]))  # a zero vector gives 0
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 7, 64, generator=g), torch.randn(5, 7, 64, generator=g)
    torch.testing.assert_close(cosine(x, y), torch.nn.functional.cosine_similarity(x, y, dim=-1))
