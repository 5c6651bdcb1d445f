"""Per-layer exit heads (`model.exit_head=per_layer`): interface, losses, decoding, export, LoRA, and
DeeBERT's second stage (`stages=[exit_heads]`) on a frozen model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from eetrain.backbones import BertBackbone, LlamaBackbone, T5Backbone, load_backbone
from eetrain.checkpointing import export_pretrained
from eetrain.config import compose
from eetrain.decoding import generate
from eetrain.errors import ConfigError
from eetrain.exits.policy import ExitPolicy
from eetrain.losses.joint import ExitCrossEntropy
from tests.conftest import TINY, TOKENIZER, examples
from tests.decoding_reference import reference_generate
from tests.test_decoding import SHARP, SOURCE, one

CLASSES = {"t5": T5Backbone, "llama": LlamaBackbone, "bert": BertBackbone}


def heads_backbone(family: str, layers=None, **overrides):
    return CLASSES[family](config={**TINY[family], **overrides}, tokenizer=TOKENIZER, seed=0,
                           exit_head="per_layer", exit_head_layers=layers)


def perturb(bb, layer: int, scale: float = 0.5) -> None:
    g = torch.Generator().manual_seed(layer)
    with torch.no_grad():
        w = bb.exit_heads[str(layer)].proj.weight
        w.add_(scale * torch.randn(w.shape, generator=g))


@pytest.mark.parametrize("family", ["t5", "llama", "bert"])
def test_per_layer_heads_start_as_the_final_head_and_stay_separate(family):
    bb = heads_backbone(family).eval()
    assert sorted(int(k) for k in bb.exit_heads) == [1, 2]  # every layer below the last (3)
    batch = bb.collate(examples())
    states = bb(batch)
    h = states.hidden[0]
    shared = bb.head_features(bb.head_modules()[0], h) @ bb.head_weight.T
    if bb.head_bias is not None:
        shared = shared + bb.head_bias
    assert torch.allclose(bb.exit_logits(h, 1), shared, atol=1e-6)  # initialised from the final head
    perturb(bb, 1)
    assert not torch.allclose(bb.exit_logits(h, 1), shared, atol=1e-4)
    assert torch.allclose(bb.exit_logits(h, 2), shared, atol=1e-6)  # other heads untouched
    assert torch.equal(bb.exit_logits(h, 3), bb.exit_logits(h))  # the last layer: the model's own head
    # heads own their parameters: the model's head did not move
    assert bb.head_weight is bb.head_modules()[1].weight
    assert bb.exit_heads["1"].proj.weight.data_ptr() != bb.head_weight.data_ptr()


def test_exit_head_layers_follow_the_exit_points_and_bad_input_names_the_key():
    bb = heads_backbone("t5", layers={"every": 2}, num_layers=4, num_decoder_layers=4)
    assert sorted(int(k) for k in bb.exit_heads) == [2]
    with pytest.raises(ConfigError, match=r"model.exit_head='vibes'; allowed: shared, per_layer"):
        T5Backbone(config=TINY["t5"], tokenizer=TOKENIZER, exit_head="vibes")
    with pytest.raises(ConfigError, match=r"model.exit_head_layers"):
        heads_backbone("t5", layers=[7])


@pytest.mark.parametrize("family", ["t5", "bert"])
def test_loss_uses_each_exit_s_own_head(family):
    bb = heads_backbone(family)
    perturb(bb, 1)
    perturb(bb, 2, 1.0)
    batch = bb.collate(examples())
    states = bb(batch)
    out = ExitCrossEntropy(weights=[0.2, 0.3, 0.5])(states, bb)
    labels = states.labels
    expected = []
    for layer, h in zip(states.layers, states.hidden, strict=True):
        if bb.head_kind == "sequence":
            z = bb.exit_logits(h, layer)
            expected.append(F.cross_entropy(z.float(), labels))
        else:
            keep = labels != -100
            expected.append(F.cross_entropy(bb.exit_logits(h[keep], layer).float(), labels[keep]))
    total = 0.2 * expected[0] + 0.3 * expected[1] + 0.5 * expected[2]
    assert out.total.item() == pytest.approx(total.item(), rel=1e-5)
    assert [out.layer_ce[i].item() for i in (1, 2, 3)] == pytest.approx([e.item() for e in expected], rel=1e-5)
    out.total.backward()
    assert bb.exit_heads["1"].proj.weight.grad is not None
    assert all(p.grad is not None for p in bb.exit_heads["1"].features.parameters())


@pytest.fixture(scope="module", params=["t5", "llama"])
def heads_model(request):
    bb = heads_backbone(request.param, **SHARP[request.param])
    for layer in (1, 2, 3):
        perturb(bb, layer, 0.5)
    return bb.eval()


@pytest.mark.parametrize("strategy,semantics", [("copy", "copy"), ("parallel", "exact")])
def test_decoding_uses_the_exit_layer_s_head(heads_model, strategy, semantics):
    for k in (1, 2):
        out = generate(heads_model, one(), f"fixed:{k}", strategy=strategy, max_new_tokens=10, stop_at_eos=False)
        ref, _ = reference_generate(heads_model, SOURCE, 10, semantics, lambda step, k=k: k)
        assert out.sequences()[0] == ref
    policy = ExitPolicy("softmax_max", {"t5": 0.99, "llama": 0.5}[heads_model.family], min_exit_layer=1)
    out = generate(heads_model, one(), policy, strategy=strategy, max_new_tokens=10, stop_at_eos=False)
    ref, exits = reference_generate(heads_model, SOURCE, 10, semantics, policy)
    assert out.sequences()[0] == ref and out.row_exit_layers()[0] == exits
    assert len(set(exits)) > 1  # the policy really exits at several layers, through several heads
    # a different head at layer 1 changes what exits there: the heads are really used
    plain = generate(heads_model, one(), "fixed:1", strategy=strategy, max_new_tokens=10, stop_at_eos=False)
    with torch.no_grad():
        heads_model.exit_heads["1"].proj.weight.mul_(-1)
    flipped = generate(heads_model, one(), "fixed:1", strategy=strategy, max_new_tokens=10, stop_at_eos=False)
    with torch.no_grad():
        heads_model.exit_heads["1"].proj.weight.mul_(-1)
    assert flipped.sequences() != plain.sequences()


def test_draft_of_self_speculative_decoding_uses_the_draft_layer_s_head(heads_model):
    out = generate(heads_model, one(), None, strategy="self_speculative", draft_layer=2, draft_tokens=3,
                   max_new_tokens=10, stop_at_eos=False)
    assert out.sequences()[0] == reference_generate(heads_model, SOURCE, 10, "exact", None)[0]  # lossless


@pytest.mark.parametrize("family", ["t5", "llama", "bert"])
def test_export_keeps_the_heads_and_loads_in_plain_transformers(tmp_path, family):
    bb = heads_backbone(family).eval()
    perturb(bb, 1)
    where = export_pretrained(bb, tmp_path / "export", {"family": family, "num_layers": 3})
    assert (where / "exit_heads.safetensors").is_file()
    back = load_backbone(str(where)).eval()  # exit_head null: what the export has
    assert sorted(back.exit_heads) == ["1", "2"]
    for (k, a), (_, b) in zip(bb.exit_heads.state_dict().items(), back.exit_heads.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    batch = bb.collate(examples())
    h = bb(batch).hidden[0]
    assert torch.allclose(back.exit_logits(h, 1), bb.exit_logits(h, 1), atol=1e-6)
    assert load_backbone(str(where), exit_head="shared").exit_heads is None
    with pytest.raises(ConfigError, match=r"model.exit_head_layers \(by default exits.layers\): the heads in .* are "
                       r"for layers \[1, 2\], not \[1\]; set exits.layers \(or model.exit_head_layers\) to \[1, 2\]"):
        load_backbone(str(where), exit_head_layers=[1])
    plain = bb.model_class.from_pretrained(str(where))  # full depth, the extra file is ignored
    assert plain.config.model_type == bb.model.config.model_type


def test_lora_trains_the_heads_beside_the_adapters_and_the_export_merges(tmp_path):
    bb = CLASSES["t5"](config=TINY["t5"], tokenizer=TOKENIZER, seed=0, exit_head="per_layer",
                       lora={"r": 4, "lora_alpha": 8, "target_modules": ["q", "v"]})
    trainable = {n for n, p in bb.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable)
    assert {n for n in trainable if n.startswith("exit_heads.")} == {
        n for n, _ in bb.named_parameters() if n.startswith("exit_heads.")}
    assert not any(n.startswith("model.") and "lora_" not in n for n in trainable)  # the model stays frozen
    where = export_pretrained(bb, tmp_path / "export", {"family": "t5", "num_layers": 3})
    back = load_backbone(str(where))
    assert not any("lora_" in n for n, _ in back.named_parameters()) and sorted(back.exit_heads) == ["1", "2"]


@pytest.mark.slow
def test_exit_heads_stage_trains_only_the_heads(tmp_path):
    """DeeBERT's second stage: everything but the heads is frozen; the export gets the trained heads."""
    from eetrain.exit_heads import run_stage

    cfg = compose(["model.exit_head=per_layer", "trainer.limit_train_batches=3", "exit.heads.epochs=1",
                   "trainer.enable_progress_bar=false", "data.eval_batch_size=250"])
    bb = instantiate(cfg.model)
    data = instantiate(cfg.data, tokenizer=bb.tokenizer, collate_fn=bb.collate)
    export_pretrained(bb, tmp_path / "export", {"family": "t5", "num_layers": bb.num_layers})
    before = {n: p.detach().clone() for n, p in bb.named_parameters()}
    rows = run_stage(cfg, bb, data, tmp_path)
    changed = {n for n, p in bb.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("exit_heads.") for n in changed)
    assert all(p.requires_grad for p in bb.parameters())  # the flags are restored
    assert len(rows) == bb.num_layers and (tmp_path / "layer_report.csv").is_file()
    back = load_backbone(str(tmp_path / "export"))
    assert torch.equal(back.exit_heads["1"].proj.weight, bb.exit_heads["1"].proj.weight)
    stored = json.loads((tmp_path / "export" / "early_exit.json").read_text())  # the report of the trained heads
    assert stored["validation_layers"] == rows and stored["family"] == "t5"
    assert stored["trained_exits"]["exit_heads"]["layers"] == list(range(1, bb.num_layers))
    with pytest.raises(ConfigError, match=r"set model.exit_head=per_layer"):
        run_stage(cfg, instantiate(compose([]).model), data, tmp_path)


@pytest.mark.slow
def test_deebert_two_stages_on_the_demo(tmp_path):
    """DeeBERT's recipe end to end: last-layer fine-tuning, the heads on the frozen model, entropy exits."""
    from tests.in_process import cli

    out = tmp_path / "run"
    r = cli("+experiment=bert_demo", "loss=last_layer", "stages=[exit_heads,classify]", f"hydra.run.dir={out}",
            "trainer.max_epochs=1", "trainer.limit_train_batches=6", "trainer.enable_progress_bar=false",
            "exit.heads.epochs=1", "classify.policies=[entropy]", "classify.max_examples=64", "classify.repeats=1",
            "callbacks.generation_metrics=null", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "with the trained exit heads" in r.stdout
    assert (out / "export" / "exit_heads.safetensors").is_file()
    import csv

    rows = list(csv.DictReader((out / "accuracy_speed.csv").open()))
    assert {row["policy"] for row in rows} >= {"full", "entropy"}


def test_bad_heads_settings_name_the_key():
    from eetrain.exit_heads import heads_settings

    with pytest.raises(ConfigError, match=r"exit.heads: unknown key\(s\) \['speed'\]; allowed"):
        heads_settings(compose(["+exit.heads.speed=1"]))
    with pytest.raises(ConfigError, match=r"exit.heads.epochs=0; allowed: an integer >= 1"):
        heads_settings(compose(["exit.heads.epochs=0"]))
    for key, value, allowed in (("lr", "-1.0", "> 0"), ("lr", "true", "> 0"), ("lr", "inf", "> 0"),
                                ("weight_decay", "-1", ">= 0"), ("weight_decay", "abc", ">= 0")):
        with pytest.raises(ConfigError, match=rf"exit.heads.{key}=.*; allowed: a finite number {allowed}"):
            heads_settings(compose([f"exit.heads.{key}={value}"]))
