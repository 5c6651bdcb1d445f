#!/usr/bin/env python
"""MEE (monotonic early exiting) on a CALM-trained T5-large / CNN-DailyMail: results table and plots
(experiments/mee_t5/README.md).

    python experiments/mee_t5/report.py train=outputs/mee_t5/<run> curve=outputs/curve/<run> \
        analyze=outputs/analyze/<run>
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from report_lib import PaperNumber, best_speedup, main, saturation_value, stability_after  # noqa: E402

MEE = "MEE"
NOTES = "MEE: Laitenberger et al. 2024, Monotonic Early Exiting for Fast Inference in Transformer-based Generation."
T1 = f"{MEE}, Table 1 (T5-large, CNN/DM validation, cos >= 0.9)"


def table1(quantity: str, easy: str, difficult: str, column: str, percent: bool = False) -> list[PaperNumber]:
    return [PaperNumber(f"{quantity}, easy", easy, T1, lambda runs: saturation_value(runs, "easy", column, percent)),
            PaperNumber(f"{quantity}, difficult", difficult, T1,
                        lambda runs: saturation_value(runs, "difficult", column, percent))]


PAPER = [
    *table1("first similar state (std)", "8.65 (1.34)", "18.46 (0.76)", "first_similar"),
    *table1("similar states (std)", "14.35 (1.34)", "4.54 (0.76)", "similar_states"),
    *table1("sequence length (std)", "58.16 (31.81)", "11.48 (20.69)", "length"),
    *table1("monotonic (all layers)", "24%", "3%", "monotonic_0", percent=True),
    *table1("monotonic (after layer 4)", "78%", "97%", "monotonic_4", percent=True),
    *table1("monotonic (after layer 8)", "85%", "98%", "monotonic_8", percent=True),
    PaperNumber("CALM-trained T5: top-1 no longer changes after layer 2", "75%",
                f"{MEE}, Sec. 3, Fig. 1 (BigPatent, 12-layer models)", lambda runs: stability_after(runs, 2)),
    PaperNumber("... after layer 4", "90%", f"{MEE}, Sec. 3, Fig. 1", lambda runs: stability_after(runs, 4)),
    PaperNumber("MEE's classifiers and heuristic: quality and speed-up",
                "not reported (Sec. 7 'Results' is empty)", f"{MEE}, Sec. 7", best_speedup),
]

if __name__ == "__main__":
    sys.exit(main("mee_t5", "MEE: exit classifiers on a CALM-trained T5-large, CNN/DailyMail", PAPER, notes=NOTES))
