"""Layer dropout: the schedule, rank agreement, the empirical rate, skipping in every adapter, training."""

import json
import random
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from eetrain.errors import ConfigError
from eetrain.losses import (
    Curriculum,
    ExitCrossEntropy,
    JointLoss,
    LayerDropout,
    dropped_layers,
    layer_dropout_rates,
)
from eetrain.module import EarlyExitModule
from tests.conftest import examples, make_backbone

CURRICULUM_FILE = Path(__file__).resolve().parent.parent / "eetrain" / "losses" / "curriculum.py"


def test_rates_by_hand():
    # p_l = 0.2 * (2^{(l-1)/3} - 1) for L = 4
    assert layer_dropout_rates(4, 0.2) == pytest.approx([0.0, 0.2 * (2 ** (1 / 3) - 1), 0.2 * (2 ** (2 / 3) - 1), 0.2])
    assert layer_dropout_rates(4, 0.2)[1] == pytest.approx(0.0519842, abs=1e-7)
    assert layer_dropout_rates(4, 0.2)[2] == pytest.approx(0.1174802, abs=1e-7)
    assert layer_dropout_rates(1, 0.2) == [0.0]
    assert dropped_layers(0, 5, 4, 0.0) == frozenset()


def test_bad_p_max():
    for p in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match=r"loss.layer_dropout.p_max=.* must be within \[0, 1\]"):
            LayerDropout(p_max=p)


def _schedule(seed: int, steps: int, num_layers: int, p_max: float) -> list[list[int]]:
    return [sorted(dropped_layers(seed, t, num_layers, p_max)) for t in range(steps)]


def test_two_ranks_agree_whatever_their_rng_state():
    # "rank 0" and "rank 1" with different torch / numpy / Python RNG states and draws in between
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    rank0 = _schedule(seed=42, steps=500, num_layers=8, p_max=0.5)
    torch.manual_seed(1234), np.random.seed(99), random.seed(7)
    torch.rand(100), np.random.rand(100), random.random()
    rank1 = _schedule(seed=42, steps=500, num_layers=8, p_max=0.5)
    assert rank0 == rank1
    assert sum(map(len, rank0)) > 0 and len({tuple(s) for s in rank0}) > 10  # it does vary by step
    assert _schedule(seed=43, steps=500, num_layers=8, p_max=0.5) != rank0  # and by seed


def test_another_process_drops_the_same_layers():
    # A fresh interpreter (own hash seed, other torch RNG state) loading only the schedule module.
    code = (
        "import importlib.util, json, sys, torch\n"
        "torch.manual_seed(987654)\n"
        f"spec = importlib.util.spec_from_file_location('cur', {str(CURRICULUM_FILE)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(json.dumps([sorted(m.dropped_layers(42, t, 8, 0.5)) for t in range(500)]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == _schedule(seed=42, steps=500, num_layers=8, p_max=0.5)


def test_empirical_rate_matches_schedule():
    num_layers, p_max, steps = 6, 0.8, 20_000
    counts = np.zeros(num_layers)
    for t in range(steps):
        for layer in dropped_layers(7, t, num_layers, p_max):
            counts[layer - 1] += 1
    rates = np.array(layer_dropout_rates(num_layers, p_max))
    sigma = np.sqrt(rates * (1 - rates) / steps)
    assert counts[0] == 0  # the first layer is never dropped
    assert np.all(np.abs(counts / steps - rates) <= 4 * sigma + 1e-12), (counts / steps, rates)


def _zero_residual_branches(block, family):
    """Make a pre-norm block the identity: every residual branch's output projection is zero."""
    with torch.no_grad():
        if family == "t5":
            for sub in block.layer[:-1]:
                attn = getattr(sub, "SelfAttention", None) or sub.EncDecAttention
                attn.o.weight.zero_()
            block.layer[-1].DenseReluDense.wo.weight.zero_()
        else:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()


@pytest.mark.parametrize("family", ["t5", "llama", "bert"])
def test_skipped_layer_passes_its_input_through(family):
    bb = make_backbone(family).eval()
    batch = bb.collate(examples())
    with torch.no_grad():
        full = bb(batch)
        skipped = bb(batch, skip={2})
    # layer 1 unchanged, layer 2 outputs its input, layer 3 runs on layer 1's state
    torch.testing.assert_close(skipped.hidden[0], full.hidden[0])
    torch.testing.assert_close(skipped.hidden[1], skipped.hidden[0])
    assert not torch.allclose(skipped.hidden[2], full.hidden[2])
    # reference for layer 3: the same model without block 2
    blocks = bb.blocks
    kept = torch.nn.ModuleList([blocks[0], blocks[2]])
    owner, name = {"t5": ("decoder", "block"), "llama": ("model", "layers"), "bert": ("bert.encoder", "layer")}[family]
    owner = bb.model.get_submodule(owner)
    setattr(owner, name, kept)
    try:
        with torch.no_grad():
            ref = bb(batch, layers=[2])
    finally:
        setattr(owner, name, blocks)
    torch.testing.assert_close(skipped.hidden[2], ref.hidden[0])
    # the patch is gone afterwards
    with torch.no_grad():
        torch.testing.assert_close(bb(batch).hidden[2], full.hidden[2])


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_skipping_the_first_layer_equals_an_identity_first_layer(family):
    # T5's first block owns the relative position bias: skipped, it must still hand it on.
    bb = make_backbone(family).eval()
    batch = bb.collate(examples())
    with torch.no_grad():
        skipped = bb(batch, skip={1, 3})
        _zero_residual_branches(bb.blocks[0], family)
        _zero_residual_branches(bb.blocks[2], family)
        ref = bb(batch)
    for a, b in zip(skipped.hidden, ref.hidden, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_skip_rejects_bad_layers():
    bb = make_backbone("llama")
    with pytest.raises(ConfigError, match="outside 1..3"):
        bb(bb.collate(examples()), skip={4})


def test_layer_dropout_and_curriculum_in_training_only():
    bb = make_backbone("t5")
    loss = JointLoss(
        {"ce": ExitCrossEntropy(weights="sum_l", curriculum=Curriculum("rotational", every=3))},
        layer_dropout=LayerDropout(p_max=1.0, seed=3),
    )
    module = EarlyExitModule(bb, loss, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    assert loss.dropped_layers(0, 3) == dropped_layers(3, 0, 3, 1.0)
    seen = []
    original = bb.forward

    def spy(batch, layers=None, skip=frozenset()):
        seen.append(frozenset(skip))
        return original(batch, layers, skip)

    bb.forward = spy
    data = torch.utils.data.DataLoader(examples() * 4, batch_size=2, collate_fn=bb.collate)
    trainer = L.Trainer(
        max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0, log_every_n_steps=1,
    )
    trainer.fit(module, train_dataloaders=data, val_dataloaders=data)
    train_skips = seen[:4]
    assert train_skips == [dropped_layers(3, t, 3, 1.0) for t in range(4)]
    assert any(train_skips)  # p_max = 1: layer 3 always, layer 2 with p = 2^0.5 - 1
    assert all(s == frozenset() for s in seen[4:])  # validation never skips
    logged = trainer.callback_metrics
    assert "train/ce/exits" in logged and "train/skipped_layers" in logged
