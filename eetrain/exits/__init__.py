"""Exit decisions: confidence measures, learned exit classifiers, thresholds, policies, calibration.

Submodules (imported lazily, so ``import eetrain.exits`` costs nothing):

* :mod:`eetrain.exits.measures` -- per-layer scores ``(L, N)`` (exit iff score >= threshold).
* :mod:`eetrain.exits.classifiers` -- CALM / MEE exit classifiers, oracle labels, balanced CE.
* :mod:`eetrain.exits.thresholds` -- fixed, per-layer and decaying thresholds.
* :mod:`eetrain.exits.policy` -- ``ExitPolicy``, ``exit_layers``, ``evaluate_policy``, sweeps.
* :mod:`eetrain.exits.calibration` -- Learn-then-Test threshold calibration.
* :mod:`eetrain.exits.record` -- run a frozen backbone once and record per-layer summaries.
* :mod:`eetrain.exits.training` -- stage ``exit_classifiers``: classifiers on a frozen backbone.
* :mod:`eetrain.exits.evaluation` -- stage ``policies``: sweep, calibrate, ``policies.csv``/``.png``.
* :mod:`eetrain.exits.settings` -- the ``exit`` config node, validated with the config key in errors.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # measures
    "ExitRecords": "measures",
    "MeasureSpec": "measures",
    "MEASURES": "measures",
    "get_measure": "measures",
    "compute_measure": "measures",
    "softmax_gap": "measures",
    "softmax_max": "measures",
    "entropy": "measures",
    "normalized_entropy": "measures",
    "hidden_saturation": "measures",
    "patience": "measures",
    "monotonic": "measures",
    # classifiers
    "CalmClassifier": "classifiers",
    "ThreeStateMLP": "classifiers",
    "LSTMClassifier": "classifiers",
    "exit_probabilities": "classifiers",
    "save_classifier": "classifiers",
    "load_classifier": "classifiers",
    "exit_labels": "classifiers",
    "class_balanced_cross_entropy": "classifiers",
    # thresholds
    "decaying_threshold": "thresholds",
    "FixedThreshold": "thresholds",
    "PerLayerThreshold": "thresholds",
    "DecayingThreshold": "thresholds",
    "make_threshold": "thresholds",
    # policy
    "ExitPolicy": "policy",
    "exit_layers": "policy",
    "evaluate_policy": "policy",
    "deebert_expected_saving": "policy",
    "sweep": "policy",
    "write_policy_table": "policy",
    "plot_consistency_vs_exit": "policy",
    # calibration
    "hoeffding_pvalue": "calibration",
    "bentkus_pvalue": "calibration",
    "hoeffding_bentkus_pvalue": "calibration",
    "hoeffding_bentkus_quadratic_pvalue": "calibration",
    "hoeffding_kl_pvalue": "calibration",
    "calibrate_threshold": "calibration",
    "consistency_risk": "calibration",
    "task_risk": "calibration",
    "make_risk_fn": "calibration",
    # recording
    "summarize_logits": "measures",
    "record_exits": "record",
    "save_records": "record",
    "load_records": "record",
    # second stage
    "make_classifier": "training",
    "ExitClassifierModule": "training",
    "train_exit_classifier": "training",
    "evaluate_records": "evaluation",
    "calibrate": "evaluation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
