import json

import pandas as pd
import pytest

from eetrain.data.text2text import Text2TextDataModule
from eetrain.errors import ConfigError, DataError
from tests.conftest import make_backbone

ROWS = [
    {"document": "alice met bob in paris on monday .", "summary": "alice met bob ."},
    {"document": "the council of rome approved 12 new parks on friday .", "summary": "rome approved 12 parks ."},
    {"document": "bob left .", "summary": "bob left ."},
]


def _write(path, rows, fmt):
    df = pd.DataFrame(rows)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path)
    return str(path)


def _dm(tmp_path, fmt="jsonl", rows=ROWS, **kw):
    bb = make_backbone("t5")
    files = {s: _write(tmp_path / f"{s}.{fmt}", rows, fmt) for s in ("train", "validation")}
    args = dict(files=files, source_column="document", target_column="summary", batch_size=2)
    args.update(kw)
    return Text2TextDataModule(bb.tokenizer, bb.collate, **args), bb


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_local_formats(tmp_path, fmt):
    dm, bb = _dm(tmp_path, fmt, prefix="summarize: ")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert len(dm.datasets["validation"]) == 3
    first = dm.datasets["validation"][0]
    assert bb.tokenizer.decode(first["source_ids"], skip_special_tokens=True).startswith("summarize")
    assert first["target_ids"][-1] == bb.tokenizer.eos_token_id


def test_truncation_is_counted_and_keeps_eos(tmp_path, capsys):
    dm, bb = _dm(tmp_path, max_source_length=6, max_target_length=4)
    dm.setup("fit")
    t = dm.truncation["train"]
    n_src = sum(len(bb.tokenizer(r["document"])["input_ids"]) > 6 for r in ROWS)
    n_tgt = sum(len(bb.tokenizer(r["summary"])["input_ids"]) > 4 for r in ROWS)
    assert n_src == 2
    assert t == {"examples": 3, "source_truncated": n_src, "target_truncated": n_tgt}
    assert all(len(e["target_ids"]) <= 4 and e["target_ids"][-1] == 1 for e in dm.datasets["train"])
    assert f"truncated sources {n_src}" in capsys.readouterr().out


def test_missing_column_names_the_key(tmp_path):
    dm, _ = _dm(tmp_path, target_column="highlights")
    with pytest.raises(DataError, match=r"no column data.target_column='highlights'.*\['document', 'summary'\]"):
        dm.setup("fit")


def test_without_training_only_validation_loads_and_a_number_is_text(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"document": "a", "summary": 123}\n{"document": "b", "summary": null}\n')
    bb = make_backbone("t5")
    dm = Text2TextDataModule(bb.tokenizer, bb.collate, files={"validation": str(tmp_path / "d.jsonl")},
                             source_column="document", target_column="summary")
    with pytest.raises(DataError, match=r"d.jsonl' row 1: data.target_column='summary' is empty \(None\)"):
        dm.setup("validate")  # a number is read as its text (row 0); without training no train file is needed


def test_a_number_as_prefix_is_its_text(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"document": "a", "summary": "b"}\n')
    bb = make_backbone("t5")
    dm = Text2TextDataModule(bb.tokenizer, bb.collate, files={"validation": str(tmp_path / "d.jsonl")},
                             source_column="document", target_column="summary", prefix=123)  # data.prefix=123
    assert dm.sources([{"document": "a"}]) == ["123a"]


def test_empty_dataset(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    (tmp_path / "e.csv").write_text("document,summary\n")
    bb = make_backbone("t5")
    dm = Text2TextDataModule(bb.tokenizer, bb.collate, files={"train": str(tmp_path / "e.csv"),
                             "validation": str(tmp_path / "e.csv")}, source_column="document",
                             target_column="summary")
    with pytest.raises(DataError, match="is empty"):
        dm.setup("fit")


def test_a_malformed_file_names_the_key(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"document": "a", "summary": "b"}\nnot json at all\n')
    bb = make_backbone("t5")
    dm = Text2TextDataModule(bb.tokenizer, bb.collate, files={"train": str(tmp_path / "bad.jsonl"),
                             "validation": str(tmp_path / "bad.jsonl")}, source_column="document",
                             target_column="summary")
    with pytest.raises(DataError, match=r"data.files.train='.*bad.jsonl' is not readable as json: "):
        dm.setup("fit")


def test_missing_file_and_split(tmp_path):
    bb = make_backbone("t5")
    dm = Text2TextDataModule(bb.tokenizer, bb.collate, files={"train": str(tmp_path / "nope.jsonl")})
    with pytest.raises(DataError, match="data.files.train=.*no such file"):
        dm.setup("fit")
    with pytest.raises(ConfigError, match="data.hf_name"):
        Text2TextDataModule(bb.tokenizer, bb.collate)


def test_hub_dataset_offline_fails_fast(tmp_path):
    from eetrain.errors import HubUnreachableError

    bb = make_backbone("t5")
    dm = Text2TextDataModule(bb.tokenizer, bb.collate, hf_name="abisee/cnn_dailymail", hf_config="3.0.0")
    with pytest.raises(HubUnreachableError, match="data.files.train="):
        dm.setup("fit")


def test_loading_script_dataset_names_the_way_out(tmp_path):
    # datasets >= 4 refuses repositories that are only a loading script (IWSLT 2017, older hub copies)
    script_dir = tmp_path / "iwslt_like"
    script_dir.mkdir()
    (script_dir / "iwslt_like.py").write_text("import datasets\n")
    bb = make_backbone("t5")
    dm = Text2TextDataModule(bb.tokenizer, bb.collate, hf_name=str(script_dir))
    with pytest.raises(ConfigError, match=r"loading-script dataset.*data.hf_name=null data.files.train="):
        dm.setup("fit")


def test_llama_collation_from_same_data(tmp_path):
    bb = make_backbone("llama")
    files = {s: _write(tmp_path / f"{s}.jsonl", ROWS, "jsonl") for s in ("train", "validation")}
    dm = Text2TextDataModule(bb.tokenizer, bb.collate, files=files, source_column="document",
                             target_column="summary", batch_size=3)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    n_target = sum(len(e["target_ids"]) for e in dm.datasets["validation"])
    assert int((batch["labels"] != -100).sum()) == n_target


def test_csv_text_cells_are_read_as_written(tmp_path):
    # pandas would type "007" as 7.0 and read "None" / "NA" as missing; an empty cell is still missing
    path = tmp_path / "rows.csv"
    path.write_text("document,summary\nthe code is,007\nthe price is,3.10\nwhat is it,None\nwho,NA\n")
    bb = make_backbone("t5")
    dm = Text2TextDataModule(bb.tokenizer, bb.collate, files={"train": str(path), "validation": str(path)},
                             source_column="document", target_column="summary")
    dm.setup("fit")
    assert [e["reference"] for e in dm.datasets["train"]] == ["007", "3.10", "None", "NA"]
    path.write_text("document,summary\nthe code is,\n")
    dm = Text2TextDataModule(bb.tokenizer, bb.collate, files={"train": str(path), "validation": str(path)},
                             source_column="document", target_column="summary")
    with pytest.raises(DataError, match=r"row 0: data.target_column='summary' is empty"):
        dm.setup("fit")


def test_own_files_beside_the_shipped_demo_test_file_are_refused(tmp_path):
    from eetrain.data.make_demo import DEMO_DIR

    bb = make_backbone("t5")
    own = _write(tmp_path / "own.jsonl", ROWS, "jsonl")
    demo_test = str(DEMO_DIR / "test.jsonl")
    with pytest.raises(ConfigError, match=r"data.files.train, data.files.validation are your own file\(s\), and "
                                          r"data.files.test still the shipped demo's \(test.jsonl, ...\): "
                                          r"set data.files.test=<your file>, or =null"):
        Text2TextDataModule(bb.tokenizer, bb.collate, files={"train": own, "validation": own, "test": demo_test})
    # the demo's own training data with a test file of yours is a choice, not a leftover
    Text2TextDataModule(bb.tokenizer, bb.collate, files={"train": str(DEMO_DIR / "train.jsonl"), "test": own})
    Text2TextDataModule(bb.tokenizer, bb.collate, files={"train": own, "validation": own, "test": None})


def test_a_wrong_hub_config_names_the_key_and_the_configs(tmp_path):
    ds = tmp_path / "ds"
    (ds / "de-en").mkdir(parents=True)
    for split in ("train", "validation"):
        (ds / "de-en" / f"{split}.jsonl").write_text(json.dumps({"document": "a .", "summary": "b ."}) + "\n")
    (ds / "README.md").write_text(
        "---\nconfigs:\n- config_name: de-en\n  data_files:\n  - split: train\n    path: de-en/train.jsonl\n"
        "  - split: validation\n    path: de-en/validation.jsonl\n---\n")
    bb = make_backbone("t5")
    dm = Text2TextDataModule(bb.tokenizer, bb.collate, hf_name=str(ds), hf_config="en-de",
                             source_column="document", target_column="summary")
    with pytest.raises(ConfigError, match=r"data.hf_config='en-de' is not a config of data.hf_name=.*de-en"):
        dm.setup("fit")
    dm = Text2TextDataModule(bb.tokenizer, bb.collate, hf_name=str(ds), hf_config="de-en",
                             source_column="document", target_column="summary")
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 1


def test_a_dataset_saved_with_save_to_disk_names_the_way_to_local_files(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    bb = make_backbone("t5")
    dm = Text2TextDataModule(bb.tokenizer, bb.collate, hf_name=str(tmp_path / "saved"),
                             source_column="document", target_column="summary")
    with pytest.raises(ConfigError, match=r"data.hf_name='.*saved' \(data.hf_config=None\) cannot be loaded: .*"
                                          r"save_to_disk.*; local files load with data.hf_name=null data.files.train="):
        dm.setup("fit")


def test_local_data_for_a_stage_on_an_export_needs_no_training_file(tmp_path):
    # conf/experiment/generate.yaml's own command: data=local with validation and test files only
    from hydra.utils import instantiate

    from eetrain.config import compose

    path = _write(tmp_path / "rows.jsonl", ROWS, "jsonl")
    cfg = compose(["data=local", f"data.files.validation={path}", f"data.files.test={path}",
                   "data.source_column=document", "data.target_column=summary"])
    bb = make_backbone("t5")
    dm = instantiate(cfg.data, tokenizer=bb.tokenizer, collate_fn=bb.collate)
    assert len(dm.split_examples("test")) == 3
    with pytest.raises(ConfigError, match=r"data.files.train is not set"):  # training still needs one
        dm.setup("fit")


def test_an_offline_dataset_cached_under_hf_home_is_found(tmp_path, monkeypatch):
    from eetrain import hub
    from eetrain.errors import HubUnreachableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # as the Docker images set it
    hub.hub_reachable.cache_clear()
    try:
        with pytest.raises(HubUnreachableError, match="not cached"):
            hub.check_dataset_reachable("abisee/cnn_dailymail")
        (tmp_path / "hf" / "datasets" / "abisee___cnn_dailymail").mkdir(parents=True)
        hub.check_dataset_reachable("abisee/cnn_dailymail")
        monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "elsewhere"))  # it wins over HF_HOME
        with pytest.raises(HubUnreachableError, match="not cached"):
            hub.check_dataset_reachable("abisee/cnn_dailymail")
    finally:
        hub.hub_reachable.cache_clear()
