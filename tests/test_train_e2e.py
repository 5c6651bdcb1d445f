"""End-to-end recipe runs through the real CLI, Lightning Trainer, loggers and checkpoints."""

import os
import pickle
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from eetrain.checkpointing import AtomicCheckpointIO, load_exit_settings
from eetrain.errors import NonFiniteLossError
from eetrain.losses import ExitCrossEntropy, JointLoss
from eetrain.module import EarlyExitModule
from tests.conftest import examples, make_backbone
from tests.in_process import cli

SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=6", "trainer.limit_val_batches=2",
         "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=2"]


def _run(tmp_path: Path, *overrides: str, name: str = "run"):
    out = tmp_path / name
    r = cli("+experiment=demo", f"hydra.run.dir={out}", *overrides, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


@pytest.mark.slow
def test_demo_short_run_reports_exports_and_checkpoints(tmp_path):
    out, r = _run(tmp_path, *SHORT)
    assert "Per-layer validation report" in r.stdout
    # Lightning's messages once, in Hydra's format (its own console handler would print them again), and in
    # the run's log file
    assert (r.stdout + r.stderr).count("GPU available: False") == 1
    assert "[lightning.pytorch.utilities.rank_zero][INFO] - GPU available: False" in r.stdout
    assert "GPU available: False" in (out / "eetrain.log").read_text()
    report = pd.read_csv(out / "layer_report.csv")
    assert list(report.layer) == [1, 2, 3, 4] and report.agree.iloc[-1] == 1.0
    # the export loads with plain transformers, and carries the early-exit settings
    model = AutoModelForSeq2SeqLM.from_pretrained(out / "export")
    tok = AutoTokenizer.from_pretrained(out / "export")
    assert model.config.num_decoder_layers == 4 and tok.eos_token_id == 1
    settings = load_exit_settings(out / "export")
    assert settings["family"] == "t5" and settings["num_layers"] == 4
    # the demo's exported policy can exit below the last of its 4 layers (the papers' minimum 4 could not)
    assert settings["policy"]["min_exit_layer"] == 2
    assert settings["trained_exits"]["ce"]["layers"] == [1, 2, 3, 4]
    assert settings["trained_exits"]["ce"]["weights"] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    # per-layer metrics in the CSV log
    metrics = pd.read_csv(out / "csv" / "metrics.csv")
    for col in ("train/loss", "train/layer_01/ce", "train/layer_04/acc", "val/layer_02/acc",
                "val/layer_03/agree", "val/full/loss"):
        assert col in metrics.columns, col
    # the epoch's val/ values are token means: a layer's val CE is its val/layer_XX/loss (batches with fewer
    # target tokens used to weigh as much as full ones; the report reads every validation batch, not 2)
    val = metrics.dropna(subset=["val/loss"]).iloc[-1]
    for layer in range(1, 5):
        assert val[f"val/layer_{layer:02d}/ce"] == pytest.approx(val[f"val/layer_{layer:02d}/loss"], rel=1e-5)
    assert (out / "checkpoints" / "last.ckpt").exists()
    assert not list((out / "checkpoints").glob("*.tmp"))


@pytest.mark.slow
def test_resume_from_checkpoint(tmp_path):
    first, _ = _run(tmp_path, *SHORT, "export=false", name="first")
    ckpt = first / "checkpoints" / "last.ckpt"
    step = torch.load(ckpt, weights_only=False)["global_step"]
    second, r = _run(tmp_path, *SHORT, "trainer.max_epochs=2", f"ckpt_path={ckpt}", "export=false", name="second")
    resumed = torch.load(second / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 2 * step and resumed["epoch"] == 1
    metrics = pd.read_csv(second / "csv" / "metrics.csv")
    assert metrics["epoch"].dropna().min() == 1  # only the second epoch was trained


@pytest.mark.slow
def test_wandb_offline_run_files(tmp_path):
    assert os.environ["WANDB_MODE"] == "offline"  # set by conftest; the CLI child inherits it
    out, _ = _run(tmp_path, *SHORT, "logger=wandb", "export=false", name="wb")
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (record,) = runs[0].glob("run-*.wandb")
    # The offline record is a log of protobuf messages; history keys are stored as plain UTF-8.
    data = record.read_bytes()
    for key in ("train/loss", "train/layer_04/ce", "val/layer_01/acc", "val/layer_04/agree", "val/full/loss",
                "val/rougeL", "val/rougeL_early_exit"):
        assert key.encode() in data, key


@pytest.mark.slow
def test_logger_none_alone_trains(tmp_path):
    # the default callbacks include Lightning's learning-rate monitor, which refuses a Trainer without a
    # logger: with logger=none it is left out (no need for callbacks=none as well)
    out, _ = _run(tmp_path, *SHORT, "logger=none", "export=false", name="nolog")
    assert (out / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_full_demo_learns(tmp_path):
    """The README's quick start, as is: the model learns and shallow exits agree with the last layer."""
    out, r = _run(tmp_path, "trainer.enable_progress_bar=false")
    report = pd.read_csv(out / "layer_report.csv")
    assert report.acc.iloc[-1] > 0.6
    assert report.agree.iloc[-2] > 0.8
    assert "agree_last" in r.stdout


def test_nan_loss_stops_with_clear_error(tmp_path):
    bb = make_backbone("t5")
    with torch.no_grad():
        bb.model.decoder.final_layer_norm.weight.fill_(float("nan"))
    module = EarlyExitModule(bb, JointLoss({"ce": ExitCrossEntropy()}), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    loader = torch.utils.data.DataLoader(examples(), batch_size=2, collate_fn=bb.collate)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        default_root_dir=tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss nan at global step 0 .*per-layer CE") as info:
        trainer.fit(module, train_dataloaders=loader)
    assert str(info.value).endswith("No checkpoint was written before this step.")


@pytest.mark.parametrize("precision, remedy", [
    ("32-true", "lower optimizer.lr, check the data, or use trainer.precision=32"),
    ("16-true", "(trainer.precision=16-true) overflow and underflow easily: use bf16-true, 16-mixed or 32"),
])
def test_nan_loss_names_the_checkpoint_it_leaves_and_the_remedy(tmp_path, precision, remedy):
    bb = make_backbone("t5")

    class PoisonSecondStep(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1:
                with torch.no_grad():
                    bb.model.decoder.final_layer_norm.weight.fill_(float("nan"))

    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    module = EarlyExitModule(bb, JointLoss({"ce": ExitCrossEntropy()}), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    loader = torch.utils.data.DataLoader(examples() * 2, batch_size=2, collate_fn=bb.collate)
    trainer = L.Trainer(max_steps=3, logger=False, enable_progress_bar=False, default_root_dir=tmp_path,
                        precision=precision, callbacks=[PoisonSecondStep(), checkpoints])
    with pytest.raises(NonFiniteLossError, match=r"at global step 1 ") as info:
        trainer.fit(module, train_dataloaders=loader)
    message = str(info.value)
    assert remedy in message
    assert message.endswith(f"The last checkpoint written before this step, {tmp_path / 'ckpt' / 'last.ckpt'}, is intact.")
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 1


def test_atomic_checkpoint_keeps_old_file_on_failure(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        io.save_checkpoint({"step": 2, "bad": lambda: None}, path)  # unpicklable: fails mid-save
    assert torch.load(path, weights_only=False)["step"] == 1
    assert not list(tmp_path.glob("*.tmp"))
