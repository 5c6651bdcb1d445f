"""Second stage: train exit classifiers on a *frozen* backbone (CALM, MEE MLP, MEE LSTM).

Targets (CALM/FREE/MEE): ``label_i = 1`` iff ``argmax g(h_i) == argmax g(h_L)`` (the **last** layer,
:func:`~eetrain.exits.classifiers.exit_labels`), class-balanced cross-entropy, a few epochs.

Two ways to feed :class:`ExitClassifierModule`:

* **records** (the stage's way): the frozen backbone runs once over the training split
  (:func:`~eetrain.exits.record.record_exits`) and every epoch reads ``hidden (N, L, d)`` and the
  targets from a ``TensorDataset`` -- since the backbone never changes, re-running it every epoch
  would only repeat the same numbers;
* **batches**: give the module the backbone and a text data loader; it computes the states under
  ``no_grad`` with the backbone kept in eval mode (for data too large to record).

Either way the optimiser sees only the classifier's parameters.

Only layers ``min_exit_layer .. L-1`` contribute to the loss: the policies never ask below the
minimum exit layer, and layer ``L`` is labelled 1 by definition (it would only teach "always exit").
The LSTM still reads ``h_1..h_i`` for every scored layer ``i``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from eetrain.errors import ConfigError

from .classifiers import (
    CLASSIFIERS,
    EXIT_INDEX,
    CalmClassifier,
    ExitClassifier,
    LSTMClassifier,
    ThreeStateMLP,
    class_balanced_cross_entropy,
    exit_labels,
    feature_states,
    save_classifier,
)
from .measures import ExitRecords
from .record import record_exits, token_view
from .settings import classifier_settings, exit_points, min_exit_layer, training_layers

__all__ = [
    "make_classifier",
    "training_layers",
    "batch_targets",
    "records_dataset",
    "ExitClassifierModule",
    "train_exit_classifier",
    "run_stage",
]


def make_classifier(
    kind: str,
    d: int,
    *,
    calm_hidden: int | None = None,
    mlp_width: int | None = None,
    lstm_hidden_size: int = 250,
    lstm_num_layers: int = 1,
    features: str = "raw",
) -> ExitClassifier:
    """A fresh classifier of ``kind`` (``calm``, ``three_state_mlp``, ``lstm``) for hidden size ``d``,
    reading states in the space ``features`` (``raw`` or ``normed``: ``exit.features``)."""
    if kind == CalmClassifier.kind:
        return CalmClassifier(d, hidden=calm_hidden, features=features)
    if kind == ThreeStateMLP.kind:
        return ThreeStateMLP(d, width=mlp_width, features=features)
    if kind == LSTMClassifier.kind:
        return LSTMClassifier(d, hidden_size=lstm_hidden_size, num_layers=lstm_num_layers, features=features)
    raise ValueError(f"unknown classifier kind {kind!r}; allowed: {sorted(CLASSIFIERS)}")


def batch_targets(predictions: Tensor) -> Tensor:
    """``(L, N)`` per-layer argmax -> ``(L, N)`` long targets (1 = exit: agrees with layer L)."""
    return exit_labels(predictions).long()


def records_dataset(records: ExitRecords) -> TensorDataset:
    """``TensorDataset(hidden (N, L, d), targets (N, L))`` over the tokens of ``records``."""
    if records.hidden is None:
        raise ValueError("training exit classifiers from records needs hidden states (store_hidden=True)")
    hidden = records.hidden.transpose(0, 1)  # a view: batches are gathered token by token
    targets = batch_targets(records.preds()).transpose(0, 1)
    return TensorDataset(hidden, targets)


class ExitClassifierModule(L.LightningModule):
    """Trains one exit classifier with class-balanced cross-entropy; a given backbone stays frozen.

    Batches are either ``(hidden (B, L, d), targets (B, L))`` (from :func:`records_dataset`) or the
    backbone's own text batches (then ``backbone`` is required).  Logs ``train/loss`` and, on
    validation batches, ``val/loss``, ``val/acc`` and ``val/balanced_acc`` (decision ``P(exit) >= 0.5``).
    """

    def __init__(
        self,
        classifier: ExitClassifier,
        layers: Sequence[int],
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        backbone: Any | None = None,
    ) -> None:
        super().__init__()
        self.classifier = classifier
        self.layers = tuple(int(i) for i in layers)
        if not self.layers:
            raise ValueError("layers is empty: nothing to train on")
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.backbone = backbone
        if backbone is not None:
            backbone.requires_grad_(False)
            backbone.eval()
        self._val: list[Tensor] = []

    def train(self, mode: bool = True) -> ExitClassifierModule:
        # Lightning switches the whole module to train mode each epoch: keep the backbone in eval
        # (no dropout), so the states -- and therefore the targets -- never change.
        super().train(mode)
        if self.backbone is not None:
            self.backbone.eval()
        return self

    def _states(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(hidden (L, M, d), targets (L, M))`` for a batch of either kind."""
        if isinstance(batch, list | tuple):
            hidden, targets = batch
            return hidden.transpose(0, 1), targets.transpose(0, 1)
        if self.backbone is None:
            raise ValueError("text batches need the backbone: ExitClassifierModule(..., backbone=...)")
        with torch.no_grad():
            states = self.backbone(batch)
            hs, _, _, _, _ = token_view(self.backbone, states.hidden, None, states.labels)
            seq = self.backbone.head_kind == "sequence"
            preds = torch.stack([
                self.backbone.exit_logits(h[:, None] if seq else h, layer).argmax(-1)
                for layer, h in zip(states.layers, hs, strict=True)
            ])
            # the classifier reads the states in its own space (raw or final-normed)
            return feature_states(self.backbone, torch.stack(hs), self.classifier.features), batch_targets(preds)

    def _loss(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        hidden, targets = self._states(batch)
        rows = [i - 1 for i in self.layers]
        if max(rows) >= hidden.shape[0]:
            raise ValueError(f"layers {self.layers} exceed the {hidden.shape[0]} recorded layers")
        logits = self.classifier.record_logits(hidden)[rows]  # (len(layers), M, 2)
        flat_logits, flat_targets = logits.reshape(-1, 2), targets[rows].reshape(-1)
        return class_balanced_cross_entropy(flat_logits, flat_targets), flat_logits, flat_targets

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, _, targets = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=targets.numel())
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, logits, targets = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=targets.numel())
        decide = (logits.argmax(-1) == EXIT_INDEX).long()
        self._val.append(torch.stack([decide, targets]).cpu())

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        decide, targets = torch.cat(self._val, dim=1)
        self.log("val/acc", (decide == targets).float().mean())
        recalls = [(decide[targets == c] == c).float().mean() for c in (0, 1) if bool((targets == c).any())]
        self.log("val/balanced_acc", torch.stack(recalls).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.classifier.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def _split(records: ExitRecords, val_fraction: float, seed: int) -> tuple[ExitRecords, ExitRecords | None]:
    """Hold out ``val_fraction`` of the *sequences* (not tokens: tokens of one sequence are alike)."""
    if val_fraction <= 0.0 or records.sequence_ids is None:
        return records, None
    ids = records.sequence_ids.unique()
    if ids.numel() < 2:
        return records, None
    gen = torch.Generator().manual_seed(seed)
    n_val = max(1, min(ids.numel() - 1, int(round(val_fraction * ids.numel()))))  # one sequence left to train on
    val_ids = ids[torch.randperm(ids.numel(), generator=gen)[:n_val]]
    is_val = torch.isin(records.sequence_ids, val_ids)
    return records.subset(~is_val), records.subset(is_val)


def train_exit_classifier(
    classifier: ExitClassifier,
    train_records: ExitRecords,
    *,
    layers: Sequence[int],
    epochs: int = 5,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    val_records: ExitRecords | None = None,
    seed: int = 0,
    trainer_kwargs: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Fit ``classifier`` in place on recorded states with a real Lightning ``Trainer``.

    Args:
        classifier: the classifier to train (its hidden size must match the records').
        train_records: records with ``hidden (L, N, d)`` and predictions/logits.
        layers: 1-based layers whose decisions enter the loss (:func:`training_layers`).
        epochs, batch_size, lr, weight_decay: optimisation (AdamW).
        val_records: optional held-out records for ``val/*`` metrics after every epoch.
        seed: seeds the shuffling.
        trainer_kwargs: extra ``L.Trainer`` arguments (``accelerator``, ``logger``, ...).

    Returns:
        The last logged metrics as floats (``train/loss``, and ``val/*`` with ``val_records``).
    """
    if train_records.hidden is None:
        raise ValueError("train_records hold no hidden states")
    if train_records.hidden.shape[-1] != classifier.hidden_size:
        raise ValueError(
            f"the classifier reads hidden size {classifier.hidden_size}, the records have "
            f"{train_records.hidden.shape[-1]}"
        )
    module = ExitClassifierModule(classifier, layers, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    train_set = records_dataset(train_records)
    # whole batches are gathered with one fancy index (batch_size=None + a BatchSampler): indexing
    # token by token and stacking would cost more than the classifier's own step
    train_loader = DataLoader(
        train_set,
        sampler=BatchSampler(RandomSampler(train_set, generator=gen), batch_size, drop_last=False),
        batch_size=None,
    )
    val_loader = None
    if val_records is not None and val_records.num_tokens > 0:
        val_set = records_dataset(val_records)
        val_loader = DataLoader(
            val_set,
            sampler=BatchSampler(SequentialSampler(val_set), max(batch_size, 1024), drop_last=False),
            batch_size=None,
        )
    kwargs: dict[str, Any] = dict(
        max_epochs=int(epochs),
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
    )
    kwargs.update(trainer_kwargs or {})
    if kwargs["enable_progress_bar"]:
        from eetrain.progress import training_progress_bar

        # plain lines in logs, Rich on a terminal (Lightning's default Rich bar prints nothing until the end)
        kwargs.setdefault("callbacks", [training_progress_bar()])
    trainer = L.Trainer(**kwargs)
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader)
    classifier.eval()
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def run_stage(cfg: Any, backbone: Any, data: Any, out_dir: Path) -> dict[str, Path]:
    """Stage ``exit_classifiers``: record the training split once, train every ``exit.classifiers.kinds``.

    Saves ``<exit.classifiers.dir or out_dir/exit_classifiers>/<kind>.pt`` (``save_classifier``) and
    a per-classifier metrics CSV log under ``out_dir/exit_classifiers/logs``.  Returns kind -> path.
    """
    from lightning.pytorch.loggers import CSVLogger

    settings = classifier_settings(cfg)
    if not settings.kinds:
        print("[exit_classifiers] exit.classifiers.kinds is empty: nothing to train")
        return {}
    floor = min_exit_layer(cfg, backbone.num_layers)
    try:
        layers = training_layers(backbone.num_layers, floor, exit_points(cfg, backbone.num_layers))
    except ValueError as e:
        raise ConfigError(f"exit.min_exit_layer={floor}: {e}") from e
    out_dir = Path(out_dir)
    data.setup("fit")
    records = record_exits(
        backbone, data.train_dataloader(), max_tokens=settings.max_train_tokens, features=settings.features
    )
    seed = int(cfg.get("seed", 0) or 0)
    train_rec, val_rec = _split(records, settings.val_fraction, seed)
    positives = float(batch_targets(train_rec.preds())[list(i - 1 for i in layers)].float().mean())
    print(
        f"\n[exit_classifiers] recorded {records.num_tokens} training tokens x {records.num_layers} layers "
        f"(d={backbone.hidden_size}, {settings.features} states); training the decisions at layers {list(layers)} on "
        f"{train_rec.num_tokens} tokens, {0 if val_rec is None else val_rec.num_tokens} held out; "
        f"share of 'exit' targets {positives:.3f}"
    )
    accelerator = str((cfg.get("trainer") or {}).get("accelerator", "cpu"))
    progress = bool((cfg.get("trainer") or {}).get("enable_progress_bar", False))
    saved: dict[str, Path] = {}
    for k, kind in enumerate(settings.kinds):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + k)  # the classifier's initialisation
            classifier = make_classifier(
                kind,
                backbone.hidden_size,
                calm_hidden=settings.calm_hidden,
                mlp_width=settings.mlp_width,
                lstm_hidden_size=settings.lstm_hidden_size,
                lstm_num_layers=settings.lstm_num_layers,
                features=settings.features,  # saved with the classifier: loading reads the same space
            )
        logger = CSVLogger(out_dir / "exit_classifiers", name="logs", version=kind)
        metrics = train_exit_classifier(
            classifier,
            train_rec,
            layers=layers,
            epochs=settings.epochs,
            batch_size=settings.batch_size,
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            val_records=val_rec,
            seed=seed + k,
            trainer_kwargs=dict(accelerator=accelerator, logger=logger, enable_progress_bar=progress),
        )
        path = settings.path(kind, out_dir)
        save_classifier(classifier.cpu(), path)
        saved[kind] = path
        shown = ", ".join(f"{m}={v:.4f}" for m, v in sorted(metrics.items()) if math.isfinite(v))
        print(f"[exit_classifiers] {kind}: {shown} -> {path}")
    if settings.on_policy and saved:
        from eetrain.decoding.onpolicy import run_on_policy

        run_on_policy(cfg, backbone, data, out_dir, settings, layers, saved, seed)
    return saved
