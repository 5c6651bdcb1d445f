"""Hydra composition of every shipped config, and the CLI's handling of bad input."""

import subprocess
import sys
from pathlib import Path
from typing import Literal  # noqa: F401 - named by _target's annotation

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from eetrain.config import CONF_DIR, compose
from tests import in_process

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def cli(*args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python -m eetrain *args` in a new interpreter (tests.in_process.cli runs the same entry in this one)."""
    return subprocess.run(
        [sys.executable, "-m", "eetrain", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    cfg = compose([f"+experiment={experiment}"], return_hydra_config=True)
    # no shipped value trips the type check of its target's signature
    assert {"model", "data", "loss", "optimizer", "trainer"} <= set(_type_checked(cfg))
    OmegaConf.resolve(cfg.loss)
    assert cfg.task_name == experiment or experiment in cfg.task_name
    for group in ("model", "data", "loss", "optimizer", "trainer"):
        assert "_target_" in cfg[group], group
    loss = instantiate(cfg.loss)
    assert loss.terms


def _type_checked(node, key=""):
    """`check_types` on every `_target_` node under `node`, nested ones too; returns their keys."""
    from omegaconf import DictConfig

    from eetrain.config import check_types

    if not isinstance(node, DictConfig):
        return []
    check_types(node, key)
    checked = [key] if "_target_" in node else []
    for k in node:
        if not OmegaConf.is_interpolation(node, k) and not OmegaConf.is_missing(node, k):
            checked += _type_checked(node[k], f"{key}.{k}" if key else k)
    return checked


@pytest.mark.parametrize("group", ["model", "data", "loss", "optimizer", "trainer", "logger", "callbacks"])
def test_every_group_option_composes(group):
    for option in sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")):
        cfg = compose([f"{group}={option}"], return_hydra_config=True)
        if cfg[group] is not None:
            OmegaConf.to_container(cfg[group], resolve=False)
            _type_checked(cfg[group], group)


def test_demo_is_the_tiny_t5_on_shipped_data():
    cfg = compose(["+experiment=demo"], return_hydra_config=True)
    assert cfg.model._target_.endswith("T5Backbone") and cfg.model.name_or_path is None
    assert Path(cfg.data.files.train).exists()
    assert cfg.loss.terms.ce.weights == "calm"
    assert cfg.trainer.accelerator == "cpu"


def test_calm_t5_is_the_real_recipe():
    cfg = compose(["+experiment=calm_t5"], return_hydra_config=True)
    assert cfg.model.name_or_path == "google-t5/t5-large"
    assert cfg.data.hf_name == "abisee/cnn_dailymail" and cfg.data.hf_config == "3.0.0"
    assert cfg.data.max_target_length == 128 and cfg.optimizer.lr == 1e-4


def test_unknown_experiment_lists_available(tmp_path):
    r = in_process.cli("+experiment=no_such_experiment", cwd=tmp_path)
    assert r.returncode == 2  # Hydra's own report of a bad command line, with eetrain's exit code
    assert "Available options in 'experiment'" in r.stderr
    for name in EXPERIMENTS:
        assert name in r.stderr


def test_composition_errors_exit_2_under_a_debugger_too(tmp_path, monkeypatch):
    # under a debugger or coverage (a trace function set) Hydra raises its composition errors instead of
    # reporting them and exiting 1: still one message and eetrain's exit code
    import hydra._internal.utils

    monkeypatch.setattr(hydra._internal.utils, "is_under_debugger", lambda: True)
    r = in_process.cli("loss=no_such_loss", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("eetrain: error: In 'config': Could not find 'loss/no_such_loss'")
    assert "Traceback" not in r.stderr and "calm" in r.stderr
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # asked for the traceback: Hydra's exception as it is
    r = in_process.cli("loss=no_such_loss", cwd=tmp_path)
    assert r.returncode == 1 and "MissingConfigException" in r.stderr


def test_unknown_group_option_and_key(tmp_path):
    r = in_process.cli("loss=no_such_loss", cwd=tmp_path)
    assert r.returncode == 2 and "Available options in 'loss'" in r.stderr and "calm" in r.stderr
    r = in_process.cli("+experiment=demo", "trainer.no_such_key=1", cwd=tmp_path)
    assert r.returncode == 2 and "Could not override 'trainer.no_such_key'" in r.stderr
    # then the keys the parent has and the closest one (Hydra names the bad key only)
    r = in_process.cli("+experiment=demo", "optimizer.lrr=1e-3", cwd=tmp_path)
    assert r.returncode == 2 and "eetrain: error: optimizer.lrr: no such key (did you mean optimizer.lr?); optimizer " \
                                 "has: _partial_, _target_, lr, weight_decay (a new key is added with +optimizer.lrr=" in r.stderr
    r = in_process.cli("+experiment=demo", "loss.terms.cee.weights=uniform", cwd=tmp_path)
    assert r.returncode == 2 and "eetrain: error: loss.terms.cee: no such key (did you mean loss.terms.ce?); " \
                                 "loss.terms has: ce" in r.stderr
    r = in_process.cli("+experiment=demo", "trainer.max_epochs=[", cwd=tmp_path)  # override syntax
    assert r.returncode == 2 and "'trainer.max_epochs=[' is not a valid override: " in r.stderr
    r = in_process.cli("+experiment=demo", "-m", "--cfg", "job", cwd=tmp_path)  # Hydra's flags, checked by Hydra
    assert r.returncode == 2 and "eetrain: error: Only one of --run, --multirun, --cfg" in r.stderr


def test_cfg_job_prints_composed_config(tmp_path):
    r = in_process.cli("+experiment=demo", "--cfg", "job", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    cfg = OmegaConf.create(r.stdout)
    assert cfg.task_name == "demo" and cfg.loss.terms.ce.weights == "calm"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["loss.terms.ce.weights=[0.5,0.5]"], "loss.terms.ce.weights has 2 values but there are 4 exit layers"),
        (["loss.terms.ce.weights=[1,-1,1,1]"], "loss.terms.ce.weights=[1.0, -1.0, 1.0, 1.0]: weights must be finite, >= 0"),
        (["exits.layers=[2,9]"], "exits.layers=[2, 9]: [9] outside 1..4"),
        (["data.source_column=article"], "no column data.source_column='article'"),
        (["model.tokenizer=null", "model.config=null", "model.name_or_path=./no/such/model"],
         "model.name_or_path='./no/such/model': no such file or directory"),
        # model and data of different kinds stop before any data loads
        (["model=bert_tiny"], "data (Text2TextDataModule) gives each example a target text, and the bert adapter "
                              "classifies whole sequences: use a GLUE data config"),
        (["data=demo_classification"], "data (DemoStoryClassification) labels each example with a class or a score, "
                                       "and the t5 adapter has a token head"),
        (["data=text"], "data (PackedTextDataModule) packs plain text for a decoder-only model (no source), and the "
                        "t5 adapter is an encoder-decoder"),
        (["model=bert_tiny", "data=demo_classification", "stages=[curve]"],
         "stages=[curve] decodes text: it needs a token head (T5, LLaMA); the bert adapter predicts one label"),
        (["model=bert_tiny", "data=demo_classification", "stages=[generate]"],
         "stages=[generate] decodes text: it needs a token head"),
        # what the targets' constructors take and reject, named by the full key
        (["+loss.terms.ce.bogus_key=1"], "loss.terms.ce.bogus_key is not a setting of eetrain.losses.joint."
                                          "ExitCrossEntropy; allowed: weights, layers, min_layer"),
        (["+loss/terms@loss.terms.kd=kd"], "loss.terms.kd.shallow_layer is not set (??? in the config)"),
        (["loss.terms.ce.label_smoothing=1.5"], "loss.terms.ce.label_smoothing=1.5; allowed: a number in [0, 1)"),
        (["loss=layerskip", "loss.layer_dropout.seed=abc"], "loss.layer_dropout.seed='abc' must be an integer"),
        (["+optimizer.betas=[0.9]"], "optimizer: list index out of range (the optimizer's settings: "),
        (["optimizer.weight_decay=-1"], "optimizer: Invalid weight_decay value: -1"),
        # a key the optimizer does not take: its own names (not the settings given, typo included)
        (["+optimizer.lrr=1e-3"], "optimizer: AdamW takes no lrr; allowed: lr, betas, eps, weight_decay, amsgrad"),
        (["scheduler.name=zigzag"], "scheduler.name='zigzag'; allowed: linear, cosine"),
        (["scheduler.name=warmup_stable_decay"], "scheduler.name='warmup_stable_decay'; allowed: linear, cosine"),
        (["scheduler.warmup_ratio=1.5"], "scheduler.warmup_ratio=1.5; allowed: a number in [0, 1)"),
        (["exits.train_below_min=maybe"], "exits.train_below_min='maybe'; allowed: true or false"),
        (["trainer.max_epochs=-5"], "trainer: `max_epochs` must be a non-negative integer or -1"),
        (["trainer.val_check_interval=0"], "trainer.val_check_interval=0; allowed: a fraction of an epoch in (0, 1]"),
        (["trainer.check_val_every_n_epoch=0"], "trainer.check_val_every_n_epoch=0; allowed: null"),
        (["+trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0; allowed: an integer >= 1"),
        # a plain value against the type its target's signature declares (Lightning's Trainer takes any),
        # after the target's own checks
        (["trainer.max_epochs=abc"], "trainer.max_epochs='abc'; allowed: int | null (lightning.pytorch.Trainer's"),
        (["trainer.precision=17"], "trainer.precision=17; allowed: 64 | 32 | 16 | 'transformer-engine'"),
        (["data.num_workers=abc"], "data.num_workers='abc'; allowed: an integer >= 0"),
        (["data.eval_batch_size=0"], "data.eval_batch_size=0; allowed: null (data.batch_size) or an integer >= 1"),
        (["model.config.num_layers=0"], "model.config.num_layers=0 must be an integer >= 1"),
        (["data.max_source_length=2.5"], "data.max_source_length=2.5 must be an integer >= 1 (tokens)"),
        (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1; allowed: null or 0 (no clipping)"),
        (["optimizer.weight_decay=abc"], "optimizer.weight_decay='abc'; allowed: float (torch.optim.AdamW's"),
        (["seed=-1"], "seed=-1; allowed: an integer in 0..4294967295"),
        (["seed=abc"], "seed='abc'; allowed: an integer in 0..4294967295"),
        ([f"ckpt_path={Path(__file__).parent}"], "is a directory but not a sharded (DeepSpeed / FSDP) checkpoint"),
        (["ckpt_path=best"], "ckpt_path=best is Lightning's best checkpoint of the fit under way, which a new run"),
        (["ckpt_path=last"], "/checkpoints/last.ckpt (this run's new directory); resume from a file (ckpt_path=<run>/c"),
        (["ckpt_path=hpc"], "/hpc_ckpt_*.ckpt (this run's new directory); resume from a file"),
        (["callbacks.model_checkpoint.monitor=val/nonexistent", "trainer.limit_train_batches=2",
          "trainer.limit_val_batches=1", "trainer.max_epochs=1", "callbacks.generation_metrics=null"],
         "callbacks.model_checkpoint.monitor='val/nonexistent': validation logs no such metric; it logs ['val/ce', "),
        (["callbacks.model_checkpoint.monitor=train/nonexistent", "trainer.limit_train_batches=2",  # Lightning's own
          "trainer.limit_val_batches=1", "trainer.max_epochs=1", "callbacks.generation_metrics=null"],
         "callbacks.model_checkpoint.monitor: `ModelCheckpoint(monitor='train/nonexistent')` could not find the "
         "monitored key"),
        (["+scheduler.bogus=1"], "scheduler: unknown key(s) ['bogus']; allowed: ['name', 'warmup_ratio', 'warmup_steps']"),
        (["model.lora=[q,v]"], "model.lora=['q', 'v'] must be a mapping of peft LoraConfig arguments"),
        (["model.config.num_decoder_layers=0"], "model.config.num_decoder_layers=0 must be an integer >= 1"),
        (["model.exit_head_layers=[1,2]"], "model.exit_head_layers=[1, 2] chooses per-layer exit heads, but "
                                           "model.exit_head=null (here: shared) gives every exit the model's own head"),
        (["model.exit_head_layers=last"], "model.exit_head_layers=last chooses per-layer exit heads"),
        (["stages=[policies]", "exit.calibration.online=true", "decoding.strategy=self_speculative"],
         "exit.calibration.online=true decodes with exit policies, and decoding.strategy=self_speculative takes none"),
        (["+model.config.num_layer=4"], "model.config.num_layer: not a T5Config setting, so nothing would read it "
                                        "(did you mean num_layers"),
        (["model.config.feed_forward_proj=bogus"], "model.config: a T5Config with these settings does not build "
                                                     "(KeyError: 'bogus'); check model.config.*"),
        (["model=llama_tiny", "model.config.num_key_value_heads=3"],
         "model.config.num_key_value_heads=3 must divide num_attention_heads=4"),
        (["model=bert_tiny", "data=demo_classification", "model.config.max_position_embeddings=16"],
         "data.max_length=128 is longer than the bert model's 16 positions (model.config.max_position_embeddings)"),
        (["+exits.foo=1"], "exits: unknown key(s) ['foo']; allowed: ['layers', 'min_layer', 'train_below_min']"),
        # keys nothing reads under exit (the run used the defaults unsaid)
        (["stages=[policies]", "+exit.foo=1"], "exit: unknown key(s) ['foo']; allowed: ['calibration', 'classifiers', "),
        (["stages=[policies]", "+exit.calibration.alpha=0.05"],
         "exit.calibration: unknown key(s) ['alpha']; allowed: ['calibration_fraction', 'candidates', 'delta', "),
        (["stages=[exit_classifiers]", "+exit.classifiers.hidden=8"],
         "exit.classifiers: unknown key(s) ['hidden']; allowed: ['batch_size', 'calm_hidden', "),
        # an interpolation that does not resolve: one line naming its key (it ended in tracebacks)
        (["optimizer.lr=${oc.env:EETRAIN_NO_SUCH_VARIABLE}"], "optimizer.lr=${oc.env:EETRAIN_NO_SUCH_VARIABLE}: "
                                                              "KeyError raised while resolving interpolation: "
                                                              "\"Environment variable 'EETRAIN_NO_SUCH_VARIABLE' not found\""),
        (["trainer.max_steps=${nope}"], "trainer.max_steps=${nope}: Interpolation key 'nope' not found"),
        (["tags=foo"], "tags='foo'; allowed: a list of strings, e.g. tags=[foo]"),  # W&B read it as f, o, o
        (["tags=5"], "tags=5; allowed: a list of strings"),
        (["train=maybe"], "train='maybe'; allowed: true or false"),
        (["stages=policies"], "stages='policies'; allowed: a list of stages, e.g. stages=[policies]"),
        (["loss.terms.ce.curriculum=rotational"], "loss.terms.ce.curriculum='rotational'; allowed: null or a mapping"),
        (["+loss.layer_dropout=0.2"], "loss.layer_dropout=0.2; allowed: null or a mapping {p_max: P}"),
        (["loss=layerskip", "loss.layer_dropout.p_max=true"], "loss.layer_dropout.p_max=True must be within [0, 1]"),
        (["loss.terms.ce.weights=[1,1,1,inf]"], "weights must be finite, >= 0 and not all zero"),
        (["scheduler.name=greedy"], "scheduler.name='greedy'; allowed: linear"),
        (["trainer.max_steps=-1", "trainer.max_epochs=-1", "trainer.limit_train_batches=2"],
         "scheduler.name='linear' spreads over the run's steps, and this run is unbounded"),
        (["stages=[exit_classifiers]", "exit.classifiers.weight_decay=-1"],
         "exit.classifiers.weight_decay=-1; allowed: a finite number >= 0"),
        (["stages=[exit_classifiers]", "exit.classifiers.lr=inf"], "exit.classifiers.lr=inf; allowed: a finite number > 0"),
        (["stages=[policies]", "exit.calibration.online=maybe"], "exit.calibration.online='maybe'; allowed: true or false"),
        (["stages=[policies]", "exit.classifiers.dir=/nonexistent/classifiers"],
         "exit.classifiers.dir='/nonexistent/classifiers': no such directory"),
        # an interval in steps that a small dataset's epoch does not reach (Lightning checks it once loaded)
        (["trainer.val_check_interval=2000", "trainer.limit_train_batches=2", "trainer.enable_progress_bar=false"],
         "trainer.val_check_interval=2000: more steps than an epoch has training batches (2); set a smaller"),
    ],
)
def test_bad_input_one_clear_message(tmp_path, overrides, message):
    r = in_process.cli("+experiment=demo", "logger=none", *overrides, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_a_bad_progress_mode_in_the_environment_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("EETRAIN_PROGRESS", "verbose")  # (it crashed after training, in the stages' bars)
    r = in_process.cli("+experiment=demo", "logger=none", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "the environment variable EETRAIN_PROGRESS='verbose'; allowed: auto, rich, lines, off" in r.stderr
    assert not (tmp_path / "outputs").exists() or not list(tmp_path.glob("outputs/**/*.ckpt"))


def test_a_fresh_run_into_another_run_s_directory_is_refused(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"another run's")
    r = in_process.cli("+experiment=demo", "logger=none", f"hydra.run.dir={run}", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (f"hydra.run.dir={run} already holds a run (checkpoints/last.ckpt): resume it with "
            f"ckpt_path={run}/checkpoints/last.ckpt, or start this one in another hydra.run.dir") in r.stderr
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == b"another run's"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    (run / "checkpoints" / "last.ckpt").unlink()
    (run / "csv" / "version_0").mkdir(parents=True)
    (run / "csv" / "version_0" / "metrics.csv").write_text("step,train/loss\n0,1.0\n")
    r = in_process.cli("+experiment=demo", "logger=none", f"hydra.run.dir={run}", cwd=tmp_path)
    assert r.returncode == 2 and "already holds a run (csv/version_0/metrics.csv)" in r.stderr


def test_wandb_without_a_key_says_how_to_log_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))  # no stored login
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    # a process of its own: W&B keeps its settings (offline, from other tests) for the life of a process
    r = cli("+experiment=demo", "logger=wandb", "export=false", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "logger=wandb: " in r.stderr and "Or log offline: WANDB_MODE=offline" in r.stderr
    assert "Traceback" not in r.stderr


def test_reduce_lr_on_plateau_steps_on_the_validation_loss(tmp_path):
    r = in_process.cli("+experiment=demo", "logger=none", "scheduler.name=reduce_lr_on_plateau", "export=false",
                       "trainer.max_epochs=2", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                       f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("experiment", ["generate", "evaluate", "curve", "analyze"])
def test_an_experiment_on_an_export_says_when_none_is_given(tmp_path, experiment):
    # `name_or_path: ???` merged over the model group's null stays null: say the key is not set
    r = in_process.cli(f"+experiment={experiment}", cwd=tmp_path, timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "model.name_or_path is not set: point it at a run's export" in r.stderr and "Traceback" not in r.stderr


def test_calm_t5_offline_stops_at_once(tmp_path):
    r = in_process.cli("+experiment=calm_t5", cwd=tmp_path, timeout=60)
    assert r.returncode == 2
    assert "hub is unreachable" in r.stderr and "model.name_or_path" in r.stderr
    assert "Traceback" not in r.stderr


def _target(count: int, rate: float, name: str | None = None, mode: "Literal['a', 'b']" = "a",  # noqa: F821
            flag: bool = False, where: Path | None = None, anything: "NotImportable" = None) -> None:  # noqa: F821
    """A target for `check_types` (a string annotation naming nothing importable is not checked)."""


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(count=3, rate=2, name="x", mode="b", flag=True, where="/tmp", anything="?"), None),
        (dict(count=3, rate=0.5, name=None), None),  # null: the target's default, not checked
        (dict(count=3.0, rate=0.5), "t.count=3.0; allowed: int (tests.test_config._target's count)"),
        (dict(count=True, rate=0.5), "t.count=True; allowed: int"),  # a bool is not a count
        (dict(count=3, rate="fast"), "t.rate='fast'; allowed: float"),
        (dict(count=3, rate=1.0, mode="c"), "t.mode='c'; allowed: 'a' | 'b'"),
        (dict(count=3, rate=1.0, flag="yes"), "t.flag='yes'; allowed: bool"),
        (dict(count=3, rate=1.0, where=5), "t.where=5; allowed: Path | null"),
        (dict(count=3, rate=1.0, name=5), None),  # a number where text goes: the target may format it
    ],
)
def test_check_types_against_the_target_s_signature(values, message):
    from eetrain.config import check_types
    from eetrain.errors import ConfigError

    node = OmegaConf.create({"_target_": "tests.test_config._target", **values})
    if message is None:
        check_types(node, "t")
    else:
        with pytest.raises(ConfigError) as e:
            check_types(node, "t")
        assert str(e.value).startswith(message)
    check_types(OmegaConf.create({"_target_": "tests.test_config._target", "count": "${x}", "x": 1}), "t")
    check_types(OmegaConf.create({"_target_": "tests.test_config._target", "count": "???"}), "t")

