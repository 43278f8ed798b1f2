"""The tool-learning experiment: held-out tasks solved by the tool model with tools (ReAct,
DFSDT at the same model-call budget) and without (no tools in the prompt), by a same-size model
trained on as many tokens without tool data, the parse-and-validate rate of the calls, and the
sandbox's overhead per call. Writes docs/benchmarks/tools.{md,json}.

    python scripts/bench_tools.py [--model DIR] [--baseline DIR] [--per-kind 40] [--budget 4]
        [--parts react,dfsdt,direct,baseline,sandbox] [--records FILE.jsonl]

Records go to --records as they are made; rerunning resumes from them.
"""

import argparse
import json
import os
import sys

import cpmjax
from cpmjax.report import machine_info, markdown_table, write_json, write_text
from cpmjax.tools.experiment import (
    held_out_tasks,
    run_experiment,
    sandbox_overhead,
    summarize,
    training_questions,
)
from cpmjax.tools.training import tool_format, tool_model_dir

KINDS = ("arithmetic", "convert", "lookup", "lookup_arith")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="the tool model (default: bundled)")
    p.add_argument("--config", default="configs/tool-model.yaml")
    p.add_argument("--baseline", default="runs/tools/baseline/hf")
    p.add_argument("--runs", default="runs/tools/tool-model,runs/tools/baseline",
                   help="training run dirs whose data_phases.json list the training data")
    p.add_argument("--questions-cache", default="runs/tools/train_questions.json")
    p.add_argument("--questions-only", action="store_true",
                   help="only collect the training questions into --questions-cache")
    p.add_argument("--per-kind", type=int, default=40)
    p.add_argument("--budget", type=int, default=4, help="model calls per task (both agents)")
    p.add_argument("--beam", type=int, default=2)
    p.add_argument("--temperature", type=float, default=0.7, help="dfsdt sampling")
    p.add_argument("--parts", default="react,dfsdt,direct,baseline,sandbox")
    p.add_argument("--records", default="runs/tools/bench_records.jsonl")
    p.add_argument("--sandbox-repeats", type=int, default=30)
    p.add_argument("--out", default="docs/benchmarks/tools")
    p.add_argument("--seed", type=int, default=99, help="held-out task seed")
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))

    if os.path.isfile(args.questions_cache):
        with open(args.questions_cache) as f:
            seen = set(json.load(f))
    else:
        phases = []
        for run_dir in args.runs.split(","):
            with open(os.path.join(run_dir, "data_phases.json")) as f:
                phases += json.load(f)
        seen = training_questions(phases)
        with open(args.questions_cache, "w") as f:
            json.dump(sorted(seen), f)
    if args.questions_only:
        print(f"{len(seen)} training questions in {args.questions_cache}")
        return 0
    tasks = held_out_tasks({k: args.per_kind for k in KINDS}, seed=args.seed, exclude=seen)
    model_dir = args.model or os.path.relpath(tool_model_dir())
    call_format = tool_format(model_dir)  # the prompts it was trained on
    models = {"tools": (cpmjax.from_pretrained(model_dir), cpmjax.load_tokenizer(model_dir))}
    plan = []
    if "react" in parts:
        plan.append(("tools", "react", KINDS))
    if "dfsdt" in parts:
        plan.append(("tools", "dfsdt", KINDS))
    if "direct" in parts:
        plan.append(("tools", "direct", ("arithmetic", "convert", "lookup")))
    if "baseline" in parts and os.path.isdir(args.baseline):
        models["baseline"] = (cpmjax.from_pretrained(args.baseline),
                              cpmjax.load_tokenizer(args.baseline))
        plan.append(("baseline", "direct", ("arithmetic", "convert", "lookup")))
    os.makedirs(os.path.dirname(args.records) or ".", exist_ok=True)
    records = run_experiment(models, tasks, plan, path=args.records, budget=args.budget,
                             beam=args.beam, temperature=args.temperature, format=call_format)
    overhead = sandbox_overhead(args.sandbox_repeats) if "sandbox" in parts else None
    rows = summarize(records)
    data = {"meta": machine_info(), "model": model_dir, "baseline": args.baseline,
            "format": call_format,
            "tasks_per_kind": args.per_kind, "budget": args.budget, "beam": args.beam,
            "dfsdt_temperature": args.temperature, "held_out_seed": args.seed,
            "summary": rows, "sandbox_seconds": overhead,
            "records": [r.to_dict() for r in records]}
    write_json(args.out + ".json", data)

    conditions = sorted({r["condition"] for r in rows})
    success = {(r["condition"], r["kind"]): r for r in rows}
    table = markdown_table(
        ["kind"] + conditions,
        [[kind] + [None if (c, kind) not in success else
                   f"{100 * success[(c, kind)]['success']:.0f}% ({success[(c, kind)]['tasks']})"
                   for c in conditions] for kind in (*KINDS, "all")],
        align="l" + "r" * len(conditions))
    def share(value):
        return None if value is None else f"{100 * value:.1f}%"

    calls = markdown_table(
        ["condition", "kind", "calls emitted", "parse + validate", "first call: right tool",
         "first call: exact", "model calls / task", "s / task"],
        [[r["condition"], r["kind"], r["calls"], share(r["valid_rate"]), share(r["right_tool"]),
          share(r["exact_call"]), f"{r['model_calls']:.2f}", f"{r['seconds']:.2f}"]
         for r in rows if r["condition"].startswith("tools/") and r["calls"]],
        align="llrrrrrr")
    def rate(condition: str, kind: str) -> float | None:
        row = success.get((condition, kind))
        return None if row is None else row["success"]

    def pct(value: float | None) -> str:
        return "not measured" if value is None else f"{100 * value:.0f}%"

    targets = []
    valid = [r for r in rows if r["kind"] == "all" and r["valid_rate"] is not None]
    if valid:
        worst = min(r["valid_rate"] for r in valid)
        targets.append(f"- Calls that parse and validate >= 90%: lowest "
                       f"{100 * worst:.1f}% -> {'met' if worst >= 0.9 else 'missed'}.")
    with_tools, without = rate("tools/react", "arithmetic"), rate("tools/direct", "arithmetic")
    if with_tools is not None and without is not None:
        gap = 100 * (with_tools - without)
        targets.append(f"- With tools >= 30 points over without, arithmetic: ReAct "
                       f"{pct(with_tools)} vs direct {pct(without)} = {gap:+.0f} points -> "
                       f"{'met' if gap >= 30 else 'missed'}.")
    react_all, dfsdt_all = rate("tools/react", "all"), rate("tools/dfsdt", "all")
    if react_all is not None and dfsdt_all is not None:
        verdict = "met" if dfsdt_all >= react_all else "missed"
        if dfsdt_all == react_all == 0:
            verdict = "not shown: both solve nothing, the comparison is empty"
        targets.append(f"- DFSDT >= ReAct at a budget of {args.budget} model calls: DFSDT "
                       f"{pct(dfsdt_all)} vs ReAct {pct(react_all)} -> {verdict}.")
    text = ["# Tool learning: the tool model on held-out tasks", "",
            f"Generated by `scripts/bench_tools.py` (numbers and every task's record in "
            f"`tools.json`). Model: `{model_dir}`; baseline: `{args.baseline}`. "
            f"{args.per_kind} held-out tasks per kind (seed {args.seed}; no question of either "
            f"model's training set), every agent limited to {args.budget} model calls "
            f"(ReAct greedy; DFSDT beam {args.beam}, depth 4, temperature "
            f"{args.temperature}); a task succeeds when the answer states the expected value "
            "(the last number equal to it, or the expected text in it). `tools/*`: the tool "
            "model with tools (react, dfsdt) and with no tools in the prompt (direct); "
            "`baseline/direct`: the same-size model trained without tool data (its "
            "training tokens: see docs/tools.md). The tool model's agents prompt "
            f"in the `{call_format}` format it was trained with.", "", "Targets:", "", *targets, "",
            "Success (tasks in parentheses):", "", table, "",
            "Calls the model emitted (an unparseable call block counts as one call; the first "
            "call compared with the expert's first call for the task):", "",
            calls, ""]
    if overhead:
        text += ["Sandbox overhead per call (median seconds of a trivial `add` tool):", "",
                 markdown_table(["path", "median ms", "vs in process"],
                                [[k, f"{1000 * v:.3f}", f"{v / overhead['in_process']:.0f}x"]
                                 for k, v in overhead.items()], align="lrr"), ""]
    write_text(args.out + ".md", "\n".join(text))
    print("\n".join(text))
    print(json.dumps({"records": len(records)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
