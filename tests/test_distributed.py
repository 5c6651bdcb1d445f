"""Distributed training: the strategy hook (FSDP's block classes, DDP's unused parameters), the trainer
configs, 2-process DDP against one process (CPU), and FSDP / DeepSpeed runs (GPU only)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from eetrain.config import compose
from eetrain.distributed import block_classes, full_backbone, leaves_parameters_unused, training_strategy
from eetrain.losses import Curriculum, ExitCrossEntropy, JointLoss, LayerDropout
from eetrain.module import EarlyExitModule
from tests import tiny_runs
from tests.conftest import TINY, TOKENIZER, make_backbone

BLOCKS = {"t5": "T5Block", "llama": "LlamaDecoderLayer", "bert": "BertLayer"}
FSDP = "lightning.pytorch.strategies.FSDPStrategy"


def _loss(p_max: float = 0.0) -> JointLoss:
    return JointLoss({"ce": ExitCrossEntropy(curriculum=Curriculum("rotational", 2))},
                     layer_dropout=LayerDropout(p_max, seed=1) if p_max else None)


@pytest.mark.parametrize("family", ["t5", "llama", "bert"])
def test_fsdp_wraps_each_familys_blocks(family):
    from lightning.pytorch.strategies import FSDPStrategy

    bb = make_backbone(family)
    assert {c.__name__ for c in block_classes(bb)} == {BLOCKS[family]}
    cfg = compose(["trainer=fsdp"]).trainer.strategy
    assert cfg._target_ == FSDP and cfg.auto_wrap_policy is None
    strategy = training_strategy(cfg, bb, _loss())
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and policy._module_classes == {type(bb.blocks[0])}
    assert strategy.kwargs["use_orig_params"] is True  # LoRA: frozen and trainable parameters in one unit
    # the plain name gets the same policy
    assert training_strategy("fsdp", bb, _loss()).kwargs["auto_wrap_policy"]._module_classes == {type(bb.blocks[0])}


def test_fsdp_wrap_policy_from_class_paths():
    cfg = OmegaConf.create({"_target_": FSDP, "auto_wrap_policy": ["transformers.models.t5.modeling_t5.T5LayerFF"]})
    strategy = training_strategy(cfg, make_backbone("t5"), _loss())
    assert {c.__name__ for c in strategy.kwargs["auto_wrap_policy"]._module_classes} == {"T5LayerFF"}


def test_ddp_finds_unused_parameters_only_when_some_can_be():
    from eetrain.backbones import T5Backbone

    shared = make_backbone("t5")
    per_layer = T5Backbone(config=TINY["t5"], tokenizer=TOKENIZER, seed=0, exit_head="per_layer")
    assert per_layer.exit_heads is not None
    assert not leaves_parameters_unused(shared, _loss())  # a curriculum with the shared head: all used
    assert leaves_parameters_unused(shared, _loss(p_max=0.2))  # layer dropout skips blocks
    assert leaves_parameters_unused(per_layer, _loss())  # an exit without a loss this step: its head
    assert training_strategy("ddp", shared, _loss()) == "ddp"
    assert training_strategy("ddp", shared, _loss(0.2)) == "ddp_find_unused_parameters_true"
    assert training_strategy("ddp_spawn", per_layer, _loss()) == "ddp_spawn_find_unused_parameters_true"
    assert training_strategy("ddp_find_unused_parameters_false", shared, _loss(0.2)) == "ddp_find_unused_parameters_false"
    assert training_strategy(None, shared, _loss()) is None
    ddp = OmegaConf.create({"_target_": "lightning.pytorch.strategies.DDPStrategy"})
    assert training_strategy(ddp, shared, _loss(0.2))._ddp_kwargs == {"find_unused_parameters": True}


@pytest.mark.parametrize("name,strategy", [("ddp", "ddp"), ("deepspeed", "deepspeed_stage_2"),
                                           ("deepspeed_stage_3", "deepspeed_stage_3")])
def test_trainer_configs_name_lightning_strategies(name, strategy, monkeypatch):
    from lightning.pytorch.strategies import StrategyRegistry

    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "4")
    cfg = compose([f"trainer={name}"]).trainer
    assert cfg.strategy == strategy and strategy in StrategyRegistry.available_strategies()
    assert cfg.accelerator == "gpu" and cfg.devices == "auto"
    assert cfg.num_nodes == 4  # the SLURM allocation's nodes
    monkeypatch.delenv("SLURM_JOB_NUM_NODES")
    assert compose([f"trainer={name}"]).trainer.num_nodes == 1


def test_full_backbone_loads_a_consolidated_state():
    cfg = compose(["model.config.num_layers=2", "model.config.num_decoder_layers=2"])
    module = EarlyExitModule(instantiate(cfg.model), _loss(), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    assert full_backbone(cfg.model, module) is module.backbone  # nothing sharded: the module's own
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    module.consolidated = {k: v.clone() for k, v in module.state_dict().items()}
    whole = full_backbone(cfg.model, module)
    assert whole is not module.backbone
    for k, v in module.backbone.state_dict().items():
        assert torch.equal(whole.state_dict()[k], v), k


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(tmp_path):
    """1 process with batch 2B against 2 gloo processes (ddp_spawn) with B each: the same global batches
    (the seeded permutation split by rank interleaving), fused multi-exit loss with LayerSkip's curriculum,
    layer dropout and per-layer heads. Every example has 24 source and 8 target tokens, so the mean over 2B
    tokens' losses is the mean of the two ranks' means. Plain SGD: Adam divides by sqrt(v), which turns the
    last-bit differences of all-reduced gradients near zero into ~1e-5 weight differences."""
    data = tiny_runs.write_data(tmp_path / "data")
    common = [*data, "trainer.max_epochs=2", "optimizer._target_=torch.optim.SGD", "optimizer.lr=0.5",
              "export=false"]
    tiny_runs.run_here(tmp_path / "one", *common, "data.batch_size=8")  # one process: this one
    two = tiny_runs.run(tmp_path / "two", *common, "data.batch_size=4", "trainer=ddp_sim")
    assert "ddp_spawn with find_unused_parameters=True" in two.stdout

    one_losses, two_losses = tiny_runs.step_losses(tmp_path / "one"), tiny_runs.step_losses(tmp_path / "two")
    assert list(one_losses.index) == list(two_losses.index) == list(range(8))  # 32 examples / 8, two epochs
    torch.testing.assert_close(torch.tensor(two_losses.values), torch.tensor(one_losses.values), rtol=0, atol=1e-6)
    skipped = pd.read_csv(tmp_path / "two" / "csv" / "metrics.csv")["train/skipped_layers"].dropna()
    assert skipped.gt(0).any()  # layer dropout did drop layers (the same ones on both ranks)

    one = tiny_runs.checkpoint_weights(tmp_path / "one" / "checkpoints" / "last.ckpt")
    two_w = tiny_runs.checkpoint_weights(tmp_path / "two" / "checkpoints" / "last.ckpt")
    assert set(one) == set(two_w) and any("exit_heads" in k for k in one)
    for k in one:
        torch.testing.assert_close(two_w[k], one[k], rtol=0, atol=1e-6, msg=k)


def _gpu_run(tmp_path, name, *overrides):
    data = tiny_runs.write_data(tmp_path / "data")
    return tiny_runs.run(tmp_path / name, *data, "trainer.max_epochs=1", "trainer.precision=32-true", *overrides)


@pytest.mark.gpu
@pytest.mark.slow
def test_fsdp_trains_exports_and_matches_one_gpu(tmp_path):
    """FSDP (one unit per T5 block) with the fused loss, per-layer heads and layer dropout: the loss curve
    equals a single-GPU run's at the same global batch, and the export (gathered on rank 0) loads."""
    n = min(2, torch.cuda.device_count())
    common = ["optimizer._target_=torch.optim.SGD", "optimizer.lr=0.5"]
    _gpu_run(tmp_path, "one", *common, "data.batch_size=8", "trainer=gpu")
    _gpu_run(tmp_path, "fsdp", *common, f"data.batch_size={8 // n}", "trainer=fsdp", f"trainer.devices={n}")
    torch.testing.assert_close(torch.tensor(tiny_runs.step_losses(tmp_path / "fsdp").values),
                               torch.tensor(tiny_runs.step_losses(tmp_path / "one").values), rtol=1e-4, atol=1e-4)
    one, fsdp = tiny_runs.export_weights(tmp_path / "one"), tiny_runs.export_weights(tmp_path / "fsdp")
    assert set(one) == set(fsdp)
    for k in one:
        torch.testing.assert_close(fsdp[k], one[k], rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["deepspeed", "deepspeed_stage_3"])
def test_deepspeed_trains_and_exports(tmp_path, trainer):
    pytest.importorskip("deepspeed")
    n = min(2, torch.cuda.device_count())
    r = _gpu_run(tmp_path, trainer, f"trainer={trainer}", f"trainer.devices={n}", "data.batch_size=4")
    assert "Per-layer validation report" in r.stdout
    weights = tiny_runs.export_weights(tmp_path / trainer)
    assert all(v.numel() > 0 and torch.isfinite(v).all() for v in weights.values())  # ZeRO-3: gathered, not shards
