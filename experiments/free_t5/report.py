#!/usr/bin/env python
"""FREE on T5-large / CNN-DailyMail: results table and plots (experiments/free_t5/README.md).

    python experiments/free_t5/report.py train=outputs/free_t5/<run> curve=outputs/curve/<run> \
        analyze=outputs/analyze/<run>
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from report_lib import PaperNumber, best_speedup, main, stability_after  # noqa: E402

FREE = "Bae et al. 2023, FREE (EMNLP 2023, arXiv 2310.05424)"
MEE = "MEE"
NOTES = "MEE: Laitenberger et al. 2024, Monotonic Early Exiting for Fast Inference in Transformer-based Generation."
PAPER = [
    PaperNumber("speed-up and ROUGE-L on CNN/DM (T5-large, shallow exit 6 of 24)",
                "see the paper's main results table", FREE, best_speedup),
    PaperNumber("FREE-trained T5: top-1 no longer changes after layer 2",
                "well below CALM's 75% (no figure given in the text)", f"{MEE}, Sec. 3, Fig. 1",
                lambda runs: stability_after(runs, 2)),
    PaperNumber("confidence in the final prediction per layer",
                "locally monotonic: rises to the exit point, drops, rises again", f"{MEE}, Sec. 3, Fig. 2"),
]

if __name__ == "__main__":
    sys.exit(main("free_t5", "FREE: T5-large on CNN/DailyMail", PAPER, notes=NOTES))
