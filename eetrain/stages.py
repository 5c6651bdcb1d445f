"""Stages that run after joint training, on the trained backbone (named in `cfg.stages`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from eetrain.errors import ConfigError

STAGES: dict[str, str] = {}


def run_stages(cfg: DictConfig, backbone: Any, data: Any, out_dir: Path) -> None:
    for name in cfg.stages:
        if name not in STAGES:
            raise ConfigError(f"stages: unknown stage {name!r}; allowed: {', '.join(sorted(STAGES))}")
        module_name, _, fn = STAGES[name].rpartition(".")
        import importlib

        getattr(importlib.import_module(module_name), fn)(cfg, backbone, data, out_dir)
