"""``cpmjax`` subcommands for speculative decoding.

    cpmjax freq-vocab --tokenizer DIR --corpus FILE [FILE ...] --out vocab.npy
    cpmjax train-draft [--model DIR] --corpus FILE [FILE ...] --out DRAFT_DIR [--steps N]
                       [--init DRAFT_DIR]
                       [--seq-len S] [--batch B] [--lr LR] [--checkpoint-dir DIR]
                       [--max-minutes M] [--dtype bfloat16|float32]
    cpmjax generate ... --spec none|eagle2|frspec [--draft DIR] [--freq-vocab FILE]
                        [--subset N] [--depth D] [--spec-top-k K] [--total-tokens T]

``register`` adds the first two and, when the ``generate`` subparser exists, its speculative
flags (``add_generate_flags``); ``generate --spec eagle2|frspec`` then decodes with
``build_speculative(args, model)``. Without ``--draft`` the draft shipped beside the bundled model
is used (``cpmjax.default_draft_path()``), without ``--freq-vocab`` that draft's
``freq_vocab.npy``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from cpmjax.errors import ConfigError, MissingPathError
from cpmjax.generate.speculative import DEFAULT_FREQ_VOCAB, Speculative


def register(subparsers) -> None:
    p = subparsers.add_parser("freq-vocab", help="rank token ids by corpus frequency (FR-Spec)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: bundled model)")
    p.add_argument("--corpus", nargs="+", required=True, help="text files")
    p.add_argument("--out", required=True, help="output .npy of ranked ids")
    p.set_defaults(func=_run_freq_vocab)

    p = subparsers.add_parser("train-draft", help="train an EAGLE draft on a target model")
    p.add_argument("--model", default=None, help="target checkpoint dir (default: bundled)")
    p.add_argument("--corpus", nargs="+", required=True, help="text files")
    p.add_argument("--out", required=True, help="directory to export the draft to")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--noise", type=float, default=0.0, help="uniform input-feature noise")
    p.add_argument("--checkpoint-dir", default=None, help="orbax checkpoints (resumable)")
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                   help="dtype of the exported weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default=None,
                   help="start from this draft's weights (e.g. the draft of an earlier version "
                        "of the target) instead of a random draft")
    p.set_defaults(func=_run_train_draft)

    generate = getattr(subparsers, "choices", {}).get("generate")
    if generate is not None and not any("--spec" in a.option_strings
                                        for a in generate._actions):
        add_generate_flags(generate)  # cpmjax.cli's generate reads them (build_speculative)


def add_generate_flags(parser) -> None:
    """The speculative-decoding flags of ``cpmjax generate``."""
    parser.add_argument("--spec", default="none", choices=["none", "eagle2", "frspec"],
                        help="speculative decoding method")
    parser.add_argument("--draft", default=None, help="EAGLE draft dir (default: bundled)")
    parser.add_argument("--freq-vocab", default=None,
                        help="ranked ids .npy for frspec (default: the draft dir's)")
    parser.add_argument("--subset", type=int, default=None,
                        help="frspec: ids the draft head scores (default: vocab / 4)")
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--spec-top-k", type=int, default=10)
    parser.add_argument("--total-tokens", type=int, default=60)


def build_speculative(args, model) -> Speculative:
    """A ``Speculative`` from parsed ``generate`` flags (no ``--draft``: the bundled draft; no
    ``--freq-vocab``: the draft directory's; no ``--subset``: ``vocab / 4``)."""
    subset_size = None
    if args.spec == "frspec":
        subset_size = args.subset or max(args.spec_top_k, model.config.vocab_size // 4)
    return Speculative(draft=args.draft, method=args.spec, vocab_subset=args.freq_vocab,
                       subset_size=subset_size, depth=args.depth, top_k=args.spec_top_k,
                       total_tokens=args.total_tokens, time_phases=True)


def _run_freq_vocab(args) -> int:
    import cpmjax
    from cpmjax.generate.frspec import count_token_frequencies, rank_by_frequency, save_freq_vocab

    path = args.tokenizer or cpmjax.default_model_path()
    tokenizer = cpmjax.load_tokenizer(path)
    counts = count_token_frequencies(tokenizer, args.corpus)
    out = save_freq_vocab(args.out, rank_by_frequency(counts))
    seen = int((counts > 0).sum())
    print(f"[cpmjax] {int(counts.sum())} tokens, {seen} of {counts.size} ids seen -> {out}",
          file=sys.stderr)
    return 0


def corpus_ids(tokenizer, files) -> Any:
    """All token ids of text files (documents joined with the EOS token when there is one)."""
    import numpy as np

    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for file in files:
        file = os.fspath(file)
        if not os.path.isfile(file):
            raise MissingPathError(f"corpus file does not exist: {file}")
        with open(file, encoding="utf-8", errors="replace") as f:
            text = f.read()
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if isinstance(eos, int):
            ids.append(eos)
    return np.asarray(ids, np.int32)


def _run_train_draft(args) -> int:
    import cpmjax
    from cpmjax.generate.eagle import (
        check_compatible,
        load_draft,
        new_draft,
        save_draft,
        train_draft,
    )
    from cpmjax.generate.frspec import count_token_frequencies, rank_by_frequency, save_freq_vocab
    from cpmjax.train.data import token_windows

    path = args.model or cpmjax.default_model_path()
    model = cpmjax.from_pretrained(path, dtype="float32")
    tokenizer = cpmjax.load_tokenizer(path)
    ids = corpus_ids(tokenizer, args.corpus)
    if ids.size <= args.seq_len:
        raise ConfigError(f"corpus has {ids.size} tokens, need more than --seq-len "
                          f"{args.seq_len}")
    if args.init:
        draft = load_draft(args.init, dtype="float32")
        check_compatible(draft, model)
    else:
        draft = new_draft(model, seed=args.seed, dtype="float32")

    def log(step, record):
        print(f"[train-draft] step {step}: loss {record['loss']:.4f} feature "
              f"{record['feature_loss']:.4f} token {record['token_loss']:.4f} top1 "
              f"{record['top1']:.3f}", file=sys.stderr)

    history = train_draft(
        model, draft, token_windows(ids, args.seq_len, args.batch, seed=args.seed),
        steps=args.steps, learning_rate=args.lr, noise=args.noise,
        checkpoint_dir=args.checkpoint_dir, log=log,
        max_seconds=None if args.max_minutes is None else 60 * args.max_minutes,
        seed=args.seed,
    )
    last = history[-1] if history else {}
    save_draft(draft, args.out, dtype=args.dtype, metadata={
        "target": os.path.basename(os.path.abspath(path)), "steps": last.get("step", 0),
        "seq_len": args.seq_len, "final_loss": last.get("loss"), "final_top1": last.get("top1"),
        "init": os.path.basename(os.path.abspath(args.init)) if args.init else None,
    })
    counts = count_token_frequencies(tokenizer, args.corpus, vocab_size=model.config.vocab_size)
    save_freq_vocab(os.path.join(args.out, DEFAULT_FREQ_VOCAB), rank_by_frequency(counts))
    print(f"[cpmjax] draft ({draft.num_parameters():,} parameters) -> {args.out}",
          file=sys.stderr)
    return 0
