import os

# Tests never touch the network: hub lookups fail fast, W&B writes offline run files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The workers share the machine's cores: one thread each, and for the processes tests start. Tiny
    # models gain little from a second thread, and two workers' threads on two cores wait on each other.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: the cores this process may run on (not the host's, in a container; macOS has no
    affinity: its core count), at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 8))

from eetrain.data.make_demo import DEMO_DIR  # noqa: E402

TOKENIZER = str(DEMO_DIR / "tokenizer")

TINY = {
    "t5": dict(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=3, num_decoder_layers=3, dropout_rate=0.0),
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128),
    "bert": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 max_position_embeddings=128, num_labels=3, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0),
}


def make_backbone(family: str, lora: dict | None = None, **overrides):
    from eetrain.backbones import BertBackbone, LlamaBackbone, T5Backbone

    cls = {"t5": T5Backbone, "llama": LlamaBackbone, "bert": BertBackbone}[family]
    return cls(config={**TINY[family], **overrides}, tokenizer=TOKENIZER, seed=0, lora=lora)


def examples():
    return [
        {"source_ids": [5, 6, 7, 8, 1], "target_ids": [9, 10, 1], "label": 1},
        {"source_ids": [11, 1], "target_ids": [12, 13, 14, 15, 1], "label": 2},
    ]


def pytest_collection_modifyitems(config, items):
    """`gpu` tests (FSDP, DeepSpeed) need CUDA: skipped where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def backbone_factory():
    return make_backbone


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def nan_caches(monkeypatch):
    """Decoding caches start as NaN instead of whatever memory held: a read of a slot nothing wrote, even
    under a mask (a masked weight times NaN is NaN), then shows in the output."""
    from eetrain.backbones import kv

    empty = kv.empty_cache

    def poisoned(*args, **kwargs):
        k, v = empty(*args, **kwargs)
        for cache in (*k, *v):
            cache.fill_(float("nan"))
        return k, v

    monkeypatch.setattr(kv, "empty_cache", poisoned)


def load_benchmark(name: str):
    """Import `benchmarks/<name>.py` (not a package) as a module; a generator for module fixtures."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
