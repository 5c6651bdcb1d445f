"""`python -m eetrain.evaluate model.name_or_path=<export dir> [overrides]`: exit policies, no training.

The same as `python -m eetrain +experiment=evaluate ...` (see conf/experiment/evaluate.yaml): the
model is loaded as is (or from `ckpt_path`), the validation set is recorded once, and the policy
table (`policies.csv`), plot (`policies.png`) and LTT calibration (`calibration.json`) are written.
"""

from __future__ import annotations

import sys


def main() -> None:
    from eetrain.__main__ import main as eetrain_main

    if not any(a.lstrip("+").startswith("experiment=") for a in sys.argv[1:]):
        sys.argv.insert(1, "+experiment=evaluate")
    eetrain_main()


if __name__ == "__main__":
    main()
