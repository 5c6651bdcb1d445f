"""Layerwise distillation: mappings at any depth, hand-computed losses, a brute-force closest reference."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from eetrain.errors import ConfigError
from eetrain.losses import JointLoss, LayerwiseDistillation, layerwise_distillation_loss
from eetrain.losses.distillation import (
    closest_alignment,
    distillation_pairs,
    teacher_layers,
    uniform_deep_teachers,
    uniform_teachers,
)
from tests.conftest import examples, make_backbone


@pytest.mark.parametrize(
    "num_layers, shallow, expected",
    [
        (24, 6, (9, 12, 15, 18, 21, 24)),
        (12, 4, (6, 8, 10, 12)),
        (4, 2, (3, 4)),
        (24, 12, tuple(range(13, 25))),
        (12, 5, (6, 8, 9, 11, 12)),  # D=7: floor(j*7/5 + 1/2) = 1, 3, 4, 6, 7
        (4, 3, (4, 4, 4)),  # one deep layer: every student learns from it
        (5, 3, (4, 4, 5)),  # D=2: floor(2j/3 + 1/2) = 1, 1, 2
        (2, 1, (2,)),
    ],
)
def test_uniform_deep_teachers_by_hand(num_layers, shallow, expected):
    assert uniform_deep_teachers(num_layers, shallow) == expected


@pytest.mark.parametrize(
    "num_layers, shallow, expected",
    [
        # round(j * L / L_s), and FREE's table where it has the depths (equal to the formula but at 24 / 10)
        (24, 6, (4, 8, 12, 16, 20, 24)),  # j * 4
        (24, 10, (3, 6, 8, 11, 13, 16, 18, 20, 22, 24)),  # FREE's table; the formula gives 2, 5, 7, 10, 12, 14, ...
        (24, 12, tuple(range(2, 25, 2))),
        (24, 4, (6, 12, 18, 24)),
        (12, 3, (4, 8, 12)),
        (12, 4, (3, 6, 9, 12)),  # j * 3
        (24, 8, (3, 6, 9, 12, 15, 18, 21, 24)),
        (12, 6, (2, 4, 6, 8, 10, 12)),
        (4, 2, (2, 4)),  # j * 2
        (3, 2, (2, 3)),  # 1.5 -> 2 (half up), 3
        (12, 5, (2, 5, 7, 10, 12)),  # 2.4, 4.8, 7.2, 9.6, 12 -> 2, 5, 7, 10, 12
        (24, 7, (3, 7, 10, 14, 17, 21, 24)),  # 3.43, 6.86, 10.29, 13.71, 17.14, 20.57, 24
        (5, 4, (2, 3, 4, 5)),  # 1.25 -> 1 is the student itself: floor j + 1 = 2; 2.5 -> 3, 3.75 -> 4, 5
        (5, 3, (2, 3, 5)),  # 1.67 -> 2, 3.33 -> 3, 5
        (2, 1, (2,)),
    ],
)
def test_uniform_teachers_are_frees_table_by_hand(num_layers, shallow, expected):
    assert uniform_teachers(num_layers, shallow) == expected
    assert distillation_pairs("uniform", num_layers, shallow) == tuple(zip(range(1, shallow + 1), expected, strict=True))


def test_frees_table_is_the_formula_but_at_24_10():
    from eetrain.losses.distillation import FREE_TEACHERS

    for num_layers, table in FREE_TEACHERS.items():
        for shallow, teachers in table.items():
            formula = tuple(max(j + 1, (2 * j * num_layers + shallow) // (2 * shallow)) for j in range(1, shallow + 1))
            assert (teachers == formula) == ((num_layers, shallow) != (24, 10)), (num_layers, shallow)


def test_uniform_teachers_any_depth():
    for num_layers in range(2, 41):
        for shallow in range(1, num_layers):
            t = uniform_teachers(num_layers, shallow)
            assert len(t) == shallow and t[-1] == num_layers
            assert all(j < x <= num_layers for j, x in enumerate(t, 1)), (num_layers, shallow, t)
            assert list(t) == sorted(t) and len(set(t)) == shallow  # strictly increasing


def test_uniform_deep_teachers_any_depth():
    for num_layers in range(2, 41):
        for shallow in range(1, num_layers):
            t = uniform_deep_teachers(num_layers, shallow)
            assert len(t) == shallow and t[-1] == num_layers
            assert all(shallow < x <= num_layers for x in t), (num_layers, shallow, t)
            assert list(t) == sorted(t)
            if num_layers - shallow >= shallow:
                assert len(set(t)) == shallow  # distinct when the deep module is at least as deep


def test_mapping_pairs():
    assert distillation_pairs("last", 24, 6) == ((6, 24),)
    assert distillation_pairs("uniform", 4, 2) == ((1, 2), (2, 4))
    assert distillation_pairs("uniform_deep", 4, 2) == ((1, 3), (2, 4))
    assert teacher_layers("closest", 4, 3) == (4,)
    assert teacher_layers("closest", 24, 6) == (9, 12, 15, 18, 21, 24)  # closest keeps the deep teachers
    assert teacher_layers("uniform_deep", 24, 6) == (9, 12, 15, 18, 21, 24)
    assert teacher_layers("uniform", 24, 6) == (4, 8, 12, 16, 20, 24)


@pytest.mark.parametrize(
    "mse, expected",
    [
        # last teacher takes student 1 (0.4); the middle one only has student 0; the first reuses 0
        ([[0.1, 0.5, 0.9], [0.2, 0.3, 0.8], [0.7, 0.4, 0.6]], [0, 0, 1]),
        # each teacher takes the student just below the previous one
        ([[0.1, 0.5, 0.9], [0.9, 0.2, 0.8], [0.7, 0.4, 0.1]], [0, 1, 2]),
        # the middle teacher prefers student 2 but must stay below student 2
        ([[0.3, 0.1, 0.9], [0.9, 0.5, 0.1], [0.7, 0.4, 0.1]], [0, 1, 2]),
        # the last teacher's best is student 0: everyone pairs with it
        ([[0.5, 0.1, 0.1], [0.9, 0.1, 0.1], [0.0, 0.4, 0.1]], [0, 0, 0]),
    ],
)
def test_closest_alignment_by_hand(mse, expected):
    assert closest_alignment(torch.tensor(mse)) == expected


def _states(values):
    """{layer: (1, 1)} from scalars: N = 1 position, d = 1."""
    return [torch.tensor([[v]]) for v in values]


def test_distillation_loss_hand_computed():
    # L = 4, L_s = 2: students s1 = 1, s2 = 2; teachers t3 = 3, t4 = 1.1.
    s = _states([1.0, 2.0])
    t = dict(zip((3, 4), _states([3.0, 1.1]), strict=True))
    # last: (2, 4): (2 - 1.1)^2 = 0.81
    loss, pairs = layerwise_distillation_loss(s, t, "last", 4)
    assert pairs == ((2, 4),) and loss.item() == pytest.approx(0.81)
    # uniform_deep: (1, 3) -> 4, (2, 4) -> 0.81; mean 2.405
    loss, pairs = layerwise_distillation_loss(s, t, "uniform_deep", 4)
    assert pairs == ((1, 3), (2, 4)) and loss.item() == pytest.approx(2.405)
    # uniform (FREE's round(j * 4 / 2) = 2, 4): (1, 2) -> (1 - 2)^2 = 1 against layer 2's state (2.0,
    # detached), (2, 4) -> 0.81; mean 0.905
    loss, pairs = layerwise_distillation_loss(s, {2: s[1], **t}, "uniform", 4)
    assert pairs == ((1, 2), (2, 4)) and loss.item() == pytest.approx(0.905)
    # closest: t4 picks s1 (0.01 < 0.81); nothing is below s1, so t3 reuses s1 (4); mean 2.005
    loss, pairs = layerwise_distillation_loss(s, t, "closest", 4)
    assert pairs == ((1, 3), (1, 4)) and loss.item() == pytest.approx(2.005)


@pytest.mark.parametrize("mapping", ["last", "uniform", "uniform_deep", "closest"])
def test_a_batch_without_scored_positions_distils_nothing(mapping):
    """N = 0 (every target position padding): a zero loss with zero gradients, not NaN (the CE gives 0)."""
    students = [torch.zeros(0, 8, requires_grad=True) for _ in range(2)]
    teachers = {layer: torch.zeros(0, 8) for layer in range(1, 5)}
    loss, pairs = layerwise_distillation_loss(students, teachers, mapping, 4)
    assert loss.item() == 0.0 and pairs == ()
    loss.backward()
    assert all(s.grad is not None and s.grad.shape == (0, 8) for s in students)


def _closest_reference(students, teachers, num_layers):
    """Brute force: every MSE with F.mse_loss, the walk written out with explicit candidate lists."""
    shallow = len(students)
    layers = sorted(set(uniform_deep_teachers(num_layers, shallow)))
    table = {(s, t): F.mse_loss(students[s - 1], teachers[t]).item() for s in range(1, shallow + 1) for t in layers}
    chosen = {}
    previous = shallow + 1
    for t in reversed(layers):
        candidates = [s for s in range(1, shallow + 1) if s < previous]
        if candidates:
            best = min(table[(s, t)] for s in candidates)
            previous = min(s for s in candidates if table[(s, t)] == best)
        chosen[t] = previous
    pairs = tuple((chosen[t], t) for t in layers)
    loss = sum(F.mse_loss(students[s - 1], teachers[t]) for s, t in pairs) / len(pairs)
    return loss, pairs


@pytest.mark.parametrize("num_layers, shallow", [(4, 2), (4, 3), (6, 2), (7, 3), (12, 4), (9, 6)])
def test_closest_matches_brute_force(num_layers, shallow):
    gen = torch.Generator().manual_seed(num_layers * 100 + shallow)
    for trial in range(20):
        # states drift with depth plus noise, so the chosen students vary between trials
        base = torch.randn(5, 8, generator=gen)
        h = [base * (1 + 0.3 * i) + 0.8 * torch.randn(5, 8, generator=gen) for i in range(num_layers + 1)]
        students = [h[j] for j in range(1, shallow + 1)]
        teachers = {t: h[t] for t in range(shallow + 1, num_layers + 1)}
        loss, pairs = layerwise_distillation_loss(students, teachers, "closest", num_layers)
        ref_loss, ref_pairs = _closest_reference(students, teachers, num_layers)
        assert pairs == ref_pairs, trial
        torch.testing.assert_close(loss, ref_loss)


def test_closest_is_the_best_monotone_choice_when_greedy_is_optimal():
    # With one teacher the walk is a plain argmin over all students.
    students = _states([0.0, 5.0, 2.9])
    loss, pairs = layerwise_distillation_loss(students, {4: torch.tensor([[3.0]])}, "closest", 4)
    assert pairs == ((3, 4),) and loss.item() == pytest.approx(0.01, rel=1e-5)
    # brute force over every non-decreasing assignment agrees on a case where greedy is optimal
    s = _states([1.0, 2.0, 3.0])
    t = dict(zip((4, 5, 6), _states([1.1, 2.1, 3.1]), strict=True))
    loss, pairs = layerwise_distillation_loss(s, t, "closest", 6)
    best = min(
        (sum(float(s[a][0, 0] - t[b][0, 0]) ** 2 for a, b in zip(assign, (4, 5, 6), strict=True)) / 3, assign)
        for assign in itertools.combinations_with_replacement(range(3), 3)
    )
    assert [p[0] - 1 for p in pairs] == list(best[1])
    assert loss.item() == pytest.approx(best[0], rel=1e-5)


@pytest.mark.parametrize("family", ["t5", "llama", "bert"])
@pytest.mark.parametrize("mapping", ["last", "uniform", "uniform_deep", "closest"])
def test_term_on_a_model(family, mapping):
    bb = make_backbone(family)  # 3 layers, L_s = 1 or 2
    states = bb(bb.collate(examples()))
    term = LayerwiseDistillation(mapping, shallow_layer=2, alpha=0.5)
    out = JointLoss({"kd": term})(states, bb)
    # reference: final-normed states at the scored positions, teacher detached
    labels = states.labels
    def rows(h):
        n = bb.final_norm(h)
        return n[labels != -100] if bb.head_kind == "token" else n.reshape(-1, n.shape[-1])
    s = [rows(states.hidden[0]), rows(states.hidden[1])]
    t = {2: rows(states.hidden[1]).detach(), 3: rows(states.hidden[2]).detach()}
    # L = 3, L_s = 2: uniform round(1.5) = 2, round(3) = 3; uniform_deep: the only deep layer, 3
    pairs = {"last": [(2, 3)], "uniform": [(1, 2), (2, 3)], "uniform_deep": [(1, 3), (2, 3)]}.get(mapping)
    if pairs is None:  # closest: one teacher (3), the student nearer to it
        pairs = [(min((1, 2), key=lambda j: F.mse_loss(s[j - 1], t[3]).item()), 3)]
    ref = sum(F.mse_loss(s[a - 1], t[b]) for a, b in pairs) / len(pairs)
    torch.testing.assert_close(out.total, 0.5 * ref)
    torch.testing.assert_close(out.logs["kd/mse"], ref.detach())
    # gradient reaches the students' layers only through the student side
    out.total.backward()
    last_block = bb.blocks[-1]
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in last_block.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in bb.blocks[0].parameters())


def test_t5_final_norm_has_no_rescale():
    bb = make_backbone("t5", tie_word_embeddings=True)
    h = torch.randn(2, 3, 32)
    torch.testing.assert_close(bb.final_norm(h), bb.model.decoder.final_layer_norm(h))
    torch.testing.assert_close(bb.exit_features(h), bb.final_norm(h) * 32**-0.5)
    llama = make_backbone("llama")
    torch.testing.assert_close(llama.final_norm(h), llama.model.model.norm(h))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mapping="nearest", shallow_layer=2), r"loss.terms.kd.mapping='nearest' is unknown; allowed: last, uniform, uniform_deep, closest"),
        (dict(shallow_layer=2, alpha=-0.5), r"loss.terms.kd.alpha=-0.5 must be a finite number >= 0"),
        (dict(shallow_layer=None), r"loss.terms.kd.shallow_layer is not set.*exits.layers=\{shallow: L_s\}"),
        (dict(shallow_layer=0), r"loss.terms.kd.shallow_layer=0 must be an integer >= 1"),
        (dict(shallow_layer=2, student_projection="maybe"), r"loss.terms.kd.student_projection='maybe'; allowed: true or false"),
    ],
)
def test_bad_term_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LayerwiseDistillation(**kwargs)


def test_shallow_layer_must_be_below_the_depth():
    bb = make_backbone("t5")
    for shallow in (3, 5):
        with pytest.raises(ConfigError, match=rf"loss.terms.kd.shallow_layer={shallow} must be within 1..2"):
            LayerwiseDistillation(shallow_layer=shallow).setup(bb)
    with pytest.raises(ConfigError, match="must be within 1..23"):
        uniform_teachers(24, 24)
    with pytest.raises(ConfigError, match="must be within 1..23"):
        uniform_deep_teachers(24, 24)
