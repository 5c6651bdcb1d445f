"""FLOPs of decoding (eetrain.decoding.flops), hand-checked on a tiny T5 whose every product is known."""

from __future__ import annotations

import pytest
import torch

from eetrain.decoding import generate
from eetrain.decoding.flops import FlopCount, format_flops
from tests.conftest import TINY, make_backbone

SOURCE = [5, 17, 33, 99, 120, 7, 1]
NEW = 8


def test_flop_count_of_a_product_and_of_cpu_attention():
    x, w = torch.randn(2, 3), torch.randn(3, 5)
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 6, 4)
    with FlopCount() as count:
        x @ w  # 2 x 3 multiply-adds per output, 2 x 5 outputs: 60
        count.mark()
        torch.nn.functional.scaled_dot_product_attention(q, k, k)
    assert count.marked == 60
    # q k^T: 2 heads x 3 x 6 scores of 4 multiply-adds; their weights times v: 2 x 3 x 4 outputs of 6
    assert count.total - 60 == 2 * (2 * 3 * 6 * 4) + 2 * (2 * 3 * 4 * 6)


def test_flop_count_under_inference_mode_equals_torch_s_counter(t5):
    """Under inference_mode a composite op (matmul) reaches the mode whole: its parts still count; and a
    whole decode counts what torch's FlopCounterMode counts with the same CPU attention formula."""
    from torch.utils.flop_counter import FlopCounterMode

    from eetrain.decoding.flops import _cpu_attention_flops

    with torch.inference_mode():
        x, w = torch.randn(2, 3), torch.randn(3, 5)
        with FlopCount() as count:
            x @ w
        assert count.total == 60
        cpu_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        with FlopCounterMode(display=False, custom_mapping={cpu_attention: _cpu_attention_flops}) as torch_count:
            generate(t5, one(), "fixed:2", max_new_tokens=4, stop_at_eos=False)
        out = generate(t5, one(), "fixed:2", max_new_tokens=4, stop_at_eos=False, count_flops=True)
    assert out.flops == torch_count.get_total_flops() > 0


def test_format_flops():
    assert [format_flops(n) for n in (999, 1234, 2.5e6, 3e9, 4.56e12)] == ["999", "1.23 k", "2.5 M", "3 G", "4.56 T"]


@pytest.fixture(scope="module")
def t5():
    return make_backbone("t5").eval()


def one():
    return {"input_ids": torch.tensor([SOURCE]), "attention_mask": torch.ones(1, len(SOURCE), dtype=torch.long)}


def test_t5_decoding_flops_by_hand(t5):
    """d_model 32, d_ff 64, 4 heads of 8, vocabulary 441, 3 layers; a 7-token source, 8 tokens decoded."""
    c = TINY["t5"]
    d, ff, heads, dkv, S = c["d_model"], c["d_ff"], c["num_heads"], c["d_kv"], len(SOURCE)
    assert (d, ff, heads * dkv) == (32, 64, 32)
    V = t5.model.config.vocab_size
    mm = 2 * d * d  # one d x d product for one position
    attn = 4 * heads * dkv  # one query against one key: q.k and the weight times v (2 FLOPs a multiply-add)
    encoder_layer = S * (4 * mm + 2 * 2 * d * ff) + attn * S * S
    per_token_layer = 4 * mm + 2 * mm + 2 * 2 * d * ff  # self q k v o, cross q o, the feed-forward
    cross_kv = 2 * S * mm  # the source's cross-attention keys and values, once per layer a token reaches
    self_attn = attn * sum(range(1, NEW + 1))  # token t attends to t positions
    cross_attn = attn * S * NEW
    layer = NEW * per_token_layer + cross_kv + self_attn + cross_attn
    head = NEW * 2 * d * V

    full = generate(t5, one(), None, max_new_tokens=NEW, stop_at_eos=False, count_flops=True)
    assert full.prefill_flops == 3 * encoder_layer
    assert full.decode_flops == 3 * layer + head
    assert full.flops_per_token == (3 * layer + head) / NEW
    for strategy in ("copy", "parallel"):  # every token leaves at layer 1: no later token needs layers 2, 3
        out = generate(t5, one(), "fixed:1", strategy=strategy, max_new_tokens=NEW, stop_at_eos=False, count_flops=True)
        assert out.decode_flops == layer + head and out.prefill_flops == full.prefill_flops
    timed = generate(t5, one(), "fixed:1", max_new_tokens=NEW, stop_at_eos=False)
    assert timed.flops is None and timed.flops_per_token != timed.flops_per_token  # not counted: NaN


def test_flops_count_rows_that_ride_along_and_the_drafts_heads(t5):
    """What a layers-times-exits estimate misses: at batch > 1, `ride_along` runs exited rows on to the
    batch's deepest exit (the same exits as `gather`, more FLOPs); a draft's head product counts."""
    kw = dict(max_new_tokens=NEW, stop_at_eos=False, count_flops=True)
    batch = {"input_ids": torch.tensor([SOURCE] * 4), "attention_mask": torch.ones(4, len(SOURCE), dtype=torch.long)}
    ride = generate(t5, batch, "random:2", seed=3, batch_mode="ride_along", **kw)
    gather = generate(t5, batch, "random:2", seed=3, batch_mode="gather", **kw)
    assert ride.exit_layers.tolist() == gather.exit_layers.tolist()
    assert len(set(ride.exit_layers.flatten().tolist())) > 1  # rows leave at different layers
    assert ride.decode_flops > gather.decode_flops
    full = generate(t5, one(), None, **kw)
    spec = generate(t5, one(), None, strategy="self_speculative", draft_layer=1, draft_tokens=3, **kw)
    assert spec.sequences() == full.sequences() and spec.prefill_flops == full.prefill_flops
    # a draft pays for the head (2 d V = 28224 FLOPs here, more than a decoder layer's ~22000) and the
    # verifying pass for every drafted position: more FLOPs than full decoding, whatever was accepted
    assert spec.decode_flops > full.decode_flops
