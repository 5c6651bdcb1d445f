"""Which layers carry an exit, from one config value (`exits.layers`) and the minimum exit layer.

The same value drives the training losses and the exit policies, so it is resolved in one place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from eetrain.backbones.base import check_layers
from eetrain.errors import ConfigError

#: the forms `exits.layers` may take, for error messages
FORMS = "null or 'all' (every layer), 'last', a list of layers, {every: k}, {shallow: L_s}"


def _as_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}={value!r} must be an integer")
    return value


def resolve_exit_points(
    spec: Any,
    num_layers: int,
    min_layer: int = 1,
    key: str = "exits.layers",
    min_key: str = "exits.min_layer",
) -> tuple[int, ...]:
    """The 1-based exit layers, ascending, that `spec` names for a model with `num_layers` layers.

    spec:
      None or "all"    every layer 1..L
      "last"           (L,)
      [i, j, ...]      exactly these layers: within 1..L, sorted, no duplicates
      {every: k}       k, 2k, 3k, ... and always L (k >= 1)
      {shallow: L_s}   FREE's shallow/deep pair (L_s, L), 1 <= L_s < L

    Layers below `min_layer` are dropped (no exit, no exit loss there). It is an error if that leaves
    no exit, or if it would drop the shallow exit of {shallow: L_s} (the pair would silently become
    the last layer alone). `key` / `min_key` name the config keys in error messages.
    """
    n = num_layers
    min_layer = _as_int(min_layer, min_key)
    if not 1 <= min_layer <= n:
        raise ConfigError(f"{min_key}={min_layer} must be within 1..{n} (the model has {n} layers)")

    if spec is None or spec == "all":
        layers = tuple(range(1, n + 1))
    elif spec == "last":
        layers = (n,)
    elif isinstance(spec, str):
        raise ConfigError(f"{key}={spec!r} is unknown; allowed: {FORMS}")
    elif isinstance(spec, Mapping):
        if len(spec) != 1 or next(iter(spec)) not in ("every", "shallow"):
            raise ConfigError(f"{key}={dict(spec)} is unknown; allowed: {FORMS}")
        (form, value), = spec.items()
        value = _as_int(value, f"{key}.{form}")
        if form == "every":
            if value < 1:
                raise ConfigError(f"{key}.every={value} must be >= 1 (every k-th layer)")
            layers = tuple(sorted(set(range(value, n + 1, value)) | {n}))
        else:
            if not 1 <= value < n:
                raise ConfigError(
                    f"{key}.shallow={value} must be within 1..{n - 1}: the shallow exit lies below the "
                    f"last layer {n}"
                )
            if value < min_layer:
                raise ConfigError(
                    f"{key}.shallow={value} is below {min_key}={min_layer}, which would drop the shallow "
                    f"exit; raise {key}.shallow, lower {min_key}, or set exits.train_below_min=true"
                )
            layers = (value, n)
    elif isinstance(spec, Sequence):
        if not spec:
            raise ConfigError(f"{key} is empty; allowed: {FORMS}")
        layers = check_layers([_as_int(i, key) for i in spec], n, key=key)
    else:
        raise ConfigError(f"{key}={spec!r} is unknown; allowed: {FORMS}")

    kept = tuple(i for i in layers if i >= min_layer)
    if not kept:
        raise ConfigError(
            f"{min_key}={min_layer} is above every exit layer {list(layers)} of {key}; "
            f"lower {min_key} or add deeper exits"
        )
    return kept
