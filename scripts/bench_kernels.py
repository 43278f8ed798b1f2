"""Kernel benchmarks on CPU: blockwise attention vs XLA attention, FR head vs the full head.

What is measured (CPU, float32, one process, side by side; medians over ``--repeats`` runs after
one warm-up; compilation excluded):

1. Attention, causal, batch 1, 2 query heads over 1 kv head (GQA), head dim 64, at 1k-32k
   tokens: ``pallas_kernels.blockwise_attention`` (lax loops, block 512) vs
   ``jax.nn.dot_product_attention(implementation="xla")``. Forward time, and peak memory as
   XLA's buffer assignment reports it for the compiled program (``memory_analysis()``:
   temporaries + arguments + outputs), for the forward and for forward + backward. A naive
   program whose buffers exceed ``--naive-limit-gib`` is compiled (to read its memory) but not
   run; the table says so. The Pallas kernels in interpret mode are timed against the lax path
   at 1k and 4k tokens (forward, and forward + backward).
2. FR-Spec LM head at vocabulary 128,256 (Llama-3 size), hidden 2304, 60 tokens (a draft tree),
   top-k 64: the full head (``jnp.dot`` + ``log_softmax`` + ``lax.top_k`` over the whole
   vocabulary) vs ``fr_lm_head_blockwise`` on a pre-gathered 8k/16k/32k subset weight (what the
   draft model keeps). FLOPs are ``2 * tokens * rows * hidden``, checked against XLA's
   ``cost_analysis()``.

Usage: python scripts/bench_kernels.py [--repeats 3] [--max-seq 32768] [--out docs/benchmarks]
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import jax
import jax.numpy as jnp

from cpmjax.report import markdown_table, write_json
from cpmjax.timing import median_seconds
from pallas_kernels import blockwise_attention, flash_attention, fr_lm_head_blockwise

GIB = 1024**3


def _peak_bytes(compiled) -> int:
    stats = compiled.memory_analysis()
    return int(
        stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes
    )


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


def bench_attention(seqs, repeats, naive_limit_gib):
    heads, kv_heads, dim = 2, 1, 64
    rows = []
    for seq in seqs:
        key = jax.random.key(seq)
        q = jax.random.normal(key, (1, seq, heads, dim), jnp.float32)
        k = jax.random.normal(jax.random.fold_in(key, 1), (1, seq, kv_heads, dim), jnp.float32)
        v = jax.random.normal(jax.random.fold_in(key, 2), (1, seq, kv_heads, dim), jnp.float32)
        impls = {
            "blockwise": lambda q, k, v: blockwise_attention(q, k, v, block_k=512),
            "xla": lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation="xla"
            ),
        }
        row = {"seq": seq}
        for name, fn in impls.items():
            fwd = jax.jit(fn).lower(q, k, v).compile()
            loss = lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v))
            bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
            row[f"{name}_fwd_peak_bytes"] = _peak_bytes(fwd)
            row[f"{name}_fwd_bwd_peak_bytes"] = _peak_bytes(bwd)
            if name == "xla" and row[f"{name}_fwd_peak_bytes"] > naive_limit_gib * GIB:
                row[f"{name}_fwd_seconds"] = None  # compiled, not run: over the memory limit
                continue
            row[f"{name}_fwd_seconds"] = median_seconds(fwd, q, k, v, repeats=repeats)
        if row["xla_fwd_seconds"] is not None:
            row["time_ratio_xla_over_blockwise"] = (
                row["xla_fwd_seconds"] / row["blockwise_fwd_seconds"]
            )
        row["memory_ratio_xla_over_blockwise"] = (
            row["xla_fwd_peak_bytes"] / row["blockwise_fwd_peak_bytes"]
        )
        row["causal_flops"] = 2 * 2 * heads * dim * seq * (seq + 1) / 2
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench_pallas_interpret(repeats, seqs=(1024, 4096)):
    """Interpreted Pallas (forward, and forward + backward) vs the lax path, same shapes."""
    heads, kv_heads, dim = 2, 1, 64
    rows = []
    for seq in seqs:
        key = jax.random.key(0)
        q = jax.random.normal(key, (1, seq, heads, dim), jnp.float32)
        k = jax.random.normal(jax.random.fold_in(key, 1), (1, seq, kv_heads, dim), jnp.float32)
        row = {"seq": seq}
        impls = {
            "pallas_interpret": lambda q, k, v: flash_attention(q, k, v, interpret=True),
            "blockwise": lambda q, k, v: blockwise_attention(q, k, v, block_k=512),
        }
        for name, fn in impls.items():
            grad = jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2))
            row[f"{name}_fwd_seconds"] = median_seconds(jax.jit(fn), q, k, k, repeats=repeats)
            row[f"{name}_fwd_bwd_seconds"] = median_seconds(jax.jit(grad), q, k, k,
                                                            repeats=repeats)
        row["fwd_ratio"] = row["pallas_interpret_fwd_seconds"] / row["blockwise_fwd_seconds"]
        row["fwd_bwd_ratio"] = (
            row["pallas_interpret_fwd_bwd_seconds"] / row["blockwise_fwd_bwd_seconds"]
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench_fr_head(repeats, vocab=128_256, hidden=2304, tokens=60, top_k=64):
    key = jax.random.key(1)
    weight = jax.random.normal(key, (vocab, hidden), jnp.float32) * 0.02
    states = jax.random.normal(jax.random.fold_in(key, 1), (tokens, hidden), jnp.float32)

    def full_head(h, w):
        logits = jnp.dot(h, w.T, preferred_element_type=jnp.float32)
        values, ids = jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), top_k)
        return ids, values

    rows = []
    full = jax.jit(full_head).lower(states, weight).compile()
    full_seconds = median_seconds(full, states, weight, repeats=repeats)
    rows.append({
        "head": "full (jnp.dot + top_k)", "rows": vocab, "seconds": full_seconds,
        "flops": 2 * tokens * vocab * hidden, "xla_flops": _flops(full),
        "peak_bytes": _peak_bytes(full), "speedup_vs_full": 1.0,
    })
    print(json.dumps(rows[-1]), flush=True)
    for subset in (8192, 16384, 32768):
        sub_weight = weight[:subset]  # pre-gathered, as the draft model keeps it
        for name, fn in (
            ("fr_lm_head_blockwise", lambda h, w: fr_lm_head_blockwise(h, w, top_k=top_k)),
            ("subset jnp.dot + top_k", full_head),
        ):
            compiled = jax.jit(fn).lower(states, sub_weight).compile()
            seconds = median_seconds(compiled, states, sub_weight, repeats=repeats)
            rows.append({
                "head": name, "rows": subset, "seconds": seconds,
                "flops": 2 * tokens * subset * hidden, "xla_flops": _flops(compiled),
                "peak_bytes": _peak_bytes(compiled), "speedup_vs_full": full_seconds / seconds,
            })
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _markdown(result) -> str:
    mib = 2**20
    attention = []
    for row in result["attention"]:
        xla_s = row["xla_fwd_seconds"]
        attention.append([
            row["seq"], f"{row['blockwise_fwd_seconds']:.3f}",
            "not run (memory)" if xla_s is None else f"{xla_s:.3f}",
            "-" if xla_s is None else f"{row['time_ratio_xla_over_blockwise']:.2f}",
            f"{row['blockwise_fwd_peak_bytes'] / mib:.0f}", f"{row['xla_fwd_peak_bytes'] / mib:.0f}",
            f"{row['blockwise_fwd_bwd_peak_bytes'] / mib:.0f}",
            f"{row['xla_fwd_bwd_peak_bytes'] / mib:.0f}",
        ])
    pallas = [[row["seq"], f"{row['pallas_interpret_fwd_seconds']:.3f}",
               f"{row['blockwise_fwd_seconds']:.3f}", f"{row['fwd_ratio']:.2f}",
               f"{row['pallas_interpret_fwd_bwd_seconds']:.3f}",
               f"{row['blockwise_fwd_bwd_seconds']:.3f}", f"{row['fwd_bwd_ratio']:.2f}"]
              for row in result["pallas_interpret"]]
    heads = [[row["head"], row["rows"], f"{row['seconds']:.4f}", f"{row['flops'] / 1e9:.2f}",
              f"{row['xla_flops'] / 1e9:.2f}", f"{row['peak_bytes'] / mib:.0f}",
              f"{row['speedup_vs_full']:.2f}"] for row in result["fr_head"]]
    return "\n\n".join([
        markdown_table(["seq", "blockwise fwd s", "XLA fwd s", "XLA / blockwise time",
                        "blockwise fwd peak MiB", "XLA fwd peak MiB",
                        "blockwise fwd+bwd peak MiB", "XLA fwd+bwd peak MiB"], attention),
        markdown_table(["seq", "Pallas interpret fwd s", "blockwise fwd s", "ratio",
                        "Pallas interpret fwd+bwd s", "blockwise fwd+bwd s", "ratio"], pallas),
        markdown_table(["head", "rows scored", "seconds", "GFLOP", "XLA GFLOP", "peak MiB",
                        "speedup vs full"], heads),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-seq", type=int, default=32768)
    parser.add_argument("--naive-limit-gib", type=float, default=6.0)
    parser.add_argument("--out", default="docs/benchmarks")
    args = parser.parse_args()
    seqs = [s for s in (1024, 2048, 4096, 8192, 16384, 32768) if s <= args.max_seq]
    result = {
        "machine": {
            "backend": jax.default_backend(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "jax": jax.__version__,
        },
        "repeats": args.repeats,
        "attention": bench_attention(seqs, args.repeats, args.naive_limit_gib),
        "pallas_interpret": bench_pallas_interpret(args.repeats),
        "fr_head": bench_fr_head(args.repeats),
    }
    table = _markdown(result)
    print(table)
    write_json(os.path.join(args.out, "kernels.json"), result, indent=2)


if __name__ == "__main__":
    main()
