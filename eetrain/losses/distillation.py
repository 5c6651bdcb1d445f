"""FREE's layerwise distillation: the shallow module's layers learn the deep module's states.

Notation: L layers, shallow exit L_s (1 <= L_s < L). Students are the shallow module's layers
1..L_s; teachers are the deep module's layers L_s+1..L. Every state is final-normed (the family's
final norm, without T5's rescale or dropout: `ExitBackbone.final_norm`); teachers are detached.

    L_KD = mean over matched pairs (j, m(j)) of MSE(s_j, stopgrad(t_m(j)))

with MSE the mean over positions and features, and s_j optionally passed through a learned
Linear(d, d) first. Mappings:

* ``last``: one pair, (L_s, L).
* ``uniform`` (the methods sheet; FREE's table where it has one): student j (1..L_s) to layer
  u(j) = max(j + 1, floor(j * L / L_s + 1/2)), i.e. round(j * L / L_s): the layers evenly spaced at
  the students' relative depths, ending at L. E.g. L=24, L_s=6: 4, 8, ..., 24; L=12, L_s=4: 3, 6, 9,
  12; L=4, L_s=2: 2, 4. The depths FREE's public code tabulates (`FREE_TEACHERS`: L=24 with L_s = 4,
  6, 8, 10, 12; L=12 with L_s=3) take its table; it equals the formula but for L=24, L_s=10, where
  FREE has 3, 6, 8, 11, 13, 16, 18, 20, 22, 24 (the formula: 2, 5, 7, 10, 12, 14, 17, 19, 22, 24).
  The first teachers may themselves be shallow layers (their states are detached all the same);
  the floor j + 1 only acts when L < 2 L_s and round(j * L / L_s) would be j itself (a student
  never learns from its own state), e.g. L=5, L_s=4: 2, 3, 4, 5.
* ``uniform_deep``: every teacher a deep layer: student j to L_s + max(1, floor(j * D / L_s + 1/2)),
  D = L - L_s, the deep layers evenly spaced at the students' relative depths, ending at L. E.g. L=24,
  L_s=6: 9, 12, ..., 24; L=12, L_s=4: 6, 8, 10, 12; L=4, L_s=2: 3, 4. When D < L_s several students
  share a teacher. (eetrain's ``uniform`` before issue 11.)
* ``closest``: the teachers are the distinct ``uniform_deep`` teachers t_1 < ... < t_n (deep layers only); which student each
  one pulls is chosen anew every step from the current (detached) MSEs. See `closest_alignment`. The
  walk is FREE's dynamic mapping; its teachers are the methods sheet's (the deep layers). FREE's public
  code walks its uniform table instead, whose first teachers can be shallow layers (L=24, L_s=6: 4, 8,
  ..., 24), and a shallow teacher can then pull its own layer at MSE 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eetrain.backbones.base import ExitBackbone, ExitStates
from eetrain.errors import ConfigError
from eetrain.losses.joint import LossOutput, TrainStep

MAPPINGS = ("last", "uniform", "uniform_deep", "closest")


def check_shallow_layer(shallow_layer: int, num_layers: int, key: str = "loss.terms.kd.shallow_layer") -> int:
    """Validate L_s against the depth: 1 <= L_s < L, so that there is a deep module to learn from."""
    if isinstance(shallow_layer, bool) or not isinstance(shallow_layer, int):
        raise ConfigError(f"{key}={shallow_layer!r} must be an integer layer (L_s)")
    if not 1 <= shallow_layer < num_layers:
        raise ConfigError(
            f"{key}={shallow_layer} must be within 1..{num_layers - 1}: the students are layers 1..L_s and "
            f"the teachers the deep layers L_s+1..{num_layers}"
        )
    return shallow_layer


#: FREE's public table of uniform teachers (`TEACHER_LAYERS` in its util/losses.py), 1-based: L -> L_s -> layers
FREE_TEACHERS: dict[int, dict[int, tuple[int, ...]]] = {
    24: {12: tuple(range(2, 25, 2)), 10: (3, 6, 8, 11, 13, 16, 18, 20, 22, 24), 8: tuple(range(3, 25, 3)),
         6: (4, 8, 12, 16, 20, 24), 4: (6, 12, 18, 24)},
    12: {3: (4, 8, 12)},
}


def uniform_teachers(num_layers: int, shallow_layer: int) -> tuple[int, ...]:
    """The uniform map for j = 1..L_s: FREE's table where it has the depths, else
    u(j) = max(j + 1, round(j * L / L_s)) (module docstring)."""
    check_shallow_layer(shallow_layer, num_layers)
    if shallow_layer in FREE_TEACHERS.get(num_layers, {}):
        return FREE_TEACHERS[num_layers][shallow_layer]
    # Integer form of floor(j * L / L_s + 1/2): round half up, exact for any depth.
    return tuple(
        max(j + 1, (2 * j * num_layers + shallow_layer) // (2 * shallow_layer)) for j in range(1, shallow_layer + 1)
    )


def uniform_deep_teachers(num_layers: int, shallow_layer: int) -> tuple[int, ...]:
    """u(j) for j = 1..L_s: deep layer L_s + max(1, floor(j * (L - L_s) / L_s + 1/2)) (module docstring)."""
    check_shallow_layer(shallow_layer, num_layers)
    deep = num_layers - shallow_layer
    # Integer form of floor(j * D / L_s + 1/2): round half up, exact for any depth.
    return tuple(
        shallow_layer + max(1, (2 * j * deep + shallow_layer) // (2 * shallow_layer))
        for j in range(1, shallow_layer + 1)
    )


def pairwise_mse(students: Tensor, teachers: Tensor) -> Tensor:
    """MSE of every (teacher, student) pair: students (S, N, d), teachers (T, N, d) -> (T, S), float32.

    Computed without gradient (it only chooses pairs); one teacher at a time, so memory stays at the
    size of `students`.
    """
    with torch.no_grad():
        s = students.float()
        return torch.stack([(s - t.float()).pow(2).mean(dim=(1, 2)) for t in teachers])


def closest_alignment(mse: Tensor) -> list[int]:
    """FREE's dynamic ("closest") mapping from a (T, S) MSE matrix; returns a 0-based student per teacher.

    Rows are the teachers t_1 < ... < t_T, columns the students 1..S. Exactly:

    1. bound = S (every student is a candidate); walk the teachers from the last (t_T) to the first;
    2. teacher t takes argmin over students s < bound of mse[t, s] (ties: the shallower student), and
       bound becomes that student, so each teacher's student lies strictly below the next teacher's;
    3. if no student is left below the bound, the teacher takes the previous teacher's student again
       (FREE's public code does the same), so every teacher has exactly one student.

    The result is non-decreasing in the teacher index.
    """
    n_teachers, n_students = mse.shape
    out = [0] * n_teachers
    bound = n_students
    for t in range(n_teachers - 1, -1, -1):
        if bound > 0:
            bound = int(torch.argmin(mse[t, :bound]))
        out[t] = bound
    return out


def distillation_pairs(
    mapping: str, num_layers: int, shallow_layer: int, mse: Tensor | None = None
) -> tuple[tuple[int, int], ...]:
    """The matched (student, teacher) layer pairs, 1-based.

    mse: (T, S) from `pairwise_mse` over the closest mapping's teachers (`teacher_layers`) and students
    1..L_s; required for "closest", ignored otherwise.
    """
    check_shallow_layer(shallow_layer, num_layers)
    if mapping == "last":
        return ((shallow_layer, num_layers),)
    if mapping in ("uniform", "uniform_deep"):
        teachers = (uniform_teachers if mapping == "uniform" else uniform_deep_teachers)(num_layers, shallow_layer)
        return tuple(zip(range(1, shallow_layer + 1), teachers, strict=True))
    if mapping == "closest":
        teachers = teacher_layers("closest", num_layers, shallow_layer)
        if mse is None or tuple(mse.shape) != (len(teachers), shallow_layer):
            raise ValueError(f"closest mapping needs a ({len(teachers)}, {shallow_layer}) MSE matrix")
        return tuple((s + 1, t) for s, t in zip(closest_alignment(mse), teachers, strict=True))
    raise ConfigError(f"loss.terms.kd.mapping={mapping!r} is unknown; allowed: {', '.join(MAPPINGS)}")


def teacher_layers(mapping: str, num_layers: int, shallow_layer: int) -> tuple[int, ...]:
    """The layers a mapping reads as teachers, ascending and distinct (deep layers only, but for
    ``uniform``, whose first teachers may be shallow)."""
    if mapping == "last":
        return (num_layers,)
    if mapping == "uniform":
        return tuple(sorted(set(uniform_teachers(num_layers, shallow_layer))))
    return tuple(sorted(set(uniform_deep_teachers(num_layers, shallow_layer))))


def layerwise_distillation_loss(
    students: Sequence[Tensor], teachers: Mapping[int, Tensor], mapping: str, num_layers: int
) -> tuple[Tensor, tuple[tuple[int, int], ...]]:
    """L_KD and its pairs.

    students: L_s tensors (N, d), entry j-1 the (final-normed, possibly projected) state of layer j;
    teachers: {layer: (N, d)} for at least `teacher_layers(mapping, L, L_s)`; they are detached here.
    Returns (scalar float32 loss = mean over pairs of MSE(s_j, stopgrad(t_m(j))), the pairs); with N = 0, a
    zero that keeps the graph and no pairs.
    """
    shallow = len(students)
    check_shallow_layer(shallow, num_layers)
    if students[0].shape[0] == 0:  # no scored position in the batch: nothing to distil (as the CE's 0), no NaN
        return torch.stack([s.float().sum() for s in students]).sum() * 0.0, ()
    mse = None
    if mapping == "closest":
        layers = teacher_layers(mapping, num_layers, shallow)
        with torch.no_grad():  # the stacked copies only choose pairs
            mse = pairwise_mse(torch.stack(list(students)), torch.stack([teachers[t] for t in layers]))
    pairs = distillation_pairs(mapping, num_layers, shallow, mse)
    terms = [F.mse_loss(students[s - 1].float(), teachers[t].detach().float()) for s, t in pairs]
    return torch.stack(terms).mean(), pairs


def _rows(h: Tensor, labels: Tensor | None, head_kind: str) -> Tensor:
    """(B, T, d) -> (N, d): the scored positions of a token head, every position of a sequence head."""
    if head_kind == "token" and labels is not None:
        return h[labels != -100]
    return h.reshape(-1, h.shape[-1])


class LayerwiseDistillation(nn.Module):
    """alpha * L_KD (module docstring) as a term of a `JointLoss`.

    mapping: last | uniform | uniform_deep | closest; shallow_layer: L_s; alpha: >= 0 (FREE uses 0.5);
    student_projection: a learned Linear(d, d) on the student states, created by `setup(backbone)`
    (which `EarlyExitModule` calls, so the optimizer and checkpoints see it) and initialised to the
    identity, so switching it on does not change the loss at the first step.

    Positions: a token head's scored positions (labels != -100); a sequence head's every position.
    """

    def __init__(
        self,
        mapping: str = "closest",
        shallow_layer: int | None = None,
        alpha: float = 0.5,
        student_projection: bool = False,
    ):
        super().__init__()
        if mapping not in MAPPINGS:
            raise ConfigError(f"loss.terms.kd.mapping={mapping!r} is unknown; allowed: {', '.join(MAPPINGS)}")
        if shallow_layer is None:
            raise ConfigError(
                "loss.terms.kd.shallow_layer is not set: set exits.layers={shallow: L_s} (loss=free reads it from "
                "there) or loss.terms.kd.shallow_layer=L_s"
            )
        if isinstance(shallow_layer, bool) or not isinstance(shallow_layer, int) or shallow_layer < 1:
            raise ConfigError(f"loss.terms.kd.shallow_layer={shallow_layer!r} must be an integer >= 1")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
            raise ConfigError(f"loss.terms.kd.alpha={alpha!r} must be a finite number >= 0")
        if not isinstance(student_projection, bool):
            raise ConfigError(f"loss.terms.kd.student_projection={student_projection!r}; allowed: true or false")
        self.mapping = mapping
        self.shallow_layer = shallow_layer
        self.alpha = float(alpha)
        self.student_projection = bool(student_projection)
        self.projection: nn.Linear | None = None

    def setup(self, backbone: ExitBackbone) -> None:
        """Check L_s against the model and create the student projection (once)."""
        check_shallow_layer(self.shallow_layer, backbone.num_layers)
        if self.student_projection and self.projection is None:
            d = backbone.hidden_size
            self.projection = nn.Linear(d, d, device=backbone.head_weight.device)
            with torch.no_grad():
                self.projection.weight.copy_(torch.eye(d))
                self.projection.bias.zero_()

    def forward(self, states: ExitStates, backbone: ExitBackbone, step: TrainStep | None = None) -> LossOutput:
        num_layers = backbone.num_layers
        check_shallow_layer(self.shallow_layer, num_layers)
        if self.student_projection and self.projection is None:
            raise RuntimeError("LayerwiseDistillation(student_projection=True) needs setup(backbone) first")
        by_layer = dict(zip(states.layers, states.hidden, strict=True))
        needed = list(range(1, self.shallow_layer + 1)) + list(
            teacher_layers(self.mapping, num_layers, self.shallow_layer)
        )
        missing = [i for i in needed if i not in by_layer]
        if missing:
            raise ValueError(f"distillation needs the states of layers {missing}; capture them in the forward")

        def normed(i: int) -> Tensor:
            return _rows(backbone.final_norm(by_layer[i]), states.labels, backbone.head_kind)

        students = [normed(j) for j in range(1, self.shallow_layer + 1)]
        if self.projection is not None:
            students = [self.projection(s.to(self.projection.weight.dtype)) for s in students]
        with torch.no_grad():
            teachers = {t: normed(t) for t in teacher_layers(self.mapping, num_layers, self.shallow_layer)}
        kd, _ = layerwise_distillation_loss(students, teachers, self.mapping, num_layers)
        return LossOutput(self.alpha * kd, {"mse": kd.detach()})

    def extra_repr(self) -> str:
        return (
            f"mapping={self.mapping!r}, shallow_layer={self.shallow_layer}, alpha={self.alpha}, "
            f"student_projection={self.student_projection}"
        )
