"""Task quality during training: greedy generation on a few validation examples after validation.

Losses say little about what a user gets; every `every_n_validations`-th validation, this callback
decodes `max_examples` validation examples with the full model and with the configured exit policy
(`decoding.policy`, through `eetrain.decoding.generate`) and logs the data config's metrics as
`val/<metric>` (last layer) and `val/<metric>_early_exit`, with `val/early_exit_mean_layer`, so W&B and
CSV curves show task quality beside the losses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch

from eetrain.errors import positive_int
from eetrain.task_metrics import corpus_scores

from .calibration import batches
from .generate import generate
from .settings import FALLBACK_POLICY, build_policy


class GenerationMetrics(L.Callback):
    """Log task metrics of greedy decoding (full model and early exit) after validation.

    every_n_validations: decode after every n-th validation run (sanity checks excluded).
    max_examples: validation examples decoded (the first ones, the same every time).
    policy: `decoding.policy` fields (null fields: CALM's softmax gap 0.9 from `min_exit_layer`).
    """

    def __init__(
        self,
        every_n_validations: int = 1,
        max_examples: int = 32,
        batch_size: int = 16,
        policy: Mapping[str, Any] | None = None,
        min_exit_layer: int | None = None,
        strategy: str | None = None,
        max_new_tokens: int = 64,
    ):
        for key, value in (("every_n_validations", every_n_validations), ("max_examples", max_examples),
                           ("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
            positive_int(value, f"callbacks.generation_metrics.{key}")
        self.every = every_n_validations
        self.max_examples = max_examples
        self.batch_size = batch_size
        fields = {k: v for k, v in dict(policy or {}).items() if v is not None}
        self.fields = {**FALLBACK_POLICY, "min_exit_layer": min_exit_layer or FALLBACK_POLICY["min_exit_layer"],
                       **fields}
        self.strategy = strategy or "copy"
        self.max_new_tokens = max_new_tokens
        self.runs = 0

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.runs += 1
        backbone = pl_module.backbone
        data = trainer.datamodule
        if (self.runs - 1) % self.every or backbone.head_kind != "token" or data is None:
            return
        metric = getattr(data, "metric", None)
        if metric is None:
            return
        metrics = list(getattr(data, "metrics", None) or [metric])
        examples = data.split_examples("validation")[: self.max_examples]
        from .curve import references, texts

        refs = references(backbone, examples)
        prompts = batches(backbone, examples, self.batch_size)
        fields = dict(self.fields)
        fields["min_exit_layer"] = min(int(fields["min_exit_layer"]), backbone.num_layers)
        classifier = str(fields["measure"]).startswith("classifier:")
        policy = None if classifier else build_policy(fields, backbone, None, horizon=self.max_new_tokens)
        # self_speculative is lossless (its text is the full model's) and takes no policy: full decoding only
        speculative = self.strategy == "self_speculative"
        kwargs = dict(strategy="copy" if speculative else self.strategy, max_new_tokens=self.max_new_tokens,
                      batch_mode="auto")
        with torch.no_grad():
            full = [s for b in prompts for s in generate(backbone, b, None, **kwargs).sequences()]
            logs = {f"val/{k}": v for k, v in corpus_scores(metrics, texts(backbone, full), refs).items()}
            if policy is not None and not speculative:  # a classifier is trained after fitting: none before
                outs = [generate(backbone, b, policy, **kwargs) for b in prompts]
                seqs = [s for o in outs for s in o.sequences()]
                scores = corpus_scores(metrics, texts(backbone, seqs), refs)
                logs.update({f"val/{k}_early_exit": v for k, v in scores.items()})
                layers = torch.cat([o.exit_layers[o.exit_layers > 0] for o in outs]).double()
                logs["val/early_exit_mean_layer"] = float(layers.mean()) if layers.numel() else float("nan")
        for name, value in logs.items():
            pl_module.log(name, value, batch_size=len(examples))
