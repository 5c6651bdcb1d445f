"""Checkpoints that are never left half-written, the `transformers` export of a trained model, and the
checks of what a run is given (a checkpoint that fits the model, a usable learning rate)."""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from eetrain.backbones.base import ExitBackbone
from eetrain.errors import ConfigError, check_keys
from eetrain.files import atomic_directory, atomic_file

EXIT_SETTINGS_FILE = "early_exit.json"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write a temp file beside `path`, then rename it over `path` (`eetrain.files.atomic_file`): a crash
    mid-save leaves the old checkpoint intact."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        protocol = get_filesystem(path).protocol
        if "file" not in (protocol if isinstance(protocol, tuple) else (protocol,)):
            # Remote filesystems (s3://, gs://) have their own atomic object writes.
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_file(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


def export_pretrained(backbone: ExitBackbone, directory: str | Path, settings: dict[str, Any]) -> Path:
    """Save model + tokenizer (plain `from_pretrained` loads them) and the early-exit settings as JSON.

    The directory appears complete or not at all (`eetrain.files.atomic_directory`).
    """
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        backbone.save_pretrained(str(tmp))
        (tmp / EXIT_SETTINGS_FILE).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return directory


def load_exit_settings(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / EXIT_SETTINGS_FILE).read_text())


# ---------------------------------------------------------------------------------------------------
# Checking what a run is given before it starts: a checkpoint to resume from or load, the learning rate
# ---------------------------------------------------------------------------------------------------

def _load_any(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # noqa: BLE001 - an old (non-zip) file cannot be memory-mapped: read it whole
        return torch.load(path, map_location="cpu", weights_only=False)


def _layers(keys: Any, prefix: str) -> int:
    """How many blocks of the stack `prefix` (e.g. `backbone.model.decoder.block`) the keys hold."""
    found = set()
    for key in keys:
        if key.startswith(prefix + "."):
            head = key[len(prefix) + 1 :].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return max(found) + 1 if found else 0


def _shape_of_model(module: Any, state: Mapping[str, Any]) -> tuple[str, str] | None:
    """(`blocks` prefix, head-weight key) of an EarlyExitModule's state_dict, or None."""
    backbone = getattr(module, "backbone", None)
    if backbone is None:
        return None
    prefix = next((name for name, m in module.named_modules() if m is getattr(backbone, "blocks", None)), None)
    head = backbone.head_weight
    key = next((k for k, v in module.state_dict(keep_vars=True).items() if v is head), None)
    if prefix is None or key is None:
        return None
    return prefix, key


def check_checkpoint(path: Any, module: Any, key: str = "ckpt_path") -> dict[str, Any]:
    """Load the Lightning checkpoint at `path` (on the CPU) and check that it fits `module`.

    Returns the checkpoint. A missing, truncated or corrupt file, a file without a `state_dict`, or a
    state_dict of another model (other keys or shapes) is a ConfigError naming `key` and saying what
    differs: for a backbone, its depth and hidden size (`the checkpoint's model has 8 layers / d_model
    128, this one 4 / 64`), else the first differing keys and shapes.
    """
    shown = str(path)
    file = Path(shown).expanduser()
    if not file.is_file():
        raise ConfigError(f"{key}={shown!r}: no such checkpoint file")
    try:
        ckpt = _load_any(file)
    except Exception as e:  # noqa: BLE001 - whatever torch/pickle raise for a damaged file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"{key}={shown!r}: not a readable checkpoint, the file is truncated or corrupt ({type(e).__name__}: "
            f"{reason[:160]})"
        ) from None
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise ConfigError(f"{key}={shown!r}: not a Lightning checkpoint (no state_dict); expected a .ckpt that "
                          "training wrote under <run>/checkpoints/")
    theirs: Mapping[str, Any] = ckpt["state_dict"]
    ours = module.state_dict()
    missing = [k for k in ours if k not in theirs]
    unexpected = [k for k in theirs if k not in ours]
    shapes = [
        (k, tuple(theirs[k].shape), tuple(v.shape))
        for k, v in ours.items()
        if k in theirs and hasattr(theirs[k], "shape") and tuple(theirs[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or shapes):
        return ckpt
    where = _shape_of_model(module, ours)
    if where is not None and where[1] in theirs:
        prefix, head = where
        d_theirs = tuple(theirs[head].shape)[-1]
        d_ours = tuple(ours[head].shape)[-1]
        n_theirs, n_ours = _layers(theirs, prefix), _layers(ours, prefix)
        if (n_theirs, d_theirs) != (n_ours, d_ours):
            raise ConfigError(
                f"{key}={shown!r}: the checkpoint's model has {n_theirs} layers / d_model {d_theirs}, this one "
                f"{n_ours} / {d_ours}; use the model settings it was trained with (e.g. the same model=... and "
                "model.config.*) or another checkpoint"
            )
    parts = []
    if shapes:
        k, a, b = shapes[0]
        parts.append(f"{len(shapes)} tensor(s) of another shape, e.g. {k}: {list(a)} in the checkpoint, {list(b)} here")
    if missing:
        parts.append(f"{len(missing)} missing, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} not in this model, e.g. {unexpected[0]}")
    raise ConfigError(f"{key}={shown!r}: the checkpoint is of another model: " + "; ".join(parts))


def check_learning_rate(optimizer: Mapping[str, Any] | None, key: str = "optimizer.lr") -> None:
    """`optimizer.lr` must be a finite number > 0 (null only with Adafactor's `relative_step: true`)."""
    if not optimizer:
        return
    lr = optimizer.get("lr")
    if lr is None and optimizer.get("relative_step"):
        return
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"{key}={lr!r}; allowed: a finite number > 0 (e.g. 1e-4)")


#: flags of torch's optimizers that are not settings of the algorithm (added over torch releases)
TORCH_OPTIMIZER_SWITCHES = {"foreach", "fused", "capturable", "differentiable", "maximize", "decoupled_weight_decay"}


def check_optimizer_state(ckpt: Mapping[str, Any], factory: Any, shown: str) -> None:
    """Resuming restores the optimizer's state: the checkpoint's must be of the optimizer configured now
    (its parameter groups carry the same settings), or Lightning fails inside the optimizer's step."""
    states = ckpt.get("optimizer_states") or []
    if not states or factory is None:
        return
    groups = (states[0] or {}).get("param_groups") or []
    if not groups:
        return
    theirs = set(groups[0]) - {"params"}
    # torch adds implementation switches to its optimizers' defaults over releases, and fills them in when a
    # state from an older release loads: only the optimizer's own settings tell two optimizers apart
    ours = set(factory([torch.nn.Parameter(torch.zeros(1))]).defaults) - TORCH_OPTIMIZER_SWITCHES
    if not ours <= theirs:
        raise ConfigError(
            f"ckpt_path={shown!r} was trained with another optimizer (its settings: {sorted(theirs)}; the configured "
            f"one needs {sorted(ours - theirs)}): resume with the optimizer it was trained with (optimizer=...)"
        )


def check_trainer_counts(trainer: Mapping[str, Any]) -> None:
    """Trainer settings that Lightning accepts and then divides by once fitting runs."""
    interval = trainer.get("val_check_interval")
    if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0):
        raise ConfigError(f"trainer.val_check_interval={interval!r}; allowed: a fraction of an epoch in (0, 1] or a "
                          "number of training steps >= 1")
    every = trainer.get("check_val_every_n_epoch")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ConfigError(f"trainer.check_val_every_n_epoch={every!r}; allowed: null (count steps across epochs) "
                          "or an integer >= 1")
    clip = trainer.get("gradient_clip_val")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, int | float) or clip < 0):
        raise ConfigError(f"trainer.gradient_clip_val={clip!r}; allowed: null or 0 (no clipping) or a number > 0")
    accumulate = trainer.get("accumulate_grad_batches")
    if accumulate is not None and (isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1):
        raise ConfigError(f"trainer.accumulate_grad_batches={accumulate!r}; allowed: an integer >= 1")


def check_optimizer_and_schedule(factory: Any, scheduler: Mapping[str, Any] | None) -> None:
    """The optimizer built once on a stand-in parameter (its own argument checks, now rather than when
    fitting starts), and `scheduler.name` / `warmup_ratio` / `warmup_steps`."""
    if factory is not None:
        try:
            factory([torch.nn.Parameter(torch.zeros(1))])
        except Exception as e:  # noqa: BLE001 - built on a stand-in, only its settings can be wrong
            given = getattr(factory, "keywords", {}) or {}
            target = getattr(factory, "func", None)
            if isinstance(e, TypeError) and "unexpected keyword argument" in str(e) and target is not None:
                import inspect

                takes = [n for n in inspect.signature(target).parameters if n not in ("self", "params")]
                unknown = sorted(set(given) - set(takes))
                raise ConfigError(f"optimizer: {target.__name__} takes no {', '.join(unknown)}; allowed: "
                                  f"{', '.join(takes)}") from e
            texts = [f"optimizer.{k}={v!r}" for k, v in given.items() if isinstance(v, str)]
            # torch's own words may name no setting (a short `betas` gives "list index out of range")
            hint = (f" (text where a number may be expected: {', '.join(texts)})" if texts else
                    f" (the optimizer's settings: {', '.join(f'optimizer.{k}={v!r}' for k, v in given.items())})"
                    if given else "")
            raise ConfigError(f"optimizer: {str(e).splitlines()[0]}{hint}") from e
    if not scheduler:
        return
    check_keys(scheduler, ("name", "warmup_ratio", "warmup_steps"), "scheduler")
    from transformers import SchedulerType

    # the schedules transformers builds from warmup and total steps alone (min_lr / decay-step ones need more;
    # greedy's GreedyLR is no torch LRScheduler, which Lightning refuses)
    needs_more = ("cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay", "greedy")
    name, names = scheduler.get("name"), [t.value for t in SchedulerType if t.value not in needs_more]
    if name is not None and name not in names:
        raise ConfigError(f"scheduler.name={name!r}; allowed: {', '.join(names)}")
    ratio = scheduler.get("warmup_ratio", 0.0)
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio < 1:
        raise ConfigError(f"scheduler.warmup_ratio={ratio!r}; allowed: a number in [0, 1) (share of the steps)")
    steps = scheduler.get("warmup_steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ConfigError(f"scheduler.warmup_steps={steps!r}; allowed: null (warmup_ratio) or an integer >= 0")


#: `ckpt_path` values Lightning resolves itself (no file to check here)
LIGHTNING_CKPT_NAMES = ("last", "hpc", "best")


def checkable_checkpoint(path: Any) -> bool:
    """Whether `ckpt_path` names one local checkpoint file to check: not Lightning's `last` / `hpc` /
    `best` / `registry:...`, not a remote URL, not a sharded checkpoint directory (DeepSpeed, FSDP)."""
    text = str(path)
    if text in LIGHTNING_CKPT_NAMES or text.startswith("registry") or "://" in text:
        return False
    return not Path(text).expanduser().is_dir()


def check_named_checkpoint(name: str, out_dir: Path, pinned: bool = False) -> None:
    """Lightning's `ckpt_path` names resolve in this run's directory: `best` never holds one when a run
    starts, and `last` / `hpc` only when the directory is an old run's. In a directory this run just made
    (a new timestamped one) Lightning warns and trains from scratch; here that is an error naming what to
    set. In a `pinned` directory (`hydra.run.dir` given, a sweep's job directory) an empty one is a first
    run, which starts fresh (a script that always passes ckpt_path=last)."""
    resume = "resume from a file (ckpt_path=<run>/checkpoints/last.ckpt), or pin the run directory: hydra.run.dir=<run>"
    if name == "best":
        raise ConfigError(f"ckpt_path=best is Lightning's best checkpoint of the fit under way, which a new run does "
                          f"not have; {resume} ckpt_path=last")
    found = [out_dir / "checkpoints" / "last.ckpt"] if name == "last" else list(out_dir.glob("hpc_ckpt_*.ckpt"))
    if not any(p.is_file() for p in found):
        where = out_dir / "checkpoints" / "last.ckpt" if name == "last" else out_dir / "hpc_ckpt_*.ckpt"
        if pinned:
            print(f"[resume] ckpt_path={name}: no {where} yet, so this run starts from scratch")
            return
        raise ConfigError(f"ckpt_path={name}: there is no {where} (this run's new directory); {resume} "
                          f"ckpt_path={name}")


def _pinned_run_directory() -> bool:
    """Whether the run directory was chosen on the command line (`hydra.run.dir`) or is a sweep job's,
    rather than a new timestamped one."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False
    hc = HydraConfig.get()
    return hc.mode == RunMode.MULTIRUN or any(o.split("=", 1)[0].lstrip("+") == "hydra.run.dir"
                                              for o in hc.overrides.hydra)


def check_run_inputs(cfg: Any, module: Any) -> None:
    """Before any training or evaluation: unknown `exits` keys, trainer counts Lightning divides by,
    `optimizer.lr`, the optimizer and scheduler settings, and `ckpt_path` (a checkpoint file against
    `module` and, when fitting, its optimizer state against the configured optimizer; a directory only
    when it holds a sharded checkpoint)."""
    if cfg.get("exits") is not None:
        check_keys(cfg.exits, ("layers", "min_layer", "train_below_min"), "exits")
    check_head_layers(cfg.get("model"), module.backbone)
    check_trainer_counts(cfg.get("trainer") or {})
    check_learning_rate(cfg.get("optimizer"))
    check_optimizer_and_schedule(module.optimizer_factory, module.scheduler)
    path = cfg.get("ckpt_path")
    if path is not None and cfg.get("train", True) and str(path) in LIGHTNING_CKPT_NAMES:
        check_named_checkpoint(str(path), Path(str(cfg.paths.output_dir)), _pinned_run_directory())
    if path is not None and checkable_checkpoint(path):
        ckpt = check_checkpoint(path, module)
        if cfg.get("train", True):
            check_optimizer_state(ckpt, module.optimizer_factory, str(path))
    elif path is not None and Path(str(path)).expanduser().is_dir() and not is_sharded_checkpoint(path):
        raise ConfigError(f"ckpt_path={str(path)!r} is a directory but not a sharded (DeepSpeed / FSDP) checkpoint; "
                          "point it at a .ckpt file, e.g. <run>/checkpoints/last.ckpt")


def check_head_layers(model_cfg: Any, backbone: ExitBackbone) -> None:
    """`model.exit_head_layers` set by hand (not the `${exits.layers}` it defaults to) chooses per-layer
    heads; with a shared head nothing reads it, so the run would not be the one asked for."""
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(model_cfg, DictConfig) or "exit_head_layers" not in model_cfg:
        return
    if OmegaConf.is_interpolation(model_cfg, "exit_head_layers") or model_cfg.exit_head_layers is None:
        return
    if backbone.exit_heads is None:
        value = model_cfg.exit_head_layers
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value)
        raise ConfigError(
            f"model.exit_head_layers={value} chooses per-layer "
            f"exit heads, but model.exit_head={model_cfg.get('exit_head') or 'null (here: shared)'} gives every "
            "exit the model's own head; set model.exit_head=per_layer, or drop model.exit_head_layers"
        )


class ModelCheckpoint(L.pytorch.callbacks.ModelCheckpoint):
    """Lightning's `ModelCheckpoint` (the best `monitor` of every validation, `last.ckpt`) where
    `every_n_train_steps` only adds a `last.ckpt` every N optimizer steps: in Lightning's it replaces the
    saves at validation, so the last steps and the best score went unsaved and the top-k file of a step
    carried the score of an earlier validation. When SIGTERM stops the fit (preemption, `scancel`),
    Lightning ends after the current batch; `last.ckpt` is written there, so the resumed run loses nothing.

    Under gradient accumulation both saves wait for the optimizer step: a checkpoint taken inside an
    accumulation window would lose the gradients of its first batches (they are not saved), so a SIGTERM
    that comes inside one is held back until the window's last batch (at most
    `accumulate_grad_batches - 1` more batches)."""

    def __init__(self, *args: Any, every_n_train_steps: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_every_n_train_steps = every_n_train_steps or 0
        self._step_at_batch_start = 0
        self._held_sigterm = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_start(trainer, pl_module, *args, **kwargs)
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        stepped = trainer.global_step > self._step_at_batch_start  # False inside an accumulation window
        connector = trainer._signal_connector
        if not stepped and connector.received_sigterm:  # Lightning would stop after this batch: hold it back
            connector.received_sigterm, self._held_sigterm = False, True
        elif stepped and self._held_sigterm:
            connector.received_sigterm, self._held_sigterm = True, False
        n = self.last_every_n_train_steps
        if n and stepped and trainer.global_step % n == 0 and not self._should_skip_saving_checkpoint(trainer):
            saved = self._last_global_step_saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            # not a save of this step's top-k: a validation right after it (the epoch's end) still saves
            self._last_global_step_saved = saved

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        if isinstance(exception, SIGTERMException):
            #: SIGTERM came during a validation of the fit: a resume does not run that one again
            self.stopped_in_validation = bool(trainer.validating)
            if not self._should_skip_saving_checkpoint(trainer):
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class MonitorCheck(L.Callback):
    """Right after Lightning's sanity validation, every callback that monitors a validation metric
    (`val/...`) must name one that validation logged: Lightning itself finds a missing one only at the
    first save, an epoch (or `val_check_interval` steps) of training later, and stops without saving it.

    monitors: config key -> monitored name (`callbacks.model_checkpoint.monitor` -> `val/loss`); later:
    names logged only after real validations (the task-metric callback skips the sanity check)."""

    def __init__(self, monitors: Mapping[str, str], later: Collection[str] = ()) -> None:
        self.monitors, self.later = dict(monitors), set(later)

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logged = set(trainer.callback_metrics)
        for key, name in self.monitors.items():
            if name.startswith("val/") and name not in logged and name not in self.later:
                shown = sorted(m for m in logged if m.startswith("val/"))
                raise ConfigError(f"{key}={name!r}: validation logs no such metric; it logs {shown}")


def monitor_check(callbacks: Mapping[str, Any]) -> MonitorCheck | None:
    """A `MonitorCheck` for the built `callbacks` (config name -> callback) that monitor a metric."""
    from eetrain.decoding.callback import GenerationMetrics
    from eetrain.task_metrics import TEXT_METRICS

    monitors = {f"callbacks.{k}.monitor": c.monitor for k, c in callbacks.items()
                if isinstance(getattr(c, "monitor", None), str)}
    if not monitors:
        return None
    later: set[str] = set()
    if any(isinstance(c, GenerationMetrics) for c in callbacks.values()):
        later = {f"val/{m}{end}" for m in TEXT_METRICS for end in ("", "_early_exit")} | {"val/early_exit_mean_layer"}
    return MonitorCheck(monitors, later)


def is_sharded_checkpoint(path: Any) -> bool:
    """A checkpoint directory DeepSpeed (`latest`, `checkpoint/`) or FSDP / torch.distributed.checkpoint
    (`meta.pt`, `.metadata`) wrote."""
    root = Path(str(path)).expanduser()
    return any((root / name).exists() for name in ("latest", "checkpoint", "meta.pt", ".metadata"))
