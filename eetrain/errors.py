"""User-facing errors: the CLI prints their message alone (no traceback) and exits non-zero."""

import math


class EetrainError(Exception):
    """A problem with the user's input (config, data, paths), explained in the message."""


def user_error(exc: BaseException | None) -> "EetrainError | None":
    """The EetrainError behind `exc`, if any (Hydra wraps errors raised inside `instantiate`)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, EetrainError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class ConfigError(EetrainError, ValueError):
    """A config value is invalid; the message names the key and the allowed values."""


class DataError(EetrainError, ValueError):
    """A dataset is missing, empty or lacks the configured columns."""


class HubUnreachableError(EetrainError, OSError):
    """A model or dataset was asked for by hub name, but the hub cannot be reached."""


class NonFiniteLossError(EetrainError, FloatingPointError):
    """The training loss became NaN or infinite."""


class StoppedBySignal(EetrainError):
    """SIGTERM stopped the run (preemption, `scancel`, `kill`): it exits 143, as a shell reports a process
    that signal ended, so schedulers and `&&` chains do not take it for a finished run."""

    exit_code = 143


def check_keys(node: object, allowed: "set[str] | tuple[str, ...]", key: str) -> None:
    """ConfigError naming `key` when the mapping `node` has keys outside `allowed`."""
    unknown = sorted(set(node) - set(allowed))  # type: ignore[call-overload]
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def positive_int(value: object, key: str, null: str | None = None) -> int | None:
    """`value` as an integer >= 1, else a ConfigError naming `key`; `null` says what null means (None:
    null is not allowed)."""
    if value is None and null is not None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = f"null ({null}) or an integer >= 1" if null is not None else "an integer >= 1"
        raise ConfigError(f"{key}={value!r}; allowed: {allowed}")
    return value


def boolean(value: object, key: str) -> bool:
    """`value` if it is true or false, else a ConfigError naming `key` (a string such as `maybe` or
    `no` would be truthy or not by accident)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}; allowed: true or false")
    return value


def number(value: object, key: str, *, above: float | None = None, at_least: float | None = None) -> float:
    """`value` as a finite float (true/false, strings, NaN and inf refused), above `above` / at least
    `at_least` when given; else a ConfigError naming `key`."""
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if ok and above is not None:
        ok = value > above
    if ok and at_least is not None:
        ok = value >= at_least
    if not ok:
        bound = f" > {above:g}" if above is not None else f" >= {at_least:g}" if at_least is not None else ""
        raise ConfigError(f"{key}={value!r}; allowed: a finite number{bound}")
    return float(value)
