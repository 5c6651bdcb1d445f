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
    draft = ("draft:2x4", "self_speculative", "batched")
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
            assert 2.0 <= r["mean_exit_layer"] <= 4.0  # drafts leave at E = 2, corrections at L = 4
        elif r["impl"] == "eetrain":
            assert math.isfinite(r["ceiling_fraction"]) and r["ceiling_fraction"] > 0
            assert 1 <= r["ceiling_depth"] <= r["num_layers"] == 4
        else:
            assert r["ceiling_fraction"] is None
    for r in _rows(records, impl="full"):
        assert r["speedup"] == 1.0 and r["mean_exit_layer"] == 4


def test_same_model(bench, records):
    # HF greedy generate and eetrain's never-exiting decoder produce the same tokens (fp32).
    for r in _rows(records, impl="hf"):
        assert r["agreement_with_full"] == 1.0
    # The ceiling depth follows the batch mode: ride-along rows at batch 2 need the batch's deepest exit.
    for r in _rows(records, impl="eetrain"):
        if r["strategy"] == "self_speculative":
            continue
        ref = r["mean_batch_max_exit_layer"] if r["batch"] > 1 and r["batch_mode"] == "ride_along" else r["mean_exit_layer"]
        assert r["ceiling_depth"] == min(4, math.floor(ref + 0.5))
        assert _rows(records, batch=r["batch"], impl="static", num_layers=r["ceiling_depth"]) or r["ceiling_depth"] == 4


def test_truncated_model_is_the_fixed_exit(bench):
    from eetrain.decoding import generate

    backbone = bench.build(bench.SHAPES["tiny"], "cpu")
    batch = bench.make_batch(backbone, 2, 8, "cpu")
    static = bench.truncate(backbone, 2)
    assert static.num_layers == 2 and backbone.num_layers == 4
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


def test_target_lines_hand_checked(bench):
    def row(batch, exits, mode, ceiling, speedup, mean, rounds=None):
        return dict(impl="eetrain", batch=batch, exits=exits, strategy="copy", batch_mode=mode,
                    ceiling_fraction=ceiling, ceiling_rounds=rounds, speedup=speedup, mean_exit_layer=mean)

    records = [dict(impl="hf", batch=64, seconds=1.0), dict(impl="full", batch=64, seconds=1.05),
               row(64, "random:4", "gather", 0.68, 1.7, 4.0, [0.62, 0.68, 0.71, 0.75, 0.66]),
               row(64, "random:3", "gather", 0.8, 2.4, 3.0), row(64, "random:6", "gather", 0.6, 1.3, 6.0),
               row(64, "random:4", "ride_along", 1.0, 1.6, 4.0)]
    assert bench.target_lines(records) == [
        "target batch 64: full <= 1.10 x hf: 1.05x -> met",
        "target batch 64, random:4, copy, gather: ceiling >= 0.70: 0.68 (rounds 0.62-0.75, >= 0.70 in 2 of 5) -> NOT met",
        "target batch 64, gather: speed-up grows as the mean exit falls: 1.30x (random:6) < 1.70x (random:4) < "
        "2.40x (random:3) -> met",
    ]
    records[3]["speedup"] = 1.5  # random:3 slower than random:4
    assert bench.target_lines(records)[-1].endswith("< 1.50x (random:3) -> NOT met")


def run_tiny(bench, batches: tuple[int, ...], **kwargs):
    """`run_benchmark` on the tiny shape with one thread (restored after)."""
    threads = torch.get_num_threads()
    try:
        return bench.run_benchmark("tiny", "cpu", batches, repeats=1, threads=1, **kwargs)
    finally:
        torch.set_num_threads(threads)


def test_policy_rows_exit_where_their_thresholds_say(bench):
    """--policies: every real policy leaves at layer 4 after checks from layer 2 (the tiny shape has 4
    layers, and the last layer is no check: 2 checks there, 3 on the 12-layer `cpu` shape)."""
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
    assert [r["exits"] for r in rows] == ["softmax_gap@3", "softmax_gap@3+pairs", "softmax_gap@3+rollback:100"]
    assert rows[0]["vs_plain"] == 1.0 and all(r["vs_plain"] > 0 for r in rows)
    assert rows[1]["pairs_per_token"] > 0 and rows[0]["pairs_per_token"] is None
    assert rows[2]["rollbacks"] == 0  # the limit is far above a near-uniform last layer's cross-entropy
    assert len({r["mean_exit_layer"] for r in rows}) == 1 and 3 <= rows[0]["mean_exit_layer"] < 4


def test_flops_rows_count_each_row_once_more(bench):
    """--flops: FLOPs per token for every row but HF's. The tiny shape has 4 layers: `fixed:4` is the full
    model's arithmetic exactly; a real policy pays its checks' products on top of the static model of its
    exit depth."""
    records = run_tiny(bench, (1,), new_tokens=4, flops=True)
    assert "flops_per_token" not in _rows(records, impl="hf")[0]
    (full,) = _rows(records, impl="full")
    assert full["flops_ratio"] == 1.0 and full["flops_per_token"] > 0
    for row in _rows(records, impl="eetrain", exits="fixed:4"):
        assert row["flops_ratio"] == 1.0 and row["ceiling_flops_fraction"] == 1.0
    assert "| FLOPs vs full | FLOP ceiling |" in bench.format_table(records).splitlines()[0]
    records = run_tiny(bench, (1,), new_tokens=3, policies=True, flops=True)
    for row in _rows(records, impl="eetrain"):
        assert row["ceiling_depth"] == bench.POLICY_EXIT_LAYER
        if row["exits"] == "hidden_saturation":  # a cosine of two states: no product, no FLOPs counted
            assert row["ceiling_flops_fraction"] == 1.0
        else:  # the head (softmax measures) or the classifier's layers, at every check
            assert 0 < row["ceiling_flops_fraction"] < 1, row["exits"]
