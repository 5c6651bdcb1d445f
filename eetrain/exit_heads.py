"""Stage `exit_heads`: DeeBERT's second stage — train the per-layer exit heads on a frozen model.

DeeBERT first fine-tunes the model with its final classifier only (`loss=last_layer`), then freezes
everything that was trained and fits the internal classifiers (`model.exit_head=per_layer`), each on its
own cross-entropy, so early exits cannot degrade the final layer. This stage is that second step, for
any family: it fits `backbone.exit_heads` (uniform weights over their layers) with a Lightning Trainer on
the run's data, reports every layer again and refreshes the export's `exit_heads.safetensors`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch

from eetrain.errors import ConfigError, check_keys, number, positive_int
from eetrain.files import write_json
from eetrain.losses.joint import ExitCrossEntropy, JointLoss
from eetrain.module import EarlyExitModule
from eetrain.progress import training_progress_bar


def heads_settings(cfg: Any) -> dict[str, Any]:
    node = dict(((cfg.get("exit") or {}).get("heads")) or {})
    check_keys(node, {"epochs", "lr", "weight_decay"}, "exit.heads")
    epochs = positive_int(node.get("epochs", 2), "exit.heads.epochs")
    lr = number(node.get("lr", 1e-3), "exit.heads.lr", above=0)
    return {"epochs": epochs, "lr": lr, "weight_decay": number(node.get("weight_decay", 0.0), "exit.heads.weight_decay",
                                                                 at_least=0)}


def check_config(cfg: Any, backbone: Any) -> None:
    heads_settings(cfg)
    if backbone.exit_heads is None:
        raise ConfigError("stages: exit_heads trains per-layer exit heads; set model.exit_head=per_layer")


def run_stage(cfg: Any, backbone: Any, data: Any, out_dir: Path) -> list[dict[str, float]]:
    from eetrain.train import evaluate_layers, write_rows

    check_config(cfg, backbone)
    settings = heads_settings(cfg)
    layers = sorted(int(k) for k in backbone.exit_heads)
    trainable = {p: p.requires_grad for p in backbone.parameters()}
    for p in backbone.parameters():
        p.requires_grad_(False)
    for p in backbone.exit_heads.parameters():
        p.requires_grad_(True)
    loss = JointLoss({"ce": ExitCrossEntropy(weights="uniform", layers=layers)})
    optimizer = functools.partial(torch.optim.AdamW, lr=settings["lr"], weight_decay=settings["weight_decay"])
    module = EarlyExitModule(backbone, loss, optimizer=optimizer)
    trainer_cfg = cfg.get("trainer") or {}
    trainer = L.Trainer(
        max_epochs=settings["epochs"], accelerator=trainer_cfg.get("accelerator", "auto"), devices=1,
        logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=bool(trainer_cfg.get("enable_progress_bar", True)),
        callbacks=[training_progress_bar(bool(trainer_cfg.get("enable_progress_bar", True)))],
        limit_train_batches=trainer_cfg.get("limit_train_batches"), limit_val_batches=0,
        default_root_dir=str(out_dir),
    )
    print(f"\n[exit_heads] training the exit heads of layers {layers} on the frozen model "
          f"({settings['epochs']} epochs, lr {settings['lr']:g})")
    try:
        trainer.fit(module, datamodule=data)
    finally:
        for p, flag in trainable.items():
            p.requires_grad_(flag)
    rows = evaluate_layers(backbone, data.val_dataloader())
    from eetrain.layer_metrics import format_table

    print("\nPer-layer validation report with the trained exit heads")
    print(format_table(rows))
    write_rows(rows, Path(out_dir) / "layer_report.csv")
    export = Path(out_dir) / "export"
    if export.is_dir():
        backbone.save_exit_heads(str(export))
        settings_path = export / "early_exit.json"
        if settings_path.is_file():  # its report and trained exits were the joint training's
            stored = json.loads(settings_path.read_text())
            trained, weights = loss.terms["ce"].resolve(backbone.num_layers)
            stored.setdefault("trained_exits", {})["exit_heads"] = {
                "layers": list(trained), "weights": [round(float(w), 6) for w in weights]}
            stored["validation_layers"] = rows
            write_json(settings_path, stored, sort_keys=True)
    return rows
