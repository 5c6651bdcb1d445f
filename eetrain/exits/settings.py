"""The ``exit`` config node (``conf/exit/*.yaml``), read and validated with errors that name the key.

The stages ``exit_classifiers`` and ``policies`` read their settings through these functions, and
:func:`check_config` runs them all before training starts (``eetrain.stages.check_stages``), so a
bad threshold or an unknown measure stops the run at once instead of after the fit.

Layout (see ``conf/exit/default.yaml`` for the documented defaults)::

    exit:
      min_exit_layer: 4            # floor for every policy (also never below exits.min_layer)
      features: raw                # raw | normed: the states classifiers and saturation read
      thresholds: [...]            # default grid of probability-type score measures and classifiers
      policies:                    # label -> {measure, thresholds, min_exit_layer, decay, kwargs}
        softmax_gap: {measure: softmax_gap}
        ...
      classifiers: {kinds, epochs, batch_size, lr, ..., dir, thresholds}
      calibration: {policies, epsilon, delta, risk, per_sequence, reduction, pvalue, candidates, ...}
      record: {max_tokens, hidden_dtype, save}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from eetrain.errors import ConfigError, boolean, check_keys, number

from .calibration import PVALUES
from .classifiers import CLASSIFIERS, FEATURES, ExitClassifier, load_classifier
from .measures import MEASURES, get_measure
from .policy import ExitPolicy
from .thresholds import DECAY_FORMS, DecayingThreshold

__all__ = [
    "PolicySpec",
    "ClassifierSettings",
    "CalibrationSettings",
    "RecordSettings",
    "exit_node",
    "feature_space",
    "min_exit_layer",
    "exit_points",
    "policy_specs",
    "classifier_settings",
    "calibration_settings",
    "record_settings",
    "check_config",
    "training_layers",
    "load_classifiers",
    "CLASSIFIER_LABEL",
    "scalar_values",
]

CLASSIFIER_LABEL = "classifier:{kind}"
_POLICY_KEYS = ("measure", "thresholds", "min_exit_layer", "decay", "kwargs")
_DECAY_KEYS = ("tau", "form", "N")


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig) or OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    return value


def exit_node(cfg: Any) -> dict[str, Any]:
    """``cfg.exit`` as plain containers; ``ConfigError`` if the node is missing."""
    node = cfg.get("exit") if isinstance(cfg, Mapping | DictConfig) else None
    if node is None:
        raise ConfigError(
            "exit is not set: the exit stages need the exit config group (add +exit=default, or "
            "pick one of conf/exit/*.yaml)"
        )
    plain = _plain(node)
    if not isinstance(plain, dict):
        raise ConfigError(f"exit must be a mapping, got {type(plain).__name__}")
    return plain


def _int(value: Any, key: str, lo: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise ConfigError(f"{key}={value!r} must be an integer")
    if lo is not None and value < lo:
        raise ConfigError(f"{key}={value!r} must be >= {lo}")
    return int(value)


def _float(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(float(value)):
        raise ConfigError(f"{key}={value!r} must be a number")
    return float(value)


def _number_list(value: Any, key: str) -> list[float]:
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise ConfigError(f"{key}={value!r} must be a non-empty list of numbers")
    return [_float(v, f"{key}[{i}]") for i, v in enumerate(value)]


def _grid(value: Any, key: str, per_layer: int | None) -> list[Any]:
    """A sweep grid: numbers, and with `per_layer` = L also per-layer thresholds (lists of L numbers)."""
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise ConfigError(f"{key}={value!r} must be a non-empty list of numbers")
    out: list[Any] = []
    for i, v in enumerate(value):
        if isinstance(v, Sequence) and not isinstance(v, str):
            if per_layer is None:
                raise ConfigError(f"{key}[{i}]={v!r}: a per-layer threshold (a list) needs a score measure "
                                  "without decay; here the grid holds numbers")
            if len(v) != per_layer:
                raise ConfigError(f"{key}[{i}] has {len(v)} values; a per-layer threshold needs one per layer "
                                  f"({per_layer})")
            out.append(tuple(_float(x, f"{key}[{i}][{j}]") for j, x in enumerate(v)))
        else:
            out.append(_float(v, f"{key}[{i}]"))
    return out


def scalar_values(values: Sequence[Any]) -> list[float]:
    """The numbers of a grid (per-layer thresholds left out: Learn-then-Test needs an order)."""
    return [float(v) for v in values if not (isinstance(v, Sequence) and not isinstance(v, str))]


def feature_space(cfg: Any) -> str:
    """``exit.features``: the space of the layer states exit classifiers and hidden-state saturation
    read -- ``raw`` residual streams (CALM; the default) or ``normed``, through the family's final
    norm (FREE, MEE). ``ConfigError`` naming the key for anything else."""
    value = exit_node(cfg).get("features", "raw")
    if value not in FEATURES:
        raise ConfigError(
            f"exit.features={value!r}; allowed: raw (residual states, CALM) or normed (final-normed states, "
            "FREE/MEE)"
        )
    return str(value)


def export_min_exit_layer(cfg: Any) -> tuple[Any, str]:
    """The minimum exit layer of the policy `model.name_or_path`'s `early_exit.json` stores, else 4 (CALM's
    and MEE's); and where it came from, for errors."""
    from eetrain.decoding.settings import stored_policy

    model = cfg.get("model") if hasattr(cfg, "get") else None
    stored = stored_policy(model.get("name_or_path") if model is not None else None) or {}
    value = stored.get("min_exit_layer")
    if value is None:
        return 4, " (null, and model.name_or_path stores no policy in an early_exit.json: CALM's 4)"
    return value, " (null: the export's, from its early_exit.json)"


def check_min_exit_layers(cfg: Any, num_layers: int) -> None:
    """Before training, whatever the stages: a minimum exit layer set beyond the model's depth is an error
    (the export would clamp it to the depth: a policy that never exits). The default 4 (CALM's) on a
    shallower model is the export's note instead (`eetrain.decoding.settings.export_policy`)."""
    exit_value = exit_node(cfg).get("min_exit_layer", 4)
    decoding = ((cfg.get("decoding") or {}).get("policy") or {}) if hasattr(cfg, "get") else {}
    for key, value, default in (("exit.min_exit_layer", exit_value, 4),
                                ("decoding.policy.min_exit_layer", decoding.get("min_exit_layer"), None)):
        if value is None or value == default:
            continue
        if _int(value, key, lo=1) > num_layers:
            raise ConfigError(f"{key}={value} exceeds the model depth: it has {num_layers} exit layers; "
                              f"allowed: 1..{num_layers}" if key.startswith("exit.") else
                              f"{key}={value} exceeds the model's {num_layers} layers; allowed: 1..{num_layers}")


def min_exit_layer(cfg: Any, num_layers: int) -> int:
    """The minimum exit layer of every policy: ``max(exit.min_exit_layer, exits.min_layer)``; a null
    ``exit.min_exit_layer`` is the export's (`export_min_exit_layer`).

    Raises ``ConfigError`` naming the key when it exceeds the model depth ``L``; at ``L`` itself no
    token can exit early, which is allowed (the table then shows no saving) but printed.
    """
    node = exit_node(cfg)
    value, key, note = node.get("min_exit_layer", 4), "exit.min_exit_layer", ""
    if value is None:  # the experiments on an export: the minimum it was trained and exported with
        value, note = export_min_exit_layer(cfg)
    value = _int(value, key, lo=1)
    shared = (cfg.get("exits") or {}).get("min_layer") if hasattr(cfg, "get") else None
    if shared is not None and _int(shared, "exits.min_layer", lo=1) > value:
        value, key = int(shared), "exits.min_layer"
    if value > num_layers:
        raise ConfigError(
            f"{key}={value}{note if key == 'exit.min_exit_layer' else ''} exceeds the model depth: it has "
            f"{num_layers} exit layers; set {key} to a value in 1..{num_layers} (CALM/MEE use 4 where the depth allows)"
        )
    return value


def exit_points(cfg: Any, num_layers: int) -> tuple[int, ...] | None:
    """The layers that carry an exit (``exits.layers`` / ``exits.min_layer``, as the losses use them).

    ``None`` when the config has no ``exits`` node (then every layer can exit).
    """
    node = cfg.get("exits") if hasattr(cfg, "get") else None
    if node is None:
        return None
    from eetrain.losses.exit_points import resolve_exit_points

    node = _plain(node)
    return tuple(resolve_exit_points(node.get("layers"), num_layers, node.get("min_layer", 1) or 1))


# ---------------------------------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicySpec:
    """One configured policy: the template :class:`ExitPolicy` and the values to sweep.

    ``values`` are thresholds for score measures (the base ``lam`` when ``policy`` has a decaying
    threshold) and the swept parameter for boolean measures (``patience`` -> P, ``monotonic`` ->
    ``min_confidence``); empty = one row with the policy as configured.
    """

    name: str
    policy: ExitPolicy
    values: tuple[Any, ...] = field(default_factory=tuple)


def decay_settings(value: Any, key: str, horizon: int) -> DecayingThreshold:
    """A decaying threshold's shape from config (`{tau, form, N}`, N null: `horizon`), lam 1.0 as a placeholder."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key} must be a mapping with keys {list(_DECAY_KEYS)}, got {value!r}")
    unknown = sorted(set(value) - set(_DECAY_KEYS))
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {unknown}; allowed: {list(_DECAY_KEYS)}")
    form = value.get("form", "paper")
    if form not in DECAY_FORMS:
        raise ConfigError(f"{key}.form={form!r} is not a decaying-threshold form; allowed: {list(DECAY_FORMS)}")
    tau = _float(value.get("tau", 4.0), f"{key}.tau")
    if tau < 0:
        raise ConfigError(f"{key}.tau={tau!r} must be >= 0")
    n = value.get("N")
    n = horizon if n is None else _int(n, f"{key}.N", lo=1)
    # base lam 1.0 is a placeholder: the sweep replaces it by every value of the grid
    return DecayingThreshold(lam=1.0, N=n, tau=tau, form=form)


def _build(key: str, **kwargs: Any) -> ExitPolicy:
    try:
        return ExitPolicy(**kwargs)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from e


def policy_specs(cfg: Any, num_layers: int, horizon: int | None = None) -> list[PolicySpec]:
    """The configured measure policies (``exit.policies``), each value of each grid validated.

    Args:
        cfg: the run config (with ``exit``).
        num_layers: the model depth ``L`` (validates minimum exit layers).
        horizon: ``N`` of decaying thresholds whose ``decay.N`` is null (the maximum output length).
    """
    node = exit_node(cfg)
    floor = min_exit_layer(cfg, num_layers)
    points = exit_points(cfg, num_layers)
    features = feature_space(cfg)
    grid = _number_list(node.get("thresholds"), "exit.thresholds") if node.get("thresholds") is not None else []
    policies = node.get("policies") or {}
    if not isinstance(policies, Mapping):
        raise ConfigError(f"exit.policies must be a mapping label -> policy, got {type(policies).__name__}")
    specs = []
    for name, entry in policies.items():
        key = f"exit.policies.{name}"
        if entry is None:  # `exit.policies.NAME=null` switches a policy off
            continue
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{key} must be a mapping with keys {list(_POLICY_KEYS)}, got {entry!r}")
        unknown = sorted(set(entry) - set(_POLICY_KEYS))
        if unknown:
            raise ConfigError(f"{key}: unknown key(s) {unknown}; allowed: {list(_POLICY_KEYS)}")
        measure = entry.get("measure", name)
        try:
            spec = get_measure(measure)
        except ValueError:
            raise ConfigError(
                f"{key}.measure={measure!r} is not an exit measure; allowed: {', '.join(sorted(MEASURES))} "
                "(trained classifiers are added from exit.classifiers)"
            ) from None
        layer = entry.get("min_exit_layer")
        layer = floor if layer is None else _int(layer, f"{key}.min_exit_layer", lo=1)
        if layer < floor:
            raise ConfigError(f"{key}.min_exit_layer={layer} is below exit.min_exit_layer={floor}")
        if layer > num_layers:
            raise ConfigError(
                f"{key}.min_exit_layer={layer} exceeds the model depth: it has {num_layers} exit layers"
            )
        kwargs = entry.get("kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise ConfigError(f"{key}.kwargs must be a mapping, got {kwargs!r}")
        threshold: Any = None
        if entry.get("decay") is not None:
            if spec.kind != "score" or not spec.is_probability:
                raise ConfigError(
                    f"{key}.decay: a decaying threshold needs a probability-type score measure "
                    f"(scores in [0, 1]), not {measure!r}"
                )
            if horizon is None:
                horizon = 1  # only while validating before data exist: N is checked again at the stage
            threshold = decay_settings(entry["decay"], f"{key}.decay", horizon)
        template = _build(key, measure=measure, threshold=threshold, min_exit_layer=layer,
                          measure_kwargs=dict(kwargs), name=str(name), exit_points=points, features=features)
        values = entry.get("thresholds")
        if values is None:
            values = grid if spec.kind == "score" and spec.is_probability else []
            if spec.kind == "score" and not values:
                raise ConfigError(
                    f"{key}.thresholds is required for measure {measure!r} (scores in "
                    f"{list(spec.score_range or ())}; exit.thresholds is for probability-type scores)"
                )
        else:
            per_layer = num_layers if spec.kind == "score" and entry.get("decay") is None else None
            values = _grid(values, f"{key}.thresholds", per_layer)
        # validate every value of the grid now, not when the sweep reaches it
        for i, v in enumerate(values):
            if spec.kind == "bool":
                param = spec.sweep_param
                if param == "patience":
                    v = _int(v, f"{key}.thresholds[{i}] (patience)")
                    values[i] = v
                _build(f"{key}.thresholds[{i}]", measure=measure, min_exit_layer=layer,
                       measure_kwargs={**kwargs, param: v}, name=str(name), exit_points=points, features=features)
            else:
                try:
                    template.with_base_threshold(v)
                except ValueError as e:
                    raise ConfigError(f"{key}.thresholds[{i}]: {e}") from e
        specs.append(PolicySpec(str(name), template, tuple(values)))
    return specs


# ---------------------------------------------------------------------------------------------------
# Classifiers, calibration, recording
# ---------------------------------------------------------------------------------------------------


def training_layers(
    num_layers: int, min_exit_layer: int, exit_points: Sequence[int] | None = None
) -> tuple[int, ...]:
    """1-based layers whose decisions are trained: ``min_exit_layer .. L-1`` (only exit points, if given)."""
    layers = tuple(
        i for i in range(min_exit_layer, num_layers) if exit_points is None or i in set(exit_points)
    )
    if not layers:
        subset = exit_points is not None and set(range(1, num_layers + 1)) - set(exit_points)
        where = f" among the exit points {list(exit_points)}" if subset else ""  # type: ignore[arg-type]
        raise ValueError(
            f"min_exit_layer={min_exit_layer} leaves no layer below the last ({num_layers}){where} for an "
            f"exit classifier to decide on; a model with {num_layers} exit layers needs a minimum exit "
            f"layer in 1..{num_layers - 1}"
        )
    return layers


@dataclass(frozen=True)
class ClassifierSettings:
    """``exit.classifiers``: which exit classifiers to train (stage ``exit_classifiers``) and evaluate."""

    kinds: tuple[str, ...]
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    calm_hidden: int | None
    mlp_width: int | None
    lstm_hidden_size: int
    lstm_num_layers: int
    max_train_tokens: int | None
    val_fraction: float
    dir: Path | None
    thresholds: tuple[float, ...]
    on_policy: bool = False
    on_policy_examples: int = 128
    on_policy_threshold: float = 0.9
    features: str = "raw"  # exit.features: the space the classifiers read (saved with each one)

    def path(self, kind: str, out_dir: Path) -> Path:
        """Where the classifier of ``kind`` is saved/loaded: ``<dir or out_dir/exit_classifiers>/<kind>.pt``."""
        return (self.dir or Path(out_dir) / "exit_classifiers") / f"{kind}.pt"


def classifier_settings(cfg: Any) -> ClassifierSettings:
    node = exit_node(cfg).get("classifiers") or {}
    k = "exit.classifiers"
    kinds = node.get("kinds") or []
    if isinstance(kinds, str):
        kinds = [kinds]
    for i, kind in enumerate(kinds):
        if kind not in CLASSIFIERS:
            raise ConfigError(f"{k}.kinds[{i}]={kind!r} is not a classifier kind; allowed: {sorted(CLASSIFIERS)}")
    calm_hidden = node.get("calm_hidden")
    max_tokens = node.get("max_train_tokens")
    val_fraction = _float(node.get("val_fraction", 0.1), f"{k}.val_fraction")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"{k}.val_fraction={val_fraction!r} must lie in [0, 1)")
    lr = number(node.get("lr", 1e-3), f"{k}.lr", above=0)
    thresholds = node.get("thresholds")
    if thresholds is None:
        thresholds = exit_node(cfg).get("thresholds") or []
    values = _number_list(thresholds, f"{k}.thresholds") if thresholds else []
    for i, v in enumerate(values):
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"{k}.thresholds[{i}]={v!r}: a classifier's P(exit) threshold must lie in [0, 1]")
    return ClassifierSettings(
        kinds=tuple(kinds),
        epochs=_int(node.get("epochs", 5), f"{k}.epochs", lo=1),
        batch_size=_int(node.get("batch_size", 256), f"{k}.batch_size", lo=1),
        lr=lr,
        weight_decay=number(node.get("weight_decay", 0.0), f"{k}.weight_decay", at_least=0),
        calm_hidden=None if calm_hidden is None else _int(calm_hidden, f"{k}.calm_hidden", lo=1),
        mlp_width=None if node.get("mlp_width") is None else _int(node["mlp_width"], f"{k}.mlp_width", lo=1),
        lstm_hidden_size=_int(node.get("lstm_hidden_size", 250), f"{k}.lstm_hidden_size", lo=1),
        lstm_num_layers=_int(node.get("lstm_num_layers", 1), f"{k}.lstm_num_layers", lo=1),
        max_train_tokens=None if max_tokens is None else _int(max_tokens, f"{k}.max_train_tokens", lo=1),
        val_fraction=val_fraction,
        dir=None if node.get("dir") is None else Path(str(node["dir"])).expanduser(),
        thresholds=tuple(values),
        on_policy=boolean(node.get("on_policy", False), "exit.classifiers.on_policy"),
        on_policy_examples=_int(node.get("on_policy_examples", 128), f"{k}.on_policy_examples", lo=1),
        on_policy_threshold=_probability(node.get("on_policy_threshold", 0.9), f"{k}.on_policy_threshold"),
        features=feature_space(cfg),
    )


def _probability(value: Any, key: str) -> float:
    out = _float(value, key)
    if not 0.0 <= out <= 1.0:
        raise ConfigError(f"{key}={value!r}: a classifier's P(exit) threshold must lie in [0, 1]")
    return out


@dataclass(frozen=True)
class CalibrationSettings:
    """``exit.calibration``: Learn-then-Test for the named policies."""

    policies: tuple[str, ...]
    epsilon: float
    delta: float
    risk: str
    per_sequence: bool
    reduction: str
    pvalue: str
    candidates: tuple[float, ...] | None
    calibration_fraction: float
    online: bool = False
    online_examples: int = 64
    online_split: str = "validation"
    risk_against: str = "full"

    @property
    def offline_risk(self) -> str:
        """The risk on records: a task-metric risk needs decoded text, so records use consistency."""
        return self.risk if self.risk in ("consistency", "task") else "consistency"


def calibration_settings(cfg: Any) -> CalibrationSettings:
    node = exit_node(cfg).get("calibration") or {}
    k = "exit.calibration"
    out = {}
    for name in ("epsilon", "delta"):
        value = _float(node.get(name, 0.05 if name == "epsilon" else 0.1), f"{k}.{name}")
        if not 0.0 < value < 1.0:
            raise ConfigError(f"{k}.{name}={value!r} must lie in (0, 1)")
        out[name] = value
    risk = node.get("risk", "consistency")
    from eetrain.task_metrics import TEXT_METRICS

    if risk not in ("consistency", "task", *TEXT_METRICS):
        raise ConfigError(f"{k}.risk={risk!r}; allowed: consistency, task or a text metric ({', '.join(TEXT_METRICS)})")
    if risk in TEXT_METRICS and not node.get("online", False):
        raise ConfigError(
            f"{k}.risk={risk} is measured on decoded text: set {k}.online=true (LTT on real early-exit decoding)"
        )
    against = node.get("risk_against", "full")
    if against not in ("full", "reference"):
        raise ConfigError(f"{k}.risk_against={against!r}; allowed: full, reference")
    reduction = node.get("reduction", "share")
    if reduction not in ("share", "any"):
        raise ConfigError(f"{k}.reduction={reduction!r}; allowed: ['any', 'share']")
    pvalue = node.get("pvalue", "hoeffding_bentkus")
    if pvalue not in PVALUES:
        raise ConfigError(f"{k}.pvalue={pvalue!r}; allowed: {sorted(PVALUES)}")
    candidates = node.get("candidates")
    fraction = _float(node.get("calibration_fraction", 0.5), f"{k}.calibration_fraction")
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"{k}.calibration_fraction={fraction!r} must lie in (0, 1]")
    policies = node.get("policies") or []
    if isinstance(policies, str):
        policies = [policies]
    return CalibrationSettings(
        policies=tuple(str(p) for p in policies),
        epsilon=out["epsilon"],
        delta=out["delta"],
        risk=risk,
        per_sequence=boolean(node.get("per_sequence", True), "exit.calibration.per_sequence"),
        reduction=reduction,
        pvalue=pvalue,
        candidates=None if candidates is None else tuple(_number_list(candidates, f"{k}.candidates")),
        calibration_fraction=fraction,
        online=boolean(node.get("online", False), "exit.calibration.online"),
        online_examples=_int(node.get("online_examples", 64), f"{k}.online_examples", lo=1),
        online_split=str(node.get("online_split", "validation")),
        risk_against=against,
    )


@dataclass(frozen=True)
class RecordSettings:
    """``exit.record``: how the validation set is recorded for the ``policies`` stage."""

    max_tokens: int | None
    hidden_dtype: str | None
    save: bool


def record_settings(cfg: Any) -> RecordSettings:
    node = exit_node(cfg).get("record") or {}
    max_tokens = node.get("max_tokens")
    dtype = node.get("hidden_dtype")
    if dtype not in (None, "float32", "float16", "bfloat16"):
        raise ConfigError(
            f"exit.record.hidden_dtype={dtype!r}; allowed: null (the model's), float32, float16, bfloat16"
        )
    return RecordSettings(
        max_tokens=None if max_tokens is None else _int(max_tokens, "exit.record.max_tokens", lo=1),
        hidden_dtype=dtype,
        save=boolean(node.get("save", True), "exit.record.save"),
    )


def check_exit_keys(cfg: Any) -> None:
    """`exit` and its `classifiers` / `calibration` / `record` nodes hold only the keys conf/exit/default.yaml
    has: a key added with `+exit...` that nothing reads was ignored unsaid (the run used the default)."""
    from eetrain.config import CONF_DIR

    default = OmegaConf.load(CONF_DIR / "exit" / "default.yaml")
    node = exit_node(cfg)
    check_keys(node, set(default), "exit")
    for name in ("classifiers", "calibration", "record"):
        if isinstance(node.get(name), Mapping | DictConfig):
            check_keys(node[name], set(default[name]), f"exit.{name}")


def check_config(cfg: Any, backbone: Any) -> None:
    """Validate the whole ``exit`` node against the model (depth, hidden size of saved classifiers).

    Run before training so that a typo fails at once; every error names its config key.
    """
    if backbone.regression:
        raise ConfigError(
            "stages exit_classifiers and policies learn and score when a layer's class agrees with the last "
            "layer's, and this head is a regression (num_labels=1): use stages=[classify] with "
            "classify.policies=[patience_regression] (PABEE's rule on the score; exit.policies.<name>.kwargs.tolerance)"
        )
    check_exit_keys(cfg)
    num_layers = int(backbone.num_layers)
    feature_space(cfg)
    specs = policy_specs(cfg, num_layers)
    classifiers = classifier_settings(cfg)
    calibration = calibration_settings(cfg)
    if calibration.online and getattr(backbone, "head_kind", "token") != "token" and "policies" in (cfg.get("stages") or []):
        raise ConfigError("exit.calibration.online=true calibrates on decoded text: it needs a token head (T5, LLaMA), "
                          f"and the {backbone.family} adapter predicts one label per sequence; set it to false")
    record_settings(cfg)
    stages = list(cfg.get("stages") or [])
    decodes = [what for what, on in (("exit.calibration.online=true", calibration.online and "policies" in stages),
                                     ("exit.classifiers.on_policy=true", classifiers.on_policy
                                      and "exit_classifiers" in stages)) if on]
    if decodes:
        from eetrain.decoding.settings import decoding_settings

        if decoding_settings(cfg).strategy == "self_speculative":
            raise ConfigError(
                f"{decodes[0]} decodes with exit policies, and decoding.strategy=self_speculative takes none (it "
                "drafts at decoding.draft_layer and verifies every draft); allowed here: copy, parallel"
            )
    known = {s.name for s in specs} | {CLASSIFIER_LABEL.format(kind=k) for k in classifiers.kinds}
    by_name = {s.name: s for s in specs}
    for i, name in enumerate(calibration.policies):
        if name not in known:
            raise ConfigError(
                f"exit.calibration.policies[{i}]={name!r} is not a configured policy; allowed: {sorted(known)}"
            )
        spec = by_name.get(name)
        if (spec is not None and calibration.candidates is None and not scalar_values(spec.values)
                and not (spec.policy.measure in MEASURES and MEASURES[spec.policy.measure].is_probability)):
            raise ConfigError(
                f"exit.calibration.policies[{i}]={name!r}: exit.policies.{name}.thresholds holds per-layer thresholds "
                "only, which Learn-then-Test cannot order from safe to fast; add numbers to it or set "
                "exit.calibration.candidates"
            )
    if calibration.candidates is not None:
        for name in calibration.policies:
            spec = by_name.get(name)
            for j, c in enumerate(calibration.candidates):
                try:
                    (spec.policy.at_value(c) if spec else ExitPolicy("softmax_max", c))
                except ValueError as e:
                    raise ConfigError(f"exit.calibration.candidates[{j}] for {name!r}: {e}") from e
    stages = list(cfg.get("stages") or [])
    if classifiers.dir is not None and "exit_classifiers" not in stages and not classifiers.dir.is_dir():
        raise ConfigError(f"exit.classifiers.dir={str(classifiers.dir)!r}: no such directory; point it at the "
                          "directory the exit_classifiers stage wrote (<run>/exit_classifiers) or add that stage")
    floor = min_exit_layer(cfg, num_layers)
    if "exit_classifiers" in stages and classifiers.kinds:
        try:
            training_layers(num_layers, floor, exit_points(cfg, num_layers))
        except ValueError as e:
            raise ConfigError(f"exit.min_exit_layer={floor}: {e}") from e
    if "policies" in stages and "exit_classifiers" not in stages:
        # evaluating classifiers trained earlier: check their hidden size now
        load_classifiers(classifiers, backbone, out_dir=Path(str(cfg.paths.output_dir)), required=False)


def load_classifiers(
    settings: ClassifierSettings, backbone: Any, out_dir: Path, required: bool
) -> dict[str, ExitClassifier]:
    """Load the saved classifiers of ``settings.kinds`` (hidden size checked against the backbone).

    A missing file is skipped (``required=False``) or a ``ConfigError``; a file for another hidden
    size is always a ``ConfigError`` naming ``exit.classifiers.dir``.
    """
    found: dict[str, ExitClassifier] = {}
    for kind in settings.kinds:
        path = settings.path(kind, out_dir)
        if not path.exists():
            if required:
                raise ConfigError(
                    f"exit.classifiers.dir: no {kind} classifier at {path}; train it with the "
                    "exit_classifiers stage or point exit.classifiers.dir at a directory that has it"
                )
            continue
        try:
            found[kind] = load_classifier(path, expected_hidden_size=backbone.hidden_size).eval()
        except ValueError as e:
            raise ConfigError(f"exit.classifiers.dir: {e}") from e
        if found[kind].kind != kind:
            raise ConfigError(f"exit.classifiers.dir: {path} holds a {found[kind].kind!r} classifier, not {kind!r}")
        if found[kind].features != settings.features:
            raise ConfigError(
                f"exit.features={settings.features}: the {kind} classifier at {path} was trained on "
                f"{found[kind].features} states; set exit.features={found[kind].features} (or retrain it)"
            )
    return found
