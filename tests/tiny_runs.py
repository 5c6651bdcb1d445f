"""Tiny end-to-end runs of `python -m eetrain` for the distributed and resume tests.

Every example has the same number of source and target tokens (demo rows, all longer than the limits,
cut to `SOURCE_TOKENS` / `TARGET_TOKENS`), so a batch's mean token loss is the mean of its examples' and
a gradient over a global batch of 2B equals the average of two ranks' gradients over B each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pandas as pd
import torch

from eetrain.data.make_demo import DEMO_DIR

SOURCE_TOKENS, TARGET_TOKENS = 24, 8
ROOT = Path(__file__).resolve().parent.parent

#: a 3-layer T5 of width 32, LayerSkip's loss (rotational curriculum, layer dropout) and per-layer heads
TINY = [
    "+experiment=demo",
    "model.config.d_model=32", "model.config.d_ff=64", "model.config.d_kv=8", "model.config.num_heads=4",
    "model.config.num_layers=3", "model.config.num_decoder_layers=3",
    "loss=layerskip", "loss.layer_dropout.p_max=0.6", "model.exit_head=per_layer",
    "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    "callbacks.generation_metrics=null",
]


def write_data(directory: Path, train: int = 32, validation: int = 8) -> list[str]:
    """Demo rows as local JSONL files; the data overrides that read them with fixed lengths."""
    rows = [json.loads(line) for line in (DEMO_DIR / "train.jsonl").read_text().splitlines()[: train + validation]]
    directory.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[:train]), ("validation", rows[train:])):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return ["data=local", f"data.files.train={directory / 'train.jsonl'}",
            f"data.files.validation={directory / 'validation.jsonl'}", "data.prefix='summarize: '",
            f"data.max_source_length={SOURCE_TOKENS}", f"data.max_target_length={TARGET_TOKENS}"]


def env() -> dict[str, str]:
    """The CLI's environment: offline, and `tests` importable (test-only callbacks)."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    e.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread per process (half the time on shared CPUs)
    return e


def command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "eetrain", *TINY, f"hydra.run.dir={run_dir}", *overrides]


def run(run_dir: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(command(run_dir, *overrides), cwd=run_dir.parent, env=env(), capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def run_here(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`run`, but in this process (tests.in_process) with one torch thread, as `env` gives a child: for runs
    that need no process of their own."""
    from tests.in_process import cli

    r = cli(*command(run_dir, *overrides)[3:], cwd=run_dir.parent, threads=1)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def step_losses(run_dir: Path) -> pd.Series:
    """The logged train/loss by global step (CSV logger)."""
    metrics = pd.read_csv(run_dir / "csv" / "metrics.csv")
    rows = metrics.dropna(subset=["train/loss"])
    return rows.set_index("step")["train/loss"].sort_index()


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def export_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the export: the model and the per-layer exit heads."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted((run_dir / "export").glob("*.safetensors")):
        out.update({f"{f.stem}/{k}": v for k, v in load_file(f).items()})
    assert out, f"no weights in {run_dir / 'export'}"
    return out


class Stall(L.Callback):
    """A test-only callback: before optimizer step `at_step` + 1 it writes `marker` and waits to be killed,
    so a test can SIGKILL the run at a known point (steps after the last checkpoint already taken); with
    `until_sigterm`, it waits for a SIGTERM and goes on."""

    def __init__(self, at_step: int, marker: str, until_sigterm: bool = False):
        self.at_step, self.marker, self.until_sigterm = at_step, Path(marker), until_sigterm

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step and not self.marker.exists():  # once (a step may span batches)
            self.marker.write_text(str(trainer.global_step))
            end = time.monotonic() + 3600
            while time.monotonic() < end and not (self.until_sigterm and trainer.received_sigterm):
                time.sleep(0.1)  # (until_sigterm: then this step runs, and Lightning stops after it)


def start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    """Start a run in the background (its output goes to `<run_dir>.log`)."""
    log = open(f"{run_dir}.log", "w")  # noqa: SIM115 (the child writes it until it ends)
    return subprocess.Popen(command(run_dir, *overrides), cwd=run_dir.parent, env=env(), stdout=log,
                            stderr=subprocess.STDOUT)
