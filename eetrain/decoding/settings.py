"""The `decoding` config node and the exit policy an export carries.

An export's `early_exit.json` holds `"policy"`: the measure (or `classifier:<kind>` with its file
beside the weights), threshold, minimum exit layer, measure kwargs, decay and exit points — the
Learn-then-Test threshold when the `policies` stage calibrated one. `generate` on an export uses it
unless `decoding.policy.*` overrides a field; `decoding.policy.measure=full` decodes without exits.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from eetrain.errors import ConfigError, boolean, check_keys, positive_int
from eetrain.exits.classifiers import CLASSIFIERS, FEATURES, load_classifier
from eetrain.exits.measures import MEASURES
from eetrain.exits.policy import ExitPolicy
from eetrain.exits.settings import (
    classifier_settings,
    decay_settings,
    exit_points,
    feature_space,
    min_exit_layer,
    policy_specs,
)
from eetrain.exits.thresholds import DecayingThreshold
from eetrain.files import atomic_file, write_json

from .adaptive import adaptive_settings
from .generate import BATCH_MODES, STRATEGIES, check_rollback

POLICY_KEYS = (
    "measure", "threshold", "min_exit_layer", "kwargs", "decay", "exit_points", "classifier", "check_every",
    "candidates", "features",
)
#: stored beside the policy in early_exit.json, not a policy field of decoding.policy
STORED_ONLY = ("strategy", "calibrated", "calibration")
#: what a policy is when neither the export nor the command line says (CALM's measure and floor)
FALLBACK_POLICY = {"measure": "softmax_gap", "threshold": 0.9, "min_exit_layer": 4}
CLASSIFIER_FILE = "exit_classifier_{kind}.pt"
SETTINGS_FILE = "early_exit.json"


@dataclass(frozen=True)
class DecodingSettings:
    strategy: str
    batch_mode: str
    gather_min_batch: int | None
    max_new_tokens: int
    temperature: float
    top_p: float
    draft_layer: int | None
    draft_tokens: int
    split: str
    max_examples: int | None
    batch_size: int
    compare_full: bool
    adaptive_threshold: Any = None  # AdaptiveSettings (FREE's estimator) or None
    rollback: float | None = None  # FREE's RollBack: cross-entropy limit in nats
    flops_examples: int | None = 32  # the first examples, decoded again with a FLOP counter (None: all)

    @property
    def flops_batches(self) -> int | None:
        """Batches whose decodes are counted: enough to cover `flops_examples` (None: all)."""
        return None if self.flops_examples is None else -(-self.flops_examples // self.batch_size)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def decoding_settings(cfg: Any, model_dir: str | None = None) -> DecodingSettings:
    """`decoding`, validated; a null `strategy` is the one the export's policy was calibrated with
    (`model_dir`'s early_exit.json), else copy."""
    node = dict(_plain(cfg.get("decoding")) or {})
    if node.get("strategy") is None:
        node["strategy"] = (stored_policy(model_dir) or {}).get("strategy") or "copy"
    check_keys(node, set(DecodingSettings.__dataclass_fields__) | {"policy"}, "decoding")
    if node.get("strategy", "copy") not in STRATEGIES:
        raise ConfigError(f"decoding.strategy={node.get('strategy')!r}; allowed: {', '.join(STRATEGIES)}")
    if node.get("batch_mode", "auto") not in BATCH_MODES:
        raise ConfigError(f"decoding.batch_mode={node.get('batch_mode')!r}; allowed: {', '.join(BATCH_MODES)}")
    if node["strategy"] == "self_speculative" and node.get("batch_mode", "auto") != "auto":
        raise ConfigError(f"decoding.batch_mode={node['batch_mode']!r}: self_speculative decodes every row at once, "
                          "each at its own cache slots (no ride_along or gather); allowed with it: auto")
    if node["strategy"] == "self_speculative" and node.get("gather_min_batch") is not None:
        raise ConfigError(f"decoding.gather_min_batch={node['gather_min_batch']!r}: self_speculative decodes every row "
                          "at once (no ride_along or gather to choose between); allowed with it: null")
    positive_int(node.get("max_examples"), "decoding.max_examples", null="the whole split")
    for key in ("max_new_tokens", "batch_size", "draft_tokens"):
        positive_int(node.get(key, 1), f"decoding.{key}")
    positive_int(node.get("gather_min_batch"), "decoding.gather_min_batch", null="the measured crossover")
    positive_int(node.get("draft_layer"), "decoding.draft_layer", null="half the model's layers")
    flops = node.get("flops_examples", 32)
    if flops is not None and (isinstance(flops, bool) or not isinstance(flops, int) or flops < 0):
        raise ConfigError(f"decoding.flops_examples={flops!r}; allowed: null (every example), 0 (no FLOP count) "
                          "or a number of examples >= 1")
    temperature, top_p = node.get("temperature", 0.0), node.get("top_p", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 <= temperature < math.inf:
        raise ConfigError(f"decoding.temperature={temperature!r}; allowed: a number >= 0 (0: greedy)")
    if isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1:
        raise ConfigError(f"decoding.top_p={top_p!r}; allowed: 0 < top_p <= 1")
    return DecodingSettings(
        strategy=node.get("strategy", "copy"),
        batch_mode=node.get("batch_mode", "auto"),
        gather_min_batch=node.get("gather_min_batch"),
        max_new_tokens=int(node.get("max_new_tokens", 64)),
        temperature=float(node.get("temperature", 0.0)),
        top_p=float(node.get("top_p", 1.0)),
        draft_layer=node.get("draft_layer"),
        draft_tokens=int(node.get("draft_tokens", 4)),
        split=str(node.get("split", "test")),
        max_examples=node.get("max_examples"),
        batch_size=int(node.get("batch_size", 1)),
        compare_full=boolean(node.get("compare_full", True), "decoding.compare_full"),
        adaptive_threshold=adaptive_settings(node.get("adaptive_threshold")),
        rollback=_rollback(node),
        flops_examples=flops,
    )


def _rollback(node: Mapping[str, Any]) -> float | None:
    value = node.get("rollback")
    if value is None:
        return None
    return check_rollback(value, node.get("strategy"), node.get("temperature", 0.0))


def stored_policy(model_dir: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """The policy an export's `early_exit.json` carries, or None."""
    if model_dir is None:
        return None
    path = Path(str(model_dir)).expanduser() / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text())
        policy = settings.get("policy")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ConfigError(f"{path} is not a JSON object ({e}); re-export the model or restore the file") from e
    if policy is not None and not isinstance(policy, dict):
        raise ConfigError(f"{path}: 'policy' must be a JSON object of decoding.policy's keys, got {policy!r}")
    return policy


def load_export_policy(
    model_dir: str | os.PathLike[str], backbone: Any, max_new_tokens: int = 64
) -> tuple[ExitPolicy | None, dict[str, Any]]:
    """The exit policy an export carries, for `generate` from Python: `(policy, keywords)`.

    `policy` is built from the export's `early_exit.json` (a classifier from its weights beside the model;
    None when it says `full`); `keywords` are `generate`'s arguments it was chosen with: `strategy` and
    the check schedule (`check_every`, `candidates`) when set. `max_new_tokens` is the decay's N when the
    stored decaying threshold leaves it null (CALM's N: the most tokens generated). Use::

        policy, kw = load_export_policy(path, backbone, max_new_tokens=64)
        out = generate(backbone, batch, policy, max_new_tokens=64, **kw)
    """
    stored = stored_policy(model_dir)
    if stored is None:
        raise ConfigError(f"{model_dir}: no exit policy ({SETTINGS_FILE} with a 'policy'); it is written by "
                          "training's export (export=true): pass an ExitPolicy to generate instead")
    fields = {**FALLBACK_POLICY, **{k: v for k, v in stored.items() if k not in STORED_ONLY}}
    policy = build_policy(fields, backbone, str(model_dir), horizon=max_new_tokens)
    keywords = {"strategy": stored.get("strategy") or "copy"}
    keywords.update({k: v for k, v in check_schedule(fields).items() if v is not None})
    return policy, keywords


def policy_fields(cfg: Any, model_dir: str | None) -> dict[str, Any]:
    """`decoding.policy` with its null fields filled from the export's policy, then the fallback."""
    node = _plain((cfg.get("decoding") or {}).get("policy")) or {}
    if not isinstance(node, Mapping):
        raise ConfigError(f"decoding.policy must be a mapping with keys {list(POLICY_KEYS)}, got {node!r}")
    unknown = sorted(set(node) - set(POLICY_KEYS))
    if unknown:
        raise ConfigError(f"decoding.policy: unknown key(s) {unknown}; allowed: {list(POLICY_KEYS)}")
    stored = {k: v for k, v in (stored_policy(model_dir) or {}).items() if k not in STORED_ONLY}
    fields = {k: v for k, v in node.items() if v is not None}
    if "measure" in fields and fields["measure"] != stored.get("measure"):
        stored = {}  # another measure: the stored threshold and classifier belong to the stored one
    floor = (cfg.get("exit") or {}).get("min_exit_layer")
    if floor is None:  # null: the loaded export's own (as the policies stage reads it), else CALM's 4
        from eetrain.exits.settings import export_min_exit_layer

        floor = export_min_exit_layer(cfg)[0]
    merged = {**FALLBACK_POLICY, "min_exit_layer": floor, **stored, **fields}
    if merged.get("features") is None and not str(merged.get("measure")).startswith("classifier:"):
        merged["features"] = _features(cfg)  # saturation reads exit.features' space; a classifier its own
    return merged


def check_schedule(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The check schedule of policy fields, as `generate`'s keyword arguments (`check_every`,
    `candidates`), both validated by `generate` itself."""
    return {"check_every": fields.get("check_every"), "candidates": fields.get("candidates")}


def build_policy(
    fields: Mapping[str, Any], backbone: Any, model_dir: str | None, horizon: int | None = None
) -> ExitPolicy | None:
    """An `ExitPolicy` from policy fields (None for `measure: full`); errors name `decoding.policy.*`
    (and the export's file, where the keys not set on the command line come from).
    The check schedule (`check_every`, `candidates`) goes to `generate` (see `check_schedule`).
    horizon: the decay's N when `decay.N` is null (CALM's N: the most tokens generated)."""
    with naming_the_export(model_dir):
        return _build_policy(fields, backbone, model_dir, horizon)


@contextlib.contextmanager
def naming_the_export(model_dir: str | None) -> Iterator[None]:
    """A policy error also names the export's file when the policy's unset keys come from it."""
    try:
        yield
    except ConfigError as e:
        if stored_policy(model_dir) is None:
            raise
        where = Path(str(model_dir)).expanduser() / SETTINGS_FILE
        raise ConfigError(f"{e} (the decoding.policy keys not set on the command line come from {where})") from e


def _build_policy(
    fields: Mapping[str, Any], backbone: Any, model_dir: str | None, horizon: int | None
) -> ExitPolicy | None:
    measure = fields.get("measure")
    if measure == "full":
        return None
    raw_kwargs = fields.get("kwargs") or {}
    if not isinstance(raw_kwargs, Mapping):
        raise ConfigError(f"decoding.policy.kwargs={raw_kwargs!r}; allowed: null or a mapping of the measure's "
                          "arguments (e.g. decoding.policy.kwargs={patience:2})")
    kwargs = dict(raw_kwargs)
    threshold: Any = fields.get("threshold")
    if isinstance(measure, str) and measure.startswith("classifier:"):
        kind = measure.split(":", 1)[1]
        if kind not in CLASSIFIERS:
            raise ConfigError(f"decoding.policy.measure={measure!r}; classifier kinds: {sorted(CLASSIFIERS)}")
        path = fields.get("classifier")
        if path is None and model_dir is not None:
            path = str(Path(model_dir) / CLASSIFIER_FILE.format(kind=kind))
        if path is None or not Path(path).is_file():
            raise ConfigError(
                f"decoding.policy.classifier: no saved {kind} classifier at {path}; point it at the file "
                "the exit_classifiers stage wrote (<run>/exit_classifiers/<kind>.pt)"
            )
        try:
            clf: Any = load_classifier(path, expected_hidden_size=backbone.hidden_size).eval()
        except ValueError as e:
            raise ConfigError(f"decoding.policy.classifier: {e}") from e
        if clf.kind != kind:
            raise ConfigError(f"decoding.policy.classifier={str(path)!r} holds a {clf.kind} classifier, and "
                              f"decoding.policy.measure={measure!r} asks for {kind}: point it at {kind}.pt or set "
                              f"decoding.policy.measure=classifier:{clf.kind}")
        measure = clf
    elif measure not in MEASURES:
        raise ConfigError(
            f"decoding.policy.measure={measure!r}; allowed: {', '.join(sorted(MEASURES))}, "
            f"classifier:<{'|'.join(sorted(CLASSIFIERS))}> or full"
        )
    elif MEASURES[measure].kind == "bool":
        threshold = None
    decay = fields.get("decay")
    if decay and threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, int | float):
            raise ConfigError(f"decoding.policy.decay decays one base threshold, and decoding.policy.threshold="
                              f"{threshold!r} is not a number")
        shape = decay_settings(decay, "decoding.policy.decay", horizon or 64)
        threshold = replace(shape, lam=float(threshold))
    points = fields.get("exit_points")
    if points is not None and not isinstance(points, list | tuple):
        raise ConfigError(f"decoding.policy.exit_points={points!r}; allowed: null (every layer) or a list of layers, "
                          "e.g. [2,4,6]")
    min_exit_layer = positive_int(fields.get("min_exit_layer", 4), "decoding.policy.min_exit_layer")
    features = fields.get("features")  # null: the classifier's own space, else raw
    if features is not None and features not in FEATURES:
        raise ConfigError(f"decoding.policy.features={features!r}; allowed: null, {', '.join(FEATURES)}")
    try:
        return ExitPolicy(
            measure,
            threshold=threshold,
            min_exit_layer=min_exit_layer,
            measure_kwargs=kwargs,
            exit_points=tuple(points) if points is not None else None,
            features=features,
        )
    except ValueError as e:
        raise ConfigError(f"decoding.policy: {e}") from e


def export_policy(cfg: Any, backbone: Any, out_dir: Path, export_dir: Path) -> dict[str, Any] | None:
    """Write the run's chosen policy into the export's `early_exit.json` (atomically).

    The LTT-calibrated threshold of the first calibrated policy when the `policies` stage wrote
    `calibration.json`, else the configured `decoding.policy` (`calibrated: false`). A classifier
    policy copies its weights beside the model.
    """
    settings_path = export_dir / SETTINGS_FILE
    if not settings_path.is_file():
        return None
    policy = _calibrated(cfg, backbone, out_dir, export_dir)
    if policy is None:
        fields = policy_fields(cfg, None)
        L = backbone.num_layers
        floor = positive_int(fields.get("min_exit_layer", 4), "decoding.policy.min_exit_layer")
        shared = (cfg.get("exits") or {}).get("min_layer")  # exits below it were not trained to exit
        if shared is not None:
            floor = max(floor, positive_int(shared, "exits.min_layer"))
        fields["min_exit_layer"] = min(floor, L)
        if floor >= L > 1:
            print(f"[export] note: the exported policy's minimum exit layer is the model's depth ({L}; "
                  f"configured {floor}), so it never exits early: set exit.min_exit_layer (or "
                  f"decoding.policy.min_exit_layer) to a layer in 1..{L - 1}")
        points = exit_points(cfg, L)  # only the trained exits (exits.layers), as the calibrated policy does
        if fields.get("exit_points") is None and points is not None and len(points) < L:
            fields["exit_points"] = list(points)
        policy = {**fields, "calibrated": False}
        if (out_dir / "calibration.json").is_file():  # the policies stage ran, and no threshold held
            print(f"[export] LTT calibration found no threshold that holds (calibration.json), so {settings_path} "
                  f"keeps the configured decoding.policy ({policy['measure']}, threshold {policy.get('threshold')}, "
                  "calibrated: false); more calibration examples or a looser exit.calibration.epsilon may find one")
    else:
        schedule = {k: v for k, v in check_schedule(policy_fields(cfg, None)).items() if v is not None}
        if policy.get("calibrated") == "online":  # online LTT decoded with the schedule: it is what it certified
            policy.update(schedule)
        elif schedule:
            print(f"[export] {', '.join(f'decoding.policy.{k}' for k in schedule)} left out of the calibrated policy: "
                  "offline calibration certified its threshold with a check at every layer and the full "
                  "vocabulary; exit.calibration.online=true certifies it with them")
    policy["strategy"] = decoding_settings(cfg).strategy  # the strategy it was chosen (and calibrated) for
    settings = json.loads(settings_path.read_text())
    settings["policy"] = policy
    write_json(settings_path, settings, sort_keys=True)
    return policy


def run_policy_fields(cfg: Any, backbone: Any, out_dir: Path, model_dir: str | None) -> tuple[dict[str, Any], str | None]:
    """Policy fields for decoding in this run, and the directory a classifier policy's file is in.

    When this run's `policies` stage calibrated a policy (`out_dir/calibration.json`) and the command
    line names no measure or threshold, that policy is used: a run on a loaded model with `train=false`
    (no export of its own) decodes with what it just calibrated, not with the loaded export's policy.
    """
    fields = policy_fields(cfg, model_dir)
    node = _plain((cfg.get("decoding") or {}).get("policy")) or {}
    if node.get("measure") is not None or node.get("threshold") is not None:
        return fields, model_dir
    calibrated = _calibrated(cfg, backbone, Path(out_dir), Path(out_dir))
    if calibrated is None:
        return fields, model_dir
    schedule = {k: v for k, v in check_schedule(fields).items() if v is not None}
    return {**FALLBACK_POLICY, **calibrated, **schedule}, str(out_dir)


def export_classifiers(cfg: Any, out_dir: Path, export_dir: Path) -> list[Path]:
    """Copy the run's trained exit classifiers beside the export's weights (`exit_classifier_<kind>.pt`)."""
    settings = classifier_settings(cfg)
    copied = []
    for kind in settings.kinds:
        src = settings.path(kind, out_dir)
        if src.is_file():
            dst = export_dir / CLASSIFIER_FILE.format(kind=kind)
            with atomic_file(dst) as tmp:
                shutil.copyfile(src, tmp)
            copied.append(dst)
    return copied


def _calibrated(cfg: Any, backbone: Any, out_dir: Path, export_dir: Path) -> dict[str, Any] | None:
    path = out_dir / "calibration.json"
    if not path.is_file():
        return None
    L = backbone.num_layers
    for row in json.loads(path.read_text()):
        online = row.get("online")
        threshold = online["threshold"] if online else row.get("threshold")  # online LTT wins when run
        if threshold is None:
            continue
        name = row["policy"]
        stats = {k: row.get(k) for k in ("epsilon", "delta", "risk", "consistency", "mean_exit_layer")}
        if online:  # what real decoding of the calibration examples gave at the chosen threshold
            stats.update(online["decoded"].get(str(float(threshold)), {}),
                         risk=f"online {online.get('risk', 'consistency')}",
                         n=online["scan"][0]["n"])
        base: dict[str, Any] = {"threshold": threshold, "calibrated": "online" if online else True,
                                "calibration": stats}
        points = exit_points(cfg, L)
        if points is not None and len(points) == L:
            points = None
        if name.startswith("classifier:"):
            kind = name.split(":", 1)[1]
            src = classifier_settings(cfg).path(kind, out_dir)
            shutil.copyfile(src, export_dir / CLASSIFIER_FILE.format(kind=kind))
            return {**base, "measure": name, "min_exit_layer": min_exit_layer(cfg, L), "kwargs": {},
                    "exit_points": list(points) if points else None, "decay": None,
                    "classifier": None, "features": classifier_settings(cfg).features}
        horizon = (cfg.get("data") or {}).get("max_target_length")
        spec = next((s for s in policy_specs(cfg, L, horizon=horizon) if s.name == name), None)
        if spec is None:
            continue
        thr = spec.policy.threshold
        decay = None
        if isinstance(thr, DecayingThreshold):
            decay = {"N": thr.N, "tau": thr.tau, "form": thr.form}
        kwargs = dict(spec.policy.measure_kwargs)
        if spec.policy.is_boolean:  # the calibrated value is the rule's parameter (patience P, min_confidence)
            kwargs = dict(spec.policy.at_value(threshold).measure_kwargs)
            base["threshold"] = None
        return {**base, "measure": str(spec.policy.measure), "min_exit_layer": spec.policy.min_exit_layer,
                "kwargs": kwargs, "decay": decay,
                "exit_points": list(points) if points else None, "classifier": None,
                "features": spec.policy.features}
    return None


def _features(cfg: Any) -> str:
    """`exit.features` when the run has an `exit` node, else raw."""
    return feature_space(cfg) if cfg.get("exit") is not None else "raw"
