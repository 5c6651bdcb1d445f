"""Exactness of early-exit decoding (eetrain.decoding) on tiny random-weight T5 and LLaMA models."""

from __future__ import annotations

import copy

import pytest
import torch

from eetrain.decoding import ScheduledExits, generate, speculative_accept
from eetrain.decoding.generate import sampling_probs
from eetrain.errors import ConfigError
from eetrain.exits.classifiers import CalmClassifier, LSTMClassifier, ThreeStateMLP
from eetrain.exits.policy import ExitPolicy
from tests.conftest import make_backbone
from tests.decoding_reference import reference_generate

L = 4
# Larger initial weights than the defaults: attention to earlier positions then changes the argmax,
# so copied and exact deep keys/values give different tokens and the tests can tell them apart.
SHARP = {
    "t5": dict(num_layers=L, num_decoder_layers=L, initializer_factor=8.0),
    "llama": dict(num_hidden_layers=L, initializer_range=0.3),
}
SOURCE = [5, 17, 33, 99, 120, 7, 1]
NEW = 16


@pytest.fixture(autouse=True)
def _unwritten_slots_are_nan(nan_caches):
    """Every test here decodes from NaN-filled caches: exactness must not hang on what memory held."""


@pytest.fixture(scope="module", params=["t5", "llama"])
def model(request):
    bb = make_backbone(request.param, **SHARP[request.param])
    return bb.eval()


def one(source=SOURCE):
    return {"input_ids": torch.tensor([source]), "attention_mask": torch.ones(1, len(source), dtype=torch.long)}


def padded_batch(bb, lengths=(9, 5, 7, 3), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 400, (len(lengths), max(lengths)), generator=g)
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids * mask + bb.pad_token_id * (1 - mask), "attention_mask": mask}


def hf_greedy(bb, batch, new):
    """HF generate's greedy sequences, each up to and including its end-of-sequence token."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if bb.family == "t5":
        out = bb.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False)[:, 1:]
    else:
        order = torch.argsort(mask, dim=1, stable=True)  # HF decoder-only generation wants left padding
        out = bb.model.generate(
            input_ids=ids.gather(1, order), attention_mask=mask.gather(1, order), max_new_tokens=new,
            do_sample=False, pad_token_id=bb.pad_token_id,
        )[:, ids.shape[1]:]
    seqs = []
    for row in out.tolist():
        seqs.append(row[: row.index(bb.eos_token_id) + 1] if bb.eos_token_id in row else row)
    return seqs


def schedule_draws(spec, n, seed):
    sched = ScheduledExits(spec, L, seed=seed)
    return [int(sched.draw(1)[0]) for _ in range(n)]


# --- never exiting = HF generate --------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["copy", "parallel"])
def test_no_exit_equals_hf_generate_batch1_and_padded_batch(model, strategy):
    out = generate(model, one(), None, strategy=strategy, max_new_tokens=NEW)
    assert out.sequences() == hf_greedy(model, one(), NEW)
    assert out.mean_exit_layer == L
    batch = padded_batch(model)
    expected = hf_greedy(model, batch, NEW)
    for mode in ("ride_along", "gather"):
        out = generate(model, batch, None, strategy=strategy, batch_mode=mode, max_new_tokens=NEW)
        assert out.sequences() == expected


# --- every token at layer k = the model truncated to k layers ----------------------------------------
@pytest.mark.parametrize("strategy", ["copy", "parallel"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_fixed_exit_equals_truncated_model(model, strategy, k):
    out = generate(model, one(), f"fixed:{k}", strategy=strategy, max_new_tokens=NEW, stop_at_eos=False)
    truncated, _ = reference_generate(model, SOURCE, NEW, "exact", lambda step: k)
    assert out.sequences()[0] == truncated
    assert out.row_exit_layers()[0] == [k] * NEW


# --- mixed exits = the slow reference with the same decisions and semantics -------------------------
@pytest.mark.parametrize("strategy,semantics", [("copy", "copy"), ("parallel", "exact")])
def test_mixed_schedule_equals_slow_reference(model, strategy, semantics):
    draws = schedule_draws("random:2", NEW, seed=2)
    out = generate(model, one(), ScheduledExits("random:2", L, seed=2), strategy=strategy, max_new_tokens=NEW,
                   stop_at_eos=False)
    ref, exits = reference_generate(model, SOURCE, NEW, semantics, lambda step: draws[step])
    assert out.row_exit_layers()[0] == exits == draws
    assert out.sequences()[0] == ref
    # the two semantics really differ on this model, so the comparison above can fail
    other, _ = reference_generate(model, SOURCE, NEW, "exact" if semantics == "copy" else "copy",
                                  lambda step: draws[step])
    assert other != ref


def test_random_schedule_mean_is_what_it_says():
    # uniform on 1..2*MEAN-1: half-layer means are fine (random:2.5 on 4 layers draws 1..4) ...
    for spec, top in (("random:1", 1), ("random:1.5", 2), ("random:2.5", 4)):
        draws = ScheduledExits(spec, 4, seed=0).draw(4000)
        assert set(draws.tolist()) == set(range(1, top + 1))
        assert abs(draws.double().mean().item() - (top + 1) / 2) < 0.1
    # ... a range deeper than the model (clipping) or rounded to whole layers would shift the mean
    for spec in ("random:3", "random:4", "random:3.25", "random:1.75"):
        with pytest.raises(ConfigError, match=r"exits='random:[\d.]+': random:MEAN .* <= 4; allowed MEAN: 1 to 2.5"):
            ScheduledExits(spec, 4)
    with pytest.raises(ConfigError, match=r"exits='fixed:2.5': fixed:K exits every token at layer K, a whole layer"):
        ScheduledExits("fixed:2.5", 4)  # was read as fixed:2


def policies(d):
    """Policy templates; thresholds are then picked per model so that exits really vary."""
    torch.manual_seed(3)
    probs = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 0.999, 0.9999]
    return [
        (ExitPolicy("softmax_gap", None, min_exit_layer=2), probs),
        (ExitPolicy("softmax_max", None, min_exit_layer=1), probs),
        (ExitPolicy("entropy", None, min_exit_layer=2), [-6.0, -5.9, -5.5, -5.0, -4.0, -3.0, -1.0, -0.1, -0.01, -0.001]),
        (ExitPolicy("softmax_gap", None, min_exit_layer=1), [{"lam": p, "N": NEW, "tau": 4.0} for p in probs]),
        (ExitPolicy("hidden_saturation", None, min_exit_layer=2), [0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99]),
        (ExitPolicy("patience", None, min_exit_layer=1, measure_kwargs={"patience": 1}), [None]),
        (ExitPolicy("monotonic", None, min_exit_layer=1, measure_kwargs={"min_confidence": 0.0}), [None]),
        (ExitPolicy(CalmClassifier(d), None, min_exit_layer=1), [0.3, 0.4, 0.5, 0.6, 0.7]),
        (ExitPolicy(ThreeStateMLP(d), None, min_exit_layer=2), [0.3, 0.4, 0.5, 0.6, 0.7]),
        (ExitPolicy(LSTMClassifier(d, hidden_size=16), None, min_exit_layer=1), [0.3, 0.4, 0.5, 0.6, 0.7]),
        (ExitPolicy("softmax_max", None, min_exit_layer=1, exit_points=(2, 3)), probs),
    ]


def varied(bb, template, candidates):
    """The candidate threshold whose exits on SOURCE take the most distinct layers."""
    best, spread = None, -1
    for thr in candidates:
        policy = template if thr is None else template.with_threshold(thr)
        layers = generate(bb, one(), policy, max_new_tokens=8, stop_at_eos=False).row_exit_layers()[0]
        if len(set(layers)) > spread:
            best, spread = policy, len(set(layers))
    return best


@pytest.mark.parametrize("index", range(11))
@pytest.mark.parametrize("strategy,semantics", [("copy", "copy"), ("parallel", "exact")])
def test_policies_decide_as_exit_layers_on_the_same_states(model, index, strategy, semantics):
    """The layer-by-layer decider equals eetrain.exits.policy.exit_layers on the recomputed states."""
    policy = varied(model, *policies(model.hidden_size)[index])
    out = generate(model, one(), policy, strategy=strategy, max_new_tokens=8, stop_at_eos=False)
    ref, exits = reference_generate(model, SOURCE, 8, semantics, policy)
    assert out.row_exit_layers()[0] == exits
    assert out.sequences()[0] == ref


def normed_policies(d):
    """exit.features=normed: saturation and the three classifiers on final-normed states."""
    torch.manual_seed(4)
    probs = [0.3, 0.4, 0.5, 0.6, 0.7]
    return [
        (ExitPolicy("hidden_saturation", None, min_exit_layer=2, features="normed"), [0.2, 0.4, 0.6, 0.8, 0.9, 0.99]),
        (ExitPolicy(CalmClassifier(d, features="normed"), None, min_exit_layer=1), probs),
        (ExitPolicy(ThreeStateMLP(d, features="normed"), None, min_exit_layer=2), probs),
        (ExitPolicy(LSTMClassifier(d, hidden_size=16, features="normed"), None, min_exit_layer=1), probs),
    ]


@pytest.mark.parametrize("index", range(4))
def test_normed_features_decide_as_exit_layers_on_the_same_normed_states(model, index):
    """exit.features=normed: the decider applies final_norm before the classifier / cosine, as the
    offline records do (the reference feeds exit_layers final_norm(h_i) and final_norm(h_0))."""
    policy = varied(model, *normed_policies(model.hidden_size)[index])
    assert policy.features == "normed"
    out = generate(model, one(), policy, strategy="parallel", max_new_tokens=8, stop_at_eos=False)
    ref, exits = reference_generate(model, SOURCE, 8, "exact", policy)
    assert out.row_exit_layers()[0] == exits
    assert out.sequences()[0] == ref


# --- self-speculative = full greedy --------------------------------------------------------------------
@pytest.mark.parametrize("draft_layer", [1, 2, 3])
@pytest.mark.parametrize("draft_tokens", [1, 3, 5])
def test_self_speculative_is_lossless(model, draft_layer, draft_tokens):
    full = generate(model, one(), None, max_new_tokens=NEW, stop_at_eos=False).sequences()
    out = generate(model, one(), strategy="self_speculative", draft_layer=draft_layer,
                   draft_tokens=draft_tokens, max_new_tokens=NEW, stop_at_eos=False)
    assert out.sequences() == full
    assert set(out.row_exit_layers()[0]) <= {draft_layer, L}


@pytest.mark.parametrize("draft_layer,draft_tokens", [(2, 3), (1, 1), (3, 4)])
@pytest.mark.parametrize("stop_at_eos", [False, True])
def test_self_speculative_batch_equals_full(model, draft_layer, draft_tokens, stop_at_eos):
    # every row at once, padded, each row accepting its own prefix (its own cache slots) = full greedy
    batch = padded_batch(model)
    full = generate(model, batch, None, max_new_tokens=NEW, stop_at_eos=stop_at_eos)
    spec = generate(model, batch, strategy="self_speculative", draft_layer=draft_layer, draft_tokens=draft_tokens,
                    max_new_tokens=NEW, stop_at_eos=stop_at_eos)
    assert spec.sequences() == full.sequences()
    assert spec.lengths.tolist() == full.lengths.tolist()
    layers = spec.row_exit_layers()
    assert all(set(row) <= {draft_layer, L} for row in layers)
    if draft_layer == L - 1:  # rows accept different numbers of drafts, so they sit at different slots
        assert len({row.count(draft_layer) for row in layers}) > 1


def test_speculative_accept_hand_checked():
    # p = the full model's distribution, q = the draft's, at k = 2 drafted positions of 2 rows
    p = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.8, 0.1]]] * 2)
    q = torch.tensor([[[0.2, 0.5, 0.3], [0.6, 0.2, 0.2]]] * 2)
    drafts = torch.tensor([[1, 0], [1, 0]])  # p/q of the drafts: 0.3/0.5 = 0.6, then 0.1/0.6 = 1/6
    # row 0: u = 0.7 >= 0.6 rejects the first draft: the replacement comes from max(0, p - q) = [0.3, 0, 0]
    # row 1: u = 0.5 keeps it, u = 0.5 >= 1/6 rejects the second: from max(0, p - q) = [0, 0.6, 0] -> 1
    accepted, replacement = speculative_accept(p, q, drafts, torch.tensor([[0.7, 0.0], [0.5, 0.5]]))
    assert accepted.tolist() == [0, 1]
    assert replacement.tolist() == [0, 1]
    accepted, _ = speculative_accept(p, q, drafts, torch.tensor([[0.59, 0.16], [0.0, 0.0]]))
    assert accepted.tolist() == [2, 2]  # both under their ratios: every draft kept
    same = torch.tensor([[[0.0, 1.0, 0.0]]])  # p = q: always kept, and a vanished residual falls back to p
    assert speculative_accept(same, same, torch.tensor([[1]]), torch.tensor([[0.999]]))[0].tolist() == [1]


def test_sampling_probs_hand_checked():
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    assert torch.allclose(sampling_probs(logits, 1.0, 1.0), torch.tensor([0.5, 0.3, 0.2]))
    # nucleus 0.6: 0.5 < 0.6 keeps the second token too (mass before it 0.5), the third starts at 0.8
    assert torch.allclose(sampling_probs(logits, 1.0, 0.6), torch.tensor([0.625, 0.375, 0.0]))
    assert torch.allclose(sampling_probs(logits, 1.0, 0.4), torch.tensor([1.0, 0.0, 0.0]))
    # temperature 0.5 squares the probabilities before renormalising: 0.25, 0.09, 0.04 over 0.38
    assert torch.allclose(sampling_probs(logits, 0.5, 1.0), torch.tensor([0.25, 0.09, 0.04]) / 0.38)


def test_speculative_accept_keeps_the_full_distribution():
    # drafts drawn from q, kept or replaced: the emitted token at each position follows p (where emitted)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    p = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    q = torch.tensor([[0.2, 0.5, 0.3], [0.4, 0.4, 0.2]])
    drafts = torch.stack([torch.multinomial(q[j], n, replacement=True, generator=g) for j in range(2)], dim=1)
    accepted, replacement = speculative_accept(p.expand(n, 2, 3), q.expand(n, 2, 3), drafts,
                                               torch.rand(n, 2, generator=g), g)
    first = torch.where(accepted >= 1, drafts[:, 0], replacement)
    reached = accepted >= 1  # the second position is emitted only after the first draft was kept
    second = torch.where(accepted >= 2, drafts[:, 1], replacement)[reached]
    for tokens, target in ((first, p[0]), (second, p[1])):
        freq = torch.bincount(tokens, minlength=3).double() / len(tokens)
        assert torch.allclose(freq, target.double(), atol=0.006), (freq, target)


def full_model_probs(bb, source, prefixes, temperature):
    """`(len(prefixes), V)` the full model's sampling distribution after each generated `prefix`."""
    ids = torch.tensor([source] * len(prefixes))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        if bb.family == "t5":
            start = torch.full((len(prefixes), 1), bb.model.config.decoder_start_token_id)
            logits = bb.model(input_ids=ids, attention_mask=mask,
                              decoder_input_ids=torch.cat([start, torch.tensor(prefixes, dtype=torch.long)], dim=1)).logits
        else:
            full = torch.cat([ids, torch.tensor(prefixes, dtype=torch.long).view(len(prefixes), -1)], dim=1)
            logits = bb.model(input_ids=full, attention_mask=torch.ones_like(full)).logits
    return torch.softmax(logits[:, -1] / temperature, dim=-1)


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_self_speculative_sampling_follows_the_full_model(family):
    # a 24-token vocabulary, so that 8000 samples pin each token's frequency; E = 1 drafts from a
    # distribution far from the full model's (total variation ~0.4), so skipping or botching the
    # verification would be seen
    size = dict(num_layers=L, num_decoder_layers=L, initializer_factor=2.0) if family == "t5" else \
        dict(num_hidden_layers=L, initializer_range=0.1)
    bb = make_backbone(family, vocab_size=24, **size).eval()
    source, n, vocab = [5, 17, 3, 9, 12, 7, 1], 8000, 24
    batch = {"input_ids": torch.tensor([source] * n), "attention_mask": torch.ones(n, len(source), dtype=torch.long)}
    out = generate(bb, batch, strategy="self_speculative", draft_layer=1, draft_tokens=2, max_new_tokens=3,
                   temperature=1.0, seed=3, stop_at_eos=False)
    p1 = full_model_probs(bb, source, [[]], 1.0)[0]
    p2 = (p1[:, None] * full_model_probs(bb, source, [[t] for t in range(vocab)], 1.0)).sum(dim=0)
    draft = generate(bb, batch, "fixed:1", max_new_tokens=2, temperature=1.0, seed=3, stop_at_eos=False)
    plain = generate(bb, batch, None, max_new_tokens=2, temperature=1.0, seed=4, stop_at_eos=False)  # no exits

    def tv(tokens, target):
        return 0.5 * float((torch.bincount(tokens, minlength=vocab) / n - target).abs().sum())

    assert tv(out.tokens[:, 0], p1) < 0.05 and tv(out.tokens[:, 1], p2) < 0.05
    assert tv(plain.tokens[:, 0], p1) < 0.05 and tv(plain.tokens[:, 1], p2) < 0.05
    assert tv(draft.tokens[:, 1], p2) > 0.15  # what unverified drafts would give
    assert 0.1 < (out.exit_layers[:, 1:] == 1).float().mean() < 0.9  # drafts both kept and replaced


def test_self_speculative_sampling_is_seeded_and_top_p_one_token_is_greedy(model):
    kw = dict(strategy="self_speculative", draft_layer=2, draft_tokens=3, max_new_tokens=NEW, stop_at_eos=False)
    batch = padded_batch(model)
    a = generate(model, batch, temperature=1.0, seed=5, **kw)
    assert a.tokens.tolist() == generate(model, batch, temperature=1.0, seed=5, **kw).tokens.tolist()
    greedy = generate(model, batch, None, max_new_tokens=NEW, stop_at_eos=False)
    assert generate(model, batch, temperature=1.0, top_p=1e-6, **kw).sequences() == greedy.sequences()


# --- per-sample exits at batch > 1 = each row alone ----------------------------------------------------
def rows_alone(bb, batch, policy, strategy, new):
    outs = []
    for r in range(batch["input_ids"].shape[0]):
        keep = batch["attention_mask"][r].bool()
        row = {"input_ids": batch["input_ids"][r:r + 1, keep], "attention_mask": batch["attention_mask"][r:r + 1, keep]}
        o = generate(bb, row, policy, strategy=strategy, max_new_tokens=new, stop_at_eos=False)
        outs.append((o.sequences()[0], o.row_exit_layers()[0]))
    return outs


@pytest.mark.parametrize(
    "mode,strategy", [("gather", "copy"), ("gather", "parallel"), ("ride_along", "parallel")]
)
def test_batched_per_sample_exits_equal_rows_alone(model, mode, strategy):
    policy = ExitPolicy("hidden_saturation", 0.6, min_exit_layer=1)
    batch = padded_batch(model)
    out = generate(model, batch, policy, strategy=strategy, batch_mode=mode, max_new_tokens=10, stop_at_eos=False)
    alone = rows_alone(model, batch, policy, strategy, 10)
    exits = out.row_exit_layers()
    assert len({e for row in exits for e in row}) > 1  # rows really exit at different layers
    for r, (tokens, layers) in enumerate(alone):
        assert out.sequences()[r] == tokens
        assert exits[r] == layers
    assert out.mean_batch_max_exit_layer >= out.mean_exit_layer


def test_ride_along_copy_at_batch_1_is_copy(model):
    policy = ExitPolicy("hidden_saturation", 0.6, min_exit_layer=1)
    a = generate(model, one(), policy, strategy="copy", batch_mode="ride_along", max_new_tokens=10)
    b = generate(model, one(), policy, strategy="copy", batch_mode="gather", max_new_tokens=10)
    assert a.tokens.tolist() == b.tokens.tolist()


def test_end_of_sequence_stops_rows_and_pads(model):
    eos = model.eos_token_id
    batch = padded_batch(model)
    free = generate(model, batch, None, max_new_tokens=12, stop_at_eos=False)
    stopped = generate(model, batch, None, max_new_tokens=12, batch_mode="gather")
    for r, seq in enumerate(free.sequences()):
        n = seq.index(eos) + 1 if eos in seq else len(seq)
        assert stopped.sequences()[r] == seq[:n]
        assert int(stopped.lengths[r]) == n
        assert (stopped.exit_layers[r, n:] == 0).all()


def test_sampling_is_seeded_and_top_p_one_token_is_greedy(model):
    a = generate(model, one(), None, max_new_tokens=8, temperature=1.0, seed=7, stop_at_eos=False)
    b = generate(model, one(), None, max_new_tokens=8, temperature=1.0, seed=7, stop_at_eos=False)
    assert a.tokens.tolist() == b.tokens.tolist()
    greedy = generate(model, one(), None, max_new_tokens=8, stop_at_eos=False)
    tiny_p = generate(model, one(), None, max_new_tokens=8, temperature=1.0, top_p=1e-6, stop_at_eos=False)
    assert tiny_p.tokens.tolist() == greedy.tokens.tolist()


def test_output_accounting(model):
    out = generate(model, one(), "random:2", max_new_tokens=6, stop_at_eos=False)
    assert out.num_tokens == 6 and out.seconds > 0 and 0 <= out.decision_seconds <= out.seconds
    assert out.tokens_per_second == pytest.approx(6 / out.seconds)
    assert out.mean_exit_layer == pytest.approx(float(out.exit_layers.double().mean()))


# --- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(strategy="teleport"), "decoding.strategy='teleport'; allowed: copy, parallel, self_speculative"),
        (dict(batch_mode="fast"), "decoding.batch_mode"),
        (dict(max_new_tokens=0), "decoding.max_new_tokens=0"),
        (dict(strategy="self_speculative", draft_layer=L), f"allowed: 1..{L - 1}"),
        (dict(strategy="self_speculative", draft_tokens=0), "decoding.draft_tokens"),
        (dict(strategy="self_speculative", policy="fixed:2"), "self_speculative takes no exit policy"),
        (dict(policy="fixed:9"), "outside 1..4"),
        (dict(policy="sometimes"), "fixed:K and random:MEAN"),
        (dict(policy=ExitPolicy("softmax_gap", 0.5, min_exit_layer=6)), "min_exit_layer=6 exceeds"),
        (dict(policy=ExitPolicy(CalmClassifier(48), 0.5)), "hidden size 48"),
        (dict(temperature=-1.0), "decoding.temperature"),
        (dict(temperature=float("nan")), "decoding.temperature=nan"),  # nan < 0 is False: it decoded greedily
        (dict(temperature=float("inf")), "decoding.temperature=inf"),
        (dict(policy=ScheduledExits("fixed:6", 8)), "exits='fixed:6' was scheduled for 8 layers; the model has 4"),
        (dict(gather_min_batch=0), "decoding.gather_min_batch=0; allowed: null"),
        (dict(gather_min_batch=-5), "decoding.gather_min_batch=-5"),
        # self_speculative ignored these without a word
        (dict(strategy="self_speculative", batch_mode="gather"), "self_speculative takes no batch_mode"),
        (dict(strategy="self_speculative", record=True), "self_speculative takes no record"),
        (dict(strategy="self_speculative", rollback=1.0), "self_speculative takes no rollback"),
        (dict(strategy="self_speculative", agreement=True, candidates=4), "takes no agreement, candidates"),
        (dict(strategy="self_speculative", check_every=2), "self_speculative takes no check_every"),
    ],
)
def test_bad_input_names_the_key(model, kwargs, match):
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        generate(model, one(), **{"max_new_tokens": 4, **kwargs})


def test_batch_without_attention_mask_is_refused(model):
    with pytest.raises(ConfigError, match="input_ids and attention_mask"):
        generate(model, {"input_ids": torch.tensor([SOURCE])}, None, max_new_tokens=4)


@pytest.mark.parametrize("ids, mask", [
    ([[5, 6, 7]], [[1, 1]]),  # a narrower mask read as left padding: another prompt, decoded without an error
    ([5, 6, 7], [1, 1, 1]),
    ([[5, 6, 7]], [[1, 1, 1], [1, 1, 1]]),
    (torch.zeros(0, 3), torch.zeros(0, 3)),  # no rows
])
def test_ids_and_mask_of_different_shapes_are_refused(model, ids, mask):
    batch = {"input_ids": torch.as_tensor(ids).long(), "attention_mask": torch.as_tensor(mask).long()}
    with pytest.raises(ConfigError, match="decoding needs input_ids and attention_mask of one shape"):
        generate(model, batch, None, max_new_tokens=2)


def test_self_speculative_reports_where_its_time_goes(model):
    out = generate(model, one(), None, strategy="self_speculative", draft_layer=2, draft_tokens=3, max_new_tokens=6,
                   stop_at_eos=False)
    assert out.prefill_seconds > 0 and out.layer_seconds > 0 and out.head_seconds > 0
    assert out.other_seconds < out.seconds and out.seconds_per_layer > 0
    # rounds of 3 drafts at layers 1..2 and one verification through layers 3..4
    rounds = out.layer_calls // (3 * 2 + (L - 2))
    assert rounds >= 1 and out.layer_calls == rounds * (3 * 2 + (L - 2))


def test_sequence_head_is_refused():
    bert = make_backbone("bert")
    with pytest.raises(ConfigError, match="token head"):
        generate(bert, one(), None, max_new_tokens=4)


# --- decisions that pay for themselves (cheap checks, accounting) -----------------------------------
def test_candidate_set_with_the_whole_vocabulary_equals_the_full_measure(model):
    vocab = model.head_weight.shape[0]
    for template, candidates in policies(model.hidden_size)[:3]:
        policy = varied(model, template, candidates)
        full = generate(model, one(), policy, max_new_tokens=8, stop_at_eos=False)
        cand = generate(model, one(), policy, max_new_tokens=8, stop_at_eos=False, candidates=vocab)
        assert cand.row_exit_layers() == full.row_exit_layers()
        assert cand.sequences() == full.sequences()


def test_candidate_set_scores_later_checks_on_k_tokens(model):
    """With k candidates, a later check scores a softmax over the first check's top-k tokens only."""
    from eetrain.decoding.decisions import LayerDecider

    policy = ExitPolicy("softmax_max", 0.99, min_exit_layer=2)
    decider = LayerDecider(policy, model, L, candidates=3)
    h = [torch.randn(2, model.hidden_size) for _ in range(L)]
    decider.begin(torch.tensor([1, 1]), torch.zeros(2, model.hidden_size))
    decider.observe(1, h[0], None)
    decider.observe(2, h[1], None)  # the first check: full vocabulary
    top3 = model.exit_logits(h[1]).topk(3, dim=-1).indices
    assert decider.last_logits.shape[-1] == model.head_weight.shape[0]
    decider.observe(3, h[2], None)
    assert decider.last_candidates.tolist() == top3.tolist()
    expected = model.exit_logits(h[2]).gather(1, top3)
    torch.testing.assert_close(decider.last_logits, expected)


@pytest.mark.parametrize("bad", [0, 1, -1, 100000])
def test_candidates_out_of_range_is_refused(model, bad):
    with pytest.raises(ConfigError, match=r"decoding.policy.candidates=.*allowed: an integer in 2\.\."):
        generate(model, one(), ExitPolicy("softmax_gap", 0.5, min_exit_layer=1), max_new_tokens=2, candidates=bad)


def test_candidates_need_a_softmax_measure(model):
    with pytest.raises(ConfigError, match="candidates applies to softmax_gap"):
        generate(model, one(), ExitPolicy("hidden_saturation", 0.5, min_exit_layer=1), max_new_tokens=2, candidates=4)


@pytest.mark.parametrize("every", [2, 3])
def test_check_every_runs_no_check_at_other_layers(model, every):
    seen: list[int] = []
    from eetrain.decoding import decisions

    original = decisions.LayerDecider.decide

    def spy(self, layer, h, rows):
        out = original(self, layer, h, rows)
        if out is not None:
            seen.append(layer)
        return out

    decisions.LayerDecider.decide = spy
    try:
        out = generate(model, one(), ExitPolicy("softmax_max", 0.999999, min_exit_layer=1), max_new_tokens=4,
                       stop_at_eos=False, check_every=every)
    finally:
        decisions.LayerDecider.decide = original
    allowed = {i for i in range(1, L) if (i - 1) % every == 0}
    assert seen and set(seen) <= allowed
    assert set(out.exit_layers.flatten().tolist()) <= allowed | {L}


def test_check_every_that_meets_no_exit_point_is_refused(model):
    # layers 1, 3 (every 2nd from 1) are no exit point of (2, 4): falling back to the last layer alone
    # would switch early exit off unsaid
    policy = ExitPolicy("softmax_gap", 0.0, min_exit_layer=1, exit_points=(2, 4))
    with pytest.raises(ConfigError, match=r"decoding.policy.check_every=2 checks layers \[1, 3\].*none of them "
                                          r"an exit point \[2, 4\]"):
        generate(model, one(), policy, max_new_tokens=2, check_every=2)
    out = generate(model, one(), policy, max_new_tokens=2, stop_at_eos=False, check_every=3)  # checks 1, 4
    assert out.exit_layers.flatten().tolist() == [4, 4]


def test_check_every_must_be_positive(model):
    with pytest.raises(ConfigError, match=r"decoding.policy.check_every=0; allowed: an integer >= 1"):
        generate(model, one(), ExitPolicy("softmax_max", 0.5, min_exit_layer=1), max_new_tokens=2, check_every=0)


@pytest.mark.parametrize("index", [4, 7, 9])  # saturation, CALM classifier, LSTM: on-device, batched
def test_batched_decisions_equal_per_row_decisions(model, index):
    policy = varied(model, *policies(model.hidden_size)[index])
    batch = padded_batch(model)
    out = generate(model, batch, policy, strategy="parallel", batch_mode="ride_along", max_new_tokens=8,
                   stop_at_eos=False)
    for r, (tokens, layers) in enumerate(rows_alone(model, batch, policy, "parallel", 8)):
        assert out.row_exit_layers()[r] == layers and out.sequences()[r] == tokens


@pytest.fixture(scope="module")
def model64(model):
    return copy.deepcopy(model).double()


@pytest.mark.parametrize("index", [5, 6, 8])  # patience, monotonic, three-state MLP
def test_float64_model_decides_as_exit_layers(model64, index):
    """A float64 model: top-2 histories in its dtype, a float32 classifier over its kept states."""
    policy = varied(model64, *policies(model64.hidden_size)[index])
    out = generate(model64, one(), policy, strategy="parallel", max_new_tokens=8, stop_at_eos=False)
    ref, exits = reference_generate(model64, SOURCE, 8, "exact", policy)
    assert out.row_exit_layers()[0] == exits
    assert out.sequences()[0] == ref


@pytest.mark.parametrize("mode", ["gather", "ride_along"])
def test_float64_history_measure_after_a_row_ended(model64, mode):
    """Once a row has ended, a step's first check covers some rows only: the placeholders of the other
    rows' history must take float64 top-2 probabilities (this raised a dtype error)."""
    bb = copy.deepcopy(model64)
    batch = padded_batch(bb)
    policy = ExitPolicy("patience", None, min_exit_layer=1, measure_kwargs={"patience": 1})
    first = int(generate(bb, batch, policy, max_new_tokens=1, stop_at_eos=False).tokens[0, 0])
    with torch.no_grad():  # swap the head's rows of end-of-sequence and row 0's first token: row 0 ends at once
        w, eos = bb.head_weight, bb.eos_token_id
        w[[eos, first]] = w[[first, eos]]
    free = generate(bb, batch, policy, batch_mode=mode, max_new_tokens=6, stop_at_eos=False)
    stopped = generate(bb, batch, policy, batch_mode=mode, max_new_tokens=6)
    assert stopped.sequences()[0] == [eos]
    for r, seq in enumerate(free.sequences()):
        n = seq.index(eos) + 1 if eos in seq else len(seq)
        assert stopped.sequences()[r] == seq[:n]
        assert stopped.row_exit_layers()[r] == free.row_exit_layers()[r][:n]


def test_time_accounting_adds_up(model):
    policy = ExitPolicy("hidden_saturation", 0.5, min_exit_layer=2)
    out = generate(model, padded_batch(model), policy, max_new_tokens=8, stop_at_eos=False)
    parts = out.prefill_seconds + out.layer_seconds + out.decision_seconds + out.head_seconds
    assert 0 < parts <= out.seconds + 1e-9
    assert out.other_seconds == pytest.approx(out.seconds - parts)
    assert out.layer_calls > 0 and out.checks > 0 and out.check_cost_in_layers > 0
    assert out.decision_fraction == pytest.approx(out.decision_seconds / out.seconds)


# --- on-policy records --------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy,semantics", [("copy", "copy"), ("parallel", "exact")])
def test_recording_changes_nothing_and_records_the_states_the_strategy_shows(model, strategy, semantics):
    draws = schedule_draws("random:2", NEW, seed=2)
    plain = generate(model, one(), ScheduledExits("random:2", L, seed=2), strategy=strategy, max_new_tokens=NEW,
                     stop_at_eos=False)
    rec = generate(model, one(), ScheduledExits("random:2", L, seed=2), strategy=strategy, max_new_tokens=NEW,
                   stop_at_eos=False, record=True)
    assert rec.sequences() == plain.sequences() and rec.row_exit_layers() == plain.row_exit_layers()
    states: list = []
    reference_generate(model, SOURCE, NEW, semantics, lambda step: draws[step], states_out=states)
    records = rec.records
    assert records.hidden.shape == (L, NEW, model.hidden_size)
    assert records.positions.tolist() == list(range(1, NEW + 1)) and set(records.sequence_ids.tolist()) == {0}
    # every layer of every token, past its exit too, as the reference computes them with the same semantics
    torch.testing.assert_close(records.hidden, torch.stack(states, dim=1), atol=1e-3, rtol=1e-3)
    assert records.predictions.tolist() == model.exit_logits(records.hidden).argmax(-1).tolist()


@pytest.mark.parametrize("measure", ["hidden_saturation", "softmax_gap", "patience"])
def test_host_decisions_equal_tensor_decisions(model, measure):
    """`decide` (the decoder's: compared on the host on the CPU) = `observe` (compared as tensors), with
    per-row thresholds, on all rows and on a subset, including a score exactly at its threshold."""
    from eetrain.decoding.decisions import LayerDecider
    from eetrain.exits.thresholds import DecayingThreshold

    if measure == "patience":
        policy = ExitPolicy(measure, None, min_exit_layer=2, measure_kwargs={"patience": 1})
    elif measure == "softmax_gap":
        policy = ExitPolicy(measure, DecayingThreshold(lam=0.5, N=8, tau=4.0), min_exit_layer=2)
    else:
        policy = ExitPolicy(measure, [0.1, 0.0, -0.1, 0.2], min_exit_layer=2)
    tensor, host, peek = (LayerDecider(policy, model, L) for _ in range(3))
    g = torch.Generator().manual_seed(0)
    size, d = 6, model.hidden_size
    h0 = torch.randn(size, d, generator=g)
    for decider in (tensor, host, peek):
        decider.begin(torch.arange(1, size + 1), h0)
    subset = torch.tensor([0, 2, 3, 5])
    for layer in range(1, L):
        h = torch.randn(size, d, generator=g)
        rows = None if layer % 2 else subset
        x = h if rows is None else h[rows]
        scores = peek._score(layer, x, rows, None)
        if layer == 2 and measure != "patience":  # row 2 of the subset sits exactly at its threshold
            tensor.thresholds[layer - 1, 3] = host.thresholds[layer - 1, 3] = scores[2]
        fired = tensor.observe(layer, x, rows)
        decided = host.decide(layer, x, rows)
        if fired is None:
            assert decided is None
        else:
            assert decided.dtype == bool and decided.tolist() == fired.tolist()
            if layer == 2 and measure != "patience":
                assert decided[2]
