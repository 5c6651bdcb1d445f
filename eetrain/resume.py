"""Resuming a run: the RNG states a checkpoint carries, and the checkpoint a requeued SLURM job picks up.

Lightning restores weights, optimizer, LR scheduler and loop counters from `ckpt_path`; the data module
restores the position inside the epoch (`eetrain.data.sampler`); the module saves and restores the global
RNG states with the functions here. A SLURM job that was requeued (`SLURM_RESTART_COUNT` > 0) resumes from its
run directory's newest checkpoint (`requeue_checkpoint`), also when it was started from a `ckpt_path`.
"""

from __future__ import annotations

import csv
import os
import random
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from eetrain.errors import ConfigError


def rng_states() -> dict[str, Any]:
    """The global RNG states of torch (CPU and CUDA), numpy and Python, as tensors and plain Python values
    (a checkpoint that holds them still loads with `torch.load(weights_only=True)`)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(state), py_gauss],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Set the states `rng_states` returned (CUDA's only where CUDA is available and they were saved)."""
    torch.set_rng_state(states["torch"])
    if states.get("torch.cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch.cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, py_gauss = states["python"]
    random.setstate((version, tuple(state), py_gauss))


def slurm_restart_count() -> int:
    """How often SLURM has requeued this job (0 outside SLURM or on the first run)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def requeue_checkpoint(out_dir: str | Path) -> Path | None:
    """A requeued SLURM job's checkpoint: the newest of `<run>/checkpoints/last.ckpt` (written every
    `callbacks.model_checkpoint.every_n_train_steps` and at validation) and Lightning's own
    `<run>/hpc_ckpt_N.ckpt` (written on the requeue signal); None on a first run or without one."""
    if slurm_restart_count() < 1:
        return None
    out_dir = Path(out_dir)
    found = [p for p in (out_dir / "checkpoints" / "last.ckpt", *out_dir.glob("hpc_ckpt_*.ckpt")) if p.exists()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def resume_path(cfg: DictConfig, out_dir: str | Path) -> str | None:
    """A requeued SLURM job's newest checkpoint in its own run directory (printed): it is ahead of any
    `ckpt_path` the job was started from; else `ckpt_path` as given (a path, or Lightning's `last`), else
    None (a fresh start)."""
    given = cfg.get("ckpt_path")
    found = requeue_checkpoint(out_dir)
    if found is not None:
        print(f"[resume] SLURM requeue {slurm_restart_count()}: resuming from {found}"
              + (f" (not ckpt_path={given}, which this job started from)" if given is not None else ""))
        return str(found)
    return None if given is None else str(given)


def slurm_plugins(cfg: DictConfig) -> list[Any]:
    """Lightning's SLURM environment, with `slurm.auto_requeue` / `slurm.requeue_signal`, when the run is
    a SLURM job (Lightning would pick the environment itself; this makes the requeue settings ours)."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    settings = cfg.get("slurm") or {}
    if not SLURMEnvironment.detect():
        return []
    name = str(settings.get("requeue_signal", "SIGUSR1"))
    try:
        signum = signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
    except KeyError:
        raise ConfigError(f"slurm.requeue_signal={name!r} is not a signal name; e.g. SIGUSR1, SIGUSR2") from None
    return [SLURMEnvironment(auto_requeue=bool(settings.get("auto_requeue", True)), requeue_signal=signum)]


def continued_wandb_run(node: Any, out_dir: str | Path, resume: str | None) -> dict[str, Any]:
    """A W&B logger's `id` / `resume` arguments for a run that resumes from a checkpoint in its own run
    directory (a requeued job, `hydra.run.dir=<run> ckpt_path=last`): the W&B run that directory already
    has goes on (`resume="allow"`) instead of a new one starting. Empty for other loggers, a fresh start,
    a checkpoint from elsewhere, or an `id` the config sets."""
    out_dir = Path(out_dir)
    if resume is None or node.get("id") is not None or not str(node.get("_target_", "")).endswith("WandbLogger"):
        return {}
    here = resume in ("last", "hpc") or Path(resume).expanduser().resolve().is_relative_to(out_dir.resolve())
    if not here:
        return {}
    runs = sorted((out_dir / "wandb").glob("*run-*-*"), key=lambda p: p.stat().st_mtime)
    runs = [p for p in runs if p.is_dir() and p.name != "latest-run"]
    if not runs:
        return {}
    run_id = runs[-1].name.rsplit("-", 1)[1]  # run-<date>_<time>-<id>, offline-run-<date>_<time>-<id>
    print(f"[resume] W&B: continuing run {run_id} of {out_dir / 'wandb'}")
    return {"id": run_id, "resume": "allow"}


class _ContinuedWriter(ExperimentWriter):
    """Lightning's CSV writer, continuing the `metrics.csv` it finds (`continue_from`)."""

    def _check_log_dir_exists(self) -> None:
        pass  # Lightning's warns that earlier logs are deleted; this writer keeps them

    def continue_from(self, step: int | None) -> None:
        """Keep the file's rows of steps before `step` (this run's first logged step: a resumed run logs the
        steps after its checkpoint again) and take its columns as the known ones, so appending works."""
        path = self.metrics_file_path
        if not self._fs.isfile(path):
            return
        with self._fs.open(path, "r", newline="") as fh:
            reader = csv.DictReader(fh)
            header, rows = sorted(reader.fieldnames or []), list(reader)
        if step is not None:
            rows = [r for r in rows if not r.get("step") or int(float(r["step"])) < step]
        with self._fs.open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = header


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger (`<save_dir>/<name>/<version>/metrics.csv`), which on a resume into the same
    run directory (a requeued job, `hydra.run.dir=<run> ckpt_path=last`) continues `metrics.csv` instead of
    losing the rows logged before the interruption: Lightning's rewrote it with the new rows' columns."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._continued = False

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if not self._continued:
            self._continued = True
            self.experiment.continue_from(step)
        super().log_metrics(metrics, step)
