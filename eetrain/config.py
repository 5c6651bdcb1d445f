"""Hydra/OmegaConf glue: resolvers, the config directory, and composing a config from Python."""

from __future__ import annotations

import inspect
import os
import re
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Union

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
        shallow = layers.shallow
        if isinstance(shallow, bool) or not isinstance(shallow, int) or shallow < 1:
            raise ConfigError(
                f"exits.layers.shallow={shallow!r} must be an integer >= 1 (FREE's shallow exit L_s, below the last layer)"
            )
        return shallow
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
    key the target does not take (with the ones it does), a value its constructor rejects, a plain value
    that does not fit the type the target's signature declares (`check_types`)."""
    from hydra.errors import InstantiationException
    from hydra.utils import get_class, instantiate
    from omegaconf.errors import MissingMandatoryValue

    from eetrain.errors import ConfigError, user_error

    try:
        built = instantiate(node, **kwargs)
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
            check_types(node, key, skip=kwargs)  # a value of the wrong type, by name, before the bare error
            # an experiment for GPUs (trainer=gpu) on a machine without one: Lightning does not say what to set
            hint = ("; this machine has none: trainer=cpu (or trainer.accelerator=cpu)"
                    if key == "trainer" and "gpu backend" in str(cause).lower() else "")
            raise ConfigError(f"{full}: {cause}{hint}") from cause
        if isinstance(cause, LookupError | ArithmeticError):  # e.g. an unknown activation name, a zero size
            raise ConfigError(f"{full}: {type(cause).__name__}: {cause} (check the settings under {full})") from cause
        raise
    # after the target's own checks (their messages say more), what it took without looking
    check_types(node, key, skip=kwargs)
    return built


def _annotations(fn: Callable[..., Any]) -> dict[str, Any]:
    """`fn`'s parameter annotations, each evaluated on its own (one that names a type-checking-only
    import is left out instead of losing them all)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    scope = getattr(inspect.unwrap(fn.__init__ if isinstance(fn, type) else fn), "__globals__", {})
    hints = {}
    for name, p in params.items():
        hint = p.annotation
        if isinstance(hint, str):
            try:
                hint = eval(hint, scope)  # noqa: S307 - an annotation string of installed code
            except Exception:  # noqa: BLE001 - unknown: not checked
                continue
        if hint is not inspect.Parameter.empty:
            hints[name] = hint
    return hints


def _fits(value: Any, hint: Any) -> bool | None:
    """Whether the plain value `value` (None, bool, int, float, str) fits the annotation `hint`;
    None when the annotation says too little to tell (a class Hydra or the target may convert to)."""
    if hint is Any or hint is object:
        return True
    origin = typing.get_origin(hint)
    if origin is Union or origin is types.UnionType:
        fits = [_fits(value, arg) for arg in typing.get_args(hint)]
        return True if any(f is True for f in fits) else None if None in fits else False
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is None or hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str) or (None if isinstance(value, int | float) else False)
    if origin in (list, tuple, dict, set) or hint in (list, tuple, dict, set):
        return False  # a plain value where a collection goes
    if isinstance(hint, type) and issubclass(hint, os.PathLike):
        return isinstance(value, str)
    return None


def _shown(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " | ".join(_shown(a) for a in typing.get_args(hint))
    return "null" if hint in (None, type(None)) else getattr(hint, "__name__", str(hint))


def check_types(node: Any, key: str, skip: Any = ()) -> None:
    """ConfigError naming `key.name` when a plain value under the `_target_` node does not fit the type
    its target's signature declares (`trainer.max_epochs=abc` would otherwise fail deep inside fitting).
    Nulls (a default), interpolations, nested nodes and annotations that say too little are not checked."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return
    from hydra.utils import get_method

    from eetrain.errors import ConfigError

    try:
        target = get_method(node._target_)
    except Exception:  # noqa: BLE001 - an unknown target is instantiate's to report
        return
    hints = _annotations(target)
    for name in node:
        if name.startswith("_") or name in skip or name not in hints or OmegaConf.is_interpolation(node, name):
            continue
        if OmegaConf.is_missing(node, name):
            continue
        value = node[name]
        if value is None or isinstance(value, DictConfig | list) or OmegaConf.is_list(value):
            continue
        if _fits(value, hints[name]) is False:
            raise ConfigError(f"{key}.{name}={value!r}; allowed: {_shown(hints[name])} ({node._target_}'s {name})")
