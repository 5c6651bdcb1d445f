"""`+experiment=evaluate` / `python -m eetrain.evaluate` load the export's family (not always T5)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate

from eetrain.backbones import BertBackbone, LlamaBackbone, T5Backbone
from eetrain.checkpointing import export_pretrained
from eetrain.config import compose
from tests.conftest import make_backbone
from tests.in_process import cli


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    where = tmp_path_factory.mktemp("exports")
    return {
        family: export_pretrained(make_backbone(family), where / family / "export",
                                  {"family": family, "num_layers": 3})
        for family in ("t5", "llama", "bert")
    }


@pytest.mark.parametrize("family, cls", [("t5", T5Backbone), ("llama", LlamaBackbone), ("bert", BertBackbone)])
def test_evaluate_experiment_builds_the_export_s_adapter(exports, family, cls):
    cfg = compose(["+experiment=evaluate", f"model.name_or_path={exports[family]}"])
    assert cfg.model._target_ == "eetrain.backbones.load_backbone"
    backbone = instantiate(cfg.model)
    assert type(backbone) is cls and backbone.num_layers == 3


@pytest.mark.slow
def test_python_m_eetrain_evaluate_on_a_llama_export(tmp_path, exports):
    r = cli(f"model.name_or_path={exports['llama']}", f"hydra.run.dir={tmp_path / 'run'}", "exit.min_exit_layer=2",
            "exit.record.max_tokens=200", "data.eval_batch_size=32", "exit.classifiers.kinds=[]", cwd=tmp_path,
            module="eetrain.evaluate")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "policies.csv").is_file()
    assert "Exit policies on the validation set" in r.stdout
