"""``cpmjax scaling density`` and ``cpmjax scaling density-trend``.

    cpmjax scaling density --family RUNS --model DIR [--model DIR ...] --task NAME
        [--instances FILE] [--loss task|eval] [--tokens D] [--limit N] [--out FILE.json]
        [--figures DIR] [--cache FILE] [--bound] [--score-floor X] [--score-ceiling Y]
        [--params N|auto ...] [--count all|nonzero] [--joint-tokenization]
    cpmjax scaling density-trend --csv FILE [--breakpoint DATE] [--figure OUT.png]
        [--out FILE.json]

``density`` reads the reference family's index (``RUNS/family.json``, written by ``cpmjax
scaling family``), evaluates every finished decay branch's export on the task's test instances
(its loss: the conditional loss of the answers, ``--loss task``, or the held-out LM loss the
index records, ``--loss eval``; its score: greedy accuracy under the task's checker), fits the
loss law over (size, tokens) and the score law over (loss, score), then gives each ``--model``
its effective size ``N̂`` and density ``ρ = N̂ / N`` at ``--tokens`` (default: the family's
largest branch budget) with bootstrap intervals. ``density-trend`` fits ``ln ρ = A·t + B`` to a
table ``name,date,params,density``. See docs/densing.md.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from typing import Any

from cpmjax.errors import FitError, InputError, MissingPathError

__all__ = ["add_commands", "family_points", "parse_params", "read_density_table",
           "run_density", "run_density_trend"]


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "density", help="effective size and capacity density of models against the family")
    p.add_argument("--family", required=True, help="the reference family's directory (RUNS)")
    p.add_argument("--model", required=True, action="append",
                   help="HF checkpoint directory of a model to measure (repeatable)")
    p.add_argument("--name", action="append", default=None,
                   help="a label per --model (default: the directory's name)")
    p.add_argument("--params", action="append", default=None, metavar="N",
                   help="the measured model's size N, one per --model in order (repeatable); "
                        "'auto' = counted (see --count)")
    p.add_argument("--count", choices=["all", "nonzero"], default="all",
                   help="how an 'auto' N is counted: every non-embedding parameter (all) or "
                        "only the nonzero non-embedding weights (nonzero: pruned models, "
                        "quantized layers' logical weights)")
    p.add_argument("--task", required=True, help="task name (cpmjax.scaling.TASKS)")
    p.add_argument("--instances", default=None,
                   help="instance file or task directory (default: RUNS/tasks/TASK, test split)")
    p.add_argument("--split", default="test", help="split read from a task directory")
    p.add_argument("--limit", type=int, default=None, help="use the first N instances only")
    p.add_argument("--loss", choices=["task", "eval"], default="task",
                   help="the loss both laws use: the answers' conditional loss (task) or the "
                        "held-out LM loss on the family's held-out split (eval: the family's "
                        "recorded eval_loss; each measured model is scored on the same batches)")
    p.add_argument("--joint-tokenization", action="store_true",
                   help="--loss task: encode prompt + answer as one text and score the tokens "
                        "whose character span ends after the prompt (needs a fast tokenizer's "
                        "offsets) instead of encoding prompt and answer apart")
    p.add_argument("--score", choices=["greedy", "passuntil"], default="greedy",
                   help="the score: greedy accuracy, or PassUntil's mean pass-probability "
                        "estimate (finer for small models that rarely pass greedily)")
    p.add_argument("--max-samples", type=int, default=1000,
                   help="passuntil: samples per instance at most")
    p.add_argument("--required-passes", type=int, default=1,
                   help="passuntil: passes per instance before it stops sampling")
    p.add_argument("--score-range", type=float, nargs=2, default=(0.0, 1.0),
                   metavar=("LOW", "HIGH"),
                   help="the range the score cannot leave; the sigmoid is bounded to it "
                        "(default 0 1: accuracies and pass rates)")
    p.add_argument("--score-floor", type=float, default=None, metavar="X",
                   help="hold the sigmoid's floor d at X instead of fitting it (e.g. 0 for an "
                        "accuracy that starts at 0)")
    p.add_argument("--score-ceiling", type=float, default=None, metavar="Y",
                   help="hold the sigmoid's ceiling c + d at Y instead of fitting it (e.g. 1)")
    p.add_argument("--tokens", type=float, default=None,
                   help="training tokens D of the reference at which N̂ is read "
                        "(default: the family's largest branch budget)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--samples", type=int, default=4000, help="bootstrap draws")
    p.add_argument("--level", type=float, default=0.95, help="interval level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bound", action="store_true",
                   help="report N̂ = 0 or inf for a score beyond the laws' range instead of "
                        "failing")
    p.add_argument("--cache", default=None,
                   help="JSON file of (loss, score) per checkpoint and task, read and extended "
                        "(a rerun evaluates only what is new)")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    p.add_argument("--figures", default=None,
                   help="directory for loss_law.png, score_law.png and density.png")
    p.set_defaults(func=run_density)

    t = subparsers.add_parser("density-trend",
                              help="fit ln(density) = A·t + B to dated models (a CSV table)")
    t.add_argument("--csv", required=True, help="table with columns name,date,params,density")
    t.add_argument("--breakpoint", default=None,
                   help="a date (YYYY-MM-DD): also fit before and from it on, and compare")
    t.add_argument("--densest-per-date", action="store_true",
                   help="keep the densest model of each date instead of refusing a shared date")
    t.add_argument("--level", type=float, default=0.95)
    t.add_argument("--figure", default=None, help="write the trend figure here (PNG)")
    t.add_argument("--out", default=None, help="write the fit as JSON here")
    t.set_defaults(func=run_density_trend)


# --------------------------------------------------------------------------------------------
# density


def family_points(runs: list[Any], loss_kind: str) -> list[dict[str, Any]]:
    """One point per finished decay branch of ``family_runs(...)``: name, non-embedding
    parameters, tokens, export directory, and (``loss_kind="eval"``) the recorded held-out
    loss. Branches without an export (or, for ``eval``, without a loss) are left out."""
    points = []
    for run in runs:
        for branch in run.branches:
            if not branch.export_dir:
                continue
            if loss_kind == "eval" and branch.eval_loss is None:
                continue
            points.append({"name": f"{run.name}@{branch.tokens}", "export_dir": branch.export_dir,
                           "n_params": int(run.non_embedding_params),
                           "tokens": int(branch.tokens),
                           "loss": None if loss_kind == "task" else float(branch.eval_loss)})
    return points


def _read_cache(path: str | None) -> dict[str, Any]:
    if not path or not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as exc:
            raise InputError(f"--cache {path} is not JSON: {exc}") from exc


def _finite_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (strict JSON; in the output
    ``null`` means unbounded or undetermined)."""
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_json(path: str, data: Any) -> None:
    from cpmjax.report import write_json

    write_json(path, _finite_json(data))


def _write_cache(path: str | None, cache: dict[str, Any]) -> None:
    if path:
        _write_json(path, cache)


def _score(model: Any, tokenizer: Any, task: Any, instances: list[Any], args: Any
           ) -> tuple[float, float]:
    """``(score, its standard error)``: greedy accuracy with the binomial error, or PassUntil's
    mean estimate with the standard error of the mean over instances."""
    from cpmjax.scaling import passuntil

    n = len(instances)
    if args.score == "greedy":
        score = float(passuntil.greedy_accuracy(model, tokenizer, instances, task.check,
                                                batch_size=args.batch_size))
        return score, math.sqrt(max(score * (1 - score), 0.0) / n)
    result = passuntil.pass_until(model, tokenizer, instances, check=task.check,
                                  required_passes=args.required_passes,
                                  max_samples=args.max_samples, batch_size=args.batch_size,
                                  seed=args.seed, progress=False)
    estimates = [float(e) for e in result.estimate]
    mean = sum(estimates) / n
    spread = math.sqrt(sum((e - mean) ** 2 for e in estimates) / max(n - 1, 1) / n)
    return float(result.mean_estimate), spread


def _evaluate(directory: str, task: Any, instances: list[Any], args: Any, *,
              cache: dict[str, Any], instances_key: str, count_nonzero: bool = False,
              with_loss: bool = True) -> dict[str, Any]:
    """Non-embedding parameters (with ``count_nonzero``, the nonzero ones too:
    ``nonzero_params``), score (and its standard error) and, with ``--loss task``, the
    conditional loss of the checkpoint in ``directory``. The cache holds the score under
    (directory, task, instances, score kind) and the loss under (directory, task, instances),
    so a rerun with another ``--loss`` or ``--score`` computes only what it lacks. With
    ``--loss eval`` the loss is the held-out LM loss on the family's held-out split
    (``family_heldout_loss``, what the family's branches record), cached per family;
    ``with_loss=False`` skips the loss (the family's own points, whose loss the index holds)."""
    score_kind = args.score if args.score == "greedy" else (
        f"passuntil:{args.required_passes}:{args.max_samples}:{args.seed}")
    base = f"{os.path.abspath(directory)}|{task.name}|{instances_key}"
    score_key = f"{base}|{score_kind}"
    loss_key = f"{base}|conditional_loss" + ("|joint" if args.joint_tokenization else "")
    if args.loss == "eval":
        loss_key = f"{os.path.abspath(directory)}|heldout_loss|{os.path.abspath(args.family)}"
    need_nonzero = count_nonzero and "nonzero_params" not in cache.get(score_key, {})
    if score_key not in cache or (with_loss and loss_key not in cache) or need_nonzero:
        from cpmjax.hf import from_pretrained
        from cpmjax.scaling.densing import conditional_loss, nonzero_params
        from cpmjax.scaling.family import non_embedding_params
        from cpmjax.tokenizer import load_tokenizer

        if not os.path.isdir(directory):
            raise MissingPathError(f"checkpoint directory does not exist: {directory}")
        model = from_pretrained(directory)
        tokenizer = load_tokenizer(directory)
        if score_key not in cache:
            score, stderr = _score(model, tokenizer, task, instances, args)
            cache[score_key] = {"n_params": int(non_embedding_params(model)), "score": score,
                                "score_stderr": stderr, "instances": len(instances)}
            _write_cache(args.cache, cache)
        if count_nonzero and "nonzero_params" not in cache[score_key]:
            cache[score_key]["nonzero_params"] = int(nonzero_params(model))
            _write_cache(args.cache, cache)
        if with_loss and loss_key not in cache:
            if args.loss == "eval":
                from cpmjax.scaling.family import family_heldout_loss

                family_tok = load_tokenizer(os.path.join(args.family, "tokenizer"))
                if family_tok.get_vocab() != tokenizer.get_vocab():
                    # another tokenizer's ids: the family's held-out tokens mean nothing to it
                    print(f"note: {directory} has another tokenizer than the family; no "
                          "held-out loss (its density comes from its score alone)",
                          file=sys.stderr)
                    cache[loss_key] = {"loss": None, "reason": "other tokenizer"}
                    _write_cache(args.cache, cache)
                    return dict(cache[score_key])
                loss = family_heldout_loss(model, args.family)
            else:
                loss = conditional_loss(model, tokenizer, instances, batch_size=args.batch_size,
                                        joint=args.joint_tokenization)
            cache[loss_key] = {"loss": float(loss)}
            _write_cache(args.cache, cache)
    record = dict(cache[score_key])
    if with_loss and cache[loss_key]["loss"] is not None:
        record["loss"] = cache[loss_key]["loss"]
    return record


def _family_has_config(directory: str) -> bool:
    """Whether the family index records the family's config (``cpmjax scaling family`` writes
    it; the held-out split of ``--loss eval`` is rebuilt from it)."""
    from cpmjax.scaling.family import _read_index

    return "config" in _read_index(directory)


def _default_name(directory: str) -> str:
    """A model's label: its directory's name, with the two above it for an export named ``hf``
    (``wt-s2/decay-400`` for ``runs/wind-tunnel/wt-s2/decay-400/hf``)."""
    parts = os.path.normpath(os.path.abspath(directory)).split(os.sep)
    return "/".join(parts[-3:-1]) if parts[-1] == "hf" and len(parts) > 2 else parts[-1]


def _fmt_interval(interval: Any) -> str:
    if interval is None:
        return "[no interval]"
    lo, hi = interval
    return f"[{lo:.3g}, {'inf' if math.isinf(hi) else format(hi, '.3g')}]"


def run_density(args: Any) -> int:
    from cpmjax.scaling.densing import density, fit_loss_law, fit_score_law
    from cpmjax.scaling.family import family_runs
    from cpmjax.scaling.tasks import get_task, load_instances

    task = get_task(args.task)  # typed errors before any compute
    names = args.name or [_default_name(m) for m in args.model]
    if len(names) != len(args.model):
        raise InputError(f"{len(names)} --name for {len(args.model)} --model")
    for directory in args.model:
        if not os.path.isdir(directory):
            raise MissingPathError(f"--model directory does not exist: {directory}")
    if args.max_samples < args.required_passes or args.required_passes < 1:
        raise InputError(f"--required-passes {args.required_passes} / --max-samples "
                         f"{args.max_samples}: need 1 <= passes <= samples")
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit {args.limit}: must be positive")
    if args.tokens is not None and not args.tokens > 0:
        raise InputError(f"--tokens {args.tokens}: must be positive")
    _check_held_scores(args)
    given_params = parse_params(args.params, len(args.model))
    runs = family_runs(args.family)
    points = family_points(runs, args.loss)
    if not points:
        raise FitError(f"the family in {args.family} has no finished branch with an export"
                       + (" and an eval loss" if args.loss == "eval" else ""))
    source = args.instances or os.path.join(args.family, "tasks", args.task)
    instances = load_instances(source, args.split)[:args.limit]
    if not instances:
        raise InputError(f"no instances in {source}")
    instances_key = f"{os.path.abspath(source)}:{args.split}:{len(instances)}"
    cache = _read_cache(args.cache)
    need_loss = args.loss == "task"

    def evaluate(directory: str, count_nonzero: bool = False, with_loss: bool = True
                 ) -> dict[str, Any]:
        return _evaluate(directory, task, instances, args, cache=cache,
                         instances_key=instances_key, count_nonzero=count_nonzero,
                         with_loss=with_loss)

    for point in points:
        record = evaluate(point["export_dir"], with_loss=need_loss)
        point["score"] = record["score"]
        if need_loss:
            point["loss"] = record["loss"]
        print(f"family {point['name']}: N={point['n_params']:.4g} D={point['tokens']:.4g} "
              f"loss={point['loss']:.4f} score={point['score']:.4f}", file=sys.stderr)
    loss_law = fit_loss_law([p["n_params"] for p in points], [p["tokens"] for p in points],
                            [p["loss"] for p in points])
    score_law = fit_score_law([p["loss"] for p in points], [p["score"] for p in points],
                              score_range=tuple(args.score_range), floor=args.score_floor,
                              ceiling=args.score_ceiling)
    holdout = _holdout_largest(points)
    tokens = float(args.tokens or max(p["tokens"] for p in points))
    print(f"loss law: L = {loss_law.a:.4g}·N^-{loss_law.alpha:.4g} + {loss_law.b:.4g}·D^-"
          f"{loss_law.beta:.4g} (R² {loss_law.r2:.4f}, {loss_law.n_points} points)")
    warnings = _fit_warnings(loss_law, score_law)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if holdout is not None:
        print(f"loss law without the largest size predicts its losses within "
              f"{100 * holdout['max_relative_error']:.2f}% (N = {holdout['n_params']:.4g}, "
              f"{holdout['points']} points)")
    print(f"score law: S = {score_law.c:.4g} / (1 + exp(-({score_law.gamma:.4g})(L - "
          f"{score_law.l:.4g}))) + {score_law.d:.4g} (R² {score_law.r2:.4f}"
          + "".join(f", {k} held at {v:g}" for k, v in score_law.held.items()) + ")")

    measured_loss = need_loss or _family_has_config(args.family)
    if not measured_loss:
        print(f"note: {args.family}/family.json records no family config, so the measured "
              "models' held-out loss cannot be computed; only their score gives a density",
              file=sys.stderr)
    models = []
    for name, directory, given in zip(names, args.model, given_params, strict=True):
        record = evaluate(directory, count_nonzero=given is None and args.count == "nonzero",
                          with_loss=measured_loss)
        score, stderr = record["score"], record["score_stderr"]
        if given is not None:
            n, n_source = given, "given (--params)"
        elif args.count == "nonzero":
            n, n_source = record["nonzero_params"], "counted: nonzero non-embedding weights"
        else:
            n, n_source = record["n_params"], "counted: non-embedding parameters"
        estimate = density(score, n, loss_law, score_law, tokens, score_stderr=stderr,
                           level=args.level, samples=args.samples, seed=args.seed,
                           bound=args.bound)
        entry = {"name": name, "model": directory, "score_stderr": stderr,
                 **estimate.to_dict(), "n_params_source": n_source,
                 "non_embedding_params": record["n_params"]}
        models.append(entry)
        print(f"{name}: N = {n:.4g}, score = {score:.4f} ± {stderr:.4f}, "
              f"N̂ = {estimate.effective_params:.4g} "
              f"{_fmt_interval(estimate.effective_params_interval)}, "
              f"ρ = {estimate.density:.4g} {_fmt_interval(estimate.density_interval)} "
              f"({int(args.level * 100)}%, D = {tokens:.4g})")
        if "loss" in record:  # step 1 alone: the size the loss law gives the model's own loss
            from cpmjax.scaling.densing import loss_density

            alone = loss_density(record["loss"], n, loss_law, tokens, level=args.level,
                                 samples=args.samples, seed=args.seed)
            label = "conditional_loss" if args.loss == "task" else "heldout_loss"
            entry.update({label: record["loss"]},
                         loss_effective_params=_none_if_inf(alone.effective_params),
                         loss_density=_none_if_inf(alone.density),
                         loss_density_interval=_finite_json(alone.to_dict()["density_interval"]))
            print(f"{name}: {label.replace('_', ' ')} {record['loss']:.4f}, the loss law alone gives "
                  f"N̂ = {alone.effective_params:.4g} "
                  f"{_fmt_interval(alone.effective_params_interval)}, ρ = {alone.density:.4g} "
                  f"{_fmt_interval(alone.density_interval)}")

    result = {"family": args.family, "task": args.task, "instances": source,
              "n_instances": len(instances), "loss": args.loss, "n_tokens": tokens,
              "joint_tokenization": bool(args.joint_tokenization and need_loss),
              "score": args.score, "loss_law": loss_law.to_dict(),
              "score_law": score_law.to_dict(), "warnings": warnings,
              "holdout_largest": holdout,
              "points": points, "models": models}
    if args.out:
        _write_json(args.out, result)
        print(f"wrote {args.out}", file=sys.stderr)
    if args.figures:
        from cpmjax.scaling import density_plots

        os.makedirs(args.figures, exist_ok=True)
        density_plots.plot_loss_law([p["n_params"] for p in points],
                                    [p["tokens"] for p in points], [p["loss"] for p in points],
                                    loss_law, os.path.join(args.figures, "loss_law.png"))
        density_plots.plot_score_law(
            [p["loss"] for p in points], [p["score"] for p in points], score_law,
            os.path.join(args.figures, "score_law.png"),
            models={m["name"]: (m["loss"] if m["loss"] is not None else math.inf, m["score"])
                    for m in models})
        density_plots.plot_densities(
            [m["name"] for m in models],
            [math.inf if m["density"] is None else m["density"] for m in models],
            [None if m["density_interval"] is None else
             tuple(math.inf if v is None else v for v in m["density_interval"])
             for m in models],
            os.path.join(args.figures, "density.png"))
        print(f"wrote figures to {args.figures}", file=sys.stderr)
    return 0


def parse_params(values: list[str] | None, n_models: int) -> list[float | None]:
    """``--params`` values, one per ``--model`` (``None`` for ``auto``; all ``auto`` when
    absent). A count that differs from the models', a value that is not a number, or one that
    is not positive raises :class:`InputError` naming it."""
    if values is None:
        return [None] * n_models
    if len(values) != n_models:
        raise InputError(f"{len(values)} --params for {n_models} --model: give one per model, "
                         "in order ('auto' to count it)")
    out: list[float | None] = []
    for i, value in enumerate(values):
        if value.strip().lower() == "auto":
            out.append(None)
            continue
        try:
            n = float(value)
        except ValueError:
            raise InputError(f"--params {value!r} (model {i + 1}): not a number or 'auto'") \
                from None
        if not (math.isfinite(n) and n > 0):
            raise InputError(f"--params {value!r} (model {i + 1}): must be a positive number")
        out.append(n)
    return out


def _check_held_scores(args: Any) -> None:
    """``--score-floor`` / ``--score-ceiling`` against each other and ``--score-range``,
    before any checkpoint is evaluated."""
    low, high = args.score_range
    held = {"--score-floor": args.score_floor, "--score-ceiling": args.score_ceiling}
    for flag, value in held.items():
        if value is not None and not (math.isfinite(value) and low <= value <= high):
            raise FitError(f"{flag} {value:g} lies outside --score-range {low:g} {high:g}")
    if None not in held.values() and not args.score_floor < args.score_ceiling:
        raise FitError(f"--score-floor {args.score_floor:g} is not below --score-ceiling "
                       f"{args.score_ceiling:g}")


def _fit_warnings(loss_law: Any, score_law: Any, *, min_r2: float = 0.9) -> list[str]:
    """What makes the fitted laws unfit to carry a score to a size: a low R², parameters the
    data do not determine (infinite standard errors), a score that rises with the loss."""
    out = []
    for label, law in (("loss law", loss_law), ("score law", score_law)):
        if law.r2 < min_r2:
            out.append(f"{label} fits poorly (R² {law.r2:.3f} < {min_r2})")
        if not all(math.isfinite(v) for v in law.stderr.values()):
            out.append(f"{label}: the data do not determine every parameter (no standard "
                       "errors, no interval)")
    if score_law.gamma > 0:
        out.append("score law: the score rises with the loss (γ > 0); the family's scores do "
                   "not resolve the task (try --score passuntil or an easier task)")
    return out


def _holdout_largest(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The loss law fitted without the largest size, and how well it predicts that size's
    losses (the issue's target: within 2%). ``None`` when the other sizes cannot determine the
    law (fewer than 4 points, 2 sizes or 2 budgets)."""
    from cpmjax.scaling.densing import fit_loss_law

    largest = max(p["n_params"] for p in points)
    rest = [p for p in points if p["n_params"] != largest]
    held = [p for p in points if p["n_params"] == largest]
    try:
        law = fit_loss_law([p["n_params"] for p in rest], [p["tokens"] for p in rest],
                           [p["loss"] for p in rest])
    except FitError:
        return None
    errors = [abs(law.predict(p["n_params"], p["tokens"]) / p["loss"] - 1) for p in held]
    return {"n_params": largest, "points": len(held), "max_relative_error": max(errors),
            "relative_errors": errors, "law": law.to_dict()}


def _none_if_inf(value: float) -> float | None:
    return None if math.isinf(value) else value


# --------------------------------------------------------------------------------------------
# density-trend


def read_density_table(path: str, *, densest_per_date: bool = False) -> list[dict[str, Any]]:
    """Rows ``{name, date, params, density}`` of a CSV table, sorted by date; a missing column,
    a bad number or two models on one date (unless ``densest_per_date``: then the densest of
    them is kept) raise typed errors naming the row."""
    import datetime as dt

    if not os.path.isfile(path):
        raise MissingPathError(f"--csv file does not exist: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in ("name", "date", "params", "density") if c not in fields]
        if missing:
            raise InputError(f"{path}: missing column(s) {', '.join(missing)} (have "
                             f"{', '.join(fields) or 'none'})")
        rows = []
        for line, raw in enumerate(reader, 2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
            try:
                date = dt.date.fromisoformat(row["date"])
            except ValueError:
                raise InputError(f"{path}:{line}: date {row['date']!r} is not YYYY-MM-DD") \
                    from None
            try:
                params = float(row["params"]) if row["params"] else None
                rho = float(row["density"])
            except ValueError as exc:
                raise InputError(f"{path}:{line}: {exc}") from None
            rows.append({"name": row["name"], "date": date, "params": params, "density": rho,
                         "line": line})
    rows.sort(key=lambda r: (r["date"], -r["density"]))
    if densest_per_date:
        rows = [r for i, r in enumerate(rows) if i == 0 or rows[i - 1]["date"] != r["date"]]
    for prev, row in zip(rows, rows[1:], strict=False):
        if prev["date"] == row["date"]:
            raise FitError(f"{path}: {prev['name']} (line {prev['line']}) and {row['name']} "
                           f"(line {row['line']}) share the date {row['date']}: keep one per "
                           "date (the densest)")
    return rows


def run_density_trend(args: Any) -> int:
    from cpmjax.scaling.densing import fit_density_trend

    rows = read_density_table(args.csv, densest_per_date=args.densest_per_date)
    trend = fit_density_trend([r["date"] for r in rows], [r["density"] for r in rows],
                              breakpoint=args.breakpoint, level=args.level)

    def describe(label: str, fit: Any) -> str:
        lo, hi = fit.doubling_interval
        return (f"{label}: ln ρ = {fit.A:.5g}·t + {fit.B:.4g} (t in days from {fit.origin}), "
                f"R² {fit.r2:.3f}, {fit.n_points} models, doubling every "
                f"{fit.doubling_days:.1f} days [{lo:.1f}, {hi:.1f}]")

    print(describe("all", trend))
    if trend.pre is not None:
        print(describe(f"before {trend.breakpoint}", trend.pre))
        print(describe(f"from {trend.breakpoint}", trend.post))
        p = trend.slope_difference_p
        print(f"speed-up of A after the breakpoint: {trend.speedup:.3g}x"
              + ("" if p is None else f" (p = {p:.3g} that the slopes are equal)"))
    if args.out:
        _write_json(args.out, {"csv": args.csv, "trend": trend.to_dict(),
                              "models": [{k: (v.isoformat() if k == "date" else v)
                                          for k, v in r.items() if k != "line"}
                                         for r in rows]})
    if args.figure:
        from cpmjax.scaling.density_plots import plot_density_trend

        plot_density_trend([r["date"] for r in rows], [r["density"] for r in rows], trend,
                           args.figure, names=[r["name"] for r in rows])
        print(f"wrote {args.figure}", file=sys.stderr)
    return 0
