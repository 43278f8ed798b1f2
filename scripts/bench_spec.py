"""Speculative decoding throughput: vanilla vs EAGLE-2 vs FR-Spec, side by side in one run.

What is measured (batch 1, one process, same prompts for every method):
- prompts: ``--prompts`` windows of ``--prompt-len`` tokens cut from held-out text and code files
  (``--text`` / ``--code``), each continued for ``--new-tokens`` tokens, no stop token;
- methods: vanilla ``cpmjax.generate``; EAGLE-2 (full-vocabulary draft head); FR-Spec with the
  draft head restricted to the ``V/8``, ``V/4``, ``V/2`` most frequent ids;
- at temperature 0 (greedy) and 1;
- tokens/s = generated tokens / decode seconds (prefill and compilation excluded; every
  executable is warmed up first), median over ``--repeats`` runs per prompt, then the median over
  prompts; mean accepted length = tokens committed per draft-verify cycle; draft LM-head FLOPs
  per draft token (``2 * hidden * V_s``); the draft and verify phases timed as separate
  executables, as shares of a cycle; the time of one cycle in units of one vanilla decode step
  (the break-even accepted length: speed-up = accepted length / that).

Greedy speculative output is checked token-for-token against vanilla in the same run.

Usage: python scripts/bench_spec.py [--model DIR] [--draft DIR] [--freq-vocab FILE]
           [--text FILE] [--code FILE] [--depth 6] [--top-k 10] [--total-tokens 60]
           [--out docs/benchmarks] [--name spec]
       python scripts/bench_spec.py --random-target 16384,256,4 --name spec_cost
           (cost only: a random target and an untrained draft, so the accepted length is ~1 and
           the table measures what one cycle costs in vanilla decode steps)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

import numpy as np


def _windows(tokenizer, file: str, count: int, length: int, seed: int) -> list[list[int]]:
    with open(file, encoding="utf-8", errors="replace") as f:
        ids = tokenizer(f.read(), add_special_tokens=False)["input_ids"]
    if len(ids) < length + 1:
        raise SystemExit(f"{file}: only {len(ids)} tokens, need more than {length}")
    rng = np.random.default_rng(seed)
    starts = rng.choice(len(ids) - length, size=count, replace=False)
    return [list(ids[s: s + length]) for s in sorted(starts)]


def main(argv: list[str] | None = None) -> int:
    import cpmjax
    from cpmjax.generate import DEFAULT_FREQ_VOCAB, Speculative, default_draft_path
    from cpmjax.generate.eagle import load_draft

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--draft", default=None)
    ap.add_argument("--freq-vocab", default=None)
    ap.add_argument("--text", default=None, help="held-out text file for prompts")
    ap.add_argument("--code", default=None, help="held-out code file for prompts")
    ap.add_argument("--prompts", type=int, default=3, help="prompts per file")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--total-tokens", type=int, default=60)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--temperatures", default="0,1")
    ap.add_argument("--out", default="docs/benchmarks")
    ap.add_argument("--name", default="spec", help="output file name (NAME.json)")
    ap.add_argument("--random-target", default=None, metavar="VOCAB,HIDDEN,LAYERS",
                    help="cost-only run on a random target with an untrained draft")
    args = ap.parse_args(argv)

    if args.random_target:
        # cost-only run: a random MiniCPM-shaped target, an untrained draft, random prompts
        from flax import nnx

        from cpmjax.generate.eagle import new_draft
        from cpmjax.models import CausalLM, ModelConfig

        v, h, n = (int(x) for x in args.random_target.split(","))
        config = ModelConfig(model_type="minicpm", vocab_size=v, hidden_size=h,
                             intermediate_size=3 * h, num_hidden_layers=n,
                             num_attention_heads=h // 64, max_position_embeddings=1024,
                             tie_word_embeddings=True, scale_emb=12, dim_model_base=h // 4)
        model = CausalLM(config, dtype=args.dtype, param_dtype=args.dtype, rngs=nnx.Rngs(0))
        draft = new_draft(model)
        ranked = np.random.default_rng(0).permutation(v).astype(np.int32)
        rng = np.random.default_rng(1)
        prompts = [("random", rng.integers(4, v, args.prompt_len).tolist())
                   for _ in range(args.prompts)]
        model_dir = draft_dir = f"random-target {args.random_target}"
    else:
        model_dir = args.model or cpmjax.default_model_path()
        draft_dir = args.draft or default_draft_path()
        model = cpmjax.from_pretrained(model_dir, dtype=args.dtype)
        tokenizer = cpmjax.load_tokenizer(model_dir)
        draft = load_draft(draft_dir, dtype=model.dtype)
        ranked = np.load(args.freq_vocab or os.path.join(draft_dir, DEFAULT_FREQ_VOCAB))
        prompts = []
        for kind, file in (("text", args.text), ("code", args.code)):
            if file:
                prompts += [(kind, p) for p in _windows(tokenizer, file, args.prompts,
                                                        args.prompt_len, seed=len(prompts))]
        if not prompts:
            raise SystemExit("pass --text and/or --code held-out files for the prompts")
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    tree = dict(depth=args.depth, top_k=args.top_k, total_tokens=args.total_tokens)
    methods: list[tuple[str, Speculative | None]] = [
        ("vanilla", None),
        ("eagle2", Speculative(draft=draft, **tree)),
    ]
    for frac, label in ((8, "V/8"), (4, "V/4"), (2, "V/2")):
        methods.append((f"frspec {label}", Speculative(
            draft=draft, method="frspec", vocab_subset=ranked, subset_size=vocab // frac,
            **tree)))

    rows = []
    for temperature in [float(t) for t in args.temperatures.split(",")]:
        reference: dict[int, list[int]] = {}
        for name, spec in methods:
            speeds, accepted, draft_share, verify_share, per_kind = [], [], [], [], {}
            cycle_seconds = []
            for index, (kind, prompt) in enumerate(prompts):
                kw = dict(temperature=temperature, seed=index, speculative=spec)
                cpmjax.generate(model, [prompt], args.new_tokens, **kw)  # warm up / compile
                runs = []
                for _ in range(args.repeats):
                    result = cpmjax.generate(model, [prompt], args.new_tokens, **kw)
                    runs.append(result.stats.decode_tokens_per_second)
                speed = statistics.median(runs)
                speeds.append(speed)
                per_kind.setdefault(kind, []).append(speed)
                if spec is None:
                    reference[index] = result.row(0)
                else:
                    if temperature == 0 and result.row(0) != reference[index]:
                        raise SystemExit(f"{name}: greedy output differs from vanilla on "
                                         f"prompt {index}")
                    accepted.append(result.stats.mean_accepted_length)
                    cycle_seconds.append(result.stats.decode_seconds
                                         / max(1, result.stats.loop_iterations))
                    timed = cpmjax.generate(model, [prompt], args.new_tokens, **{
                        **kw, "speculative": Speculative(**{**spec.__dict__,
                                                            "time_phases": True})})
                    draft_share.append(timed.stats.draft_share)
                    verify_share.append(timed.stats.verify_share)
            scored = vocab if spec is None or spec.method == "eagle2" else spec.subset_size
            row = {
                "temperature": temperature,
                "method": name,
                "tokens_per_second": statistics.median(speeds),
                "tokens_per_second_by_kind": {k: statistics.median(v)
                                              for k, v in per_kind.items()},
                "mean_accepted_length": statistics.mean(accepted) if accepted else 1.0,
                "draft_head_flops_per_token": None if spec is None else 2 * hidden * scored,
                "cycle_seconds": statistics.median(cycle_seconds) if cycle_seconds else None,
                "draft_share": statistics.median(draft_share) if draft_share else None,
                "verify_share": statistics.median(verify_share) if verify_share else None,
            }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)

    by = {(r["temperature"], r["method"]): r for r in rows}
    full_flops = 2 * hidden * vocab
    lines = [
        "| T | method | tok/s | × vanilla | × EAGLE-2 | accepted len | % of EAGLE-2 len "
        "| head FLOPs vs full | cycle / vanilla step | draft / verify share |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        van = by[(r["temperature"], "vanilla")]["tokens_per_second"]
        eag = by[(r["temperature"], "eagle2")]
        flops = r["draft_head_flops_per_token"]
        cycle = "-" if r["cycle_seconds"] is None else f"{r['cycle_seconds'] * van:.1f}"
        share = ("-" if r["draft_share"] is None else
                 f"{r['draft_share']:.0%} / {r['verify_share']:.0%}")
        lines.append(
            f"| {r['temperature']:g} | {r['method']} | {r['tokens_per_second']:.1f} | "
            f"{r['tokens_per_second'] / van:.2f} | "
            f"{r['tokens_per_second'] / eag['tokens_per_second']:.2f} | "
            f"{r['mean_accepted_length']:.2f} | "
            f"{r['mean_accepted_length'] / eag['mean_accepted_length']:.0%} | "
            f"{'-' if flops is None else f'{flops / full_flops - 1:+.0%}'} | "
            f"{cycle} | "
            f"{share} |"
        )
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    meta = {
        "model": model_dir, "draft": draft_dir,
        "vocab_size": vocab, "hidden_size": hidden, "prompts": len(prompts),
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "tree": tree, "dtype": args.dtype, "machine": platform.platform(),
        "processor": platform.processor(), "cpus": os.cpu_count(),
    }
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "table": table}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
