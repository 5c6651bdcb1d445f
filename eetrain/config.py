"""Hydra/OmegaConf glue: resolvers, the config directory, and composing a config from Python."""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def demo_dir() -> str:
    from eetrain.data.make_demo import DEMO_DIR

    return str(DEMO_DIR)


def shallow_exit(*, _root_: DictConfig) -> int | None:
    """`${eetrain_shallow:}`: FREE's shallow exit L_s from `exits.layers={shallow: L_s}`; None when
    `exits.layers` is not set; a ConfigError naming the key for any other form (a list, {every: k})."""
    from eetrain.errors import ConfigError

    exits = _root_.get("exits")
    layers = None if exits is None else exits.get("layers")
    if layers is None:
        return None
    if isinstance(layers, DictConfig) and set(layers) == {"shallow"}:
        return layers.shallow
    shown = OmegaConf.to_container(layers, resolve=True) if OmegaConf.is_config(layers) else layers
    raise ConfigError(
        f"exits.layers={shown!r}: the free loss needs exits.layers={{shallow: L_s}} (its shallow exit; the last "
        "layer always exits); allowed: {shallow: N} with N in 1..L-1, e.g. 'exits.layers={shallow: 2}'"
    )


def register_resolvers() -> None:
    """`${eetrain_demo:}` is the shipped demo data directory (so configs work from any cwd);
    `${eetrain_shallow:}` the free loss's shallow exit, checked (`shallow_exit`)."""
    if not OmegaConf.has_resolver("eetrain_demo"):
        OmegaConf.register_new_resolver("eetrain_demo", demo_dir)
    if not OmegaConf.has_resolver("eetrain_shallow"):
        OmegaConf.register_new_resolver("eetrain_shallow", shallow_exit)


def compose(overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """Compose `conf/config.yaml` with overrides, as `python -m eetrain` would (for tests, notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)


def build(node: Any, key: str, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate(node, **kwargs)` for the config node at `key` (model, loss, data, ...),
    its argument errors as one ConfigError naming the full key: a mandatory value (`???`) left unset, a
    key the target does not take (with the ones it does), a value its constructor rejects."""
    from hydra.errors import InstantiationException
    from hydra.utils import get_class, instantiate
    from omegaconf.errors import MissingMandatoryValue

    from eetrain.errors import ConfigError, user_error

    try:
        return instantiate(node, **kwargs)
    except MissingMandatoryValue as e:
        full = getattr(e, "full_key", None) or key
        raise ConfigError(f"{full} is not set (??? in the config): give it a value, e.g. {full}=...") from None
    except InstantiationException as e:
        if user_error(e) is not None:
            raise
        cause = e.__cause__
        found = re.search(r"full_key: (\S+)", str(e))
        full = found.group(1) if found else key
        target = re.search(r"call to target '([\w.]+)'", str(e))
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(cause))
        if unexpected and target:
            try:
                params = [p for p in inspect.signature(get_class(target.group(1))).parameters if p not in ("self",)]
            except Exception:  # noqa: BLE001 - the allowed list is a courtesy
                params = []
            allowed = f"; allowed: {', '.join(params)}" if params else ""
            raise ConfigError(f"{full}.{unexpected.group(1)} is not a setting of {target.group(1)}{allowed}") from None
        if isinstance(cause, ValueError | TypeError) or type(cause).__name__ == "MisconfigurationException":
            raise ConfigError(f"{full}: {cause}") from cause
        if isinstance(cause, LookupError | ArithmeticError):  # e.g. an unknown activation name, a zero size
            raise ConfigError(f"{full}: {type(cause).__name__}: {cause} (check the settings under {full})") from cause
        raise
