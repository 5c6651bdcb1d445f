"""LayerSkip's training-time schedules: which exits get a loss this step, and which layers are dropped.

Both are pure functions of the step (and, for dropout, a seed), never of a random number generator's
state: under DDP/FSDP every rank must compute the same answer for a step or the collectives hang.
Neither is used in validation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from eetrain.errors import ConfigError

CURRICULA = ("rotational", "gradual")

# Mixed into the dropout seed so that the same `seed` used elsewhere does not give correlated streams.
_DROPOUT_STREAM = 0x4C415952


def rotational_exits(exits: Sequence[int], step: int, every: int) -> tuple[int, ...]:
    """Exits with a loss at `step` under the rotational curriculum (every R-th exit, shifted each step).

    exits: the n configured exit layers, ascending; the k-th of them (k = 0..n-1) is on iff
    (k + 1 - step) mod R == 0, so step 0 trains exits R, 2R, ... (counted along `exits`) and each step
    moves the pattern one exit deeper. The deepest exit is always on.
    """
    on = {e for k, e in enumerate(exits) if (k + 1 - step) % every == 0}
    return tuple(e for e in exits if e in on or e == exits[-1])


def gradual_exits(exits: Sequence[int], step: int, total_steps: int) -> tuple[int, ...]:
    """Exits with a loss at `step` under the gradual curriculum (LayerSkip).

    Exits are switched on from the deepest downward: the k-th of n exits (k = 0..n-1) is on once
    step / total_steps >= 0.5 * (n - k) / n, so only the deepest exit trains at step 0 and every exit
    by half of training. Integer arithmetic keeps the switch points exact.
    """
    n = len(exits)
    return tuple(e for k, e in enumerate(exits) if 2 * step * n >= total_steps * (n - k) or k == n - 1)


class Curriculum:
    """Which exits get a loss in a training step (LayerSkip's C(t, l)); the deepest exit always does.

    kind: "rotational" (every `every`-th exit, rotating one exit per step) or "gradual" (from the
    deepest exit downward, all on by half of training). `every` is R, used by "rotational" only.
    """

    def __init__(self, kind: str = "rotational", every: int = 2, key: str = "loss.terms.ce.curriculum"):
        if kind not in CURRICULA:
            raise ConfigError(f"{key}.kind={kind!r} is unknown; allowed: {', '.join(CURRICULA)}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"{key}.every={every!r} must be an integer >= 1 (R: every R-th exit trains)")
        self.kind = kind
        self.every = every
        self.key = key

    def active(self, exits: Sequence[int], step: int, total_steps: int) -> tuple[int, ...]:
        """The subset of `exits` (ascending) that gets a loss at optimizer step `step` of `total_steps`."""
        if self.kind == "rotational":
            return rotational_exits(exits, step, self.every)
        if total_steps < 1:
            raise ConfigError(f"{self.key}.kind=gradual needs the number of training steps, and this run "
                              f"has none bounded ({total_steps}): set trainer.max_steps or trainer.max_epochs, or use "
                              "kind=rotational")
        return gradual_exits(exits, step, total_steps)

    def __repr__(self) -> str:
        return f"Curriculum(kind={self.kind!r}, every={self.every})"


def layer_dropout_rates(num_layers: int, p_max: float) -> list[float]:
    """Drop probability of each layer 1..L: p_l = p_max * (2 ** ((l - 1) / (L - 1)) - 1).

    LayerSkip's D(l) = e^{ln 2 * l / (L - 1)} - 1 with 0-based l: the first layer is never dropped and
    the last is dropped with p_max. A one-layer model drops nothing.
    """
    if num_layers == 1:
        return [0.0]
    return [p_max * (2.0 ** ((i - 1) / (num_layers - 1)) - 1.0) for i in range(1, num_layers + 1)]


def dropped_layers(seed: int, step: int, num_layers: int, p_max: float) -> frozenset[int]:
    """The 1-based layers skipped at `step`: layer l independently with p_l (`layer_dropout_rates`).

    A pure function of (seed, step, num_layers, p_max): the uniforms come from a numpy generator seeded
    with the sequence (seed, step, stream id), independent of torch's, numpy's or Python's global
    RNG state, so every rank of a DDP/FSDP job drops the same layers at the same step.
    """
    if p_max == 0.0:
        return frozenset()
    rates = layer_dropout_rates(num_layers, p_max)
    # SeedSequence entropy must be non-negative; the modulo keeps any int seed usable and distinct.
    u = np.random.default_rng([seed % 2**64, step, _DROPOUT_STREAM]).random(num_layers)
    return frozenset(i + 1 for i in range(num_layers) if u[i] < rates[i])


class LayerDropout:
    """LayerSkip's layer dropout for fine-tuning: skip layer l with p_l = p_max * (2^{(l-1)/(L-1)} - 1).

    p_max: in [0, 1]; 0 disables it (LayerSkip uses 0.2 for fine-tuning). seed: the run's seed, so the
    dropped layers are a function of (seed, global step) alone and identical on every rank.
    """

    def __init__(self, p_max: float = 0.2, seed: int = 0, key: str = "loss.layer_dropout"):
        if isinstance(p_max, bool) or not (isinstance(p_max, (int, float)) and math.isfinite(p_max) and 0.0 <= p_max <= 1.0):
            raise ConfigError(f"{key}.p_max={p_max!r} must be within [0, 1] (0 disables layer dropout)")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"{key}.seed={seed!r} must be an integer (the layer-dropout draws' seed)")
        self.p_max = float(p_max)
        self.seed = seed

    def dropped(self, step: int, num_layers: int) -> frozenset[int]:
        return dropped_layers(self.seed, step, num_layers, self.p_max)

    def __repr__(self) -> str:
        return f"LayerDropout(p_max={self.p_max}, seed={self.seed})"
