"""Tests for eetrain.exits.classifiers."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from eetrain.exits.classifiers import (
    CalmClassifier,
    LSTMClassifier,
    ThreeStateMLP,
    class_balanced_cross_entropy,
    exit_labels,
    exit_probabilities,
    load_classifier,
    save_classifier,
)

D = 6


def _hidden(L: int = 5, N: int = 4, d: int = D, seed: int = 0) -> torch.Tensor:  # noqa: N803
    return torch.randn(L, N, d, generator=torch.Generator().manual_seed(seed))


def _all_classifiers() -> list[nn.Module]:
    torch.manual_seed(0)
    return [
        CalmClassifier(D),
        CalmClassifier(D, hidden=8),
        ThreeStateMLP(D),
        LSTMClassifier(D, hidden_size=7),
    ]


@pytest.mark.parametrize("idx", range(4))
def test_shapes_probabilities_and_biases(idx: int) -> None:
    clf = _all_classifiers()[idx]
    hidden = _hidden()
    assert clf.record_logits(hidden).shape == (5, 4, 2)
    p = exit_probabilities(clf, hidden)
    assert p.shape == (5, 4) and bool(((p >= 0) & (p <= 1)).all())
    for module in clf.modules():
        if isinstance(module, nn.Linear):
            assert module.bias is not None
        if isinstance(module, nn.LSTM):
            assert module.bias
    with pytest.raises(ValueError, match="shape"):
        clf.record_logits(torch.zeros(5, 4, D + 1))


def test_calm_forward_and_architecture() -> None:
    lin = CalmClassifier(D)
    assert isinstance(lin.net, nn.Linear) and lin.net.out_features == 2
    mlp = CalmClassifier(D, hidden=8)
    assert [type(m) for m in mlp.net] == [nn.Linear, nn.ReLU, nn.Linear]
    h = _hidden()
    torch.testing.assert_close(lin.record_logits(h)[2, 1], lin(h[2, 1]))  # shared across layers


def test_three_state_mlp_stacking() -> None:
    clf = ThreeStateMLP(D)
    assert clf.net[0].in_features == 3 * D and clf.net[0].out_features == D and clf.net[2].out_features == 2
    h = _hidden(L=4, N=2)
    x = ThreeStateMLP.stack_states(h)
    assert x.shape == (4, 2, 3 * D)
    # layer 1: (0, 0, h1), layer 2: (0, h1, h2), layer 4: (h2, h3, h4)
    torch.testing.assert_close(x[0], torch.cat([torch.zeros(2, 2 * D), h[0]], dim=-1))
    torch.testing.assert_close(x[1], torch.cat([torch.zeros(2, D), h[0], h[1]], dim=-1))
    torch.testing.assert_close(x[3], torch.cat([h[1], h[2], h[3]], dim=-1))
    torch.testing.assert_close(clf.record_logits(h)[3, 1], clf(x[3, 1]))


def test_lstm_is_causal_over_layers() -> None:
    torch.manual_seed(0)
    clf = LSTMClassifier(D, hidden_size=9, num_layers=2)
    assert clf.lstm.hidden_size == 9 and clf.lstm.num_layers == 2 and clf.lstm.batch_first
    default = LSTMClassifier(D)
    assert default.lstm.hidden_size == 250 and default.lstm.num_layers == 1  # MEE's public code: 1 layer
    h = _hidden(L=5, N=3)
    full = clf.record_logits(h)
    for i in range(1, 6):  # step i only sees h_1..h_i
        torch.testing.assert_close(clf.record_logits(h[:i])[i - 1], full[i - 1], rtol=1e-5, atol=1e-6)
    # one token alone gives the same as inside the batch
    torch.testing.assert_close(clf.record_logits(h[:, 1:2])[:, 0], full[:, 1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("idx", range(4))
def test_save_load_round_trip(idx: int, tmp_path) -> None:
    clf = _all_classifiers()[idx]
    with torch.no_grad():  # make biases non-trivial
        for module in clf.modules():
            if isinstance(module, nn.Linear):
                module.bias.fill_(0.37)
    path = tmp_path / "sub" / "clf.pt"
    save_classifier(clf, path)
    assert sorted(os.listdir(path.parent)) == ["clf.pt"]  # no temporary file left behind
    loaded = load_classifier(path, expected_hidden_size=D)
    assert type(loaded) is type(clf) and loaded.config == clf.config
    sd0, sd1 = clf.state_dict(), loaded.state_dict()
    assert sd0.keys() == sd1.keys() and any(k.endswith("bias") for k in sd0)
    for key in sd0:
        assert torch.equal(sd0[key], sd1[key]), key
    h = _hidden()
    assert torch.equal(clf.record_logits(h), loaded.record_logits(h))


def test_load_rejects_mismatched_hidden_size_and_bad_files(tmp_path) -> None:
    path = tmp_path / "clf.pt"
    save_classifier(CalmClassifier(D), path)
    with pytest.raises(ValueError, match=r"hidden size 6.*hidden size 8"):
        load_classifier(path, expected_hidden_size=8)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not an eetrain exit-classifier"):
        load_classifier(other)
    # a checkpoint missing a bias does not load silently
    payload = torch.load(path, weights_only=True)
    del payload["state_dict"]["net.bias"]
    torch.save(payload, tmp_path / "nobias.pt")
    with pytest.raises(RuntimeError, match="bias"):
        load_classifier(tmp_path / "nobias.pt")


def test_exit_labels_reference_the_last_layer() -> None:
    # argmax per layer for 2 tokens: layer 1 [0, 1], layer 2 [1, 1], layer 3 [0, 2]
    preds = torch.tensor([[0, 1], [1, 1], [0, 2]])
    logits = nn.functional.one_hot(preds, 3).float() * 5.0
    labels = exit_labels(logits)
    expected = torch.tensor([[True, False], [False, False], [True, True]])
    assert torch.equal(labels, expected)
    # the off-by-one trap (reference = layer L-1) would give a different answer
    trap = preds == preds[-2:-1]
    assert torch.equal(trap, torch.tensor([[False, True], [True, True], [False, False]]))
    assert not torch.equal(labels, trap)
    assert torch.equal(exit_labels(preds), expected)


def test_class_balanced_cross_entropy_by_hand() -> None:
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]], requires_grad=True)
    targets = torch.tensor([1, 0, 0])
    ce = [math.log(2.0), math.log1p(math.exp(-2.0)), math.log1p(math.exp(1.0))]  # 0.693147 0.126928 1.313262
    # weights M / (K n_c): class 1 -> 3/(2*1) = 1.5, class 0 -> 3/(2*2) = 0.75
    expected = (1.5 * ce[0] + 0.75 * ce[1] + 0.75 * ce[2]) / 3  # = (0.693147 + 0.720095) / 2 = 0.706621
    assert expected == pytest.approx(0.706621, abs=1e-6)
    loss = class_balanced_cross_entropy(logits, targets)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() != pytest.approx(sum(ce) / 3, abs=1e-4)  # differs from the plain mean
    loss.backward()
    assert logits.grad is not None
    # one class present -> plain mean CE
    one = class_balanced_cross_entropy(logits.detach(), torch.tensor([0, 0, 0]))
    plain = nn.functional.cross_entropy(logits.detach(), torch.tensor([0, 0, 0]))
    assert one.item() == pytest.approx(plain.item(), abs=1e-6)
    # ignore_index and bool targets
    ign = class_balanced_cross_entropy(logits.detach(), torch.tensor([1, 0, -100]))
    assert ign.item() == pytest.approx((ce[0] + ce[1]) / 2, abs=1e-6)
    bools = class_balanced_cross_entropy(logits.detach(), torch.tensor([True, False, False]))
    assert bools.item() == pytest.approx(expected, abs=1e-6)
    assert class_balanced_cross_entropy(logits.detach(), torch.tensor([-100, -100, -100])).item() == 0.0
    with pytest.raises(ValueError, match="expected logits"):
        class_balanced_cross_entropy(logits.detach(), torch.tensor([1, 0]))


@pytest.mark.parametrize("kind", ["calm", "three_state_mlp", "lstm"])
def test_feature_space_is_saved_with_the_classifier(kind, tmp_path) -> None:
    from eetrain.exits.classifiers import CLASSIFIERS

    assert CLASSIFIERS[kind](D).features == "raw"  # the default: CALM's residual states
    clf = CLASSIFIERS[kind](D, features="normed")
    assert clf.features == "normed" and clf.config["features"] == "normed"
    save_classifier(clf, tmp_path / "clf.pt")
    assert load_classifier(tmp_path / "clf.pt").features == "normed"
    # a checkpoint written before the setting existed (no features in its kwargs) loads as raw
    payload = torch.load(tmp_path / "clf.pt", weights_only=True)
    del payload["kwargs"]["features"]
    torch.save(payload, tmp_path / "old.pt")
    assert load_classifier(tmp_path / "old.pt").features == "raw"
    with pytest.raises(ValueError, match=r"features='post'; allowed: raw, normed"):
        CLASSIFIERS[kind](D, features="post")


def test_policy_takes_the_classifiers_feature_space() -> None:
    from eetrain.exits.policy import ExitPolicy

    assert ExitPolicy(CalmClassifier(D, features="normed"), 0.5).features == "normed"
    assert ExitPolicy(CalmClassifier(D), 0.5).features == "raw"
    assert ExitPolicy("hidden_saturation", 0.9).features == "raw"
    assert ExitPolicy("hidden_saturation", 0.9, features="normed").features == "normed"
    with pytest.raises(ValueError, match="features='raw', but the calm classifier was trained on normed states"):
        ExitPolicy(CalmClassifier(D, features="normed"), 0.5, features="raw")
    with pytest.raises(ValueError, match=r"features='pre'; allowed: raw, normed"):
        ExitPolicy("hidden_saturation", 0.9, features="pre")
