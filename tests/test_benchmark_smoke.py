"""Smoke test of benchmarks/multi_exit_loss.py on a tiny shape: it runs, the losses agree, JSON is complete.

No timing or memory assertions: those depend on the machine.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    yield from load_benchmark("multi_exit_loss")


@pytest.fixture(scope="module")
def records(bench):
    # One thread: tiny matmuls gain nothing from two, and on a loaded machine every OpenMP barrier
    # can wait a scheduler slice for the second thread.
    threads = torch.get_num_threads()
    try:
        return {impl: bench.run_impl("tiny", impl, "cpu", steps=1, warmup=1, threads=1)
                for impl in bench.IMPLS}
    finally:
        torch.set_num_threads(threads)


def test_import_has_no_side_effects(bench):
    assert bench.IMPLS == ("plain", "naive", "eetrain")
    assert {"cpu", "t5-base", "t5-large", "llama-1b"} <= set(bench.SHAPES)


def test_losses_agree(records):
    plain, naive, eetrain = records["plain"], records["naive"], records["eetrain"]
    # Same init, same data: the CALM loss is the same for the materialising and the fused loss ...
    assert math.isclose(naive["loss"], eetrain["loss"], rel_tol=1e-5, abs_tol=1e-5)
    assert math.isclose(naive["last_ce"], eetrain["last_ce"], rel_tol=1e-5, abs_tol=1e-5)
    # ... and its last exit is exactly what Hugging Face's own loss computes for plain fine-tuning.
    assert math.isclose(plain["loss"], naive["last_ce"], rel_tol=1e-5, abs_tol=1e-5)
    assert math.isfinite(plain["loss"]) and plain["loss"] > 0
    assert eetrain["resolved"] == "chunked"  # CPU: impl="auto" falls back to the pure-PyTorch kernel


def test_record_and_json_line(bench, records):
    for impl, rec in records.items():
        line = bench.json_line(rec)
        assert "\n" not in line
        back = json.loads(line)
        for key in bench.REQUIRED_KEYS:
            assert key in back, key
        assert back["impl"] == impl and back["shape"] == "tiny" and back["device"] == "cpu"
        assert back["s_per_step"] > 0 and back["peak_mib"] >= 0


def test_cli_json_and_table(bench, capsys):
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--shape", "tiny", "--impl", "plain", "eetrain", "--steps", "1",
                           "--threads", "1", "--in-process", "--json"]) == 0
    finally:
        torch.set_num_threads(threads)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert [json.loads(ln)["impl"] for ln in lines] == ["plain", "eetrain"]
    for ln in lines:
        assert set(bench.REQUIRED_KEYS) <= set(json.loads(ln))


def test_table_ratios(bench, records):
    table = bench.format_table(list(records.values()))
    assert table.splitlines()[0].startswith("| impl | peak vs plain | time vs naive")
    assert len(table.splitlines()) == 2 + 3
    assert len(bench.target_lines(list(records.values()))) == 2


def test_bad_arguments(bench):
    with pytest.raises(ValueError, match="warmup"):
        bench.run_impl("tiny", "plain", warmup=0)
    with pytest.raises(ValueError, match="threads"):  # 0 used to be ignored without a word
        bench.run_impl("tiny", "plain", threads=0)
    with pytest.raises(ValueError, match="distinct"):  # both runs' times would land in one list
        bench.time_interleaved("tiny", ["plain", "plain"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--shape", "nope"])
    for bad in (["--impl", "plain", "plain"], ["--steps", "-1"], ["--steps", "x"], ["--threads", "0"],
                ["--warmup", "0"], ["--chunk-size", "0"], ["--steps", "0", "--device", "cuda"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    assert bench.parse_args(["--steps", "0"]).steps == 0  # memory only, on CPU


def test_memory_only_table(bench, capsys):
    """--steps 0: memory only; the table shows `-` for the times, and only the peak target is answered."""
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--shape", "tiny", "--impl", "plain", "naive", "eetrain", "--steps", "0",
                           "--threads", "1", "--in-process"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("| eetrain ")]
    assert len(rows) == 1 and rows[0].split(" | ")[2:4] == ["-", "-"]  # time and CPU time vs naive
    targets = [ln for ln in out.splitlines() if ln.startswith("target")]
    assert len(targets) == 1 and "step peak" in targets[0]


def test_target_lines_per_shape_and_rows(bench):
    def rec(impl, shape="llama-1b", device="cuda", s_per_step=1.0):
        return dict(impl=impl, shape=shape, device=device, s_per_step=s_per_step, peak_mib=100.0,
                    total_peak_mib=1000.0)

    lines = bench.target_lines([rec("plain"), rec("naive", s_per_step=1.25), rec("eetrain")])
    assert lines == [
        "target (cuda, llama-1b) eetrain step peak <= 1.10 x plain: 1.00x -> met (total peak incl. "
        "model+optimizer: 1.00x -> met)",
        "target (cuda, llama-1b) eetrain time <= 0.85 x naive: 0.80x -> met",
    ]
    # the CUDA figures were set for llama-1b: no verdict on another shape
    assert bench.target_lines([rec(impl, shape="t5-large") for impl in bench.IMPLS]) == []
    # each target on its own rows: --impl plain eetrain still answers the peak target
    assert [ln.split(" eetrain ")[1].split(" <=")[0] for ln in bench.target_lines([rec("plain"), rec("eetrain")])] \
        == ["step peak"]
    assert [ln.split(" eetrain ")[1].split(" <=")[0] for ln in bench.target_lines([rec("naive"), rec("eetrain")])] \
        == ["time"]
    assert bench.target_lines([rec("naive", s_per_step=None), rec("eetrain", s_per_step=None)]) == []


def test_time_interleaved(bench):
    threads = torch.get_num_threads()
    try:
        out = bench.time_interleaved("tiny", ["plain", "eetrain"], "cpu", steps=2, warmup=1, threads=1)
    finally:
        torch.set_num_threads(threads)
    assert set(out) == {"plain", "eetrain"}
    for rec in out.values():
        assert rec["timing"] == "interleaved" and len(rec["times"]) == 2 and rec["s_per_step"] > 0
