"""APB quality study: how far APB and Star Attention move a model's predictions from full attention.

Two parts, both on 8 simulated CPU devices (the hosts of APB / Star; full attention runs on one
device):

``kl``  Real long inputs: the Python standard-library files that ``cpmjax train`` holds out of the
        bundled cpmjax-tiny model's training set (2% by a hash of the path; ``--split eval``),
        concatenated in path order, tokenized with the bundled tokenizer and cut into
        non-overlapping windows of ``L`` tokens (``<s>`` first). The last ``query_len`` tokens
        of a window are APB's query (embedded in the anchor at offset 1). For every position
        after host 0's block (where the methods differ) and every query position: the mean
        per-token KL(full || method) of the next-token distributions, the next-token accuracy and
        loss of each method, and top-1 agreement with full attention.
``kv``  Synthetic key-value retrieval (``scripts/make_kv_retrieval.py``) with a small MiniCPM
        trained for it by ``cpmjax train --config configs/kv-retrieval.yaml``: exact match of the
        greedy value tokens after ``? key``, through ``cpmjax.generate(..., prefill=...)`` with
        ``"local"`` (full attention), ``"apb"`` and ``"star"``; counts with Wilson 95%
        intervals, and accuracy split by whether the needle sits on host 0 or a later host.

Methods: ``apb-query`` (training-free query-aware scorer), ``apb-retaining`` (retaining heads
from ``scripts/train_retaining_head.py``, when ``--heads`` is given), ``star`` (anchor = the
first block, nothing passed), and in ``kl`` an ``exact-limit`` row (APB with ``anchor_len=0`` and
``passing_len=block_len``, which equals full attention: a check of the harness itself).

Usage::

    python scripts/apb_quality.py corpus --split train --out runs/apb_quality/stdlib_train.txt
    python scripts/apb_quality.py run [--parts kl,kv] [--heads runs/apb_quality/heads.npz]
    # writes docs/benchmarks/apb_quality.json and prints the tables
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from cpmjax.errors import ShardingError  # noqa: E402
from cpmjax.evals.apb_quality import (  # noqa: E402
    HOSTS,
    distributed_hidden,
    full_hidden,
    layout_for,
    logit_stats,
    paired_delta,
    sequence_mesh,
    uniform_scores,
    wilson_interval,
)
from cpmjax.report import markdown_table, write_json  # noqa: E402

# ----------------------------------------------------------------------------- data


def stdlib_text(split: str = "eval") -> tuple[str, list[str]]:
    """The stdlib ``*.py`` files of ``cpmjax train``'s ``split`` (``"eval"``: held out of the
    bundled model's training; ``"train"``), concatenated in path order. Returns (text, keys)."""
    from cpmjax.train.data import collect_files, split_files

    train, held = split_files(collect_files(["stdlib"]), 0.02)
    files = held if split == "eval" else train
    parts = []
    for f in files:
        with open(f.path, encoding="utf-8", errors="replace") as fh:
            parts.append(fh.read())
    return "\n".join(parts), [f.key for f in files]


def mesh_of(hosts: int = HOSTS) -> Mesh:
    try:
        return sequence_mesh(hosts)
    except ShardingError as error:
        raise SystemExit(str(error)) from error


# ----------------------------------------------------------------------------- part (a): KL


def run_kl(args, report: dict) -> None:
    import cpmjax
    from sharding.apb import RetainingHeads

    model_dir = args.model or cpmjax.default_model_path()
    model = cpmjax.from_pretrained(model_dir, dtype=jnp.float32)
    tokenizer = cpmjax.load_tokenizer(model_dir)
    text, keys = stdlib_text("eval")
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
    bos = tokenizer.bos_token_id
    head = model.head_weight().astype(jnp.float32)
    mesh = mesh_of()
    graphdef, state = nnx.split(model)
    methods = ["apb-query", "star"]
    heads = None
    if args.heads:
        heads = RetainingHeads.load(args.heads)
        methods.insert(1, "apb-retaining")
    out = {"source": "Python stdlib files held out of cpmjax-tiny's training "
                     "(cpmjax.train.data.split_files(eval_fraction=0.02)), concatenated in "
                     "path order", "files": keys, "stream_tokens": int(ids.size),
           "model": os.path.relpath(model_dir, ROOT), "hosts": HOSTS,
           "query_len": args.query_len, "query_offset": 1, "rows": []}
    print(f"[kl] {len(keys)} held-out stdlib files, {ids.size} tokens; model {model_dir}")

    @jax.jit
    def full_fn(state, tokens):
        return full_hidden(nnx.merge(graphdef, state), tokens)

    compiled: dict[Any, Any] = {}
    for length in args.lengths:
        win = length - 1  # <s> + win tokens = the input, + 1 token as the last target
        count = min(args.samples, (ids.size - 1) // win)
        inputs = np.stack([np.concatenate([[bos], ids[i * win:(i + 1) * win]])
                           for i in range(count)]).astype(np.int32)
        targets = np.stack([ids[i * win:(i + 1) * win + 1] for i in range(count)])
        row_methods = methods + (["exact-limit"] if length == min(args.lengths) else [])
        per_method: dict[str, dict[str, list[np.ndarray]]] = {m: {} for m in row_methods}
        layout_info = {}
        t0 = time.time()
        for i in range(count):
            tok = jnp.asarray(inputs[i : i + 1])
            ref = full_fn(state, tok)[0]
            for m in row_methods:
                layout = layout_for(m, length, query_len=args.query_len)
                layout_info[m] = dict(block_len=layout.block_len, anchor_len=layout.anchor_len,
                                      passing_len=layout.passing_len)
                scorer = {"apb-query": "query", "apb-retaining": heads,
                          "exact-limit": uniform_scores}.get(m, "query")
                key = (m, length)
                if key not in compiled:
                    def fn(state, tokens, layout=layout, scorer=scorer):
                        return distributed_hidden(nnx.merge(graphdef, state), tokens,
                                                  mesh=mesh, layout=layout, scorer=scorer)
                    compiled[key] = jax.jit(fn)
                hid = compiled[key](state, tok)[0]
                st = logit_stats(head, ref, hid, jnp.asarray(targets[i]))
                for k, v in st.items():
                    per_method[m].setdefault(k, []).append(v)
            print(f"[kl] L={length} window {i + 1}/{count} ({time.time() - t0:.0f}s)", flush=True)
        blk = layout_for("star", length, query_len=args.query_len).block_len
        c = length - args.query_len
        regions = {"context after host 0": slice(blk, c), "query": slice(c, length)}
        for m in row_methods:
            cat = {k: np.stack(v) for k, v in per_method[m].items()}  # [windows, seq]
            for region, sl in regions.items():
                sub = {k: v[:, sl] for k, v in cat.items()}
                kl = sub["kl"].mean(axis=1)  # per window
                row = dict(
                    length=length, method=m, region=region, windows=count,
                    query_len=args.query_len,
                    tokens=int(sub["kl"].size), **layout_info[m],
                    kl_mean=float(sub["kl"].mean()),
                    kl_window_std=float(kl.std(ddof=1)) if count > 1 else 0.0,
                    kl_p90=float(np.quantile(sub["kl"], 0.9)),
                    top1_agreement=float(sub["agree"].mean()),
                    accuracy=float(sub["correct"].mean()),
                    full_accuracy=float(sub["ref_correct"].mean()),
                    nll=float(sub["nll"].mean()), full_nll=float(sub["ref_nll"].mean()),
                )
                out["rows"].append(row)
    previous = report.get("kl", {})
    if previous.get("model") == out["model"]:  # keep rows of lengths not re-run
        kept = [r for r in previous.get("rows", []) if r["length"] not in args.lengths]
        out["rows"] = sorted(kept + out["rows"], key=lambda r: r["length"])
    report["kl"] = out
    _print_kl(out)


def _print_kl(out: dict) -> None:
    print("\n### (a) KL(full || method) on held-out stdlib source, 8 hosts\n")
    print(markdown_table(
        ["L", "query", "method", "region", "block / anchor / passing", "tokens",
         "mean KL (nats)", "top-1 agree", "acc (full)", "acc (method)", "NLL (full)",
         "NLL (method)"],
        [[r["length"], r.get("query_len", 16), r["method"], r["region"],
          f"{r['block_len']} / {r['anchor_len']} / {r['passing_len']}", r["tokens"],
          f"{r['kl_mean']:.4f}", f"{r['top1_agreement']:.3f}", f"{r['full_accuracy']:.3f}",
          f"{r['accuracy']:.3f}", f"{r['full_nll']:.3f}", f"{r['nll']:.3f}"]
         for r in out["rows"]],
        align="rrlllrrrrrrr"))


# ----------------------------------------------------------------------------- part (b): KV


def kv_layout(prefill: str, seq: int, opts: dict[str, Any]):
    """The layout ``generate(prefill=..., prefill_options=opts)`` lays a ``seq``-token prompt
    out with on the study's hosts."""
    from sharding.apb import make_method_layout

    keys = ("anchor_len", "passing_len", "query_len", "query_offset")
    return make_method_layout(prefill, seq, hosts=HOSTS, **{k: opts[k] for k in keys if k in opts})


def run_kv(args, report: dict) -> None:
    import cpmjax
    from cpmjax.evals.kv_retrieval import KVSpec, eval_example, straddling_pairs
    from sharding.apb import RetainingHeads

    model = cpmjax.from_pretrained(args.kv_model, dtype=jnp.float32)
    spec = KVSpec(args.num_keys, args.num_values, args.value_len)
    mesh = mesh_of()
    methods = {"full": ("local", {}),
               "apb-query": ("apb", {"query_len": 2, "query_offset": 1, "scorer": "query"}),
               "star": ("star", {"query_len": 2})}
    if args.kv_heads:
        methods["apb-retaining"] = ("apb", {"query_len": 2, "query_offset": 1,
                                            "scorer": RetainingHeads.load(args.kv_heads)})
    rng = np.random.default_rng(args.seed)
    out = {"model": os.path.relpath(args.kv_model, ROOT), "hosts": HOSTS, "rows": [],
           "spec": dict(num_keys=spec.num_keys, num_values=spec.num_values,
                        value_len=spec.value_len)}
    for pairs, placement in itertools.product(args.kv_pairs, args.kv_needle):
        seq = 1 + pairs * spec.pair_len + 2
        blk = kv_layout("star", seq, {"query_len": 2}).block_len
        straddling = straddling_pairs(spec, pairs, blk)
        if placement == "boundary":
            if straddling.size == 0:
                raise SystemExit(f"no pair of {pairs} straddles a block of {blk} tokens")
            examples = [eval_example(rng, spec, pairs, needle_pair=int(rng.choice(straddling)))
                        for _ in range(args.kv_samples)]
        else:
            examples = [eval_example(rng, spec, pairs) for _ in range(args.kv_samples)]
        needle_host = np.array([ex.needle // blk for ex in examples])
        straddle = np.isin([(ex.needle - 1) // spec.pair_len for ex in examples], straddling)
        answers = np.stack([ex.answer for ex in examples])
        prompts = np.stack([ex.ids for ex in examples])
        results: dict[str, np.ndarray] = {}
        apb_anchor = kv_layout("apb", seq, methods["apb-query"][1]).anchor_len
        # Star with APB's short anchor: separates "a short anchor" from "the query in the anchor"
        short = {"star-short-anchor": ("star", {"query_len": 2, "anchor_len": apb_anchor})}
        # APB with longer passing blocks (a fraction of the block): how much of the gap to full
        # attention is compression; passing the whole block leaves only the embedded query
        wider = {f"apb-query-pass{f:g}": ("apb", {"query_len": 2, "query_offset": 1,
                                                  "scorer": "query",
                                                  "passing_len": round(blk * f)})
                 for f in args.kv_passing}
        for name, (prefill, opts) in {**methods, **short, **wider}.items():
            hits = []
            t0 = time.time()
            for s in range(0, len(examples), args.kv_batch):
                res = cpmjax.generate(model, prompts[s:s + args.kv_batch], spec.value_len,
                                      prefill=prefill, mesh=None if prefill == "local" else mesh,
                                      prefill_options=opts or None)
                got = np.asarray(res.tokens)[:, :spec.value_len]
                hits.append(np.all(got == answers[s:s + args.kv_batch], axis=1))
            hit = np.concatenate(hits)
            results[name] = hit
            lay = None if prefill == "local" else kv_layout(prefill, seq, opts)
            row = dict(pairs=pairs, seq=int(seq), placement=placement, method=name,
                       n=int(hit.size),
                       correct=int(hit.sum()), accuracy=float(hit.mean()),
                       ci95=wilson_interval(int(hit.sum()), int(hit.size)),
                       host0_correct=int(hit[needle_host == 0].sum()),
                       host0_n=int((needle_host == 0).sum()),
                       later_correct=int(hit[needle_host > 0].sum()),
                       later_n=int((needle_host > 0).sum()),
                       straddle_correct=int(hit[straddle].sum()),
                       straddle_n=int(straddle.sum()),
                       block_len=blk, anchor_len=None if lay is None else lay.anchor_len,
                       passing_len=None if lay is None else lay.passing_len,
                       seconds=time.time() - t0)
            if name != "full":
                row["delta_vs_full"], row["delta_ci95"] = paired_delta(hit, results["full"])
            out["rows"].append(row)
            print(f"[kv] pairs={pairs} {placement} {name}: {row['correct']}/{row['n']} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    report["kv"] = out
    _print_kv(out)


def _print_kv(out: dict) -> None:
    print("\n### (b) key-value retrieval, exact match of the greedy value, 8 hosts\n")
    rows = []
    for r in out["rows"]:
        lo, hi = r["ci95"]
        delta = "—"
        if "delta_vs_full" in r:
            dlo, dhi = r["delta_ci95"]
            delta = (f"{100 * r['delta_vs_full']:+.1f} pts [{100 * dlo:+.1f}, "
                     f"{100 * dhi:+.1f}]")
        shape = "—" if r["anchor_len"] is None else \
            f"{r['block_len']} / {r['anchor_len']} / {r['passing_len']}"
        rows.append([r["pairs"], r["seq"], r.get("placement", "random"), shape, r["method"],
                     f"{r['correct']}/{r['n']}", f"{100 * r['accuracy']:.1f}%",
                     f"[{100 * lo:.1f}, {100 * hi:.1f}]", delta,
                     f"{r['host0_correct']}/{r['host0_n']}",
                     f"{r['later_correct']}/{r['later_n']}",
                     f"{r.get('straddle_correct', '?')}/{r.get('straddle_n', '?')}"])
    print(markdown_table(
        ["pairs", "prompt tokens", "needle", "block / anchor / passing", "method",
         "correct / n", "accuracy", "95% CI (Wilson)", "vs full (paired 95% CI)",
         "needle on host 0", "on a later host", "straddling a boundary"],
        rows, align="rrlllrrllrrr"))


# ----------------------------------------------------------------------------- CLI


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("corpus", help="write the stdlib text of a split (retaining-head data)")
    c.add_argument("--split", choices=["train", "eval"], default="train")
    c.add_argument("--out", required=True)
    t = sub.add_parser("tables", help="print the tables of a finished run's JSON")
    t.add_argument("--json", default=os.path.join(ROOT, "docs/benchmarks/apb_quality.json"))
    r = sub.add_parser("run", help="run the study")
    r.add_argument("--parts", default="kl,kv")
    r.add_argument("--model", default=None, help="HF dir for the KL part (default: bundled)")
    r.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1024, 2048])
    r.add_argument("--samples", type=int, default=6, help="windows per length")
    r.add_argument("--query-len", type=int, default=16)
    r.add_argument("--heads", default=None, help="retaining heads (.npz) of the KL model")
    r.add_argument("--kv-model", default="runs/apb_quality/kv_model/hf")
    r.add_argument("--kv-heads", default=None)
    r.add_argument("--kv-pairs", type=lambda s: [int(x) for x in s.split(",")],
                   default=[60, 120])
    r.add_argument("--kv-passing", type=lambda s: [float(x) for x in s.split(",") if x],
                   default=[], help="extra APB rows with passing_len = FRACTION x block_len")
    r.add_argument("--kv-needle", type=lambda s: s.split(","), default=["random", "boundary"],
                   help="needle placements: random (uniform over the pairs) and/or boundary "
                        "(a pair whose key and value sit on two hosts)")
    r.add_argument("--kv-samples", type=int, default=400)
    r.add_argument("--kv-batch", type=int, default=50)
    r.add_argument("--num-keys", type=int, default=128)
    r.add_argument("--num-values", type=int, default=64)
    r.add_argument("--value-len", type=int, default=1)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--json", default=os.path.join(ROOT, "docs/benchmarks/apb_quality.json"))
    args = p.parse_args()
    if args.cmd == "corpus":
        text, keys = stdlib_text(args.split)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {len(keys)} files ({len(text)} chars) to {args.out}")
        return
    if args.cmd == "tables":
        with open(args.json) as f:
            report = json.load(f)
        if "kl" in report:
            _print_kl(report["kl"])
        if "kv" in report:
            _print_kv(report["kv"])
        return
    jax.config.update("jax_default_matmul_precision", "highest")
    report: dict[str, Any] = {}
    if os.path.isfile(args.json):
        with open(args.json) as f:
            report = json.load(f)
    report["command"] = "python scripts/apb_quality.py run " + " ".join(sys.argv[2:])
    parts = args.parts.split(",")
    if "kl" in parts:
        run_kl(args, report)
    if "kv" in parts:
        run_kv(args, report)
    write_json(args.json, report)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
