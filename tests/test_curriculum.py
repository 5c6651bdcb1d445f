"""LayerSkip's rotational and gradual curricula, by hand."""

import pytest

from eetrain.errors import ConfigError
from eetrain.losses import Curriculum
from eetrain.losses.curriculum import gradual_exits, rotational_exits


def test_rotational_by_hand():
    exits = (1, 2, 3, 4, 5, 6)
    # R = 3: layers 3, 6 at step 0; shifted one layer deeper each step; 6 always on
    assert [rotational_exits(exits, t, 3) for t in range(4)] == [(3, 6), (1, 4, 6), (2, 5, 6), (3, 6)]
    # R = 1: every exit every step
    assert rotational_exits(exits, 7, 1) == exits
    # counted along the configured exits, not layer numbers: exits (2, 4, 6), R = 2
    assert [rotational_exits((2, 4, 6), t, 2) for t in range(3)] == [(4, 6), (2, 6), (4, 6)]
    # R larger than the number of exits: only the deepest at most steps
    assert [rotational_exits((1, 2, 3), t, 5) for t in range(5)] == [(3,), (1, 3), (2, 3), (3,), (3,)]


def test_rotational_covers_every_exit_once_per_period():
    exits = tuple(range(1, 13))
    for every in (2, 3, 4):
        seen = [0] * 13
        for t in range(every):
            for e in rotational_exits(exits, t, every):
                seen[e] += 1
        assert seen[1:12] == [1] * 11 and seen[12] == every


def test_gradual_by_hand():
    exits = (1, 2, 3, 4)
    # 8 steps: layer 3 from step 2 (25 %), 2 from step 3, 1 from step 4 (50 %); 4 always
    got = [gradual_exits(exits, t, 8) for t in range(8)]
    assert got == [(4,), (4,), (3, 4), (2, 3, 4), (1, 2, 3, 4), (1, 2, 3, 4), (1, 2, 3, 4), (1, 2, 3, 4)]
    # shallow/deep pair over 10 steps: the shallow exit joins at half of training
    assert [len(gradual_exits((6, 24), t, 10)) for t in (0, 4, 5, 9)] == [1, 1, 2, 2]


def test_curriculum_object_and_errors():
    assert Curriculum("rotational", every=2).active((1, 2, 3), 0, 0) == (2, 3)
    assert Curriculum("gradual").active((1, 2, 3, 4), 2, 8) == (3, 4)
    with pytest.raises(ConfigError, match=r"loss.terms.ce.curriculum.every=0 must be an integer >= 1"):
        Curriculum("rotational", every=0)
    with pytest.raises(ConfigError, match=r"loss.terms.ce.curriculum.every=-1 must be an integer >= 1"):
        Curriculum("rotational", every=-1)
    with pytest.raises(ConfigError, match=r"loss.terms.ce.curriculum.kind='cyclic' is unknown; allowed: rotational, gradual"):
        Curriculum("cyclic")
    with pytest.raises(ValueError, match="needs the number of training steps"):
        Curriculum("gradual").active((1, 2), 0, 0)
