"""Train a model with the cpmjax recipe (same flags as ``cpmjax train``).

    python scripts/train.py --config configs/cpmjax-tiny.yaml
"""

import sys

from cpmjax.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
