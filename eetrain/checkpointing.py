"""Checkpoints that are never left half-written, and the `transformers` export of a trained model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from eetrain.backbones.base import ExitBackbone

EXIT_SETTINGS_FILE = "early_exit.json"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write `path.tmp`, then rename over `path`: a crash mid-save leaves the old checkpoint intact."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        protocol = get_filesystem(path).protocol
        if "file" not in (protocol if isinstance(protocol, tuple) else (protocol,)):
            # Remote filesystems (s3://, gs://) have their own atomic object writes.
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def export_pretrained(backbone: ExitBackbone, directory: str | Path, settings: dict[str, Any]) -> Path:
    """Save model + tokenizer (plain `from_pretrained` loads them) and the early-exit settings as JSON.

    The directory appears complete or not at all: it is written beside, then renamed into place.
    """
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    backbone.save_pretrained(str(tmp))
    (tmp / EXIT_SETTINGS_FILE).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    if directory.exists():
        old = directory.with_name(directory.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)
    return directory


def load_exit_settings(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / EXIT_SETTINGS_FILE).read_text())
