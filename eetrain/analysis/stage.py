"""Stage ``analyze``: the seed papers' measurements on one or more models, one CSV and one PNG each.

``python -m eetrain +experiment=analyze model.name_or_path=<export>`` (or ``stages=[..., analyze]`` after
training) runs ``analyze.analyses`` on ``analyze.split`` teacher-forced on the references or on each
model's own greedy output (``analyze.target``), for the model and every entry of ``analyze.models`` /
``analyze.compare``, and writes ``<analysis>.csv`` / ``<analysis>.png`` (a ``model`` column, one line per
model) and ``analysis_summary.json`` into the run directory (W&B tables and images when a run is active).
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from eetrain.errors import ConfigError, boolean, check_keys, positive_int
from eetrain.files import write_json

from . import agreement, confidence, gating, oracle, saturation, sublayer, subword, suitability
from .collect import LayerRecords, collect, example_batches, greedy_examples

ANALYSES: tuple[str, ...] = (
    "agreement", "oracle", "confidence", "gating", "saturation", "subword", "sublayer", "suitability",
)
_KEYS = (
    "analyses", "target", "split", "max_examples", "max_tokens", "batch_size", "max_new_tokens", "name",
    "compare", "models", "same_tokenizer", "cache_dir", "top_k", "consistency", "min_exit_layer",
    "similarity_threshold", "set_size", "before_last",
)


@dataclass(frozen=True)
class ModelEntry:
    """One more model to analyse: an export / hub name (``path``), or one to train with ``overrides``."""

    name: str
    path: str | None = None
    overrides: tuple[str, ...] = ()
    key: str = "analyze.models"  # the config key it came from, for error messages


@dataclass(frozen=True)
class AnalyzeSettings:
    analyses: tuple[str, ...]
    target: str
    split: str
    max_examples: int | None
    max_tokens: int | None
    batch_size: int
    max_new_tokens: int | None
    name: str | None
    models: tuple[ModelEntry, ...]
    same_tokenizer: bool
    cache_dir: str
    top_k: int
    consistency: float
    min_exit_layer: int
    similarity_threshold: float
    set_size: int | None
    before_last: tuple[int, ...]


def _fraction(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ConfigError(f"{key}={value!r}; allowed: a number in [0, 1]")
    return float(value)


def _path_name(path: str) -> str:
    """A model's default name: its run directory's for a run's ``.../<run>/export``, else the path's last part."""
    p = Path(path)
    return p.parent.name if p.name == "export" and p.parent.name else (p.name or path)


def _entries(node: dict[str, Any]) -> tuple[ModelEntry, ...]:
    raw = list(node.get("models") or [])
    if node.get("compare") is not None:
        raw.append(node["compare"])
    out = []
    for i, e in enumerate(raw):
        key = "analyze.compare" if node.get("compare") is not None and i == len(raw) - 1 else f"analyze.models[{i}]"
        if isinstance(e, str):
            out.append(ModelEntry(_path_name(e), path=e, key=key))
            continue
        if not isinstance(e, Mapping):
            raise ConfigError(f"{key}={e!r}; allowed: an export path / hub name, or {{name, path}} or "
                              "{name, overrides: [...]} (a model trained with those overrides)")
        check_keys(e, ("name", "path", "overrides"), key)
        if (e.get("path") is None) == (e.get("overrides") is None):
            raise ConfigError(f"{key}: give exactly one of path (an export) or overrides (train one)")
        name = str(e.get("name") or (_path_name(str(e["path"])) if e.get("path") is not None else f"model{i + 1}"))
        out.append(ModelEntry(name, path=None if e.get("path") is None else str(e["path"]),
                              overrides=tuple(str(o) for o in e.get("overrides") or ()), key=key))
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"analyze.models: names must differ, got {names} (set name: ...)")
    return tuple(out)


def analyze_settings(cfg: Any) -> AnalyzeSettings:
    """``cfg.analyze`` validated (every wrong key or value names itself and what is allowed)."""
    node = OmegaConf.to_container(cfg.analyze, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg["analyze"])
    check_keys(node, _KEYS, "analyze")
    analyses = node.get("analyses", list(ANALYSES))
    if analyses is not None and not isinstance(analyses, list | tuple) or analyses == []:
        raise ConfigError(f"analyze.analyses={analyses!r}; allowed: a non-empty list of {', '.join(ANALYSES)} "
                          "(null: all of them)")
    analyses = list(analyses or ANALYSES)
    for i, a in enumerate(analyses):
        if a not in ANALYSES:
            raise ConfigError(f"analyze.analyses[{i}]={a!r}; allowed: {', '.join(ANALYSES)}")
    target = node.get("target", "reference")
    if target not in ("reference", "greedy"):
        raise ConfigError(f"analyze.target={target!r}; allowed: reference, greedy")
    before = node.get("before_last", [1, 2, 5, 10])  # [] is honoured: no before_last_<k> columns
    before = [1, 2, 5, 10] if before is None else before
    if not isinstance(before, list | tuple):
        raise ConfigError(f"analyze.before_last={before!r}; allowed: a list of layer counts, e.g. [1,2,5,10]")
    threshold = node.get("similarity_threshold", 0.9)
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not -1 <= threshold <= 1:
        raise ConfigError(f"analyze.similarity_threshold={threshold!r}; allowed: a cosine in [-1, 1]")
    return AnalyzeSettings(
        analyses=tuple(dict.fromkeys(analyses)),
        target=target,
        split=str(node.get("split", "validation")),
        max_examples=positive_int(node.get("max_examples"), "analyze.max_examples", "the whole split"),
        max_tokens=positive_int(node.get("max_tokens"), "analyze.max_tokens", "every scored token"),
        batch_size=positive_int(node.get("batch_size", 16), "analyze.batch_size"),
        max_new_tokens=positive_int(node.get("max_new_tokens"), "analyze.max_new_tokens", "decoding.max_new_tokens"),
        name=None if node.get("name") is None else str(node["name"]),
        models=_entries(node),
        same_tokenizer=boolean(node.get("same_tokenizer", True), "analyze.same_tokenizer"),
        cache_dir=str(node.get("cache_dir") or "outputs/analyze_models"),
        top_k=positive_int(node.get("top_k", 10), "analyze.top_k"),
        consistency=_fraction(node.get("consistency", 0.99), "analyze.consistency"),
        min_exit_layer=positive_int(node.get("min_exit_layer", 1), "analyze.min_exit_layer"),
        similarity_threshold=float(threshold),
        set_size=positive_int(node.get("set_size"), "analyze.set_size", "a quarter of the tokens, at most 1000"),
        before_last=tuple(positive_int(k, f"analyze.before_last[{i}]") for i, k in enumerate(before)),
    )


def _check_export(path: str, key: str) -> None:
    """A local path must hold an export (config.json); a hub name is left to the loader."""
    local = Path(path).expanduser()
    looks_local = local.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local and not (local / "config.json").is_file():
        raise ConfigError(f"{key}={path!r}: no exported model there (no config.json); point it at a run's "
                          "export/ directory (outputs/<task>/<run>/export) or a local Hugging Face model")


def _main_name(settings: AnalyzeSettings, backbone: Any) -> str:
    """The analysed model's name in the tables; a ConfigError when an `analyze.models` entry has it too."""
    name = settings.name or (_path_name(str(backbone.name_or_path)) if backbone.name_or_path else "model")
    if any(m.name == name for m in settings.models):
        raise ConfigError(f"analyze: two models are named {name!r}; set analyze.name or give the other "
                          "a name ({name: ..., path: ...})")
    return name


def _check_other_model(path: str, key: str, backbone: Any, same_tokenizer: bool) -> None:
    """What can be told of another export before training: its head kind (early_exit.json) and, for the
    shared-data comparison, its tokenizer (`_models` checks the loaded model again)."""
    local = Path(path).expanduser()
    if not local.is_dir():
        return
    settings = local / "early_exit.json"
    if settings.is_file():
        try:
            kind = json.loads(settings.read_text()).get("head_kind")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            kind = None  # the loader names a broken file
        if kind is not None and kind != backbone.head_kind:
            raise ConfigError(f"{key}={path!r} has a {kind} head, the model a {backbone.head_kind} head; "
                              "analyse models of one kind together")
    if same_tokenizer and any((local / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        if not _same_vocab(AutoTokenizer.from_pretrained(str(local)), backbone.tokenizer):
            raise ConfigError(_OTHER_TOKENIZER.format(key=key, path=path))


_OTHER_TOKENIZER = (
    "{key}={path!r} has another tokenizer than model.name_or_path; the shared-data comparison "
    "(analyze.same_tokenizer=true: the same tokens for every model) needs one tokenizer; set "
    "analyze.same_tokenizer=false to let each model read the data with its own"
)


def check_config(cfg: Any, backbone: Any) -> None:
    settings = analyze_settings(cfg)
    _main_name(settings, backbone)
    if backbone.regression:
        raise ConfigError("analyze reads every layer's class predictions and probabilities, and this head is a "
                          "regression (num_labels=1): stages=[classify] writes its per-layer scores (layer_scores.csv)")
    if settings.min_exit_layer > backbone.num_layers:
        raise ConfigError(f"analyze.min_exit_layer={settings.min_exit_layer}; allowed: 1..{backbone.num_layers}")
    if backbone.num_layers > 1 and settings.before_last and all(k >= backbone.num_layers for k in settings.before_last):
        # deeper counts are left out of the table; a 1-layer model has no count to show (nothing to exit before)
        raise ConfigError(f"analyze.before_last={list(settings.before_last)}: none below the model's "
                          f"{backbone.num_layers} layers; allowed: layer counts in 1..{backbone.num_layers - 1}")
    if settings.target == "greedy" and backbone.head_kind != "token":
        raise ConfigError("analyze.target=greedy needs a token head (T5, LLaMA); a classifier has no output "
                          "to generate: use analyze.target=reference")
    for m in settings.models:
        if m.path is not None:
            _check_export(m.path, m.key)
            _check_other_model(m.path, m.key, backbone, settings.same_tokenizer)
    if "gating" in settings.analyses:
        _policy_specs(cfg, settings, backbone.num_layers, 1)


# --- one model --------------------------------------------------------------------------------------


def _policy_specs(cfg: Any, settings: AnalyzeSettings, num_layers: int, horizon: int) -> list[Any]:
    """``exit.policies`` over every layer from ``analyze.min_exit_layer`` (the analysis asks where a gate
    could exit, not where the trained exit points are)."""
    from eetrain.exits.settings import exit_node, policy_specs

    node = {**exit_node(cfg), "min_exit_layer": settings.min_exit_layer}
    view = {"exit": node, "exits": {"layers": None, "min_layer": 1}}
    return policy_specs(view, num_layers, horizon)


def _classifier_specs(
    cfg: Any, settings: AnalyzeSettings, backbone: Any, model_dir: str | None, features: str = "raw"
) -> list[Any]:
    """The trained exit classifiers saved beside the model (``exit_classifier_<kind>.pt``) that read the
    states of ``features`` (one record holds one space; the others are named and skipped)."""
    from eetrain.decoding.settings import CLASSIFIER_FILE
    from eetrain.exits.classifiers import CLASSIFIERS, load_classifier
    from eetrain.exits.policy import ExitPolicy
    from eetrain.exits.settings import CLASSIFIER_LABEL, PolicySpec, exit_node

    if model_dir is None:
        return []
    node = exit_node(cfg)
    values = (node.get("classifiers") or {}).get("thresholds") or node.get("thresholds") or [0.5, 0.9]
    specs = []
    for kind in CLASSIFIERS:
        path = Path(model_dir) / CLASSIFIER_FILE.format(kind=kind)
        if path.is_file():
            clf = load_classifier(path, expected_hidden_size=backbone.hidden_size).eval()
            label = CLASSIFIER_LABEL.format(kind=kind)
            if clf.features != features:
                print(f"[analyze] {label} skipped: trained on {clf.features} states, the records hold "
                      f"exit.features={features} ones (set exit.features={clf.features} to score it)")
                continue
            specs.append(PolicySpec(label, ExitPolicy(clf, min_exit_layer=settings.min_exit_layer, name=label),
                                    tuple(float(v) for v in values)))
    return specs


def analyze_model(
    backbone: Any, examples: Sequence[Mapping[str, Any]], settings: AnalyzeSettings, cfg: Any,
    model_dir: str | None = None, name: str = "model",
) -> dict[str, Any]:
    """Every analysis of ``settings.analyses`` but suitability on one model: ``{analysis: rows}`` plus
    ``summary`` (headline numbers) and ``suitability_inputs``."""
    from eetrain.progress import progress

    examples = list(examples)
    if settings.max_examples is not None:
        examples = examples[: settings.max_examples]
    if not examples:
        raise ConfigError(f"analyze.split={settings.split!r}: no examples to analyse")
    todo = settings.analyses
    if settings.target == "greedy":
        steps = settings.max_new_tokens or int(OmegaConf.select(cfg, "decoding.max_new_tokens", default=64) or 64)
        with progress(math.ceil(len(examples) / settings.batch_size), f"{name}: greedy outputs", unit="batch") as bar:
            examples = greedy_examples(backbone, examples, settings.batch_size, steps, progress=bar)
    from eetrain.exits.settings import feature_space

    features = feature_space(cfg)  # exit.features: the space saturation and the classifiers read
    classifiers = _classifier_specs(cfg, settings, backbone, model_dir, features) if "gating" in todo else []
    batches = example_batches(backbone, examples, settings.batch_size)
    with progress(len(batches), f"{name}: per-layer records", unit="batch") as bar:
        rec = collect(backbone, batches, keep_hidden=bool(classifiers), sublayer="sublayer" in todo,
                      top_k=settings.top_k, max_tokens=settings.max_tokens, progress=bar, features=features)
    L = rec.num_layers
    layers = oracle.oracle_layers(rec)
    out: dict[str, Any] = {}
    summary: dict[str, Any] = {"model": name, "num_layers": L, "tokens": rec.num_tokens,
                               "examples": len(examples), "target": settings.target, "unit": _unit(rec)}
    agree_rows = agreement.agreement_rows(rec)
    if "agreement" in todo:
        out["agreement"] = agree_rows
        summary["agree_at_half_depth"] = agree_rows[max(L // 2 - 1, 0)]["agree"]
        summary["similarity_at_half_depth"] = agree_rows[max(L // 2 - 1, 0)]["similarity"]
    o_rows, oracle_summary = oracle.oracle_rows(rec, settings.before_last)
    if "oracle" in todo:
        out["oracle"] = o_rows
        summary["oracle"] = oracle_summary
    if "confidence" in todo:
        out["confidence"] = confidence.confidence_rows(rec)
    skip = {"skip_ratio": float("nan"), "skip_policy": None}
    if "gating" in todo or "suitability" in todo:
        # a decaying threshold's N: data.max_target_length, as the policies stage and decoding use it
        horizon = (cfg.get("data") or {}).get("max_target_length") or int(rec.positions.max())
        specs = _policy_specs(cfg, settings, L, horizon)
        rows, best = gating.gating_rows(rec.exit_records(), specs + classifiers, layers, settings.consistency)
        if "gating" in todo:
            out["gating"], out["gating_summary"] = rows, best
            summary["gating"] = {r["policy"]: {"threshold": r["best_threshold"],
                                               "efficiency": r["gating_efficiency"]} for r in best}
        free = [r for r in best if not r["policy"].startswith("classifier:") and not math.isnan(r["mean_exit_layer"])]
        if free:
            top = min(free, key=lambda r: r["mean_exit_layer"])
            skip = {"skip_ratio": 1.0 - top["mean_exit_layer"] / L, "skip_policy": f"{top['policy']}@{top['best_threshold']}"}
    if "saturation" in todo:
        table, layer_rows = saturation.saturation_rows(rec, layers, settings.similarity_threshold, settings.set_size)
        out["saturation"], out["saturation_layers"] = table, layer_rows
        summary["saturation"] = {r["set"]: {k: r[k] for k in ("first_similar", "similar_states", "length")} for r in table}
    if "subword" in todo:
        if rec.head_kind != "token":
            print(f"[analyze] {name}: subword skipped (a sequence classifier makes one decision per example)")
        else:
            classes = subword.tokenizer_classes(backbone.tokenizer, rec.labels.tolist(), rec.sequence_ids.tolist())
            out["subword"] = subword.subword_rows(classes, layers, L)
            summary["subword"] = {r["piece"]: r["mean_oracle_layer"] for r in out["subword"]}
    if "sublayer" in todo:
        out["sublayer"] = sublayer.sublayer_rows(rec)
        streams = [r["topk_before"] for r in out["sublayer"] if r["kind"] == "stream"]
        modules = [r["topk_before"] for r in out["sublayer"] if r["kind"] == "output"]
        summary["sublayer_topk_before"] = {"stream": sum(streams) / len(streams), "output": sum(modules) / len(modules)}
    out["summary"] = summary
    out["suitability_inputs"] = {"similarity": [r["similarity"] for r in agree_rows], "num_layers": L,
                                 "oracle_mean_exit_layer": float(layers.double().mean()), **skip}
    return out


def _unit(rec: LayerRecords) -> str:
    return "token" if rec.head_kind == "token" else "example"


# --- several models -------------------------------------------------------------------------------


def _trained_export(entry: ModelEntry, settings: AnalyzeSettings) -> str:
    """Train ``entry`` with ``python -m eetrain <overrides>`` into the cache, or reuse the cached export of
    the same overrides."""
    key = hashlib.sha1("\n".join(entry.overrides).encode()).hexdigest()[:10]
    run_dir = Path(settings.cache_dir).expanduser() / f"{entry.name}-{key}"
    export = run_dir / "export"
    if (export / "config.json").is_file():
        print(f"[analyze] {entry.name}: reusing {export} (trained with {list(entry.overrides)})")
        return str(export)
    print(f"[analyze] {entry.name}: training with {list(entry.overrides)} into {run_dir}")
    cmd = [sys.executable, "-m", "eetrain", *entry.overrides, f"hydra.run.dir={run_dir}", "logger=none"]
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0 or not (export / "config.json").is_file():
        raise ConfigError(f"analyze.models: training {entry.name!r} with overrides {list(entry.overrides)} failed "
                          f"(exit code {done.returncode}); run `{' '.join(cmd[1:])}` to see why")
    return str(export)


def _same_vocab(a: Any, b: Any) -> bool:
    return a.get_vocab() == b.get_vocab()


def _models(cfg: Any, settings: AnalyzeSettings, backbone: Any, data: Any, out_dir: Path):
    """(name, backbone, examples, model dir) for the model and each entry of analyze.models/compare."""
    from hydra.utils import instantiate

    from eetrain.backbones import load_backbone

    model_dir = backbone.name_or_path
    if model_dir is None and (out_dir / "export").is_dir():
        model_dir = str(out_dir / "export")
    main_name = _main_name(settings, backbone)
    yield main_name, backbone, data.split_examples(settings.split, "analyze.split"), model_dir
    device = next(backbone.parameters()).device
    for entry in settings.models:
        key = entry.key
        path = entry.path if entry.path is not None else _trained_export(entry, settings)
        if entry.path is not None:
            _check_export(path, key)
        try:
            other = load_backbone(path).to(device)
        except ConfigError as e:  # name the analyze key that chose this model, not model.name_or_path
            raise ConfigError(f"{key}={path!r}: {str(e).replace(f'model.name_or_path={path!r}', 'the model there')}") from e
        if other.head_kind != backbone.head_kind:
            raise ConfigError(f"{key}={path!r} has a {other.head_kind} head, the model a {backbone.head_kind} head; "
                              "analyse models of one kind together")
        if _same_vocab(other.tokenizer, backbone.tokenizer):
            examples = data.split_examples(settings.split, "analyze.split")
        elif settings.same_tokenizer:
            raise ConfigError(_OTHER_TOKENIZER.format(key=key, path=path))
        else:
            examples = instantiate(cfg.data, tokenizer=other.tokenizer, collate_fn=other.collate).split_examples(settings.split, "analyze.split")
        yield entry.name, other, examples, path


def _log_wandb(tables: Mapping[str, list[dict[str, Any]]], images: Mapping[str, Path]) -> bool:
    try:
        import wandb
    except ImportError:
        return False
    if wandb.run is None:
        return False
    from eetrain.wandb_panels import table

    payload: dict[str, Any] = {f"analysis/{name}": table(rows) for name, rows in tables.items()}
    for name, png in images.items():
        payload[f"analysis/{name}_png"] = wandb.Image(str(png))
    wandb.log(payload)
    return True


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else f"{x:.3f}"
    return str(x)


def print_summary(per_model: Sequence[Mapping[str, Any]], suit: Sequence[Mapping[str, Any]] | None) -> None:
    for s in per_model:
        L = s["num_layers"]
        print(f"\n== {s['model']}: {L} layers, {s['tokens']} {s['unit']}s of {s['examples']} examples "
              f"(target: {s['target']})")
        if "agree_at_half_depth" in s:
            print(f"  agreement   layer {max(L // 2, 1)}: top-1 = last {_fmt(s['agree_at_half_depth'])}, "
                  f"cos(h, h_L) {_fmt(s['similarity_at_half_depth'])}")
        if "oracle" in s:
            o = s["oracle"]
            before = ", ".join(f"{k[len('before_last_'):]}: {_fmt(v)}" for k, v in o.items() if k.startswith("before_last_"))
            print(f"  oracle      mean exit {_fmt(o['mean'])} of {L} (median {o['median']:g}); "
                  f"could exit >= k layers early: {before}")
        if "gating" in s:
            parts = [f"{p} {_fmt(v['efficiency'])}" for p, v in s["gating"].items()]
            print(f"  gating      efficiency at the best threshold: {'; '.join(parts)}")
        if "saturation" in s:
            e, d = s["saturation"]["easy"], s["saturation"]["difficult"]
            print(f"  saturation  first similar state easy {_fmt(e['first_similar'])} / difficult "
                  f"{_fmt(d['first_similar'])}; length easy {_fmt(e['length'])} / difficult {_fmt(d['length'])}")
        if "subword" in s:
            print("  subword     mean oracle layer: " + ", ".join(f"{k} {_fmt(v)}" for k, v in s["subword"].items()))
        if "sublayer_topk_before" in s:
            t = s["sublayer_topk_before"]
            print(f"  sublayer    top-k kept from the stream before: residual stream {_fmt(t['stream'])}, "
                  f"module outputs {_fmt(t['output'])}")
    if suit:
        print("\nEarly-exit suitability (ee_score: skip-weighted layer-to-final similarity)")
        print(f"{'rank':>4}  {'model':<20}{'layers':>7}{'ee_score':>10}{'relative':>10}{'skip@c':>8}{'oracle':>8}")
        for r in suit:
            print(f"{r['rank']:>4}  {r['model']:<20}{r['num_layers']:>7}{_fmt(r['ee_score']):>10}"
                  f"{_fmt(r['relative_score']):>10}{_fmt(r['skip_ratio']):>8}{_fmt(r['oracle_skip']):>8}")


def run_stage(cfg: Any, backbone: Any, data: Any, out_dir: Path) -> dict[str, Any]:
    from eetrain.decoding.curve import write_csv

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = analyze_settings(cfg)
    results: dict[str, dict[str, Any]] = {}
    for name, bb, examples, model_dir in _models(cfg, settings, backbone, data, out_dir):
        if name in results:
            raise ConfigError(f"analyze: two models are named {name!r}; set analyze.name or give the other "
                              "a name ({name: ..., path: ...})")
        results[name] = analyze_model(bb, examples, settings, cfg, model_dir, name)
    tables: dict[str, list[dict[str, Any]]] = {}
    for name, res in results.items():
        for key, rows in res.items():
            if isinstance(rows, list):
                tables.setdefault(key, []).extend({"model": name, **r} for r in rows)
    suit = None
    if "suitability" in settings.analyses:
        suit = suitability.suitability_rows({n: r["suitability_inputs"] for n, r in results.items()})
        tables["suitability"] = suit
    images: dict[str, Path] = {}
    plotters = {
        "agreement": lambda p: agreement.plot(tables["agreement"], p),
        "oracle": lambda p: oracle.plot(tables["oracle"], p),
        "confidence": lambda p: confidence.plot(tables["confidence"], p),
        "gating": lambda p: gating.plot(tables["gating"], tables["gating_summary"], p, settings.consistency),
        "saturation": lambda p: saturation.plot(tables["saturation_layers"], p, settings.similarity_threshold),
        "subword": lambda p: subword.plot(tables["subword"], p),
        "sublayer": lambda p: sublayer.plot(tables["sublayer"], p),
        "suitability": lambda p: suitability.plot(tables["suitability"], p, settings.consistency),
    }
    for name in settings.analyses:
        if name in tables:
            images[name] = plotters[name](out_dir / f"{name}.png")
    for key, rows in tables.items():
        write_csv(rows, out_dir / f"{key}.csv")
    files = sorted([f"{k}.csv" for k in tables] + [p.name for p in images.values()])
    summary = {"models": [r["summary"] for r in results.values()], "suitability": suit,
               "settings": {k: v for k, v in settings.__dict__.items() if k != "models"}, "files": files}
    stale = sorted(set(_earlier_files(out_dir / "analysis_summary.json")) - set(files))
    write_json(out_dir / "analysis_summary.json", summary, default=str)
    logged = _log_wandb(tables, images)
    print_summary(summary["models"], suit)
    print(f"\nWrote {', '.join(files)} and analysis_summary.json to {out_dir}" + (" (and to W&B)" if logged else ""))
    if stale:  # kept (nothing is deleted), but they are another run's: say so
        print(f"[analyze] left from an earlier analysis in {out_dir}, not this run's: {', '.join(stale)}")
    return summary


def _earlier_files(path: Path) -> list[str]:
    """The files an earlier `analysis_summary.json` at `path` lists (none when there is no readable one)."""
    try:
        files = json.loads(path.read_text()).get("files") if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return []
    return [str(f) for f in files] if isinstance(files, list) else []
