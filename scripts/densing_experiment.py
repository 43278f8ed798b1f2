"""The Densing-Law recipe comparison: capacity density of models trained here with other recipes
at the family's compute, and of compressed family models, against the wind-tunnel family.

    # 1. recipe variants of one size (same steps as its final branch; cpmjax.scaling.recipes)
    cpmjax scaling family --config configs/wind-tunnel.yaml --only wt-s3 --variant cosine
    cpmjax scaling family --config configs/wind-tunnel.yaml --only wt-s3 --variant no-mup
    cpmjax scaling family --config configs/wind-tunnel.yaml --only wt-s3 --variant no-task-split \\
        --drop-task python_expr
    # 2. compressed copies of a family model (int8, int4, NF4, 2:4, 50% unstructured, 25% of
    #    the MLP neurons; no recovery training), exported as float HF checkpoints
    python scripts/densing_experiment.py compress --model runs/wind-tunnel/wt-s5/decay-1000/hf \\
        --out runs/densing/compressed
    # 3. density of every model (family, shorter budgets, variants, compressed) on one task
    python scripts/densing_experiment.py measure --family runs/wind-tunnel --task python_expr \\
        --compressed runs/densing/compressed --out runs/densing/python_expr.json
    # 4. the tables
    python scripts/densing_experiment.py report --results runs/densing/python_expr.json \\
        --out docs/benchmarks/densing.md

    # 5. models with another tokenizer (the default model): a loss law in nats per byte of text
    #    that neither side trained on, then their densities on it
    python scripts/densing_experiment.py bytes --family runs/wind-tunnel \
        --config configs/wind-tunnel.yaml --model cpmjax/assets/cpmjax-tiny \
        --model runs/cpmjax-tiny-continue/hf --out docs/benchmarks/densing_bytes.json

``measure`` runs ``cpmjax scaling density`` (the library's estimator and CLI) once with every
model, so every density uses the same fitted laws; the size N of a pruned model is its nonzero
non-embedding weights, of a quantized model its parameter count (its bits are listed apart).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

COMPRESSIONS = {
    # name: (what, function of the model)
    "int8": "weight-only int8, per output channel",
    "int4": "weight-only int4, per output channel",
    "nf4": "weight-only NF4, per output channel",
    "prune-2of4": "2:4 magnitude pruning of every decoder linear (50%)",
    "prune-50%": "unstructured magnitude pruning of every decoder linear (50%)",
    "neurons-25%": "structured: 25% of every MLP's neurons removed (magnitude)",
}


def _compress(args: argparse.Namespace) -> None:
    import cpmjax.compress as cc
    from cpmjax.hf import from_pretrained, save_pretrained
    from cpmjax.report import write_json
    from cpmjax.scaling import non_embedding_params, nonzero_params

    records = {}
    for name, what in COMPRESSIONS.items():
        out = os.path.join(args.out, name)
        model = from_pretrained(args.model, dtype="float32")
        bits = 32
        if name == "int8":
            cc.quantize(model, bits=8)
            bits = 8
        elif name == "int4":
            cc.quantize(model, bits=4)
            bits = 4
        elif name == "nf4":
            cc.quantize(model, bits="nf4")
            bits = 4
        elif name == "prune-2of4":
            cc.prune(model, 0.5, "2:4")
        elif name == "prune-50%":
            cc.prune(model, 0.5, "unstructured")
        else:
            cc.prune_neurons(model, 0.25)
        if bits < 32:
            cc.dequantize(model)
        nonzero, total = nonzero_params(model), non_embedding_params(model)
        save_pretrained(model, out)
        for f in os.listdir(args.model):  # the tokenizer files
            if f.startswith("tokenizer") or f in ("special_tokens_map.json", "vocab.json",
                                                  "merges.txt"):
                shutil.copy(os.path.join(args.model, f), out)
        records[name] = {"what": what, "dir": os.path.abspath(out), "source": args.model,
                         "weight_bits": bits, "non_embedding_params": total,
                         "nonzero_non_embedding_params": nonzero}
        print(f"[compress] {name}: {nonzero:,} of {total:,} non-embedding weights nonzero, "
              f"{bits}-bit -> {out}", file=sys.stderr, flush=True)
    write_json(os.path.join(args.out, "compressed.json"), records)


def _measure(args: argparse.Namespace) -> None:
    from cpmjax.cli import main as cpmjax_main
    from cpmjax.scaling import family_runs
    from cpmjax.scaling.recipes import variant_runs

    models: list[tuple[str, str, int | None, dict]] = []  # name, dir, params, info
    runs = family_runs(args.family)
    for run in runs:  # the reference models themselves: density 1 expected
        final = run.final
        models.append((f"{run.name} (reference)", final.export_dir, None,
                       {"group": "reference", "tokens": final.tokens}))
        for branch in run.branches[:-1]:  # fewer tokens than the reference budget
            models.append((f"{run.name}@{branch.tokens / 1e6:.2f}M", branch.export_dir, None,
                           {"group": "tokens", "tokens": branch.tokens}))
    variants_dir = os.path.join(args.family, "variants")
    if os.path.isfile(os.path.join(variants_dir, "variants.json")):
        for key, record in sorted(variant_runs(variants_dir).items()):
            models.append((key, record["export_dir"], None,
                           {"group": "recipe", "tokens": record["tokens"],
                            "variant": record["variant"], "drop_tasks": record["drop_tasks"]}))
    if args.compressed:
        with open(os.path.join(args.compressed, "compressed.json")) as f:
            for name, record in json.load(f).items():
                # a pruned model's size is what it keeps; a quantized one keeps every weight
                params = (record["non_embedding_params"] if record["weight_bits"] < 32
                          else record["nonzero_non_embedding_params"])
                source = os.path.basename(os.path.dirname(os.path.dirname(record["source"])))
                models.append((f"{source} {name}", record["dir"], params,
                               {"group": "compressed", "what": record["what"],
                                "weight_bits": record["weight_bits"]}))
    for extra in args.model or []:
        models.append((os.path.basename(os.path.normpath(extra)), extra, None,
                       {"group": "other"}))
    argv = ["scaling", "density", "--family", args.family, "--task", args.task,
            "--score", args.score, "--loss", args.loss, "--bound", "--out", args.out,
            "--cache", args.cache, "--seed", str(args.seed)]
    if args.limit:
        argv += ["--limit", str(args.limit)]
    if args.score == "passuntil":
        argv += ["--max-samples", str(args.max_samples), "--required-passes",
                 str(args.required_passes)]
    if args.figures:
        argv += ["--figures", args.figures]
    for name, directory, params, _ in models:
        argv += ["--model", directory, "--name", name, "--params",
                 "auto" if params is None else str(params)]
    code = cpmjax_main(argv)
    if code:
        raise SystemExit(code)
    with open(args.out) as f:
        result = json.load(f)
    info = {name: i for name, _, _, i in models}
    for entry in result["models"]:
        entry.update(info.get(entry["name"], {}))
    from cpmjax.report import write_json

    write_json(args.out, result)


def _unseen_by_both(family_config: str, default_config: str, max_total: int
                    ) -> list[tuple[str, str]]:
    """``(key, text)`` of standard-library files held out by the default model's config and
    outside the family corpus's training split: text no model of either side trained on."""
    from cpmjax.scaling import corpus_text_keys, load_family_config
    from cpmjax.train import load_config
    from cpmjax.train.data import collect_files, split_files

    trained = corpus_text_keys(load_family_config(family_config), training_only=True)
    default = load_config(default_config)
    _, held = split_files(collect_files(["stdlib"]), default.data.eval_fraction)
    out, total = [], 0
    for f in held:
        if f.key in trained:
            continue
        with open(f.path, encoding="utf-8") as fh:
            text = fh.read()
        if total + len(text.encode("utf-8")) > max_total:
            continue
        out.append((f.key, text))
        total += len(text.encode("utf-8"))
    if not out:
        raise SystemExit("no held-out text is unseen by both the family and the default model")
    return out


def _bytes(args: argparse.Namespace) -> None:
    from cpmjax.hf import from_pretrained
    from cpmjax.report import markdown_table, write_json
    from cpmjax.scaling import (
        family_runs,
        fit_loss_law,
        loss_density,
        non_embedding_params,
        text_loss_per_byte,
    )
    from cpmjax.tokenizer import load_tokenizer

    texts = _unseen_by_both(args.config, args.default_config, args.max_total_bytes)
    print(f"[bytes] {len(texts)} held-out files: {', '.join(k for k, _ in texts)}",
          file=sys.stderr)
    bodies = [t for _, t in texts]

    def score(directory: str) -> tuple[float, int, int, int]:
        model = from_pretrained(directory, dtype="float32")
        nats, n_bytes, tokens = text_loss_per_byte(model, load_tokenizer(directory), bodies,
                                                   max_bytes=args.piece_bytes)
        return nats, n_bytes, tokens, non_embedding_params(model)

    sizes = set(args.sizes.split(",")) if args.sizes else None
    family = []
    for run in family_runs(args.family):
        if sizes is not None and run.name not in sizes:
            continue
        for branch in run.branches:
            nats, n_bytes, tokens, n = score(branch.export_dir)
            family.append({"name": f"{run.name}@{branch.tokens}", "n_params": n,
                           "tokens": branch.tokens, "nats_per_byte": nats,
                           "eval_loss": branch.eval_loss})
            print(f"[bytes] {family[-1]['name']}: {nats:.4f} nats/byte", file=sys.stderr)
    law = fit_loss_law([r["n_params"] for r in family], [r["tokens"] for r in family],
                       [r["nats_per_byte"] for r in family])
    budget = max(r["tokens"] for r in family)
    rows, models = [], []
    references = [r for r in family if r["tokens"] == budget]
    for r in references:  # the reference models on their own law: density 1 expected
        est = loss_density(r["nats_per_byte"], r["n_params"], law, budget)
        rows.append([r["name"] + " (reference)", r["n_params"], budget, r["nats_per_byte"],
                     est.density, _interval(est.density_interval)])
    trained = list(args.model_tokens or [])
    if trained and len(trained) != len(args.model):
        raise SystemExit(f"--model-tokens: {len(trained)} values for {len(args.model)} models")
    for i, directory in enumerate(args.model):
        nats, n_bytes, tokens, n = score(directory)
        est = loss_density(nats, n, law, budget)
        entry = {"model": directory, "n_params": n, "nats_per_byte": nats,
                 "tokens_scored": tokens, "effective_params": est.effective_params,
                 "density": est.density, "density_interval": est.density_interval}
        own = None
        if trained:  # the law read at the model's own training tokens as well
            own = loss_density(nats, n, law, trained[i])
            entry.update(trained_tokens=trained[i], density_own_tokens=own.density,
                         density_own_tokens_interval=own.density_interval)
        models.append(entry)
        rows.append([directory, n, trained[i] if trained else "-", nats, est.density,
                     _interval(est.density_interval), own.density if own else None,
                     _interval(own.density_interval) if own else None])
    rows = [r if len(r) == 8 else [*r, None, None] for r in rows]
    table = markdown_table(["model", "N (non-emb.)", "tokens", "nats/byte",
                            f"ρ at D = {budget:,}", "95% interval", "ρ at its own D",
                            "95% interval"], rows, align="lrrrrrrr", float_format=".4g")
    print(f"loss law (nats/byte): L = {law.a:.4g}·N^-{law.alpha:.4g} + {law.b:.4g}·D^-"
          f"{law.beta:.4g}, R² {law.r2:.4f} over {len(family)} points\n\n{table}")
    write_json(args.out, {"files": [k for k, _ in texts], "bytes": n_bytes,
                          "piece_bytes": args.piece_bytes, "family": family,
                          "law": {"a": law.a, "alpha": law.alpha, "b": law.b,
                                  "beta": law.beta, "r2": law.r2},
                          "read_at_tokens": budget, "models": models, "table": table})


def _interval(value) -> str | None:
    return None if value is None else f"[{value[0]:.3g}, {value[1]:.3g}]"


def _cell(value, fmt=".3g"):
    return None if value is None else format(value, fmt)


def _report(args: argparse.Namespace) -> None:
    from cpmjax.report import markdown_table, write_text

    parts = []
    for path in args.results:
        with open(path) as f:
            r = json.load(f)
        law, score_law = r["loss_law"], r["score_law"]
        parts.append(f"### Task `{r['task']}` ({r['n_instances']} test instances, score: "
                     f"{r['score']}, loss: {r['loss']}, N̂ read at D = {r['n_tokens']:.4g} "
                     "tokens)\n")
        hold = r.get("holdout_largest") or {}
        parts.append(
            f"Loss law L = {law['a']:.4g}·N^-{law['alpha']:.4g} + {law['b']:.4g}·D^-"
            f"{law['beta']:.4g}, R² {law['r2']:.4f} over {law['n_points']} points; fitted "
            "without the largest size it predicts that size's losses within "
            f"{100 * hold['max_relative_error']:.2f}%." if hold else
            f"Loss law R² {law['r2']:.4f}.")
        parts.append(f"Score law S = {score_law['c']:.4g} / (1 + exp(-({score_law['gamma']:.4g})"
                     f"(L - {score_law['l']:.4g}))) + {score_law['d']:.4g}, R² "
                     f"{score_law['r2']:.4f}.\n")
        for warning in r.get("warnings", []):
            parts.append(f"- warning: {warning}")
        rows = []
        loss_key = "heldout_loss" if r["loss"] == "eval" else "conditional_loss"

        def span(interval):
            return None if interval is None else (
                f"[{_cell(interval[0])}, {_cell(interval[1]) or 'inf'}]")

        for m in r["models"]:
            rows.append([m["name"], m.get("group"), m["n_params"], m.get("tokens"),
                         _cell(m.get(loss_key), ".4f"), _cell(m.get("loss_density")),
                         span(m.get("loss_density_interval")),
                         _cell(m["score"], ".4f"), _cell(m.get("score_stderr"), ".4f"),
                         _cell(m.get("density")), span(m.get("density_interval"))])
        if args.figure:
            from cpmjax.scaling.density_plots import plot_densities

            shown = [m for m in r["models"] if m.get("loss_density") is not None]
            plot_densities([m["name"] for m in shown], [m["loss_density"] for m in shown],
                           [None if m.get("loss_density_interval") is None else
                            tuple(float("inf") if v is None else v
                                  for v in m["loss_density_interval"]) for m in shown],
                           args.figure)
            parts.append(f"![density from the loss law]({os.path.basename(args.figure)})\n")
        parts.append(markdown_table(
            ["model", "group", "N (non-emb.)", "tokens", loss_key.replace("_", " "),
             "ρ (loss law)", "95% interval", "score", "± s.e.", "ρ (two steps)",
             "95% interval"], rows))
        parts.append("")
    write_text(args.out, "\n".join(parts) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compress", help="compressed copies of a family model")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_compress)
    p = sub.add_parser("measure", help="density of every model against the family")
    p.add_argument("--family", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--compressed", default=None)
    p.add_argument("--model", action="append", default=None, help="another HF checkpoint")
    p.add_argument("--score", choices=["greedy", "passuntil"], default="greedy")
    p.add_argument("--loss", choices=["task", "eval"], default="task")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-samples", type=int, default=256)
    p.add_argument("--required-passes", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default="runs/densing/cache.json")
    p.add_argument("--figures", default=None)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_measure)
    p = sub.add_parser("bytes", help="densities of other-tokenizer models, in nats per byte")
    p.add_argument("--family", required=True)
    p.add_argument("--config", required=True, help="the family's config")
    p.add_argument("--default-config", default="configs/cpmjax-tiny.yaml")
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--sizes", default=None, help="family sizes of the law (default: all)")
    p.add_argument("--model-tokens", type=int, action="append", default=None,
                   help="training tokens of each --model, in order: N̂ is also read at them")
    p.add_argument("--piece-bytes", type=int, default=256)
    p.add_argument("--max-total-bytes", type=int, default=200_000)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_bytes)
    p = sub.add_parser("report", help="markdown tables of measure's JSON files")
    p.add_argument("--results", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--figure", default=None,
                   help="bar chart of the loss-law densities with their intervals (PNG)")
    p.set_defaults(func=_report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
