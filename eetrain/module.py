"""The Lightning module: trains any `ExitBackbone` with a joint loss and logs every exit."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
from torch import Tensor

from eetrain.backbones.base import ExitBackbone
from eetrain.errors import ConfigError, NonFiniteLossError
from eetrain.layer_metrics import LayerStats, layer_predictions
from eetrain.losses.joint import JointLoss, LossOutput, TrainStep
from eetrain.resume import rng_states, set_rng_states


class EarlyExitModule(L.LightningModule):
    def __init__(
        self,
        backbone: ExitBackbone,
        loss: JointLoss,
        optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer],
        scheduler: dict[str, Any] | None = None,
    ):
        super().__init__()
        # Validates the terms against the model (bad exits fail before any data loads) and creates
        # model-dependent term parameters before the optimizer and checkpoint loading see the module.
        loss.setup(backbone)
        self.backbone = backbone
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler = dict(scheduler) if scheduler else None
        layers = tuple(range(1, backbone.num_layers + 1))
        self.val_stats = LayerStats(layers)
        self.val_rows: list[dict[str, float]] = []
        self._total_steps: int | None = None
        #: RNG states from a checkpoint, set again when training restarts (`on_train_start`)
        self._rng_states: dict[str, Any] | None = None
        #: after a sharded fit (FSDP, ZeRO-3): the whole state dict on rank 0 (`eetrain.distributed`)
        self.consolidated: dict[str, Tensor] | None = None

    def _step(
        self, batch: dict[str, Tensor], step: TrainStep | None = None, skip: frozenset[int] = frozenset()
    ) -> tuple[Any, LossOutput]:
        """One forward and loss. step: the training step (curricula apply), None in validation;
        skip: the layers the forward skips (layer dropout, training only)."""
        states = self.backbone(batch, skip=skip)
        out = self.loss(states, self.backbone, step)
        if not torch.isfinite(out.total):
            per_layer = {i: round(float(v), 4) for i, v in out.layer_ce.items()}
            trainer = self._trainer
            precision = str(trainer.precision) if trainer is not None else ""
            remedy = ("float16 weights and optimizer state (trainer.precision=16-true) overflow and underflow easily: "
                      "use bf16-true, 16-mixed or 32" if precision == "16-true" else
                      "lower optimizer.lr, check the data, or use trainer.precision=32")
            callback = trainer.checkpoint_callback if trainer is not None else None
            last = callback.last_model_path if callback is not None else ""
            raise NonFiniteLossError(
                f"non-finite loss {float(out.total)} at global step {self.global_step} "
                f"(terms {({k: float(v) for k, v in out.logs.items()})}, per-layer CE {per_layer}); {remedy}. "
                + (f"The last checkpoint written before this step, {last}, is intact." if last
                   else "No checkpoint was written before this step.")
            )
        return states, out

    def _log_loss(self, stage: str, out: LossOutput, batch_size: int) -> None:
        on_step = stage == "train"
        kw = dict(on_step=on_step, on_epoch=not on_step, batch_size=batch_size)
        # The training loss is averaged over ranks (one scalar all-reduce per step), so its curve is the
        # global batch's whatever the number of processes; per-layer values are rank 0's own batch.
        self.log(f"{stage}/loss", out.total.detach(), prog_bar=True, sync_dist=on_step, **kw)
        for name, value in out.logs.items():
            self.log(f"{stage}/{name}", value, **kw)
        kind = "mse" if self.backbone.regression else "ce"  # a regression head's loss is MSE
        for layer, value in out.layer_ce.items():
            self.log(f"{stage}/layer_{layer:02d}/{kind}", value, **kw)

    def _train_step(self) -> TrainStep:
        # The planned number of optimizer steps only matters to the gradual curriculum; the trainer
        # knows it once fitting has started.
        if self._total_steps is None:
            total = self.trainer.estimated_stepping_batches
            self._total_steps = int(total) if total != float("inf") else 0
        return TrainStep(index=self.global_step, total=self._total_steps)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        # Every rank derives the same step, hence the same dropped layers and active exits.
        step = self._train_step()
        skip = self.loss.dropped_layers(step.index, self.backbone.num_layers)
        states, out = self._step(batch, step, skip)
        bs = batch["input_ids"].shape[0]
        self._log_loss("train", out, bs)
        if self.loss.layer_dropout is not None:
            self.log("train/skipped_layers", float(len(skip)), on_step=True, batch_size=bs)
        # Per-layer accuracy costs one extra head pass per exit: only when the logger writes.
        if self.global_step % max(self.trainer.log_every_n_steps, 1) == 0:
            preds, _, labels = layer_predictions(states, self.backbone)
            for k, layer in enumerate(states.layers if not preds.is_floating_point() else ()):  # classes only
                self.log(f"train/layer_{layer:02d}/acc", (preds[k] == labels).float().mean(), batch_size=bs)
        return out.total

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        states, out = self._step(batch)
        preds, token_ce, labels = layer_predictions(states, self.backbone)
        # the epoch's val/ values weight each batch by what it scores (tokens; examples for a sequence head),
        # so val/loss and val/layer_XX/ce are the token means val/layer_XX/loss and the layer report give
        self._log_loss("val", out, max(labels.numel(), 1))
        self.val_stats.update(preds, token_ce, labels)

    def on_validation_epoch_start(self) -> None:
        self.val_stats.reset()

    def on_validation_epoch_end(self) -> None:
        self.val_rows = self.val_stats.compute()
        for r in self.val_rows:
            for metric in ("loss", "acc", "agree"):
                if metric in r:  # a regression head's rows have the loss (MSE) alone
                    self.log(f"val/layer_{r['layer']:02d}/{metric}", r[metric])
        self.log("val/full/loss", self.val_rows[-1]["loss"])

    # --- exact resume: RNG states travel in the checkpoint -----------------------------------------
    # Lightning restores weights, optimizer, scheduler, loop counters (hence global step: curriculum and
    # layer-dropout draws) and, through the data module, the position in the epoch; the global RNG states
    # (torch, CUDA, numpy, random: model dropout) are saved here and set again just before training
    # restarts, after everything that draws from them while a run starts up.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_states = checkpoint.get("rng_states")

    def on_train_start(self) -> None:
        if self._rng_states is not None:
            set_rng_states(self._rng_states)
            self._rng_states = None

    # --- sharded strategies (eetrain.distributed) ------------------------------------------------------
    def on_fit_start(self) -> None:
        from eetrain.distributed import gather_heads_under_zero3

        gather_heads_under_zero3(self.trainer.strategy, self)

    def on_train_end(self) -> None:
        # before Lightning's teardown, while every rank still holds its shard
        from eetrain.distributed import consolidated_state

        self.consolidated = consolidated_state(self.trainer.strategy, self)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if not self.scheduler or self.scheduler.get("name") in (None, "constant"):
            return optimizer
        from transformers import get_scheduler

        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):  # max_steps=-1 and max_epochs=-1: training never ends
            raise ConfigError(f"scheduler.name={self.scheduler['name']!r} spreads over the run's steps, and this run "
                              "is unbounded: set trainer.max_steps or trainer.max_epochs, or scheduler.name=constant")
        total = int(total)
        warmup = self.scheduler.get("warmup_steps") or int(self.scheduler.get("warmup_ratio", 0.0) * total)
        sched = get_scheduler(self.scheduler["name"], optimizer, num_warmup_steps=warmup, num_training_steps=total)
        if self.scheduler["name"] == "reduce_lr_on_plateau":  # steps on a metric: the last exit's validation loss
            return {"optimizer": optimizer,
                    "lr_scheduler": {"scheduler": sched, "monitor": "val/full/loss", "interval": "epoch"}}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
