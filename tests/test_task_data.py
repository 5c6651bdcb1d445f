"""The early-exit papers' task data configs (conf/data/): composition, offline failure, local-file fallback."""

import json
import re
import shutil

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from transformers import AutoTokenizer

from eetrain import hub
from eetrain.config import CONF_DIR, compose
from eetrain.errors import ConfigError, DataError, HubUnreachableError
from tests.conftest import TOKENIZER

ROUGE = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
S = "summarize: "
# name: (hf_name, hf_config, source_column, target_column, prefix, metric, metrics, test_split)
TEXT = {
    "cnn_dailymail": ("abisee/cnn_dailymail", "3.0.0", "article", "highlights", S, "rougeL", ROUGE, "test"),
    "xsum": ("EdinburghNLP/xsum", None, "document", "summary", S, "rougeL", ROUGE, "test"),
    "samsum": ("Samsung/samsum", None, "dialogue", "summary", S, "rougeL", ROUGE, "test"),
    "multi_news": ("alexfabbri/multi_news", None, "document", "summary", S, "rougeL", ROUGE, "test"),
    "big_patent": ("NortheasternUniversity/big_patent", "all", "description", "abstract", S, "rougeL", ROUGE, "test"),
    "squad": ("rajpurkar/squad", "plain_text", "context", "answers.text", "", "squad_f1", ["squad_f1", "squad_em"],
              "validation"),
    "wmt15_en_fr": ("wmt/wmt15", "fr-en", "translation.en", "translation.fr", "translate English to French: ",
                    "bleu", ["bleu"], "test"),
    "wmt14_en_de": ("wmt/wmt14", "de-en", "translation.en", "translation.de", "translate English to German: ",
                    "bleu", ["bleu"], "test"),
    "iwslt2017_de_en": ("IWSLT/iwslt2017", "iwslt2017-de-en", "translation.de", "translation.en",
                        "translate German to English: ", "bleu", ["bleu"], "test"),
}
# task: (text_columns, num_labels, metric, metrics)
GLUE = {
    "sst2": (["sentence"], 2, "accuracy", ["accuracy"]),
    "mrpc": (["sentence1", "sentence2"], 2, "f1", ["f1", "accuracy"]),
    "qnli": (["question", "sentence"], 2, "accuracy", ["accuracy"]),
    "rte": (["sentence1", "sentence2"], 2, "accuracy", ["accuracy"]),
    "mnli": (["premise", "hypothesis"], 3, "accuracy", ["accuracy"]),
    "qqp": (["question1", "question2"], 2, "f1", ["f1", "accuracy"]),
    "cola": (["sentence"], 2, "matthews", ["matthews"]),
    "stsb": (["sentence1", "sentence2"], 1, "pearson", ["pearson", "spearman"]),
    "wnli": (["sentence1", "sentence2"], 2, "accuracy", ["accuracy"]),
}

SQUAD_ROWS = [
    {"id": "1", "title": "Paris", "context": "alice met bob in paris on monday .", "question": "where did alice meet bob ?",
     "answers": {"text": ["paris", "in paris"], "answer_start": [17, 14]}},
    {"id": "2", "title": "Rome", "context": "rome approved 12 new parks on friday .", "question": "how many parks ?",
     "answers": {"text": ["12"], "answer_start": [14]}},
]
WMT_ROWS = [
    {"translation": {"de": "alice traf bob .", "en": "alice met bob ."}},
    {"translation": {"de": "bob ging .", "en": "bob left ."}},
]
PAIRS = [
    {"sentence1": "alice met bob in paris .", "sentence2": "bob met alice .", "label": 1, "idx": 0},
    {"sentence1": "rome approved 12 parks .", "sentence2": "bob left on monday .", "label": 0, "idx": 1},
    {"sentence1": "bob left .", "sentence2": "alice left paris on friday .", "label": 1, "idx": 2},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def local(tmp_path, name, rows, *extra, splits=("train", "validation"), model="t5_tiny"):
    """Compose `data=<name>` with the local-file fallback overrides (the same rows in every split)."""
    files = [f"data.files.{s}={write_jsonl(tmp_path / f'{s}.jsonl', rows)}" for s in splits]
    return compose([f"model={model}", f"data={name}", "data.hf_name=null", *files, "data.num_workers=0", *extra])


def build(cfg):
    bb = instantiate(cfg.model)
    return instantiate(cfg.data, tokenizer=bb.tokenizer, collate_fn=bb.collate), bb


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER)


@pytest.fixture(scope="module")
def pair_tokenizer(tmp_path_factory):
    """The demo tokenizer with BERT's pair template: the second text and its </s> are segment 1."""
    out = tmp_path_factory.mktemp("pair_tokenizer")
    shutil.copy(f"{TOKENIZER}/tokenizer_config.json", out)
    spec = json.loads(open(f"{TOKENIZER}/tokenizer.json").read())
    for piece in spec["post_processor"]["pair"][2:]:
        next(iter(piece.values()))["type_id"] = 1
    (out / "tokenizer.json").write_text(json.dumps(spec))
    return str(out)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty_cache"))  # nothing cached
    hub.hub_reachable.cache_clear()
    yield
    hub.hub_reachable.cache_clear()


# --- every config composes with the right fields -------------------------------------------------
@pytest.mark.parametrize("name", sorted(TEXT))
def test_text_config_fields(name, tokenizer):
    hf_name, hf_config, src, tgt, prefix, metric, metrics, test_split = TEXT[name]
    cfg = compose([f"data={name}"]).data
    assert (cfg.hf_name, cfg.hf_config, cfg.source_column, cfg.target_column) == (hf_name, hf_config, src, tgt)
    assert (cfg.prefix, cfg.metric, list(cfg.metrics)) == (prefix, metric, metrics)
    assert (cfg.train_split, cfg.val_split, cfg.test_split) == ("train", "validation", test_split)
    assert cfg.max_source_length >= 128 and cfg.max_target_length >= 32
    dm = instantiate(cfg, tokenizer=tokenizer, collate_fn=list)  # the metric settings validate
    assert dm.metric == metric and dm.splits["test"] == test_split


def test_squad_is_generative_qa_with_a_template():
    cfg = compose(["data=squad"]).data
    assert cfg.source_template == "question: {question} context: {context}" and cfg.prefix == ""
    assert (cfg.max_source_length, cfg.max_target_length) == (384, 32)


@pytest.mark.parametrize("name", ["demo", "local"])
def test_demo_and_local_report_rouge(name):
    cfg = compose([f"data={name}"]).data
    assert cfg.metric == "rougeL" and list(cfg.metrics) == ROUGE and cfg.source_template is None


@pytest.mark.parametrize("task", sorted(GLUE))
def test_glue_config_fields_and_model_labels(task, tokenizer):
    columns, num_labels, metric, metrics = GLUE[task]
    cfg = compose(["model=bert_tiny", f"data=glue_{task}"])
    d = cfg.data
    assert d._target_ == "eetrain.data.classification.ClassificationDataModule"
    assert (d.hf_name, d.hf_config, list(d.text_columns), d.label_column) == ("nyu-mll/glue", task, columns, "label")
    assert (d.num_labels, d.metric, list(d.metrics)) == (num_labels, metric, metrics)
    val = "validation_matched" if task == "mnli" else "validation"
    assert (d.train_split, d.val_split, d.test_split) == ("train", val, val)  # GLUE's test labels are -1
    assert cfg.model.config.num_labels == num_labels  # the head is sized by the data config
    instantiate(d, tokenizer=tokenizer, collate_fn=list)


def test_bert_without_glue_data_keeps_two_labels():
    assert compose(["model=bert_tiny"]).model.config.num_labels == 2


# --- offline: fail at once, saying how to use local files ----------------------------------------
@pytest.mark.parametrize("name", sorted(TEXT) + [f"glue_{t}" for t in sorted(GLUE)])
def test_hub_config_fails_fast_offline(name, tokenizer, offline):
    cfg = compose([f"data={name}"]).data
    dm = instantiate(cfg, tokenizer=tokenizer, collate_fn=list)
    with pytest.raises(HubUnreachableError) as info:
        dm.setup("fit")
    msg = str(info.value)
    assert f"data.hf_name={cfg.hf_name!r}" in msg
    assert "data.hf_name=null data.files.train=/data/train.jsonl data.files.validation=" in msg
    if name.startswith("glue_"):
        assert f"data.text_columns={list(cfg.text_columns)} and data.label_column='label'" in msg
        assert "source_column" not in msg
    elif name == "squad":
        assert "data.source_template='question: {question} context: {context}'" in msg
        assert "data.target_column='answers.text'" in msg
    else:
        assert f"data.source_column={cfg.source_column!r} and data.target_column={cfg.target_column!r}" in msg


# --- local files shaped like the hub's rows --------------------------------------------------------
def test_squad_local_files(tmp_path):
    dm, bb = build(local(tmp_path, "squad", SQUAD_ROWS))
    dm.setup("fit")
    first = dm.datasets["train"][0]
    ids = lambda text: bb.tokenizer(text)["input_ids"]  # noqa: E731
    assert first["source_ids"] == ids("question: where did alice meet bob ? context: alice met bob in paris on monday .")
    assert first["target_ids"] == ids("paris")  # the first answer trains
    assert first["reference"] == ["paris", "in paris"]  # every answer scores
    assert dm.datasets["validation"][1]["reference"] == ["12"]
    # squad has no labelled test split: "test" is the validation split (data.files.validation)
    assert [e["reference"] for e in dm.split_examples("test")] == [["paris", "in paris"], ["12"]]
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    states = bb(batch)
    assert len(states.hidden) == bb.num_layers


def test_wmt_translation_dicts_and_test_file(tmp_path):
    cfg = local(tmp_path, "wmt14_en_de", WMT_ROWS, splits=("train", "validation", "test"))
    dm, bb = build(cfg)
    test = dm.split_examples("test")
    assert test[0]["source_ids"] == bb.tokenizer("translate English to German: alice met bob .")["input_ids"]
    assert test[0]["target_ids"] == bb.tokenizer("alice traf bob .")["input_ids"]
    assert [e["reference"] for e in test] == ["alice traf bob .", "bob ging ."]
    assert dm.truncation["test"]["examples"] == 2
    # the reverse direction reads the same rows
    dm2, _ = build(local(tmp_path, "iwslt2017_de_en", WMT_ROWS))
    dm2.setup("fit")
    assert [e["reference"] for e in dm2.datasets["train"]] == ["alice met bob .", "bob left ."]


def test_summarisation_references_are_the_targets(tmp_path):
    rows = [{"document": "alice met bob in paris .", "summary": "alice met bob .", "id": "a"}]
    dm, bb = build(local(tmp_path, "xsum", rows))
    dm.setup("fit")
    ex = dm.datasets["validation"][0]
    assert ex["reference"] == "alice met bob ."
    assert ex["source_ids"] == bb.tokenizer("summarize: alice met bob in paris .")["input_ids"]


def test_glue_pair_local_files_run_through_bert(tmp_path, pair_tokenizer):
    cfg = local(tmp_path, "glue_mrpc", PAIRS, f"model.tokenizer={pair_tokenizer}", model="bert_tiny")
    dm, bb = build(cfg)
    dm.setup("fit")
    ex = dm.datasets["train"][0]
    assert set(ex) == {"source_ids", "token_type_ids", "label"} and ex["label"] == 1
    n_first = len(bb.tokenizer("alice met bob in paris .")["input_ids"])  # the first text and its </s>
    assert ex["token_type_ids"] == [0] * n_first + [1] * (len(ex["source_ids"]) - n_first)
    batch = next(iter(dm.val_dataloader()))
    assert batch["token_type_ids"].shape == batch["input_ids"].shape
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0, 1]
    states = bb(batch)
    assert states.layers == tuple(range(1, bb.num_layers + 1))
    assert bb.exit_logits(states.hidden[-1]).shape == (3, 2)
    # the segment ids reach the model
    no_types = {k: v for k, v in batch.items() if k != "token_type_ids"}
    assert not torch.allclose(bb(no_types).hidden[0], states.hidden[0])


def test_glue_single_sentence_has_zero_segments(tmp_path):
    rows = [{"sentence": "a fine film .", "label": 1, "idx": 0}, {"sentence": "dull .", "label": 0, "idx": 1}]
    dm, bb = build(local(tmp_path, "glue_sst2", rows, model="bert_tiny"))
    dm.setup("fit")
    assert all(set(e["token_type_ids"]) == {0} for e in dm.datasets["train"])
    assert bb.exit_logits(bb(next(iter(dm.train_dataloader()))).hidden[-1]).shape == (2, 2)


def test_stsb_regression_float_labels(tmp_path):
    rows = [{**r, "label": v} for r, v in zip(PAIRS, [4.2, 0.5, 3.0], strict=True)]
    dm, bb = build(local(tmp_path, "glue_stsb", rows, model="bert_tiny"))
    assert bb.model.config.num_labels == 1 and bb.regression
    dm.setup("fit")
    assert [e["label"] for e in dm.datasets["validation"]] == pytest.approx([4.2, 0.5, 3.0])
    batch = next(iter(dm.val_dataloader()))
    assert batch["labels"].dtype == torch.float
    assert bb.exit_logits(bb(batch).hidden[-1]).shape == (3, 1)
    assert torch.isfinite(bb.model(**batch).loss)  # transformers' own regression loss takes these labels


@pytest.mark.parametrize("label", ["NaN", "Infinity", '"inf"', '"x"'])
def test_stsb_scores_must_be_finite_numbers(tmp_path, label):
    line = '{"sentence1": "a .", "sentence2": "b .", "label": %s, "idx": 0}\n'
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text(line % "3.2" + line % label)
    cfg = compose(["model=bert_tiny", "data=glue_stsb", "data.hf_name=null",
                   f"data.files.train={tmp_path / 'train.jsonl'}", f"data.files.validation={tmp_path / 'validation.jsonl'}"])
    dm, _ = build(cfg)
    with pytest.raises(DataError, match=r"row 1: data.label_column='label' is .*, not a finite number"):
        dm.setup("fit")


def test_mnli_validation_matched_from_files_validation(tmp_path):
    rows = [{"premise": "alice met bob .", "hypothesis": "bob met alice .", "label": i, "idx": i} for i in range(3)]
    dm, bb = build(local(tmp_path, "glue_mnli", rows, model="bert_tiny"))
    assert dm.splits == {"train": "train", "validation": "validation_matched", "test": "validation_matched"}
    dm.setup("fit")
    assert [e["label"] for e in dm.split_examples("test")] == [0, 1, 2]
    assert dm.split_examples("validation_matched") is dm.datasets["validation"]
    assert bb.exit_logits(bb(next(iter(dm.val_dataloader()))).hidden[-1]).shape == (3, 3)


def test_truncation_of_pairs_counts_and_keeps_max_length(tmp_path):
    dm, _ = build(local(tmp_path, "glue_rte", PAIRS, "data.max_length=6", model="bert_tiny"))
    dm.setup("fit")
    assert dm.truncation["train"] == {"examples": 3, "truncated": 3}
    assert all(len(e["source_ids"]) == len(e["token_type_ids"]) == 6 for e in dm.datasets["train"])


# --- errors name the key -------------------------------------------------------------------------
def test_missing_columns_name_the_key(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "context"} for r in SQUAD_ROWS]
    dm, _ = build(local(tmp_path, "squad", rows))
    with pytest.raises(DataError, match=r"no column 'context' \(named in data.source_template\).*'question'"):
        dm.setup("fit")
    dm, _ = build(local(tmp_path, "wmt15_en_fr", WMT_ROWS))  # de-en rows have no French
    with pytest.raises(DataError, match=r"row 0: no field data.target_column='translation.fr'"):
        dm.setup("fit")
    rows = [{k: v for k, v in r.items() if k != "sentence2"} for r in PAIRS]
    dm, _ = build(local(tmp_path, "glue_wnli", rows, model="bert_tiny"))
    with pytest.raises(DataError, match=r"no column data.text_columns\[1\]='sentence2'; its columns are"):
        dm.setup("fit")


def test_unlabelled_glue_test_split(tmp_path):
    cfg = local(tmp_path, "glue_qnli", [{"question": "q ?", "sentence": "s .", "label": -1, "idx": 0}],
                "data.test_split=test", splits=("train", "validation", "test"), model="bert_tiny")
    dm, _ = build(cfg)
    with pytest.raises(DataError, match=r"data.test_split='test': row 0: data.label_column='label' is -1; "
                                        r"allowed: integers 0..1 .*set data.test_split=validation"):
        dm.split_examples("test")


def test_bad_split_names_the_key_and_the_available(tmp_path):
    dm, _ = build(local(tmp_path, "glue_cola", [{"sentence": "a .", "label": 1, "idx": 0}], model="bert_tiny"))
    with pytest.raises(ConfigError, match=r"data.files.dev is not set.*files given: train, validation"):
        dm.split_examples("dev")
    # a hub-style dataset directory (hf_name is a local path: no hub needed) without the split
    ds = tmp_path / "glue_cola"
    ds.mkdir()
    for s in ("train", "validation"):
        write_jsonl(ds / f"{s}.jsonl", [{"sentence": "a .", "label": 1, "idx": 0}])
    cfg = compose(["model=bert_tiny", "data=glue_cola", f"data.hf_name={ds}", "data.hf_config=null",
                   "data.val_split=validation_matched"])
    dm, _ = build(cfg)
    with pytest.raises(ConfigError, match=r"data.val_split='validation_matched'.*has no such split.*"
                                          r"\['train', 'validation'\]"):
        dm.setup("fit")


@pytest.mark.parametrize("name, overrides, error, message", [
    ("glue_sst2", ["data.metrics=[bleu]"], ConfigError, r"data.metrics: unknown metric 'bleu' for a label task"),
    ("glue_mrpc", ["data.metric=matthews"], ConfigError, r"data.metric='matthews' is not in data.metrics; "
                                                         r"allowed: f1, accuracy"),
    ("xsum", ["data.metrics=[accuracy]"], ConfigError, r"data.metrics: unknown metric 'accuracy' for a text task"),
    ("squad", ["data.metric=rougeL"], ConfigError, r"data.metric='rougeL'.*allowed: squad_f1, squad_em"),
    ("squad", ["data.source_template='no fields'"], ConfigError, r"data.source_template='no fields' must name"),
    ("glue_rte", ["data.text_columns=[a,b,c]"], ConfigError, r"data.text_columns=\['a', 'b', 'c'\] must name one"),
    ("glue_stsb", ["data.num_labels=0"], ConfigError, r"data.num_labels=0; allowed: an integer >= 1 \(1 = regression\)"),
    ("glue_stsb", ["data.num_labels=2.5"], ConfigError, r"data.num_labels=2.5; allowed: an integer >= 1"),
    ("glue_sst2", ["data.max_length=abc"], ConfigError, r"data.max_length='abc'; allowed: an integer >= 1"),
    ("glue_rte", ["data.hf_name=null"], ConfigError, r"set data.hf_name .* or data.files"),
    ("glue_stsb", ["data.metrics=[accuracy,pearson]"], ConfigError,
     r"data.metrics=\['accuracy', 'pearson'\]: accuracy score\(s\) class ids, and data.num_labels=1 is regression"),
    ("glue_mnli", ["data.metrics=[f1,accuracy]"], ConfigError,
     r"data.metrics=\['f1', 'accuracy'\]: f1 is the binary F1 of class 1, and data.num_labels=3; allowed there"),
])
def test_bad_settings(name, overrides, error, message, tokenizer):
    cfg = compose([f"data={name}", *overrides]).data
    with pytest.raises(InstantiationException) as info:  # the CLI prints the cause alone
        instantiate(cfg, tokenizer=tokenizer, collate_fn=list)
    assert isinstance(info.value.__cause__, error)
    assert re.search(message, str(info.value.__cause__))


def test_every_data_config_is_covered():
    shipped = {p.stem for p in (CONF_DIR / "data").glob("*.yaml")}
    plain_text = {"text", "wikitext103"}  # packed plain text: tests/test_llama_recipes.py
    assert shipped == set(TEXT) | {f"glue_{t}" for t in GLUE} | {"demo", "local", "demo_classification"} | plain_text


@pytest.mark.parametrize("overrides, message", [
    (["stages=[generate]", "decoding.split=nosuch"], r"decoding.split='nosuch': data.files.nosuch is not set"),
    (["stages=[curve]", "curve.split=null", "data.files.test=null"], r"curve.split='test': data.files.test is not set"),
    (["stages=[classify]", "classify.split=dev"], r"classify.split='dev': data.files.dev is not set"),
    (["stages=[analyze]", "analyze.split=test", "data.files.test=/no/such.jsonl"],
     r"analyze.split='test': data.files.test='/no/such.jsonl': no such file"),
    (["stages=[policies]", "exit.calibration.online=true", "exit.calibration.online_split=dev"],
     r"exit.calibration.online_split='dev': data.files.dev is not set"),
])
def test_a_stage_split_the_files_lack_fails_before_training(overrides, message, tokenizer):
    from eetrain.stages import check_splits

    cfg = compose(["+experiment=demo", *overrides])
    data = instantiate(cfg.data, tokenizer=tokenizer, collate_fn=list)
    with pytest.raises((ConfigError, DataError), match=message):
        check_splits(cfg, data)
    assert not data.datasets  # nothing was loaded to find out


def test_stage_splits_the_files_have_pass(tokenizer):
    from eetrain.stages import check_splits

    cfg = compose(["+experiment=demo", "stages=[generate,curve,classify,analyze,policies]",
                   "exit.calibration.online=true", "decoding.split=validation", "curve.split=test"])
    check_splits(cfg, instantiate(cfg.data, tokenizer=tokenizer, collate_fn=list))


@pytest.mark.parametrize("name, outputs", [("glue_sst2", 3), ("glue_stsb", 3), ("glue_sst2", 1)])
def test_a_head_for_another_number_of_classes_is_refused(name, outputs, tokenizer):
    from tests.conftest import make_backbone

    data = instantiate(compose([f"data={name}"]).data, tokenizer=tokenizer, collate_fn=list)
    with pytest.raises(ConfigError, match=rf"model.config.num_labels={outputs} \(the head's outputs\) differs from "
                                          rf"data.num_labels={data.num_labels}"):
        data.check_fits(make_backbone("bert", num_labels=outputs))
    data.check_fits(make_backbone("bert", num_labels=data.num_labels))


def test_an_unlabelled_row_hints_at_the_test_split_only_when_it_is_the_test_split(tmp_path):
    rows = [{"sentence": "a .", "label": -1, "idx": 0}]
    cfg = local(tmp_path, "glue_sst2", rows, "data.test_split=test", splits=("train", "validation", "test"),
                model="bert_tiny")
    dm, _ = build(cfg)
    with pytest.raises(DataError, match=r"data.test_split='test': row 0: .* is -1; .*\(GLUE's test splits are "
                                        r"unlabelled: set data.test_split=validation\)"):
        dm.split_examples("test")
    with pytest.raises(DataError) as info:
        dm.split_examples("validation")
    assert "is -1" in str(info.value) and "test_split" not in str(info.value)


def test_best_point_keeps_higher_is_better_for_negative_scores():
    from eetrain.decoding.curve import best_point

    rows = [{"policy": "full", "pearson": -26.41, "speedup": 1.0},
            {"policy": "p", "threshold": 1, "pearson": -27.08, "pearson_ratio": -27.08 / -26.41, "speedup": 1.022,
             "mean_exit_layer": 2.0},
            {"policy": "p", "threshold": 2, "pearson": -25.59, "pearson_ratio": -25.59 / -26.41, "speedup": 1.01,
             "mean_exit_layer": 3.0}]
    assert best_point(rows, "pearson", 0.99, 6)["threshold"] == 2  # the worse score's ratio is the larger one


def test_json_outputs_have_no_nan(tmp_path):
    from eetrain.files import write_json

    write_json(tmp_path / "s.json", {"ratio": float("nan"), "rows": [1.0, float("inf"), {"x": float("-inf")}]})
    text = (tmp_path / "s.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"ratio": None, "rows": [1.0, None, {"x": None}]}


def test_a_gpu_trainer_on_a_machine_without_one_says_what_to_set():
    import torch

    from eetrain.config import build as build_node

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match=r"^trainer: .*; this machine has none: trainer=cpu"):
        build_node({"_target_": "lightning.pytorch.Trainer", "accelerator": "gpu", "devices": 1, "logger": False},
                   "trainer")


def test_the_fastest_point_shows_the_full_score_when_it_is_negative():
    from eetrain.decoding.curve import score_against_full

    rows = [{"policy": "full", "pearson": -45.86, "pearson_ratio": 1.0},
            {"policy": "patience", "threshold": 1, "pearson": -34.82, "pearson_ratio": 0.759}]
    # a share of a negative score turns over (0.759 x looked worse while the point is better)
    assert score_against_full(rows[1], rows, "pearson") == "full model -45.86"
    rows[0]["pearson"], rows[1]["pearson"] = 50.0, 49.0
    assert score_against_full(rows[1], rows, "pearson") == "0.759 x"
