"""Joint-optimization losses over the exits of a shared head."""

from eetrain.losses.calm import weighted_cross_entropy
from eetrain.losses.curriculum import Curriculum, LayerDropout, dropped_layers, layer_dropout_rates
from eetrain.losses.distillation import LayerwiseDistillation, layerwise_distillation_loss
from eetrain.losses.exit_points import resolve_exit_points
from eetrain.losses.fused_ce import multi_exit_cross_entropy
from eetrain.losses.joint import ExitCrossEntropy, JointLoss, LossOutput, TrainStep
from eetrain.losses.weights import layer_weights, renormalise

__all__ = [
    "Curriculum",
    "ExitCrossEntropy",
    "JointLoss",
    "LayerDropout",
    "LayerwiseDistillation",
    "LossOutput",
    "TrainStep",
    "dropped_layers",
    "layer_dropout_rates",
    "layer_weights",
    "layerwise_distillation_loss",
    "multi_exit_cross_entropy",
    "renormalise",
    "resolve_exit_points",
    "weighted_cross_entropy",
]
