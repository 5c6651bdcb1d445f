"""Resolve hub names and local paths for models and datasets, failing fast when offline.

`transformers` and `datasets` retry an unreachable hub for ~25 s before failing with a long traceback.
We probe the endpoint once (a DNS lookup and TCP connect with a short timeout) and, when it is
unreachable and nothing is cached, stop at once with a message that says how to use local files.
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from eetrain.errors import ConfigError, HubUnreachableError

_LOCAL_PREFIXES = ("/", "./", "../", "~")


def looks_local(name_or_path: str) -> bool:
    """A value is a local path if it exists or is written like one (absolute, ./, ../, ~)."""
    return Path(name_or_path).expanduser().exists() or name_or_path.startswith(_LOCAL_PREFIXES)


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _model_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(found, str)


def resolve_model(name_or_path: str, key: str = "model.name_or_path") -> tuple[str, bool]:
    """Check that a model can be loaded without a long hub timeout.

    Returns (name_or_path, local_files_only) for `from_pretrained`.
    Raises ConfigError for a local path that does not exist and HubUnreachableError when a hub
    name cannot be fetched and is not cached.
    """
    if looks_local(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise ConfigError(f"{key}={name_or_path!r}: no such file or directory")
        return str(path), True
    if hub_reachable():
        return name_or_path, False
    if _model_cached(name_or_path):
        return name_or_path, True
    raise HubUnreachableError(
        f"{key}={name_or_path!r} is a hub name, but the Hugging Face hub is unreachable and the model "
        f"is not in the local cache.\nPoint {key} at a local directory saved with save_pretrained "
        f"(e.g. {key}=/models/{name_or_path.rstrip('/').split('/')[-1]}), or run once with internet to fill the cache."
    )


def datasets_cache() -> Path:
    """The directory `datasets` caches hub datasets in, resolved as `datasets.config` does (read now, not
    at its import): HF_DATASETS_CACHE, else HF_HOME/datasets (the Docker images set HF_HOME), else
    $XDG_CACHE_HOME/huggingface/datasets (~/.cache by default)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "datasets"


def check_dataset_reachable(
    name: str, key: str = "data.hf_name", columns: str = "data.source_column and data.target_column"
) -> None:
    """Fail fast when a hub dataset is requested offline and is not in the datasets cache.

    columns: the config keys that name the columns local files need (said in the message).
    A local dataset directory (`load_dataset("/data/glue_sst2")`) needs no hub.
    """
    if looks_local(name):
        if not Path(name).expanduser().exists():
            raise ConfigError(f"{key}={name!r}: no such file or directory")
        return
    if hub_reachable():
        return
    cache = datasets_cache()
    cached_name = name.replace("/", "___")
    if cache.exists() and any(p.name == cached_name for p in cache.iterdir()):
        return
    raise HubUnreachableError(
        f"{key}={name!r} is a hub dataset, but the Hugging Face hub is unreachable and it is not cached.\n"
        "Use local files instead: data.hf_name=null data.files.train=/data/train.jsonl "
        "data.files.validation=/data/validation.jsonl (JSON, JSONL, CSV or Parquet with the columns "
        f"named by {columns})."
    )
