"""FREE's shallow/deep CE, LayerSkip's sum_l weights, and loss terms with parameters."""

import math

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf.errors import MissingMandatoryValue

from eetrain.config import compose
from eetrain.errors import ConfigError
from eetrain.losses import (
    ExitCrossEntropy,
    JointLoss,
    LayerwiseDistillation,
    TrainStep,
    layer_weights,
    renormalise,
    weighted_cross_entropy,
)
from eetrain.module import EarlyExitModule
from tests.conftest import examples, make_backbone


def test_free_shallow_deep_weights_by_hand():
    # (L_s * CE_{L_s} + L * CE_L) / (L_s + L): T5-large, L_s = 6 of 24 -> 6/30, 24/30
    layers, weights = ExitCrossEntropy(weights="calm", layers={"shallow": 6}).resolve(24)
    assert layers == (6, 24)
    torch.testing.assert_close(weights, torch.tensor([0.2, 0.8]))
    # the demo: L_s = 2 of 4 -> 2/6, 4/6
    layers, weights = ExitCrossEntropy(weights="calm", layers={"shallow": 2}).resolve(4)
    assert layers == (2, 4)
    torch.testing.assert_close(weights, torch.tensor([1 / 3, 2 / 3]))


def test_free_shallow_deep_loss_hand_computed():
    # One token, vocab 2, label 0: exit L_s logits (0, 0) -> CE = log 2; exit L logits (2, 0) -> log(1 + e^-2).
    ce_s, ce_l = math.log(2), math.log(1 + math.exp(-2))
    _, weights = ExitCrossEntropy(weights="calm", layers={"shallow": 6}).resolve(24)
    loss, _ = weighted_cross_entropy(
        [torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]])], torch.tensor([0]), weights
    )
    assert loss.item() == pytest.approx((6 * ce_s + 24 * ce_l) / 30)


def test_free_ce_on_a_model_matches_reference():
    bb = make_backbone("llama")  # 3 layers, shallow exit 1
    states = bb(bb.collate(examples()))
    out = JointLoss({"ce": ExitCrossEntropy(weights="calm", layers={"shallow": 1})})(states, bb)
    assert sorted(out.layer_ce) == [1, 3]
    ref, _ = weighted_cross_entropy(
        [bb.exit_logits(states.hidden[0]), bb.exit_logits(states.hidden[2])],
        states.labels,
        torch.tensor([1 / 4, 3 / 4]),
    )
    torch.testing.assert_close(out.total, ref, rtol=1e-5, atol=1e-6)


def test_sum_l_weights_by_hand():
    # e_l = e_scale * l (l + 1) / 2, the last layer (4) at full weight 10.
    torch.testing.assert_close(layer_weights("sum_l", [1, 2, 3, 4]), torch.tensor([1, 3, 6, 10]) / 20.0)
    w = layer_weights("sum_l", [1, 2, 3, 4], e_scale=0.5, last_layer=4)
    torch.testing.assert_close(w, torch.tensor([0.5, 1.5, 3.0, 10.0]) / 15.0)
    # without the last layer among the exits every exit carries e_scale, which then cancels
    torch.testing.assert_close(
        layer_weights("sum_l", [1, 2, 3], e_scale=0.5, last_layer=4), torch.tensor([1, 3, 6]) / 10.0
    )
    with pytest.raises(ConfigError, match="loss.terms.ce.weights: sum_l needs e_scale > 0"):
        layer_weights("sum_l", [1, 2], e_scale=0.0)
    with pytest.raises(ConfigError, match="allowed: calm, uniform, geometric, sum_l"):
        layer_weights("steep", [1, 2])


def test_renormalise_over_active_exits_by_hand():
    # sum_l, e_scale 0.5, exits 2 and 4 active: 1.5 / 11.5 and 10 / 11.5
    w = layer_weights("sum_l", [1, 2, 3, 4], e_scale=0.5)
    got = renormalise(w, torch.tensor([False, True, False, True]))
    torch.testing.assert_close(got, torch.tensor([1.5 / 11.5, 10 / 11.5]))
    # calm over exits 1 and 3 of 1..3: 1/4, 3/4
    torch.testing.assert_close(
        renormalise(layer_weights("calm", [1, 2, 3]), torch.tensor([True, False, True])), torch.tensor([0.25, 0.75])
    )
    # an explicit list keeps its total (2.0)
    torch.testing.assert_close(
        renormalise(torch.tensor([0.5, 0.5, 1.0]), torch.tensor([True, False, True])), torch.tensor([2 / 3, 4 / 3])
    )


def test_curriculum_ce_scores_only_active_exits_with_renormalised_weights():
    from eetrain.losses import Curriculum

    bb = make_backbone("t5")
    states = bb(bb.collate(examples()))
    term = ExitCrossEntropy(weights="calm", curriculum=Curriculum("rotational", every=2))
    # rotational R=2 over exits (1, 2, 3) at step 1: exits 1 and 3 (and 3 always)
    out = term(states, bb, TrainStep(index=1, total=10))
    assert sorted(out.layer_ce) == [1, 3]
    ref, _ = weighted_cross_entropy(
        [bb.exit_logits(states.hidden[0]), bb.exit_logits(states.hidden[2])], states.labels, torch.tensor([0.25, 0.75])
    )
    torch.testing.assert_close(out.total, ref, rtol=1e-5, atol=1e-6)
    # validation (no step): every exit
    assert sorted(term(states, bb).layer_ce) == [1, 2, 3]


def test_loss_terms_with_parameters_are_trained_and_checkpointed():
    bb = make_backbone("t5")
    loss = JointLoss(
        {
            "ce": ExitCrossEntropy(layers={"shallow": 1}),
            "kd": LayerwiseDistillation("uniform", shallow_layer=1, student_projection=True),
        }
    )
    module = EarlyExitModule(bb, loss, optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    proj = loss.terms["kd"].projection
    assert proj is not None and proj.weight.shape == (32, 32)
    torch.testing.assert_close(proj.weight, torch.eye(32))
    opt = module.configure_optimizers()
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(proj.weight) in in_opt and id(proj.bias) in in_opt
    assert {"loss.terms.kd.projection.weight", "loss.terms.kd.projection.bias"} <= set(module.state_dict())

    # one step moves the projection, and a fresh module loads it back from the state dict
    _, out = module._step(bb.collate(examples()), TrainStep(0, 1))
    out.total.backward()
    opt.step()
    assert not torch.allclose(proj.weight, torch.eye(32))
    bb2 = make_backbone("t5")
    loss2 = JointLoss(
        {
            "ce": ExitCrossEntropy(layers={"shallow": 1}),
            "kd": LayerwiseDistillation("uniform", shallow_layer=1, student_projection=True),
        }
    )
    module2 = EarlyExitModule(bb2, loss2, optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    module2.load_state_dict(module.state_dict())
    torch.testing.assert_close(loss2.terms["kd"].projection.weight, proj.weight)


def test_bad_terms_fail_when_the_module_is_built():
    bb = make_backbone("t5")  # 3 layers
    with pytest.raises(ConfigError, match=r"loss.terms.kd.shallow_layer=3 must be within 1..2"):
        EarlyExitModule(bb, JointLoss({"kd": LayerwiseDistillation(shallow_layer=3)}), optimizer=None)
    with pytest.raises(ConfigError, match=r"exits.layers.shallow=3 must be within 1..2"):
        EarlyExitModule(bb, JointLoss({"ce": ExitCrossEntropy(layers={"shallow": 3})}), optimizer=None)


@pytest.mark.parametrize(
    "overrides, terms",
    [
        (["+experiment=free_demo"], {"ce", "kd"}),
        (["loss=free", "exits.layers={shallow:2}"], {"ce", "kd"}),
        (["loss=calm", "+loss/terms@loss.terms.kd=kd", "loss.terms.kd.shallow_layer=2"], {"ce", "kd"}),
        (["loss=layerskip"], {"ce"}),
        (["loss=layerskip", "loss.terms.ce.curriculum.kind=gradual"], {"ce"}),
    ],
)
def test_loss_configs_compose_and_build(overrides, terms):
    cfg = compose(overrides)
    loss = instantiate(cfg.loss)
    assert set(loss.terms) == terms
    bb = make_backbone("t5", num_layers=4, num_decoder_layers=4)
    loss.setup(bb)
    out = loss(bb(bb.collate(examples())), bb, TrainStep(0, 10))
    assert torch.isfinite(out.total)


def test_exits_node_drives_the_losses():
    cfg = compose(["+experiment=free_demo"])
    loss = instantiate(cfg.loss)
    layers, weights = loss.terms["ce"].resolve(4)
    assert layers == (2, 4) and weights.tolist() == pytest.approx([1 / 3, 2 / 3])
    assert loss.terms["kd"].shallow_layer == 2 and loss.terms["kd"].mapping == "closest"
    assert loss.terms["kd"].alpha == 0.5
    cfg = compose(["exits.min_layer=3"])
    assert instantiate(cfg.loss).terms["ce"].resolve(4)[0] == (3, 4)
    cfg = compose(["exits.layers={every:2}", "exits.min_layer=3"])
    assert instantiate(cfg.loss).terms["ce"].resolve(6)[0] == (4, 6)
    cfg = compose(["exits.min_layer=3", "exits.train_below_min=true"])
    assert instantiate(cfg.loss).terms["ce"].resolve(4)[0] == (1, 2, 3, 4)
    cfg = compose(["+experiment=free_t5"])
    assert instantiate(cfg.loss).terms["ce"].resolve(24)[1].tolist() == pytest.approx([0.2, 0.8])
    assert cfg.model.name_or_path == "google-t5/t5-large" and cfg.data.max_target_length == 128
    # loss=free without a shallow exit says where to set it
    with pytest.raises(InstantiationException, match=r"loss.terms.kd.shallow_layer is not set: set exits.layers=\{shallow: L_s\}"):
        instantiate(compose(["loss=free"]).loss)
    # a kd term added to calm without L_s is a missing mandatory value
    with pytest.raises(MissingMandatoryValue, match="loss.terms.kd.shallow_layer"):
        instantiate(compose(["+loss/terms@loss.terms.kd=kd"]).loss)


def test_free_loss_with_another_exits_form_is_one_config_error():
    from omegaconf import OmegaConf

    for layers in ("[2,4]", "{every:2}"):
        cfg = compose(["loss=free", f"exits.layers={layers}"])
        with pytest.raises(Exception) as err:
            OmegaConf.resolve(cfg.loss)
        cause = err.value
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__ or cause.__context__
        assert isinstance(cause, ConfigError), err.value
        assert str(cause).startswith(f"exits.layers={[2, 4] if layers == '[2,4]' else {'every': 2}!r}: the free loss "
                                     "needs exits.layers={shallow: L_s}")


@pytest.mark.parametrize(
    "args",
    [
        ["+experiment=free_demo", "exits.layers=[2,4]"],  # Hydra cannot merge a list into {shallow: 2}
        ["+experiment=demo", "loss=free", "exits.layers=[2,4]"],  # the kd term's interpolation
        ["+experiment=free_demo", "exits.layers={every:2}"],  # a mapping with other keys cannot merge either
    ],
)
def test_cli_free_loss_with_a_list_of_exits(tmp_path, args):
    from tests.in_process import cli

    r = cli(*args, f"hydra.run.dir={tmp_path / 'run'}", "trainer.max_epochs=1", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "TypeError" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("eetrain: error:")]
    assert len(errors) == 1
    assert errors[0].startswith("eetrain: error: exits.layers=" + args[-1].split("=", 1)[1][:2])
    assert "the free loss needs exits.layers={shallow: L_s}" in errors[0] and "{shallow: N}" in errors[0]
