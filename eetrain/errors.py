"""User-facing errors: the CLI prints their message alone (no traceback) and exits non-zero."""


class EetrainError(Exception):
    """A problem with the user's input (config, data, paths), explained in the message."""


class ConfigError(EetrainError, ValueError):
    """A config value is invalid; the message names the key and the allowed values."""


class DataError(EetrainError, ValueError):
    """A dataset is missing, empty or lacks the configured columns."""


class HubUnreachableError(EetrainError, OSError):
    """A model or dataset was asked for by hub name, but the hub cannot be reached."""


class NonFiniteLossError(EetrainError, FloatingPointError):
    """The training loss became NaN or infinite."""
