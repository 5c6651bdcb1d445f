"""FREE's adaptive threshold estimator: hand-checked Beta fits, posteriors and grid thresholds."""

from __future__ import annotations

import pytest
import torch

from eetrain.errors import ConfigError
from eetrain.exits.beta_mixture import (
    BetaMixture,
    agreement_pairs,
    agreement_posterior,
    beta_log_pdf,
    beta_moments,
    check_adaptive_policy,
    estimate_threshold,
    fit_beta_mixture,
    mixture_threshold,
)
from eetrain.exits.measures import ExitRecords
from eetrain.exits.policy import ExitPolicy

GRID = [0.3 + 0.6 * i / 9 for i in range(10)]  # FREE's np.linspace(0.3, 0.9, 10)


def test_method_of_moments_hand_checked():
    assert GRID[3] == pytest.approx(0.5) and GRID[2] == pytest.approx(0.3 + 0.6 * 2 / 9)
    # mean 0.4, population variance (0.04 + 0 + 0.04) / 3 = 0.08/3: alpha = 0.4 (0.24 / (0.08/3) - 1) = 3.2
    a, b = beta_moments(torch.tensor([0.2, 0.4, 0.6]))
    assert a == pytest.approx(3.2) and b == pytest.approx(4.8)  # beta = alpha (1 - m) / m
    assert beta_moments(torch.tensor([0.5])) is None  # one sample
    assert beta_moments(torch.tensor([0.3, 0.3, 0.3])) is None  # no spread


def test_beta_density_hand_checked():
    # Beta(2, 2) = 6 x (1 - x): 1.5 at 0.5; Beta(2, 1) = 2x: 0.5 at 0.25; Beta(1, 1) = 1
    x = torch.tensor([0.5, 0.25])
    assert beta_log_pdf(x[:1], 2.0, 2.0).exp().item() == pytest.approx(1.5)
    assert beta_log_pdf(x[1:], 2.0, 1.0).exp().item() == pytest.approx(0.5)
    assert beta_log_pdf(x, 1.0, 1.0).exp().tolist() == pytest.approx([1.0, 1.0])


def test_posterior_and_threshold_hand_checked():
    # agree ~ Beta(2, 1) (density 2c), disagree ~ Beta(1, 2) (2 (1 - c)): with equal priors P(agree | c) = c
    mix = BetaMixture(alpha=(1.0, 2.0), beta=(2.0, 1.0), prior=(0.5, 0.5))
    c = torch.tensor([0.1, 0.5, 0.8])
    assert agreement_posterior(mix, c).tolist() == pytest.approx([0.1, 0.5, 0.8])
    # zeta 0.4: the grid's points from 0.4333 on pass -> 0.4333 (FREE's count: 8 pass, index 10 - 8 = 2)
    assert mixture_threshold(mix) == pytest.approx(GRID[2])
    assert mixture_threshold(mix, zeta=0.85) == pytest.approx(GRID[9])  # only 0.9 passes
    assert mixture_threshold(mix, zeta=0.95) == pytest.approx(0.9)  # none: the top of the grid
    assert mixture_threshold(mix, zeta=0.2) == pytest.approx(0.3)  # all
    # with 80 % agreeing a priori: 0.8c / (0.8c + 0.2 (1 - c)) >= 0.4 from c = 1/7 on: every grid point
    prior = BetaMixture(alpha=(1.0, 2.0), beta=(2.0, 1.0), prior=(0.2, 0.8))
    assert agreement_posterior(prior, torch.tensor([0.5])).item() == pytest.approx(0.8)
    assert mixture_threshold(prior) == pytest.approx(0.3)
    # a posterior that falls again at the top: the threshold starts the top run of passing points
    bump = BetaMixture(alpha=(2.0, 6.0), beta=(2.0, 6.0), prior=(0.5, 0.5))  # agree peaked at 0.5
    passing = agreement_posterior(bump, torch.tensor(GRID, dtype=torch.float64)) >= 0.4
    assert passing.any() and not passing[-1]
    assert mixture_threshold(bump) == pytest.approx(0.9)


def test_fit_recovers_the_classes_and_the_threshold():
    torch.manual_seed(0)
    agree_c = torch.distributions.Beta(torch.tensor(5.0), torch.tensor(2.0)).sample((4000,))
    disagree_c = torch.distributions.Beta(torch.tensor(2.0), torch.tensor(5.0)).sample((1000,))
    conf = torch.cat([agree_c, disagree_c])
    agree = torch.cat([torch.ones(4000, dtype=torch.bool), torch.zeros(1000, dtype=torch.bool)])
    mix = fit_beta_mixture(conf, agree)
    assert mix.alpha == pytest.approx((2.0, 5.0), rel=0.12) and mix.beta == pytest.approx((5.0, 2.0), rel=0.12)
    assert mix.prior == (0.5, 0.5)
    assert fit_beta_mixture(conf, agree, prior="empirical").prior == pytest.approx((0.2, 0.8))
    # true posterior with equal priors: c^3 / (c^3 + (1-c)^3) >= 0.4 from c ~ 0.466 on -> grid point 0.5
    assert estimate_threshold(conf, agree) == pytest.approx(GRID[3])
    # the empirical prior (4:1 agreeing) lowers it
    assert estimate_threshold(conf, agree, prior="empirical") < GRID[3]
    with pytest.raises(ValueError, match="prior='flat'; allowed: equal, empirical"):
        fit_beta_mixture(conf, agree, prior="flat")


def test_degenerate_pairs():
    conf = torch.tensor([0.2, 0.5, 0.9])
    assert estimate_threshold(conf, torch.tensor([True, True, True])) == 0.3  # every exit agrees: the lowest
    assert estimate_threshold(conf, torch.tensor([False, False, False])) == 0.9  # none does: the highest
    assert estimate_threshold(conf, torch.tensor([True, True, False])) is None  # one disagreement: no fit yet
    # confidences at exactly 0 and 1 are clipped (a Beta density is 0 or infinite there), as in FREE's code
    ends = estimate_threshold(torch.tensor([0.0, 0.1, 0.9, 1.0]), torch.tensor([False, False, True, True]))
    assert 0.3 <= ends <= 0.9


def test_agreement_pairs_hand_checked():
    # L = 3 layers, 2 tokens: softmax_max = top-1 probability; predictions per layer
    top2 = torch.tensor([[[0.5, 0.1], [0.6, 0.2]],
                         [[0.7, 0.1], [0.3, 0.2]],
                         [[0.9, 0.05], [0.8, 0.1]]])
    preds = torch.tensor([[4, 7], [5, 9], [5, 8]])
    records = ExitRecords(top2=top2, predictions=preds)
    conf, agree = agreement_pairs(ExitPolicy("softmax_max", 0.5, min_exit_layer=1), records)
    # checks at layers 1 and 2 (never at L), token by token
    assert conf.tolist() == pytest.approx([0.5, 0.7, 0.6, 0.3])
    assert agree.tolist() == [False, True, False, False]
    # decoded exits at layers 1 and 3: the first token was checked at layer 1 only
    conf, agree = agreement_pairs(ExitPolicy("softmax_max", 0.5, min_exit_layer=1), records, torch.tensor([1, 3]))
    assert conf.tolist() == pytest.approx([0.5, 0.6, 0.3]) and agree.tolist() == [False, False, False]
    conf, agree = agreement_pairs(ExitPolicy("softmax_max", 0.5, min_exit_layer=2), records)
    assert conf.tolist() == pytest.approx([0.7, 0.3]) and agree.tolist() == [True, False]
    conf, _ = agreement_pairs(ExitPolicy("softmax_gap", 0.5, min_exit_layer=1, exit_points=(1, 3)), records)
    assert conf.tolist() == pytest.approx([0.4, 0.4])  # only layer 1 carries an exit below L


def test_only_confidences_in_the_unit_interval():
    check_adaptive_policy(ExitPolicy("softmax_gap", 0.9), "decoding.adaptive_threshold")
    with pytest.raises(ConfigError, match=r"decoding.adaptive_threshold: .* measure 'hidden_saturation' is not one "
                                          r"\(allowed: .*softmax_gap"):
        check_adaptive_policy(ExitPolicy("hidden_saturation", 0.9), "decoding.adaptive_threshold")
    with pytest.raises(ConfigError, match=r"measure 'patience' is not one"):
        check_adaptive_policy(ExitPolicy("patience", measure_kwargs={"patience": 2}), "decoding.adaptive_threshold")
    with pytest.raises(ConfigError, match=r"decodes without one \(full model or self_speculative\)"):
        check_adaptive_policy(None, "decoding.adaptive_threshold")
