"""Family adapters behind one interface (`ExitBackbone`)."""

from eetrain.backbones.base import ExitBackbone, ExitStates, check_layers
from eetrain.backbones.bert import BertBackbone
from eetrain.backbones.llama import LlamaBackbone
from eetrain.backbones.t5 import T5Backbone

__all__ = [
    "BertBackbone", "ExitBackbone", "ExitStates", "LlamaBackbone", "T5Backbone", "check_layers", "load_backbone",
]

FAMILIES: dict[str, type[ExitBackbone]] = {"t5": T5Backbone, "llama": LlamaBackbone, "bert": BertBackbone}


def load_backbone(name_or_path: str, **kwargs: object) -> ExitBackbone:
    """The right adapter for a saved model: the family in eetrain's `early_exit.json`, else the
    `model_type` of a local `config.json`, else (a hub name) T5."""
    import json
    from pathlib import Path

    from eetrain.errors import ConfigError

    kwargs.pop("config", None)
    if name_or_path is None:  # an experiment's `???` merged over the model group's null stays null
        raise ConfigError("model.name_or_path is not set: point it at a run's export (model.name_or_path="
                          "outputs/<task>/<run>/export) or a local Hugging Face model directory")
    local = Path(str(name_or_path)).expanduser()
    family = "t5"
    for name, key in (("early_exit.json", "family"), ("config.json", "model_type")):
        if (local / name).is_file():
            try:
                family = json.loads((local / name).read_text()).get(key, "t5")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
                raise ConfigError(f"model.name_or_path={name_or_path!r}: {name} there is not a JSON object ({e}); "
                                  "re-export the model or restore the file") from e
            break
    else:
        if local.is_dir():
            raise ConfigError(f"model.name_or_path={name_or_path!r}: no exported model there (no config.json); point "
                              "it at a run's export/ directory (outputs/<task>/<run>/export) or a local Hugging Face model")
    if family not in FAMILIES:
        raise ConfigError(f"model.name_or_path={name_or_path!r} is a {family!r} model; eetrain has adapters for "
                          f"{sorted(FAMILIES)}")
    return FAMILIES[family](name_or_path=str(name_or_path), **kwargs)
