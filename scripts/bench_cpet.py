"""CPET on a locally trained task: per compression, the paper's ablation ladder, all through
``cpmjax train`` (one ``TrainConfig`` per arm; the recipe's ``compress:``, ``delta.inherit``,
``delta`` and ``distill:`` sections).

Task: domain adaptation of the bundled default model (``cpmjax-tiny``, trained on the Python
standard library and package METADATA files) to the source of the installed ``optax`` package
(JAX optimizer code: a library style the model never saw). Files are split train / held-out by
a hash of their path (``data.eval_fraction``); the metric is the mean next-token loss on the
first ``--eval-batches`` fixed batches of the held-out files (lower is better).

Arms (every trained arm: the same data order, seed, optimizer, step count and batch):

- ``base``: the uncompressed model, untrained (eval only);
- ``uncompressed+lora``: LoRA on the uncompressed model (the upper bound; its delta is the one
  inherited below);
- per compression ``C``: ``C`` (compressed, untrained, eval only), ``C+lora`` (vanilla LoRA),
  ``C+inherit`` (the uncompressed model's LoRA inherited, then trained), ``C+inherit+recovery``
  (plus the recovery bypass beside every decoder linear), ``C+cpet`` (plus hidden-state
  distillation against the frozen uncompressed model with its LoRA: full CPET).

Results are appended to the JSON after every arm (a stopped run resumes where it left off:
arms already in the JSON with the same settings are skipped) and the markdown is rewritten.

    nice -n 10 python scripts/bench_cpet.py [--steps 40] [--seq 128] [--batch 4] \
        [--compressions int8,int4,...] > runs/bench_cpet.log 2>&1 &
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from typing import Any

import optax

import cpmjax
from cpmjax.report import machine_info, markdown_table, write_json, write_text
from cpmjax.train import load_config, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: compression name -> the ``compress:`` section of cpmjax train
COMPRESSIONS: dict[str, dict[str, Any]] = {
    "int8": {"quantize": {"bits": 8, "group_size": None}},
    "int4": {"quantize": {"bits": 4, "group_size": None}},
    "unstructured50": {"prune": {"sparsity": 0.5, "pattern": "unstructured",
                                 "criterion": "wanda"}},
    "2:4": {"prune": {"sparsity": 0.5, "pattern": "2:4", "criterion": "wanda"}},
    "moefy": {"moefy": {"num_experts": 8, "top_k": 2}},
    "2:4+int8": {"prune": {"sparsity": 0.5, "pattern": "2:4", "criterion": "wanda"},
                 "quantize": {"bits": 8, "group_size": None}},
}
LADDER = ["", "+lora", "+inherit", "+inherit+recovery", "+cpet"]
#: a gap (nats) below this is not divided by: one seed per arm, and a ratio over a gap of
#: thousandths of a nat says nothing
GAP_FLOOR = 0.01


def base_tree(args: argparse.Namespace, out_dir: str) -> dict[str, Any]:
    model_dir = cpmjax.default_model_path()
    return {
        "model": {"init_from": model_dir, "dtype": "float32"},
        "data": {"sources": [os.path.dirname(optax.__file__)], "tokenizer": model_dir,
                 "eval_fraction": args.eval_fraction, "seq_len": args.seq,
                 "batch_size": args.batch, "cache_dir": os.path.join(args.work, "data")},
        "optim": {"lr": args.lr, "schedule": "wsd", "warmup_steps": max(1, args.steps // 10),
                  "decay_steps": max(1, args.steps // 5), "weight_decay": 0.0, "mup": False},
        "run": {"steps": args.steps, "out_dir": out_dir, "seed": args.seed, "log_every": 10,
                "eval_every": 0, "eval_batches": args.eval_batches, "checkpoint_every": 0,
                "keep_checkpoints": 1, "async_checkpointing": False, "loss_chunk": args.seq,
                "loss_remat": False, "progress": False, "tensorboard": False,
                "export_dtype": "float32", "export_dir": os.path.join(out_dir, "hf")},
    }


def arm_tree(args: argparse.Namespace, compression: str | None, rung: str, out_dir: str,
             inherit_dir: str) -> tuple[dict[str, Any], bool]:
    """The config tree of one arm and whether it trains."""
    tree = base_tree(args, out_dir)
    if compression:
        tree["compress"] = dict(COMPRESSIONS[compression], calibration_batches=2)
    lora = {"method": "lora", "hparams": {"r": args.rank}}
    if rung == "":  # eval only: one step at learning rate 0 of a LoRA (zero at init)
        tree["run"]["steps"] = 1
        tree["optim"].update(lr=0.0, schedule="constant", warmup_steps=0)
        tree["delta"] = lora
        return tree, False
    if rung == "+lora":
        tree["delta"] = lora
    else:
        tree["delta"] = {"inherit": inherit_dir}
        if rung in ("+inherit+recovery", "+cpet"):
            tree["delta"].update(method="recovery", targets=PROJECTIONS,
                                 hparams={"r": args.rank})
        if rung == "+cpet":
            tree["distill"] = {"teacher": "self-uncompressed", "teacher_delta": inherit_dir,
                               "hidden_weight": args.hidden_weight, "layers": "all"}
    return tree, True


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in ("steps", "seq", "batch", "lr", "rank", "seed",
                                          "eval_batches", "eval_fraction", "hidden_weight")}


def run_arm(name: str, tree: dict[str, Any], trains: bool, export: bool) -> dict[str, Any]:
    out_dir = tree["run"]["out_dir"]
    shutil.rmtree(out_dir, ignore_errors=True)
    config = load_config(None, tree)
    t0 = time.time()
    result = train(config, export=export)
    seconds = time.time() - t0
    print(f"[bench_cpet] {name}: eval loss {result.eval_loss:.4f} ({seconds:.0f} s)",
          file=sys.stderr, flush=True)
    return {"eval_loss": result.eval_loss, "steps": result.step if trains else 0,
            "first_loss": result.losses[0] if result.losses else None,
            "final_train_loss": result.final_loss, "tokens_seen": result.tokens_seen,
            "seconds": round(seconds, 1), "config": tree}


def gap_closed(base: float | None, vanilla: float | None, upper: float | None) -> float | None:
    """Share of the gap between vanilla LoRA (``vanilla``) and the uncompressed upper bound
    (``upper``) that an arm's loss ``base`` closes: 1 = reaches the upper bound."""
    if None in (base, vanilla, upper) or vanilla == upper:
        return None
    return (vanilla - base) / (vanilla - upper)


def report(results: dict[str, Any], args: argparse.Namespace, json_path: str, md_path: str
           ) -> None:
    runs = results["runs"]

    def loss(key: str) -> float | None:
        return runs.get(key, {}).get("eval_loss")

    upper = loss("uncompressed+lora")
    rows, summary = [], []
    for c in COMPRESSIONS:
        cells = [loss(c + r) for r in LADDER]
        if not any(x is not None for x in cells):
            continue
        vanilla, cpet = cells[1], cells[4]
        gap = None if vanilla is None or upper is None else vanilla - upper
        closed = gap_closed(cpet, vanilla, upper) if gap is not None and gap > GAP_FLOOR \
            else None
        rows.append([c, *cells, gap, closed])
        if vanilla is not None and cpet is not None:
            summary.append({"compression": c, "cpet_beats_vanilla": cpet < vanilla,
                            "gap_closed": closed})
    controls = {r: loss("uncompressed" + r) for r in ("+inherit", "+inherit+recovery")}
    results["summary"] = summary
    write_json(json_path, results)
    table = markdown_table(
        ["compression", "no tuning", "+ LoRA", "+ inherit", "+ inherit + recovery",
         "+ distill (CPET)", "gap: LoRA - upper", "gap closed by CPET"], rows,
        align="lrrrrrrr", float_format=".4f")
    s = results["settings"]
    text = f"""# CPET: tuning compressed models (held-out loss, lower is better)

Written by `scripts/bench_cpet.py` (numbers in [cpet.json](cpet.json)).

- **Task**: domain adaptation of the bundled `cpmjax-tiny` (trained on the Python standard
  library and package METADATA) to the installed `optax` package's Python source
  ({results['data']}). Metric: mean next-token loss on {s['eval_batches']} fixed batches of
  {s['batch']} x {s['seq']} tokens of the held-out files.
- **Every trained arm**: {s['steps']} steps of batch {s['batch']} x {s['seq']} tokens, AdamW lr
  {s['lr']} (WSD), seed {s['seed']}, the same data order; LoRA r={s['rank']} on q/v; recovery
  r={s['rank']} beside all seven projections; distillation weight λ={s['hidden_weight']} on
  every layer's output. One run per arm (one seed).
- **Upper bound**: base model untrained {_f(loss('base'))}; uncompressed + LoRA
  {_f(upper)}. Controls on the uncompressed model (the inherited arms train the LoRA twice as
  long in all): + inherit {_f(controls['+inherit'])}, + inherit + recovery
  {_f(controls['+inherit+recovery'])}. "gap" = compressed + vanilla LoRA minus the upper bound; "gap closed" = (vanilla
  LoRA - CPET) / that gap (1: CPET reaches the upper bound; above 1: it passes it), shown only
  when the gap exceeds {GAP_FLOOR} nats.

{table}

Compressions: int8 / int4 = weight-only per-channel (qwix, symmetric absmax); unstructured50 /
2:4 = Wanda pruning of every decoder linear at 50%; moefy = MoEfication with 8 experts, top-2
routed; 2:4+int8 = both. Embeddings and head stay float.
"""
    if results.get("notes"):
        text += "\n" + results["notes"] + "\n"
    write_text(md_path, text)


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.005)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--eval-fraction", type=float, default=0.1)
    ap.add_argument("--hidden-weight", type=float, default=0.5)
    ap.add_argument("--compressions", default=",".join(COMPRESSIONS))
    ap.add_argument("--work", default=os.path.join(ROOT, "runs", "bench_cpet"))
    ap.add_argument("--json", default=os.path.join(ROOT, "docs", "benchmarks", "cpet.json"))
    ap.add_argument("--md", default=os.path.join(ROOT, "docs", "benchmarks", "cpet.md"))
    ap.add_argument("--arms", default="",
                    help="comma-separated arm names to run (default: every arm of the plan)")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the markdown from the JSON without running anything")
    ap.add_argument("--notes", default=None,
                    help="with --report-only: a markdown file of findings kept in the JSON and "
                         "appended to the page")
    ap.add_argument("--merge", action="append", default=[],
                    help="with --report-only: add the runs of another JSON of the same settings")
    args = ap.parse_args()
    if args.report_only:
        import json

        with open(args.json) as f:
            results = json.load(f)
        for other in args.merge:
            with open(other) as f:
                extra = json.load(f)
            if extra["settings"] != results["settings"]:
                ap.error(f"{other} was measured with other settings")
            for name, run in extra["runs"].items():
                results["runs"].setdefault(name, run)
        if args.notes:
            with open(args.notes) as f:
                results["notes"] = f.read().strip()
        for k, v in results["settings"].items():
            setattr(args, k, v)
        report(results, args, args.json, args.md)
        return
    chosen = [c for c in args.compressions.split(",") if c]
    unknown = sorted(set(chosen) - set(COMPRESSIONS))
    if unknown:
        ap.error(f"unknown compressions {unknown}; choose from {list(COMPRESSIONS)}")

    import json

    results: dict[str, Any] = {}
    if os.path.isfile(args.json):
        with open(args.json) as f:
            results = json.load(f)
        if results.get("settings") != settings(args):
            results = {}
    results.setdefault("settings", settings(args))
    results.setdefault("meta", machine_info())
    results["data"] = (f"optax {optax.__version__}, {os.path.dirname(optax.__file__)}, "
                       f"*.py files; held-out fraction {args.eval_fraction} by path hash")
    results.setdefault("runs", {})
    inherit_dir = os.path.join(args.work, "uncompressed+lora", "hf", "delta")
    plan: list[tuple[str, str | None, str]] = [("base", None, ""),
                                               ("uncompressed+lora", None, "+lora")]
    plan += [(c + r, c, r) for c in chosen for r in LADDER]
    # controls: the same inherit / recovery rungs on the uncompressed model (the inherited
    # arms train the LoRA for twice the steps in all; these say what that alone is worth)
    plan += [("uncompressed" + r, None, r) for r in ("+inherit", "+inherit+recovery")]
    only = {a for a in args.arms.split(",") if a}
    for name, compression, rung in plan:
        if name in results["runs"] or (only and name not in only):
            continue
        if rung not in ("", "+lora") and not os.path.isdir(inherit_dir):
            raise SystemExit(f"the inherited delta {inherit_dir} is missing: delete "
                             f"'uncompressed+lora' from {args.json} to retrain it")
        out_dir = os.path.join(args.work, name.replace(":", "-"))
        tree, trains = arm_tree(args, compression, rung, out_dir, inherit_dir)
        results["runs"][name] = run_arm(name, tree, trains, export=name == "uncompressed+lora")
        report(results, args, args.json, args.md)
    report(results, args, args.json, args.md)


if __name__ == "__main__":
    main()
