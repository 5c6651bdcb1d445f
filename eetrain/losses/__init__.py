"""Joint-optimization losses over the exits of a shared head."""

from eetrain.losses.calm import weighted_cross_entropy
from eetrain.losses.fused_ce import multi_exit_cross_entropy
from eetrain.losses.joint import ExitCrossEntropy, JointLoss, LossOutput
from eetrain.losses.weights import layer_weights

__all__ = [
    "ExitCrossEntropy",
    "JointLoss",
    "LossOutput",
    "layer_weights",
    "multi_exit_cross_entropy",
    "weighted_cross_entropy",
]
