"""Early-exit generation: a KV-cached decoder whose tokens leave at their own exit layer.

`generate(backbone, batch, policy=..., strategy=..., max_new_tokens=...)` decodes with any token-head
`ExitBackbone`; see `eetrain.decoding.generate` for the strategies (copy, parallel,
self_speculative) and the batch modes (ride_along, gather, auto). `load_export_policy(export, backbone)`
gives the exit policy (and strategy) a training run exported. FREE's adaptive threshold:
`eetrain.decoding.adaptive` (`generate(..., agreement=True)` gives its pairs with `parallel`).
"""

from eetrain.decoding.decisions import LayerDecider, ScheduledExits
from eetrain.decoding.generate import (
    BATCH_MODES,
    STRATEGIES,
    AgreementPairs,
    GenerateOutput,
    generate,
    speculative_accept,
)
from eetrain.decoding.settings import load_export_policy

__all__ = ["BATCH_MODES", "STRATEGIES", "AgreementPairs", "GenerateOutput", "LayerDecider", "ScheduledExits", "generate",
           "load_export_policy", "speculative_accept"]
