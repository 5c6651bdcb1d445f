"""LLaMA (causal LM with exits) as recipes: completion-only labels, packed plain text, the experiments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from eetrain.config import compose
from eetrain.data.causal_lm import PackedTextDataModule
from eetrain.data.make_demo import DEMO_DIR
from eetrain.data.text2text import Text2TextDataModule, as_completion
from eetrain.errors import ConfigError, DataError, HubUnreachableError
from tests.conftest import make_backbone
from tests.in_process import cli

SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
         "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger=none",
         "callbacks=none"]
WORDS = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]


def bos_tokenizer() -> PreTrainedTokenizerFast:
    """A LLaMA-style tokenizer: bos (<s> = 0) first, no eos (</s> = 1) added; words a..j are ids 3..12."""
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --- prompt/completion pairs: the loss on the completion only ------------------------------------------
def test_completion_only_labels_hand_checked():
    bb = make_backbone("llama")
    examples = [{"source_ids": [5, 6, 7, 8, 1], "target_ids": [9, 10, 1]},
                {"source_ids": [11, 1], "target_ids": [12, 13, 14, 15, 1]}]
    batch = bb.collate(examples)
    x = -100
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 1, 9, 10, 1], [11, 1, 12, 13, 14, 15, 1, 0]]  # pad 0
    assert batch["attention_mask"].tolist() == [[1] * 8, [1] * 7 + [0]]
    assert batch["labels"].tolist() == [[x, x, x, x, x, 9, 10, 1], [x, x, 12, 13, 14, 15, 1, x]]
    # the forward shifts: position t is scored on token t + 1, so the source's last token predicts the
    # completion's first, the completion's last (eos) is predicted, and nothing predicts past the end
    states = bb(batch)
    assert states.labels.tolist() == [[x, x, x, x, 9, 10, 1, x], [x, 12, 13, 14, 15, 1, x, x]]
    assert int((states.labels != -100).sum()) == 3 + 5  # exactly the completion tokens
    # the same loss as the Hugging Face model's own (which shifts inside), at the last exit
    logits = bb.exit_logits(states.hidden[-1])
    ours = torch.nn.functional.cross_entropy(logits.flatten(0, 1), states.labels.flatten(), ignore_index=-100)
    hf = bb.model(**bb.model_inputs(batch), labels=batch["labels"]).loss
    torch.testing.assert_close(ours, hf)


def test_a_bos_tokenizer_s_completion_has_no_bos_and_ends_with_eos(tmp_path):
    assert as_completion([0, 5, 6], bos_id=0, eos_id=1) == [5, 6, 1]  # LLaMA: bos dropped, eos added
    assert as_completion([5, 6, 1], bos_id=None, eos_id=1) == [5, 6, 1]  # T5: unchanged
    assert as_completion([7, 7], bos_id=7, eos_id=7) == [7, 7]  # bos == eos (GPT-2 style): left alone
    files = {"train": write_jsonl(tmp_path / "t.jsonl", [{"source": "a b c", "target": "d e"}])}
    dm = Text2TextDataModule(bos_tokenizer(), None, files=files, prefix="")
    dm._load("train")
    (ex,) = dm.datasets["train"]
    assert ex["source_ids"] == [0, 3, 4, 5] and ex["target_ids"] == [6, 7, 1]
    # the demo tokenizer (T5-like: eos appended, no bos) keeps its ids
    dm = Text2TextDataModule(make_backbone("llama").tokenizer, None, files=files, prefix="")
    dm._load("train")
    assert dm.datasets["train"][0]["target_ids"][-1] == 1 and dm.datasets["train"][0]["target_ids"].count(1) == 1


# --- plain text, packed ----------------------------------------------------------------------------------
def packed(tmp_path: Path, tokenizer=None, **kwargs) -> PackedTextDataModule:
    docs = [{"text": "a b c"}, {"text": "   "}, {"text": "d e"}, {"text": "f g h i"}]
    files = {s: write_jsonl(tmp_path / f"{s}.jsonl", docs) for s in ("train", "validation", "test")}
    args = dict(files=files, block_size=4, prompt_length=2, max_target_length=2, batch_size=3)
    return PackedTextDataModule(tokenizer or bos_tokenizer(), make_backbone("llama").collate, **{**args, **kwargs})


def test_packing_hand_checked(tmp_path, capsys):
    dm = packed(tmp_path)
    dm.setup()
    blocks = dm.datasets["train"]
    # documents <s> a b c </s> | <s> d e </s> | <s> f g h i </s> (the blank one skipped): 15 tokens
    assert blocks.stream.tolist() == [0, 3, 4, 5, 1, 0, 6, 7, 1, 0, 8, 9, 10, 11, 1]
    assert [blocks[i]["target_ids"] for i in range(len(blocks))] == [[0, 3, 4, 5], [1, 0, 6, 7], [1, 0, 8, 9]]
    assert all(blocks[i]["source_ids"] == [] for i in range(3)) and blocks.dropped == 3  # 10 11 </s> dropped
    with pytest.raises(IndexError):
        blocks[3]
    out = capsys.readouterr().out
    assert ("[data] train: 3 documents (1 empty skipped), 15 tokens with an eos after each -> 3 blocks of 4 "
            "tokens; the last 3 tokens (less than a block) dropped") in out
    # the loader batches them through the LLaMA collate: every token a label, no padding; after the shift
    # each position is scored on the next token and a block's first token is never a target
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (3, 4) and bool(batch["attention_mask"].all())
    assert torch.equal(batch["labels"], batch["input_ids"])
    states = make_backbone("llama")(batch)
    assert torch.equal(states.labels[:, :-1], batch["input_ids"][:, 1:]) and bool((states.labels[:, -1] == -100).all())


def test_continuation_prompts_for_generation(tmp_path, capsys):
    dm = packed(tmp_path)
    examples = dm.split_examples("test")
    # the first 2 tokens of each document with more before its eos; the next 2 as the reference
    assert examples == [{"source_ids": [0, 3], "target_ids": [4, 5]}, {"source_ids": [0, 6], "target_ids": [7, 1]},
                        {"source_ids": [0, 8], "target_ids": [9, 10]}]
    assert dm.split_examples("test") is examples  # loaded once
    assert "[data] test: 3 continuation prompts" in capsys.readouterr().out
    dm = packed(tmp_path, prompt_length=3, max_target_length=8)
    assert dm.split_examples("test") == [{"source_ids": [0, 3, 4], "target_ids": [5, 1]},
                                         {"source_ids": [0, 8, 9], "target_ids": [10, 11, 1]}]  # <s> d e: skipped
    assert dm.metric is None  # the task-metric callback skips plain text


def test_task_metric_callback_skips_plain_text(tmp_path):
    from types import SimpleNamespace

    from eetrain.decoding.callback import GenerationMetrics

    dm = packed(tmp_path)
    dm.split_examples = None  # no metric: the callback must not even ask for prompts
    callback = GenerationMetrics()
    callback.on_validation_epoch_end(SimpleNamespace(sanity_checking=False, datamodule=dm),
                                     SimpleNamespace(backbone=make_backbone("llama")))
    assert callback.runs == 1


def test_demo_tokenizer_eos_is_not_doubled_and_txt_files_are_paragraphs(tmp_path):
    (tmp_path / "train.txt").write_text("Police in\nLeeds said\n\n\nroads were quiet\n")  # 2 documents
    tok = make_backbone("llama").tokenizer  # the demo tokenizer appends </s> itself
    dm = PackedTextDataModule(tok, None, files={"train": str(tmp_path / "train.txt")}, block_size=2)
    dm._load("train")
    first, second = tok("Police in\nLeeds said")["input_ids"], tok("roads were quiet")["input_ids"]
    assert first[-1] == second[-1] == tok.eos_token_id
    assert dm.datasets["train"].stream.tolist() == first + second  # one eos each, the hard wrap kept inside
    assert dm.datasets["train"].starts.tolist() == [0, len(first), len(first) + len(second)]


def test_text_template_joins_columns(tmp_path):
    files = {"train": write_jsonl(tmp_path / "t.jsonl", [{"title": "a b", "body": "c"}])}
    dm = PackedTextDataModule(bos_tokenizer(), None, files=files, text_template="{title} {body}", block_size=2)
    dm._load("train")
    assert dm.datasets["train"].stream.tolist() == [0, 3, 4, 5, 1]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(text_column="body"), DataError, r"data.files.train='.*train.jsonl' has no column data.text_column='body'"),
        (dict(text_template="{title}: {body}"), DataError, r"has no column 'title' \(named in data.text_template\)"),
        (dict(block_size=64), DataError, r"data.train_split='train': 15 tokens in 3 documents make no block of "
                                         r"data.block_size=64 tokens"),
        (dict(files={"validation": "v.jsonl"}), ConfigError, r"data.files.train is not set; .*\.txt file"),
        (dict(files={"train": "x.xml"}), DataError, r"data.files.train='x.xml': no such file"),
        (dict(block_size=1), ConfigError, r"data.block_size=1; allowed: an integer >= 2"),
        (dict(prompt_length=0), ConfigError, r"data.prompt_length=0; allowed: an integer >= 1"),
        (dict(metrics=["rougeL"]), ConfigError, r"data.metrics=\['rougeL'\] needs data.metric"),
        (dict(metric="accuracy"), ConfigError, r"data.metrics"),
        (dict(text_template="{0}"), ConfigError, r"data.text_template='\{0\}' must name columns"),
    ],
)
def test_packed_errors_name_the_key(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        packed(tmp_path, **kwargs).setup()


def test_packed_unknown_format_and_short_documents(tmp_path):
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(DataError, match=r"unknown format; allowed: .csv, .json, .jsonl, .parquet, .txt"):
        packed(tmp_path, files={"train": str(tmp_path / "x.xml")}).setup()
    with pytest.raises(DataError, match=r"split 'test': no document is longer than data.prompt_length=9 tokens"):
        packed(tmp_path, prompt_length=9).split_examples("test")


def test_packed_hub_dataset_offline_fails_at_once_naming_the_column_key():
    with pytest.raises(HubUnreachableError, match=r"(?s)data.hf_name='org/nowhere' is a hub dataset.*"
                                                  r"data.files.train=.*data.text_column='page'"):
        PackedTextDataModule(bos_tokenizer(), None, hf_name="org/nowhere", text_column="page")


# --- the experiments -----------------------------------------------------------------------------------
def test_llama_experiments_are_the_recipes():
    cfg = compose(["+experiment=llama_demo"])
    assert cfg.model._target_.endswith("LlamaBackbone") and cfg.model.config.num_hidden_layers == 8
    assert cfg.data._target_.endswith("Text2TextDataModule") and cfg.data.prefix == "summarize: "
    assert list(cfg.stages) == ["generate"] and cfg.decoding.max_examples == 100 and cfg.trainer.accelerator == "cpu"

    cfg = compose(["+experiment=layerskip_llama"])
    assert cfg.model.name_or_path == "meta-llama/Llama-3.2-1B" and cfg.model.lora.r == 16
    assert cfg.loss.layer_dropout.p_max == 0.2 and cfg.loss.terms.ce.curriculum.kind == "rotational"
    assert cfg.loss.terms.ce.weights == "sum_l"
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.data._target_.endswith("PackedTextDataModule") and cfg.data.hf_name == "EleutherAI/wikitext_document_level"
    assert cfg.decoding.strategy == "self_speculative" and list(cfg.stages) == ["generate"]

    cfg = compose(["+experiment=natural_llama"])
    assert cfg.train is False and cfg.model.lora is None and cfg.model.exit_head == "shared"
    assert list(cfg.stages) == ["policies", "generate"] and cfg.data.hf_name is None


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory) -> Path:
    """A tiny random LLaMA (6 layers, the demo tokenizer) written with save_pretrained."""
    path = tmp_path_factory.mktemp("llama") / "tiny"
    make_backbone("llama", num_hidden_layers=6).save_pretrained(str(path))
    return path


def test_natural_llama_adds_no_parameters(saved_llama):
    from hydra.utils import instantiate

    from eetrain.backbones import LlamaBackbone

    cfg = compose(["+experiment=natural_llama", f"model.name_or_path={saved_llama}"])
    bb = instantiate(cfg.model)
    plain = LlamaBackbone(name_or_path=str(saved_llama))
    assert bb.exit_heads is None and getattr(bb, "_peft", None) is None
    assert sum(p.numel() for p in bb.parameters()) == sum(p.numel() for p in plain.model.parameters())
    batch = bb.collate([{"source_ids": [5, 6, 7], "target_ids": [8, 1]}])
    torch.testing.assert_close(bb.exit_logits(bb(batch).hidden[-1]), bb.model_logits(batch))


def test_natural_llama_decodes_with_what_its_policies_stage_certified(tmp_path, saved_llama):
    """The recipe sets no decoding.policy, so a threshold its own calibration certified is the one used
    (a measure or threshold in the recipe would override it); none certified: softmax gap 0.9."""
    from hydra.utils import instantiate

    from eetrain.decoding.settings import run_policy_fields

    cfg = compose(["+experiment=natural_llama", f"model.name_or_path={saved_llama}", "exit.min_exit_layer=2"])
    bb = instantiate(cfg.model)
    fields, where = run_policy_fields(cfg, bb, tmp_path, str(saved_llama))
    assert (fields["measure"], fields["threshold"], fields["min_exit_layer"]) == ("softmax_gap", 0.9, 2)
    (tmp_path / "calibration.json").write_text(json.dumps([{"policy": "softmax_gap", "threshold": 0.37}]))
    fields, where = run_policy_fields(cfg, bb, tmp_path, str(saved_llama))
    assert (fields["measure"], fields["threshold"], fields["min_exit_layer"]) == ("softmax_gap", 0.37, 2)
    assert fields["calibrated"] is True and where == str(tmp_path)


def test_layerskip_llama_offline_stops_with_the_hub_message(tmp_path, saved_llama):
    r = cli("+experiment=layerskip_llama", f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "model.name_or_path='meta-llama/Llama-3.2-1B' is a hub name" in r.stderr
    assert "Point model.name_or_path at a local directory" in r.stderr
    # a local model: then the dataset is what needs the hub, and the message says how to use local files
    r = cli("+experiment=layerskip_llama", f"model.name_or_path={saved_llama}", f"hydra.run.dir={tmp_path / 'b'}",
            cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "data.hf_name='EleutherAI/wikitext_document_level' is a hub dataset" in r.stderr
    assert "data.hf_name=null data.files.train=" in r.stderr and "data.text_column='page'" in r.stderr
    assert "Traceback" not in r.stderr


# --- end to end through the CLI ------------------------------------------------------------------------
@pytest.mark.slow
def test_llama_demo_short_run_reports_layers_and_generation(tmp_path):
    out = tmp_path / "run"
    r = cli("+experiment=llama_demo", f"hydra.run.dir={out}", *SHORT, "decoding.max_examples=6",
            "decoding.max_new_tokens=12", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Per-layer validation report" in r.stdout
    table = r.stdout.split("Per-layer validation report")[1].splitlines()
    assert table[1].split() == ["layer", "loss", "top1_acc", "agree_last"]
    assert [int(line.split()[0]) for line in table[2:10]] == list(range(1, 9))
    assert "Early-exit generation (greedy)" in r.stdout and "speed-up" in r.stdout
    summary = json.loads((out / "generation_summary.json").read_text())
    assert summary["examples"] == 6 and summary["num_layers"] == 8 and summary["strategy"] == "copy"
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert rows[0]["source"].startswith("summarize:")
    assert all(2 <= e <= 8 for row in rows for e in row["exit_layers"])  # exit.min_exit_layer=2
    assert json.loads((out / "export" / "early_exit.json").read_text())["family"] == "llama"


@pytest.mark.slow
def test_layerskip_llama_on_local_text_files(tmp_path, saved_llama):
    """The recipe's documented offline fallback, shortened: LayerSkip loss on packed local text, then
    self-speculative decoding, which reproduces the full model's output exactly."""
    rows = [json.loads(line) for line in (DEMO_DIR / "validation.jsonl").read_text().splitlines()]
    docs = [{"page": f"{r['source']} {r['target']}"} for r in rows]
    files = {"train": docs[:200], "validation": docs[200:260], "test": docs[260:280]}
    paths = [f"data.files.{s}={write_jsonl(tmp_path / f'{s}.jsonl', d)}" for s, d in files.items()]
    out = tmp_path / "run"
    r = cli("+experiment=layerskip_llama", f"model.name_or_path={saved_llama}", "data.hf_name=null", *paths,
            "trainer=cpu", "data.block_size=64", "data.num_workers=0", "data.prompt_length=16", *SHORT,
            "trainer.accumulate_grad_batches=1", "trainer.val_check_interval=1.0", "decoding.max_examples=3", "decoding.max_new_tokens=10",
            f"hydra.run.dir={out}", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "blocks of 64 tokens; the last" in r.stdout and "Per-layer validation report" in r.stdout
    summary = json.loads((out / "generation_summary.json").read_text())
    assert summary["strategy"] == "self_speculative" and summary["examples"] == 3
    assert summary["token_consistency"] == 1.0 and summary["sequence_consistency"] == 1.0  # lossless


@pytest.mark.slow
def test_natural_llama_on_a_saved_model_without_training(tmp_path, saved_llama):
    out = tmp_path / "run"
    r = cli("+experiment=natural_llama", f"model.name_or_path={saved_llama}", f"hydra.run.dir={out}",
            "exit.min_exit_layer=2", "exit.record.max_tokens=2000", "exit.calibration.online=false",
            "decoding.max_examples=4", "decoding.max_new_tokens=8", "data.eval_batch_size=64",
            cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Per-layer validation report" in r.stdout and "Early-exit generation (greedy)" in r.stdout
    assert (out / "policies.csv").is_file() and (out / "calibration.json").is_file()
    summary = json.loads((out / "generation_summary.json").read_text())
    assert summary["examples"] == 4 and summary["strategy"] == "parallel" and summary["num_layers"] == 6
    assert not (out / "export").exists() and not (out / "checkpoints").exists()  # nothing trained or written
    # generate decoded with what this run's policies stage calibrated, not the loaded model's defaults
    calibrated = json.loads((out / "calibration.json").read_text())[0]
    if calibrated["threshold"] is not None:
        assert summary["policy"] == f"{calibrated['policy']}:{calibrated['threshold']:g}"
        assert "calibrated_here" not in summary
    else:  # none certified: the hint names this run's calibration, not an export the recipe does not write
        assert summary["calibrated_here"] is True
        if summary["mean_exit_layer"] >= summary["num_layers"]:
            assert "this run's policies stage certified none" in r.stdout


def test_blocks_past_the_models_positions_get_a_note(tmp_path, capsys):
    llama = make_backbone("llama")  # max_position_embeddings=128
    packed(tmp_path, llama.tokenizer).check_fits(llama)
    assert "note" not in capsys.readouterr().out
    packed(tmp_path, llama.tokenizer, block_size=256).check_fits(llama)
    out = capsys.readouterr().out
    assert "[data] note: data.block_size=256 / data.prompt_length + data.max_target_length=4 reach position 256, " \
           "past the model's 128 positions (model.config.max_position_embeddings)" in out
    packed(tmp_path, llama.tokenizer, prompt_length=100, max_target_length=100).check_fits(llama)
    assert "reach position 200, past the model's 128 positions" in capsys.readouterr().out
