"""UltraFuser experiment report: specialists, generalist and fused models on held-out examples
of each domain.

    python scripts/bench_ultrafuser.py --runs runs/fusion --out docs/benchmarks/ultrafuser

Expects (see docs/fusion.md for the commands that make them): ``<runs>/data/<domain>/
heldout.jsonl`` (scripts/make_fusion_data.py), the specialists ``<runs>/{text,code,math}/hf``
and the generalist ``<runs>/generalist/hf`` (cpmjax train), and fused models ``<runs>/<variant>/
fused`` for the variants direct, two-stage, two-stage-balanced (cpmjax fuse). Writes
``<out>.json`` and ``<out>.md``. Every number is measured by this run on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import yaml

import cpmjax
from cpmjax.fusion import load_fused
from cpmjax.fusion.data import DOMAINS, split_example
from cpmjax.fusion.evaluate import (
    decode_speed,
    domain_response_loss,
    exact_match,
    load_heldout,
    mean_gate_weights,
)
from cpmjax.report import machine_info, markdown_table, write_json, write_text

VARIANTS = {"direct": "direct (one stage, pooled batches)",
            "two-stage": "two-stage (pooled batches)",
            "two-stage-balanced": "two-stage + balanced"}


def _steps(run_dir: str, name: str) -> dict:
    path = os.path.join(run_dir, name)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return yaml.safe_load(f) or {}


def measure_speed(fused, specialist, tokenizer, prompt_text: str, *, new_tokens: int,
                  repeats: int) -> dict:
    """Decode tokens/s, side by side: the fused model, one specialist alone, and that same
    specialist wrapped as a one-specialist FusedLM (the wrapper's own overhead)."""
    from cpmjax.fusion import FusedLM

    prompts = [tokenizer(split_example(prompt_text)[0])["input_ids"]]
    measured = decode_speed({"fused (3 specialists)": fused,
                             "one specialist (math)": specialist,
                             "FusedLM of that one specialist": FusedLM([specialist])},
                            prompts, new_tokens=new_tokens, repeats=repeats)
    one = measured["one specialist (math)"]["median_tokens_per_second"]
    return {"batch": 1, "new_tokens": new_tokens, "repeats": repeats, "models": measured,
            "fused_over_specialist":
                measured["fused (3 specialists)"]["median_tokens_per_second"] / one,
            "wrapper_over_specialist":
                measured["FusedLM of that one specialist"]["median_tokens_per_second"] / one}


def render(record: dict) -> str:
    records, gates, speed = record["models"], record["gate_weights"], record["decode_speed"]
    rows = [[name, *[r["loss"][d] for d in DOMAINS], r["average_loss"], r["math_exact_match"]]
            for name, r in records.items()]
    table = markdown_table(["model", *[f"{d} loss" for d in DOMAINS], "average loss",
                            "math exact match"], rows, align="lrrrrr", float_format=".4f")
    gate_rows = [[VARIANTS[k], d, *w] for k, g in gates.items() for d, w in g.items()]
    gate_table = markdown_table(["fused model", "domain", *[f"w({d})" for d in DOMAINS]],
                                gate_rows, align="llrrr", float_format=".3f")
    speed_table = ""
    if speed:
        speed_table = markdown_table(
            ["model", "decode tokens/s (median)", "min", "max"],
            [[n, m["median_tokens_per_second"], m["min"], m["max"]]
             for n, m in speed["models"].items()], align="lrrr", float_format=".1f")
        speed_table += (
            f"\n\nfused / one specialist = **{speed['fused_over_specialist']:.2f}x**; "
            f"one-specialist FusedLM / that specialist = "
            f"{speed.get('wrapper_over_specialist', float('nan')):.2f}x "
            f"(batch 1, {speed['new_tokens']} new tokens, median of {speed['repeats']} "
            "interleaved runs; decode phase only, compile and prefill excluded)")
    target_lines = "\n".join(f"- {'met' if ok else 'MISSED'}: {k}"
                             for k, ok in record["targets"].items())
    held = record["heldout_per_domain"]
    return f"""# UltraFuser on three cpmjax-tiny specialists (generated)

Written by `scripts/bench_ultrafuser.py`; see `docs/fusion.md` for the setup and the reading.
Held-out examples per domain: {', '.join(f'{d} {n}' for d, n in held.items())};
math exact match on the first {record['math_exact_match_examples']} math examples.
Loss: mean next-token cross-entropy (nats) over response tokens only.

## Response loss and math exact match

{table}

## Targets

{target_lines}

## Mean gate weight per domain (over response tokens)

{gate_table}

## Decode speed, measured side by side

{speed_table}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/fusion")
    parser.add_argument("--out", default="docs/benchmarks/ultrafuser")
    parser.add_argument("--heldout", type=int, default=64, help="examples per domain")
    parser.add_argument("--em-examples", type=int, default=32, help="math exact-match examples")
    parser.add_argument("--repeats", type=int, default=5, help="decode-speed repeats")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--speed-only", action="store_true",
                        help="re-measure only the decode speed into an existing <out>.json")
    args = parser.parse_args()
    t0 = time.perf_counter()
    runs = args.runs
    tokenizer = cpmjax.load_tokenizer(cpmjax.default_model_path())
    heldout = {d: load_heldout(os.path.join(runs, "data", d, "heldout.jsonl"))[:args.heldout]
               for d in DOMAINS}
    texts = {d: [e["text"] for e in rows] for d, rows in heldout.items()}
    if args.speed_only:
        with open(args.out + ".json") as f:
            record = json.load(f)
        record["decode_speed"] = measure_speed(
            load_fused(os.path.join(runs, "two-stage-balanced", "fused")),
            cpmjax.from_pretrained(os.path.join(runs, "math", "hf")), tokenizer,
            texts["math"][0], new_tokens=args.new_tokens, repeats=args.repeats)
        record["decode_speed"]["meta"] = machine_info()
        write_json(args.out + ".json", record)
        write_text(args.out + ".md", render(record))
        print(record["decode_speed"])
        return

    models: dict[str, object] = {"base (cpmjax-tiny)": cpmjax.from_pretrained(
        cpmjax.default_model_path())}
    for name in (*DOMAINS, "generalist"):
        models[f"{name} specialist" if name != "generalist" else "generalist"] = \
            cpmjax.from_pretrained(os.path.join(runs, name, "hf"))
    fused = {}
    for key, label in VARIANTS.items():
        path = os.path.join(runs, key, "fused")
        if os.path.isdir(path):
            fused[key] = load_fused(path)
            models[f"fused: {label}"] = fused[key]

    records = {}
    for name, model in models.items():
        losses = {d: domain_response_loss(model, tokenizer, texts[d]) for d in DOMAINS}
        em = exact_match(model, tokenizer, heldout["math"][:args.em_examples])
        records[name] = {"loss": losses, "average_loss": float(np.mean(list(losses.values()))),
                         "math_exact_match": em}
        print(name, records[name], flush=True)

    gates = {}
    for key, model in fused.items():
        gates[key] = {d: mean_gate_weights(model, tokenizer, texts[d]).tolist() for d in DOMAINS}

    speed = {}
    main_fused = fused.get("two-stage-balanced") or next(iter(fused.values()), None)
    if main_fused is not None:
        speed = measure_speed(main_fused, models["math specialist"], tokenizer,
                              texts["math"][0], new_tokens=args.new_tokens,
                              repeats=args.repeats)

    # targets
    targets = {}
    best = f"fused: {VARIANTS['two-stage-balanced']}"
    if best in records:
        avg = records[best]["average_loss"]
        others = {n: r["average_loss"] for n, r in records.items() if not n.startswith("fused")
                  and not n.startswith("base")}
        targets["fused average loss below every specialist and the generalist"] = all(
            avg < v for v in others.values())
        for d in DOMAINS:
            spec = records[f"{d} specialist"]["loss"][d]
            got = records[best]["loss"][d]
            targets[f"{d}: fused within 2% of the {d} specialist "
                    f"({(got / spec - 1) * 100:+.1f}%)"] = got <= spec * 1.02
        for d in DOMAINS:
            w = gates["two-stage-balanced"][d]
            targets[f"{d}: largest mean gate weight on the {d} specialist"] = (
                int(np.argmax(w)) == DOMAINS.index(d))
        direct = f"fused: {VARIANTS['direct']}"
        if direct in records:
            targets["two-stage + balanced average loss <= direct"] = (
                avg <= records[direct]["average_loss"])

    training = {name: _steps(os.path.join(runs, name), "config.yaml")
                for name in (*DOMAINS, "generalist")}
    fusion_runs = {key: _steps(os.path.join(runs, key), "fusion.yaml") for key in fused}
    record = {
        "meta": machine_info(), "seconds": time.perf_counter() - t0,
        "heldout_per_domain": {d: len(v) for d, v in heldout.items()},
        "math_exact_match_examples": min(args.em_examples, len(heldout["math"])),
        "models": records, "gate_weights": gates, "decode_speed": speed, "targets": targets,
        "training": {n: {"steps": c.get("run", {}).get("steps"),
                         "batch": c.get("data", {}).get("batch_size"),
                         "seq_len": c.get("data", {}).get("seq_len"),
                         "sources": c.get("data", {}).get("sources")}
                     for n, c in training.items()},
        "fusion_training": {k: {"stage1": c.get("stage1"), "stage2": c.get("stage2"),
                                "balanced": c.get("data", {}).get("balanced"),
                                "per_domain": c.get("data", {}).get("per_domain")}
                            for k, c in fusion_runs.items()},
    }
    write_json(args.out + ".json", record)
    write_text(args.out + ".md", render(record))
    print(f"wrote {args.out}.json / .md in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
