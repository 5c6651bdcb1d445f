"""Smoke test of benchmarks/decoding.py on the tiny shape: it runs, every row and key is there, values are
finite, and the models it compares are the same model (HF greedy = eetrain full; static K = fixed:K).

No timing assertions: those depend on the machine.
"""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    yield from load_benchmark("decoding")


@pytest.fixture(scope="module")
def records(bench):
    # One thread: tiny matmuls gain nothing from two, and a loaded machine makes OpenMP barriers wait.
    threads = torch.get_num_threads()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            assert bench.main(["--shape", "tiny", "--device", "cpu", "--json", "--batches", "1,2",
                               "--new-tokens", "4", "--repeats", "1", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


def _rows(records, **match):
    return [r for r in records if all(r[k] == v for k, v in match.items())]


def test_rows_and_keys(bench, records):
    assert {r["impl"] for r in records} == set(bench.IMPLS)
    for b in (1, 2):
        assert len(_rows(records, batch=b, impl="hf")) == 1 and len(_rows(records, batch=b, impl="full")) == 1
        assert _rows(records, batch=b, impl="static")
    draft = ("draft:4x4", "self_speculative", "batched")
    expected = {
        1: {(e, s, "ride_along") for e in ("fixed:4", "random:4") for s in ("copy", "parallel")} | {draft},
        2: {("random:4", "copy", "ride_along"), ("random:4", "parallel", "ride_along"), ("random:4", "copy", "gather"),
            draft},
    }
    for b, rows in expected.items():
        got = {(r["exits"], r["strategy"], r["batch_mode"]) for r in _rows(records, batch=b, impl="eetrain")}
        assert got == rows
    for r in records:
        assert set(bench.REQUIRED_KEYS) <= set(r), set(bench.REQUIRED_KEYS) - set(r)
        assert r["shape"] == "tiny" and r["device"] == "cpu" and r["dtype"] == "float32" and r["new_tokens"] == 4
        for key in ("mean_exit_layer", "mean_batch_max_exit_layer", "s_per_token", "speedup"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        if r["impl"] != "hf":
            assert math.isfinite(r["decision_fraction"]) and 0 <= r["decision_fraction"] < 1
        if r["strategy"] == "self_speculative":  # lossless: the full model's tokens, no static ceiling
            assert r["ceiling_fraction"] is None and r["agreement_with_full"] == 1.0
            assert 4.0 <= r["mean_exit_layer"] <= 8.0  # drafts leave at E = 4, corrections at L = 8
        elif r["impl"] == "eetrain":
            assert math.isfinite(r["ceiling_fraction"]) and r["ceiling_fraction"] > 0
            assert 1 <= r["ceiling_depth"] <= r["num_layers"] == 8
        else:
            assert r["ceiling_fraction"] is None
    for r in _rows(records, impl="full"):
        assert r["speedup"] == 1.0 and r["mean_exit_layer"] == 8


def test_same_model(bench, records):
    # HF greedy generate and eetrain's never-exiting decoder produce the same tokens (fp32).
    for r in _rows(records, impl="hf"):
        assert r["agreement_with_full"] == 1.0
    # The ceiling depth follows the batch mode: ride-along rows at batch 2 need the batch's deepest exit.
    for r in _rows(records, impl="eetrain"):
        if r["strategy"] == "self_speculative":
            continue
        ref = r["mean_batch_max_exit_layer"] if r["batch"] > 1 and r["batch_mode"] == "ride_along" else r["mean_exit_layer"]
        assert r["ceiling_depth"] == min(8, math.floor(ref + 0.5))
        assert _rows(records, batch=r["batch"], impl="static", num_layers=r["ceiling_depth"]) or r["ceiling_depth"] == 8


def test_truncated_model_is_the_fixed_exit(bench):
    from eetrain.decoding import generate

    backbone = bench.build(bench.SHAPES["tiny"], "cpu")
    batch = bench.make_batch(backbone, 2, 8, "cpu")
    static = bench.truncate(backbone, 2)
    assert static.num_layers == 2 and backbone.num_layers == 8
    assert static.blocks[0].layer[0].SelfAttention.q.weight is backbone.blocks[0].layer[0].SelfAttention.q.weight
    with torch.inference_mode():
        truncated = generate(static, batch, None, max_new_tokens=4, stop_at_eos=False)
        exiting = generate(backbone, batch, "fixed:2", max_new_tokens=4, stop_at_eos=False)
    assert torch.equal(truncated.tokens, exiting.tokens) and truncated.mean_exit_layer == 2


def test_plan_and_crossover(bench):
    large = bench.plan(64, 12)
    assert {(s.exits, s.batch_mode) for s in large if s.impl == "eetrain"} == {
        (f"random:{m}", mode) for m in (3, 4, 6) for mode in ("gather", "ride_along")} | {("draft:6x4", "batched")}
    assert all(s.exits != "random:6" for s in bench.plan(64, 4))  # deeper than the model: left out
    assert [s.impl for s in bench.plan(8, 12, crossover=True)] == ["full", "eetrain", "eetrain"]
    rec = dict(impl="eetrain", exits="random:4", strategy="copy")
    times = {(1, "ride_along"): 1.2, (1, "gather"): 1.0, (2, "ride_along"): 1.0, (2, "gather"): 0.9,
             (4, "ride_along"): 2.0, (4, "gather"): 2.1, (8, "ride_along"): 3.0, (8, "gather"): 2.5,
             (16, "ride_along"): 5.0, (16, "gather"): 4.0}
    records = [dict(rec, batch=b, batch_mode=m, seconds=t) for (b, m), t in times.items()]
    assert bench.crossover_batch(records) == 8  # batch 1 ignored; batch 2 wins by noise, batch 4 does not
    assert bench.crossover_batch(records[:2]) is None


def test_table_and_bad_arguments(bench, records):
    table = bench.format_table(records)
    assert table.splitlines()[0].startswith("| batch | impl |") and len(table.splitlines()) == 2 + len(records)
    lines = bench.target_lines(records)  # full vs hf at batches 1 and 2; the four batch-1 ceilings
    assert [ln.split(":")[0] for ln in lines[:2]] == ["target batch 1", "target batch 2"] and len(lines) == 6
    assert all(ln.startswith("target batch 1, ") and " ceiling >= 0.85: " in ln for ln in lines[2:])
    for r in _rows(records, impl="eetrain"):
        if r["ceiling_fraction"] is not None:
            assert r["ceiling_rounds"] == [round(r["ceiling_fraction"], 4)]  # --repeats 1: one round
    with pytest.raises(SystemExit):
        bench.parse_args(["--batches", "1,x"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--shape", "nope"])
    for bad in (["--repeats", "0"], ["--new-tokens", "0"], ["--threads", "0"], ["--repeats", "x"],
                ["--temperature", "-1"], ["--temperature", "nan"], ["--temperature", "inf"],
                ["--crossover", "--free"], ["--policies", "--crossover"], ["--free", "--policies"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    assert bench.parse_args(["--temperature", "0.5", "--threads", "1", "--free"]).temperature == 0.5
    with pytest.raises(ValueError, match="threads"):  # 0 used to be ignored without a word
        bench.run_benchmark("tiny", "cpu", (1,), threads=0)
    with pytest.raises(ValueError, match="at most one"):
        bench.run_benchmark("tiny", "cpu", (1,), policies=True, free=True)


def test_plan_keeps_only_schedules_that_fit_the_model(bench):
    """random:MEAN draws up to layer 2 MEAN - 1: a deeper draw would be clipped and its mean exit not MEAN."""
    from eetrain.decoding import ScheduledExits

    def schedules(batch: int, layers: int) -> set[str]:
        return {s.exits for s in bench.plan(batch, layers) if s.impl == "eetrain" and s.strategy != "self_speculative"}

    assert schedules(64, 11) == {"random:3", "random:4", "random:6"}
    assert schedules(64, 10) == {"random:3", "random:4"}  # random:6 draws up to 11 (its mean was 5.8)
    assert schedules(8, 7) == {"random:4"} and schedules(8, 6) == set()
    assert schedules(1, 6) == {"fixed:4"}
    for layers in range(4, 17):  # whatever the plan keeps is a schedule the decoder takes
        for batch in (1, 8, 64):
            for exits in schedules(batch, layers):
                ScheduledExits(exits, layers)


def test_each_row_and_its_static_run_back_to_back(bench, monkeypatch):
    """Every round runs each run once; each eetrain row is followed at once by its own static run, so
    ceiling_fraction's per-round ratio compares two neighbouring decodes; the order rotates by group."""
    calls: list[tuple] = []
    call = bench._Run.__call__

    def logged(self, sync):
        calls.append((self, self.first is not None))  # (run, timed: not its warm-up)
        call(self, sync)

    monkeypatch.setattr(bench._Run, "__call__", logged)
    records = run_tiny(bench, (2,), repeats=3, new_tokens=2)
    warmups = [id(run) for run, timed in calls if not timed]
    timed = [run for run, t in calls if t]
    assert len(warmups) == len(set(warmups)) and len(timed) == 3 * len(warmups)  # one warm-up per run
    rounds = [timed[i * len(warmups):(i + 1) * len(warmups)] for i in range(3)]
    statics = set()
    for runs in rounds:
        assert {id(r) for r in runs} == set(warmups)  # hf, full and every row in every round
        for i, run in enumerate(runs):
            if run.spec.impl == "eetrain" and run.spec.strategy != "self_speculative":
                static = runs[i + 1]
                assert static.spec.impl == "static" and static.spec.depth == bench.ceiling_depth(
                    run.first, 2, run.batch_mode)
                statics.add(id(static))
    rows = _rows(records, impl="eetrain", strategy="copy") + _rows(records, impl="eetrain", strategy="parallel")
    assert len(statics) == len(rows) == 3  # a static run of its own per row
    assert len({id(runs[0]) for runs in rounds}) == 3  # each round starts one group later
    for r in rows:
        assert len(r["ceiling_rounds"]) == 3


def test_target_lines_hand_checked(bench):
    def row(batch, exits, mode, ceiling, speedup, mean, rounds=None, strategy="copy"):
        return dict(impl="eetrain", batch=batch, exits=exits, strategy=strategy, batch_mode=mode,
                    ceiling_fraction=ceiling, ceiling_rounds=rounds, speedup=speedup, mean_exit_layer=mean)

    # full vs hf: the paired figure (hf's speedup, the median of t_full / t_hf), not the medians' 1.20
    records = [dict(impl="hf", batch=64, seconds=1.0, speedup=1.05), dict(impl="full", batch=64, seconds=1.2),
               row(64, "random:4", "gather", 0.68, 1.7, 4.0, [0.62, 0.68, 0.71, 0.75, 0.66]),
               row(64, "random:3", "gather", 0.8, 2.4, 3.0), row(64, "random:6", "gather", 0.6, 1.3, 6.0),
               row(64, "random:4", "ride_along", 1.0, 1.6, 4.0),
               row(8, "random:4", "ride_along", 0.8, 1.7, 4.0, [0.8, 0.9, 0.7], strategy="parallel")]
    assert bench.target_lines(records) == [
        "target batch 64: full <= 1.10 x hf: 1.05x -> met",
        "target batch 8, random:4, parallel, ride_along: ceiling >= 0.85: 0.80 (rounds 0.70-0.90, >= 0.85 in 1 of 3) "
        "-> NOT met",
        "target batch 64, random:4, copy, gather: ceiling >= 0.70: 0.68 (rounds 0.62-0.75, >= 0.70 in 2 of 5) -> NOT met",
        "target batch 64, gather: speed-up grows as the mean exit falls: 1.30x (random:6) < 1.70x (random:4) < "
        "2.40x (random:3) -> met",
    ]
    records[3]["speedup"] = 1.5  # random:3 slower than random:4
    assert bench.target_lines(records)[-1].endswith("< 1.50x (random:3) -> NOT met")


def run_tiny(bench, batches: tuple[int, ...], repeats: int = 1, **kwargs):
    """`run_benchmark` on the tiny shape with one thread (restored after)."""
    threads = torch.get_num_threads()
    try:
        return bench.run_benchmark("tiny", "cpu", batches, repeats=repeats, threads=1, **kwargs)
    finally:
        torch.set_num_threads(threads)


def test_policy_rows_exit_where_their_thresholds_say(bench):
    """--policies: every real policy leaves at layer 4 after checks from layer 2 (checks at 2, 3, 4 on the
    8-layer tiny shape; on a 4-layer model the last layer would be no check: 2 there)."""
    records = run_tiny(bench, (1,), new_tokens=3, policies=True)
    rows = [r for r in records if r["impl"] == "eetrain"]
    assert {r["exits"] for r in rows} >= {"softmax_gap", "softmax_gap@k8", "hidden_saturation", "classifier:calm",
                                          "classifier:lstm"}
    num_layers = records[0]["num_layers"]
    checks = min(bench.POLICY_EXIT_LAYER, num_layers - 1) - 1
    for r in rows:
        assert r["mean_exit_layer"] == bench.POLICY_EXIT_LAYER and r["checks_per_token"] == checks
        assert r["check_cost_layers"] > 0 and r["ceiling_depth"] == bench.POLICY_EXIT_LAYER
        assert 0 < r["decision_fraction"] < 1


def test_sampled_rows(bench):
    """--temperature: every implementation samples (HF too); self_speculative verifies by speculative sampling."""
    records = run_tiny(bench, (2,), new_tokens=4, temperature=1.0)
    assert {r["impl"] for r in records} == set(bench.IMPLS) and {r["temperature"] for r in records} == {1.0}
    spec = _rows(records, strategy="self_speculative")
    assert len(spec) == 1 and all(math.isfinite(r["speedup"]) for r in records)
    assert records[0]["num_layers"] // 2 <= spec[0]["mean_exit_layer"] <= records[0]["num_layers"]
    with pytest.raises(ValueError, match="temperature"):
        bench.run_benchmark("tiny", "cpu", (1,), temperature=-1.0)


def test_free_rows_time_free_s_extras_against_the_same_policy(bench):
    """--free: the same parallel policy plain, collecting the adaptive threshold's pairs, and with RollBack
    checks; tokens at or above the median score leave at the tuned layer, the others' deep passes resolve pairs."""
    records = run_tiny(bench, (1,), new_tokens=8, free=True)
    rows = [r for r in records if r["impl"] == "eetrain"]
    assert [r["exits"] for r in rows] == ["softmax_gap@4", "softmax_gap@4+pairs", "softmax_gap@4+rollback:100"]
    assert rows[0]["vs_plain"] == 1.0 and all(r["vs_plain"] > 0 for r in rows)
    assert rows[1]["pairs_per_token"] > 0 and rows[0]["pairs_per_token"] is None
    assert rows[2]["rollbacks"] == 0  # the limit is far above a near-uniform last layer's cross-entropy
    assert len({r["mean_exit_layer"] for r in rows}) == 1 and 4 <= rows[0]["mean_exit_layer"] < 8
    # `generate` decodes RollBack's row in gather mode whatever was asked: the record says what ran
    assert [r["batch_mode"] for r in rows] == ["ride_along", "ride_along", "gather"]


def test_flops_rows_count_each_row_once_more(bench):
    """--flops: FLOPs per token for every row but HF's. `fixed:4` at batch 1 is the static depth-4 model's
    arithmetic exactly; a real policy pays its checks' products on top of the static model of its exit depth."""
    records = run_tiny(bench, (1,), new_tokens=4, flops=True)
    assert "flops_per_token" not in _rows(records, impl="hf")[0]
    (full,) = _rows(records, impl="full")
    assert full["flops_ratio"] == 1.0 and full["flops_per_token"] > 0
    (static,) = _rows(records, impl="static", exits="truncated:4")
    for row in _rows(records, impl="eetrain", exits="fixed:4"):
        assert row["flops_ratio"] == static["flops_ratio"] < 1 and row["ceiling_flops_fraction"] == 1.0
    assert "| FLOPs vs full | FLOP ceiling |" in bench.format_table(records).splitlines()[0]
    records = run_tiny(bench, (1,), new_tokens=3, policies=True, flops=True)
    for row in _rows(records, impl="eetrain"):
        assert row["ceiling_depth"] == bench.POLICY_EXIT_LAYER
        if row["exits"] == "hidden_saturation":  # a cosine of two states: no product, no FLOPs counted
            assert row["ceiling_flops_fraction"] == 1.0
        else:  # the head (softmax measures) or the classifier's layers, at every check
            assert 0 < row["ceiling_flops_fraction"] < 1, row["exits"]
