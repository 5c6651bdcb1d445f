import math

import pytest
import torch

from eetrain.errors import ConfigError
from eetrain.losses import ExitCrossEntropy, JointLoss, layer_weights, weighted_cross_entropy
from tests.conftest import examples, make_backbone


def test_calm_weights_by_hand():
    torch.testing.assert_close(layer_weights("calm", [1, 2, 3]), torch.tensor([1 / 6, 2 / 6, 3 / 6]))
    torch.testing.assert_close(layer_weights("calm", [2, 4]), torch.tensor([2 / 6, 4 / 6]))
    torch.testing.assert_close(layer_weights("uniform", [1, 2, 3, 4]), torch.full((4,), 0.25))
    # geometric with ratio 0.5: proportional to 0.25, 0.5, 1
    torch.testing.assert_close(layer_weights("geometric", [1, 2, 3]), torch.tensor([1 / 7, 2 / 7, 4 / 7]))
    torch.testing.assert_close(layer_weights([0.0, 1.0, 2.0], [1, 2, 3]), torch.tensor([0.0, 1.0, 2.0]))


@pytest.mark.parametrize(
    "weights, match",
    [([0.5, 0.5], "has 2 values but there are 3 exit layers"), ([1.0, -1.0, 1.0], "must be finite, >= 0"), ([1.0, float("inf"), 1.0], "must be finite"),
     ("steep", "allowed: calm, uniform, geometric")],
)
def test_bad_weights_name_the_key(weights, match):
    with pytest.raises(ConfigError, match=match) as e:
        layer_weights(weights, [1, 2, 3])
    assert "loss.terms.ce.weights" in str(e.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(weights=["a", "b"]), "loss.terms.ce.weights=['a', 'b']; allowed: calm, uniform, geometric, sum_l or a list"),
    (dict(weights=5), "loss.terms.ce.weights=5; allowed"),
    (dict(weights="geometric", ratio="abc"), "loss.terms.ce.ratio='abc': the geometric weights' ratio must be a number > 0"),
    (dict(label_smoothing=1.5), "loss.terms.ce.label_smoothing=1.5; allowed: a number in [0, 1)"),
    (dict(label_smoothing="abc"), "loss.terms.ce.label_smoothing='abc'; allowed"),
    (dict(impl="bogus"), "loss.terms.ce.impl='bogus'; allowed: auto, chunked, naive, liger, cce"),
    (dict(chunk_size=0), "loss.terms.ce.chunk_size=0; allowed: null (~256 MiB of logits per chunk) or an integer >= 1"),
    (dict(curriculum={"kind": "rotational", "foo": 1}), "loss.terms.ce.curriculum: unknown key(s) ['foo']"),
])
def test_bad_ce_settings_name_the_key_at_construction(kwargs, message):
    from eetrain.losses import ExitCrossEntropy

    with pytest.raises(ConfigError) as e:
        ExitCrossEntropy(**kwargs)
    assert message in str(e.value)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only refusal")
def test_a_gpu_kernel_on_a_cpu_machine_is_refused_before_training():
    from eetrain.losses import ExitCrossEntropy

    with pytest.raises(ConfigError, match=r"loss.terms.ce.impl='liger' is a CUDA kernel and there is no GPU"):
        ExitCrossEntropy(impl="liger")


def test_calm_loss_hand_computed():
    # Two exits, one token, vocab 2, label 0.
    # exit 1 logits (0, 0): CE = log 2; exit 2 logits (2, 0): CE = log(1 + e^-2).
    labels = torch.tensor([0, -100])
    z1 = torch.tensor([[0.0, 0.0], [5.0, 5.0]])
    z2 = torch.tensor([[2.0, 0.0], [1.0, 9.0]])
    loss, per_layer = weighted_cross_entropy([z1, z2], labels, layer_weights("calm", [1, 2]))
    ce1, ce2 = math.log(2), math.log(1 + math.exp(-2))
    assert per_layer.tolist() == pytest.approx([ce1, ce2])
    assert loss.item() == pytest.approx(ce1 / 3 + 2 * ce2 / 3)


@pytest.mark.parametrize("family", ["t5", "llama", "bert"])
@pytest.mark.parametrize("weights", ["calm", "uniform", "geometric", [0.2, 0.0, 0.8]])
def test_exit_cross_entropy_matches_reference(family, weights):
    bb = make_backbone(family)
    batch = bb.collate(examples())
    states = bb(batch)
    term = ExitCrossEntropy(weights=weights)
    out = JointLoss({"ce": term})(states, bb)
    logits = [bb.exit_logits(h) for h in states.hidden]
    ref, _ = weighted_cross_entropy(logits, states.labels, layer_weights(weights, [1, 2, 3]))
    torch.testing.assert_close(out.total, ref, rtol=1e-5, atol=1e-6)
    # same gradients on the head and the first block
    g = torch.autograd.grad(out.total, [bb.head_weight], retain_graph=True)[0]
    g_ref = torch.autograd.grad(ref, [bb.head_weight])[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_exit_layer_subset_and_last():
    bb = make_backbone("t5")
    states = bb(bb.collate(examples()))
    out = ExitCrossEntropy(weights="calm", layers=[2, 3])(states, bb)
    assert sorted(out.layer_ce) == [2, 3]
    assert sorted(ExitCrossEntropy(layers="last")(states, bb).layer_ce) == [3]
    with pytest.raises(ConfigError, match="outside 1..3"):
        ExitCrossEntropy(layers=[1, 4]).resolve(3)
    with pytest.raises(ConfigError, match="allowed"):
        ExitCrossEntropy(layers="first")


def test_regression_head_trains_every_exit_with_its_mse():
    """num_labels=1 (STS-B): the same weighted sum over exits with each exit's mean squared error, as
    transformers' MSE for one label, checked against the scores computed by hand."""
    bb = make_backbone("bert", num_labels=1)
    batch = bb.collate([{"source_ids": [5, 6, 7], "label": 4.2}, {"source_ids": [8, 9], "label": 0.5}])
    assert batch["labels"].dtype == torch.float
    states = bb(batch)
    out = JointLoss({"ce": ExitCrossEntropy(weights="calm")})(states, bb)
    mse = [float(((bb.exit_logits(h, i)[:, 0] - batch["labels"]) ** 2).mean())
           for i, h in zip(states.layers, states.hidden, strict=True)]
    assert [float(v) for v in out.layer_ce.values()] == pytest.approx(mse, rel=1e-5)
    assert out.total.item() == pytest.approx(sum(w * m for w, m in zip([1 / 6, 2 / 6, 3 / 6], mse, strict=True)),
                                                  rel=1e-5)
    out.total.backward()
    assert bb.head_weight.grad is not None and bb.head_weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match=r"label_smoothing=0.1: smoothing applies to classes"):
        JointLoss({"ce": ExitCrossEntropy(label_smoothing=0.1)})(states, bb)
