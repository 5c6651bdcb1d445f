"""Hydra/OmegaConf glue: resolvers, the config directory, and composing a config from Python."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def demo_dir() -> str:
    from eetrain.data.make_demo import DEMO_DIR

    return str(DEMO_DIR)


def register_resolvers() -> None:
    """`${eetrain_demo:}` is the shipped demo data directory (so configs work from any cwd)."""
    if not OmegaConf.has_resolver("eetrain_demo"):
        OmegaConf.register_new_resolver("eetrain_demo", demo_dir)


def compose(overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """Compose `conf/config.yaml` with overrides, as `python -m eetrain` would (for tests, notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)
