"""``cpmjax scaling passuntil`` and ``cpmjax scaling fit``.

    cpmjax scaling passuntil [--model DIR] --task NAME
        (--instances FILE.jsonl | --num-instances N [--seed S])
        [--required-passes R] [--max-samples M] [--batch-size B] [--temperature T]
        [--sampling-seed S] [--max-new-tokens K] [--greedy] --out FILE.json
    cpmjax scaling fit --results A.json B.json ... [--level dataset|instance] [--predict N]
        --out FIT.json [--figure FIT.png]

``passuntil`` samples every instance of a task until ``R`` passes (or ``M`` samples) and writes
the ``PassUntilResult`` JSON with the model's non-embedding parameter count, the task and where
the instances came from (``--greedy`` adds the greedy accuracy). ``fit`` reads such results of
models of different sizes (the same task and instances), fits the task scaling law
``PU = exp(-c N^-alpha)``, tests for accelerated emergence (four sizes or more), predicts the PU
at ``--predict`` and draws the figure. See docs/scaling.md.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np

from cpmjax.errors import FitError, InputError

__all__ = ["add_commands", "read_results", "run_fit", "run_passuntil"]


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("passuntil", help="PassUntil pass rates of one model on a task")
    p.add_argument("--model", default=None, help="HF checkpoint directory (default: bundled)")
    p.add_argument("--task", required=True, help="task name (cpmjax.scaling.TASKS)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--instances", help="instance .jsonl file or task directory")
    source.add_argument("--num-instances", type=int, help="generate N instances of the task")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated instances")
    p.add_argument("--split", default="test", help="split read from a task directory")
    p.add_argument("--required-passes", type=int, default=1)
    p.add_argument("--max-samples", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--sampling-seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the task's")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--greedy", action="store_true", help="also record the greedy accuracy")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="result JSON")
    p.set_defaults(func=run_passuntil)

    p = subparsers.add_parser("fit", help="task scaling law over PassUntil results")
    p.add_argument("--results", nargs="+", required=True,
                   help="passuntil result JSON files, one per model size")
    p.add_argument("--level", choices=["dataset", "instance"], default="dataset")
    p.add_argument("--predict", type=float, default=None,
                   help="non-embedding size N to predict the PU of")
    p.add_argument("--out", required=True, help="fit JSON")
    p.add_argument("--figure", default=None, help="figure (.png)")
    p.set_defaults(func=run_fit)


def _non_embedding_params(model: Any) -> int:
    """Parameters outside the token embedding and the LM head: the wind tunnel's count
    (``family.non_embedding_params``), or the same count made here from the model's
    ``nnx.Param`` leaves where that module is absent."""
    try:
        from cpmjax.scaling.family import non_embedding_params
    except ModuleNotFoundError as exc:
        if exc.name != "cpmjax.scaling.family":
            raise
    else:
        return int(non_embedding_params(model))
    import math

    from flax import nnx

    return sum(int(math.prod(var.shape))
               for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
               if not {"embed_tokens", "lm_head"} & {str(p) for p in path})


def run_passuntil(args: Any) -> int:
    from cpmjax.hf import from_pretrained
    from cpmjax.scaling.passuntil import greedy_accuracy, pass_until
    from cpmjax.scaling.tasks import get_task, load_instances
    from cpmjax.tokenizer import load_tokenizer
    from cpmjax.train import bundled_model_dir

    task = get_task(args.task)
    if args.instances is not None:
        instances = load_instances(args.instances, split=args.split)
        source = {"instances_file": os.path.abspath(args.instances)}
    else:
        if args.num_instances < 1:
            raise InputError(f"--num-instances must be >= 1, got {args.num_instances}")
        instances = task.generate(args.num_instances, args.seed)
        source = {"instances_generated": {"n": args.num_instances, "seed": args.seed}}
    if not instances:
        raise InputError(f"no instances in {args.instances}")
    path = args.model or bundled_model_dir()
    model = from_pretrained(path, dtype=args.dtype)
    tokenizer = load_tokenizer(path)
    started = time.perf_counter()
    result = pass_until(
        model, tokenizer, instances, check=task.check, required_passes=args.required_passes,
        max_samples=args.max_samples, batch_size=args.batch_size,
        temperature=args.temperature, seed=args.sampling_seed,
        max_new_tokens=args.max_new_tokens, confidence=args.confidence,
        progress=not args.no_progress)
    seconds = time.perf_counter() - started
    result.metadata.update({
        "model": os.path.abspath(path), "task": task.name, **source,
        "non_embedding_params": _non_embedding_params(model),
        "max_new_tokens": args.max_new_tokens or task.max_new_tokens,
        "seconds": seconds, "samples_per_second": result.total_samples / max(seconds, 1e-9),
    })
    if args.greedy:
        result.metadata["greedy_accuracy"] = greedy_accuracy(
            model, tokenizer, instances, task.check, batch_size=min(args.batch_size,
                                                                    len(instances)),
            max_new_tokens=args.max_new_tokens)
    result.save(args.out)
    greedy = result.metadata.get("greedy_accuracy")
    print(f"[passuntil] {task.name}: {len(instances)} instances, mean PU "
          f"{result.mean_estimate:.4g}, {result.total_samples} samples "
          f"({int(result.truncated.sum())} instances out of samples) in {seconds:.1f} s"
          + (f", greedy accuracy {greedy:.3f}" if greedy is not None else "")
          + f" -> {args.out}", file=sys.stderr)
    return 0


def read_results(paths: list[str]) -> list[Any]:
    """PassUntil results of several models, each with its ``non_embedding_params``, sorted by
    size. Typed errors name the file that is missing a count or disagrees on the task."""
    from cpmjax.scaling.passuntil import PassUntilResult

    results = [PassUntilResult.load(p) for p in paths]
    for path, result in zip(paths, results, strict=True):
        size = result.metadata.get("non_embedding_params")
        if not isinstance(size, (int, float)) or size <= 0:
            raise FitError(f"{path} records no positive non_embedding_params (got {size!r}); "
                           "write it with `cpmjax scaling passuntil`")
    tasks = {r.metadata.get("task") for r in results}
    if len(tasks) > 1:
        raise FitError(f"the results are of different tasks: {sorted(map(str, tasks))}")
    order = np.argsort([r.metadata["non_embedding_params"] for r in results], kind="stable")
    return [(paths[i], results[i]) for i in order]


def run_fit(args: Any) -> int:
    from cpmjax.report import write_json
    from cpmjax.scaling.task_fit import accelerated_emergence, fit_task_scaling

    pairs = read_results(args.results)
    sizes = np.array([r.metadata["non_embedding_params"] for _, r in pairs], np.float64)
    if args.level == "instance":
        ids = pairs[0][1].ids
        for path, result in pairs[1:]:
            if result.ids != ids:
                raise FitError(f"{path} holds other instances than {pairs[0][0]}: an "
                               "instance-level fit needs the same instances in every result")
        rates = np.stack([r.estimate for _, r in pairs])  # [sizes, instances]
    else:
        rates = np.array([r.mean_estimate for _, r in pairs])
    law = fit_task_scaling(sizes, rates, level=args.level)
    emergence = accelerated_emergence(sizes, rates) if len(pairs) >= 4 else None
    record: dict[str, Any] = {
        "kind": "task_scaling",
        "task": pairs[0][1].metadata.get("task"),
        "results": [os.path.abspath(p) for p, _ in pairs],
        "fit": law.to_json(),
        "emergence": emergence.to_json() if emergence else None,
    }
    if args.predict is not None:
        if not args.predict > 0:
            raise FitError(f"--predict must be a positive size, got {args.predict}")
        record["prediction"] = {"n_params": args.predict,
                                "pass_rate": float(law.predict(args.predict))}
        if law.level == "dataset":
            low, high = law.prediction_interval(args.predict)
            record["prediction"]["interval_95"] = [float(low), float(high)]
    if args.figure:
        from cpmjax.scaling.plots import plot_task_scaling

        record["figure"] = plot_task_scaling(
            law, args.figure, low=[r.low.mean() for _, r in pairs],
            high=[r.high.mean() for _, r in pairs], predict=args.predict,
            title=f"Task scaling law: {record['task']}")
    write_json(args.out, record)
    summary = (f"c={law.c:.4g}±{law.c_stderr:.2g}, alpha={law.alpha:.4g}±"
               f"{law.alpha_stderr:.2g}" if law.level == "dataset" else
               f"{np.size(law.c)} instance laws")
    print(f"[fit] {len(pairs)} sizes: {summary}, R²={law.r2:.4f}"
          + (f"; PU({args.predict:.3g}) = {record['prediction']['pass_rate']:.4g}"
             if args.predict is not None else "")
          + (f"; curvature {emergence.curvature:.3g}±{emergence.stderr:.2g}"
             f"{' (accelerated emergence)' if emergence.accelerated else ''}"
             if emergence else "") + f" -> {args.out}", file=sys.stderr)
    return 0
