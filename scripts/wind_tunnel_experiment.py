"""The wind tunnel's experiment: PassUntil on the family, a task scaling law fitted on the
smaller models, the prediction for the largest written before it is trained, then the report.

    # 0. (optional) the evaluation-only code_recall task, cut from source files the family
    #    never saw (its text sources minus its corpus), written to <family>/tasks/code_recall
    python scripts/wind_tunnel_experiment.py text-task --config configs/wind-tunnel.yaml \\
        [--instances 200] [--seed 0]
    # 1. PassUntil and greedy accuracy of each size's final decay branch on each task's test split
    python scripts/wind_tunnel_experiment.py eval --family runs/wind-tunnel \\
        --sizes wt-s1,wt-s2,wt-s3,wt-s4 --out runs/wt-eval [--instances 100] [--max-samples M]
    # 2. fit on those sizes, predict the largest (its size from the family config): commit it
    python scripts/wind_tunnel_experiment.py predict --family runs/wind-tunnel \\
        --config configs/wind-tunnel.yaml --eval runs/wt-eval --sizes wt-s1,wt-s2,wt-s3,wt-s4 \\
        --target wt-s5 --out docs/benchmarks/wind_tunnel_prediction.json
    # 3. (train and evaluate the largest), then the report
    python scripts/wind_tunnel_experiment.py report --family runs/wind-tunnel --eval runs/wt-eval \\
        --prediction docs/benchmarks/wind_tunnel_prediction.json \\
        --out docs/benchmarks/passuntil.json      (the tables go to <eval>/tables.md)

The instances are the first ``--instances`` of each task's test split (``<family>/tasks``),
never trained on. Results are JSON files ``<eval>/<size>/<task>.json`` (``PassUntilResult``
with the greedy accuracy in its metadata); an existing file is not recomputed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import numpy as np


def _eval(args: argparse.Namespace) -> None:
    from cpmjax.hf import from_pretrained
    from cpmjax.scaling import (
        family_runs,
        get_task,
        greedy_accuracy,
        load_instances,
        non_embedding_params,
        pass_until,
    )
    from cpmjax.tokenizer import load_tokenizer

    runs = {r.name: r for r in family_runs(args.family)}
    tasks = args.tasks.split(",") if args.tasks else sorted(
        os.listdir(os.path.join(args.family, "tasks")))
    for name in args.sizes.split(","):
        run = runs[name]
        if run.export_dir is None:
            raise SystemExit(f"{name} has no finished decay branch in {args.family}")
        model = from_pretrained(run.export_dir, dtype="float32")
        tokenizer = load_tokenizer(run.export_dir)
        for task_name in tasks:
            out = os.path.join(args.out, name, f"{task_name}.json")
            if os.path.isfile(out):
                continue
            task = get_task(task_name)
            instances = load_instances(os.path.join(args.family, "tasks", task_name))
            instances = instances[:args.instances]
            t0 = time.perf_counter()
            result = pass_until(model, tokenizer, instances, check=task.check,
                                required_passes=args.required_passes,
                                max_samples=args.max_samples, batch_size=args.batch_size,
                                temperature=args.temperature, seed=args.seed,
                                progress=not args.no_progress)
            seconds = time.perf_counter() - t0
            greedy = greedy_accuracy(model, tokenizer, instances, task.check,
                                     batch_size=min(args.batch_size, len(instances)))
            result.metadata.update(
                model=os.path.abspath(run.export_dir), size=name, task=task_name,
                non_embedding_params=non_embedding_params(model), branch_tokens=run.final.tokens,
                greedy_accuracy=greedy, seconds=seconds,
                samples_per_second=result.total_samples / max(seconds, 1e-9))
            os.makedirs(os.path.dirname(out), exist_ok=True)
            result.save(out)
            print(f"[eval] {name} {task_name}: PU {result.mean_estimate:.4g} "
                  f"({result.total_samples} samples, {int(result.truncated.sum())} truncated, "
                  f"{seconds:.0f} s), greedy {greedy:.3f}", file=sys.stderr, flush=True)


def _text_task(args: argparse.Namespace) -> None:
    from cpmjax.scaling import load_family_config, make_text_task, unseen_text_files

    config = load_family_config(args.config)
    files = unseen_text_files(config)
    out = os.path.join(config.out_dir, "tasks")
    if os.path.isfile(os.path.join(out, args.task, "test.jsonl")) and not args.overwrite:
        raise SystemExit(f"{out}/{args.task} exists (--overwrite to write it again)")
    summary = make_text_task(out, [(f.key, f.path) for f in files], n_test=args.instances,
                             seed=args.seed, name=args.task)
    print(f"[text-task] {args.task}: {summary['test']} instances from "
          f"{len(summary['sources'])} of {summary['candidate_files']} unseen files -> "
          f"{out}/{args.task}", file=sys.stderr)


def _load_eval(directory: str, size: str, task: str):
    from cpmjax.scaling import PassUntilResult

    path = os.path.join(directory, size, f"{task}.json")
    return PassUntilResult.load(path) if os.path.isfile(path) else None


def _bootstrap_interval(estimates: np.ndarray, confidence: float = 0.95,
                        resamples: int = 2000, seed: int = 0) -> list[float]:
    """Percentile bootstrap interval of the dataset PU (the mean of the instances' estimates)
    over the instances: how much the dataset's PU depends on which instances were drawn."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, estimates.size, size=(resamples, estimates.size))
    means = estimates[picks].mean(axis=1)
    tail = (1 - confidence) / 2
    return [float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))]


def _interval_cell(interval: list[float] | None) -> str | None:
    return None if interval is None else f"[{interval[0]:.3g}, {interval[1]:.3g}]"


def _prediction_interval(law, n_target: float, confidence: float = 0.95) -> list[float] | None:
    """The fitted law's prediction interval at ``n_target`` (``TaskScaling.prediction_interval``:
    the spread of the points about the line, not only the coefficients' error); None for an
    instance-level law."""
    if law.level != "dataset":
        return None
    low, high = law.prediction_interval(n_target, confidence)
    return [float(low), float(high)]


def _predict(args: argparse.Namespace) -> None:
    from cpmjax.report import write_json
    from cpmjax.scaling import (
        fit_task_scaling,
        load_family_config,
        non_embedding_params,
    )

    config = load_family_config(args.config)
    target = config.size(args.target)
    n_target = non_embedding_params(config.model_fields_for(target))
    index = os.path.join(args.family, "family.json")
    with open(index) as f:
        trained = json.load(f)["runs"]
    target_trained = args.target in trained and any(
        b.get("done") for b in trained[args.target].get("branches", {}).values())
    if target_trained and not args.post_hoc:
        raise SystemExit(f"{args.target} already has a finished branch: a prediction must be "
                         "written before the model is trained (--post-hoc for an analysis "
                         "after the fact, marked as such)")
    sizes = args.sizes.split(",")
    tasks = sorted({f[:-5] for d in args.eval for s in sizes
                    if os.path.isdir(os.path.join(d, s)) for f in os.listdir(os.path.join(d, s))
                    if f.endswith(".json")})
    record = {"kind": "wind_tunnel_prediction", "post_hoc": bool(target_trained),
              "written_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "git_head": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                         text=True).stdout.strip(),
              "target": {"name": args.target, "non_embedding_params": n_target,
                         "layers": target.layers, "width": target.hidden},
              "fit_sizes": sizes, "tasks": {}}
    for task in tasks:
        # the first --eval directory holding this task for every size (the finer pass first)
        for directory in args.eval:
            results = [_load_eval(directory, s, task) for s in sizes]
            if all(r is not None for r in results):
                break
        else:
            continue
        n = np.array([r.metadata["non_embedding_params"] for r in results], np.float64)
        rates = np.array([r.mean_estimate for r in results])
        entry = {"eval_dir": directory, "required_passes": results[0].required_passes,
                 "max_samples": results[0].max_samples, "instances": len(results[0].ids),
                 "n_params": n.tolist(), "pass_rates": rates.tolist(),
                 "low": [float(r.low.mean()) for r in results],
                 "high": [float(r.high.mean()) for r in results],
                 "greedy_accuracy": [r.metadata.get("greedy_accuracy") for r in results]}
        # the law needs 0 < PU < 1: a size whose PU is 0 (no pass in its budget) is left out
        # of the fit, and named, when at least 3 sizes remain
        usable = (rates > 0) & (rates < 1)
        entry["fit_sizes"] = [s for s, ok in zip(sizes, usable, strict=True) if ok]
        entry["excluded_sizes"] = [s for s, ok in zip(sizes, usable, strict=True) if not ok]
        try:
            law = fit_task_scaling(n[usable], rates[usable])
            entry.update(fit=law.to_json(), predicted_pass_rate=float(law.predict(n_target)),
                         prediction_interval_95=_prediction_interval(law, n_target))
        except Exception as exc:  # a fit that cannot run is recorded, not hidden
            entry["fit_error"] = f"{type(exc).__name__}: {exc}"
        try:
            per_instance = np.stack([r.estimate for r in results])
            # the instance-level law needs 0 < PU < 1 at every size: instances that never
            # passed within the budget (estimate 0) at some size are left out, and counted
            keep = np.all((per_instance > 0) & (per_instance < 1), axis=0)
            if not keep.any():
                raise ValueError("no instance has 0 < PU < 1 at every size")
            law_i = fit_task_scaling(n, per_instance[:, keep], level="instance")
            entry["instance_level"] = {"r2": law_i.r2, "instances_used": int(keep.sum()),
                                       "instances_left_out": int((~keep).sum()),
                                       "predicted_pass_rate": float(law_i.predict(n_target))}
        except Exception as exc:
            entry["instance_level"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        record["tasks"][task] = entry
        print(f"[predict] {task}: PU {rates.round(5).tolist()} -> "
              f"{entry.get('predicted_pass_rate', entry.get('fit_error'))}", file=sys.stderr)
    write_json(args.out, record)


def _report(args: argparse.Namespace) -> None:
    from cpmjax.report import machine_info, markdown_table, write_json, write_text
    from cpmjax.scaling import family_runs
    from cpmjax.scaling.family import lr_sweep_results, sweep_summary

    runs = family_runs(args.family)
    with open(os.path.join(args.family, "family.json")) as f:
        index = json.load(f)
    family_rows = []
    for r in runs:
        stable = index["runs"][r.name].get("stable", {})
        for b in r.branches:
            family_rows.append([r.name, r.layers, r.width, r.non_embedding_params,
                                r.total_params, b.start_step, b.steps, b.tokens, b.train_loss,
                                b.eval_loss, round(b.wall_s), round(stable.get("wall_s", 0))])
    sweep = lr_sweep_results(args.family)
    summary = sweep_summary(sweep)
    sweep_lrs = sorted({lr for v in summary.values() for lr in v["rates"]})
    sweep_rows = []
    for name, by_lr in sweep.items():
        first = next(iter(by_lr.values()))
        rates = summary[name]["rates"]
        cells = [None if lr not in rates else (
            f"{rates[lr]['mean']:.3f}" + (f" ± {rates[lr]['std']:.3f}" if rates[lr]["std"]
                                          is not None else "")) for lr in sweep_lrs]
        seeds = max((r["n"] for r in rates.values()), default=0)
        sweep_rows.append([name, first["layers"], first["width"], seeds, *cells,
                           summary[name]["best_lr"]])
    sizes = [r.name for r in runs]
    pu_rows, results_json = [], {}
    for directory in args.eval:
        tasks = sorted({f[:-5] for s in sizes if os.path.isdir(os.path.join(directory, s))
                        for f in os.listdir(os.path.join(directory, s)) if f.endswith(".json")})
        for task in tasks:
            for s in sizes:
                res = _load_eval(directory, s, task)
                if res is None:
                    continue
                m = res.metadata
                pu_rows.append([task, s, m["non_embedding_params"], res.required_passes,
                                res.max_samples, len(res.ids), res.mean_estimate,
                                _interval_cell(_bootstrap_interval(res.estimate)),
                                _interval_cell([float(res.low.mean()), float(res.high.mean())]),
                                res.total_samples, int(res.truncated.sum()),
                                m.get("greedy_accuracy"),
                                round(m.get("samples_per_second", 0))])
                results_json.setdefault(directory, {}).setdefault(s, {})[task] = {
                    k: v for k, v in res.to_json().items() if k != "instances"}
    predictions, compare_rows = [], []
    for path in args.prediction or []:
        if not os.path.isfile(path):
            raise SystemExit(f"no prediction file at {path}")
        with open(path) as f:
            prediction = json.load(f)
        predictions.append(prediction)
        target = prediction["target"]["name"]
        for task, entry in prediction["tasks"].items():
            measured = _load_eval(entry["eval_dir"], target, task)
            pred = entry.get("predicted_pass_rate")
            meas = measured.mean_estimate if measured else None
            rel = abs(pred - meas) / meas if pred is not None and meas else None
            r2 = entry.get("fit", {}).get("r2")
            compare_rows.append([target, "+".join(s.removeprefix("wt-") for s in
                                                  entry.get("fit_sizes", [])),
                                 task, entry.get("required_passes"), r2, pred,
                                 _interval_cell(entry.get("prediction_interval_95")), meas,
                                 _interval_cell(_bootstrap_interval(measured.estimate))
                                 if measured else None, rel,
                                 (r2 is not None and r2 >= 0.9 and rel is not None
                                  and rel <= 0.25)])
    data = {"meta": machine_info(), "family": family_rows, "lr_sweep": sweep,
            "passuntil": results_json, "predictions": predictions,
            "predicted_vs_measured": compare_rows}
    write_json(args.out, data)
    parts = [
        "## The family (wind tunnel)\n",
        markdown_table(["size", "layers", "width", "non-emb params", "params", "branch from",
                        "steps", "tokens", "train loss", "held-out loss", "branch s",
                        "stable s"], family_rows, align="lrrrrrrrrrrr", float_format=".4g"),
        "\n## μP learning-rate sweep (held-out loss after the short run)\n",
        markdown_table(["size", "layers", "width", "seeds",
                        *[f"lr {lr:g}" for lr in sweep_lrs], "best lr (mean)"], sweep_rows,
                       align="lrrr" + "r" * len(sweep_lrs) + "r",
                       float_format=".4g") if sweep_rows else "(not run)",
        "\n## PassUntil and greedy accuracy per model and task\n",
        markdown_table(["task", "size", "non-emb params", "r", "max samples", "instances",
                        "PU", "PU 95% (bootstrap over instances)",
                        "mean of instance 95% bounds", "samples", "truncated",
                        "greedy acc", "samples/s"],
                       pu_rows, align="llrrrrrrrrrrr", float_format=".3g"),
        "\n## Predicted vs measured\n",
        markdown_table(["target", "fitted on", "task", "r", "fit R²", "predicted PU",
                        "95% prediction interval", "measured PU", "measured 95% (bootstrap)",
                        "relative error", "target met"], compare_rows,
                       align="lllrrrrrrrl", float_format=".3g")
        if compare_rows else "(not measured yet)",
    ]
    write_text(os.path.join(args.eval[0], "tables.md"), "\n".join(parts) + "\n")
    print("\n".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("text-task")
    p.add_argument("--config", required=True)
    p.add_argument("--task", default="code_recall")
    p.add_argument("--instances", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_text_task)
    p = sub.add_parser("eval")
    p.add_argument("--family", required=True)
    p.add_argument("--sizes", required=True)
    p.add_argument("--tasks", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--instances", type=int, default=100)
    p.add_argument("--required-passes", type=int, default=1)
    p.add_argument("--max-samples", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_eval)
    p = sub.add_parser("predict")
    p.add_argument("--family", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--eval", action="append", required=True,
                   help="result directory (repeatable: per task the first holding every size)")
    p.add_argument("--sizes", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--post-hoc", action="store_true",
                   help="allow a target that is already trained (the record says post_hoc)")
    p.set_defaults(func=_predict)
    p = sub.add_parser("report")
    p.add_argument("--family", required=True)
    p.add_argument("--eval", action="append", required=True)
    p.add_argument("--prediction", action="append", default=None,
                   help="a committed prediction file (repeatable)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
