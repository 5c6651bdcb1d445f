"""The analysis toolkit (eetrain/analysis/) on real tiny T5, LLaMA and BERT models, no mocks: the streamed
per-layer records against the models' own forward passes, the sub-layer capture, greedy targets, the
`analyze` stage end to end (one model, a comparison, greedy targets, a classifier) and its bad input."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from transformers import AutoTokenizer

from eetrain.analysis.collect import LayerRecords, collect, example_batches, greedy_examples
from eetrain.analysis.stage import analyze_settings, check_config, run_stage
from eetrain.analysis.sublayer import sublayer_rows
from eetrain.backbones import T5Backbone
from eetrain.checkpointing import export_pretrained
from eetrain.config import compose
from eetrain.decoding.calibration import batches as prompt_batches
from eetrain.decoding.generate import generate
from eetrain.errors import ConfigError
from tests.conftest import TINY, TOKENIZER, make_backbone
from tests.in_process import cli

FAMILIES = ("t5", "llama", "bert")
SUBLAYERS = {"t5": ("attention", "cross_attention", "mlp"), "llama": ("attention", "mlp"), "bert": ("attention", "mlp")}
TENSORS = ("preds", "top2", "entropies", "p_final", "top10_final", "cos_final", "saturation", "labels", "positions",
           "sequence_ids", "hidden", "h0")
ANALYSIS_FILES = ("agreement", "oracle", "confidence", "gating", "gating_summary", "saturation", "saturation_layers",
                  "subword", "sublayer", "suitability")
PLOTS = ("agreement", "oracle", "confidence", "gating", "saturation", "subword", "sublayer", "suitability")
SIZE = 3  # examples per batch: 8 examples -> batches of 3, 3, 2


def make_examples(n: int = 8) -> list[dict]:
    """`n` examples of different lengths (ids of the 441-piece demo vocabulary, targets end in eos = 1)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        src = torch.randint(5, 400, (2 + (3 * i) % 7,), generator=g).tolist()
        tgt = torch.randint(5, 400, (1 + (5 * i) % 6,), generator=g).tolist() + [1]
        out.append({"source_ids": src + [1], "target_ids": tgt, "label": i % 3})
    return out


def scored(backbone, batch) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """The model's own logits, its layer states and its labels at the scored positions of `batch`."""
    with torch.no_grad():
        states = backbone(batch)
        logits = backbone.model_logits(batch).float()
    if backbone.head_kind == "sequence":
        return logits, [h[:, 0] for h in states.hidden], states.labels
    keep = states.labels != -100
    return logits[keep], [h[keep] for h in states.hidden], states.labels[keep]


def assert_same_records(a: LayerRecords, b: LayerRecords, n: int | None = None) -> None:
    """`a` equals `b` (or `b`'s first `n` tokens), field by field."""
    cut = slice(None) if n is None else slice(0, n)
    for name in TENSORS:
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            assert x is None and y is None, name
            continue
        y = y[cut] if name in ("labels", "positions", "sequence_ids", "h0") else y[:, cut]
        # (chunks of other sizes take other GEMM blockings on some CPUs: float32 rounding, e.g. 1.4e-6 on an
        # entropy of 5.7 nats with AMD's MKL path)
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6, equal_nan=True, msg=name)
    assert a.sublayer.keys() == b.sublayer.keys()
    for point in a.sublayer:
        torch.testing.assert_close(a.sublayer[point], b.sublayer[point][:, cut], rtol=1e-6, atol=1e-6, msg=point)


class Counter:
    """A tqdm stand-in counting the batches `collect` reads."""

    def __init__(self) -> None:
        self.n = 0

    def update(self, k: int) -> None:
        self.n += k


@pytest.fixture(scope="module")
def tiny():
    """Per family: the tiny model (eval), 8 examples in 3 batches, and their records (hidden states and
    sub-layers kept), built once for the module."""
    out = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        bb = make_backbone(family).eval()
        ex = make_examples()
        batches = example_batches(bb, ex, SIZE)
        out[family] = (bb, ex, batches, collect(bb, batches, keep_hidden=True, sublayer=True))
    return out


# --- collect --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_collect_fields_match_the_models_own_forward(tiny, family):
    bb, ex, batches, rec = tiny[family]
    L, d = bb.num_layers, bb.hidden_size
    ref = [scored(bb, b) for b in batches]
    logits = torch.cat([r[0] for r in ref])
    hidden = torch.stack([torch.cat([r[1][i] for r in ref]) for i in range(L)])
    N = logits.shape[0]
    if family == "bert":  # one record per example: its class label
        assert N == len(ex) and rec.head_kind == "sequence" and rec.vocab_size == 3
        assert rec.labels.tolist() == [e["label"] for e in ex]
        assert rec.positions.tolist() == [1] * N and rec.sequence_ids.tolist() == list(range(N))
    else:  # every target token is scored (LLaMA: on the position before it)
        assert N == sum(len(e["target_ids"]) for e in ex) and rec.head_kind == "token"
        assert rec.vocab_size == len(bb.tokenizer)
        assert rec.labels.tolist() == [t for e in ex for t in e["target_ids"]]
        assert rec.positions.tolist() == [i + 1 for e in ex for i in range(len(e["target_ids"]))]
        assert rec.sequence_ids.tolist() == [j for j, e in enumerate(ex) for _ in e["target_ids"]]
    assert (rec.num_layers, rec.num_tokens) == (L, N)
    for name, shape in {"preds": (L, N), "top2": (L, N, 2), "entropies": (L, N), "p_final": (L, N),
                        "top10_final": (L, N), "cos_final": (L + 1, N), "saturation": (L, N), "labels": (N,),
                        "positions": (N,), "sequence_ids": (N,), "hidden": (L, N, d), "h0": (N, d)}.items():
        assert tuple(getattr(rec, name).shape) == shape, name
    assert rec.preds.dtype == torch.long and rec.labels.dtype == torch.long
    # the last layer is the model itself
    assert torch.equal(rec.preds[-1], logits.argmax(-1))
    probs = logits.softmax(-1)
    torch.testing.assert_close(rec.top2[-1], probs.topk(2, -1).values, rtol=0, atol=1e-5)
    torch.testing.assert_close(rec.p_final[-1], probs.max(-1).values, rtol=0, atol=1e-5)
    torch.testing.assert_close(rec.p_final[-1], rec.top2[-1, :, 0], rtol=0, atol=1e-6)
    assert torch.equal(rec.top10_final[-1], torch.ones(N))
    torch.testing.assert_close(rec.cos_final[-1], torch.ones(N), rtol=0, atol=1e-5)
    # the kept hidden states are the backbone's, at the scored positions
    torch.testing.assert_close(rec.hidden, hidden, rtol=0, atol=0)
    torch.testing.assert_close(rec.saturation[1:], torch.nn.functional.cosine_similarity(hidden[1:], hidden[:-1], dim=-1))
    # sane ranges everywhere
    assert bool((rec.top2[..., 0] >= rec.top2[..., 1]).all()) and bool((rec.entropies >= 0).all())
    for name in ("p_final", "top10_final"):
        x = getattr(rec, name)
        assert bool(((x >= 0) & (x <= 1 + 1e-6)).all()), name
    assert bool(torch.isfinite(rec.cos_final).all()) and bool((rec.cos_final.abs() <= 1 + 1e-5).all())
    assert bool(torch.isfinite(rec.saturation).all())  # layer 1 is compared with the captured h0
    torch.testing.assert_close(rec.cos_final[0], torch.nn.functional.cosine_similarity(rec.h0, hidden[-1], dim=-1))
    ee = rec.exit_records()
    assert torch.equal(ee.predictions, rec.preds) and ee.vocab_size == rec.vocab_size


@pytest.mark.parametrize("family", FAMILIES)
def test_collect_streaming_and_max_tokens_do_not_change_results(tiny, family):
    bb, _, batches, rec = tiny[family]
    small = collect(bb, batches, keep_hidden=True, sublayer=True, chunk_size=2)
    assert_same_records(small, rec)
    plain = collect(bb, batches)
    assert plain.hidden is None and plain.h0 is None and plain.sublayer == {}
    assert_same_records(LayerRecords(**{**plain.__dict__, "hidden": rec.hidden, "h0": rec.h0,
                                        "sublayer": rec.sublayer}), rec)
    # a cap inside the second batch: the first `cap` tokens, and the third batch is never read
    cap = int((rec.sequence_ids < SIZE).sum()) + 2
    bar = Counter()
    capped = collect(bb, batches, keep_hidden=True, sublayer=True, max_tokens=cap, chunk_size=3, progress=bar)
    assert capped.num_tokens == cap and bar.n == 2 and len(batches) == 3
    assert_same_records(capped, rec, n=cap)


@pytest.mark.parametrize("family", ("t5", "llama"))
def test_collect_normed_features_put_saturation_and_hidden_in_the_final_norms_space(tiny, family):
    backbone = tiny[family][0]
    batch = backbone.collate(make_examples(4))
    rec = collect(backbone, [batch], keep_hidden=True, features="normed")
    raw = collect(backbone, [batch], keep_hidden=True)
    _, hs, _ = scored(backbone, batch)
    with torch.no_grad():
        normed = [backbone.final_norm(h).float() for h in hs]
    torch.testing.assert_close(rec.hidden, torch.stack(normed), rtol=0, atol=1e-6)
    for i in range(1, len(hs)):
        want = torch.nn.functional.cosine_similarity(normed[i], normed[i - 1], dim=-1)
        torch.testing.assert_close(rec.saturation[i], want, rtol=0, atol=1e-5)
    # what does not depend on the space stays the same: predictions and the layer-to-final similarity
    assert torch.equal(rec.preds, raw.preds) and torch.allclose(rec.cos_final, raw.cos_final, equal_nan=True)


def test_collect_refuses_batches_without_scored_tokens(tiny):
    bb, ex, _, _ = tiny["t5"]
    batch = bb.collate(ex[:2])
    batch["labels"][:] = -100
    with pytest.raises(ValueError, match="no scored tokens"):
        collect(bb, [batch])


# --- sub-layers -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_sublayer_capture_reproduces_each_block(tiny, family):
    bb, _, _, rec = tiny[family]
    L, N = rec.num_layers, rec.num_tokens
    names = SUBLAYERS[family]
    assert list(rec.sublayer) == [f"{n}.{kind}" for n in names for kind in ("stream", "output")]
    for point, stats in rec.sublayer.items():
        assert tuple(stats.shape) == (L, N, 3), point
        assert bool(((stats >= 0) & (stats <= 1)).all()), point
    # the residual stream after the last sub-layer is the block's output at every layer
    last = rec.sublayer[f"{names[-1]}.stream"]
    assert torch.equal(last[:, :, 0], (rec.preds == rec.preds[-1]).float())
    torch.testing.assert_close(last[:, :, 1], rec.top10_final, rtol=0, atol=1e-6)
    rows = sublayer_rows(rec)
    assert len(rows) == L * len(names) * 2
    assert {r["sublayer"] for r in rows} == set(names) and {r["kind"] for r in rows} == {"stream", "output"}
    top = [r for r in rows if r["layer"] == L and r["sublayer"] == names[-1] and r["kind"] == "stream"]
    assert top[0]["top1_final"] == 1.0 and top[0]["topk_final"] == pytest.approx(1.0)


# --- greedy targets -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["t5", "llama"])
def test_greedy_examples_are_the_full_models_output(tiny, family):
    bb, ex, _, _ = tiny[family]
    ex = ex[:5]
    bar = Counter()
    out = greedy_examples(bb, ex, 2, max_new_tokens=6, progress=bar)
    assert bar.n == 3 and len(out) == len(ex)
    for e, o, prompt in zip(ex, out, prompt_batches(bb, ex, 1), strict=True):
        (want,) = generate(bb, prompt, None, max_new_tokens=6).sequences()  # one at a time: no padding
        assert o["target_ids"] == want and o["source_ids"] == e["source_ids"] and o["label"] == e["label"]
        assert 1 <= len(want) <= 6 and (len(want) == 6 or want[-1] == bb.eos_token_id)
    # teacher-forced on its own greedy output, the last layer predicts exactly those tokens
    rec = collect(bb, example_batches(bb, out, 2))
    assert rec.num_tokens == sum(len(o["target_ids"]) for o in out)
    assert torch.equal(rec.preds[-1], rec.labels)


# --- the stage ------------------------------------------------------------------------------------------
def stage_cfg(tmp_path, *overrides: str, model: str = "t5_tiny", data: str = "demo"):
    return compose([f"model={model}", f"data={data}", "stages=[analyze]", f"paths.output_dir={tmp_path}",
                    "analyze.max_examples=8", "analyze.batch_size=4", *overrides])


def build(cfg):
    bb = instantiate(cfg.model)
    return bb, instantiate(cfg.data, tokenizer=bb.tokenizer, collate_fn=bb.collate)


def csv(out, name: str) -> pd.DataFrame:
    return pd.read_csv(out / f"{name}.csv")


def test_stage_writes_every_analysis_for_two_models(tmp_path, capsys):
    other = T5Backbone(config={**TINY["t5"], "num_layers": 2, "num_decoder_layers": 2}, tokenizer=TOKENIZER, seed=7)
    export = export_pretrained(other, tmp_path / "other" / "export", {"family": "t5", "num_layers": 2})
    out = tmp_path / "run"
    cfg = stage_cfg(out, f"analyze.compare={export}")
    bb, data = build(cfg)
    check_config(cfg, bb)
    summary = run_stage(cfg, bb, data, out)
    for name in ANALYSIS_FILES:
        assert (out / f"{name}.csv").is_file(), name
    for name in PLOTS:
        assert (out / f"{name}.png").stat().st_size > 0, name
    names = ["model", "other"]  # a config-built model; an export is named after its run directory
    for name in ANALYSIS_FILES:
        assert sorted(set(csv(out, name).model)) == names, name
    depth = {"model": 4, "other": 2}
    for name in ("agreement", "oracle", "confidence"):
        table = csv(out, name)
        for m, L in depth.items():
            assert list(table[table.model == m].layer) == list(range(1, L + 1)), (name, m)
    agree = csv(out, "agreement")
    assert list(agree.groupby("model").agree.last()) == [1.0, 1.0]
    oracle = csv(out, "oracle")
    assert list(oracle.groupby("model").tokens.sum()) == [summary["models"][0]["tokens"]] * 2  # the same tokens
    assert list(oracle.groupby("model").cumulative.last()) == pytest.approx([1.0, 1.0])
    sub = csv(out, "sublayer")
    assert set(sub.sublayer) == {"attention", "cross_attention", "mlp"} and set(sub.kind) == {"stream", "output"}
    suit = csv(out, "suitability")
    assert sorted(suit["rank"]) == [1, 2] and set(suit.model) == set(names)
    assert list(suit.set_index("model").num_layers[names]) == [4, 2]
    assert suit.set_index("model").relative_score["model"] == pytest.approx(1.0)
    written = json.loads((out / "analysis_summary.json").read_text())
    assert [m["model"] for m in written["models"]] == names and len(written["suitability"]) == 2
    assert written["models"][0]["examples"] == 8 and written["models"][0]["target"] == "reference"
    assert written["settings"]["analyses"] == list(PLOTS)
    printed = capsys.readouterr().out
    assert "Early-exit suitability" in printed and "analysis_summary.json" in printed


def test_stage_on_greedy_targets(tmp_path):
    cfg = stage_cfg(tmp_path, "analyze.target=greedy", "analyze.max_new_tokens=5", "analyze.max_examples=4",
                    "analyze.analyses=[agreement,oracle,subword]")
    bb, data = build(cfg)
    check_config(cfg, bb)
    summary = run_stage(cfg, bb, data, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{n}.{x}" for n in ("agreement", "oracle", "subword") for x in ("csv", "png")] + ["analysis_summary.json"])
    (model,) = summary["models"]
    assert model["target"] == "greedy" and model["tokens"] <= 4 * 5
    # teacher-forced on the model's own greedy output, the last layer is always "right"
    assert csv(tmp_path, "agreement").accuracy.iloc[-1] == 1.0
    assert summary["files"] == sorted(f"{n}.{x}" for n in ("agreement", "oracle", "subword") for x in ("csv", "png"))


def test_a_rerun_in_the_same_directory_names_the_earlier_files(tmp_path, capsys):
    bb, data = build(cfg := stage_cfg(tmp_path, "analyze.max_examples=2", "analyze.analyses=[agreement,oracle]"))
    run_stage(cfg, bb, data, tmp_path)
    cfg = stage_cfg(tmp_path, "analyze.max_examples=2", "analyze.analyses=[oracle]")
    capsys.readouterr()
    run_stage(cfg, bb, data, tmp_path)
    out = capsys.readouterr().out
    assert f"[analyze] left from an earlier analysis in {tmp_path}, not this run's: agreement.csv, agreement.png" in out
    assert (tmp_path / "agreement.csv").is_file()  # kept: nothing is deleted


def test_stage_on_a_classifier_skips_subword(tmp_path, capsys):
    cfg = stage_cfg(tmp_path, "model.config.num_hidden_layers=3", model="bert_tiny", data="demo_classification")
    bb, data = build(cfg)
    check_config(cfg, bb)
    summary = run_stage(cfg, bb, data, tmp_path)
    assert "subword skipped" in capsys.readouterr().out
    assert not (tmp_path / "subword.csv").exists() and not (tmp_path / "subword.png").exists()
    for name in set(ANALYSIS_FILES) - {"subword"}:
        assert (tmp_path / f"{name}.csv").is_file(), name
    for name in set(PLOTS) - {"subword"}:
        assert (tmp_path / f"{name}.png").is_file(), name
    (model,) = summary["models"]
    assert model["unit"] == "example" and model["tokens"] == model["examples"] == 8
    assert set(csv(tmp_path, "sublayer").sublayer) == {"attention", "mlp"}
    assert list(csv(tmp_path, "oracle").layer) == [1, 2, 3]
    with pytest.raises(ConfigError, match="analyze.target=greedy needs a token head"):
        check_config(stage_cfg(tmp_path, "analyze.target=greedy", model="bert_tiny", data="demo_classification"), bb)


def test_stage_refuses_another_tokenizer_unless_told(tmp_path):
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    tok.add_tokens(["zzqxv"])  # one more piece: another vocabulary, built offline
    tok.save_pretrained(tmp_path / "tok")
    other = T5Backbone(config=TINY["t5"], tokenizer=str(tmp_path / "tok"), seed=3)
    assert len(other.tokenizer) == len(tok)
    other.save_pretrained(str(tmp_path / "bigger"))
    cfg = stage_cfg(tmp_path / "run", f"analyze.compare={tmp_path / 'bigger'}", "analyze.max_examples=2",
                    "analyze.analyses=[oracle]")
    bb, data = build(cfg)
    for stage in (lambda: check_config(cfg, bb), lambda: run_stage(cfg, bb, data, tmp_path / "run")):
        with pytest.raises(ConfigError) as info:  # before training already, and again once it loads
            stage()
        msg = str(info.value)
        assert msg.startswith(f"analyze.compare={str(tmp_path / 'bigger')!r} has another tokenizer")
        assert "analyze.same_tokenizer=false" in msg
    cfg = stage_cfg(tmp_path / "run", f"analyze.compare={tmp_path / 'bigger'}", "analyze.max_examples=2",
                    "analyze.analyses=[oracle]", "analyze.same_tokenizer=false")
    run_stage(cfg, bb, data, tmp_path / "run")
    assert sorted(set(csv(tmp_path / "run", "oracle").model)) == ["bigger", "model"]


# --- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["analyze.analyses=[oracle,vibes]"], "analyze.analyses[1]='vibes'; allowed: agreement, oracle, confidence"),
    (["analyze.target=bogus"], "analyze.target='bogus'; allowed: reference, greedy"),
    (["+analyze.bogus=1"], "analyze: unknown key(s) ['bogus']"),
    (["analyze.batch_size=0"], "analyze.batch_size=0; allowed: an integer >= 1"),
    (["analyze.min_exit_layer=9"], "analyze.min_exit_layer=9; allowed: 1..3"),
    (["analyze.consistency=1.5"], "analyze.consistency=1.5; allowed: a number in [0, 1]"),
    (["analyze.models=[EMPTY]"], "analyze.models[0]='EMPTY': no exported model there (no config.json)"),
    (["analyze.compare=EMPTY"], "analyze.compare='EMPTY': no exported model there (no config.json)"),
    (["analyze.models=[OK]", "analyze.compare=EMPTY"], "analyze.compare='EMPTY': no exported model there"),
    (["analyze.models=[{name: a, path: EMPTY, overrides: ['loss=calm']}]"],
     "analyze.models[0]: give exactly one of path (an export) or overrides (train one)"),
    (["analyze.models=[{name: a, paht: EMPTY}]"], "analyze.models[0]: unknown key(s) ['paht']"),
    (["analyze.models=[/x/a/export,/y/a/export]"], "analyze.models: names must differ, got ['a', 'a']"),
    (["analyze.before_last=5"], "analyze.before_last=5; allowed: a list of layer counts"),
    (["analyze.before_last=[3,10]"], "analyze.before_last=[3, 10]: none below the model's 3 layers; allowed: layer "
                                     "counts in 1..2"),
    (["analyze.same_tokenizer=maybe"], "analyze.same_tokenizer='maybe'; allowed: true or false"),
])
def test_bad_analyze_settings_name_the_key(tmp_path, overrides, message):
    (tmp_path / "empty").mkdir()
    fill = [o.replace("EMPTY", str(tmp_path / "empty")) for o in overrides]
    if any("OK" in o for o in overrides):  # a real export in analyze.models: the compare entry is the bad one
        ok = export_pretrained(make_backbone("t5"), tmp_path / "ok" / "export", {"family": "t5", "num_layers": 3})
        fill = [o.replace("OK", str(ok)) for o in fill]
    with pytest.raises(ConfigError) as info:
        check_config(compose(fill), make_backbone("t5"))
    assert message.replace("EMPTY", str(tmp_path / "empty")) in str(info.value)


def test_a_one_layer_model_and_an_empty_before_last_are_accepted():
    one = make_backbone("t5", num_layers=1, num_decoder_layers=1)
    check_config(compose([]), one)  # before_last [1, 2, 5, 10] has no count below 1 layer: nothing to show, no error
    assert analyze_settings(compose(["analyze.before_last=[]"])).before_last == ()  # [] was replaced by the default
    assert analyze_settings(compose([])).before_last == (1, 2, 5, 10)


def test_a_one_layer_model_is_analysed(tmp_path):
    out = tmp_path / "run"
    cfg = stage_cfg(out, "model.config.num_layers=1", "model.config.num_decoder_layers=1", "exit.min_exit_layer=1",
                    "analyze.min_exit_layer=1")
    bb, data = build(cfg)
    assert bb.num_layers == 1
    check_config(cfg, bb)
    run_stage(cfg, bb, data, out)
    assert csv(out, "oracle").layer.tolist() == [1]
    summary = json.loads((out / "analysis_summary.json").read_text())["models"][0]
    assert summary["oracle"]["mean"] == 1.0 and "before_last_1" not in summary["oracle"]
    assert summary["saturation"]["all"]["similar_states"] == 0.0  # no layer below the last to count


def test_the_printed_oracle_median_is_the_summarys(capsys):
    from eetrain.analysis.stage import print_summary

    summary = {"model": "m", "num_layers": 4, "tokens": 4, "unit": "token", "examples": 1, "target": "reference",
               "oracle": {"mean": 2.5, "median": 2.5, "before_last_1": 0.75}}
    print_summary([summary], None)
    assert "oracle      mean exit 2.500 of 4 (median 2.5)" in capsys.readouterr().out  # printed 2 (round half even)


def test_exports_are_named_after_their_run_directory(tmp_path):
    s = analyze_settings(compose(["analyze.models=[outputs/demo/run1/export,outputs/demo/run2/export]",
                                  "analyze.compare=/models/t5-small"]))
    assert [(m.name, m.key) for m in s.models] == [
        ("run1", "analyze.models[0]"), ("run2", "analyze.models[1]"), ("t5-small", "analyze.compare")]
    main = export_pretrained(make_backbone("t5"), tmp_path / "run1" / "export", {"family": "t5", "num_layers": 3})
    cfg = stage_cfg(tmp_path / "out", f"analyze.compare={main}", "analyze.analyses=[oracle]", "analyze.max_examples=2",
                    f"model.name_or_path={main}", "model.config=null", "model.tokenizer=null")
    bb, data = build(cfg)
    with pytest.raises(ConfigError, match="analyze: two models are named 'run1'; set analyze.name"):
        check_config(cfg, bb)  # before any training
    with pytest.raises(ConfigError, match="analyze: two models are named 'run1'; set analyze.name"):
        run_stage(cfg, bb, data, tmp_path / "out")


def test_a_model_with_another_head_is_refused_before_training(tmp_path):
    bert = export_pretrained(make_backbone("bert"), tmp_path / "bert" / "export",
                             {"family": "bert", "head_kind": "sequence", "num_layers": 3})
    with pytest.raises(ConfigError, match=f"analyze.compare={str(bert)!r} has a sequence head, the model a token head"):
        check_config(compose([f"analyze.compare={bert}"]), make_backbone("t5"))


def test_analyze_is_a_registered_stage():
    from eetrain.stages import CHECKS, STAGES, _resolve, check_stages

    assert _resolve(STAGES["analyze"]) is run_stage and _resolve(CHECKS["analyze"]) is check_config
    cfg = compose(["+experiment=analyze", "model.name_or_path=unused", "analyze.target=bogus"])
    assert list(cfg.stages) == ["analyze"] and cfg.train is False and cfg.export is False
    with pytest.raises(ConfigError, match="analyze.target='bogus'"):
        check_stages(cfg, make_backbone("t5"))


def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path):
    model = export_pretrained(make_backbone("t5"), tmp_path / "m" / "export", {"family": "t5", "num_layers": 3})
    r = cli("+experiment=analyze", f"model.name_or_path={model}", "analyze.analyses=[oracle,vibes]",
            f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("eetrain: error: ")]
    assert len(errors) == 1 and "analyze.analyses[1]='vibes'; allowed: agreement, oracle" in errors[0]
    assert "Traceback" not in r.stderr and not (tmp_path / "run" / "oracle.csv").exists()


def test_analyze_experiment_on_a_directory_without_an_export(tmp_path):
    from eetrain.__main__ import user_error

    cfg = compose(["+experiment=analyze", f"model.name_or_path={tmp_path}"])
    with pytest.raises(Exception) as info:  # noqa: B017 - Hydra wraps errors raised inside instantiate
        instantiate(cfg.model)
    err = user_error(info.value)
    assert isinstance(err, ConfigError)
    assert str(err).startswith(f"model.name_or_path={str(tmp_path)!r}: no exported model there (no config.json)")


@pytest.mark.slow
def test_cli_analyze_experiment_on_an_export(tmp_path):
    model = export_pretrained(make_backbone("t5"), tmp_path / "m" / "export", {"family": "t5", "num_layers": 3})
    out = tmp_path / "run"
    r = cli("+experiment=analyze", f"model.name_or_path={model}", "analyze.analyses=[oracle,suitability]",
            "analyze.max_examples=4", f"hydra.run.dir={out}", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Early-exit suitability" in r.stdout
    assert csv(out, "oracle").model.unique().tolist() == ["m"]
    assert math.isfinite(csv(out, "suitability").ee_score.iloc[0])


def test_gating_decays_over_data_max_target_length_as_decoding_does(tmp_path):
    """decay.N: null is data.max_target_length for the policies stage and decoding; gating uses the same N
    (it took the longest sequence of the analysed sample)."""
    tables = []
    for n in ("null", "40"):
        out = tmp_path / n
        cfg = stage_cfg(out, "analyze.analyses=[gating]", "analyze.max_examples=4",
                        f"exit.policies.softmax_gap_decaying.decay.N={n}")
        bb, data = build(cfg)
        run_stage(cfg, bb, data, out)
        table = csv(out, "gating")
        tables.append(table[table.policy.str.startswith("softmax_gap_decaying")].reset_index(drop=True))
    assert len(tables[0]) and tables[0].equals(tables[1])
