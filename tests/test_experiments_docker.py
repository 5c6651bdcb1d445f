"""experiments/ and docker/: the Dockerfiles' pins agree with CI and pyproject.toml, the entry point is
`python -m eetrain`, every reproduction folder has its README and report script, and the report scripts
turn run directories (synthetic here, with the columns the stages write) into tables and plots.

Static: nothing here builds an image (no Docker in CI)."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cpu"]
PINNED = ("torch", "transformers", "lightning")
EXPERIMENTS = ("calm_t5", "free_t5", "mee_t5", "pabee_bert", "layerskip_llama", "demo")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comments dropped, continuation lines joined."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        current += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
            current = ""
    return out


def pins(path: Path) -> dict[str, list[str]]:
    """Every `name==version` a RUN line installs, per package (all occurrences)."""
    found: dict[str, list[str]] = {}
    for word, args in instructions(path):
        if word == "RUN":
            for name, ver in re.findall(r"(?<![\w.-])([A-Za-z][\w.-]*)==([\w.+!-]+)", args):
                found.setdefault(name.lower(), []).append(ver)
    return found


def project_requirements() -> dict[str, Requirement]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (CI's)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {r.name.lower(): r for r in map(Requirement, deps)}


def ci_torch_pin() -> str:
    (pin,) = re.findall(r"pip install[^\n]*\btorch==([\w.+]+)", (ROOT / ".ci" / "run").read_text())
    return pin


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_match_ci_and_pyproject(dockerfile: Path) -> None:
    found = pins(dockerfile)
    reqs = project_requirements()
    for name in PINNED:
        assert name in found, f"{dockerfile.name} does not pin {name}=="
        assert len(set(found[name])) == 1, f"{dockerfile.name} pins {name} to several versions: {found[name]}"
        pin = found[name][0]
        # the range pyproject.toml allows
        assert reqs[name].specifier.contains(pin, prereleases=True), f"{name}=={pin} outside pyproject's {reqs[name]}"
        # the version CI tested (torch's local label, e.g. +cpu, is the build, not the version)
        assert Version(pin) == Version(Version(version(name)).public), (
            f"{dockerfile.name} pins {name}=={pin}, CI tests {version(name)}")
    assert found["torch"][0] == ci_torch_pin(), ".ci/run and the Dockerfile install different torch versions"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_entrypoint_and_sources(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    entry = [args for word, args in steps if word == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["python", "-m", "eetrain"]
    cmd = [args for word, args in steps if word == "CMD"]
    assert not cmd or json.loads(cmd[-1]) == ["+experiment=demo"]  # the offline demo by default
    # what COPY takes from the build context exists, and .dockerignore does not drop it
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    copied = [src for word, args in steps if word == "COPY" for src in args.split()[:-1] if not src.startswith("--")]
    assert {"pyproject.toml", "eetrain", "conf"} <= set(copied)
    for src in copied:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert src not in ignored, f"COPY {src}: excluded by .dockerignore"
    # editable: eetrain finds conf/ beside the package (eetrain/config.py CONF_DIR)
    assert any(word == "RUN" and re.search(r"pip install -e \.", args) for word, args in steps)
    run_lines = " ".join(args for word, args in steps if word == "RUN")
    assert run_lines.index("torch==") < run_lines.index("pip install -e .")


def test_cpu_dockerfile_installs_the_cpu_torch_first() -> None:
    steps = instructions(ROOT / "docker" / "Dockerfile.cpu")
    assert steps[0] == ("FROM", "python:3.11-slim")
    run_lines = " ".join(args for word, args in steps if word == "RUN")
    torch_at = run_lines.index(f"torch=={ci_torch_pin()} --index-url https://download.pytorch.org/whl/cpu")
    assert torch_at < run_lines.index("pip install -e .")
    gpu = instructions(ROOT / "docker" / "Dockerfile")
    assert gpu[0][0] == "ARG" and "nvidia/cuda:" in gpu[0][1] and gpu[1] == ("FROM", "${BASE_IMAGE}")


def test_every_experiment_has_readme_and_report() -> None:
    folders = sorted(p.name for p in (ROOT / "experiments").iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == sorted(EXPERIMENTS)
    for name in EXPERIMENTS:
        assert (ROOT / "experiments" / name / "README.md").is_file(), name
        assert (ROOT / "experiments" / name / "report.py").is_file(), name


def test_readmes_name_shipped_experiments() -> None:
    """Every `+experiment=NAME` in experiments/ and docker/ READMEs is a file of conf/experiment/."""
    shipped = {p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")}
    readmes = [*(ROOT / "experiments").glob("*/README.md"), ROOT / "experiments" / "README.md",
               ROOT / "docker" / "README.md"]
    for readme in readmes:
        named = set(re.findall(r"\+experiment=(\w+)", readme.read_text()))
        assert named, f"{readme.relative_to(ROOT)} names no experiment"
        assert named <= shipped, f"{readme.relative_to(ROOT)}: unknown {sorted(named - shipped)}"


# --------------------------------------------------------------------------- report.py on synthetic runs

def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def curve_run(d: Path) -> Path:
    """A `curve_demo`-like run: training's layer report and the curve stage's quality_speed.csv."""
    d.mkdir(parents=True)
    write_csv(d / "layer_report.csv", [{"layer": i, "loss": 2.0 / i, "acc": 0.5 + 0.05 * i, "agree": 0.6 + 0.1 * i}
                                       for i in range(1, 5)])
    base = {"normalized_latency": "", "sequence_consistency": "", "flops_ratio": "", "rouge1": 60.0, "rouge2": 40.0,
            "rougeLsum": 61.0, "tokens": 100, "seconds": 1.0}
    rows = [
        {"policy": "full", "threshold": "", "mean_exit_layer": 4, "speedup": 1, "consistency": 1,
         "decision_fraction": 0, "rougeL": 62.0, "rougeL_ratio": 1},
        {"policy": "oracle", "threshold": "", "mean_exit_layer": 1.8, "speedup": "", "consistency": 1,
         "decision_fraction": "", "rougeL": "", "rougeL_ratio": ""},
        {"policy": "softmax_gap", "threshold": 0.9, "mean_exit_layer": 3.1, "speedup": 1.21, "consistency": 0.99,
         "decision_fraction": 0.08, "rougeL": 61.9, "rougeL_ratio": 0.998},
        {"policy": "softmax_gap", "threshold": 0.5, "mean_exit_layer": 2.4, "speedup": 1.43, "consistency": 0.96,
         "decision_fraction": 0.09, "flops_ratio": 0.64, "rougeL": 60.5, "rougeL_ratio": 0.976},
        {"policy": "classifier:calm", "threshold": 0.5, "mean_exit_layer": 2.0, "speedup": 1.7, "consistency": 0.9,
         "decision_fraction": 0.04, "rougeL": 58.0, "rougeL_ratio": 0.935},
    ]
    write_csv(d / "quality_speed.csv", [{**base, **r} for r in rows])
    return d


def bert_run(d: Path) -> Path:
    """A `bert_demo`-like run: the classify stage's layer_scores.csv and accuracy_speed.csv."""
    d.mkdir(parents=True)
    write_csv(d / "layer_scores.csv", [{"layer": i, "accuracy": 90.0 + i, "agree_last": 0.9 + 0.025 * i}
                                       for i in range(1, 5)])
    write_csv(d / "accuracy_speed.csv", [
        {"policy": "full", "threshold": "", "mean_exit_layer": 4, "expected_saving": 0, "speedup": 1,
         "normalized_latency": 1, "consistency": 1, "decision_fraction": 0, "accuracy": 94.0, "accuracy_ratio": 1,
         "examples": 64, "seconds": 0.5},
        {"policy": "patience", "threshold": 1, "mean_exit_layer": 2.0, "expected_saving": 0.5, "speedup": 1.8,
         "normalized_latency": 0.55, "consistency": 0.99, "decision_fraction": 0.05, "accuracy": 93.8,
         "accuracy_ratio": 0.998, "examples": 64, "seconds": 0.28},
    ])
    return d


def generate_run(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "generation_summary.json").write_text(json.dumps({
        "policy": "softmax_gap:0.9", "strategy": "copy", "batch_mode": "ride_along", "batch_size": 1,
        "examples": 10, "num_layers": 8, "tokens": 120, "seconds": 1.0, "tokens_per_second": 120.0,
        "mean_exit_layer": 4.44, "decision_fraction": 0.12, "full_tokens": 120, "full_seconds": 1.25,
        "full_tokens_per_second": 96.0, "speedup": 1.25, "token_consistency": 0.999, "sequence_consistency": 0.99,
    }))
    return d


def analyze_run(d: Path) -> Path:
    """An `analyze`-like run: analysis_summary.json, suitability.csv and the saturation tables."""
    d.mkdir(parents=True)
    models = []
    for name, first in (("calm", 2.2), ("last_layer", 3.1)):
        models.append({"model": name, "num_layers": 8, "tokens": 2402, "examples": 200, "target": "reference",
                       "unit": "token", "agree_at_half_depth": 0.85, "similarity_at_half_depth": 0.95,
                       "oracle": {"tokens": 2402, "num_layers": 8, "mean": 2.56, "median": 1.0,
                                  "before_last_1": 0.93, "before_last_2": 0.88, "before_last_5": 0.75},
                       "gating": {"softmax_gap": {"threshold": 0.5, "efficiency": 0.71},
                                  "hidden_saturation": {"threshold": None, "efficiency": float("nan")}},
                       "saturation": {"easy": {"first_similar": first, "similar_states": 5.0, "length": 8.8},
                                      "difficult": {"first_similar": 3.6, "similar_states": 2.0, "length": 5.2}},
                       "subword": {"whole_word": 2.9}, "sublayer_topk_before": {"stream": 0.79, "output": 0.13}})
    (d / "analysis_summary.json").write_text(json.dumps({"models": models, "suitability": None, "settings": {}}))
    write_csv(d / "suitability.csv", [
        {"model": "calm", "num_layers": 8, "ee_score": 0.868, "relative_score": 1.0, "skip_ratio": 0.498,
         "skip_policy": "softmax_max@0.5", "oracle_skip": 0.68, "rank": 1},
        {"model": "last_layer", "num_layers": 8, "ee_score": 0.6, "relative_score": 0.69, "skip_ratio": 0.289,
         "skip_policy": "entropy@-0.5", "oracle_skip": 0.49, "rank": 2},
    ])
    sat = []
    for model in ("calm", "last_layer"):
        for s, first, mono in (("easy", 2.16, 0.99), ("difficult", 3.65, 0.5), ("all", 2.9, 0.8)):
            sat.append({"model": model, "set": s, "tokens": 600, "first_similar": first, "first_similar_std": 0.4,
                        "similar_states": 5.0, "similar_states_std": 1.0, "length": 8.84, "length_std": 3.0,
                        "monotonic_0": mono, "monotonic_4": mono, "monotonic_8": ""})
    write_csv(d / "saturation.csv", sat)
    write_csv(d / "saturation_layers.csv", [
        {"model": model, "layer": i, "similarity_easy": 0.5 + 0.06 * i, "similarity_difficult": 0.3 + 0.08 * i,
         "similarity_all": 0.4 + 0.07 * i, "top1_stability": "" if i == 0 else min(1.0, 0.55 + 0.1 * i)}
        for model in ("calm", "last_layer") for i in range(0, 9)])
    return d


def run_report(name: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "experiments" / name / "report.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_demo_report_writes_tables_and_plots(tmp_path: Path) -> None:
    runs = [curve_run(tmp_path / "runs" / "curve_demo"), bert_run(tmp_path / "runs" / "bert_demo"),
            generate_run(tmp_path / "runs" / "llama_demo"), analyze_run(tmp_path / "runs" / "analyze_demo")]
    (tmp_path / "runs" / "empty").mkdir()                 # no results file: skipped
    (tmp_path / "runs" / "demo.log").write_text("log\n")  # not a directory: skipped
    out = tmp_path / "report"
    done = run_report("demo", [*map(str, runs), str(tmp_path / "runs" / "empty"), str(tmp_path / "runs" / "demo.log"),
                               "--out", str(out)])
    assert done.returncode == 0, done.stderr
    assert "skipped" in done.stderr and "empty" in done.stderr
    md = (out / "results.md").read_text()
    assert done.stdout.strip().startswith("# eetrain demos") and md.strip() == done.stdout.strip()
    for heading in ("## Results", "## Operating points", "## Per-layer validation report", "## Analyses",
                    "## Hidden-state saturation (MEE Table 1)", "## Early-exit suitability", "## Plots"):
        assert heading in md
    with open(out / "results.csv", newline="") as fh:
        headline = {r["run"]: r for r in csv.DictReader(fh)}
    assert set(headline) == {"curve_demo", "bert_demo", "llama_demo", "analyze_demo"}
    # generation: the fastest point within 97 % of the full model's ROUGE-L (0.935 x is below it)
    assert headline["curve_demo"]["best"] == "softmax_gap@0.5"
    assert float(headline["curve_demo"]["speedup"]) == pytest.approx(1.43)
    assert float(headline["curve_demo"]["oracle_exit"]) == pytest.approx(1.8)
    assert headline["curve_demo"]["layers"] == "4" and float(headline["curve_demo"]["val_acc"]) == pytest.approx(0.7)
    # classification: within 99 % of the full model's accuracy
    assert headline["bert_demo"]["metric"] == "accuracy" and headline["bert_demo"]["best"] == "patience@1"
    assert float(headline["llama_demo"]["gen_speedup"]) == pytest.approx(1.25)
    assert float(headline["analyze_demo"]["ee_score"]) == pytest.approx(0.868)
    assert "| curve_demo | quality_speed | softmax_gap | 0.5 | 2.400 | 4 | 1.430 |" in md
    for name in ("points", "layers", "analysis", "saturation", "suitability"):
        assert (out / f"{name}.csv").is_file(), name
    with open(out / "points.csv", newline="") as fh:  # the curve's FLOPs beside its speed-up
        flops = {(r["policy"], r["threshold"]): r["flops_ratio"] for r in csv.DictReader(fh) if r["run"] == "curve_demo"}
    assert float(flops["softmax_gap", "0.5"]) == pytest.approx(0.64) and flops["softmax_gap", "0.9"] == ""
    for png in ("quality_speed.png", "layers.png", "stability.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"]({png})" in md
    assert not (out / "policies.png").exists()  # no run has policies.csv


def test_mee_report_compares_with_the_paper(tmp_path: Path) -> None:
    run = analyze_run(tmp_path / "mee_t5" / "2026-12-01_10-00-00")
    policies = [{"measure": m, "threshold": t, "min_exit_layer": 4, "mean_exit_layer": e, "consistency": c,
                 "accuracy": 0.7, "expected_saving": 1 - e / 8}
                for m, t, e, c in (("softmax_gap", 0.9, 6.0, 0.999), ("softmax_gap", 0.5, 5.0, 0.991),
                                   ("softmax_gap", 0.1, 4.5, 0.95), ("classifier:three_state_mlp", 0.7, 5.5, 0.994))]
    write_csv(run / "policies.csv", policies)
    (run / "calibration.json").write_text(json.dumps([{"policy": "softmax_gap", "threshold": 0.3, "epsilon": 0.05}]))
    out = tmp_path / "report"
    done = run_report("mee_t5", [f"mee={run}", "--out", str(out)])
    assert done.returncode == 0, done.stderr
    md = (out / "results.md").read_text()
    with open(out / "paper.csv", newline="") as fh:
        paper = {r["quantity"]: r for r in csv.DictReader(fh)}
    assert paper["first similar state (std), easy"]["paper"] == "8.65 (1.34)"
    assert paper["first similar state (std), easy"]["measured"] == "2.16 (0.40)"  # the run's own model: calm
    assert paper["monotonic (all layers), difficult"]["measured"] == "50%"
    assert paper["CALM-trained T5: top-1 no longer changes after layer 2"]["measured"] == "75%"
    assert "Table 1" in paper["similar states (std), difficult"]["source"]
    with open(out / "policies.csv", newline="") as fh:
        best = {r["measure"]: r for r in csv.DictReader(fh)}
    assert float(best["softmax_gap"]["mean_exit_layer"]) == 5.0  # lowest mean exit at consistency >= 0.99
    assert float(best["softmax_gap"]["ltt_threshold"]) == 0.3
    assert "| mee |" in md and (out / "policies.png").read_bytes()[:4] == b"\x89PNG"
