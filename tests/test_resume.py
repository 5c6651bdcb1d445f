"""Exact resume: the resumable training order, RNG states in checkpoints, and a run killed with SIGKILL in
the middle of an epoch that, restarted from its last.ckpt, ends bit for bit where an uninterrupted run does."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch

from eetrain.data.sampler import ResumableSampler
from eetrain.resume import rng_states, set_rng_states
from tests import tiny_runs


def test_sampler_order_is_seeded_per_epoch_and_resumes():
    data = list(range(20))
    s = ResumableSampler(data, seed=3)
    first = list(s)
    assert sorted(first) == data and list(s) == first  # the same epoch: the same order
    torch.manual_seed(123)  # the global RNG plays no part
    assert list(ResumableSampler(data, seed=3)) == first
    s.set_epoch(1)
    second = list(s)
    assert second != first and sorted(second) == data
    assert list(ResumableSampler(data, seed=4)) != first
    # resume inside epoch 1 after 8 samples; the next pass (and any later epoch) starts at the beginning
    r = ResumableSampler(data, seed=3)
    r.resume(1, 8)
    assert len(r) == 20 and list(r) == second[8:]
    assert list(r) == second
    # a position in an epoch the run has already left is dropped
    r.resume(0, 8)
    r.set_epoch(1)
    assert list(r) == second


def test_ranks_split_each_global_batch_by_interleaving():
    """Rank r of W gets positions r, r + W, ... of the one-process order, so with batch size B per rank the
    ranks' t-th batches together are the one-process run's t-th batch of W * B."""
    data, b = list(range(24)), 3
    one = list(ResumableSampler(data, seed=0))
    ranks = [list(ResumableSampler(data, num_replicas=2, rank=r, seed=0)) for r in range(2)]
    for t in range(len(one) // (2 * b)):
        together = sorted(ranks[0][t * b:(t + 1) * b] + ranks[1][t * b:(t + 1) * b])
        assert together == sorted(one[t * 2 * b:(t + 1) * 2 * b])
    r = ResumableSampler(data, num_replicas=2, rank=1, seed=0)
    r.resume(0, 2 * b)
    assert list(r) == ranks[1][2 * b:]


def test_rng_states_round_trip_and_load_weights_only(tmp_path):
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    states = rng_states()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.save({"rng_states": states}, tmp_path / "c.ckpt")
    loaded = torch.load(tmp_path / "c.ckpt", weights_only=True)["rng_states"]  # plain tensors and values
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    set_rng_states(loaded)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(again[0], expected[0]) and np.array_equal(again[1], expected[1]) and again[2] == expected[2]


@pytest.mark.parametrize("late", [False, True], ids=["restore-before-setup", "restore-after-setup-with-workers"])
def test_data_module_saves_and_restores_its_position(tmp_path, late):
    """A checkpoint taken mid-epoch holds (epoch, batches taken) from Lightning's own counters; a run that
    loads it trains on the batches an uninterrupted run trains on next. late: the strategy restores after
    it has built the loader (as FSDP and DeepSpeed do), and a loader worker has already drawn indices."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    class LateRestore(SingleDeviceStrategy):
        @property
        def restore_checkpoint_after_setup(self) -> bool:
            return True

    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint

    from eetrain.config import compose
    from eetrain.losses import ExitCrossEntropy, JointLoss
    from eetrain.module import EarlyExitModule

    overrides = tiny_runs.write_data(tmp_path / "data", train=12, validation=4)
    cfg = compose(["model.config.num_layers=2", "model.config.num_decoder_layers=2", "data.batch_size=2",
                   *overrides])
    seen: list[list[int]] = []

    def fit(max_steps: int, ckpt: str | None = None) -> None:
        bb = instantiate(cfg.model)
        data = instantiate(cfg.data, tokenizer=bb.tokenizer, collate_fn=bb.collate)
        data.shuffle_seed = 7
        data.num_workers = 1 if late else 0
        # a schedule: configure_optimizers asks for the number of steps, so Lightning builds the loader then
        module = EarlyExitModule(bb, JointLoss({"ce": ExitCrossEntropy()}), lambda p: torch.optim.SGD(p, lr=0.1),
                                 scheduler={"name": "linear"})
        original = bb.forward

        def spy(batch, layers=None, skip=frozenset()):
            seen.append(batch["input_ids"].sum(dim=1).tolist())  # identifies the batch's examples
            return original(batch, layers, skip)

        bb.forward = spy
        every_4 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1, monitor=None,
                                  filename="{step}")
        trainer = L.Trainer(max_steps=max_steps, max_epochs=2, accelerator="cpu", logger=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            default_root_dir=tmp_path, callbacks=[every_4],
                            strategy=LateRestore(torch.device("cpu")) if late else "auto")
        trainer.fit(module, datamodule=data, ckpt_path=ckpt)

    fit(max_steps=8)  # 6 batches per epoch: into epoch 1; checkpoints at steps 4 and 8
    reference, seen[:] = list(seen), []
    ckpt = tmp_path / "ckpt" / "step=4.ckpt"
    pos = torch.load(ckpt, weights_only=True)["Text2TextDataModule"]["train_position"]
    assert (pos["epoch"], pos["batches"], pos["batch_size"], pos["seed"]) == (0, 4, 2, 7)
    fit(max_steps=8, ckpt=str(ckpt))
    assert len(reference) == 8 and len({str(b) for b in reference[:6]}) == 6
    assert seen == reference[4:8]  # the rest of epoch 0, then epoch 1 from its start, as uninterrupted


def _wait_for(path, proc, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before stalling"
        assert time.monotonic() < end, f"no {path} after {timeout} s"
        time.sleep(0.5)


def _stopped_by_sigterm(run_dir: Path, common: list[str], at_step: int) -> Path:
    """Run until optimizer step `at_step` is about to start, send SIGTERM, expect exit 143; its last.ckpt."""
    marker = run_dir.parent / f"{run_dir.name}.stalled"
    proc = tiny_runs.start(run_dir, *common, "+callbacks.stall._target_=tests.tiny_runs.Stall",
                           f"+callbacks.stall.at_step={at_step}", f"+callbacks.stall.marker={marker}",
                           "+callbacks.stall.until_sigterm=true")
    try:
        _wait_for(marker, proc)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
    return run_dir / "checkpoints" / "last.ckpt"


def _resumed_equals_uninterrupted(tmp_path: Path, common: list[str], last: Path) -> None:
    """A restart from `last` and an uninterrupted run of `common` export the same weights, bit for bit."""
    tiny_runs.run_here(tmp_path / "resumed", *common, f"ckpt_path={last}")
    tiny_runs.run_here(tmp_path / "reference", *common)
    reference, again = tiny_runs.export_weights(tmp_path / "reference"), tiny_runs.export_weights(tmp_path / "resumed")
    assert set(reference) == set(again)
    different = [k for k in reference if not torch.equal(reference[k], again[k])]
    assert not different, different


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    """2 epochs of 6 steps; last.ckpt every 3 steps (atomically). The first run is killed with SIGKILL one
    step after its step-9 checkpoint (mid epoch 1: 3 of 6 batches taken), the restart from that last.ckpt
    runs steps 10-12; its exported weights equal an uninterrupted run's bit for bit. Model dropout (global
    torch RNG), layer dropout and the rotational curriculum (seed + step), a warmup + linear LR schedule,
    AdamW state, per-layer heads and gradient clipping all have to continue exactly."""
    data = tiny_runs.write_data(tmp_path / "data", train=32)
    common = [*data, "data.batch_size=4", "trainer.max_epochs=2", "trainer.limit_train_batches=6",
              "callbacks.model_checkpoint.every_n_train_steps=3", "model.config.dropout_rate=0.1",
              "scheduler.warmup_ratio=0.25"]
    killed_dir, marker = tmp_path / "killed", tmp_path / "stalled"
    proc = tiny_runs.start(killed_dir, *common, "+callbacks.stall._target_=tests.tiny_runs.Stall",
                           "+callbacks.stall.at_step=10", f"+callbacks.stall.marker={marker}")
    try:
        _wait_for(marker, proc)
        last = killed_dir / "checkpoints" / "last.ckpt"
        ckpt = torch.load(last, weights_only=True)
        assert ckpt["global_step"] == 9 and ckpt["epoch"] == 1  # taken mid epoch 1
        assert ckpt["Text2TextDataModule"]["train_position"] == {
            "epoch": 1, "batches": 3, "batch_size": 4, "world_size": 1, "seed": 42}
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not list(last.parent.glob("*.tmp")) and not list(last.parent.glob(".*.tmp"))

    # the restart and the uninterrupted run need no process of their own (one torch thread, as the killed run)
    resumed = tiny_runs.run_here(tmp_path / "resumed", *common, f"ckpt_path={last}")
    assert "not resumable" not in resumed.stdout + resumed.stderr  # Lightning's mid-epoch warning
    tiny_runs.run_here(tmp_path / "reference", *common)

    reference, again = tiny_runs.export_weights(tmp_path / "reference"), tiny_runs.export_weights(tmp_path / "resumed")
    assert set(reference) == set(again) and any(k.startswith("exit_heads/") for k in reference)
    different = [k for k in reference if not torch.equal(reference[k], again[k])]
    assert not different, different
    # and the logged losses of the steps the restart ran are the uninterrupted run's
    ref_losses, resumed_losses = tiny_runs.step_losses(tmp_path / "reference"), tiny_runs.step_losses(tmp_path / "resumed")
    assert list(resumed_losses.index) == [9, 10, 11]
    assert resumed_losses.tolist() == ref_losses.loc[[9, 10, 11]].tolist()


@pytest.mark.slow
def test_sigterm_saves_the_step_it_stops_after_and_exits_143(tmp_path):
    """SIGTERM (preemption, scancel) mid epoch 1: Lightning ends after the current step (11), last.ckpt is
    written there (the every-3-steps one was 9), the run exits 143 naming it, and the restart from it ends
    with the uninterrupted run's weights."""
    data = tiny_runs.write_data(tmp_path / "data", train=32)
    common = [*data, "data.batch_size=4", "trainer.max_epochs=2", "trainer.limit_train_batches=6",
              "callbacks.model_checkpoint.every_n_train_steps=3", "model.config.dropout_rate=0.1"]
    stopped_dir = tmp_path / "stopped"
    last = _stopped_by_sigterm(stopped_dir, common, at_step=10)
    assert torch.load(last, weights_only=True)["global_step"] == 11
    log = Path(f"{stopped_dir}.log").read_text()
    assert f"eetrain: error: stopped by SIGTERM after global step 11; {last} holds it: resume with ckpt_path={last}" in log
    assert not (stopped_dir / "export").exists()
    _resumed_equals_uninterrupted(tmp_path, common, last)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["epoch_end", "accumulation"])
def test_resume_at_an_epoch_end_or_under_accumulation_equals_uninterrupted(tmp_path, case):
    """epoch_end: the last.ckpt of epoch 0's validation (no step saves); the next epoch's loader used to draw
    its seed from the global RNG before the resumed run restored it, so every dropout mask differed.
    accumulation: 2 batches per optimizer step, a step save every 3 steps; saves used to come after the
    window's first batch too, losing its gradient."""
    data = tiny_runs.write_data(tmp_path / "data", train=32)
    common = [*data, "trainer.max_epochs=2", "model.config.dropout_rate=0.1"]
    if case == "epoch_end":
        common += ["data.batch_size=4", "trainer.limit_train_batches=4"]
        stall, saved_step, batches = 5, 4, None
    else:
        common += ["data.batch_size=2", "+trainer.accumulate_grad_batches=2", "trainer.limit_train_batches=12",
                   "callbacks.model_checkpoint.every_n_train_steps=3"]
        stall, saved_step, batches = 5, 3, 6  # step 3 ends with epoch 0's 6th batch
    killed_dir, marker = tmp_path / "killed", tmp_path / "stalled"
    proc = tiny_runs.start(killed_dir, *common, "+callbacks.stall._target_=tests.tiny_runs.Stall",
                           f"+callbacks.stall.at_step={stall}", f"+callbacks.stall.marker={marker}")
    try:
        _wait_for(marker, proc)
        last = killed_dir / "checkpoints" / "last.ckpt"
        ckpt = torch.load(last, weights_only=True)
        assert ckpt["global_step"] == saved_step
        if batches is not None:
            assert ckpt["Text2TextDataModule"]["train_position"]["batches"] == batches
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    _resumed_equals_uninterrupted(tmp_path, common, last)


@pytest.mark.slow
def test_sigterm_inside_an_accumulation_window_stops_after_its_optimizer_step(tmp_path):
    """SIGTERM during the first of a step's 2 batches: the run takes the second batch and the optimizer
    step, then saves and exits 143 (a save between the two would lose the first batch's gradient)."""
    data = tiny_runs.write_data(tmp_path / "data", train=32)
    common = [*data, "data.batch_size=2", "+trainer.accumulate_grad_batches=2", "trainer.max_epochs=1",
              "model.config.dropout_rate=0.1"]
    last = _stopped_by_sigterm(tmp_path / "stopped", common, at_step=5)
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["Text2TextDataModule"]["train_position"]["batches"] == 12
    _resumed_equals_uninterrupted(tmp_path, common, last)


def test_checkpoints_every_n_steps_keep_the_saves_at_validation(tmp_path):
    """every_n_train_steps adds last.ckpt saves; the best checkpoint is still chosen at each validation with
    the score of the weights it holds, and the last step is saved."""
    data = tiny_runs.write_data(tmp_path / "data", train=24)
    run_dir = tmp_path / "run"
    tiny_runs.run_here(run_dir, *data, "data.batch_size=4", "trainer.max_epochs=2", "trainer.limit_train_batches=5",
                       "callbacks.model_checkpoint.every_n_train_steps=2", "export=false")
    ckpts = run_dir / "checkpoints"
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 10  # the end of the fit
    val = pd.read_csv(run_dir / "csv" / "metrics.csv").dropna(subset=["val/loss"]).set_index("step")["val/loss"]
    (best,) = [p for p in ckpts.glob("epoch*.ckpt")]
    state = torch.load(best, weights_only=False)
    callback = next(v for k, v in state["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert state["global_step"] in (5, 10) and best.name.endswith(f"step{state['global_step']:06d}.ckpt")
    assert callback["best_model_score"].item() == pytest.approx(val.min(), rel=1e-6)
    assert callback["best_model_score"].item() == pytest.approx(val.loc[state["global_step"] - 1], rel=1e-6)


def test_csv_logger_continues_the_metrics_of_a_resumed_run(tmp_path):
    """A run resumed in its own directory from its step-3 checkpoint logs steps 3.. again: the file keeps
    steps 0-2 from before, gets the new rows (and a new column) appended, and never warns it deletes logs."""
    import warnings

    from eetrain.resume import CSVLogger

    first = CSVLogger(tmp_path, name="csv", version="")
    for step in range(5):
        first.log_metrics({"train/loss": 10.0 - step}, step=step)
    first.save()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = CSVLogger(tmp_path, name="csv", version="")
        again.log_metrics({"train/loss": 7.5, "val/loss": 8.0}, step=3)
        again.log_metrics({"train/loss": 6.5}, step=4)
        again.save()
    table = pd.read_csv(tmp_path / "csv" / "metrics.csv")
    assert table["step"].tolist() == [0, 1, 2, 3, 4]
    assert table["train/loss"].tolist() == [10.0, 9.0, 8.0, 7.5, 6.5]
    assert table["val/loss"].iloc[3] == 8.0 and table["val/loss"].isna().sum() == 4


def test_sigterm_after_the_fit_says_what_it_cut_short():
    import types

    from eetrain import stages
    from eetrain.config import compose
    from eetrain.errors import StoppedBySignal
    from eetrain.train import _stop_after_fit

    trainer = types.SimpleNamespace(checkpoint_callback=types.SimpleNamespace(last_model_path="/r/checkpoints/last.ckpt"))
    before = signal.getsignal(signal.SIGTERM)
    try:
        _stop_after_fit(compose([]), trainer, ["the stages"])
        stages.running = "policies"
        with pytest.raises(StoppedBySignal, match=r"stopped by SIGTERM after training, in stage policies; .*redo it "
                                                  r"with train=false ckpt_path=/r/checkpoints/last.ckpt") as info:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        assert info.value.exit_code == 143
    finally:
        signal.signal(signal.SIGTERM, before)
        stages.running = None


@pytest.mark.parametrize("validating", [True, False])
def test_sigterm_records_whether_it_came_during_validation(validating):
    import types

    from lightning.pytorch.trainer.states import TrainerFn
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from eetrain.checkpointing import ModelCheckpoint

    callback = ModelCheckpoint(save_last=True)
    # not fitting: nothing is saved here (the end-to-end test covers the save); the flag is what train.run reads
    trainer = types.SimpleNamespace(validating=validating, fast_dev_run=False, sanity_checking=False, global_step=3,
                                    state=types.SimpleNamespace(fn=TrainerFn.VALIDATING))
    callback.on_exception(trainer, None, SIGTERMException())
    assert callback.stopped_in_validation is validating
    other = ModelCheckpoint(save_last=True)
    other.on_exception(trainer, None, RuntimeError("not a signal"))
    assert not hasattr(other, "stopped_in_validation")


def test_a_run_that_fails_in_the_fit_reports_its_own_error(tmp_path, monkeypatch):
    """`run`'s finally puts back SIGTERM's handler from after the fit, also when the fit failed before that
    handler existed: it must not raise there (an AttributeError took the place of the real error)."""
    from eetrain import train
    from eetrain.config import compose
    from eetrain.errors import ConfigError

    monkeypatch.delattr(train._stop_after_fit, "handler", raising=False)
    cfg = compose(["+experiment=demo", "logger=none", "trainer.val_check_interval=2000", "trainer.limit_train_batches=2",
                   "trainer.enable_progress_bar=false", "callbacks.generation_metrics=null",
                   f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"trainer.val_check_interval=2000: more steps than an epoch has"):
        train.run(cfg)
