"""Unit tests of eetrain.analysis on hand-made records whose answers are worked out by hand (comments).

The stage / CLI and real models are tested elsewhere; here every LayerRecords is built directly.
"""

import math

import pytest
import torch

from eetrain.analysis import (
    LayerRecords,
    agreement_rows,
    confidence_rows,
    ee_score,
    efficiency,
    gating_rows,
    oracle_layers,
    oracle_rows,
    piece_classes,
    piece_convention,
    saturation_rows,
    sublayer_rows,
    subword_rows,
    suitability_rows,
    token_saturation,
    tokenizer_classes,
)
from eetrain.analysis.collect import _overlap
from eetrain.exits.measures import ExitRecords, compute_measure
from eetrain.exits.policy import ExitPolicy
from eetrain.exits.settings import PolicySpec

NAN = float("nan")


def approx(x):
    return pytest.approx(x, rel=1e-6, abs=1e-6)


def make_records(preds, *, labels=None, top2=None, entropies=None, p_final=None, cos_final=None,
                 saturation=None, positions=None, sequence_ids=None, top10_final=None, vocab_size=10,
                 **extra) -> LayerRecords:
    """A LayerRecords from nested lists; fields not given get neutral values of the right shape."""
    preds = torch.tensor(preds, dtype=torch.long)
    L, N = preds.shape

    def f(x, shape, fill):
        return torch.full(shape, fill, dtype=torch.float32) if x is None else torch.tensor(x, dtype=torch.float32)

    return LayerRecords(
        preds=preds,
        top2=f(top2, (L, N, 2), 0.5),
        entropies=f(entropies, (L, N), 1.0),
        p_final=f(p_final, (L, N), 0.5),
        top10_final=f(top10_final, (L, N), 0.5),
        cos_final=f(cos_final, (L + 1, N), 0.5),
        saturation=f(saturation, (L, N), 0.5),
        labels=torch.tensor(labels if labels is not None else [0] * N, dtype=torch.long),
        positions=torch.tensor(positions if positions is not None else list(range(1, N + 1)), dtype=torch.long),
        sequence_ids=torch.tensor(sequence_ids if sequence_ids is not None else [0] * N, dtype=torch.long),
        vocab_size=vocab_size,
        **extra,
    )


# ---------------------------------------------------------------------------------------------------
# The main hand-made case: L = 4 layers, N = 5 tokens (columns t0..t4).
#
#   preds (rows = layers 1..4)      final top-1 = [7, 8, 9, 5, 6]
#     t0: 7 7 7 7   -> agrees from layer 1             oracle 1
#     t1: 1 8 8 8   -> agrees from layer 2             oracle 2
#     t2: 9 2 9 9   -> = final at 1, changes, back at 3: oracle 3 (not 1)
#     t3: 5 3 3 5   -> = final at 1, changes, back at 4: oracle 4
#     t4: 1 2 3 6   -> only the last layer              oracle 4
# ---------------------------------------------------------------------------------------------------
PREDS = [
    [7, 1, 9, 5, 1],
    [7, 8, 2, 3, 2],
    [7, 8, 9, 3, 3],
    [7, 8, 9, 5, 6],
]
LABELS = [7, 8, 9, 3, 0]
MAX_PROB = [
    [0.5, 0.25, 0.75, 0.5, 0.25],
    [0.75, 0.875, 0.5, 0.5, 0.25],
    [0.875, 0.875, 0.875, 0.625, 0.5],
    [1.0, 1.0, 1.0, 1.0, 1.0],
]
SECOND = [
    [0.25, 0.125, 0.125, 0.5, 0.25],
    [0.125, 0.0625, 0.25, 0.25, 0.25],
    [0.0625, 0.0625, 0.0625, 0.25, 0.25],
    [0.0, 0.0, 0.0, 0.0, 0.0],
]
ENTROPIES = [
    [1.0, 2.0, 0.5, 1.5, 3.0],
    [0.5, 0.25, 1.0, 1.0, 2.0],
    [0.25, 0.25, 0.25, 1.0, 1.5],
    [0.0, 0.0, 0.0, 0.0, 0.0],
]
P_FINAL = [
    [0.5, 0.125, 0.75, 0.5, 0.0],
    [0.75, 0.875, 0.25, 0.25, 0.125],
    [0.875, 0.875, 0.875, 0.125, 0.25],
    [1.0, 1.0, 1.0, 1.0, 1.0],
]
# cos(h_i, h_L), rows i = 0..4 (row 0: input of layer 1; t3's is unknown)
COS = [
    [0.5, 0.2, 0.1, NAN, 0.05],
    [0.95, 0.3, 0.2, 0.6, 0.1],
    [0.97, 0.92, 0.4, 0.5, 0.2],
    [0.99, 0.91, 0.6, 0.95, 0.3],
    [1.0, 1.0, 1.0, 1.0, 1.0],
]
POSITIONS = [1, 2, 3, 1, 2]
SEQUENCE_IDS = [0, 0, 0, 1, 1]
ORACLE = [1, 2, 3, 4, 4]


def main_records(**overrides) -> LayerRecords:
    top2 = [[[a, b] for a, b in zip(r1, r2, strict=True)] for r1, r2 in zip(MAX_PROB, SECOND, strict=True)]
    kwargs = dict(labels=LABELS, top2=top2, entropies=ENTROPIES, p_final=P_FINAL, cos_final=COS,
                  positions=POSITIONS, sequence_ids=SEQUENCE_IDS)
    return make_records(PREDS, **{**kwargs, **overrides})


# ----------------------------------------------------------------------------- collect helpers


def test_overlap_shares_of_b_found_in_a():
    a = torch.tensor([[1, 2, 3], [4, 5, 6], [1, 2, 3]])
    b = torch.tensor([[3, 9, 1], [7, 8, 9], [2, 3, 1]])
    # row 0: 3 and 1 of {3, 9, 1} are in a -> 2/3; row 1: none -> 0; row 2: all (order does not matter) -> 1
    assert _overlap(a, b).tolist() == approx([2 / 3, 0.0, 1.0])


def test_layer_records_exit_records_round_trip():
    hidden, h0 = torch.randn(4, 5, 3), torch.randn(5, 3)
    rec = main_records(hidden=hidden, h0=h0)
    assert (rec.num_layers, rec.num_tokens) == (4, 5)
    er = rec.exit_records()
    assert isinstance(er, ExitRecords)
    assert (er.num_layers, er.num_tokens) == (4, 5)
    assert er.logits is None and er.probs is None and not er.has_distribution
    for mine, theirs in [("preds", "predictions"), ("top2", "top2"), ("entropies", "entropies"),
                         ("saturation", "saturation"), ("labels", "labels"), ("positions", "positions"),
                         ("sequence_ids", "sequence_ids"), ("hidden", "hidden"), ("h0", "h0")]:
        assert getattr(er, theirs) is getattr(rec, mine), mine
    assert er.vocab_size == 10
    assert torch.equal(er.preds(), rec.preds)
    # the summaries feed the registered measures: softmax_max is the first top2 column, entropy is -H
    assert torch.equal(compute_measure("softmax_max", er), torch.tensor(MAX_PROB))
    assert torch.equal(compute_measure("entropy", er), -torch.tensor(ENTROPIES))
    # without hidden states the record holds none
    plain = main_records().exit_records()
    assert plain.hidden is None and plain.h0 is None


# ----------------------------------------------------------------------------- agreement


def test_agreement_rows_hand_checked():
    rows = agreement_rows(main_records())
    assert [r["layer"] for r in rows] == [1, 2, 3, 4]
    # agree with final [7, 8, 9, 5, 6]:
    #   layer 1 [7, 1, 9, 5, 1]: t0 t2 t3 -> 3/5; layer 2 [7, 8, 2, 3, 2]: t0 t1 -> 2/5
    #   layer 3 [7, 8, 9, 3, 3]: t0 t1 t2 -> 3/5; layer 4 -> 1
    assert [r["agree"] for r in rows] == approx([0.6, 0.4, 0.6, 1.0])
    # accuracy vs labels [7, 8, 9, 3, 0]: layer 1 t0 t2 -> 2/5; layer 2 t0 t1 t3 -> 3/5;
    # layer 3 t0 t1 t2 t3 -> 4/5; layer 4 t0 t1 t2 -> 3/5
    assert [r["accuracy"] for r in rows] == approx([0.4, 0.6, 0.8, 0.6])
    # similarity of layer i = mean of cos row i (row 0 is not a layer):
    #   row 1: 2.15/5 = 0.43; row 2: 2.99/5 = 0.598; row 3: 3.75/5 = 0.75; row 4: 1
    assert [r["similarity"] for r in rows] == approx([0.43, 0.598, 0.75, 1.0])
    # population std of row 1: deviations .52 -.13 -.23 .17 -.33, squares sum .478 -> sqrt(.478/5)
    assert rows[0]["similarity_std"] == approx(math.sqrt(0.478 / 5))
    assert rows[3]["similarity_std"] == approx(0.0)
    # top-k overlap with the last layer: the mean of each layer's row
    overlap = [[0.0, 0.2, 0.4, 0.6, 0.8], [0.5] * 5, [1.0, 1.0, 0.5, 0.5, 0.0], [1.0] * 5]
    rows = agreement_rows(main_records(top10_final=overlap))
    assert [r["topk_final"] for r in rows] == approx([0.4, 0.5, 0.6, 1.0])


# ----------------------------------------------------------------------------- oracle


def test_oracle_layers_come_back_counts_the_later_layer():
    assert oracle_layers(main_records()).tolist() == ORACLE


def test_oracle_rows_hand_checked():
    rows, summary = oracle_rows(main_records())
    # oracle [1, 2, 3, 4, 4]: one token each at 1, 2, 3 and two at 4
    assert [r["layer"] for r in rows] == [1, 2, 3, 4]
    assert [r["tokens"] for r in rows] == [1, 1, 1, 2]
    assert [r["share"] for r in rows] == approx([0.2, 0.2, 0.2, 0.4])
    assert [r["cumulative"] for r in rows] == approx([0.2, 0.4, 0.6, 1.0])
    assert summary["tokens"] == 5 and summary["num_layers"] == 4
    assert summary["mean"] == approx(14 / 5)  # (1 + 2 + 3 + 4 + 4) / 5
    assert summary["median"] == 3.0  # sorted 1 2 [3] 4 4
    # default before_last (1, 2, 5, 10): only k < L = 4 is reported
    # k=1: oracle <= 3 -> 3/5; k=2: oracle <= 2 -> 2/5
    assert {k: v for k, v in summary.items() if k.startswith("before_last")} == approx(
        {"before_last_1": 0.6, "before_last_2": 0.4})
    _, summary = oracle_rows(main_records(), before_last=(3, 4))
    assert summary["before_last_3"] == approx(0.2)  # oracle <= 1: t0 only
    assert "before_last_4" not in summary


# ----------------------------------------------------------------------------- confidence


def test_confidence_rows_hand_checked():
    rows = confidence_rows(main_records())
    r1 = rows[0]
    # layer 1: agree = t0 t2 t3, disagree = t1 t4
    assert r1["layer"] == 1 and r1["share_agree"] == approx(0.6)
    # max_prob [.5 .25 .75 .5 .25]: all 2.25/5; agree (.5+.75+.5)/3; disagree (.25+.25)/2
    assert r1["max_prob"] == approx(0.45)
    assert r1["max_prob_agree"] == approx(1.75 / 3)
    assert r1["max_prob_disagree"] == approx(0.25)
    # gap = max - second = [.25 .125 .625 0 0]: all 1/5; agree .875/3; disagree .125/2
    assert r1["gap"] == approx(0.2)
    assert r1["gap_agree"] == approx(0.875 / 3)
    assert r1["gap_disagree"] == approx(0.0625)
    # entropy [1 2 .5 1.5 3]: all 8/5; agree 3/3; disagree 5/2
    assert r1["entropy"] == approx(1.6)
    assert r1["entropy_agree"] == approx(1.0)
    assert r1["entropy_disagree"] == approx(2.5)
    # p_final [.5 .125 .75 .5 0]: mean 1.875/5 = .375; squared deviations sum .375 -> std sqrt(.075)
    assert r1["p_final"] == approx(0.375)
    assert r1["p_final_std"] == approx(math.sqrt(0.075))
    # layer 2: agree = t0 t1; max_prob [.75 .875 .5 .5 .25]
    r2 = rows[1]
    assert r2["share_agree"] == approx(0.4)
    assert (r2["max_prob"], r2["max_prob_agree"], r2["max_prob_disagree"]) == approx((0.575, 0.8125, 1.25 / 3))
    # the last layer always agrees: every _disagree is None (empty split)
    r4 = rows[3]
    assert r4["share_agree"] == 1.0
    assert r4["max_prob_disagree"] is None and r4["gap_disagree"] is None and r4["entropy_disagree"] is None
    assert (r4["max_prob_agree"], r4["gap_agree"], r4["entropy_agree"]) == approx((1.0, 1.0, 0.0))
    assert (r4["p_final"], r4["p_final_std"]) == approx((1.0, 0.0))


def test_confidence_rows_empty_agree_split_is_none():
    # layer 1 disagrees with the last layer on every token
    rows = confidence_rows(make_records([[0, 0], [1, 1]]))
    assert rows[0]["share_agree"] == 0.0
    assert rows[0]["max_prob_agree"] is None and rows[0]["gap_agree"] is None and rows[0]["entropy_agree"] is None
    assert rows[0]["max_prob_disagree"] == approx(0.5)


# ----------------------------------------------------------------------------- gating
#
# softmax_max scores = MAX_PROB, min_exit_layer 1 (exit at the first layer with score >= threshold, else 4):
#   thr 0.5: exits [1, 2, 1, 1, 3]; at exit preds [7, 8, 9, 5, 3] vs final [7, 8, 9, 5, 6] -> consistency 4/5
#            vs oracle [1, 2, 3, 4, 4]: early t2 t3 t4, exact t0 t1; mean 8/5
#   thr 0.7: exits [2, 2, 1, 4, 4]; t2 exits at 1 (top-1 = final there) -> consistency 1
#            early t2, exact t1 t3 t4, late t0; mean 13/5
#   thr 0.9: exits [4, 4, 4, 4, 4]; consistency 1; late t0 t1 t2, exact t3 t4; mean 4
# patience P (fires once P+1 equal top-1 in a row), min_exit_layer 1:
#   P=1: exits [2, 3, 4, 3, 4]; t3 exits at 3 with 3 != 5 -> consistency 4/5; early t3, exact t4, late t0 t1 t2
#   P=2: exits [3, 4, 4, 4, 4]; consistency 1; late t0 t1 t2, exact t3 t4; mean 19/5


def _specs():
    return [
        PolicySpec("max", ExitPolicy("softmax_max", min_exit_layer=1), values=(0.5, 0.7, 0.9)),
        PolicySpec("patience", ExitPolicy("patience", min_exit_layer=1), values=(1, 2)),
    ]


def test_gating_rows_per_threshold():
    rec = main_records()
    oracle = oracle_layers(rec)
    rows, _ = gating_rows(rec.exit_records(), _specs(), oracle)
    got = {(r["policy"], r["threshold"]): r for r in rows}
    assert list(got) == [("max", 0.5), ("max", 0.7), ("max", 0.9), ("patience", 1), ("patience", 2)]
    want = {  # mean exit, consistency, too early, exact, too late
        ("max", 0.5): (1.6, 0.8, 0.6, 0.4, 0.0),
        ("max", 0.7): (2.6, 1.0, 0.2, 0.6, 0.2),
        ("max", 0.9): (4.0, 1.0, 0.0, 0.4, 0.6),
        ("patience", 1): (3.2, 0.8, 0.2, 0.2, 0.6),
        ("patience", 2): (3.8, 1.0, 0.0, 0.4, 0.6),
    }
    for key, (mean, cons, early, exact, late) in want.items():
        r = got[key]
        assert (r["mean_exit_layer"], r["consistency"], r["too_early"], r["exact"], r["too_late"]) == approx(
            (mean, cons, early, exact, late)), key
        assert r["skip_ratio"] == approx(1 - mean / 4), key


def test_gating_summary_best_threshold_and_efficiency():
    rec = main_records()
    oracle = oracle_layers(rec)  # mean 2.8
    _, summary = gating_rows(rec.exit_records(), _specs(), oracle, consistency=0.99)
    mx, pat = summary
    # max: 0.7 and 0.9 reach 0.99; 0.7 exits earlier -> best. eta = (4 - 2.6) / (4 - 2.8) = 7/6 (> 1: t2
    # exits at layer 1, before its oracle layer, yet consistently)
    assert mx["policy"] == "max" and mx["best_threshold"] == 0.7
    assert (mx["mean_exit_layer"], mx["consistency"], mx["oracle_mean_exit_layer"]) == approx((2.6, 1.0, 2.8))
    assert mx["gating_efficiency"] == approx(1.4 / 1.2)
    assert (mx["too_early"], mx["exact"], mx["too_late"]) == approx((0.2, 0.6, 0.2))
    # patience: only P=2 reaches 0.99 -> eta = (4 - 3.8) / 1.2 = 1/6
    assert pat["best_threshold"] == 2
    assert pat["mean_exit_layer"] == approx(3.8)
    assert pat["gating_efficiency"] == approx(0.2 / 1.2)
    # a looser c lets max 0.5 (consistency 0.8) win: eta = (4 - 1.6) / 1.2 = 2; patience 1 (3.2) beats 2 (3.8)
    _, (mx, pat) = gating_rows(rec.exit_records(), _specs(), oracle, consistency=0.8)
    assert mx["best_threshold"] == 0.5 and mx["gating_efficiency"] == approx(2.0)
    assert pat["best_threshold"] == 1 and pat["gating_efficiency"] == approx(0.8 / 1.2)
    # c = 1.0 is reached exactly (consistency 1.0 >= 1.0)
    _, (mx, _) = gating_rows(rec.exit_records(), _specs(), oracle, consistency=1.0)
    assert mx["best_threshold"] == 0.7


def test_gating_no_threshold_reaches_consistency():
    rec = main_records()
    specs = [PolicySpec("max", ExitPolicy("softmax_max", min_exit_layer=1), values=(0.5,)),
             PolicySpec("patience", ExitPolicy("patience", min_exit_layer=1), values=(1,))]
    rows, summary = gating_rows(rec.exit_records(), specs, oracle_layers(rec), consistency=0.99)
    assert len(rows) == 2
    for s in summary:
        assert s["best_threshold"] is None
        assert math.isnan(s["mean_exit_layer"]) and math.isnan(s["consistency"])
        assert math.isnan(s["gating_efficiency"])
        assert "too_early" not in s and "exact" not in s and "too_late" not in s
        assert s["oracle_mean_exit_layer"] == approx(2.8)


def test_gating_policy_as_configured_and_min_exit_layer():
    rec = main_records()
    specs = [PolicySpec("max07", ExitPolicy("softmax_max", threshold=0.7, min_exit_layer=1)),
             # min_exit_layer 2: t2 cannot leave at 1; 0.5 at 2 < 0.7, 0.875 at 3 -> exits [2, 2, 3, 4, 4]
             PolicySpec("max07_from2", ExitPolicy("softmax_max", threshold=0.7, min_exit_layer=2))]
    rows, summary = gating_rows(rec.exit_records(), specs, oracle_layers(rec))
    assert [r["threshold"] for r in rows] == [0.7, 0.7]  # as configured
    assert rows[0]["mean_exit_layer"] == approx(2.6)  # same as the 0.7 sweep value
    assert (rows[1]["mean_exit_layer"], rows[1]["consistency"]) == approx((3.0, 1.0))
    assert (rows[1]["too_early"], rows[1]["exact"], rows[1]["too_late"]) == approx((0.0, 0.8, 0.2))
    assert summary[1]["best_threshold"] == 0.7 and summary[1]["mean_exit_layer"] == approx(3.0)
    assert summary[1]["gating_efficiency"] == approx(1.0 / 1.2)


def test_gating_oracle_skips_nothing_is_nan():
    # every token changes its top-1 at the last layer: oracle [2, 2], nothing to skip
    rec = make_records([[0, 0], [1, 1]], top2=[[[0.5, 0.25]] * 2, [[0.75, 0.25]] * 2])
    oracle = oracle_layers(rec)
    assert oracle.tolist() == [2, 2]
    specs = [PolicySpec("max", ExitPolicy("softmax_max", min_exit_layer=1), values=(0.5, 0.9))]
    rows, (s,) = gating_rows(rec.exit_records(), specs, oracle)
    # 0.5 exits everything at 1 (inconsistent), 0.9 at 2 (consistent): best 0.9, but eta has no room
    assert [r["consistency"] for r in rows] == approx([0.0, 1.0])
    assert s["best_threshold"] == 0.9 and s["mean_exit_layer"] == approx(2.0)
    assert math.isnan(s["gating_efficiency"])


def test_efficiency():
    assert efficiency(4, 2.6, 2.8) == approx(1.4 / 1.2)
    assert efficiency(4, 4.0, 1.0) == 0.0  # no saving
    assert efficiency(4, 1.0, 1.0) == 1.0  # as good as the oracle
    assert math.isnan(efficiency(4, 3.0, 4.0))  # the oracle skips nothing
    assert math.isnan(efficiency(4, 3.0, 4.5))


# ----------------------------------------------------------------------------- saturation
#
# per token (threshold 0.9, inner rows s_1..s_3):
#   t0 .95 .97 .99 -> first 1, similar 3, mean .97;  row0 .5 < ... < 1: monotonic_0 = 1
#   t1 .3 .92 .91  -> first 2, similar 2, mean 2.13/3; .92 > .91: monotonic_0 = 0
#   t2 .2 .4 .6    -> first 4 (none), similar 0, mean .4; monotonic_0 = 1
#   t3 .6 .5 .95   -> first 3, similar 1, mean 2.05/3; row 0 unknown: monotonic_0 NaN
#   t4 .1 .2 .3    -> first 4, similar 0, mean .2; row0 .05 < .1: monotonic_0 = 1
# order by mean: t0 (.97) t1 (.71) t3 (.683) t2 (.4) t4 (.2)


def test_token_saturation_hand_checked():
    per = token_saturation(torch.tensor(COS), starts=(0, 1, 3, 4, 8))
    assert per["first_similar"].tolist() == [1, 2, 4, 3, 4]
    assert per["similar_states"].tolist() == [3, 2, 0, 1, 0]
    assert per["mean"].tolist() == approx([0.97, 2.13 / 3, 0.4, 2.05 / 3, 0.2])
    m0 = per["monotonic_0"]
    assert math.isnan(m0[3]) and [m0[i].item() for i in (0, 1, 2, 4)] == [1.0, 0.0, 1.0, 1.0]
    # from layer 1: t3 .6 > .5 -> 0 (row 0 not needed, so known)
    assert per["monotonic_1"].tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert per["monotonic_3"].tolist() == [1.0] * 5  # s_3 < s_4 = 1 everywhere
    assert per["monotonic_4"].isnan().all() and per["monotonic_8"].isnan().all()  # k >= L


def test_token_saturation_threshold_edges():
    # a similarity exactly at the threshold counts; s_L (= 1) never counts as a "similar" inner layer
    cos = torch.tensor([[0.0, 0.0], [0.9, 0.1], [0.5, 0.2], [1.0, 1.0]])
    per = token_saturation(cos)  # L = 3, inner rows 1..2
    assert per["first_similar"].tolist() == [1, 3]
    assert per["similar_states"].tolist() == [1, 0]
    assert "monotonic_4" in per and per["monotonic_4"].isnan().all()
    # L = 1: the only row is s_L
    one = token_saturation(torch.tensor([[0.2], [1.0]]))
    assert one["first_similar"].tolist() == [1] and one["mean"].tolist() == [1.0]
    assert one["similar_states"].tolist() == [0]  # no layer i < L to count (was 1: s_L itself)
    assert math.isnan(one["monotonic_4"][0]) and one["monotonic_0"].tolist() == [1.0]


def test_saturation_rows_sets_and_layers():
    rec = main_records()
    table, layers = saturation_rows(rec, torch.tensor(ORACLE), set_size=2)
    by = {r["set"]: r for r in table}
    assert list(by) == ["easy", "difficult", "all"]
    # easy = t0 t1, difficult = t2 t4 (lowest means), all = 5 tokens; positions [1, 2, 3, 1, 2]
    easy, hard, everyone = by["easy"], by["difficult"], by["all"]
    assert (easy["tokens"], hard["tokens"], everyone["tokens"]) == (2, 2, 5)
    assert (easy["first_similar"], easy["first_similar_std"]) == approx((1.5, 0.5))
    assert (easy["similar_states"], easy["similar_states_std"]) == approx((2.5, 0.5))
    assert (easy["length"], easy["length_std"]) == approx((1.5, 0.5))  # positions 1, 2
    assert (hard["first_similar"], hard["first_similar_std"], hard["similar_states"]) == approx((4.0, 0.0, 0.0))
    assert (hard["length"], hard["length_std"]) == approx((2.5, 0.5))  # positions 3, 2
    # all: first [1 2 4 3 4] mean 2.8, squared deviations 6.8 -> std sqrt(1.36); similar [3 2 0 1 0] -> 1.2
    assert (everyone["first_similar"], everyone["first_similar_std"]) == approx((2.8, math.sqrt(1.36)))
    assert everyone["similar_states"] == approx(1.2)
    assert everyone["length"] == approx(9 / 5)
    # monotonic_0: easy (1, 0); difficult (1, 1); all ignores t3's NaN -> (1 0 1 1)/4
    assert (easy["monotonic_0"], hard["monotonic_0"], everyone["monotonic_0"]) == approx((0.5, 1.0, 0.75))
    # L = 4: from layers 4 and 8 nothing is known
    assert easy["monotonic_4"] is None and everyone["monotonic_8"] is None

    assert [r["layer"] for r in layers] == [0, 1, 2, 3, 4]
    l0, l1 = layers[0], layers[1]
    # row 0: easy (.5 + .2)/2; difficult (.1 + .05)/2; all skips t3's NaN: .85/4
    assert (l0["similarity_easy"], l0["similarity_difficult"], l0["similarity_all"]) == approx((0.35, 0.075, 0.2125))
    assert l0["top1_stability"] is None
    # row 1: easy (.95 + .3)/2; difficult (.2 + .1)/2; all 2.15/5
    assert (l1["similarity_easy"], l1["similarity_difficult"], l1["similarity_all"]) == approx((0.625, 0.15, 0.43))
    # top-1 stability = share with oracle <= layer: oracle [1 2 3 4 4]
    assert [r["top1_stability"] for r in layers[1:]] == approx([0.2, 0.4, 0.6, 1.0])
    assert layers[4]["similarity_all"] == approx(1.0)


def test_saturation_rows_default_set_size_and_unknown_row0():
    cos = [[NAN] * 5] + COS[1:]
    table, layers = saturation_rows(main_records(cos_final=cos), torch.tensor(ORACLE))
    by = {r["set"]: r for r in table}
    # default size max(1, min(1000, 5 // 4)) = 1: easy = t0, difficult = t4
    assert (by["easy"]["tokens"], by["difficult"]["tokens"], by["all"]["tokens"]) == (1, 1, 5)
    assert (by["easy"]["first_similar"], by["easy"]["similar_states"], by["easy"]["length"]) == approx((1, 3, 1))
    assert (by["difficult"]["first_similar"], by["difficult"]["similar_states"], by["difficult"]["length"]) == approx(
        (4, 0, 2))
    # row 0 unknown everywhere: no monotonic_0 and no layer-0 similarity
    assert all(r["monotonic_0"] is None for r in table)
    assert layers[0]["similarity_easy"] is None and layers[0]["similarity_all"] is None
    assert layers[1]["similarity_easy"] == approx(0.95) and layers[1]["similarity_difficult"] == approx(0.1)


# ----------------------------------------------------------------------------- sub-word


def test_piece_convention():
    assert piece_convention(["▁The", "▁un", "believ", "able", "▁cat", "."]) == "sentencepiece"
    assert piece_convention(["The", "Ġun", "bel", "Ġcat", "!"]) == "bpe"
    assert piece_convention(["[CLS]", "the", "##believ", "##able", "cat"]) == "wordpiece"
    # the marker most pieces carry wins
    assert piece_convention(["▁a", "Ġb", "Ġc", "##d"]) == "bpe"


def test_piece_classes_sentencepiece():
    pieces = ["▁The", "▁un", "believ", "able", "▁cat", ".", "</s>"]
    assert piece_classes(pieces, [0] * 7, "sentencepiece", special=["</s>", "<pad>"]) == [
        "whole_word", "word_initial", "continuation", "continuation", "whole_word", "punctuation", "special"]
    # without the special list "</s>" has letters and no marker: a continuation (of the "." before it;
    # "▁cat" is still whole, since only the piece right after a word start decides a split)
    assert piece_classes(pieces, [0] * 7, "sentencepiece")[4:] == ["whole_word", "punctuation", "continuation"]
    # a special piece right after a word start does not split that word
    assert piece_classes(["▁cat", "</s>"], [0, 0], "sentencepiece", special=["</s>"]) == ["whole_word", "special"]


def test_piece_classes_bpe():
    # "The" opens its sequence without Ġ: it starts a word
    pieces = ["The", "Ġun", "bel", "ievable", "Ġcat", "!", "Th", "ere", "Ġis"]
    seq = [0, 0, 0, 0, 0, 0, 1, 1, 1]
    assert piece_classes(pieces, seq, "bpe") == [
        "whole_word", "word_initial", "continuation", "continuation", "whole_word", "punctuation",
        "word_initial", "continuation", "whole_word"]


def test_piece_classes_whitespace_and_brackets_bound_words():
    # byte-level BPE: "Hello world\nThe cat sat." -- the newline piece is whitespace and the word after it
    # starts a word (it used to be a "continuation", and "Ġworld" before it "word_initial")
    pieces = ["Hello", "Ġworld", "Ċ", "The", "Ġcat", "Ġsat", "."]
    assert piece_classes(pieces, [0] * 7, "bpe") == [
        "whole_word", "whole_word", "punctuation", "whole_word", "whole_word", "whole_word", "punctuation"]
    # "The (cat) sat": a lone space piece and "(" that starts a word: "cat" starts the word
    assert piece_classes(["The", "Ġ", "(", "cat", ")", "Ġsat"], [0] * 6, "bpe") == [
        "whole_word", "punctuation", "punctuation", "whole_word", "punctuation", "whole_word"]
    assert piece_classes(["The", "Ġ(", "cat", "Ġun", "real"], [0] * 5, "bpe") == [
        "whole_word", "punctuation", "whole_word", "word_initial", "continuation"]
    # punctuation inside a word does not start one: "don't" = "Ġdon" "'" "t"
    assert piece_classes(["Ġdon", "'", "t"], [0] * 3, "bpe") == ["whole_word", "punctuation", "continuation"]
    # SentencePiece byte fallback: <0x0A> is a newline
    assert piece_classes(["▁Hello", "<0x0A>", "World", "</s>"], [0] * 4, "sentencepiece", special=["</s>"]) == [
        "whole_word", "punctuation", "whole_word", "special"]
    # pieces of one multi-byte character (byte BPE) stay word pieces: "Ġä" + "¸" "Ń" of 中
    assert piece_classes(["Ġä", "¸Ń"], [0, 0], "bpe") == ["word_initial", "continuation"]


def test_piece_classes_wordpiece():
    pieces = ["[CLS]", "the", "un", "##believ", "##able", "cat", ".", "##.", "[SEP]"]
    assert piece_classes(pieces, [0] * 9, "wordpiece", special={"[CLS]", "[SEP]"}) == [
        "special", "whole_word", "word_initial", "continuation", "continuation", "whole_word", "punctuation",
        "punctuation", "special"]


def test_piece_classes_sequence_boundaries():
    # "b" continues "▁a" inside sequence 0; "c" opens sequence 1 so it starts a word (and "▁d" another)
    assert piece_classes(["▁a", "b", "c", "▁d"], [0, 0, 1, 1], "sentencepiece") == [
        "word_initial", "continuation", "whole_word", "whole_word"]
    # "▁a" is not split by the next sequence's continuation-looking "b"; "b" + "c" is a split word
    assert piece_classes(["▁a", "b", "c"], [0, 1, 1], "sentencepiece") == [
        "whole_word", "word_initial", "continuation"]
    # wordpiece: "##able" opening a sequence starts a word
    assert piece_classes(["un", "##able", "##able"], [0, 1, 1], "wordpiece") == [
        "whole_word", "word_initial", "continuation"]


def test_subword_rows_hand_checked():
    classes = ["whole_word", "word_initial", "continuation", "continuation", "whole_word", "punctuation", "special"]
    oracle = torch.tensor([2, 4, 1, 3, 1, 1, 4])
    rows = subword_rows(classes, oracle, num_layers=4)
    assert [r["piece"] for r in rows] == ["whole_word", "word_initial", "continuation", "punctuation", "special"]
    got = {r["piece"]: r for r in rows}
    # whole_word: oracle 2, 1 -> mean 1.5, std .5, both < 4
    assert (got["whole_word"]["tokens"], got["whole_word"]["share"]) == (2, approx(2 / 7))
    assert (got["whole_word"]["mean_oracle_layer"], got["whole_word"]["mean_oracle_layer_std"]) == approx((1.5, 0.5))
    assert got["whole_word"]["can_exit"] == 1.0
    # word_initial: 4 -> cannot exit early
    assert (got["word_initial"]["mean_oracle_layer"], got["word_initial"]["can_exit"]) == approx((4.0, 0.0))
    # continuation: 1, 3 -> mean 2, std 1
    assert (got["continuation"]["mean_oracle_layer"], got["continuation"]["mean_oracle_layer_std"]) == approx((2, 1))
    assert got["special"]["can_exit"] == 0.0 and got["punctuation"]["can_exit"] == 1.0
    # absent classes give no row; can_exit is a share
    rows = subword_rows(["continuation", "word_initial", "continuation"], torch.tensor([4, 2, 2]), num_layers=4)
    assert [r["piece"] for r in rows] == ["word_initial", "continuation"]
    assert rows[1]["can_exit"] == approx(0.5) and rows[1]["share"] == approx(2 / 3)


def test_tokenizer_classes_with_tiny_tokenizers():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "the": 4, "un": 5, "##believ": 6, "##able": 7,
             "cat": 8, ".": 9}
    wp = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordPiece(vocab, unk_token="[UNK]")),
                                 unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]")
    ids = [2, 4, 5, 6, 7, 8, 9, 3, 6, 8]  # ... [SEP] | ##believ cat (a new sequence)
    seq = [0] * 8 + [1, 1]
    assert tokenizer_classes(wp, ids, seq) == [
        "special", "whole_word", "word_initial", "continuation", "continuation", "whole_word", "punctuation",
        "special", "whole_word", "whole_word"]

    vocab = {"<|endoftext|>": 0, "The": 1, "Ġun": 2, "bel": 3, "ievable": 4, "Ġcat": 5, "!": 6}
    bpe = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab, [])), eos_token="<|endoftext|>")
    assert tokenizer_classes(bpe, [1, 2, 3, 4, 5, 6, 0], [0] * 7) == [
        "whole_word", "word_initial", "continuation", "continuation", "whole_word", "punctuation", "special"]


# ----------------------------------------------------------------------------- sub-layer


def test_sublayer_rows_hand_checked():
    def t(rows):  # (L=2, N=2, 3) from [layer][token][stat]
        return torch.tensor(rows, dtype=torch.float32)

    sub = {
        "attention.stream": t([[[1, 0.5, 1.0], [0, 0.3, 0.8]], [[1, 1, 1], [1, 0.9, 0.7]]]),
        "attention.output": t([[[0, 0.1, 0.2], [0, 0.3, 0.0]], [[1, 0.2, 0.0], [0, 0.4, 0.2]]]),
        "mlp.stream": t([[[1, 0.7, 0.9], [1, 0.5, 0.9]], [[1, 1, 1], [1, 1, 1]]]),
        "mlp.output": t([[[0, 0, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]]]),
    }
    rows = sublayer_rows(make_records([[0, 0], [0, 0]], sublayer=sub))
    # per layer the sub-layers in block order, each stream then its module output
    assert [(r["layer"], r["sublayer"], r["kind"]) for r in rows] == [
        (1, "attention", "stream"), (1, "attention", "output"), (1, "mlp", "stream"), (1, "mlp", "output"),
        (2, "attention", "stream"), (2, "attention", "output"), (2, "mlp", "stream"), (2, "mlp", "output")]
    got = {(r["layer"], r["sublayer"], r["kind"]): (r["top1_final"], r["topk_final"], r["topk_before"]) for r in rows}
    # means over the 2 tokens, e.g. layer 1 attention stream: (1+0)/2, (.5+.3)/2, (1+.8)/2
    assert got[(1, "attention", "stream")] == approx((0.5, 0.4, 0.9))
    assert got[(2, "attention", "stream")] == approx((1.0, 0.95, 0.85))
    assert got[(1, "attention", "output")] == approx((0.0, 0.2, 0.1))
    assert got[(2, "attention", "output")] == approx((0.5, 0.3, 0.1))
    assert got[(1, "mlp", "stream")] == approx((1.0, 0.6, 0.9))
    assert got[(2, "mlp", "output")] == approx((0.0, 0.0, 0.0))
    # dotted sub-layer names keep everything before the last dot
    rows = sublayer_rows(make_records([[0], [0]], sublayer={"cross.attention.output": torch.ones(2, 1, 3)}))
    assert {(r["sublayer"], r["kind"]) for r in rows} == {("cross.attention", "output")}
    assert sublayer_rows(make_records([[0], [0]])) == []


# ----------------------------------------------------------------------------- suitability


def test_ee_score_hand_checked():
    # L = 3: w = 2/3, 1/3 -> (2/3 * .5 + 1/3 * .8) / 1 = .6
    assert ee_score([0.5, 0.8, 1.0]) == approx(0.6)
    # L = 2: w = 1/2 -> S_1
    assert ee_score([0.2, 1.0]) == approx(0.2)
    # L = 4: w = 3/4, 2/4, 1/4 (sum 1.5): (.1875 + .25 + .1875) / 1.5
    assert ee_score([0.25, 0.5, 0.75, 1.0]) == approx(0.625 / 1.5)
    # S_L is not used; L = 1 has nothing to weight
    assert ee_score([0.5, 0.8, 0.0]) == approx(0.6)
    assert math.isnan(ee_score([1.0]))


def test_suitability_rows_ranking_and_relative_score():
    models = {
        "ref": {"similarity": [0.5, 0.8, 1.0], "num_layers": 3, "skip_ratio": 0.2, "skip_policy": "softmax_max",
                "oracle_mean_exit_layer": 1.5},
        "better": {"similarity": [0.9, 0.95, 1.0], "num_layers": 3, "oracle_mean_exit_layer": 2.4},
        "worse": {"similarity": [0.2, 1.0], "num_layers": 2, "skip_ratio": 0.0, "oracle_mean_exit_layer": 2.0},
        "single": {"similarity": [1.0], "num_layers": 1, "oracle_mean_exit_layer": 1.0},
    }
    rows = suitability_rows(models)
    # scores: ref .6; better 2/3*.9 + 1/3*.95 = .91667; worse .2; single NaN (ranked last)
    assert [r["model"] for r in rows] == ["better", "ref", "worse", "single"]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    got = {r["model"]: r for r in rows}
    better = 2 / 3 * 0.9 + 1 / 3 * 0.95
    assert got["better"]["ee_score"] == approx(better)
    assert got["better"]["relative_score"] == approx(better / 0.6)
    assert got["ref"]["relative_score"] == approx(1.0)
    assert got["worse"]["relative_score"] == approx(1 / 3)
    assert math.isnan(got["single"]["ee_score"]) and math.isnan(got["single"]["relative_score"])
    # oracle_skip = 1 - oracle mean / L
    assert [got[m]["oracle_skip"] for m in ("ref", "better", "worse", "single")] == approx([0.5, 0.2, 0.0, 0.0])
    assert (got["ref"]["skip_ratio"], got["ref"]["skip_policy"]) == (0.2, "softmax_max")
    assert math.isnan(got["better"]["skip_ratio"]) and got["better"]["skip_policy"] is None
    assert got["worse"]["num_layers"] == 2


def test_suitability_reference_without_a_score():
    # a reference scoring 0 (or NaN) gives no relative scores
    zero = suitability_rows({"ref": {"similarity": [0.0, 1.0], "num_layers": 2, "oracle_mean_exit_layer": 2.0},
                             "b": {"similarity": [0.5, 1.0], "num_layers": 2, "oracle_mean_exit_layer": 1.0}})
    assert [r["model"] for r in zero] == ["b", "ref"]
    assert all(math.isnan(r["relative_score"]) for r in zero)
    nan = suitability_rows({"ref": {"similarity": [1.0], "num_layers": 1, "oracle_mean_exit_layer": 1.0},
                            "b": {"similarity": [0.5, 1.0], "num_layers": 2, "oracle_mean_exit_layer": 1.0}})
    assert [r["model"] for r in nan] == ["b", "ref"]
    assert all(math.isnan(r["relative_score"]) for r in nan)


def test_oracle_median_of_an_even_count_is_the_midpoint():
    # final top-1 [1, 2, 3, 4]; token k first agrees (and stays) from layer k + 1 -> oracle 1, 2, 3, 4
    preds = [[1, 0, 0, 0], [1, 2, 0, 0], [1, 2, 3, 0], [1, 2, 3, 4]]
    _, summary = oracle_rows(make_records(preds))
    assert summary["mean"] == 2.5 and summary["median"] == 2.5
