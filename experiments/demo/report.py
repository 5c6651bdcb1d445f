#!/usr/bin/env python
"""The offline demos' results table and plots (experiments/demo/README.md).

    python experiments/demo/report.py /tmp/expdemo/*            # run directories of the demos
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from report_lib import main  # noqa: E402

NOTES = """Tiny models with random initial weights, trained for a few minutes on the shipped data
(`+experiment=demo`, `bert_demo`, `curve_demo`, `analyze_demo`): they check the pipeline end to end and
show the shape of each result, not the papers' numbers. Speed-ups are ratios measured in the same run
(each early-exit batch against the full model on the same batch)."""

if __name__ == "__main__":
    sys.exit(main("demo", "eetrain demos (CPU, offline)", notes=NOTES))
