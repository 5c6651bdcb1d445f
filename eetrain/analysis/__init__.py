"""The seed papers' measurements on any model: agreement, oracle exits, confidence, gating, saturation,
sub-word and sub-layer views, early-exit suitability (stage ``analyze``; see ``stage.py``)."""

from eetrain.analysis.agreement import agreement_rows
from eetrain.analysis.collect import LayerRecords, collect, example_batches, greedy_examples
from eetrain.analysis.confidence import confidence_rows
from eetrain.analysis.gating import efficiency, gating_rows
from eetrain.analysis.oracle import oracle_layers, oracle_rows
from eetrain.analysis.saturation import saturation_rows, token_saturation
from eetrain.analysis.stage import ANALYSES, analyze_model, run_stage
from eetrain.analysis.sublayer import sublayer_rows
from eetrain.analysis.subword import piece_classes, piece_convention, subword_rows, tokenizer_classes
from eetrain.analysis.suitability import ee_score, suitability_rows

__all__ = [
    "ANALYSES", "LayerRecords", "agreement_rows", "analyze_model", "collect", "confidence_rows", "ee_score",
    "efficiency", "example_batches", "gating_rows", "greedy_examples", "oracle_layers", "oracle_rows",
    "piece_classes", "piece_convention", "run_stage", "saturation_rows", "sublayer_rows", "subword_rows",
    "suitability_rows", "token_saturation", "tokenizer_classes",
]
