#!/usr/bin/env python
"""LayerSkip on Llama-3.2-1B / WikiText-103: results table and plots (experiments/layerskip_llama/README.md).

    python experiments/layerskip_llama/report.py train=outputs/layerskip_llama/<run> \
        analyze=outputs/analyze/<run>
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from report_lib import PaperNumber, generate_speedup, main  # noqa: E402

LAYERSKIP = "Elhoushi et al. 2024, LayerSkip (ACL 2024, arXiv 2404.16710), abstract"
PAPER = [
    PaperNumber("self-speculative decoding speed-up, CNN/DM summarization", "up to 2.16x", LAYERSKIP,
                generate_speedup),
    PaperNumber("... coding", "up to 1.82x", LAYERSKIP),
    PaperNumber("... TOPv2 semantic parsing", "up to 2.0x", LAYERSKIP),
]

if __name__ == "__main__":
    sys.exit(main("layerskip_llama", "LayerSkip: Llama-3.2-1B on WikiText-103", PAPER))
