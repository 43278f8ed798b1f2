"""Check and time the kernels on a Hopper GPU (H100/H200): one prepared run, a few minutes.

What it does, in order:

1. correctness: compiles the Mosaic GPU flash attention kernels (forward, dq, dk/dv) for a few
   configurations (causal GQA 8:2 at an odd length, MLA head dims 192/128 with segment ids,
   chunked prefill with ``q_offset``, non-causal) and compares output, log-sum-exp and the
   gradients of a loss using both with ``attention_reference`` (float32 on the same bf16
   inputs); relative error = max abs error / max abs reference, pass at <= 2e-2.
2. attention speed: bfloat16 forward and forward+backward of ``flash_attention`` vs
   ``jax.nn.dot_product_attention(..., implementation="cudnn")`` (same [batch, seq, heads,
   dim] layout), median wall time over repeats, reported as TFLOP/s of the nominal attention
   FLOPs (4 * batch * heads * q_len * kv_len * head_dim forward, halved when causal;
   forward+backward counted as 3.5x forward) and as the time ratio ours / cuDNN.
3. FR head: ``fr_lm_head`` at vocab 128k (subset 32k and the full vocabulary) vs a plain
   ``jnp.dot`` + ``lax.top_k`` over the full vocabulary, median times and the ratio.

Prints a table; ``--json PATH`` also writes the numbers. Exits with status 2 and a message when
no GPU is present (``--help`` works anywhere).

    python scripts/gpu_check_kernels.py --json /tmp/kernels_gpu.json
"""

from __future__ import annotations

import argparse
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", default="4096,16384",
                        help="comma-separated sequence lengths for the attention timing")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--q-heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per measurement")
    parser.add_argument("--fr-tokens", type=int, default=64)
    parser.add_argument("--fr-dim", type=int, default=2304)
    parser.add_argument("--fr-vocab", type=int, default=128 * 1024)
    parser.add_argument("--fr-subset", type=int, default=32 * 1024)
    parser.add_argument("--skip-timing", action="store_true", help="correctness checks only")
    parser.add_argument("--json", default=None, help="also write the results here")
    return parser.parse_args(argv)


def _relative_error(actual, expected) -> float:
    import numpy as np

    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


_CONFIGS = [
    # name, batch, q_len, kv_len, q_heads, kv_heads, qk_dim, v_dim, causal, q_offset, segments
    ("causal_gqa8to2_len1000", 1, 1000, 1000, 8, 2, 128, 128, True, 0, False),
    ("mla_192_128_segments", 2, 300, 300, 4, 2, 192, 128, True, 0, True),
    ("chunked_prefill_q77_kv1030", 1, 77, 1030, 4, 1, 64, 64, True, 953, False),
    ("noncausal_len130_dim64", 2, 130, 130, 4, 4, 64, 64, False, 0, False),
]


def _check_one(config: tuple) -> dict:
    import jax
    import jax.numpy as jnp

    from pallas_kernels import attention_reference, flash_attention

    name, batch, q_len, kv_len, hq, hkv, dqk, dv, causal, offset, segments = config
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (batch, q_len, hq, dqk), jnp.bfloat16)
    k = jax.random.normal(keys[1], (batch, kv_len, hkv, dqk), jnp.bfloat16)
    v = jax.random.normal(keys[2], (batch, kv_len, hkv, dv), jnp.bfloat16)
    seg = None
    if segments:
        seg = jnp.sort(jax.random.randint(keys[3], (batch, q_len), 0, 3), axis=1)

    def loss(q, k, v, attend):
        out, lse = attend(q, k, v, causal=causal, segment_ids=seg, q_offset=offset,
                          return_lse=True)
        out32 = out.astype(jnp.float32)
        lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(out32 * jnp.cos(out32)) + 0.3 * jnp.sum(lse), (out, lse)

    def ours(*args, **kwargs):
        return flash_attention(*args, kernel="mosaic_gpu", **kwargs)

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    start = time.perf_counter()
    try:
        (_, (out, lse)), grads = jax.jit(grad, static_argnums=3)(q, k, v, ours)
        jax.block_until_ready(grads)
    except Exception as error:  # report and continue: this is a diagnostic run
        first_line = str(error).splitlines()[0][:200] if str(error) else ""
        return {"config": name, "ok": False, "error": f"{type(error).__name__}: {first_line}"}
    seconds = time.perf_counter() - start
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    (_, (ref_out, ref_lse)), ref_grads = jax.jit(grad, static_argnums=3)(
        q32, k32, v32, attention_reference
    )
    errors = {"out": _relative_error(out, ref_out), "lse": _relative_error(lse, ref_lse)}
    for label, g, r in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        errors[label] = _relative_error(g, r)
    return {"config": name, "ok": max(errors.values()) <= 2e-2,
            "compile_and_run_s": round(seconds, 2),
            **{key: float(f"{value:.2e}") for key, value in errors.items()}}


def check_correctness() -> list[dict]:
    return [_check_one(config) for config in _CONFIGS]


def time_attention(args: argparse.Namespace) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from cpmjax.timing import median_seconds
    from pallas_kernels import flash_attention

    rows = []
    for seq in (int(s) for s in args.seq_lens.split(",")):
        for causal in (True, False):
            keys = jax.random.split(jax.random.key(1), 3)
            shape_q = (args.batch, seq, args.q_heads, args.head_dim)
            shape_kv = (args.batch, seq, args.kv_heads, args.head_dim)
            q = jax.random.normal(keys[0], shape_q, jnp.bfloat16)
            k = jax.random.normal(keys[1], shape_kv, jnp.bfloat16)
            v = jax.random.normal(keys[2], shape_kv, jnp.bfloat16)
            flops = 4 * args.batch * args.q_heads * seq * seq * args.head_dim
            flops = flops // 2 if causal else flops

            def ours(q, k, v, causal=causal):
                return flash_attention(q, k, v, causal=causal, kernel="mosaic_gpu")

            def cudnn(q, k, v, causal=causal):
                return jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                    implementation="cudnn")

            for label, fn in (("ours", ours), ("cudnn", cudnn)):
                def loss(q, k, v, fn=fn):
                    return jnp.sum(fn(q, k, v).astype(jnp.float32))

                row = {"seq": seq, "causal": causal, "impl": label}
                try:
                    fwd = median_seconds(jax.jit(fn), q, k, v, repeats=args.repeats, warmup=2)
                    both = median_seconds(jax.jit(jax.grad(loss, argnums=(0, 1, 2))),
                                          q, k, v, repeats=args.repeats, warmup=2)
                    row.update(fwd_ms=fwd * 1e3, fwd_tflops=flops / fwd / 1e12,
                               fwd_bwd_ms=both * 1e3, fwd_bwd_tflops=3.5 * flops / both / 1e12)
                except Exception as error:
                    row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
                rows.append(row)
    return rows


def time_fr_head(args: argparse.Namespace) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from jax import lax

    from cpmjax.timing import median_seconds
    from pallas_kernels import fr_lm_head

    keys = jax.random.split(jax.random.key(2), 3)
    hidden = jax.random.normal(keys[0], (args.fr_tokens, args.fr_dim), jnp.bfloat16)
    weight = jax.random.normal(keys[1], (args.fr_vocab, args.fr_dim), jnp.bfloat16)
    subset = jax.random.permutation(keys[2], args.fr_vocab)[: args.fr_subset].astype(jnp.int32)
    sub_weight = jnp.take(weight, subset, axis=0)  # what a draft model keeps

    def dense(h, w):
        logits = jnp.dot(h, w.T, preferred_element_type=jnp.float32)
        values, ids = lax.top_k(logits, 64)
        return ids, values - jax.nn.logsumexp(logits, axis=-1, keepdims=True)

    def fr(h, w):
        return fr_lm_head(h, w, top_k=64)

    rows = []
    base = median_seconds(jax.jit(dense), hidden, weight, repeats=args.repeats, warmup=2)
    rows.append({"impl": "jnp.dot+top_k full vocab", "rows": args.fr_vocab, "ms": base * 1e3})
    for label, w in (("fr_lm_head full vocab", weight), ("fr_lm_head subset", sub_weight)):
        seconds = median_seconds(jax.jit(fr), hidden, w, repeats=args.repeats, warmup=2)
        rows.append({"impl": label, "rows": int(w.shape[0]), "ms": seconds * 1e3,
                     "ratio_vs_dense": seconds / base})
    return rows


def _print_table(title: str, rows: list[dict]) -> None:
    from cpmjax.report import markdown_table

    print(f"\n## {title}")
    if not rows:
        return
    columns = list(dict.fromkeys(key for row in rows for key in row))
    print(markdown_table(columns, rows))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    if jax.default_backend() != "gpu":
        print(f"gpu_check_kernels: no GPU (jax backend is {jax.default_backend()!r}); nothing "
              "to check. Run this on a Hopper GPU machine.", file=sys.stderr)
        return 2
    # The float32 reference must not run its matmuls in tf32 (timed paths are bf16 anyway).
    jax.config.update("jax_default_matmul_precision", "highest")
    device = jax.devices()[0]
    print(f"device: {device.device_kind}, jax {jax.__version__}")
    started = time.perf_counter()
    results = {"device": device.device_kind, "jax": jax.__version__}
    results["correctness"] = check_correctness()
    _print_table("correctness (relative error vs float32 reference, pass <= 2e-2)",
                 results["correctness"])
    if not args.skip_timing:
        results["attention"] = time_attention(args)
        _print_table("attention, bf16 (median ms, TFLOP/s)", results["attention"])
        results["fr_head"] = time_fr_head(args)
        _print_table("FR head, bf16 (median ms)", results["fr_head"])
    results["total_s"] = time.perf_counter() - started
    print(f"\ntotal {results['total_s']:.1f} s")
    if args.json:
        from cpmjax.report import write_json

        write_json(args.json, results)
    return 0 if all(row.get("ok") for row in results["correctness"]) else 1


if __name__ == "__main__":
    sys.exit(main())
