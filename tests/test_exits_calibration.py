"""Tests for eetrain.exits.calibration (Learn-then-Test)."""

from __future__ import annotations

import math

import pytest
import torch

from eetrain.exits.calibration import (
    bentkus_pvalue,
    binomial_cdf,
    calibrate_threshold,
    consistency_risk,
    hoeffding_bentkus_pvalue,
    hoeffding_bentkus_quadratic_pvalue,
    hoeffding_kl_pvalue,
    hoeffding_pvalue,
    ltt_scan,
    make_risk_fn,
    task_risk,
)
from eetrain.exits.measures import ExitRecords
from eetrain.exits.policy import ExitPolicy, exit_layers

CANDIDATES = [round(1.0 - i / 100, 2) for i in range(101)]  # 1.00, 0.99, ..., 0.00


def test_hoeffding_pvalue_by_hand() -> None:
    # exp(-2 * 100 * 0.05^2) = exp(-0.5) = 0.606531
    assert hoeffding_pvalue(0.05, 0.1, 100) == pytest.approx(math.exp(-0.5))
    assert hoeffding_pvalue(0.0, 0.1, 1000) == pytest.approx(math.exp(-20.0))
    assert hoeffding_pvalue(0.1, 0.1, 100) == 1.0  # (delta - r)_+ = 0
    assert hoeffding_pvalue(0.3, 0.1, 100) == 1.0


def test_binomial_cdf_and_bentkus_by_hand() -> None:
    # P(Binom(10, 0.5) <= 2) = (1 + 10 + 45) / 1024
    assert binomial_cdf(2, 10, 0.5) == pytest.approx(56 / 1024, rel=1e-12)
    for k in (0, 3, 7, 12):
        brute = sum(math.comb(20, j) * 0.3**j * 0.7 ** (20 - j) for j in range(min(k, 20) + 1))
        assert binomial_cdf(k, 20, 0.3) == pytest.approx(brute, rel=1e-10)
    assert binomial_cdf(-1, 20, 0.3) == 0.0
    # large n stays finite and accurate (no overflow of comb): median of Binom(2000, 0.1) ~ 200
    assert 0.45 < binomial_cdf(200, 2000, 0.1) < 0.55
    # Bentkus: e * P(Binom(10, 0.5) <= ceil(10 * 0.2) = 2) = e * 0.0546875 = 0.148656
    assert bentkus_pvalue(0.2, 0.5, 10) == pytest.approx(math.e * 56 / 1024)
    assert bentkus_pvalue(0.2, 0.5, 10) == pytest.approx(0.148656, abs=1e-6)
    # ceil(n * risk_hat) with floating noise: 0.1 + 0.2 = 0.30000000000000004 -> k = 3, not 4
    assert bentkus_pvalue(0.1 + 0.2, 0.5, 10) == pytest.approx(math.e * binomial_cdf(3, 10, 0.5))
    # the quadratic Hoeffding-Bentkus (an explicit option now) is the minimum of the two
    for r, d, n in [(0.2, 0.5, 10), (0.05, 0.1, 100), (0.08, 0.1, 2000), (0.0, 0.1, 30)]:
        hb = hoeffding_bentkus_quadratic_pvalue(r, d, n)
        assert hb == pytest.approx(min(hoeffding_pvalue(r, d, n), bentkus_pvalue(r, d, n)))
    assert bentkus_pvalue(0.08, 0.1, 2000) < hoeffding_pvalue(0.08, 0.1, 2000)  # Bentkus tighter here


def test_hoeffding_bentkus_is_ltts_relative_entropy_form_by_hand() -> None:
    # r = 0.02, delta = 0.05, n = 50 (checked with math.log / math.comb):
    # KL(0.02 || 0.05) = 0.02 ln(0.4) + 0.98 ln(0.98 / 0.95) = -0.0183258 + 0.0304688 = 0.0121430
    # exp(-50 * 0.0121430) = exp(-0.607148) = 0.544903
    # Bentkus: e * P(Binom(50, 0.05) <= ceil(50 * 0.02) = 1) = e * (0.95^50 + 50 * 0.05 * 0.95^49)
    #        = e * (0.076945 + 0.202487) = e * 0.279432 = 0.759574  -> the minimum is 0.5449
    assert hoeffding_kl_pvalue(0.02, 0.05, 50) == pytest.approx(0.544903, abs=1e-6)
    assert hoeffding_bentkus_pvalue(0.02, 0.05, 50) == pytest.approx(0.5449, abs=5e-5)
    assert bentkus_pvalue(0.02, 0.05, 50) == pytest.approx(0.759574, abs=1e-6)
    # the old quadratic form would give min(exp(-2 * 50 * 0.03^2) = exp(-0.09) = 0.913931, 0.759574)
    assert hoeffding_bentkus_quadratic_pvalue(0.02, 0.05, 50) == pytest.approx(0.759574, abs=1e-6)
    # r = 0: KL(0 || delta) = -ln(1 - delta), so the bound is (1 - delta)^n: 0.9^30 = 0.0423912 (< Bentkus 0.1152)
    assert hoeffding_bentkus_pvalue(0.0, 0.1, 30) == pytest.approx(0.9**30, rel=1e-12)
    # r = 0.2, delta = 0.5, n = 10: exp(-10 (0.2 ln 0.4 + 0.8 ln 1.6)) = exp(-1.927448) = 0.145519
    # (< Bentkus e * 56 / 1024 = 0.148656)
    assert hoeffding_bentkus_pvalue(0.2, 0.5, 10) == pytest.approx(0.145519, abs=1e-6)
    # r = 0.05, delta = 0.1, n = 100: KL form exp(-1.670676) = 0.188125, Bentkus 0.156510 is the minimum
    assert hoeffding_bentkus_pvalue(0.05, 0.1, 100) == pytest.approx(bentkus_pvalue(0.05, 0.1, 100))
    # r >= delta: no evidence against H, p = 1
    assert hoeffding_bentkus_pvalue(0.05, 0.05, 50) == 1.0 and hoeffding_bentkus_pvalue(0.3, 0.1, 100) == 1.0
    # the KL bound is never looser than the quadratic one (Pinsker: KL >= 2 (a - b)^2)
    for r, d, n in [(0.2, 0.5, 10), (0.05, 0.1, 100), (0.08, 0.1, 2000), (0.0, 0.1, 30), (0.01, 0.02, 500)]:
        assert hoeffding_kl_pvalue(r, d, n) <= hoeffding_pvalue(r, d, n) + 1e-15
        assert hoeffding_bentkus_pvalue(r, d, n) <= hoeffding_bentkus_quadratic_pvalue(r, d, n) + 1e-15


def test_pvalue_setting_accepts_the_quadratic_option() -> None:
    from eetrain.config import compose
    from eetrain.errors import ConfigError
    from eetrain.exits.settings import calibration_settings

    assert calibration_settings(compose([])).pvalue == "hoeffding_bentkus"
    cfg = compose(["exit.calibration.pvalue=hoeffding_bentkus_quadratic"])
    assert calibration_settings(cfg).pvalue == "hoeffding_bentkus_quadratic"
    with pytest.raises(ConfigError, match="exit.calibration.pvalue='wilson'; allowed: .*hoeffding_bentkus_quadratic"):
        calibration_settings(compose(["exit.calibration.pvalue=wilson"]))
    # the two forms certify different thresholds on the same risks: 50 examples with risk 0.02
    risks = {1.0: torch.zeros(50), 0.5: torch.tensor([1.0] + [0.0] * 49)}
    assert calibrate_threshold(risks, epsilon=0.6, delta=0.05) == 0.5  # 0.5449 <= 0.6
    assert calibrate_threshold(risks, epsilon=0.6, delta=0.05, pvalue="hoeffding_bentkus_quadratic") == 1.0


def test_pvalue_bad_inputs() -> None:
    for fn in (hoeffding_pvalue, bentkus_pvalue, hoeffding_bentkus_pvalue, hoeffding_bentkus_quadratic_pvalue,
               hoeffding_kl_pvalue):
        with pytest.raises(ValueError, match="delta"):
            fn(0.1, 1.2, 10)
        with pytest.raises(ValueError, match="delta"):
            fn(0.1, 0.0, 10)
        with pytest.raises(ValueError, match="risk_hat"):
            fn(1.5, 0.1, 10)
        with pytest.raises(ValueError, match="n"):
            fn(0.1, 0.1, 0)


def test_calibrate_stops_at_first_failure() -> None:
    zeros, ones = torch.zeros(1000), torch.ones(1000)
    # 1.0 and 0.9 pass, 0.8 fails, 0.7 would pass again but must not be reached
    risks = {0.7: zeros, 1.0: zeros, 0.8: ones, 0.9: zeros}
    assert calibrate_threshold(risks, epsilon=0.05, delta=0.1) == 0.9
    rows = ltt_scan(risks, epsilon=0.05, delta=0.1)
    assert [r["threshold"] for r in rows] == [1.0, 0.9, 0.8]  # tested from the highest, stopped
    assert [r["passed"] for r in rows] == [True, True, False]
    # sequence-of-pairs input, explicit candidates (sorted here)
    pairs = [(0.8, ones), (0.9, zeros), (1.0, zeros)]
    assert calibrate_threshold(pairs, candidates=[0.9, 1.0, 0.8]) == 0.9
    # the first (highest) candidate fails -> None: nothing certified, do not exit early
    assert calibrate_threshold({1.0: ones, 0.5: zeros}) is None
    # everything passes -> the lowest candidate
    assert calibrate_threshold(lambda lam: zeros, candidates=[1.0, 0.5, 0.25]) == 0.25
    # small n cannot certify anything even at zero empirical risk
    assert calibrate_threshold({1.0: torch.zeros(5)}, delta=0.1, epsilon=0.05) is None


def test_calibrate_bad_inputs() -> None:
    risks = {1.0: torch.zeros(10)}
    for eps in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="epsilon"):
            calibrate_threshold(risks, epsilon=eps)
    for delta in (0.0, 1.0, 2.0):
        with pytest.raises(ValueError, match="delta"):
            calibrate_threshold(risks, delta=delta)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        calibrate_threshold({1.0: torch.tensor([0.0, 1.5])})
    with pytest.raises(ValueError, match="no risks"):
        calibrate_threshold(risks, candidates=[1.0, 0.5])
    with pytest.raises(ValueError, match="allowed"):
        calibrate_threshold(risks, pvalue="wilson")  # type: ignore[arg-type]


def _true_risk(lam: float) -> float:
    """Known expected risk, decreasing in the threshold: R(lam) = 0.3 (1 - lam); R <= 0.1 iff lam >= 2/3."""
    return 0.3 * (1.0 - lam)


def test_ltt_guarantee_on_synthetic_risk() -> None:
    epsilon, delta, n, draws = 0.05, 0.1, 2000, 100
    chosen, naive = [], []
    for seed in range(draws):
        u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

        def risk(lam: float, u: torch.Tensor = u) -> torch.Tensor:
            # Bernoulli losses with P(loss = 1) = R(lam), coupled across thresholds (same examples)
            return (u < _true_risk(lam)).double()

        chosen.append(calibrate_threshold(risk, CANDIDATES, epsilon=epsilon, delta=delta))
        naive.append(min(c for c in CANDIDATES if float(risk(c).mean()) <= delta))
    assert all(c is not None for c in chosen)
    violations = sum(_true_risk(c) > delta for c in chosen) / draws
    # the guarantee P(R(chosen) > delta) <= epsilon (plus sampling slack over 200 draws)
    assert violations <= epsilon + 0.03
    # a naive "smallest threshold with empirical risk <= delta" violates it often: the test has teeth
    assert sum(_true_risk(c) > delta for c in naive) / draws > 0.2
    # power: the chosen thresholds are well below 1.0 and close to the true boundary 2/3
    mean_chosen = sum(chosen) / draws
    assert max(chosen) < 0.85
    assert 2 / 3 <= mean_chosen < 0.8


def test_ltt_guarantee_when_risk_jumps_just_above_delta() -> None:
    # R(lam) = 0.05 for lam >= 0.5, then 0.11 (> delta = 0.1) below: only 0.5 and above are safe
    epsilon, delta, n, draws = 0.05, 0.1, 2000, 100
    bad = 0
    for seed in range(draws):
        u = torch.rand(n, generator=torch.Generator().manual_seed(1000 + seed), dtype=torch.float64)
        chosen = calibrate_threshold(
            lambda lam, u=u: (u < (0.05 if lam >= 0.5 else 0.11)).double(),
            CANDIDATES,
            epsilon=epsilon,
            delta=delta,
        )
        assert chosen is not None  # 1.0 .. 0.5 have risk 0.05: certifiable with n = 2000
        bad += chosen < 0.5
    assert bad / draws <= epsilon + 0.03


# ------------------------------------------------------------------------------------------------
# Risks from records
# ------------------------------------------------------------------------------------------------

# predictions (L = 3, N = 5): layer 1 [0 1 2 3 4], layer 2 [0 1 1 3 0], layer 3 [0 2 1 0 0]
PREDS = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 1, 3, 0], [0, 2, 1, 0, 0]])
EXITS = torch.tensor([1, 2, 3, 1, 2])  # at exit [0, 1, 1, 3, 0] vs last [0, 2, 1, 0, 0]


def test_consistency_risk_by_hand() -> None:
    per_token = consistency_risk(EXITS, PREDS)
    assert per_token.tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]
    seq = torch.tensor([0, 0, 1, 1, 1])
    assert consistency_risk(EXITS, PREDS, sequence_ids=seq).tolist() == pytest.approx([0.5, 1 / 3])
    assert consistency_risk(EXITS, PREDS, sequence_ids=seq, reduction="any").tolist() == [1.0, 1.0]
    # -100 labels drop tokens (padding); no label values are used
    labels = torch.tensor([7, -100, 7, 7, 7])
    assert consistency_risk(EXITS, PREDS, labels=labels).tolist() == [0.0, 0.0, 1.0, 0.0]
    assert consistency_risk(EXITS, PREDS, sequence_ids=seq, labels=labels).tolist() == pytest.approx(
        [0.0, 1 / 3]
    )
    with pytest.raises(ValueError, match="reduction"):
        consistency_risk(EXITS, PREDS, sequence_ids=seq, reduction="mean")  # type: ignore[arg-type]


def test_task_risk_by_hand() -> None:
    labels = torch.tensor([0, 1, 2, 0, -100])
    # errors at exit [0, 1, 1, 3, .] vs labels -> [0, 0, 1, 1]; full model [0, 2, 1, 0] -> [0, 1, 1, 0]
    assert task_risk(EXITS, PREDS, labels, relative_to_full=False).tolist() == [0.0, 0.0, 1.0, 1.0]
    # relative to full: (e_exit - e_full)_+ = [0, 0, 0, 1]
    assert task_risk(EXITS, PREDS, labels).tolist() == [0.0, 0.0, 0.0, 1.0]
    seq = torch.tensor([0, 0, 1, 1, 1])
    assert task_risk(EXITS, PREDS, labels, sequence_ids=seq).tolist() == pytest.approx([0.0, 0.5])


def test_make_risk_fn_and_end_to_end_calibration() -> None:
    g = torch.Generator().manual_seed(0)
    L, N, V = 6, 3000, 10  # noqa: N806
    final = torch.randn(N, V, generator=g) * 3
    logits = torch.stack(
        [(i / L) * final + (1 - i / L) * torch.randn(N, V, generator=g) * 3 for i in range(1, L + 1)]
    )
    labels = final.argmax(-1)
    rec = ExitRecords(logits=logits, labels=labels)
    policy = ExitPolicy("softmax_max", min_exit_layer=2)
    risk = make_risk_fn(policy, rec)
    r = risk(0.7)
    ex = exit_layers(policy.with_threshold(0.7), rec)
    assert torch.equal(r, consistency_risk(ex, logits))
    assert float(risk(1.0).mean()) <= float(risk(0.5).mean())
    lam = calibrate_threshold(risk, CANDIDATES, epsilon=0.05, delta=0.1)
    assert lam is not None and lam < 1.0
    assert float(risk(lam).mean()) <= 0.1
    # the task risk needs labels
    assert make_risk_fn(policy, rec, kind="task")(0.5).shape == (N,)
    with pytest.raises(ValueError, match="labels"):
        make_risk_fn(policy, ExitRecords(logits=logits), kind="task")
    # a decaying policy calibrates its base lam and uses the positions
    decay = ExitPolicy("softmax_max", {"lam": 0.9, "N": 20}, min_exit_layer=2)
    positions = torch.arange(N) % 20 + 1
    drisk = make_risk_fn(decay, rec, positions=positions)
    expected_ex = exit_layers(decay.with_threshold({"lam": 0.6, "N": 20}), rec, positions=positions)
    assert torch.equal(drisk(0.6), consistency_risk(expected_ex, logits))


def test_a_boolean_rule_calibrates_its_parameter_by_hand() -> None:
    # 5 layers, 4 one-token sequences (columns); PABEE fires once the argmax stayed unchanged P times
    preds = torch.tensor([[7, 1, 3, 5], [7, 1, 3, 5], [7, 2, 3, 5], [7, 2, 4, 5], [7, 2, 4, 5]])
    rec = ExitRecords(predictions=preds, sequence_ids=torch.arange(4))
    risk = make_risk_fn(ExitPolicy("patience", min_exit_layer=1), rec, sequence_ids=rec.sequence_ids)
    # P=3: exits 4, 5, 5, 4 (all agree with layer 5); P=2: exits 3, 5, 3 (pred 3 != 4), 3;
    # P=1: exits 2, 2 (pred 1 != 2), 2 (3 != 4), 2
    assert risk(3.0).tolist() == [0.0, 0.0, 0.0, 0.0]
    assert risk(2.0).tolist() == [0.0, 0.0, 1.0, 0.0]
    assert risk(1.0).tolist() == [0.0, 1.0, 1.0, 0.0]
    # n = 4, delta = 0.5: risk 0 -> p 0.0625, 0.25 -> min(exp(-4 KL(0.25||0.5)), e * 5/16) = 0.593, 0.5 -> 1
    assert calibrate_threshold(risk, [1, 2, 3], epsilon=0.6, delta=0.5) == 2.0
    assert calibrate_threshold(risk, [1, 2, 3], epsilon=0.5, delta=0.5) == 3.0
    # MEE's monotonic rule: min_confidence from the largest down
    top1 = torch.tensor([[0.2, 0.2], [0.5, 0.3], [0.7, 0.4], [0.9, 0.5]])
    rec = ExitRecords(predictions=torch.tensor([[1, 1], [1, 1], [1, 2], [1, 3]]),
                      top2=torch.stack([top1, torch.zeros_like(top1)], -1))
    risk = make_risk_fn(ExitPolicy("monotonic", min_exit_layer=1), rec)
    assert risk(0.95).tolist() == [0.0, 0.0]  # fires nowhere: both leave at layer 4
    assert risk(0.6).tolist() == [0.0, 0.0]  # token 0 at 3 (0.2 < 0.5 < 0.7 >= 0.6), agreeing with layer 4
    assert risk(0.35).tolist() == [0.0, 1.0]  # token 1 at 3 too (0.2 < 0.3 < 0.4), where it predicts 2, not 3
    assert calibrate_threshold(risk, [0.95, 0.6, 0.35], epsilon=0.5, delta=0.4) == 0.6
