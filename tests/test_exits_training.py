"""Second stage: exit classifiers trained on a frozen backbone (eetrain.exits.training)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from eetrain.config import compose
from eetrain.errors import ConfigError
from eetrain.exits.classifiers import load_classifier, save_classifier
from eetrain.exits.evaluation import load_classifiers
from eetrain.exits.measures import ExitRecords
from eetrain.exits.settings import classifier_settings
from eetrain.exits.training import (
    ExitClassifierModule,
    make_classifier,
    records_dataset,
    train_exit_classifier,
    training_layers,
)
from tests.conftest import examples, make_backbone

KINDS = ["calm", "three_state_mlp", "lstm"]


@pytest.fixture(autouse=True)
def _one_thread():
    # the classifiers' ops are tiny: a second OpenMP thread only adds synchronisation, and on a
    # shared 2-core machine a spinning second thread makes a small LSTM ~10x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _small(kind: str, d: int):
    return make_classifier(kind, d, lstm_hidden_size=16, lstm_num_layers=1)


def _synthetic(n: int = 512, num_layers: int = 5, d: int = 8, seed: int = 0) -> ExitRecords:
    """Layer i agrees with the last layer iff h_i[0] > 0 (learnable from h_i alone)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_layers, n, d, generator=gen)
    agree = hidden[..., 0] > 0
    agree[-1] = True
    final = torch.randint(0, 7, (n,), generator=gen)
    preds = torch.where(agree, final, (final + 1) % 7)
    return ExitRecords(hidden=hidden, predictions=preds, sequence_ids=torch.arange(n))


def test_targets_compare_with_the_last_layer_not_the_one_before():
    # L = 4 layers, 3 tokens; the last layer's argmax is [5, 7, 9], layer 3's is [5, 2, 9]
    preds = torch.tensor([[1, 2, 3], [5, 2, 3], [5, 2, 9], [5, 7, 9]])
    rec = ExitRecords(hidden=torch.zeros(4, 3, 2), predictions=preds)
    hidden, targets = records_dataset(rec).tensors
    assert hidden.shape == (3, 4, 2)
    # targets (N, L): token 1 agrees with layer 4 at layers 2, 3, 4 only; token 2 only at layer 4
    # (an L-1 reference would mark token 2 as agreeing at layers 1-3); token 3 at layers 3 and 4
    assert targets.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 1, 1]]


def test_held_out_sequences_leave_one_to_train_on():
    from eetrain.exits.training import _split

    records = _synthetic(n=5)  # 5 sequences of one token
    train, val = _split(records, 0.95, seed=0)  # round(4.75) = 5 held out: training had 0 tokens and crashed
    assert train.num_tokens == 1 and val.num_tokens == 4
    train, val = _split(records, 0.2, seed=0)
    assert train.num_tokens == 4 and val.num_tokens == 1


def test_training_layers():
    assert training_layers(8, 4) == (4, 5, 6, 7)
    assert training_layers(3, 1) == (1, 2)
    assert training_layers(8, 4, exit_points=(2, 4, 6, 8)) == (4, 6)
    assert training_layers(8, 4, exit_points=(6, 8)) == (6,)  # FREE's shallow exit
    with pytest.raises(ValueError, match="minimum exit layer in 1..3"):
        training_layers(4, 4)


@pytest.mark.parametrize("kind", KINDS)
def test_each_classifier_learns_and_round_trips_exactly(kind, tmp_path):
    rec = _synthetic()
    clf = _small(kind, 8)
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    metrics = train_exit_classifier(
        clf, rec, layers=(2, 3, 4), epochs=6, batch_size=64, lr=1e-2, val_records=_synthetic(seed=1)
    )
    assert metrics["val/balanced_acc"] > 0.8, metrics  # chance: 0.5
    assert any(not torch.equal(before[k], v) for k, v in clf.state_dict().items())
    path = tmp_path / f"{kind}.pt"
    save_classifier(clf, path)
    back = load_classifier(path, expected_hidden_size=8)
    assert type(back) is type(clf) and back.config == clf.config
    state, loaded = clf.state_dict(), back.state_dict()
    assert state.keys() == loaded.keys()
    biases = [k for k in state if "bias" in k]
    assert biases, "every exit classifier has biases"
    for key in state:
        assert torch.equal(state[key], loaded[key]), key
    assert any(bool(state[k].abs().sum() > 0) for k in biases)  # trained biases, not zeros
    h = torch.randn(5, 3, 8)
    assert torch.equal(clf.record_logits(h), back.record_logits(h))


def test_module_optimizes_only_the_classifier_and_keeps_the_backbone_frozen(tmp_path):
    bb = make_backbone("t5")
    bb.train()
    frozen = {k: v.clone() for k, v in bb.state_dict().items()}
    clf = _small("three_state_mlp", bb.hidden_size)
    module = ExitClassifierModule(clf, layers=(1, 2), lr=1e-2, backbone=bb)
    opt = module.configure_optimizers()
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in clf.parameters()}
    assert not any(p.requires_grad for p in bb.parameters())
    seen_modes = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen_modes.append((pl_module.backbone.training, pl_module.classifier.training))

    loader = torch.utils.data.DataLoader(examples(), batch_size=2, collate_fn=bb.collate)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[Spy()])
    trainer.fit(module, train_dataloaders=loader)
    assert seen_modes == [(False, True), (False, True)]  # backbone in eval mode, classifier training
    for key, value in bb.state_dict().items():
        assert torch.equal(value, frozen[key]), key


def test_text_batches_give_the_same_targets_as_records():
    bb = make_backbone("t5")
    from eetrain.exits.record import record_exits

    loader = torch.utils.data.DataLoader(examples(), batch_size=2, collate_fn=bb.collate)
    rec = record_exits(bb, loader)
    module = ExitClassifierModule(_small("calm", bb.hidden_size), layers=(1, 2), backbone=bb)
    hidden, targets = module._states(next(iter(loader)))
    ds_hidden, ds_targets = records_dataset(rec).tensors
    assert torch.allclose(hidden, ds_hidden.transpose(0, 1))
    assert torch.equal(targets, ds_targets.transpose(0, 1))


def test_hidden_size_mismatch_is_a_config_error(tmp_path):
    save_classifier(make_classifier("calm", 16), tmp_path / "calm.pt")
    cfg = compose(["+experiment=mee_demo", f"exit.classifiers.dir={tmp_path}", "exit.classifiers.kinds=[calm]"])
    with pytest.raises(ConfigError, match=r"exit.classifiers.dir: .* hidden size 16 but the model has hidden size 32"):
        load_classifiers(classifier_settings(cfg), make_backbone("t5"), tmp_path, required=False)


def test_stage_trains_and_saves_every_kind(tmp_path):
    """The exit_classifiers stage on the shipped data with a tiny model (recording capped)."""
    from hydra.utils import instantiate

    from eetrain.exits.training import run_stage

    cfg = compose([
        "+experiment=mee_demo", "exit.min_exit_layer=2", "exit.classifiers.epochs=1",
        "exit.classifiers.max_train_tokens=600", "exit.classifiers.lstm_hidden_size=16",
        "trainer.enable_progress_bar=false",
    ])
    bb = make_backbone("t5")
    data = instantiate(cfg.data, tokenizer=bb.tokenizer, collate_fn=bb.collate)
    saved = run_stage(cfg, bb, data, tmp_path)
    assert sorted(saved) == sorted(KINDS)
    for kind, path in saved.items():
        assert path == tmp_path / "exit_classifiers" / f"{kind}.pt"
        assert load_classifier(path, expected_hidden_size=bb.hidden_size).kind == kind
        assert (tmp_path / "exit_classifiers" / "logs" / kind / "metrics.csv").exists()
    assert load_classifier(saved["lstm"]).config["hidden_size"] == 16
    assert load_classifier(saved["lstm"]).config["num_layers"] == 1  # MEE's one LSTM layer, the default
    assert all(load_classifier(p).features == "raw" for p in saved.values())  # exit.features default


def test_lstm_num_layers_default_is_meees_one_and_stays_an_option():
    assert classifier_settings(compose([])).lstm_num_layers == 1
    assert classifier_settings(compose(["exit.classifiers.lstm_num_layers=2"])).lstm_num_layers == 2
    assert make_classifier("lstm", 8).lstm.num_layers == 1
    assert make_classifier("lstm", 8, lstm_num_layers=2).lstm.num_layers == 2


def test_exit_features_setting_and_a_mismatched_classifier(tmp_path):
    from eetrain.exits.settings import feature_space

    assert feature_space(compose([])) == "raw"
    assert classifier_settings(compose(["exit.features=normed"])).features == "normed"
    with pytest.raises(ConfigError, match=r"exit.features='final'; allowed: raw \(residual states, CALM\) or normed"):
        feature_space(compose(["exit.features=final"]))
    save_classifier(make_classifier("calm", 32, features="normed"), tmp_path / "calm.pt")
    cfg = compose(["+experiment=mee_demo", f"exit.classifiers.dir={tmp_path}", "exit.classifiers.kinds=[calm]"])
    with pytest.raises(ConfigError, match=r"exit.features=raw: the calm classifier at .* was trained on normed "
                                          r"states; set exit.features=normed"):
        load_classifiers(classifier_settings(cfg), make_backbone("t5"), tmp_path, required=False)
    cfg = compose(["+experiment=mee_demo", f"exit.classifiers.dir={tmp_path}", "exit.classifiers.kinds=[calm]",
                   "exit.features=normed"])
    assert load_classifiers(classifier_settings(cfg), make_backbone("t5"), tmp_path, required=False)["calm"]


def test_stage_trains_on_normed_states_and_saves_the_space(tmp_path):
    from hydra.utils import instantiate

    from eetrain.exits.record import record_exits
    from eetrain.exits.training import run_stage

    cfg = compose([
        "+experiment=mee_demo", "exit.min_exit_layer=2", "exit.classifiers.epochs=1", "exit.features=normed",
        "exit.classifiers.max_train_tokens=200", "exit.classifiers.kinds=[calm]", "trainer.enable_progress_bar=false",
    ])
    bb = make_backbone("t5")
    data = instantiate(cfg.data, tokenizer=bb.tokenizer, collate_fn=bb.collate)
    saved = run_stage(cfg, bb, data, tmp_path)
    assert load_classifier(saved["calm"]).features == "normed"
    # text batches (no records) hand the classifier the same normed states as the records
    loader = torch.utils.data.DataLoader(examples(), batch_size=2, collate_fn=bb.collate)
    module = ExitClassifierModule(load_classifier(saved["calm"]), layers=(1, 2), backbone=bb)
    hidden, _ = module._states(next(iter(loader)))
    torch.testing.assert_close(hidden, record_exits(bb, loader, features="normed").hidden)
