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
       python scripts/bench_spec.py --batched-sampling [--batch 192] [--new-tokens 3]
           [--temperatures 1] [--top-p 0.9] --name spec_batched
           (batched sampling: vanilla vs EAGLE-2 vs FR-Spec V/4 on the bundled model and draft,
           samples/s = batch / seconds of one warmed generate call (prefill + decode, median of
           --repeats), and each method's peak resident memory, every method in its own process)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

from cpmjax.report import machine_info, markdown_table, write_json


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
    ap.add_argument("--new-tokens", type=int, default=None,
                    help="tokens per prompt (default 64; 3 with --batched-sampling)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--total-tokens", type=int, default=60)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--temperatures", default=None, help="default 0,1 (1 when batched)")
    ap.add_argument("--batched-sampling", action="store_true",
                    help="batched sampling samples/s and peak memory per method")
    ap.add_argument("--batch", type=int, default=192, help="--batched-sampling batch size")
    ap.add_argument("--top-p", type=float, default=0.9, help="--batched-sampling top-p")
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)  # one batched child
    ap.add_argument("--out", default="docs/benchmarks")
    ap.add_argument("--name", default="spec", help="output file name (NAME.json)")
    ap.add_argument("--random-target", default=None, metavar="VOCAB,HIDDEN,LAYERS",
                    help="cost-only run on a random target with an untrained draft")
    args = ap.parse_args(argv)
    if args.batched_sampling:
        args.new_tokens = 3 if args.new_tokens is None else args.new_tokens
        args.temperatures = args.temperatures or "1"
        return _batched_child(args) if args.method else _batched(args)
    args.new_tokens = 64 if args.new_tokens is None else args.new_tokens
    args.temperatures = args.temperatures or "0,1"

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
    headers = ["T", "method", "tok/s", "× vanilla", "× EAGLE-2", "accepted len",
               "% of EAGLE-2 len", "head FLOPs vs full", "cycle / vanilla step",
               "draft / verify share"]
    cells = []
    for r in rows:
        van = by[(r["temperature"], "vanilla")]["tokens_per_second"]
        eag = by[(r["temperature"], "eagle2")]
        flops = r["draft_head_flops_per_token"]
        cycle = "-" if r["cycle_seconds"] is None else f"{r['cycle_seconds'] * van:.1f}"
        share = ("-" if r["draft_share"] is None else
                 f"{r['draft_share']:.0%} / {r['verify_share']:.0%}")
        cells.append([
            f"{r['temperature']:g}", r["method"], f"{r['tokens_per_second']:.1f}",
            f"{r['tokens_per_second'] / van:.2f}",
            f"{r['tokens_per_second'] / eag['tokens_per_second']:.2f}",
            f"{r['mean_accepted_length']:.2f}",
            f"{r['mean_accepted_length'] / eag['mean_accepted_length']:.0%}",
            "-" if flops is None else f"{flops / full_flops - 1:+.0%}", cycle, share,
        ])
    table = markdown_table(headers, cells)
    print(table)
    info = machine_info()
    meta = {
        "model": model_dir, "draft": draft_dir,
        "vocab_size": vocab, "hidden_size": hidden, "prompts": len(prompts),
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "tree": tree, "dtype": args.dtype, "machine": info["machine"],
        "processor": info["processor"], "cpus": info["cpus"],
    }
    write_json(os.path.join(args.out, f"{args.name}.json"),
               {"meta": meta, "rows": rows, "table": table}, indent=2)
    return 0


# ----------------------------------------------------------------------------------------------
# batched sampling: one process per method, so that each one's peak memory is its own
BATCHED_METHODS = ("vanilla", "eagle2", "frspec V/4")


def _batched(args) -> int:
    rows = []
    for method in BATCHED_METHODS:
        argv = [sys.executable, os.path.abspath(__file__), "--batched-sampling", "--method",
                method, "--batch", str(args.batch), "--new-tokens", str(args.new_tokens),
                "--temperatures", args.temperatures, "--top-p", str(args.top_p),
                "--prompt-len", str(args.prompt_len), "--repeats", str(args.repeats),
                "--depth", str(args.depth), "--top-k", str(args.top_k),
                "--total-tokens", str(args.total_tokens), "--dtype", args.dtype]
        for flag in ("model", "draft", "freq_vocab"):
            if getattr(args, flag):
                argv += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{method}: {done.stderr[-2000:]}")
        for line in done.stdout.splitlines():
            if line.startswith("{"):
                rows.append(json.loads(line))
                print(line, file=sys.stderr, flush=True)
    headers = ["T", "top-p", "method", "samples/s", "× vanilla", "peak RSS (GB)",
               "compile (s)"]
    van = {r["temperature"]: r["samples_per_second"] for r in rows if r["method"] == "vanilla"}
    table = markdown_table(headers, [
        [f"{r['temperature']:g}", f"{r['top_p']:g}", r["method"],
         f"{r['samples_per_second']:.2f}", f"{r['samples_per_second'] / van[r['temperature']]:.3f}",
         f"{r['peak_rss_bytes'] / 1e9:.2f}", f"{r['compile_seconds']:.1f}"] for r in rows],
        align="lllrrrr")
    print(table)
    meta = {**machine_info(), "model": args.model or "bundled", "draft": args.draft or "bundled",
            "batch": args.batch, "new_tokens": args.new_tokens, "prompt_len": args.prompt_len,
            "repeats": args.repeats, "tree": {"depth": args.depth, "top_k": args.top_k,
                                              "total_tokens": args.total_tokens}}
    write_json(os.path.join(args.out, f"{args.name}.json"),
               {"meta": meta, "rows": rows, "table": table}, indent=2)
    return 0


def _batched_child(args) -> int:
    import cpmjax
    from cpmjax.generate import DEFAULT_FREQ_VOCAB, Speculative, default_draft_path
    from cpmjax.generate.eagle import load_draft

    model = cpmjax.from_pretrained(args.model or cpmjax.default_model_path(), dtype=args.dtype)
    vocab = model.config.vocab_size
    spec = None
    if args.method != "vanilla":
        draft_dir = args.draft or default_draft_path()
        draft = load_draft(draft_dir, dtype=model.dtype)
        tree = dict(depth=args.depth, top_k=args.top_k, total_tokens=args.total_tokens)
        if args.method == "eagle2":
            spec = Speculative(draft=draft, **tree)
        else:
            ranked = args.freq_vocab or os.path.join(draft_dir, DEFAULT_FREQ_VOCAB)
            spec = Speculative(draft=draft, method="frspec", vocab_subset=ranked,
                               subset_size=vocab // 4, **tree)
    rng = np.random.default_rng(0)
    prompts = rng.integers(4, vocab, (args.batch, args.prompt_len))
    for temperature in [float(t) for t in args.temperatures.split(",")]:
        kw = dict(temperature=temperature, top_p=args.top_p, seed=0, speculative=spec)
        first = cpmjax.generate(model, prompts, args.new_tokens, **kw)  # compiles
        seconds = []
        for repeat in range(args.repeats):
            t0 = time.perf_counter()
            cpmjax.generate(model, prompts, args.new_tokens, **{**kw, "seed": repeat + 1})
            seconds.append(time.perf_counter() - t0)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
        print(json.dumps({
            "temperature": temperature, "top_p": args.top_p, "method": args.method,
            "batch": args.batch, "new_tokens": args.new_tokens,
            "samples_per_second": args.batch / statistics.median(seconds),
            "seconds": statistics.median(seconds), "peak_rss_bytes": rss,
            "compile_seconds": first.stats.compile_seconds,
        }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
