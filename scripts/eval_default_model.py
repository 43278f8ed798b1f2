"""Held-out loss of a model on the default model's held-out files, the measure of the issue's
target for a better default model (held-out loss <= 4.3 nats/token).

    python scripts/eval_default_model.py --model runs/cpmjax-tiny-continue/hf [--baseline]

The held-out files are those of ``configs/cpmjax-tiny.yaml`` (2% of its stdlib + package
metadata files, chosen by a hash of the path; the metadata part depends on the installed
packages), tokenized with the bundled tokenizer, every held-out token scored once
(``cpmjax.train.heldout_loss``). ``--baseline`` also scores the bundled model on the same tokens.
"""

from __future__ import annotations

import argparse
import os


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], help="HF checkpoint directory")
    parser.add_argument("--baseline", action="store_true", help="also the bundled model")
    parser.add_argument("--config", default="configs/cpmjax-tiny.yaml")
    parser.add_argument("--cache-dir", default="runs/default-model-eval")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    from cpmjax import default_model_path
    from cpmjax.hf import from_pretrained
    from cpmjax.train import heldout_loss, load_config
    from cpmjax.train.evaluate import heldout_data

    bundled = default_model_path()
    config = load_config(args.config, [f"data.tokenizer={bundled}",
                                       f"data.cache_dir={args.cache_dir}",
                                       f"run.out_dir={args.cache_dir}"])
    _, eval_tokens = heldout_data(config)  # remembered: heldout_loss reuses it
    per_batch = config.data.batch_size * config.data.seq_len
    config.run.eval_batches = max(1, len(eval_tokens) // per_batch)
    models = ([bundled] if args.baseline else []) + args.model
    results = {}
    for directory in models:
        loss = heldout_loss(from_pretrained(directory, dtype="float32"), config)
        results[os.path.abspath(directory)] = loss
        print(f"{directory}: held-out loss {loss:.4f} nats/token over {len(eval_tokens):,} "
              f"held-out tokens ({config.run.eval_batches} batches)")
    if args.out:
        from cpmjax.report import write_json

        write_json(args.out, {"held_out_tokens": int(len(eval_tokens)), "losses": results})


if __name__ == "__main__":
    main()
