"""SLURM: the submitit launcher config, Lightning's SLURM environment, and a requeued job's resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from hydra.utils import instantiate

from eetrain.config import compose
from eetrain.resume import requeue_checkpoint, resume_path, slurm_plugins
from tests import tiny_runs

SUBMITIT_SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def test_slurm_launcher_composes_with_its_settings():
    cfg = compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.nodes=2",
                   "hydra.launcher.gpus_per_node=4", "hydra.launcher.timeout_min=600",
                   "+experiment=calm_t5", "trainer=ddp"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == SUBMITIT_SLURM
    assert (launcher.partition, launcher.nodes, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 2, 4, 600)
    assert launcher.tasks_per_node == 4  # one task per GPU, as Lightning wants
    assert launcher.signal_delay_s > 0 and launcher.max_num_timeout >= 1  # signal, then requeue
    assert cfg.hydra.job.chdir is False
    assert cfg.trainer.strategy == "ddp" and cfg.task_name == "calm_t5"
    # Hydra builds the launcher from this node: every value resolves
    built = instantiate(launcher)
    assert type(built).__name__ == "SlurmLauncher"
    assert built.params["tasks_per_node"] == built.params["gpus_per_node"] == 4
    assert built.params["submitit_folder"].endswith("/.submitit/%j")


def test_default_launcher_is_hydras_own():
    cfg = compose([], return_hydra_config=True)
    assert "submitit" not in cfg.hydra.launcher._target_


def test_slurm_sweep_off_a_cluster_is_one_line(monkeypatch, tmp_path, capsys):
    from eetrain.__main__ import main

    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    monkeypatch.setattr(sys, "argv", ["eetrain", "-m", "hydra/launcher=slurm", "+experiment=demo"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "hydra/launcher=slurm: no `srun` on PATH" in err and "Traceback" not in err
    (tmp_path / "srun").write_text("#!/bin/sh\n")
    (tmp_path / "srun").chmod(0o755)
    from eetrain.__main__ import check_slurm

    check_slurm(["-m", "hydra/launcher=slurm"])  # on a login node: submitit's turn
    check_slurm(["hydra/launcher=slurm"])  # without -m Hydra runs the job here; no launcher involved


def _slurm_env(monkeypatch, restarts: int | None, srun: bool = False):
    for key in list(os.environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)
    if restarts is not None:
        monkeypatch.setenv("SLURM_RESTART_COUNT", str(restarts))
    if srun:
        monkeypatch.setenv("SLURM_NTASKS", "1")
        monkeypatch.setenv("SLURM_JOB_NAME", "eetrain")


def test_requeued_job_resumes_from_the_newest_checkpoint(tmp_path, monkeypatch, capsys):
    cfg = compose([])
    last = tmp_path / "checkpoints" / "last.ckpt"
    _slurm_env(monkeypatch, restarts=1)
    assert requeue_checkpoint(tmp_path) is None and resume_path(cfg, tmp_path) is None  # nothing saved yet
    last.parent.mkdir()
    last.write_bytes(b"x")
    assert resume_path(cfg, tmp_path) == str(last)
    assert f"resuming from {last}" in capsys.readouterr().out
    hpc = tmp_path / "hpc_ckpt_1.ckpt"  # Lightning's, written on its requeue signal: newer here
    hpc.write_bytes(b"x")
    os.utime(last, (time.time() - 60, time.time() - 60))
    assert resume_path(cfg, tmp_path) == str(hpc)
    # a job started from ckpt_path: requeued, its own newer checkpoint wins (it is further along)
    given = compose(["ckpt_path=/some/where.ckpt"])
    assert resume_path(given, tmp_path) == str(hpc)
    assert "(not ckpt_path=/some/where.ckpt, which this job started from)" in capsys.readouterr().out
    # a first run is left alone: a fresh start, or the ckpt_path given
    _slurm_env(monkeypatch, restarts=0)
    assert resume_path(cfg, tmp_path) is None
    assert resume_path(given, tmp_path) == "/some/where.ckpt"
    _slurm_env(monkeypatch, restarts=None)
    assert resume_path(cfg, tmp_path) is None
    _slurm_env(monkeypatch, restarts=2)
    assert resume_path(given, tmp_path / "elsewhere") == "/some/where.ckpt"  # requeued before any save


def test_slurm_environment_with_auto_requeue(monkeypatch):
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    _slurm_env(monkeypatch, restarts=None)
    assert slurm_plugins(compose([])) == []  # not a SLURM job
    _slurm_env(monkeypatch, restarts=None, srun=True)
    (env,) = slurm_plugins(compose([]))
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal == signal.SIGUSR1
    (env,) = slurm_plugins(compose(["slurm.auto_requeue=false", "slurm.requeue_signal=USR2"]))
    assert not env.auto_requeue and env.requeue_signal == signal.SIGUSR2
    from eetrain.errors import ConfigError

    with pytest.raises(ConfigError, match="slurm.requeue_signal='NOPE'"):
        slurm_plugins(compose(["slurm.requeue_signal=NOPE"]))


@pytest.mark.slow
def test_requeued_run_continues_in_its_run_directory(tmp_path, monkeypatch):
    """A job that trained one epoch, requeued (SLURM_RESTART_COUNT=1) with the same run directory and no
    ckpt_path, goes on from its last.ckpt instead of starting over."""
    data = tiny_runs.write_data(tmp_path / "data", train=16)
    run_dir = tmp_path / "run"
    common = [*data, "data.batch_size=8", "export=false"]
    tiny_runs.run_here(run_dir, *common, "trainer.max_epochs=1")
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    r = tiny_runs.run_here(run_dir, *common, "trainer.max_epochs=2")
    assert f"[resume] SLURM requeue 1: resuming from {run_dir / 'checkpoints' / 'last.ckpt'}" in r.stdout
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 4 and resumed["epoch"] == 1
    steps = tiny_runs.step_losses(run_dir)  # metrics.csv goes on: the first run's rows are kept
    assert list(steps.index) == [0, 1, 2, 3]


def test_sweep_submits_one_sbatch_array_with_our_settings(tmp_path):
    """`python -m eetrain -m hydra/launcher=slurm ...` up to sbatch (a stand-in that keeps the script it
    is given): one array job, one task per GPU, the time limit, the requeue signal."""
    bin_dir, script = tmp_path / "bin", tmp_path / "submitted.sh"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\nfor last; do :; done\ncp "$last" "$EETRAIN_CAPTURE"\n'
                                    'echo "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**tiny_runs.env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "EETRAIN_CAPTURE": str(script)}
    cmd = [sys.executable, "-m", "eetrain", "-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
           "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=4", "hydra.launcher.timeout_min=90",
           "+experiment=calm_t5", "trainer=ddp", "optimizer.lr=1e-4,3e-4", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 300
        while not script.exists():  # the launcher then waits for the jobs: stopped below
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < end, "no sbatch call"
            time.sleep(0.5)
        time.sleep(0.5)
    finally:
        proc.kill()
        proc.wait()
    sbatch = script.read_text()
    for line in ("--array=0-1", "--partition=gpu", "--nodes=2", "--gpus-per-node=4", "--ntasks-per-node=4",
                 "--time=90", "--signal=USR2@120", "--job-name=eetrain-calm_t5"):
        assert f"#SBATCH {line}" in sbatch, line
    assert "srun" in sbatch and "submitit.core._submit" in sbatch


def test_a_failing_sweep_job_does_not_stop_the_others(tmp_path):
    """`-m` with Hydra's own launcher: job #0's bad input is reported with its overrides, job #1 still runs,
    and the sweep exits 2 naming the failed job."""
    from tests.in_process import cli

    data = tiny_runs.write_data(tmp_path / "data", train=8)
    r = cli("-m", *tiny_runs.TINY, *data, "data.batch_size=4", "trainer.max_steps=1", "export=false",
            "exits.min_layer=9,1", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path, threads=1)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "eetrain: error: sweep job #0 (exits.min_layer=9): exits.min_layer=9" in r.stderr
    assert "eetrain: error: 1 sweep job(s) stopped on bad input: #0 (exits.min_layer=9)" in r.stderr
    assert "Traceback" not in r.stderr
    assert (tmp_path / "sweep" / "1" / "checkpoints" / "last.ckpt").exists()  # job #1 ran to the end
    assert not (tmp_path / "sweep" / "0" / "checkpoints").exists()
