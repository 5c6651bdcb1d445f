"""Sequence classification with per-sample early exit (`eetrain.classify`), the stage `classify`, the demo's
classification data and the BERT experiments (`bert_demo`, `pabee_bert`)."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from eetrain.__main__ import user_error
from eetrain.backbones import BertBackbone
from eetrain.classify import check_config, classify, classify_settings, classify_specs, run_stage
from eetrain.config import compose
from eetrain.data.make_demo import DEMO_DIR, STORY_LABELS, story_label
from eetrain.decoding.decisions import ScheduledExits
from eetrain.errors import ConfigError, DataError
from eetrain.exits.policy import ExitPolicy, exit_layers
from eetrain.exits.record import record_exits
from tests.conftest import TINY, TOKENIZER, make_backbone
from tests.in_process import cli
from tests.test_train_e2e import SHORT

LAYERS = 6


def sharp(exit_head: str = "shared") -> BertBackbone:
    """A 6-layer tiny BERT whose predictions and confidences change from layer to layer (larger init)."""
    bb = BertBackbone(config={**TINY["bert"], "num_hidden_layers": LAYERS, "initializer_range": 0.3},
                      tokenizer=TOKENIZER, seed=0, exit_head=exit_head)
    if exit_head == "per_layer":  # each exit's own head, different from the final one
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for head in bb.exit_heads.values():
                head.proj.weight.add_(0.5 * torch.randn(head.proj.weight.shape, generator=g))
    return bb.eval()


def batch_of(bb: BertBackbone, lengths=(5, 13, 3, 9, 12, 4, 11, 6, 2, 8, 7, 10), seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    rows = [{"source_ids": torch.randint(3, 400, (n,), generator=g).tolist(), "label": i % 3}
            for i, n in enumerate(lengths)]
    return bb.collate(rows)


POLICIES = [
    ExitPolicy("patience", None, min_exit_layer=1, measure_kwargs={"patience": 1}),
    ExitPolicy("patience", None, min_exit_layer=3, measure_kwargs={"patience": 2}),
    ExitPolicy("entropy", -0.7, min_exit_layer=1),
    ExitPolicy("softmax_max", 0.6, min_exit_layer=2),
    ExitPolicy("softmax_gap", 0.3, min_exit_layer=1, exit_points=(2, 4, 6)),
    ExitPolicy("normalized_entropy", 0.3, min_exit_layer=1),
    ExitPolicy("hidden_saturation", 0.9, min_exit_layer=2),
    ExitPolicy("monotonic", None, min_exit_layer=1, measure_kwargs={"min_confidence": 0.5}),
]


# --- classify: exactness ------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_mode", ["gather", "ride_along"])
def test_never_exiting_equals_the_full_model(batch_mode):
    bb = sharp()
    batch = batch_of(bb)
    out = classify(bb, batch, None, batch_mode)
    with torch.no_grad():
        want = bb.model_logits(batch)
    assert torch.allclose(out.logits, want, atol=1e-5)
    assert torch.equal(out.predictions, want.argmax(-1))
    assert out.exit_layers.tolist() == [LAYERS] * 12 and out.row_layers == 12 * LAYERS
    assert out.decision_seconds == 0.0 and out.seconds >= out.layer_seconds > 0
    # a policy whose threshold is never met: the same logits, decided at every layer
    never = classify(bb, batch, ExitPolicy("softmax_max", 1.0, min_exit_layer=1), batch_mode)
    assert torch.allclose(never.logits, want, atol=1e-5) and never.exit_layers.eq(LAYERS).all()
    assert never.decision_seconds > 0


def truncated(bb: BertBackbone, k: int) -> nn.Module:
    """The wrapped model with only its first k encoder layers: pooler and classifier on layer k."""
    model = copy.deepcopy(bb.model)
    model.bert.encoder.layer = model.bert.encoder.layer[:k]
    return model.eval()


@pytest.mark.parametrize("k", range(1, LAYERS + 1))
def test_fixed_exit_layer_equals_the_truncated_model(k):
    bb = sharp()
    batch = batch_of(bb)
    out = classify(bb, batch, ScheduledExits(f"fixed:{k}", LAYERS))
    with torch.no_grad():
        want = truncated(bb, k)(**bb.model_inputs(batch)).logits
    assert torch.allclose(out.logits, want, atol=1e-5)
    assert out.exit_layers.eq(k).all() and out.row_layers == 12 * k  # nothing ran past layer k


def test_fixed_exit_uses_that_layers_own_head():
    bb = sharp("per_layer")
    batch = batch_of(bb)
    with torch.no_grad():
        states = bb(batch)
    for k in (2, 5, LAYERS):
        out = classify(bb, batch, ScheduledExits(f"fixed:{k}", LAYERS))
        assert torch.allclose(out.logits, bb.exit_logits(states.hidden[k - 1], k), atol=1e-5)
    assert not torch.allclose(bb.exit_logits(states.hidden[1], 2), bb.exit_logits(states.hidden[1]), atol=1e-3)


@pytest.mark.parametrize("exit_head", ["shared", "per_layer"])
@pytest.mark.parametrize("batch_mode", ["gather", "ride_along"])
def test_decisions_equal_exit_layers_on_the_recorded_states(exit_head, batch_mode):
    bb = sharp(exit_head)
    batches = [batch_of(bb, seed=s) for s in range(3)]
    records = record_exits(bb, batches, keep_logits=True)
    spread = set()
    for policy in POLICIES:
        want = exit_layers(policy, records)
        outs = [classify(bb, b, policy, batch_mode) for b in batches]
        got = torch.cat([o.exit_layers for o in outs])
        assert got.tolist() == want.tolist(), policy
        # each row is answered by its exit layer's logits
        at_exit = records.logits[want - 1, torch.arange(want.shape[0])]
        assert torch.allclose(torch.cat([o.logits for o in outs]), at_exit, atol=1e-5), policy
        spread.update(want.tolist())
    assert len(spread) >= 4  # the policies exit at many different layers: a real test


def sharp_regression() -> BertBackbone:
    """`sharp()` with a regression head (num_labels=1, STS-B's): one score per row and layer."""
    config = {**TINY["bert"], "num_hidden_layers": LAYERS, "initializer_range": 0.3, "num_labels": 1}
    return BertBackbone(config=config, tokenizer=TOKENIZER, seed=0).eval()


@pytest.mark.parametrize("batch_mode", ["gather", "ride_along"])
def test_regression_decisions_equal_exit_layers_on_the_recorded_scores(batch_mode):
    bb = sharp_regression()
    batches = [batch_of(bb, seed=s) for s in range(3)]
    records = record_exits(bb, batches)  # a regression head: its (L, N, 1) scores, no summaries
    assert records.logits.shape == (LAYERS, 36, 1) and records.predictions is None
    steps = (records.logits[1:, :, 0] - records.logits[:-1, :, 0]).abs()
    tau = float(steps.median())  # half the layer-to-layer moves count as "unchanged"
    spread = set()
    for policy in (
        ExitPolicy("patience", None, min_exit_layer=1, measure_kwargs={"patience": 1, "tolerance": tau}),
        ExitPolicy("patience", None, min_exit_layer=2, measure_kwargs={"patience": 2, "tolerance": 2 * tau}),
        ExitPolicy("hidden_saturation", 0.9, min_exit_layer=2),
    ):
        want = exit_layers(policy, records)
        outs = [classify(bb, b, policy, batch_mode) for b in batches]
        assert torch.cat([o.exit_layers for o in outs]).tolist() == want.tolist(), policy
        # each row's prediction is its exit layer's score
        at_exit = records.logits[want - 1, torch.arange(want.shape[0]), 0]
        assert torch.allclose(torch.cat([o.predictions for o in outs]), at_exit, atol=1e-5), policy
        spread.update(want.tolist())
    assert len(spread) >= 3  # rows leave at several layers: a real test


class TableEncoder(nn.Module):
    """A stand-in encoder whose exit logits are a hand-written table: row r's state is its batch index,
    layers keep it, and `exit_logits(h, i)` is `table[i - 1, r]`. Shows classify's bookkeeping alone."""

    family, head_kind, regression = "table", "sequence", False

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table  # (L, B, C)
        self.num_layers = table.shape[0]

    def encode_embed(self, batch):
        rows = torch.arange(batch["input_ids"].shape[0], dtype=torch.float)
        return rows[:, None, None], None

    def encode_layer(self, layer, h, ctx):
        return h

    def encode_rows(self, h, ctx, keep):
        return h[keep], ctx

    def exit_logits(self, h, layer=None):
        return self.table[layer - 1, h[:, 0, 0].long()]


def test_patience_and_entropy_by_hand():
    # 5 layers, 4 rows, 2 classes; logits (a, 0) predict class 0 when a > 0
    signs = torch.tensor([
        [+1, +1, +1, +1, +1],   # stable from layer 1: patience 2 exits at layer 3
        [-1, +1, +1, +1, -1],   # changes at 2, then stable: exits at 4
        [+1, -1, +1, -1, +1],   # never stable: layer 5
        [-1, -1, +1, +1, +1],   # stable 1-2 (counter 1), changes at 3, then 3-4-5 stable: exits at 5
    ], dtype=torch.float).T  # (L, B)
    scale = torch.tensor([0.1, 0.5, 2.5, 5.0, 9.0])[:, None]  # confidence grows with depth
    table = torch.stack([signs * scale, torch.zeros_like(signs)], dim=-1)  # (L, B, 2)
    enc = TableEncoder(table)
    batch = {"input_ids": torch.zeros(4, 3, dtype=torch.long)}
    out = classify(enc, batch, ExitPolicy("patience", None, min_exit_layer=1, measure_kwargs={"patience": 2}))
    assert out.exit_layers.tolist() == [3, 4, 5, 5]
    assert out.predictions.tolist() == [0, 0, 0, 0]  # each row's prediction at its exit layer
    assert out.row_layers == 4 + 4 + 4 + 3 + 2  # rows stop being computed once they exit
    # DeeBERT's entropy: the binary entropy of softmax((a, 0)); H <= 0.3 nats needs |a| >= 2.2: layer 3
    out = classify(enc, batch, ExitPolicy("entropy", -0.3, min_exit_layer=1))
    assert out.exit_layers.tolist() == [3, 3, 3, 3]
    assert out.predictions.tolist() == [0, 0, 0, 0]
    out = classify(enc, batch, ExitPolicy("entropy", -0.3, min_exit_layer=4))
    assert out.exit_layers.tolist() == [4, 4, 4, 4] and out.predictions.tolist() == [0, 0, 1, 0]


@pytest.mark.parametrize("batch_mode", ["gather", "ride_along"])
def test_gathered_rows_equal_each_row_alone(batch_mode):
    bb = sharp()
    lengths = (5, 13, 3, 9, 12, 4, 11, 6)
    batch = batch_of(bb, lengths)
    policy = ExitPolicy("softmax_max", 0.7, min_exit_layer=1, exit_points=(1, 3, 4, 5, 6))
    out = classify(bb, batch, policy, batch_mode)
    assert len(set(out.exit_layers.tolist())) >= 3  # rows leave at different layers
    for r, n in enumerate(lengths):
        alone = {k: v[r : r + 1, :n] if v.dim() == 2 else v[r : r + 1] for k, v in batch.items()}
        one = classify(bb, alone, policy, batch_mode)
        assert one.exit_layers.item() == out.exit_layers[r].item()
        assert torch.allclose(one.logits[0], out.logits[r], atol=1e-5)
    if batch_mode == "gather":  # only running rows are computed
        assert out.row_layers == int(out.exit_layers.sum())
    else:  # every row rides along to the deepest exit
        assert out.row_layers == len(lengths) * int(out.exit_layers.max())


def test_encode_rows_cuts_trailing_padding():
    bb = sharp()
    batch = batch_of(bb, (5, 13, 3))
    with torch.no_grad():
        h, ctx = bb.encode_embed(batch)
        assert h.shape[:2] == (3, 13)
        h2, ctx2 = bb.encode_rows(h, ctx, torch.tensor([True, False, True]))
    assert h2.shape[:2] == (2, 5) and ctx2[0].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert torch.equal(h2[1, :3], h[2, :3])


def test_classify_refuses_token_heads_regression_policies_and_unknown_modes():
    with pytest.raises(ConfigError, match="classify needs a sequence-classification head"):
        classify(make_backbone("t5"), {"input_ids": torch.ones(1, 2, dtype=torch.long)})
    bb = sharp()
    batch = batch_of(bb)
    with pytest.raises(ConfigError, match=r"classify.batch_mode='fast'; allowed: gather, ride_along"):
        classify(bb, batch, None, "fast")
    reg = make_backbone("bert", num_labels=1)
    with pytest.raises(ConfigError, match=r"'entropy': needs class probabilities, and this head is a regression "
                                          r"\(num_labels=1\); on it use patience with kwargs.tolerance"):
        classify(reg, batch_of(reg), ExitPolicy("entropy", -0.1, min_exit_layer=1))
    with pytest.raises(ConfigError, match=r"'patience': needs class predictions \(argmax\), and this head is a "
                                          r"regression"):
        classify(reg, batch_of(reg), ExitPolicy("patience", None, min_exit_layer=1, measure_kwargs={"patience": 2}))
    with pytest.raises(ConfigError, match=r"kwargs.tolerance compares a regression head's scores, and this head "
                                          r"has 3 classes: drop the tolerance"):
        classify(bb, batch, ExitPolicy("patience", None, measure_kwargs={"patience": 2, "tolerance": 0.1}))
    out = classify(reg, batch_of(reg), ScheduledExits("fixed:2", 3))
    assert out.predictions.dtype == torch.float and out.predictions.shape == (12,)


# --- the demo's classification data ---------------------------------------------------------------------
def test_every_demo_summary_has_one_story_label():
    counts = dict.fromkeys(STORY_LABELS, 0)
    for split in ("train", "validation", "test"):
        for line in (DEMO_DIR / f"{split}.jsonl").read_text().splitlines():
            counts[story_label(json.loads(line)["target"])] += 1
    assert sum(counts.values()) == 5000 and min(counts.values()) > 200
    assert story_label("The fair planned in Oslo for Monday went ahead.") == "event_ahead"
    with pytest.raises(ValueError, match="no story template matches"):
        story_label("Something else happened.")


def test_demo_classification_data_module():
    cfg = compose(["model=bert_tiny", "data=demo_classification"])
    bb = instantiate(cfg.model)
    assert bb.model.config.num_labels == 8
    data = instantiate(cfg.data, tokenizer=bb.tokenizer, collate_fn=bb.collate)
    test = data.split_examples("test")
    assert len(test) == 500 and {e["label"] for e in test} == set(range(8))
    rows = [json.loads(line) for line in (DEMO_DIR / "test.jsonl").read_text().splitlines()]
    assert [STORY_LABELS[e["label"]] for e in test[:20]] == [story_label(r["target"]) for r in rows[:20]]
    batch = bb.collate(test[:4])
    assert batch["labels"].dtype == torch.long and batch["input_ids"].shape[0] == 4
    with pytest.raises(Exception) as info:  # Hydra wraps it; the CLI prints the ConfigError alone
        instantiate(cfg.data, tokenizer=bb.tokenizer, collate_fn=bb.collate, num_labels=2)
    assert isinstance(user_error(info.value), ConfigError)
    assert str(user_error(info.value)).startswith("data.num_labels=2: the demo stories have 8 classes (visit,")
    with pytest.raises(DataError, match=r"row 0: data.label_column='target': not a demo summary"):
        data.label("Nothing.", 0)


# --- stage `classify` -------------------------------------------------------------------------------------
def stage_cfg(*overrides: str):
    return compose(["model=bert_tiny", "data=demo_classification", "exit.min_exit_layer=1", "stages=[classify]",
                    "classify.max_examples=40", "classify.split=test", "classify.batch_size=16",
                    "exit.policies.patience.thresholds=[1,2]", "exit.policies.entropy.thresholds=[-1.0,-0.1]",
                    "exit.policies.softmax_max.thresholds=[0.1,0.9]", *overrides])


def test_stage_writes_layer_scores_and_accuracy_speed(tmp_path, capsys):
    cfg = stage_cfg("model.exit_head=per_layer", "classify.repeats=2")
    bb = instantiate(cfg.model)
    data = instantiate(cfg.data, tokenizer=bb.tokenizer, collate_fn=bb.collate)
    rows = run_stage(cfg, bb, data, tmp_path)
    layers = pd.read_csv(tmp_path / "layer_scores.csv")
    assert list(layers.layer) == [1, 2, 3, 4] and list(layers.columns) == ["layer", "accuracy", "agree_last"]
    assert layers.agree_last.iloc[-1] == 1.0
    table = pd.read_csv(tmp_path / "accuracy_speed.csv")
    assert list(table.policy) == ["full", "oracle"] + ["patience"] * 2 + ["entropy"] * 2 + ["softmax_max"] * 2
    for col in ("threshold", "mean_exit_layer", "expected_saving", "speedup", "normalized_latency", "consistency",
                "decision_fraction", "accuracy", "accuracy_ratio", "examples", "seconds"):
        assert col in table.columns, col
    full = table.iloc[0]
    assert full.speedup == 1.0 and full.mean_exit_layer == 4 and full.examples == 40
    patience = table[table.policy == "patience"]
    assert (patience.mean_exit_layer >= [2.0, 3.0]).all()  # patience P exits at layer P + 1 at the earliest
    assert (table.speedup.iloc[2:] > 0).all() and (table.consistency.iloc[2:] <= 1).all()
    # p_top1 >= 1/8 > 0.1 always: every row leaves at layer 1, as consistent as layer 1 is with the last
    low = table[(table.policy == "softmax_max") & (table.threshold == 0.1)].iloc[0]
    assert low.mean_exit_layer == 1.0 and low.consistency == pytest.approx(layers.agree_last.iloc[0])
    assert (tmp_path / "accuracy_speed.png").stat().st_size > 1000
    assert len(rows) == len(table)
    out = capsys.readouterr().out
    assert "Per-layer scores on test" in out and "Accuracy vs speed (accuracy;" in out


@pytest.mark.parametrize("overrides, message", [
    (["classify.policies=[vibes]"], r"classify.policies\[0\]='vibes'; allowed: labels of exit.policies"),
    (["exit.policies.entropy.thresholds=[0.5]"], r"exit.policies.entropy.thresholds\[0\]"),
    (["classify.batch_mode=fast"], r"classify.batch_mode='fast'; allowed: gather, ride_along"),
    (["+classify.speed=1"], r"classify: unknown key\(s\) \['speed'\]"),
    (["classify.max_examples=0"], r"classify.max_examples=0; allowed: null"),
    (["classify.repeats=0"], r"classify.repeats=0; allowed: an integer >= 1"),
    (["exit.min_exit_layer=9"], r"exit.min_exit_layer=9 exceeds the model depth"),
])
def test_stage_settings_name_the_key(overrides, message):
    cfg = stage_cfg(*overrides)
    with pytest.raises(ConfigError, match=message):
        classify_settings(cfg)
        check_config(cfg, make_backbone("bert", num_hidden_layers=4))


def test_stage_refuses_token_heads_and_regression_policies():
    with pytest.raises(ConfigError, match="classify needs a sequence-classification head"):
        check_config(stage_cfg(), make_backbone("t5"))
    reg = make_backbone("bert", num_labels=1)
    with pytest.raises(ConfigError, match=r"classify.policies\[0\]='patience' \(exit.policies.patience\): needs "
                                          r"class predictions \(argmax\), and this head is a regression"):
        check_config(stage_cfg(), reg)
    with pytest.raises(ConfigError, match=r"classify.policies\[0\]='entropy' \(exit.policies.entropy\): needs "
                                          r"class probabilities.*or set classify.policies=\[\] for the per-layer"):
        check_config(stage_cfg("classify.policies=[entropy]"), reg)
    with pytest.raises(ConfigError, match=r"classify.policies\[0\]='classifier:calm': an exit classifier learns"):
        check_config(stage_cfg("classify.policies=[classifier:calm]"), reg)
    with pytest.raises(ConfigError, match=r"classify.policies\[0\]='patience_regression' "
                                          r"\(exit.policies.patience_regression\): kwargs.tolerance compares"):
        check_config(stage_cfg(*REGRESSION_PATIENCE), make_backbone("bert", num_hidden_layers=4))
    with pytest.raises(ConfigError, match=r"tolerance must be a number > 0"):
        check_config(stage_cfg(*REGRESSION_PATIENCE, "exit.policies.patience_regression.kwargs.tolerance=0"), reg)
    check_config(stage_cfg("classify.policies=[]"), reg)
    check_config(stage_cfg(*REGRESSION_PATIENCE), reg)


REGRESSION_PATIENCE = ("+exit.policies.patience_regression={measure: patience, kwargs: {tolerance: 0.05}, "
                       "thresholds: [1, 2]}", "classify.policies=[patience_regression]")


def test_stage_on_a_regression_head_sweeps_pabee_regression_patience(tmp_path, capsys):
    """STS-B's shape (sentence pairs, a float score, Pearson / Spearman) from local files, classified with
    PABEE's regression rule: the per-layer scores and the accuracy-vs-speed table."""
    from tests.test_task_data import PAIRS, local

    rows = [{**PAIRS[i % 3], "label": float(i % 6) * 0.8, "idx": i} for i in range(24)]
    cfg = local(tmp_path, "glue_stsb", rows, "stages=[classify]", "classify.batch_size=8", "exit.min_exit_layer=1",
                *REGRESSION_PATIENCE, model="bert_tiny", splits=("train", "validation"))
    bb = instantiate(cfg.model)
    assert bb.regression
    data = instantiate(cfg.data, tokenizer=bb.tokenizer, collate_fn=bb.collate)
    table_rows = run_stage(cfg, bb, data, tmp_path / "out")
    layers = pd.read_csv(tmp_path / "out" / "layer_scores.csv")
    assert list(layers.columns) == ["layer", "pearson", "spearman"] and len(layers) == bb.num_layers
    table = pd.read_csv(tmp_path / "out" / "accuracy_speed.csv")
    assert list(table.policy) == ["full", "patience_regression", "patience_regression"]  # no oracle for scores
    patience = table[table.policy == "patience_regression"]
    assert (patience.mean_exit_layer >= [2.0, 3.0]).all() and (patience.speedup > 0).all()
    assert {"pearson", "pearson_ratio", "consistency"} <= set(table.columns) and len(table_rows) == 3
    assert "Accuracy vs speed (pearson;" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, message", [
    (["classify.policies=[vibes]"], "classify.policies[0]='vibes'; allowed: labels of exit.policies"),
    (["exit.policies.entropy.thresholds=[0.5]"], "exit.policies.entropy.thresholds[0]: "),
])
def test_bad_classify_input_is_one_line_and_exit_code_2(tmp_path, overrides, message):
    r = cli("+experiment=bert_demo", "logger=none", *overrides, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("eetrain: error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in r.stderr


# --- experiments ------------------------------------------------------------------------------------------
def test_bert_demo_is_pabee_training_of_a_tiny_bert_on_the_demo_stories():
    cfg = compose(["+experiment=bert_demo"])
    assert cfg.model._target_.endswith("BertBackbone") and cfg.model.name_or_path is None
    assert cfg.model.config.num_hidden_layers == 6 and cfg.model.exit_head == "per_layer"
    assert cfg.model.config.num_labels == 8 and cfg.data.num_labels == 8
    assert cfg.loss.terms.ce.weights == "calm" and cfg.trainer.accelerator == "cpu"
    assert list(cfg.stages) == ["classify"] and cfg.exit.min_exit_layer == 1
    assert list(cfg.classify.policies) == ["patience", "entropy", "softmax_max"]


@pytest.mark.parametrize("data, metric", [(None, "accuracy"), ("glue_mrpc", "f1")])
def test_pabee_bert_is_the_real_recipe(data, metric):
    cfg = compose(["+experiment=pabee_bert", *([f"data={data}"] if data else [])])
    assert cfg.model.name_or_path == "google-bert/bert-base-uncased" and cfg.model.exit_head == "per_layer"
    assert cfg.data.hf_name == "nyu-mll/glue" and cfg.data.hf_config == (data or "glue_sst2")[5:]
    assert cfg.data.metric == metric and cfg.model.model_kwargs.num_labels == 2
    assert cfg.loss.terms.ce.weights == "calm" and cfg.trainer.accelerator == "gpu"
    assert cfg.optimizer.lr == 2e-5 and list(cfg.stages) == ["classify"]
    assert list(cfg.exit.policies.patience.thresholds) == [1, 2, 3, 4, 5, 6, 7, 8]


def test_pabee_bert_on_stsb_uses_the_regression_rule():
    cfg = compose(["+experiment=pabee_bert", "data=glue_stsb", "classify.policies=[patience_regression]"])
    assert cfg.data.metric == "pearson" and cfg.model.model_kwargs.num_labels == 1
    assert dict(cfg.exit.policies.patience_regression.kwargs) == {"tolerance": 0.1}
    check_config(cfg, make_backbone("bert", num_labels=1, num_hidden_layers=12))
    with pytest.raises(ConfigError, match=r"classify.policies\[0\]='patience' .*this head is a regression"):
        check_config(compose(["+experiment=pabee_bert", "data=glue_stsb"]), make_backbone("bert", num_labels=1))


@pytest.mark.slow
def test_stsb_trains_and_classifies_with_regression_patience(tmp_path):
    """PABEE's recipe on STS-B-shaped local files with a tiny BERT: every exit trained with its MSE, the
    per-layer report, W&B (offline) and the accuracy-vs-speed sweep of the regression rule."""
    from tests.test_task_data import PAIRS, write_jsonl

    rows = [{**PAIRS[i % 3], "label": float(i % 6) * 0.8, "idx": i} for i in range(48)]
    files = [f"data.files.{s}={write_jsonl(tmp_path / f'{s}.jsonl', rows)}" for s in ("train", "validation")]
    out = tmp_path / "run"
    r = cli("+experiment=pabee_bert", "model=bert_tiny", "data=glue_stsb", "data.hf_name=null", *files,
            "data.num_workers=0", "trainer=cpu", f"hydra.run.dir={out}", *SHORT, "logger=wandb",
            "classify.policies=[patience_regression]", "exit.policies.patience_regression.thresholds=[1,2]",
            cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Per-layer validation report (mse: a regression head's mean squared error)" in r.stdout
    report = pd.read_csv(out / "layer_report.csv")
    assert list(report.columns) == ["layer", "loss"] and (report.loss > 0).all()
    table = pd.read_csv(out / "accuracy_speed.csv")
    assert list(table.policy) == ["full", "patience_regression", "patience_regression"]
    assert (table.mean_exit_layer.iloc[1:] >= [2.0, 3.0]).all() and table.consistency.iloc[1:].isna().all()
    assert list(pd.read_csv(out / "layer_scores.csv").columns) == ["layer", "pearson", "spearman"]
    (record,) = next((out / "wandb").glob("offline-run-*")).glob("run-*.wandb")
    for key in ("train/layer_01/mse", "val/layer_04/mse", "val/layer_04/loss"):  # each exit's MSE
        assert key.encode() in record.read_bytes(), key


def test_a_tolerance_on_a_token_head_is_refused():
    from eetrain.decoding.decisions import LayerDecider

    policy = ExitPolicy("patience", None, min_exit_layer=1, measure_kwargs={"patience": 1, "tolerance": 0.1})
    with pytest.raises(ConfigError, match=r"'patience': kwargs.tolerance compares a regression head's scores, and "
                                          r"this head has \d+ outputs"):
        LayerDecider(policy, make_backbone("t5"), 3)


def test_classify_names_its_own_stage_for_a_missing_classifier(tmp_path):
    with pytest.raises(ConfigError, match=r"classify.policies\[0\]='classifier:calm': no saved calm classifier at .*; "
                                          r"train it with stages=\[exit_classifiers,classify\]"):
        classify_specs(stage_cfg("classify.policies=[classifier:calm]"), make_backbone("bert", num_hidden_layers=4),
                       ["classifier:calm"], tmp_path, None)


def test_online_calibration_on_a_classifier_names_its_key():
    from eetrain.stages import check_stages

    cfg = compose(["model=bert_tiny", "data=demo_classification", "stages=[policies]", "exit.calibration.online=true"])
    with pytest.raises(ConfigError, match=r"exit.calibration.online=true calibrates on decoded text: it needs a "
                                          r"token head \(T5, LLaMA\), and the bert adapter"):
        check_stages(cfg, make_backbone("bert", num_hidden_layers=4))


def test_stages_that_read_classes_refuse_a_regression_head():
    from eetrain.stages import check_stages

    reg = make_backbone("bert", num_labels=1)
    for stages, message in ((["policies"], "stages exit_classifiers and policies learn and score when a layer's "
                                           "class agrees"),
                            (["exit_classifiers"], "use stages=\\[classify\\] with classify.policies"),
                            (["analyze"], "analyze reads every layer's class predictions")):
        with pytest.raises(ConfigError, match=message):
            check_stages(compose(["model=bert_tiny", "data=demo_classification", f"stages=[{stages[0]}]"]), reg)


def test_pabee_bert_offline_stops_at_once(tmp_path):
    r = cli("+experiment=pabee_bert", cwd=tmp_path, timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "hub is unreachable" in r.stderr and "model.name_or_path='google-bert/bert-base-uncased'" in r.stderr
    assert "Point model.name_or_path at a local directory" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_bert_demo_short_run(tmp_path):
    out = tmp_path / "run"
    r = cli("+experiment=bert_demo", f"hydra.run.dir={out}", *SHORT, "classify.max_examples=64",
            "exit.policies.entropy.thresholds=[-0.5]", "exit.policies.softmax_max.thresholds=[0.9]",
            "exit.policies.patience.thresholds=[1]", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Per-layer scores on test" in r.stdout and "Accuracy vs speed" in r.stdout
    layers = pd.read_csv(out / "layer_scores.csv")
    assert list(layers.layer) == [1, 2, 3, 4, 5, 6]
    table = pd.read_csv(out / "accuracy_speed.csv")
    assert list(table.policy) == ["full", "oracle", "patience", "entropy", "softmax_max"]
    assert (out / "accuracy_speed.png").exists() and (out / "export" / "exit_heads.safetensors").exists()
    settings = json.loads((out / "export" / "early_exit.json").read_text())
    assert settings["head_kind"] == "sequence" and settings["exit_head"] == "per_layer"
