"""Lightning's distributed strategies for any backbone: DDP, FSDP and DeepSpeed ZeRO 2 / 3.

The trainer configs name the strategy (`conf/trainer/{ddp,fsdp,deepspeed,deepspeed_stage_3}.yaml`); what a
config cannot know comes from the backbone here:

- FSDP's auto-wrap policy: one FSDP unit per transformer block, the block class taken from the adapter
  (`type(backbone.blocks[0])`: T5Block — encoder and decoder —, LlamaDecoderLayer, BertLayer). Heads,
  embeddings and norms stay in the root unit, which is whole during the step, so the fused loss can read
  the head weights directly. `auto_wrap_policy` may also list class paths.
- DDP with parameters that get no gradient in some steps (layer dropout skips blocks, per-layer exit
  heads under a curriculum): `find_unused_parameters=True`, else DDP stops at the second step.
- DeepSpeed ZeRO-3 partitions every parameter and gathers a module's own around its forward; the fused
  loss reads the head weights outside the head's forward, so they are registered as external parameters
  of the module DeepSpeed runs (`gather_heads_under_zero3`).
- After a sharded fit (FSDP, ZeRO-3) rank 0 gets the whole state (`consolidated_state`, collective), so
  the per-layer report, the export and the stages run on a complete model.

Every rank drops the same layers and trains the same exits in a step: both are functions of the global
step and the seed (`eetrain.losses.curriculum`), not of a rank's RNG state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from eetrain.backbones.base import ExitBackbone
from eetrain.errors import ConfigError
from eetrain.losses.joint import JointLoss

#: Lightning's DDP strategy names that accept a `_find_unused_parameters_true` suffix
DDP_NAMES = ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")


def block_classes(backbone: ExitBackbone) -> set[type[torch.nn.Module]]:
    """The transformer block classes of the backbone (FSDP's wrap units)."""
    return {type(block) for block in backbone.blocks}


def leaves_parameters_unused(backbone: ExitBackbone, loss: JointLoss) -> bool:
    """Whether some step can leave a trainable parameter without gradient: layer dropout skips whole
    blocks, and a per-layer exit head gets none in a step where its exit has no loss (curricula, exits
    without a loss term)."""
    dropout = getattr(loss, "layer_dropout", None)
    return (dropout is not None and dropout.p_max > 0) or backbone.exit_heads is not None


def training_strategy(strategy: Any, backbone: ExitBackbone, loss: JointLoss) -> Any:
    """The Trainer's `strategy` argument for `trainer.strategy` (a name, or a config with `_target_`),
    completed from the backbone and loss; None where the config sets none (Lightning's "auto")."""
    if strategy is None:
        return None
    if isinstance(strategy, str):
        if strategy in DDP_NAMES and leaves_parameters_unused(backbone, loss):
            print(f"[strategy] {strategy} with find_unused_parameters=True: layer dropout or per-layer exit heads "
                  "leave some parameters without gradient in some steps")
            return f"{strategy}_find_unused_parameters_true"
        if strategy == "fsdp":
            from lightning.pytorch.strategies import FSDPStrategy

            return FSDPStrategy(auto_wrap_policy=block_classes(backbone))
        return strategy
    if not (isinstance(strategy, Mapping | DictConfig) and "_target_" in strategy):
        raise ConfigError(f"trainer.strategy={strategy!r}: a strategy name (ddp, fsdp, deepspeed_stage_2, ...) "
                          "or a config with _target_")
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    cls = get_class(str(strategy["_target_"]))
    extra: dict[str, Any] = {}
    if issubclass(cls, FSDPStrategy):
        policy = strategy.get("auto_wrap_policy")
        if policy is None:
            extra["auto_wrap_policy"] = block_classes(backbone)
        elif OmegaConf.is_list(policy) or isinstance(policy, list | tuple):
            extra["auto_wrap_policy"] = {get_class(str(name)) for name in policy}
    if issubclass(cls, DDPStrategy) and strategy.get("find_unused_parameters") is None:
        extra["find_unused_parameters"] = leaves_parameters_unused(backbone, loss)
    return instantiate(strategy, **extra)


def _is_zero3(strategy: Any) -> bool:
    return type(strategy).__name__ == "DeepSpeedStrategy" and bool(getattr(strategy, "zero_stage_3", False))


def _head_parameters(backbone: ExitBackbone) -> list[torch.nn.Parameter]:
    """Parameters the losses read directly rather than through a module's forward: the output
    projections (the model's and the per-layer heads')."""
    params = [backbone.head_weight, backbone.head_bias]
    for head in (backbone.exit_heads or {}).values():
        params += [head.proj.weight, head.proj.bias]
    seen: dict[int, torch.nn.Parameter] = {}
    for p in params:
        if p is not None:
            seen.setdefault(id(p), p)
    return list(seen.values())


def gather_heads_under_zero3(strategy: Any, module: torch.nn.Module) -> None:
    """Under DeepSpeed ZeRO-3, register the head projections as external parameters of the module the
    engine runs (Lightning's wrapper of the LightningModule, whose forward is the training step), so they
    are gathered for the step's forward and backward. Nothing for other strategies."""
    if not _is_zero3(strategy):
        return
    import deepspeed

    runner = strategy.model.module  # DeepSpeedEngine.module
    for p in _head_parameters(module.backbone):
        deepspeed.zero.register_external_parameter(runner, p)


def consolidated_state(strategy: Any, module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The module's whole state dict on rank 0 (CPU tensors) after a sharded fit: FSDP (its full state
    dict) or ZeRO-3 (parameters gathered); {} on the other ranks. None for strategies whose rank 0 holds
    the whole model (single device, DDP, ZeRO-2). Collective: every rank calls it."""
    from lightning.pytorch.strategies import FSDPStrategy

    def copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k.removeprefix("_forward_module."): v.detach().cpu().clone() for k, v in state.items()}

    if isinstance(strategy, FSDPStrategy):
        state = strategy.lightning_module_state_dict()  # full state, on rank 0 only
        return copy(state) if strategy.is_global_zero else {}
    if _is_zero3(strategy):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            # copied inside: the gathered tensors are partitioned again when the block ends
            return copy(module.state_dict()) if strategy.is_global_zero else {}
    return None


def full_backbone(model_cfg: DictConfig, module: torch.nn.Module) -> ExitBackbone:
    """The trained backbone, whole: the module's own, or after a sharded fit a fresh one from the model
    config with the consolidated weights (`module.consolidated`, rank 0)."""
    state = getattr(module, "consolidated", None)
    if not state:
        return module.backbone
    backbone: ExitBackbone = instantiate(model_cfg)
    prefix = "backbone."
    backbone.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    return backbone
