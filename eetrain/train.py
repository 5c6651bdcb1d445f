"""The training recipe, top to bottom: build, fit, report every exit, export."""

from __future__ import annotations

import csv
import re
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from eetrain.backbones.base import ExitBackbone
from eetrain.checkpointing import AtomicCheckpointIO, check_run_inputs, export_pretrained, monitor_check
from eetrain.config import build
from eetrain.distributed import full_backbone, training_strategy
from eetrain.errors import ConfigError, EetrainError, StoppedBySignal, boolean
from eetrain.files import atomic_file
from eetrain.layer_metrics import LayerStats, format_table, layer_predictions
from eetrain.losses.joint import JointLoss
from eetrain.module import EarlyExitModule
from eetrain.progress import check_progress_env
from eetrain.resume import continued_wandb_run, resume_path, slurm_plugins
from eetrain.wandb_panels import log_export_artifact


@torch.no_grad()
def evaluate_layers(backbone: ExitBackbone, loader: Any) -> list[dict[str, float]]:
    """Per-layer loss, top-1 accuracy and agreement with the last layer over a data loader."""
    was_training = backbone.training
    backbone.eval()
    stats = LayerStats(tuple(range(1, backbone.num_layers + 1)))
    device = next(backbone.parameters()).device
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        stats.update(*layer_predictions(backbone(batch), backbone))
    backbone.train(was_training)
    return stats.compute()


def exit_settings(cfg: DictConfig, backbone: ExitBackbone, loss: JointLoss, rows: list[dict]) -> dict[str, Any]:
    """What a reader of the export needs to run early exit: depth, trained exits, weights, report."""
    trained = {}
    for name, term in loss.terms.items():
        if hasattr(term, "resolve"):
            layers, weights = term.resolve(backbone.num_layers)
            trained[name] = {"layers": list(layers), "weights": [round(float(w), 6) for w in weights]}
    return {
        "family": backbone.family,
        "num_layers": backbone.num_layers,
        "hidden_size": backbone.hidden_size,
        "head_kind": backbone.head_kind,
        # per_layer: exits below the last have their own heads, in exit_heads.safetensors beside the model
        "exit_head": "shared" if backbone.exit_heads is None else "per_layer",
        "exit_head_layers": None if backbone.exit_heads is None else sorted(int(k) for k in backbone.exit_heads),
        "trained_exits": trained,
        "loss": OmegaConf.to_container(cfg.loss, resolve=True),
        "validation_layers": rows,
    }


def write_rows(rows: list[dict[str, float]], path: Path) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def load_module_weights(module: EarlyExitModule, ckpt_path: str | None) -> None:
    """Load a Lightning checkpoint's weights into `module` (no optimizer state); None keeps them."""
    if ckpt_path is None:
        return
    path = Path(str(ckpt_path)).expanduser()
    if not path.is_file():
        raise ConfigError(f"ckpt_path={str(ckpt_path)!r}: no such checkpoint file (train=false needs a path)")
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    module.load_state_dict(state, strict=True)


def check_interpolations(node: Any, key: str = "") -> None:
    """Every `${...}` of the config resolves, else a ConfigError naming its key: OmegaConf raises where a
    value is first read (deep inside a build, naming no key), and an unset environment variable in
    `${oc.env:...}` would otherwise end in a traceback."""
    from omegaconf import DictConfig, ListConfig
    from omegaconf.errors import InterpolationResolutionError

    names = list(node.keys()) if isinstance(node, DictConfig) else list(range(len(node)))
    for name in names:
        path = f"{key}.{name}" if key else str(name)
        if path == "hydra" or OmegaConf.is_missing(node, name):  # (??? is reported where it is built)
            continue
        try:
            value = node[name]
        except InterpolationResolutionError as e:
            inner = e.__cause__ or e.__context__
            while inner is not None and not isinstance(inner, EetrainError):
                inner = inner.__cause__ or inner.__context__
            if inner is not None:  # a resolver's own message (eetrain_shallow) names its key
                raise inner from None
            message = str(e).splitlines()[0]
            raise ConfigError(f"{path}={OmegaConf.to_container(node, resolve=False)[name]}: {message}") from None
        if isinstance(value, DictConfig | ListConfig):
            check_interpolations(value, path)


def check_fresh_run_dir(out_dir: Path) -> None:
    """A fresh start (no checkpoint to resume) into a run directory that holds another run's checkpoints or
    metrics is refused: Lightning would save this run's as last-v1.ckpt beside the other's last.ckpt, and
    the CSV logger append its rows to the other's (`ckpt_path=<run>/checkpoints/last.ckpt` would then
    resume the wrong run)."""
    found = sorted(out_dir.glob("checkpoints/*.ckpt")) + sorted(out_dir.glob("csv/**/metrics.csv"))
    if found:
        names = ", ".join(str(p.relative_to(out_dir)) for p in found[:3]) + (", ..." if len(found) > 3 else "")
        raise ConfigError(
            f"hydra.run.dir={out_dir} already holds a run ({names}): resume it with "
            f"ckpt_path={out_dir / 'checkpoints' / 'last.ckpt'}, or start this one in another hydra.run.dir"
        )


def run(cfg: DictConfig) -> float:
    """Train with `cfg`; returns the last layer's validation loss (for sweeps)."""
    check_interpolations(cfg)
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed={seed!r}; allowed: an integer in 0..{2**32 - 1}")
    for key in ("train", "export"):
        boolean(cfg.get(key, True), key)
    check_progress_env()  # the stages' bars read it after training: a bad value fails now
    tags = cfg.get("tags")
    tags = OmegaConf.to_container(tags) if OmegaConf.is_config(tags) else tags
    if tags is not None and (not isinstance(tags, list) or not all(isinstance(t, str) for t in tags)):
        # (W&B takes a lone string as its characters: tags=foo became f, o, o)
        raise ConfigError(f"tags={tags!r}; allowed: a list of strings, e.g. tags=[foo] or tags=[foo,bar]")
    L.seed_everything(seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    backbone: ExitBackbone = build(cfg.model, "model")
    loss: JointLoss = build(cfg.loss, "loss")
    for term in loss.terms.values():
        if hasattr(term, "resolve"):
            term.resolve(backbone.num_layers)  # bad exit layers or weights fail before any data loads
    from eetrain.exits.settings import check_min_exit_layers

    check_min_exit_layers(cfg, backbone.num_layers)  # the export's policy uses them, stages or not
    if cfg.get("stages"):
        from eetrain.stages import check_stages

        check_stages(cfg, backbone)  # a bad stage setting fails now, not after the fit
    data = build(cfg.data, "data", tokenizer=backbone.tokenizer, collate_fn=backbone.collate)
    if hasattr(data, "check_fits"):  # eetrain's data modules: classes for a BERT head, texts for T5 / LLaMA
        data.check_fits(backbone)
    if cfg.get("stages"):
        from eetrain.stages import check_splits

        check_splits(cfg, data)  # a stage's split that the files lack fails now, not after the fit
    data.shuffle_seed = int(cfg.seed)  # the training order: one seeded permutation per epoch, resumable
    module = EarlyExitModule(
        backbone,
        loss,
        optimizer=build(cfg.optimizer, "optimizer"),
        scheduler=OmegaConf.to_container(cfg.scheduler) if cfg.get("scheduler") else None,
    )
    check_run_inputs(cfg, module)  # optimizer.lr, and ckpt_path against this model (fit and train=false alike)
    resume = resume_path(cfg, out_dir) if cfg.get("train", True) else None
    if cfg.get("train", True) and resume is None:
        check_fresh_run_dir(out_dir)
    loggers = [build(c, f"logger.{k}", **continued_wandb_run(c, out_dir, resume))
               for k, c in (cfg.get("logger") or {}).items()]
    named = {k: build(c, f"callbacks.{k}") for k, c in (cfg.get("callbacks") or {}).items() if c is not None}
    if not loggers:  # logger=none: the learning-rate monitor has nowhere to write (Lightning refuses it)
        named = {k: c for k, c in named.items() if not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)}
    callbacks = list(named.values())
    check = monitor_check(named)  # a monitored name nothing logs: found before training, not at the first save
    if check is not None:
        callbacks.append(check)
    # the strategy gets what its config cannot know from the model (FSDP's block classes, DDP's unused
    # parameters); under SLURM, Lightning's environment with our requeue settings
    strategy = training_strategy(cfg.trainer.get("strategy"), backbone, loss)
    trainer: L.Trainer = build(
        cfg.trainer, "trainer", logger=loggers or False, callbacks=callbacks, plugins=[AtomicCheckpointIO(), *slurm_plugins(cfg)],
        **({} if strategy is None else {"strategy": strategy}),
    )
    for lg in loggers:
        try:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        except Exception as e:
            if type(e).__module__.startswith("wandb") and type(e).__name__ == "UsageError":  # W&B's first call: login
                raise ConfigError(f"logger=wandb: {str(e).splitlines()[0]} Or log offline: WANDB_MODE=offline "
                                  "(then `wandb sync <run dir>/wandb/offline-run-*`), or logger=csv") from e
            raise
    try:
        if cfg.get("train", True):
            # ckpt_path, or for a requeued SLURM job its run's newest checkpoint
            try:
                trainer.fit(module, datamodule=data, ckpt_path=resume)
            except SIGTERMException:  # Lightning stops after the current step (a SystemExit with code 0)
                callback = trainer.checkpoint_callback
                last = getattr(callback, "last_model_path", "") if callback is not None else ""
                lost = (" (it came during validation: the resumed run does not repeat that one)"
                        if getattr(callback, "stopped_in_validation", False) else "")
                raise StoppedBySignal(
                    f"stopped by SIGTERM after global step {trainer.global_step}{lost}; "
                    + (f"{last} holds it: resume with ckpt_path={last}" if last else
                       "no checkpoint was written (callbacks.model_checkpoint is off)")
                ) from None
            except MisconfigurationException as e:  # found once metrics exist: a monitor nothing logs
                if "monitor" not in str(e):
                    raise
                key = "callbacks.model_checkpoint.monitor" if "ModelCheckpoint(" in str(e) else "callbacks (a monitor)"
                raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from e
            except ValueError as e:  # Lightning checks the interval only once the data are loaded
                if "`val_check_interval`" not in str(e):
                    raise
                batches = re.search(r"training batches \((\d+)\)", str(e))
                raise ConfigError(
                    f"trainer.val_check_interval={cfg.trainer.get('val_check_interval')}: more steps than an epoch "
                    f"has training batches ({batches.group(1) if batches else 'fewer'}); set a smaller number, "
                    "1.0 (once per epoch), or trainer.check_val_every_n_epoch=null to count steps across epochs"
                ) from None
            backbone = full_backbone(cfg.model, module)  # after FSDP / ZeRO-3: gathered on rank 0
        else:
            # evaluation only (train=false): the weights are model.name_or_path's, or ckpt_path's
            load_module_weights(module, cfg.get("ckpt_path"))
            data.setup("validate")
        if not trainer.is_global_zero:
            return float("nan")
        phase = ["the per-layer report"]  # what SIGTERM would cut short from here on (`_stop_after_fit`)
        _stop_after_fit(cfg, trainer, phase)
        data.setup("validate")  # under ddp_spawn the fit ran in child processes: load here too
        # Lightning moves the module back to the CPU when fit ends (and train=false never moved it): the
        # report and the stages run on the trainer's device, where their speed-ups mean something
        backbone.to(trainer.strategy.root_device)
        rows = evaluate_layers(backbone, data.val_dataloader())
        note = "mse: a regression head's mean squared error" if "acc" not in rows[0] else (
            "agree_last: top-1 equals the last layer's top-1")
        print(f"\nPer-layer validation report ({note})")
        print(format_table(rows))
        write_rows(rows, out_dir / "layer_report.csv")
        if cfg.get("export", True):
            phase[0] = "the export"
            where = export_pretrained(backbone, out_dir / "export", exit_settings(cfg, backbone, loss, rows))
            from eetrain.decoding.settings import export_policy

            export_policy(cfg, backbone, out_dir, where)  # the configured policy; `policies` calibrates it
            print(f"\nExported model, tokenizer and early_exit.json to {where}")
        if cfg.get("stages"):
            # Later stages (e.g. exit classifiers on the frozen backbone) run on the trained model.
            from eetrain.stages import run_stages

            phase[0] = "the stages"
            run_stages(cfg, backbone, data, out_dir)
        if (out_dir / "export").is_dir():
            # after the stages, which add the classifiers and the calibrated policy to the export
            log_export_artifact(out_dir / "export", trainer)  # callbacks.wandb_panels.export_artifact=true
        return rows[-1]["loss"]
    finally:
        if signal.getsignal(signal.SIGTERM) is getattr(_stop_after_fit, "handler", None):  # (set once it ran)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
            import wandb

            wandb.finish()


def _stop_after_fit(cfg: DictConfig, trainer: L.Trainer, phase: list[str]) -> None:
    """After the fit Lightning hands SIGTERM back to its default (the process just ends): make it one line
    saying what it cut short, with the command that redoes that part without training."""
    from eetrain import stages

    callback = trainer.checkpoint_callback
    weights = getattr(callback, "last_model_path", "") or cfg.get("ckpt_path") or cfg.get("model", {}).get("name_or_path")

    def handler(signum: int, frame: Any) -> None:
        where = phase[0] if phase[0] != "the stages" else f"stage {stages.running or '(between stages)'}"
        redo = f"train=false ckpt_path={weights}" if str(weights).endswith(".ckpt") else "train=false"
        raise StoppedBySignal(
            f"stopped by SIGTERM after training, in {where}; what the run wrote before is intact, the rest is "
            f"missing (an export's policy stays uncalibrated until `policies` runs): redo it with {redo} and "
            f"the same settings (stages=[...] as needed)"
        )

    _stop_after_fit.handler = handler
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
