import re
import time

import pytest
import torch

from eetrain.backbones import check_layers
from eetrain.errors import ConfigError, HubUnreachableError
from tests.conftest import TOKENIZER, examples, make_backbone

FAMILIES = ["t5", "llama", "bert"]


def _scale_norms(model):
    # The double-norm pitfall hides behind norm weights of all ones: make them differ.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                p.mul_(1.7).add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("family", FAMILIES)
def test_exits_shapes_and_last_exit_equals_model_logits(family):
    bb = make_backbone(family).eval()
    _scale_norms(bb.model)
    batch = bb.collate(examples())
    with torch.no_grad():
        states = bb(batch)
        ref = bb.model_logits(batch)
        last = bb.exit_logits(states.hidden[-1])
    assert bb.num_layers == 3 and states.layers == (1, 2, 3) and len(states.hidden) == 3
    B = 2
    for h in states.hidden:
        assert h.shape[0] == B and h.shape[-1] == 32
    assert last.shape == ref.shape
    torch.testing.assert_close(last, ref, rtol=1e-5, atol=1e-5)
    # intermediate exits give different logits through the same head
    assert not torch.allclose(bb.exit_logits(states.hidden[0]), ref)


def test_t5_rescale_follows_config():
    bb = make_backbone("t5", tie_word_embeddings=True).eval()
    h = torch.randn(2, 4, 32)
    plain = bb.model.decoder.final_layer_norm(h)
    torch.testing.assert_close(bb.exit_features(h), plain * 32**-0.5)


def test_llama_labels_are_shifted_to_next_token():
    bb = make_backbone("llama")
    batch = bb.collate(examples())
    states = bb(batch)
    # row 0: source [5,6,7,8,1] (no loss) then target [9,10,1]; position 4 predicts 9
    assert batch["labels"][0].tolist()[:8] == [-100] * 5 + [9, 10, 1]
    assert states.labels[0].tolist()[:8] == [-100] * 4 + [9, 10, 1, -100]


def test_bert_sequence_head_features():
    bb = make_backbone("bert").eval()
    batch = bb.collate(examples())
    states = bb(batch)
    assert states.labels.tolist() == [1, 2]
    assert bb.exit_features(states.hidden[0]).shape == (2, 32)
    assert bb.exit_logits(states.hidden[0]).shape == (2, 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_only_selected_layers(family):
    bb = make_backbone(family)
    states = bb(bb.collate(examples()), layers=[1, 3])
    assert states.layers == (1, 3) and len(states.hidden) == 2


def test_check_layers_errors():
    assert check_layers(None, 4) == (1, 2, 3, 4)
    with pytest.raises(ConfigError, match="outside 1..4"):
        check_layers([0, 2], 4)
    with pytest.raises(ConfigError, match="outside 1..4"):
        check_layers([5], 4)
    with pytest.raises(ConfigError, match="sorted"):
        check_layers([3, 2], 4)
    with pytest.raises(ConfigError, match="sorted"):
        check_layers([2, 2], 4)


def test_missing_local_model_path(tmp_path):
    from eetrain.backbones import T5Backbone

    with pytest.raises(ConfigError, match="model.name_or_path=.*no such file"):
        T5Backbone(name_or_path=str(tmp_path / "nope"))


def test_hub_name_offline_fails_fast_with_instructions():
    from eetrain.backbones import T5Backbone

    t0 = time.monotonic()
    with pytest.raises(HubUnreachableError, match="Point model.name_or_path at a local directory"):
        T5Backbone(name_or_path="google-t5/t5-large")
    assert time.monotonic() - t0 < 10


def test_from_pretrained_round_trip(tmp_path):
    from eetrain.backbones import T5Backbone

    bb = make_backbone("t5").eval()
    bb.save_pretrained(str(tmp_path / "m"))
    again = T5Backbone(name_or_path=str(tmp_path / "m")).eval()
    batch = bb.collate(examples())
    with torch.no_grad():
        torch.testing.assert_close(bb.model_logits(batch), again.model_logits(batch))


def test_a_broken_local_model_is_one_message_naming_the_key(tmp_path):
    import shutil

    from eetrain.backbones import load_backbone
    from eetrain.checkpointing import export_pretrained

    good = export_pretrained(make_backbone("t5"), tmp_path / "good", {"family": "t5", "num_layers": 3})

    def broken(name, change):
        path = tmp_path / name
        shutil.copytree(good, path)
        change(path)
        return str(path)

    cases = [
        (broken("no_weights", lambda p: (p / "model.safetensors").unlink()), r"does not load \(OSError"),
        (broken("cut_weights", lambda p: (p / "model.safetensors").write_bytes(b"\0" * 100)), r"does not load \("),
        (broken("bad_config", lambda p: (p / "config.json").write_text("not json")), r"does not load \("),
        (broken("no_tokenizer", lambda p: [(p / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")]),
         r"no tokenizer files there .*set model.tokenizer"),
        (broken("bad_settings", lambda p: (p / "early_exit.json").write_text("{")),
         r"early_exit.json there is not a JSON object"),
    ]
    for path, match in cases:
        with pytest.raises(ConfigError, match=rf"model.name_or_path='{path}'.*{match}"):
            load_backbone(path)


def test_a_classifier_saved_for_other_classes_names_num_labels(tmp_path):
    from eetrain.backbones import BertBackbone

    make_backbone("bert").save_pretrained(str(tmp_path / "m"))  # 3 classes
    # data.num_labels=2 reaches the model as model_kwargs.num_labels (model/bert_*.yaml): the head does not
    # load; the message used to say the directory was not written by save_pretrained
    with pytest.raises(ConfigError, match=r"model.name_or_path='.*m': its weights have other shapes than the model "
                                          r"this config builds \(its config.json: num_labels=3, .*data.num_labels"):
        BertBackbone(name_or_path=str(tmp_path / "m"), model_kwargs={"num_labels": 2})


@pytest.mark.parametrize("family,typo,near", [("t5", "num_layer", "num_layers"), ("llama", "hidden_layers", "num_hidden_layers"),
                                             ("bert", "hidden_sizes", "hidden_size")])
def test_a_config_key_nothing_reads_is_refused(family, typo, near):
    # Hugging Face configs keep any keyword: a misspelt size would silently build the default model
    with pytest.raises(ConfigError, match=rf"model.config.{typo}: not a \w+Config setting.*did you mean {near}"):
        make_backbone(family, **{typo: 2})


def test_config_names_the_class_converts_or_maps_are_accepted():
    llama = make_backbone("llama", rope_theta=5000.0)  # a legacy name transformers 5 converts
    assert llama.model.config.rope_parameters["rope_theta"] == 5000.0
    t5 = make_backbone("t5", hidden_size=48, num_heads=4)  # T5Config's attribute_map: hidden_size -> d_model
    assert t5.hidden_size == 48


def test_exactly_one_source_required():
    from eetrain.backbones import T5Backbone

    with pytest.raises(ConfigError, match="exactly one of model.name_or_path"):
        T5Backbone(tokenizer=TOKENIZER)
    with pytest.raises(ConfigError, match=r"model.config.num_heads='x' must be an integer >= 1"):
        T5Backbone(config={"d_model": 32, "num_heads": "x"}, tokenizer=TOKENIZER)
    with pytest.raises(ConfigError, match=r"model.config.num_labels=2.5 must be an integer >= 1 \(model/bert_\*.yaml take "
                                          r"it from data.num_labels\)"):
        make_backbone("bert", num_labels=2.5)
    with pytest.raises(ConfigError, match="not a valid T5Config"):
        T5Backbone(config={"d_model": 32, "dropout_rate": "x"}, tokenizer=TOKENIZER)


@pytest.mark.parametrize("family, targets", [("t5", ["q", "v"]), ("llama", ["q_proj", "v_proj"])])
def test_lora_trains_only_adapters_and_exports_merged(tmp_path, family, targets):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    bb = make_backbone(family, lora={"r": 4, "lora_alpha": 8, "target_modules": targets})
    trainable = [n for n, p in bb.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    batch = bb.collate(examples())
    with torch.no_grad():
        for n, p in bb.named_parameters():
            if "lora_B" in n:
                p.normal_()  # make the adapters matter
        bb.eval()
        before = bb.exit_logits(bb(batch).hidden[-1])
    bb.save_pretrained(str(tmp_path / "m"))
    auto = AutoModelForSeq2SeqLM if family == "t5" else AutoModelForCausalLM
    plain = auto.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        after = plain(**bb.model_inputs(batch)).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_bad_lora_config_names_the_key():
    with pytest.raises(ConfigError, match="model.lora"):
        make_backbone("t5", lora={"r": 4, "no_such_option": 1})


@pytest.mark.parametrize(
    "lora, message",
    [
        ({"r": "abc", "target_modules": ["q", "v"]}, "model.lora.r='abc'; allowed: an integer >= 1"),
        ({"r": 0, "target_modules": ["q", "v"]}, "model.lora.r=0; allowed: an integer >= 1"),
        ({"r": 4, "lora_alpha": "abc", "target_modules": ["q", "v"]}, "model.lora.lora_alpha='abc'; allowed: a finite number > 0"),
        ({"r": 4, "target_modules": ["q"], "lora_dropout": "abc"}, "model.lora.lora_dropout='abc'; allowed: a finite number"),
        ({"r": 4, "target_modules": ["q"], "lora_dropout": -1}, "model.lora.lora_dropout=-1; allowed: a probability in [0, 1)"),
        ({"r": 4, "target_modules": ["q"], "bias": "maybe"}, "model.lora.bias='maybe'; allowed: none, all, lora_only"),
        ({"r": 4, "target_modules": ["q"], "rank_pattern": [1]}, "model.lora.rank_pattern=[1]; allowed: a mapping"),
        ({"r": 4, "target_modules": 5}, "model.lora.target_modules=5; allowed: a list of module names, e.g. [q, v]"),
        ({"r": 4, "target_modules": ["q"], "bogus": 1}, "model.lora: unknown key(s) bogus; peft's LoraConfig takes"),
        ({"r": 4, "target_modules": ["q"], "task_type": "XYZ"}, "model.lora is not a valid peft LoraConfig:"),
        # peft needs one name of the list to match: a misspelt second one was dropped unsaid
        ({"r": 4, "target_modules": ["q", "v_proj"]}, "model.lora.target_modules: 'v_proj' match(es) no module of the "
                                                      "t5 model; its linear layers are named"),
    ],
)
def test_lora_settings_are_checked_by_name(lora, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_backbone("t5", lora=lora)


@pytest.mark.parametrize("family, wrong, right", [
    ("llama", ["q", "v"], "q_proj, v_proj"), ("bert", ["q", "v"], "query, value"), ("llama", ["q_proj", "v_prj"], "v_proj"),
])
def test_lora_targets_of_another_family_name_the_model_s_layers(family, wrong, right):
    with pytest.raises(ConfigError, match=r"model.lora.target_modules: .* match\(es\) no module of the "
                                          rf"{family} model; its linear layers are named .*") as info:
        make_backbone(family, lora={"r": 4, "target_modules": wrong})
    assert all(name in str(info.value) for name in right.split(", "))
    with pytest.raises(ConfigError, match=re.escape(f"target_modules: [{right if ',' in right else 'q_proj, v_proj'}]")):
        make_backbone(family, lora=[4])  # not a mapping: the example is the family's own


def test_lora_on_bert_trains_its_new_classifier_whole(tmp_path):
    from transformers import BertForSequenceClassification

    from eetrain.losses import ExitCrossEntropy, JointLoss

    bb = make_backbone("bert", lora={"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]})
    trainable = [n for n, p in bb.named_parameters() if p.requires_grad]
    assert {n for n in trainable if "lora_" not in n} == {
        "model.classifier.modules_to_save.default.weight", "model.classifier.modules_to_save.default.bias"}
    before = bb.head_weight.detach().clone()
    batch = bb.collate(examples())
    opt = torch.optim.SGD([p for p in bb.parameters() if p.requires_grad], lr=0.5)
    JointLoss({"ce": ExitCrossEntropy("calm")})(bb(batch), bb).total.backward()
    opt.step()
    assert not torch.equal(bb.head_weight, before)  # the exits read the trained copy ...
    bb.eval()
    with torch.no_grad():
        mine = bb.exit_logits(bb(batch).hidden[-1])
        torch.testing.assert_close(mine, bb.model_logits(batch))  # ... which the model's own forward uses
    bb.save_pretrained(str(tmp_path / "m"))
    plain = BertForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**bb.model_inputs(batch)).logits, mine, rtol=1e-4, atol=1e-4)


def test_lora_on_bert_keeps_the_classifier_trained_beside_listed_modules():
    # a listed module trains whole besides the new classifier (it was replaced: random and frozen);
    # an explicit null keeps the classifier frozen
    bb = make_backbone("bert", lora={"r": 4, "target_modules": ["query", "value"], "modules_to_save": ["pooler"]})
    extra = {n for n, p in bb.named_parameters() if p.requires_grad and "lora_" not in n}
    assert bb.head_weight.requires_grad
    assert any(n.startswith("model.classifier.") for n in extra) and any(".pooler." in n for n in extra)
    bb = make_backbone("bert", lora={"r": 4, "target_modules": ["query", "value"], "modules_to_save": None})
    assert not bb.head_weight.requires_grad
    with pytest.raises(ConfigError, match=r"model.lora.modules_to_save: 'poolr' match\(es\) no module"):
        make_backbone("bert", lora={"r": 4, "target_modules": ["query"], "modules_to_save": ["poolr"]})


@pytest.mark.parametrize("family, targets, head", [
    ("t5", ["q", "lm_head"], "lm_head"), ("llama", ["q_proj", "lm_head"], "lm_head"),
])
def test_lora_on_the_shared_head_is_refused(family, targets, head):
    extra = {"tie_word_embeddings": False} if family == "llama" else {}
    with pytest.raises(ConfigError, match=re.escape(f"puts LoRA on the model's head {head!r}, which the exits read as "
                                                    f"one weight matrix; train it whole with "
                                                    f"model.lora.modules_to_save=[{head}]")):
        make_backbone(family, lora={"r": 4, "target_modules": targets}, **extra)
    bb = make_backbone(family, lora={"r": 4, "target_modules": targets[:1], "modules_to_save": [head]}, **extra)
    assert bb.head_weight.requires_grad
