"""Stages that run after joint training, on the trained backbone (named in `cfg.stages`)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from eetrain.errors import ConfigError

#: stage name -> "module.function(cfg, backbone, data, out_dir)". A stage module may also define
#: `check_config(cfg, backbone)`, run by `check_stages` before training so bad settings fail at once.
STAGES: dict[str, str] = {
    # DeeBERT's second stage: the per-layer exit heads trained on the frozen model
    "exit_heads": "eetrain.exit_heads.run_stage",
    # exit classifiers (CALM, MEE MLP, MEE LSTM) trained on the frozen backbone
    "exit_classifiers": "eetrain.exits.training.run_stage",
    # record the validation set once, sweep exit policies, LTT calibration, policies.csv/.png
    "policies": "eetrain.exits.evaluation.run_stage",
    # decode a split with early exit and with the full model: generations.jsonl, speed-up, consistency
    "generate": "eetrain.decoding.stage.run_stage",
    # sweep policy thresholds in real decoding: task metric vs measured speed-up, quality_speed.csv/.png
    "curve": "eetrain.decoding.curve.run_stage",
    # sequence classification with per-sample exits: per-layer scores, accuracy vs measured speed-up
    "classify": "eetrain.classify.run_stage",
    # the seed papers' analyses (agreement, oracle, confidence, gating, saturation, sub-word, sub-layer,
    # suitability) on the model and analyze.models: <analysis>.csv/.png, analysis_summary.json
    "analyze": "eetrain.analysis.stage.run_stage",
}

#: stage name -> "module.function(cfg, backbone)" validating the stage's config before training.
CHECKS: dict[str, str] = {
    "exit_heads": "eetrain.exit_heads.check_config",
    "exit_classifiers": "eetrain.exits.settings.check_config",
    "policies": "eetrain.exits.settings.check_config",
    "generate": "eetrain.decoding.stage.check_config",
    "curve": "eetrain.decoding.curve.check_config",
    "classify": "eetrain.classify.check_config",
    "analyze": "eetrain.analysis.stage.check_config",
}


#: stage name -> (the key naming the split it reads, the split when that key is unset or null)
SPLITS: dict[str, tuple[str, str]] = {
    "generate": ("decoding.split", "test"),
    "curve": ("curve.split", "test"),
    "classify": ("classify.split", "validation"),
    "analyze": ("analyze.split", "validation"),
}


def _resolve(target: str) -> Any:
    module_name, _, fn = target.rpartition(".")
    return getattr(importlib.import_module(module_name), fn)


def _names(cfg: DictConfig) -> list[str]:
    value = cfg.get("stages") or []
    if isinstance(value, str):  # stages=policies: one stage, not its letters
        raise ConfigError(f"stages={value!r}; allowed: a list of stages, e.g. stages=[{value}]")
    names = list(value)
    for name in names:
        if name not in STAGES:
            raise ConfigError(f"stages: unknown stage {name!r}; allowed: {', '.join(sorted(STAGES))}")
    return names


def check_stages(cfg: DictConfig, backbone: Any) -> None:
    """Validate the configured stages (names and settings) before any training starts."""
    done = set()
    for name in _names(cfg):
        check = CHECKS.get(name)
        if check and check not in done:
            _resolve(check)(cfg, backbone)
            done.add(check)


def check_splits(cfg: DictConfig, data: Any) -> None:
    """The split each configured stage reads is in the data (`check_split`: local files), so a misspelt
    `decoding.split` fails before training, not after it."""
    if not hasattr(data, "check_split"):
        return
    names = _names(cfg)
    keys = [SPLITS[name] for name in names if name in SPLITS]
    if "policies" in names and OmegaConf.select(cfg, "exit.calibration.online", default=False) is True:
        keys.append(("exit.calibration.online_split", "validation"))
    for key, default in keys:
        data.check_split(str(OmegaConf.select(cfg, key, default=None) or default), key)


#: the stage under way (for a run stopped by a signal to say where)
running: str | None = None


def run_stages(cfg: DictConfig, backbone: Any, data: Any, out_dir: Path) -> None:
    global running
    for name in _names(cfg):
        running = name
        _resolve(STAGES[name])(cfg, backbone, data, out_dir)
        running = None
        if name == "exit_classifiers" and (out_dir / "export").is_dir():
            # the export carries every trained classifier, so curves and generate on it can use them
            from eetrain.decoding.settings import export_classifiers

            export_classifiers(cfg, out_dir, out_dir / "export")
        if name == "policies" and (out_dir / "export").is_dir():
            # the export carries the calibrated policy, so `generate` on it (and later runs) use it
            from eetrain.decoding.settings import export_policy

            export_policy(cfg, backbone, out_dir, out_dir / "export")
