"""W&B panels (eetrain/wandb_panels.py) and progress (eetrain/progress.py): pure helpers, the callbacks
without W&B, an offline W&B run with every stage's keys, and the export artifact."""

import json
import os
import re

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from eetrain.config import compose
from eetrain.losses import ExitCrossEntropy, JointLoss
from eetrain.module import EarlyExitModule
from eetrain.progress import LineProgressBar, NoProgressBar, progress, status_line, training_progress_bar
from eetrain.wandb_panels import WandbPanels, _thin, layer_rows, layer_series, log_export_artifact
from tests.conftest import examples, make_backbone
from tests.in_process import cli


def test_layer_rows_from_logged_metrics():
    metrics = {"val/layer_02/loss": torch.tensor(2.0), "val/layer_01/acc": 0.5, "val/layer_02/agree": 1.0,
               "val/layer_01/loss": 3.0, "val/loss": 9.0, "train/layer_01/ce": 4.0, "val/layer_01/other": 1.0}
    assert layer_rows(metrics) == [
        {"layer": 1, "loss": 3.0, "acc": 0.5, "agree": None},
        {"layer": 2, "loss": 2.0, "acc": None, "agree": 1.0},
    ]
    assert layer_rows(metrics, "train", ("ce",)) == [{"layer": 1, "ce": 4.0}]


def test_layer_series_one_line_per_exit_and_thinning():
    history = [{"trainer/global_step": s, "val/layer_01/loss": 10 - s, "val/layer_03/loss": 5 - s} for s in (3, 6)]
    history.append({"trainer/global_step": 9})  # a validation without per-layer values is skipped
    xs, ys, keys = layer_series(history, "val", "loss", (1, 2, 3))
    assert xs == [3, 6] and ys == [[7, 4], [2, -1]] and keys == ["layer 01", "layer 03"]
    xs, ys = _thin(list(range(1201)), [list(range(1201))])
    assert len(xs) <= 502 and xs[0] == 0 and xs[-1] == 1200 and ys[0] == xs


def test_status_line_and_line_progress(capsys, monkeypatch):
    assert status_line("sweep", 2, 4, 10.0, "point") == "sweep: 2/4 [elapsed 0:00:10, ETA 0:00:10, 5.0 s/point]"
    assert status_line("records", 0, 8, 0.0) == "records: 0/8 [elapsed 0:00:00, ETA ?]"
    assert status_line("gen", 3, None, 3725.0, "batch").startswith("gen: 3 [elapsed 1:02:05, 1241.7 s/batch")
    # resumed mid-epoch after batch 3: the rate and the ETA count the batches run since
    assert status_line("Epoch 2/3 training", 5, 6, 4.0, "batch", start=3) == (
        "Epoch 2/3 training: 5/6 [elapsed 0:00:04, ETA 0:00:02, 2.0 s/batch]")
    monkeypatch.delenv("EETRAIN_PROGRESS", raising=False)
    # not a terminal (pytest captures stderr): plain lines, first and last always
    assert list(progress([1, 2, 3], "sweep", unit="point", interval=1e9)) == [1, 2, 3]
    with progress(2, "records", unit="batch") as bar:
        bar.update(1)
        bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "sweep: 0/3 [elapsed 0:00:00, ETA ?]" and lines[1].startswith("sweep: 3/3 [")
    assert lines[1].endswith(" done") and lines[2].startswith("records: 0/2") and len(lines) == 4
    list(progress([1], "quiet", disable=True))
    monkeypatch.setenv("EETRAIN_PROGRESS", "off")
    list(progress([1], "off too"))
    assert capsys.readouterr().err == ""


def test_training_progress_bar_choices(monkeypatch):
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    monkeypatch.delenv("EETRAIN_PROGRESS", raising=False)
    assert isinstance(training_progress_bar(enabled=False), NoProgressBar)
    assert isinstance(training_progress_bar(), LineProgressBar)  # stdout is not a terminal under pytest
    assert isinstance(training_progress_bar(style="rich"), RichProgressBar)
    assert isinstance(training_progress_bar(style="tqdm"), TQDMProgressBar)
    monkeypatch.setenv("EETRAIN_PROGRESS", "rich")
    assert isinstance(training_progress_bar(), RichProgressBar)
    # the shipped config follows trainer.enable_progress_bar (Lightning refuses a bar callback when it is false)
    off = compose(["+experiment=demo", "trainer.enable_progress_bar=false"])
    assert isinstance(instantiate(off.callbacks.progress_bar), NoProgressBar)
    assert off.callbacks.wandb_panels.export_artifact is False


def test_callbacks_without_wandb_record_history_and_log_nothing(tmp_path, capsys):
    bb = make_backbone("t5")
    module = EarlyExitModule(bb, JointLoss({"ce": ExitCrossEntropy()}), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    loader = torch.utils.data.DataLoader(examples(), batch_size=2, collate_fn=bb.collate)
    panels = WandbPanels()
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_model_summary=False,
                        log_every_n_steps=1, callbacks=[panels, LineProgressBar(interval_s=0)],
                        default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    assert WandbPanels.run(trainer) is None and not panels.log_charts(trainer)
    assert [h["trainer/global_step"] for h in panels.train_history] == [0, 1]
    assert [h["trainer/global_step"] for h in panels.val_history] == [1, 2]
    assert set(panels.val_history[0]) >= {f"val/layer_0{i}/{m}" for i in (1, 2, 3) for m in ("loss", "acc", "agree")}
    assert not log_export_artifact(tmp_path, trainer)  # the switch is off
    resumed = WandbPanels()
    resumed.load_state_dict(panels.state_dict())  # checkpoints carry the history
    assert resumed.val_history == panels.val_history and resumed.validations == 2
    err = capsys.readouterr().err
    assert "Epoch 1/2 training: 1/1 [" in err and "Epoch 2/2 training: 1/1 [" in err and "train/loss=" in err


def _keys(record: bytes) -> set[str]:
    return {k.decode() for k in re.findall(rb"[a-z_]+/[a-z0-9_/]+", record)}


@pytest.mark.slow
def test_wandb_offline_run_has_every_panel(tmp_path):
    """A tiny training with logger=wandb (offline) and the stages: the run record holds the per-exit line
    series, the layer report, the policy table and plot, the exit-layer histogram, the curve's tables."""
    assert os.environ["WANDB_MODE"] == "offline"
    out = tmp_path / "run"
    r = cli(
        "+experiment=demo", f"hydra.run.dir={out}", "logger=wandb", "trainer.max_epochs=2",
        "++trainer.limit_train_batches=3", "++trainer.limit_val_batches=2", "trainer.log_every_n_steps=1",
        "trainer.enable_model_summary=false", "callbacks.generation_metrics=null",
        "stages=[exit_classifiers,policies,generate,curve]", "exit.min_exit_layer=2", "exit.classifiers.kinds=[calm]",
        "exit.classifiers.epochs=1", "exit.classifiers.max_train_tokens=2000", "exit.record.max_tokens=400", "data.eval_batch_size=64",
        "decoding.max_examples=4", "decoding.max_new_tokens=8", "curve.policies=[softmax_gap]",
        "exit.policies.softmax_gap.thresholds=[0.5]", "curve.max_examples=4", "curve.oracle=false",
        "decoding.adaptive_threshold=true", cwd=tmp_path, timeout=400,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = (out / "wandb").glob("offline-run-*")
    (record,) = run.glob("run-*.wandb")
    data = record.read_bytes()
    expected = [
        # per-exit line series (one chart, a line per exit layer) and the per-layer report
        "exits/val_loss", "exits/val_acc", "exits/val_agree", "exits/train_ce", "exits/train_acc",
        "exits/layer_report", "exits/layer_report_plot",
        # the glob that groups the per-layer scalars against trainer/global_step
        "val/layer_*", "train/layer_*",
        # stages: policies table + image, generation histogram + summary table, the curve
        "policies/table", "policies/plot", "policies/consistency_vs_exit", "policies/calibration",
        "generate/exit_layers", "generate/exit_layer_counts", "generate/summary", "curve/quality_speed",
        "generate/adaptive_threshold", "generate/adaptive_threshold_plot",
        "curve/quality_speed_plot", "curve/quality_speed_png", "curve/quality_speed_lines", "curve/quality_speed_flops_plot",
    ]
    missing = [k for k in expected if k.encode() not in data]
    assert not missing, (missing, sorted(_keys(data))[:200])
    assert b'"_type": "histogram"' in data or b"histogram" in data
    assert b'"_type": "image-file"' in data or b"image-file" in data
    media = run / "files" / "media"
    (report,) = (media / "table" / "exits").glob("layer_report_[0-9]*.table.json")
    table = json.loads(report.read_text())
    assert table["columns"] == ["layer", "loss", "acc", "agree"] and [row[0] for row in table["data"]] == [1, 2, 3, 4]
    val_loss = max((media / "table" / "exits").glob("val_loss_table_*.table.json"),
                   key=lambda f: int(f.name.split("_")[3]))  # val_loss_table_<step>_<hash>: the last chart
    lines = json.loads(val_loss.read_text())["data"]
    assert {row[1] for row in lines} == {"layer 01", "layer 02", "layer 03", "layer 04"}
    assert sorted({row[0] for row in lines}) == [3, 6]  # one point per validation
    assert list(media.glob("images/policies/plot_*.png"))
    # progress is plain lines on stderr when the output is captured: one per epoch and stage loop, no flood
    assert "Epoch 2/2 training: 3/3 [" in r.stderr and "early-exit generation: 4/4 [" in r.stderr
    assert "quality-vs-speed sweep: 1/1 [" in r.stderr and "\r" not in r.stderr
    assert sum("training:" in line for line in r.stderr.splitlines()) <= 4


def test_export_artifact_when_switched_on(tmp_path):
    import wandb

    export = tmp_path / "export"
    export.mkdir()
    (export / "early_exit.json").write_text(json.dumps({"num_layers": 4}))
    (export / "config.json").write_text("{}")
    trainer = L.Trainer(logger=False, callbacks=[WandbPanels(export_artifact=True)], enable_progress_bar=False,
                        default_root_dir=tmp_path)
    assert not log_export_artifact(export, trainer)  # no active run
    run = wandb.init(mode="offline", dir=str(tmp_path), project="eetrain-test", name="unit run")
    try:
        assert log_export_artifact(export, trainer)
        assert not log_export_artifact(tmp_path / "missing", trainer)
    finally:
        wandb.finish()
        wandb.teardown()  # stops the W&B service: the offline record is complete on disk
    (record,) = (tmp_path / "wandb").glob(f"offline-run-*-{run.id}/run-*.wandb")
    assert b"unit-run-export" in record.read_bytes()


def test_a_table_column_may_mix_numbers_and_labels():
    """A curve's thresholds are numbers, per-layer labels and FREE's adaptive point: one column."""
    from eetrain.wandb_panels import table

    t = table([{"policy": "full", "threshold": None}, {"policy": "softmax_gap", "threshold": 0.9},
               {"policy": "softmax_gap (adaptive)", "threshold": "adaptive:0.3"}])
    assert t.columns == ["policy", "threshold"] and [row[1] for row in t.data] == [None, 0.9, "adaptive:0.3"]


def test_a_resumed_run_goes_on_in_its_wandb_run(tmp_path, monkeypatch):
    """A requeued job (same run directory) logs to the W&B run it started, not a new one."""
    from tests import tiny_runs

    data = tiny_runs.write_data(tmp_path / "data", train=16)
    out = tmp_path / "run"
    common = [*data, "data.batch_size=8", "export=false", "logger=wandb"]
    tiny_runs.run_here(out, *common, "trainer.max_epochs=1")
    (first,) = (out / "wandb").glob("offline-run-*")
    run_id = first.name.rsplit("-", 1)[1]
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    r = tiny_runs.run_here(out, *common, "trainer.max_epochs=2")
    assert f"[resume] W&B: continuing run {run_id} of {out / 'wandb'}" in r.stdout
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and {p.name.rsplit("-", 1)[1] for p in runs} == {run_id}


def test_which_runs_continue_a_wandb_run(tmp_path):
    from eetrain.resume import continued_wandb_run

    node = {"_target_": "lightning.pytorch.loggers.WandbLogger", "id": None}
    (tmp_path / "wandb" / "offline-run-20261202_061500-abc123").mkdir(parents=True)
    inside = str(tmp_path / "checkpoints" / "last.ckpt")
    assert continued_wandb_run(node, tmp_path, inside) == {"id": "abc123", "resume": "allow"}
    assert continued_wandb_run(node, tmp_path, "last") == {"id": "abc123", "resume": "allow"}
    assert continued_wandb_run(node, tmp_path, None) == {}  # a fresh start
    assert continued_wandb_run(node, tmp_path, "/elsewhere/last.ckpt") == {}  # another run's checkpoint: a new run
    assert continued_wandb_run({**node, "id": "mine"}, tmp_path, inside) == {}  # the config's id wins
    assert continued_wandb_run({"_target_": "eetrain.resume.CSVLogger"}, tmp_path, inside) == {}
