"""Decode throughput: cpmjax greedy decode vs transformers ``generate`` on the same weights.

What is measured (CPU, float32, same thread count for both):
- A MiniCPM-shaped model of ~100M parameters with a 73,440-token vocabulary (tied head). It is
  built as a Llama-architecture checkpoint, because transformers has no MiniCPM-1/2 class; the
  μP multipliers do not change the cost of a forward.
- Decode tokens/s at batch 1 and 8: ours from ``GenerationStats.decode_seconds`` (prefill and
  compilation excluded); transformers' as ``(new_tokens - 1) * batch / (t(generate n) -
  t(generate 1))``, i.e. its prefill subtracted. Medians over repeats, measured side by side.
- The memory-bandwidth roofline: weight bytes read per decode step / a measured large-copy
  bandwidth (numpy copy of a 512 MiB array), giving the best possible steps/s; we report decode
  steps/s as a fraction of it.

Usage: python scripts/bench_decode.py [--repeats 3] [--new-tokens 64] [--out docs/benchmarks]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from cpmjax.report import machine_info, markdown_table, write_json


def measure_copy_bandwidth(size_bytes: int = 512 * 1024**2, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s: the best of a large numpy copy (read + write: 2 * size per
    copy, one thread), a large XLA copy ``x + 0`` and a large XLA read (``sum(x)``), all threads.
    Taking the best keeps the roofline conservative (a higher bandwidth, a higher roofline)."""
    import jax
    import jax.numpy as jnp

    src = np.ones(size_bytes // 4, np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    numpy_bw = 2 * size_bytes / min(times)
    x = jnp.asarray(src)
    del src, dst
    copy = jax.jit(lambda a: a + 0.0)
    copy(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        copy(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    xla_bw = 2 * size_bytes / min(times)
    read = jax.jit(lambda a: jnp.sum(a))  # read-only stream: what decode does with weights
    read(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        read(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    read_bw = size_bytes / min(times)
    return max(numpy_bw, xla_bw, read_bw)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--out", default="docs/benchmarks")
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import cpmjax

    torch.set_num_threads(args.threads)
    config = LlamaConfig(
        vocab_size=73440, hidden_size=768, intermediate_size=1920, num_hidden_layers=6,
        num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    n_params = sum(p.numel() for p in hf.parameters())
    tmp = tempfile.mkdtemp()
    hf.save_pretrained(tmp)
    model = cpmjax.from_pretrained(tmp, dtype="float32")
    weight_bytes = n_params * 4
    bandwidth = measure_copy_bandwidth()
    roofline_steps = bandwidth / weight_bytes
    rows = []
    rng = np.random.RandomState(0)
    n = args.new_tokens
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = rng.randint(3, config.vocab_size, (batch, args.prompt_tokens))
        cpmjax.generate(model, prompts, n)  # compile
        ours = []
        theirs = []
        ids = torch.tensor(prompts)
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=2, do_sample=False, eos_token_id=None, pad_token_id=0)
        for _ in range(args.repeats):
            result = cpmjax.generate(model, prompts, n)
            ours.append(result.stats.new_tokens / result.stats.decode_seconds)
            with torch.no_grad():
                t0 = time.perf_counter()
                hf.generate(ids, max_new_tokens=1, do_sample=False, eos_token_id=None,
                            pad_token_id=0)
                t1 = time.perf_counter()
                hf.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None,
                            pad_token_id=0)
                t2 = time.perf_counter()
            theirs.append((n - 1) * batch / ((t2 - t1) - (t1 - t0)))
        ours_med, theirs_med = statistics.median(ours), statistics.median(theirs)
        steps_per_s = ours_med / batch
        rows.append({
            "batch": batch,
            "cpmjax_tok_s": ours_med,
            "transformers_tok_s": theirs_med,
            "speedup": ours_med / theirs_med,
            "roofline_fraction": steps_per_s / roofline_steps,
        })
    print(f"model: {n_params / 1e6:.1f}M params (f32 weights {weight_bytes / 1e6:.0f} MB), "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s -> roofline {roofline_steps:.1f} steps/s, "
          f"threads {args.threads}")
    print(markdown_table(
        ["batch", "cpmjax tok/s", "HF tok/s", "ratio", "roofline"],
        [[r["batch"], f"{r['cpmjax_tok_s']:.1f}", f"{r['transformers_tok_s']:.1f}",
          f"{r['speedup']:.2f}x", f"{100 * r['roofline_fraction']:.0f}%"] for r in rows],
        align="rrrrr"))
    summary = {
        "what": "greedy decode tokens/s, float32 CPU, same weights; medians over repeats",
        "params": n_params, "weight_bytes": weight_bytes, "copy_bandwidth_bytes_s": bandwidth,
        "roofline_steps_s": roofline_steps, "threads": args.threads, "repeats": args.repeats,
        "new_tokens": n, "prompt_tokens": args.prompt_tokens, "rows": rows,
        "python": sys.version.split()[0], "machine": machine_info(),
    }
    write_json(os.path.join(args.out, "decode.json"), summary, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
