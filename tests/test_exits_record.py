"""Recording a frozen backbone's per-layer states (eetrain.exits.record) and measures on summaries."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from eetrain.exits.measures import MEASURES, ExitRecords, compute_measure, summarize_logits
from eetrain.exits.policy import ExitPolicy, exit_layers, sweep
from eetrain.exits.record import load_records, record_exits, records_nbytes, save_records
from tests.conftest import examples, make_backbone


def _loader(backbone, batch_size: int = 2):
    return torch.utils.data.DataLoader(examples(), batch_size=batch_size, collate_fn=backbone.collate)


def _kwargs(name: str) -> dict:
    return {"patience": 1} if name == "patience" else {"min_confidence": 0.0} if name == "monotonic" else {}


def test_t5_record_fields_positions_and_sequences():
    bb = make_backbone("t5")
    rec = record_exits(bb, _loader(bb), keep_logits=True)
    # examples(): targets of 3 and 5 tokens, all scored
    assert rec.num_layers == 3 and rec.num_tokens == 8 and rec.vocab_size == len(bb.tokenizer)
    assert rec.labels.tolist() == [9, 10, 1, 12, 13, 14, 15, 1]
    assert rec.positions.tolist() == [1, 2, 3, 1, 2, 3, 4, 5]
    assert rec.sequence_ids.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert rec.hidden.shape == (3, 8, 32) and rec.h0.shape == (8, 32)
    assert rec.predictions.shape == (3, 8) and rec.top2.shape == (3, 8, 2) and rec.entropies.shape == (3, 8)
    # the record is the backbone's own exits at the scored positions
    batch = bb.collate(examples())
    with torch.no_grad():
        states = bb(batch)
        keep = states.labels != -100
        for i, h in enumerate(states.hidden):
            assert torch.allclose(rec.hidden[i], h[keep])
            logits = bb.exit_logits(h[keep])
            assert torch.allclose(rec.logits[i], logits)
            assert torch.equal(rec.predictions[i], logits.argmax(-1))
            p = logits.softmax(-1)
            assert torch.allclose(rec.top2[i], p.topk(2, -1).values)
            assert torch.allclose(rec.entropies[i], -(p * p.log()).sum(-1), atol=1e-5)
        # h0 is the input of decoder block 1: the embedded, right-shifted targets
        embedded = bb.model.decoder.embed_tokens(bb.model._shift_right(batch["labels"]))
        assert torch.allclose(rec.h0, embedded[keep])
    # saturation at layer 1 compares with h0, later layers with the previous layer
    assert torch.allclose(rec.saturation[0], F.cosine_similarity(rec.hidden[0], rec.h0, dim=-1))
    assert torch.allclose(rec.saturation[2], F.cosine_similarity(rec.hidden[2], rec.hidden[1], dim=-1))


def test_record_restores_training_mode_and_needs_no_grad():
    bb = make_backbone("t5")
    bb.train()
    rec = record_exits(bb, _loader(bb))
    assert bb.training
    assert not rec.hidden.requires_grad and not rec.top2.requires_grad


def test_llama_positions_count_target_tokens_only():
    bb = make_backbone("llama")
    rec = record_exits(bb, _loader(bb))
    # the source tokens carry -100: t counts the scored (target) tokens of each sequence
    assert rec.positions.tolist() == [1, 2, 3, 1, 2, 3, 4, 5]
    assert rec.labels.tolist() == [9, 10, 1, 12, 13, 14, 15, 1]


def test_bert_records_one_decision_per_example():
    bb = make_backbone("bert")
    rec = record_exits(bb, _loader(bb), keep_logits=True)
    assert rec.num_tokens == 2 and rec.positions.tolist() == [1, 1] and rec.sequence_ids.tolist() == [0, 1]
    batch = bb.collate(examples())
    with torch.no_grad():
        states = bb(batch)
        assert torch.allclose(rec.logits[1], bb.exit_logits(states.hidden[1]))
        assert torch.allclose(rec.hidden[1], states.hidden[1][:, 0])


def test_sequence_ids_run_across_batches_and_max_tokens_cuts():
    bb = make_backbone("t5")
    rec = record_exits(bb, _loader(bb, batch_size=1))
    assert rec.sequence_ids.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    cut = record_exits(bb, _loader(bb, batch_size=1), max_tokens=4)
    assert cut.num_tokens == 4 and cut.sequence_ids.tolist() == [0, 0, 0, 1]
    assert torch.equal(cut.predictions, rec.predictions[:, :4])
    with pytest.raises(ValueError, match="max_tokens"):
        record_exits(bb, _loader(bb), max_tokens=0)


def test_chunked_head_matches_one_pass_and_stores_no_vocab_sized_tensor():
    # a 32k vocabulary: the record holds 4 numbers per layer and token, not V
    bb = make_backbone("t5", vocab_size=32000)
    one = record_exits(bb, _loader(bb), store_hidden=False)
    chunked = record_exits(bb, _loader(bb), store_hidden=False, chunk_size=3)
    for key in ("predictions", "top2", "entropies", "saturation"):
        assert torch.allclose(getattr(one, key).float(), getattr(chunked, key).float()), key
    assert one.vocab_size == 32000 and one.logits is None and one.hidden is None
    L, N = one.num_layers, one.num_tokens
    assert records_nbytes(one) < L * N * 64 + 1000  # far below L * N * V * 4 bytes


def test_half_precision_hidden():
    bb = make_backbone("t5")
    rec = record_exits(bb, _loader(bb), hidden_dtype="bfloat16")
    assert rec.hidden.dtype == torch.bfloat16 and rec.saturation.dtype == torch.float32
    with pytest.raises(ValueError, match="hidden_dtype"):
        record_exits(bb, _loader(bb), hidden_dtype="int8")


def test_every_measure_is_identical_on_summaries_and_full_logits():
    torch.manual_seed(1)
    logits = torch.randn(6, 40, 17) * 3
    hidden = torch.randn(6, 40, 8)
    h0 = torch.randn(40, 8)
    full = ExitRecords(hidden=hidden, logits=logits, h0=h0)
    summary = full.summarized()
    assert summary.logits is None and summary.vocab_size == 17
    sat = compute_measure("hidden_saturation", full)
    compact = ExitRecords(
        predictions=summary.predictions, top2=summary.top2, entropies=summary.entropies,
        saturation=sat, vocab_size=17,
    )
    for name in MEASURES:
        expected = compute_measure(name, full, **_kwargs(name))
        for rec in (summary, compact):
            got = compute_measure(name, rec, **_kwargs(name))
            assert torch.equal(got, expected), name
    policies = [ExitPolicy(m, min_exit_layer=2) for m in ("softmax_gap", "softmax_max", "normalized_entropy")]
    grid = [0.1, 0.3, 0.5, 0.9]
    assert sweep(policies, grid, summary) == sweep(policies, grid, full)


def test_summaries_say_what_they_lack():
    rec = ExitRecords(predictions=torch.zeros(2, 3, dtype=torch.long), top2=torch.rand(2, 3, 2))
    with pytest.raises(ValueError, match="entropies"):
        compute_measure("entropy", rec)
    with pytest.raises(ValueError, match="summaries"):
        rec.get_probs()
    with pytest.raises(ValueError, match=r"top2 must have shape \(L, N, 2\)"):
        ExitRecords(top2=torch.rand(2, 3, 4))
    with pytest.raises(ValueError, match="positions has 2 tokens, records have 3"):
        ExitRecords(predictions=torch.zeros(2, 3, dtype=torch.long), positions=torch.ones(2))


def test_summarize_logits_hand_case():
    # one layer, one token: p = softmax(log [0.5, 0.3, 0.2]) = [0.5, 0.3, 0.2]
    logits = torch.tensor([[[math.log(0.5), math.log(0.3), math.log(0.2)]]])
    pred, top2, ent = summarize_logits(logits)
    assert pred.tolist() == [[0]]
    assert top2[0, 0].tolist() == pytest.approx([0.5, 0.3])
    assert float(ent) == pytest.approx(-(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2)))


def test_decaying_threshold_reads_the_recorded_positions():
    # one layer below L that always has gap 0.8; paper form, lam 0.85, N = 4, tau = 4:
    # t = 1: 0.9*0.85 + 0.1*e^-1 = 0.8018 > 0.8 (stay);  t = 2: 0.765 + 0.1*e^-2 = 0.7785 <= 0.8 (exit)
    top2 = torch.tensor([[0.9, 0.1], [0.9, 0.1]]).expand(2, 2, 2).clone()
    top2[0] = torch.tensor([0.85, 0.05])
    rec = ExitRecords(
        predictions=torch.zeros(2, 2, dtype=torch.long), top2=top2, positions=torch.tensor([1, 2])
    )
    policy = ExitPolicy("softmax_gap", {"lam": 0.85, "N": 4, "tau": 4.0}, min_exit_layer=1)
    assert exit_layers(policy, rec).tolist() == [2, 1]
    rows = sweep([policy], {"softmax_gap": [0.85, 0.5]}, rec)
    assert [r["mean_exit_layer"] for r in rows] == [1.5, 1.0]


def test_save_load_round_trip(tmp_path):
    bb = make_backbone("t5")
    rec = record_exits(bb, _loader(bb))
    path = save_records(rec, tmp_path / "sub" / "val.pt", meta={"family": "t5", "num_layers": 3})
    back, meta = load_records(path, with_meta=True)
    assert meta == {"family": "t5", "num_layers": 3}
    assert back.vocab_size == rec.vocab_size
    for key in ("hidden", "h0", "predictions", "top2", "entropies", "saturation", "labels", "positions",
                "sequence_ids"):
        assert torch.equal(getattr(back, key), getattr(rec, key)), key
    assert back.logits is None
    assert not list((tmp_path / "sub").glob("*.tmp"))
    torch.save({"something": "else"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not an eetrain exit-records file"):
        load_records(tmp_path / "bad.pt")


def _sharp_norm(bb):
    """A final norm whose weight is not all ones (RMSNorm with unit weight keeps every cosine)."""
    with torch.no_grad():
        weight = bb.model.decoder.final_layer_norm.weight if bb.family == "t5" else bb.model.model.norm.weight
        weight.copy_(torch.rand(weight.shape, generator=torch.Generator().manual_seed(5)) * 2 + 0.1)
    return bb


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_normed_features_record_final_normed_states_and_saturation(family):
    """exit.features=normed: hidden, h0 and saturation in final_norm's space; the logits' summaries unchanged."""
    bb = _sharp_norm(make_backbone(family))
    raw = record_exits(bb, _loader(bb))
    normed = record_exits(bb, _loader(bb), features="normed")
    with torch.no_grad():
        torch.testing.assert_close(normed.hidden, bb.final_norm(raw.hidden))
        torch.testing.assert_close(normed.h0, bb.final_norm(raw.h0))
    for i in range(1, raw.num_layers):
        want = F.cosine_similarity(normed.hidden[i], normed.hidden[i - 1], dim=-1)
        torch.testing.assert_close(normed.saturation[i], want)
    torch.testing.assert_close(normed.saturation[0], F.cosine_similarity(normed.hidden[0], normed.h0, dim=-1))
    assert not torch.allclose(normed.saturation, raw.saturation)  # the setting reaches the measure
    for field in ("predictions", "top2", "entropies", "labels", "positions"):
        assert torch.equal(getattr(normed, field), getattr(raw, field)), field
    # hidden_saturation on the normed record = the measure on the normed states
    torch.testing.assert_close(compute_measure("hidden_saturation", normed),
                               compute_measure("hidden_saturation", ExitRecords(hidden=normed.hidden, h0=normed.h0)))
    with pytest.raises(ValueError, match=r"features='layernormed'; allowed: raw, normed"):
        record_exits(bb, _loader(bb), features="layernormed")
