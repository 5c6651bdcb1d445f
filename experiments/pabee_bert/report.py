#!/usr/bin/env python
"""PABEE on BERT-base / GLUE: results table and plots (experiments/pabee_bert/README.md).

    python experiments/pabee_bert/report.py sst2=outputs/pabee_bert/<run> [mrpc=outputs/pabee_bert/<run>]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from report_lib import PaperNumber, best_speedup, main  # noqa: E402

PABEE = "Zhou et al. 2020, PABEE (NeurIPS 2020, arXiv 2006.04152)"
PAPER = [
    PaperNumber("GLUE accuracy and speed-up with patience exits",
                "see the paper's main GLUE table (ALBERT-base; this recipe uses BERT-base)", PABEE,
                best_speedup),
]

if __name__ == "__main__":
    sys.exit(main("pabee_bert", "PABEE: BERT-base on GLUE", PAPER))
