#!/usr/bin/env python
"""CALM on T5-large / CNN-DailyMail: results table and plots (experiments/calm_t5/README.md).

    python experiments/calm_t5/report.py train=outputs/calm_t5/<run> curve=outputs/curve/<run> \
        analyze=outputs/analyze/<run>
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from report_lib import PaperNumber, best_speedup, main, stability_after  # noqa: E402

CALM = "Schuster et al. 2022, CALM (NeurIPS 2022, arXiv 2207.07061)"
MEE = "MEE"
NOTES = "MEE: Laitenberger et al. 2024, Monotonic Early Exiting for Fast Inference in Transformer-based Generation."
PAPER = [
    PaperNumber("speed-up at (near) full quality", "up to 3x ('potential speedup of up to x3')",
                f"{CALM}, abstract", best_speedup),
    PaperNumber("quality vs average decoder layers / speed-up per confidence measure on CNN/DM",
                "see the paper's CNN/DM results", CALM),
    PaperNumber("CALM-trained T5: top-1 no longer changes after layer 2", "75%",
                f"{MEE}, Sec. 3, Fig. 1 (BigPatent, 12-layer models)", lambda runs: stability_after(runs, 2)),
    PaperNumber("... after layer 4", "90%", f"{MEE}, Sec. 3, Fig. 1", lambda runs: stability_after(runs, 4)),
]

if __name__ == "__main__":
    sys.exit(main("calm_t5", "CALM: T5-large on CNN/DailyMail", PAPER, notes=NOTES))
