"""The shipped demo dataset and tokenizer (``eetrain/data/demo``) are reproducible, well-formed and offline."""

from __future__ import annotations

import json
import socket
import unicodedata
from pathlib import Path
from typing import Any

import pytest

from eetrain.data.make_demo import DEMO_DIR, SOURCE_WORDS, SPLIT_FILES, SPLIT_SIZES, TARGET_WORDS, write_demo

TOKENIZER_DIR = DEMO_DIR / "tokenizer"
REGENERATE_HINT = "shipped demo data is stale: rerun `python -m eetrain.data.make_demo` and commit the result"


def _files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def _rows(split: str) -> list[dict[str, Any]]:
    with (DEMO_DIR / SPLIT_FILES[split]).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).split())


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    write_demo(out)
    return out


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    # Offline mode plus a socket that refuses to connect: loading must not even try the Hub.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")

        def refuse(*args: object, **kwargs: object) -> None:
            raise OSError("network access attempted while loading the demo tokenizer")

        mp.setattr(socket.socket, "connect", refuse)
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    assert isinstance(tok, PreTrainedTokenizerFast)
    return tok


def test_regeneration_is_byte_identical(regenerated: Path) -> None:
    shipped = _files(DEMO_DIR)
    assert shipped == _files(regenerated), REGENERATE_HINT
    assert Path("tokenizer/tokenizer.json") in shipped
    for rel in shipped:
        assert (DEMO_DIR / rel).read_bytes() == (regenerated / rel).read_bytes(), f"{rel}: {REGENERATE_HINT}"


def test_rows_and_columns() -> None:
    sources: set[str] = set()
    for split, n_rows in SPLIT_SIZES.items():
        raw = (DEMO_DIR / SPLIT_FILES[split]).read_bytes()
        assert b"\r" not in raw and raw.endswith(b"\n")
        rows = _rows(split)
        assert len(rows) == n_rows
        for row in rows:
            assert set(row) == {"source", "target"}
            assert isinstance(row["source"], str) and isinstance(row["target"], str)
            assert SOURCE_WORDS[0] <= len(row["source"].split()) <= SOURCE_WORDS[1]
            assert TARGET_WORDS[0] <= len(row["target"].split()) <= TARGET_WORDS[1]
        split_sources = {row["source"] for row in rows}
        assert len(split_sources) == n_rows, f"duplicate sources in {split}"
        assert not split_sources & sources, f"{split} overlaps an earlier split"
        sources |= split_sources


def test_size_under_5_mb() -> None:
    assert sum((DEMO_DIR / name).stat().st_size for name in SPLIT_FILES.values()) < 5 * 1024 * 1024


def test_special_tokens_match_t5(tokenizer: Any) -> None:
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    assert len(tokenizer) <= 1000


def test_eos_appended(tokenizer: Any) -> None:
    row = _rows("validation")[0]
    enc = tokenizer(row["source"], text_target=row["target"])
    for ids in (enc["input_ids"], enc["labels"]):
        assert ids[-1] == tokenizer.eos_token_id
        assert ids.count(tokenizer.eos_token_id) == 1
    batch = tokenizer([row["source"], row["target"]], padding=True)
    assert batch["input_ids"][1][-1] == tokenizer.pad_token_id  # the shorter one is right-padded


def test_decode_round_trip(tokenizer: Any) -> None:
    for row in _rows("validation"):
        ids = tokenizer(row["target"]).input_ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == _normalise(row["target"])


def test_unk_rate_on_validation(tokenizer: Any) -> None:
    texts = [text for row in _rows("validation") for text in (row["source"], row["target"])]
    ids = [i for enc in tokenizer(texts, add_special_tokens=False).input_ids for i in enc]
    assert ids.count(tokenizer.unk_token_id) / len(ids) < 0.01
