"""FREE's adaptive threshold in the `generate` stage: settings, and each batch decoded at the threshold
fitted on the batches before it (recomputed here from a plain teacher-forced forward)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from eetrain.backbones.base import pad
from eetrain.config import compose
from eetrain.decoding import generate
from eetrain.decoding.adaptive import AdaptiveSettings
from eetrain.decoding.settings import decoding_settings
from eetrain.errors import ConfigError
from eetrain.exits.policy import ExitPolicy
from tests.conftest import make_backbone


def free_threshold(conf: np.ndarray, agree: np.ndarray, zeta: float = 0.4) -> float | None:
    """FREE's util/bmm.py in numpy (supervised fit, equal weights, grid count), for a monotone posterior."""
    if agree.all():
        return 0.3
    if not agree.any():
        return 0.9
    x = np.clip(conf, 1e-4, 1 - 1e-4)
    params = []
    for k in (0, 1):
        xs = x[agree == k]
        if len(xs) < 2 or xs.var() == 0:
            return None
        m, s2 = xs.mean(), xs.var()
        a = m * (m * (1 - m) / s2 - 1)
        params.append((a, a * (1 - m) / m))

    def pdf(c: float, a: float, b: float) -> float:
        return math.exp((a - 1) * math.log(c) + (b - 1) * math.log(1 - c) + math.lgamma(a + b) - math.lgamma(a)
                        - math.lgamma(b))

    grid = np.linspace(0.3, 0.9, 10)
    passing = [pdf(c, *params[1]) / (pdf(c, *params[1]) + pdf(c, *params[0])) > zeta for c in grid]
    return float(grid[min(max(0, 10 - sum(passing)), 9)])


def test_settings_name_the_key():
    assert decoding_settings(compose([])).adaptive_threshold is None
    assert decoding_settings(compose(["decoding.adaptive_threshold=true"])).adaptive_threshold == AdaptiveSettings()
    got = decoding_settings(compose(["decoding.adaptive_threshold={zeta:0.5,max_updates:3,prior:empirical}"]))
    assert got.adaptive_threshold == AdaptiveSettings(zeta=0.5, max_updates=3, prior="empirical")
    for value, message in (
        ("{zeta:1.5}", r"decoding.adaptive_threshold.zeta=1.5; allowed: a number in \(0, 1\)"),
        ("{low:0.9,high:0.3}", r"low=0.9 must lie below high=0.3"),
        ("{points:1}", r"decoding.adaptive_threshold.points=1; allowed: an integer >= 2"),
        ("{max_updates:0}", r"decoding.adaptive_threshold.max_updates=0; allowed: an integer >= 1"),
        ("{prior:flat}", r"decoding.adaptive_threshold.prior='flat'; allowed: equal, empirical"),
        ("{speed:1}", r"decoding.adaptive_threshold: unknown key\(s\) \['speed'\]"),
        ("often", r"decoding.adaptive_threshold='often'; allowed: null, true or a mapping"),
    ):
        with pytest.raises(ConfigError, match=message):
            decoding_settings(compose([f"decoding.adaptive_threshold={value}"]))


def test_the_stage_refuses_what_the_estimator_cannot_set():
    from eetrain.decoding.stage import check_config

    bb = make_backbone("t5")
    base = ["+experiment=generate", "model.name_or_path=nowhere", "decoding.adaptive_threshold=true",
            "decoding.policy.min_exit_layer=2"]
    check_config(compose(base), bb)  # the fallback policy: softmax_gap
    with pytest.raises(ConfigError, match=r"measure 'hidden_saturation' is not one"):
        check_config(compose([*base, "decoding.policy.measure=hidden_saturation"]), bb)
    with pytest.raises(ConfigError, match=r"decoding.adaptive_threshold: .*self_speculative"):
        check_config(compose([*base, "decoding.strategy=self_speculative"]), bb)
    rollback = ["+experiment=generate", "model.name_or_path=nowhere", "decoding.policy.min_exit_layer=2",
                "decoding.strategy=parallel", "decoding.rollback=1"]
    check_config(compose(rollback), bb)
    with pytest.raises(ConfigError, match=r"decoding.rollback needs an exit policy"):
        check_config(compose([*rollback, "decoding.policy.measure=full"]), bb)


@pytest.mark.parametrize("strategy", ["parallel", "copy"])
def test_each_batch_decodes_at_the_threshold_fitted_on_the_batches_before(tmp_path, strategy):
    from eetrain.decoding.stage import run_stage

    # 3 decoder layers, random weights scaled up so that layers are confident and disagree at times
    bb = make_backbone("t5", initializer_factor=2.0).eval()
    cfg = compose(["+experiment=generate", "model.name_or_path=unused", "decoding.max_examples=8",
                   "decoding.batch_size=2", "decoding.max_new_tokens=10", f"decoding.strategy={strategy}",
                   "decoding.policy.measure=softmax_max", "decoding.policy.threshold=0.99",
                   "decoding.policy.min_exit_layer=1", "decoding.adaptive_threshold={max_updates:3}"])
    data = instantiate(cfg.data, tokenizer=bb.tokenizer, collate_fn=bb.collate)
    summary = run_stage(cfg, bb, data, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]

    examples = data.split_examples("test")[:8]
    threshold, conf, agree, thresholds = 0.99, [], [], []
    for b in range(4):
        chunk = examples[2 * b : 2 * b + 2]
        batch = {"input_ids": pad([e["source_ids"] for e in chunk], bb.pad_token_id),
                 "attention_mask": pad([[1] * len(e["source_ids"]) for e in chunk], 0)}
        out = generate(bb, batch, ExitPolicy("softmax_max", threshold, min_exit_layer=1), strategy=strategy,
                       max_new_tokens=10)
        assert out.row_exit_layers() == [r["exit_layers"] for r in rows[2 * b : 2 * b + 2]], b
        if b == 3:  # max_updates=3: the last batch adds no pairs
            break
        # the full model, teacher-forced over source -> output: every layer's top-1 probability and argmax
        collated = bb.collate([{"source_ids": e["source_ids"], "target_ids": s} for e, s in zip(chunk, out.sequences(), strict=True)])
        with torch.no_grad():
            states = bb(collated)
            keep = states.labels != -100
            probs = torch.stack([torch.softmax(bb.exit_logits(h, layer), -1)[keep]
                                 for layer, h in zip(states.layers, states.hidden, strict=True)])  # (L, N, V)
        exits = out.exit_layers[out.exit_layers > 0]  # the same tokens, row by row
        L = probs.shape[0]
        made = torch.arange(1, L)[:, None] <= exits[None, :]  # the checks decoding made: layers 1..exit
        if strategy == "parallel":  # read off decoding: tokens whose last layer ran (itself, riding along
            # -- batch 2 rides along -- or filled in by a later full-depth token of the row)
            full = out.exit_layers == L
            deep = full | (out.exit_layers.max(dim=0).values == L)[None, :]
            later = deep.flip(1).cummax(1).values.flip(1) & (out.exit_layers > 0)
            made &= later[out.exit_layers > 0][None, :]
        top = probs[:-1].max(-1)
        conf.append(top.values[made].numpy())
        agree.append((top.indices == probs[-1].argmax(-1))[made].numpy())
        value = free_threshold(np.concatenate(conf), np.concatenate(agree))
        thresholds.append(value)
        threshold = threshold if value is None else value
    assert summary["adaptive_thresholds"] == pytest.approx(thresholds)
    assert summary["adaptive_updates"] == 3 and summary["adaptive_pairs"] == sum(len(c) for c in conf) > 0
    assert summary["adaptive_threshold"] == pytest.approx(next(t for t in reversed(thresholds) if t is not None))
    assert summary["policy"] == "softmax_max:0.99 (the first batch; then FREE's adaptive threshold)" and summary["adaptive_seconds"] > 0
    assert any(t is not None and 0.3 < t < 0.9 for t in thresholds)  # fitted, not a one-class edge case
    assert summary["mean_exit_layer"] < 3  # tokens left early at the fitted thresholds


def test_llama_pairs_cover_every_generated_token_at_every_checked_layer():
    from eetrain.decoding.adaptive import AdaptiveThreshold, batch_pairs

    bb = make_backbone("llama", initializer_range=0.5).eval()
    L = bb.num_layers
    batch = {"input_ids": torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]]),  # left padding in row 0
             "attention_mask": torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])}
    policy = ExitPolicy("softmax_gap", 0.1, min_exit_layer=2)
    out = generate(bb, batch, policy, strategy="parallel", max_new_tokens=5, stop_at_eos=False)
    ate = AdaptiveThreshold.start(AdaptiveSettings(max_updates=1))
    ate.update(*batch_pairs(bb, batch, out, policy))  # copy-style: a teacher-forced pass
    checks = sum(min(int(e), L - 1) - 1 for e in out.exit_layers.flatten())  # layers 2..min(exit, L-1)
    assert ate.num_pairs == checks > 0 and not ate.updating  # one update allowed
    # the last layer's teacher-forced argmax is the decoded token wherever the token went the full depth
    from eetrain.decoding.adaptive import decoded_records

    records = decoded_records(bb, batch, out, policy)
    full_depth = (out.exit_layers == L)[out.exit_layers > 0]
    decoded = out.tokens[out.exit_layers > 0]
    assert full_depth.any() and not full_depth.all()  # some tokens left early: their deep states came later
    assert torch.equal(records.preds()[-1][full_depth], decoded[full_depth])


@pytest.mark.parametrize("family,mode", [("t5", "ride_along"), ("t5", "gather"), ("llama", "ride_along"),
                                         ("llama", "gather")])
def test_the_decoder_s_pairs_are_the_full_model_s_at_every_resolvable_check(family, mode):
    """With parallel decoding a token's states are the full model's, so the pairs read off decoding equal
    the teacher-forced ones; every check of a token whose last layer ran (itself, riding along, or filled
    in by a later full-depth token of its row) is there, and no other."""
    from eetrain.decoding.adaptive import decoded_records
    from eetrain.exits.policy import policy_scores

    bb = (make_backbone("t5", initializer_factor=2.0) if family == "t5"
          else make_backbone("llama", initializer_range=0.5)).eval()
    L = bb.num_layers
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 1], [9, 10, 1, 0, 0], [11, 12, 13, 1, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])}
    policy = ExitPolicy("softmax_max", 0.3 if family == "llama" else 0.8, min_exit_layer=1)
    out = generate(bb, batch, policy, strategy="parallel", batch_mode=mode, max_new_tokens=8, stop_at_eos=False,
                   agreement=True)
    exits = out.exit_layers
    assert (exits < L).any() and (exits == L).any()  # mixed exits
    pairs = out.agreement
    records = decoded_records(bb, batch, out, policy)
    scores, preds = policy_scores(policy, records), records.preds()
    T = exits.shape[1]
    n = pairs.rows * T + pairs.positions - 1  # every row has T tokens
    got = scores[pairs.layers - 1, n]
    assert torch.allclose(pairs.confidence, got.double(), atol=1e-5)
    assert torch.equal(pairs.agree, preds[pairs.layers - 1, n] == preds[-1, n])
    # which checks are there: tokens whose last layer ran during decoding
    deep = exits == L
    if mode == "ride_along":  # a step that reached L carried every row to it
        deep |= (exits.max(dim=0).values == L)[None, :]
    later = deep.flip(1).cummax(1).values.flip(1)  # a full-depth token at this position or later
    want = {(r, t + 1, layer) for r in range(exits.shape[0]) for t in range(T) if later[r, t]
            for layer in range(1, min(int(exits[r, t]), L - 1) + 1)}
    have = set(zip(pairs.rows.tolist(), pairs.positions.tolist(), pairs.layers.tolist(), strict=True))
    assert have == want and len(have) == len(pairs.rows)


def test_agreement_pairs_need_parallel_and_a_policy():
    bb = make_backbone("t5").eval()
    batch = {"input_ids": torch.tensor([[5, 6, 1]]), "attention_mask": torch.tensor([[1, 1, 1]])}
    with pytest.raises(ConfigError, match=r"agreement pairs need strategy=parallel .* got strategy='copy'"):
        generate(bb, batch, ExitPolicy("softmax_max", 0.5, min_exit_layer=1), strategy="copy", agreement=True)
    with pytest.raises(ConfigError, match=r"and an exit policy"):
        generate(bb, batch, None, strategy="parallel", agreement=True)
    with pytest.raises(ConfigError, match=r"scoring a confidence in \[0, 1\]; .*policy patience"):
        generate(bb, batch, ExitPolicy("patience", measure_kwargs={"patience": 2}, min_exit_layer=1),
                 strategy="parallel", agreement=True)


def reference_rollback(bb, source: list[int], policy: ExitPolicy, limit: float, n: int) -> tuple[list[int], list[int], int]:
    """FREE's RollBack with exact deep states, recomputing everything at every step: a token that goes the
    full depth (LLaMA's first token: at once) checks the exited tokens before it that no full-depth
    token checked yet, in order; the first whose cross-entropy under the last layer exceeds `limit` is
    replaced by the last layer's prediction and every later token is dropped."""
    from eetrain.exits.policy import exit_layers
    from eetrain.exits.record import record_exits

    L = bb.num_layers
    gen, ex, checked, rollbacks = [], [], 0, 0
    while len(gen) < n:
        rec = record_exits(bb, [bb.collate([{"source_ids": source, "target_ids": gen + [0]}])], store_hidden=True)
        e = int(exit_layers(policy, rec)[-1])
        tok = int(rec.preds()[e - 1, -1])
        with torch.no_grad():
            deep = torch.log_softmax(bb.exit_logits(rec.hidden[L - 1], L).float(), dim=-1)  # (len(gen) + 1, V)
        if bb.family == "llama" and not gen and e < L and -float(deep[0, tok]) > limit:
            tok, e, rollbacks = int(deep[0].argmax()), L, rollbacks + 1
        if e == L:
            back = next((q for q in range(checked, len(gen)) if ex[q] < L and -float(deep[q, gen[q]]) > limit), None)
            if back is not None:
                gen, ex = gen[:back] + [int(deep[back].argmax())], ex[:back] + [L]
                checked, rollbacks = back + 1, rollbacks + 1
                continue
            checked = len(gen) + 1
        gen.append(tok)
        ex.append(e)
    return gen, ex, rollbacks


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_rollback_equals_the_recompute_everything_reference(family):
    bb = (make_backbone("t5", initializer_factor=2.0) if family == "t5"
          else make_backbone("llama", initializer_range=0.5)).eval()
    source = [20, 30, 40, 50, 60, 1]  # exits mixed all along (LLaMA's first token leaves early too)
    batch = {"input_ids": torch.tensor([source]), "attention_mask": torch.ones(1, len(source), dtype=torch.long)}
    policy = ExitPolicy("softmax_max", 0.3 if family == "llama" else 0.9, min_exit_layer=1)
    full = generate(bb, batch, None, strategy="parallel", max_new_tokens=10, stop_at_eos=False).tokens[0].tolist()
    plain = generate(bb, batch, policy, strategy="parallel", max_new_tokens=10, stop_at_eos=False)
    seen = set()
    for limit in (0.0, 0.5, 3.0, 1e9):
        out = generate(bb, batch, policy, strategy="parallel", max_new_tokens=10, stop_at_eos=False, rollback=limit)
        want, want_exits, rollbacks = reference_rollback(bb, source, policy, limit, 10)
        assert out.tokens[0].tolist() == want and out.exit_layers[0].tolist() == want_exits, limit
        assert out.rollbacks == rollbacks
        seen.add(rollbacks)
        if limit == 0.0:  # every token the last layer checked is the last layer's: full greedy up to there
            last = max(t for t, e in enumerate(want_exits) if e == bb.num_layers)
            assert want[: last + 1] == full[: last + 1] and out.discarded_tokens > 0
        if limit == 1e9:
            assert torch.equal(out.tokens, plain.tokens) and out.rollbacks == 0
    assert len(seen) >= 2 and max(seen) > 0  # the limits above made a difference


def test_rollback_bad_input_names_the_key():
    bb = make_backbone("t5").eval()
    one = {"input_ids": torch.tensor([[5, 6, 1]]), "attention_mask": torch.tensor([[1, 1, 1]])}
    policy = ExitPolicy("softmax_max", 0.5, min_exit_layer=1)
    for kwargs, message in (
        (dict(rollback=-1.0, strategy="parallel"), r"decoding.rollback=-1.0; allowed: null \(off\) or a cross-entropy"),
        (dict(rollback=1.0, strategy="copy"), r"decoding.rollback needs decoding.strategy=parallel"),
        (dict(rollback=1.0, strategy="parallel", temperature=0.5), r"greedy decoding only"),
    ):
        with pytest.raises(ConfigError, match=message):
            generate(bb, one, policy, **kwargs)
    with pytest.raises(ConfigError, match=r"decoding.rollback needs an exit policy"):
        generate(bb, one, None, strategy="parallel", rollback=1.0)


def test_the_generate_stage_rolls_back_and_reports_it(tmp_path):
    from eetrain.decoding.stage import run_stage

    bb = make_backbone("t5", initializer_factor=2.0).eval()
    args = ["+experiment=generate", "model.name_or_path=unused", "decoding.max_examples=4", "decoding.max_new_tokens=10",
            "decoding.strategy=parallel", "decoding.policy.measure=softmax_max", "decoding.policy.threshold=0.8",
            "decoding.policy.min_exit_layer=1"]
    cfg = compose([*args, "decoding.rollback=0", "decoding.batch_size=2"])  # rows roll back on their own
    data = instantiate(cfg.data, tokenizer=bb.tokenizer, collate_fn=bb.collate)
    summary = run_stage(cfg, bb, data, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    rollbacks = discarded = 0
    for e, row in zip(data.split_examples("test")[:4], rows, strict=True):
        batch = {"input_ids": torch.tensor([e["source_ids"]]), "attention_mask": torch.ones(1, len(e["source_ids"]), dtype=torch.long)}
        out = generate(bb, batch, ExitPolicy("softmax_max", 0.8, min_exit_layer=1), strategy="parallel",
                       max_new_tokens=10, rollback=0.0)
        assert out.row_exit_layers()[0] == row["exit_layers"]
        rollbacks, discarded = rollbacks + out.rollbacks, discarded + out.discarded_tokens
    assert (summary["rollback"], summary["rollbacks"], summary["discarded_tokens"]) == (0.0, rollbacks, discarded)
    assert rollbacks > 0
    for extra, message in (
        (["decoding.rollback=-1"], r"decoding.rollback=-1; allowed: null \(off\) or a cross-entropy in nats >= 0"),
        (["decoding.rollback=1", "decoding.strategy=copy"], r"decoding.rollback needs decoding.strategy=parallel"),
        (["decoding.rollback=1", "decoding.temperature=0.7"], r"decoding.rollback: greedy decoding only"),
    ):
        with pytest.raises(ConfigError, match=message):
            decoding_settings(compose([*args, *extra]))


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_rows_roll_back_on_their_own_as_each_row_alone(family, nan_caches):
    """At batch > 1 every row rolls back on its own and then sits at its own step: the batch gives each
    row's tokens, exit layers and rollbacks of decoding it alone (padded prompts of different lengths,
    ends of sequence). The caches start as NaN: a row behind the others spans slots it has not written,
    which must hold no garbage (a masked weight times NaN is NaN)."""
    bb = (make_backbone("t5", initializer_factor=2.0) if family == "t5"
          else make_backbone("llama", initializer_range=0.5)).eval()
    sources = [[20, 30, 40, 50, 60, 1], [9, 10, 1], [11, 12, 13, 1], [5, 6, 7, 8, 1]]
    width = max(map(len, sources))
    batch = {"input_ids": torch.tensor([s + [0] * (width - len(s)) for s in sources]),
             "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sources])}
    policy = ExitPolicy("softmax_max", 0.3 if family == "llama" else 0.9, min_exit_layer=1)
    for limit, stop in ((0.0, False), (0.5, True), (3.0, False)):
        out = generate(bb, batch, policy, strategy="parallel", max_new_tokens=10, stop_at_eos=stop, rollback=limit,
                       batch_mode="ride_along")  # rollback decodes in gather whatever is asked
        assert out.batch_mode == "gather"
        rollbacks = 0
        for r, source in enumerate(sources):
            one = {"input_ids": torch.tensor([source]), "attention_mask": torch.ones(1, len(source), dtype=torch.long)}
            alone = generate(bb, one, policy, strategy="parallel", max_new_tokens=10, stop_at_eos=stop, rollback=limit)
            assert out.sequences()[r] == alone.sequences()[0], (limit, r)
            assert out.row_exit_layers()[r] == alone.row_exit_layers()[0], (limit, r)
            rollbacks += alone.rollbacks
        assert out.rollbacks == rollbacks
        if limit == 0.0:
            assert rollbacks > 0


def test_the_readme_s_python_loop_runs_as_written(tmp_path):
    """README, "FREE's adaptive threshold from Python": the loop as written, on a tiny export."""
    import re
    from pathlib import Path

    from eetrain.backbones import load_backbone
    from eetrain.checkpointing import export_pretrained
    from eetrain.decoding import load_export_policy

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"FREE's adaptive threshold from Python.*?```python\n(.*?)```", readme, re.S).group(1)
    export = export_pretrained(make_backbone("t5", initializer_factor=2.0), tmp_path / "export",
                               {"family": "t5", "num_layers": 3})
    settings = json.loads((export / "early_exit.json").read_text())
    settings["policy"] = {"measure": "softmax_max", "threshold": 0.9, "min_exit_layer": 1}
    (export / "early_exit.json").write_text(json.dumps(settings))
    backbone = load_backbone(str(export)).eval()
    policy, _ = load_export_policy(export, backbone)
    scope = {"backbone": backbone, "policy": policy}
    exec(block.replace("print(", "(lambda *a: None)("), scope)
    assert len(scope["estimator"].thresholds) == 2 and scope["out"].num_tokens > 0


@pytest.mark.parametrize("strategy", ["copy", "parallel"])
def test_counted_adaptive_decodes_include_the_estimator_s_work(strategy):
    """FLOPs of an adaptive decode: the decode's own, plus while the estimator updates what it costs --
    `copy`'s teacher-forced pass over the output (counted alone here), `parallel`'s head products for
    the pairs read off the deep passes."""
    from eetrain.decoding.adaptive import count_adaptive, decoded_records
    from eetrain.decoding.flops import FlopCount

    bb = make_backbone("t5", initializer_factor=2.0).eval()
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 1], [9, 10, 1, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}
    policy = ExitPolicy("softmax_max", 0.8, min_exit_layer=1)
    kw = dict(strategy=strategy, max_new_tokens=8, stop_at_eos=False)
    plain = generate(bb, batch, policy, **kw, count_flops=True)
    assert (plain.exit_layers < bb.num_layers).any()  # some tokens left early
    assert count_adaptive(bb, batch, policy, False, **kw).flops == plain.flops  # no update: the decode alone
    updating = count_adaptive(bb, batch, policy, True, **kw)
    assert torch.equal(updating.tokens, plain.tokens) and updating.prefill_flops == plain.prefill_flops
    if strategy == "copy":
        with FlopCount() as counter:
            decoded_records(bb, batch, plain, policy)
        assert counter.total > 0 and updating.flops == plain.flops + counter.total
    else:
        assert updating.flops > plain.flops
