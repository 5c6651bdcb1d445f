"""Family adapters behind one interface (`ExitBackbone`)."""

from eetrain.backbones.base import ExitBackbone, ExitStates, check_layers
from eetrain.backbones.bert import BertBackbone
from eetrain.backbones.llama import LlamaBackbone
from eetrain.backbones.t5 import T5Backbone

__all__ = ["BertBackbone", "ExitBackbone", "ExitStates", "LlamaBackbone", "T5Backbone", "check_layers"]
