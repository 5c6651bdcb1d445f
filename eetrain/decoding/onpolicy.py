"""Exit classifiers trained on what the decoder really shows them (on-policy states).

Offline, a classifier learns from teacher-forced records: every earlier token's keys/values are the
full model's. While decoding with CALM's state copying they are projections of exit states, so the
states a classifier reads shift. Here a split is decoded with the offline classifier's policy and the
decoder's strategy, every generated token is run on through all layers on the keys/values the strategy
left (`generate(..., record=True)`), and a classifier is trained on those states; then both are compared
on real decoding of held-out examples (token consistency with the full model at the same threshold).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from eetrain.exits.classifiers import feature_states, load_classifier, save_classifier
from eetrain.exits.measures import ExitRecords
from eetrain.exits.policy import ExitPolicy
from eetrain.exits.settings import exit_points, min_exit_layer
from eetrain.exits.training import _split, make_classifier, train_exit_classifier
from eetrain.files import write_json

from .calibration import batches, decode_all, sequences
from .generate import generate
from .metrics import token_consistency
from .settings import decoding_settings


def collect(
    backbone: Any, examples: Sequence[dict[str, Any]], policy: ExitPolicy | None, *, strategy: str,
    max_new_tokens: int, batch_size: int = 16,
) -> ExitRecords:
    """On-policy records of decoding `examples` with `policy` under `strategy`: `hidden (L, N, d)`,
    per-layer `predictions (L, N)` (labels: agreement with the last layer), positions, sequence ids."""
    parts, offset = [], 0
    for batch in batches(backbone, examples, batch_size):
        rec = generate(backbone, batch, policy, strategy=strategy, max_new_tokens=max_new_tokens, record=True).records
        if rec is not None:
            parts.append((rec, offset))
        offset += batch["input_ids"].shape[0]
    return ExitRecords(
        hidden=torch.cat([r.hidden for r, _ in parts], dim=1),
        predictions=torch.cat([r.predictions for r, _ in parts], dim=1),
        positions=torch.cat([r.positions for r, _ in parts]),
        sequence_ids=torch.cat([r.sequence_ids + o for r, o in parts]),
    )


def online_consistency(
    backbone: Any, examples: Sequence[dict[str, Any]], policy: ExitPolicy, *, strategy: str, max_new_tokens: int,
) -> dict[str, float]:
    """Token consistency with full-model decoding, and the mean exit layer, of `policy` on `examples`."""
    prompts = batches(backbone, examples, 16)
    full = sequences(decode_all(backbone, prompts, None, max_new_tokens=max_new_tokens))
    outs = decode_all(backbone, prompts, policy, strategy=strategy, max_new_tokens=max_new_tokens)
    layers = torch.cat([o.exit_layers[o.exit_layers > 0] for o in outs]).double()
    return {"consistency": token_consistency(sequences(outs), full), "mean_exit_layer": float(layers.mean())}


def run_on_policy(cfg: Any, backbone: Any, data: Any, out_dir: Path, settings: Any, layers: Sequence[int],
                  saved: dict[str, Path], seed: int) -> dict[str, Any]:
    """`exit.classifiers.on_policy`: retrain each saved classifier on on-policy states, compare both in
    real decoding of validation examples, save them as `<kind>_offline.pt` / `<kind>_on_policy.pt` and
    keep the more consistent one as `<kind>.pt`; write `on_policy.json` and print the comparison."""
    strategy = decoding_settings(cfg).strategy
    new_tokens = decoding_settings(cfg).max_new_tokens
    L = backbone.num_layers
    floor, points = min_exit_layer(cfg, L), exit_points(cfg, L)
    threshold = settings.on_policy_threshold
    train_examples = data.split_examples("train")[: settings.on_policy_examples]
    held_out = data.split_examples("validation")[: settings.on_policy_examples]
    report: dict[str, Any] = {"strategy": strategy, "threshold": threshold, "examples": len(train_examples)}
    print(f"\n[exit_classifiers] on-policy: decoding {len(train_examples)} training examples per classifier with "
          f"strategy {strategy} at threshold {threshold}; comparing on {len(held_out)} validation examples")
    for k, (kind, path) in enumerate(saved.items()):
        offline = load_classifier(path).eval()
        policy = ExitPolicy(offline, threshold, min_exit_layer=floor, exit_points=points)
        records = collect(backbone, train_examples, policy, strategy=strategy, max_new_tokens=new_tokens)
        # decoding records raw states: hand the classifier its own space (exit.features)
        if offline.features != "raw":
            with torch.no_grad():
                hidden = feature_states(backbone, records.hidden.to(next(backbone.parameters()).device),
                                        offline.features)
            records = replace(records, hidden=hidden.cpu())
        train_rec, val_rec = _split(records, settings.val_fraction, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + k)
            on_policy = make_classifier(kind, backbone.hidden_size, calm_hidden=settings.calm_hidden,
                                        mlp_width=settings.mlp_width, lstm_hidden_size=settings.lstm_hidden_size,
                                        lstm_num_layers=settings.lstm_num_layers, features=offline.features)
        train_exit_classifier(on_policy, train_rec, layers=layers, epochs=settings.epochs,
                              batch_size=settings.batch_size, lr=settings.lr, weight_decay=settings.weight_decay,
                              val_records=val_rec, seed=seed + k)
        device = next(backbone.parameters()).device
        row = {}
        for name, clf in (("offline", offline), ("on_policy", on_policy)):
            pol = ExitPolicy(clf.to(device), threshold, min_exit_layer=floor, exit_points=points)
            row[name] = online_consistency(backbone, held_out, pol, strategy=strategy, max_new_tokens=new_tokens)
        row["tokens"] = records.num_tokens
        # <kind>.pt stays the one that decodes more consistently; both are kept beside it
        row["kept"] = "on_policy" if row["on_policy"]["consistency"] > row["offline"]["consistency"] else "offline"
        report[kind] = row
        save_classifier(offline.cpu(), path.with_name(f"{kind}_offline.pt"))
        save_classifier(on_policy.cpu(), path.with_name(f"{kind}_on_policy.pt"))
        if row["kept"] == "on_policy":
            save_classifier(on_policy.cpu(), path)
        print(f"  {kind}: trained on {records.num_tokens} on-policy tokens; in decoding at threshold {threshold}: "
              f"offline consistency {row['offline']['consistency']:.4f} (mean exit {row['offline']['mean_exit_layer']:.2f}), "
              f"on-policy {row['on_policy']['consistency']:.4f} (mean exit {row['on_policy']['mean_exit_layer']:.2f}); "
              f"{kind}.pt is the {row['kept'].replace('_', '-')} one")
    write_json(Path(out_dir) / "exit_classifiers" / "on_policy.json", report)
    return report
