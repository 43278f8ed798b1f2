"""Train an EAGLE draft for a target model (same flags as ``cpmjax train-draft``).

    python scripts/train_draft.py --model DIR --corpus FILE [FILE ...] --out DRAFT_DIR \
        [--steps N] [--seq-len S] [--batch B] [--lr LR] [--checkpoint-dir DIR] [--max-minutes M]

Writes ``DRAFT_DIR/{config.json, model.safetensors, freq_vocab.npy}``; orbax checkpoints in
``--checkpoint-dir`` make a stopped run resumable.
"""

import sys

from cpmjax.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-draft", *sys.argv[1:]]))
