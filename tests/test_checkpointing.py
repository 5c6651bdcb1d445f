"""What a run is given, checked before it starts (`eetrain.checkpointing`): a checkpoint that fits the
model, a readable checkpoint file, a usable learning rate -- one line and exit code 2 from the CLI.
Also the atomic writes the checkpoints and the export go through."""

from __future__ import annotations

import math
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from eetrain.checkpointing import (
    AtomicCheckpointIO,
    check_checkpoint,
    check_learning_rate,
    export_pretrained,
)
from eetrain.errors import ConfigError
from eetrain.files import atomic_directory
from eetrain.losses import ExitCrossEntropy, JointLoss
from eetrain.module import EarlyExitModule
from tests import test_config
from tests.conftest import make_backbone
from tests.in_process import cli

TINY = ["trainer.max_epochs=1", "++trainer.limit_train_batches=2", "++trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false", "callbacks.generation_metrics=null", "callbacks.lr_monitor=null"]


def _module(**overrides) -> EarlyExitModule:
    return EarlyExitModule(make_backbone("t5", **overrides), JointLoss({"ce": ExitCrossEntropy()}), optimizer=None)


def _save(module: EarlyExitModule, path: Path) -> Path:
    torch.save({"state_dict": module.state_dict(), "global_step": 0}, path)
    return path


# --- check_checkpoint on its own (fast) ---------------------------------------------------------------
def test_a_fitting_checkpoint_passes_and_is_returned(tmp_path):
    module = _module()
    ckpt = check_checkpoint(_save(module, tmp_path / "ok.ckpt"), _module())
    assert set(ckpt["state_dict"]) == set(module.state_dict())


def test_another_depth_or_width_names_both_models(tmp_path):
    # tests/conftest TINY t5: d_model 32, 3 decoder layers
    path = _save(_module(d_model=48, num_layers=5, num_decoder_layers=5), tmp_path / "big.ckpt")
    with pytest.raises(ConfigError) as err:
        check_checkpoint(path, _module())
    message = str(err.value)
    assert message.startswith(f"ckpt_path={str(path)!r}: the checkpoint's model has 5 layers / d_model 48, "
                              "this one 3 / 32")
    assert "\n" not in message
    path = _save(_module(num_layers=2, num_decoder_layers=2), tmp_path / "shallow.ckpt")
    with pytest.raises(ConfigError, match=r"the checkpoint's model has 2 layers / d_model 32, this one 3 / 32"):
        check_checkpoint(path, _module())


def test_same_depth_and_width_but_other_tensors_names_the_first_difference(tmp_path):
    path = _save(_module(d_ff=40), tmp_path / "ff.ckpt")
    with pytest.raises(ConfigError, match=r"the checkpoint is of another model: \d+ tensor\(s\) of another shape, "
                                          r"e\.g\. .*wi\.weight: \[40, 32\] in the checkpoint, \[\d+, 32\] here"):
        check_checkpoint(path, _module())
    state = _module().state_dict()
    state.pop(next(k for k in reversed(list(state)) if "block" in k))
    torch.save({"state_dict": state}, tmp_path / "less.ckpt")
    with pytest.raises(ConfigError, match=r"the checkpoint is of another model: 1 missing, e\.g\. "):
        check_checkpoint(tmp_path / "less.ckpt", _module())


def test_damaged_missing_or_foreign_files(tmp_path):
    good = _save(_module(), tmp_path / "good.ckpt")
    data = good.read_bytes()
    (tmp_path / "half.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=r"ckpt_path='.*half.ckpt': not a readable checkpoint, the file is "
                                          r"truncated or corrupt \("):
        check_checkpoint(tmp_path / "half.ckpt", _module())
    (tmp_path / "noise.ckpt").write_bytes(os.urandom(2048))
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        check_checkpoint(tmp_path / "noise.ckpt", _module())
    with pytest.raises(ConfigError, match=r"ckpt_path='.*nothing.ckpt': no such checkpoint file"):
        check_checkpoint(tmp_path / "nothing.ckpt", _module())
    torch.save({"weights": 1}, tmp_path / "plain.pt")
    with pytest.raises(ConfigError, match=r"not a Lightning checkpoint \(no state_dict\)"):
        check_checkpoint(tmp_path / "plain.pt", _module())


def test_run_inputs_leave_lightning_s_names_and_sharded_directories_to_lightning(tmp_path):
    from omegaconf import OmegaConf

    from eetrain.checkpointing import check_run_inputs, checkable_checkpoint

    (tmp_path / "last.ckpt").mkdir()  # DeepSpeed / sharded FSDP: a directory
    (tmp_path / "last.ckpt" / "latest").write_text("global_step2")  # DeepSpeed's marker
    for name in ("last", "hpc", "best", "registry:model:latest", "s3://bucket/last.ckpt", str(tmp_path / "last.ckpt")):
        assert not checkable_checkpoint(name)
    for name in ("registry:model:latest", "s3://bucket/last.ckpt", str(tmp_path / "last.ckpt")):
        check_run_inputs(OmegaConf.create({"optimizer": {"lr": 1e-3}, "ckpt_path": name}), _module())
    # last / hpc / best: looked for in the run's directory (test_lightning_checkpoint_names_resolve_...)
    run = OmegaConf.create({"optimizer": {"lr": 1e-3}, "ckpt_path": "last", "paths": {"output_dir": str(tmp_path)}})
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    check_run_inputs(run, _module())
    assert checkable_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(ConfigError, match="no such checkpoint file"):
        check_run_inputs(OmegaConf.create({"optimizer": {"lr": 1e-3}, "ckpt_path": str(tmp_path / "x.ckpt")}), _module())
    with pytest.raises(ConfigError, match="optimizer.lr=nan"):
        check_run_inputs(OmegaConf.create({"optimizer": {"lr": float("nan")}, "ckpt_path": None}), _module())
    (tmp_path / "plain_dir").mkdir()  # a directory with no sharded checkpoint in it
    with pytest.raises(ConfigError, match=r"is a directory but not a sharded \(DeepSpeed / FSDP\) checkpoint"):
        check_run_inputs(OmegaConf.create({"optimizer": {"lr": 1e-3}, "ckpt_path": str(tmp_path / "plain_dir")}),
                         _module())


def test_resuming_with_another_optimizer_is_refused_before_fitting(tmp_path):
    from functools import partial

    from omegaconf import OmegaConf
    from transformers.optimization import Adafactor

    from eetrain.checkpointing import check_run_inputs

    module = _module()
    adamw = torch.optim.AdamW(module.parameters(), lr=1e-3)
    torch.save({"state_dict": module.state_dict(), "optimizer_states": [adamw.state_dict()]}, tmp_path / "a.ckpt")
    cfg = {"optimizer": {"lr": 1e-3}, "ckpt_path": str(tmp_path / "a.ckpt")}
    same = EarlyExitModule(make_backbone("t5"), JointLoss({"ce": ExitCrossEntropy()}),
                           optimizer=partial(torch.optim.AdamW, lr=1e-3))
    check_run_inputs(OmegaConf.create(cfg), same)
    state = adamw.state_dict()  # a state from an older torch: fewer implementation switches, still AdamW
    state["param_groups"][0].pop("decoupled_weight_decay", None)
    state["param_groups"][0].pop("fused", None)
    torch.save({"state_dict": module.state_dict(), "optimizer_states": [state]}, tmp_path / "old.ckpt")
    check_run_inputs(OmegaConf.create({**cfg, "ckpt_path": str(tmp_path / "old.ckpt")}), same)
    other = EarlyExitModule(make_backbone("t5"), JointLoss({"ce": ExitCrossEntropy()}),
                            optimizer=partial(Adafactor, lr=1e-3, relative_step=False, scale_parameter=False))
    with pytest.raises(ConfigError, match=r"ckpt_path='.*a.ckpt' was trained with another optimizer \(its settings: "):
        check_run_inputs(OmegaConf.create(cfg), other)
    check_run_inputs(OmegaConf.create({**cfg, "train": False}), other)  # evaluation reads the weights alone


@pytest.mark.parametrize("lr", [math.nan, math.inf, -1e-3, 0.0, "fast", True])
def test_learning_rate_must_be_finite_and_positive(lr):
    with pytest.raises(ConfigError, match=r"optimizer.lr=.*; allowed: a finite number > 0"):
        check_learning_rate({"lr": lr})


def test_good_learning_rates_pass():
    check_learning_rate({"lr": 1e-4})
    check_learning_rate({"lr": 3})
    check_learning_rate({"lr": None, "relative_step": True})  # Adafactor's own schedule
    with pytest.raises(ConfigError, match="optimizer.lr=None"):
        check_learning_rate({"lr": None})


# --- the CLI: one line, exit code 2 -------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """last.ckpt of a 2-batch demo run (t5_tiny: 4 layers, d_model 64)."""
    where = tmp_path_factory.mktemp("trained")
    r = cli("+experiment=demo", f"hydra.run.dir={where / 'run'}", *TINY, "export=false", cwd=where, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return where / "run" / "checkpoints" / "last.ckpt"


def _one_line_error(r) -> str:
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("eetrain: error:")]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("train", ["true", "false"])  # resume (trainer.fit) and load_module_weights
def test_cli_checkpoint_of_another_model_shape(tmp_path, trained, train):
    r = cli("+experiment=demo", f"hydra.run.dir={tmp_path / 'run'}", *TINY, f"train={train}", "export=false",
            "model.config.d_model=32", "model.config.num_layers=2", "model.config.num_decoder_layers=2",
            f"ckpt_path={trained}", cwd=tmp_path)
    line = _one_line_error(r)
    assert line == (f"eetrain: error: ckpt_path={str(trained)!r}: the checkpoint's model has 4 layers / d_model 64, "
                    "this one 2 / 32; use the model settings it was trained with (e.g. the same model=... and "
                    "model.config.*) or another checkpoint")
    assert "Missing key(s)" not in r.stderr


def test_cli_truncated_checkpoint(tmp_path, trained):
    half = tmp_path / "half.ckpt"
    data = trained.read_bytes()
    half.write_bytes(data[: len(data) // 2])
    r = cli("+experiment=demo", f"hydra.run.dir={tmp_path / 'run'}", *TINY, "export=false", f"ckpt_path={half}",
            cwd=tmp_path)
    line = _one_line_error(r)
    assert line.startswith(f"eetrain: error: ckpt_path={str(half)!r}: not a readable checkpoint, the file is "
                           "truncated or corrupt (")


def test_cli_nan_learning_rate(tmp_path):
    """The one-line error as a shell sees it: a real `python -m eetrain` process (the others run in-process)."""
    r = test_config.cli("+experiment=demo", f"hydra.run.dir={tmp_path / 'run'}", *TINY, "optimizer.lr=nan", cwd=tmp_path)
    assert _one_line_error(r) == "eetrain: error: optimizer.lr=nan; allowed: a finite number > 0 (e.g. 1e-4)"
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing ran


# --- atomic writes ---------------------------------------------------------------------------------------
def test_checkpoint_io_writes_through_a_hidden_temp_file_and_leaves_nothing(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        io.save_checkpoint({"step": 2, "bad": lambda: None}, path)
    assert torch.load(path, weights_only=False)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_atomic_directory_swaps_whole_or_keeps_the_old(tmp_path):
    target = tmp_path / "export"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (target / "a.txt").read_text() == "1"
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("crash mid-export")
    assert (target / "a.txt").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["export"]
    with atomic_directory(target) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # replaced, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask


def test_export_is_written_atomically(tmp_path):
    where = export_pretrained(make_backbone("t5"), tmp_path / "export", {"family": "t5", "num_layers": 3})
    assert (where / "early_exit.json").is_file() and (where / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_exits_modules_import_at_the_top_level():
    """No function-level imports between exits.settings, exits.evaluation and exits.training."""
    import ast
    import importlib

    for name in ("settings", "evaluation", "training"):
        importlib.import_module(f"eetrain.exits.{name}")
        tree = ast.parse((Path(__file__).resolve().parent.parent / "eetrain" / "exits" / f"{name}.py").read_text())
        for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom):
                    target = "." * node.level + (node.module or "")
                    assert target.lstrip(".").removeprefix("eetrain.exits.") not in (
                        "settings", "evaluation", "training"), (name, fn.name, target)


def test_monitor_check_after_the_sanity_validation():
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint

    from eetrain.checkpointing import monitor_check
    from eetrain.decoding.callback import GenerationMetrics

    sanity = SimpleNamespace(callback_metrics={"val/loss": 1.0, "val/layer_01/acc": 0.5})
    assert monitor_check({"lr_monitor": LearningRateMonitor()}) is None  # nothing monitored
    check = monitor_check({"model_checkpoint": ModelCheckpoint(monitor="val/loss"),
                           "early_stopping": EarlyStopping(monitor="train/loss")})
    check.on_sanity_check_end(sanity, None)  # logged, and a training metric is not validation's to judge
    with pytest.raises(ConfigError, match=r"callbacks.model_checkpoint.monitor='val/rougeL': validation logs no such "
                                          r"metric; it logs \['val/layer_01/acc', 'val/loss'\]"):
        monitor_check({"model_checkpoint": ModelCheckpoint(monitor="val/rougeL")}).on_sanity_check_end(sanity, None)
    # the task-metric callback logs val/<metric> only after real validations (it skips the sanity check)
    later = monitor_check({"model_checkpoint": ModelCheckpoint(monitor="val/rougeL"),
                           "generation_metrics": GenerationMetrics()})
    later.on_sanity_check_end(sanity, None)


def test_lightning_checkpoint_names_resolve_in_this_runs_directory(tmp_path):
    from eetrain.checkpointing import check_named_checkpoint

    with pytest.raises(ConfigError, match="ckpt_path=best is Lightning's best checkpoint"):
        check_named_checkpoint("best", tmp_path)
    for name in ("last", "hpc"):
        with pytest.raises(ConfigError, match=f"ckpt_path={name}: there is no {re.escape(str(tmp_path))}/"):
            check_named_checkpoint(name, tmp_path)
        check_named_checkpoint(name, tmp_path, pinned=True)  # hydra.run.dir given: a first run starts fresh
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"x")
    check_named_checkpoint("last", tmp_path)  # hydra.run.dir=<an old run> ckpt_path=last
    check_named_checkpoint("hpc", tmp_path)


def test_atomic_files_get_the_modes_open_gives_and_json_is_whole(tmp_path):
    import json
    import stat
    import tempfile

    from eetrain.files import write_json

    umask = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "export") as tmp:
            fd, name = tempfile.mkstemp(dir=tmp)  # as a library writing through mkstemp does: owner-only
            os.close(fd)
            os.replace(name, tmp / "model.safetensors")
        assert stat.S_IMODE((tmp_path / "export" / "model.safetensors").stat().st_mode) == 0o644
        write_json(tmp_path / "summary.json", {"a": 1})
        assert stat.S_IMODE((tmp_path / "summary.json").stat().st_mode) == 0o644
    finally:
        os.umask(umask)
    assert json.loads((tmp_path / "summary.json").read_text()) == {"a": 1}
    with pytest.raises(TypeError):
        write_json(tmp_path / "summary.json", {"b": object()})  # fails midway: the old file stays whole
    assert json.loads((tmp_path / "summary.json").read_text()) == {"a": 1}
    assert not list(tmp_path.glob(".summary.json.*"))
