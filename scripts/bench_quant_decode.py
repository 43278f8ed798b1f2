"""Weight-only quantized decode: tokens/s and weight bytes of int8 / int4 against bfloat16 and
float32, at batch 1 and 8, on the same weights, side by side in one run.

What is measured:
- One random MiniCPM-shaped model (``--hidden``/``--inter``/``--layers``, vocabulary 32768, tied
  head), saved once as an HF checkpoint and loaded as float32 and as bfloat16; int8 and int4 are
  ``cpmjax.compress.quantize`` of the bfloat16 load (per output channel; decoder linears only,
  embeddings/head stay bfloat16). Same weights up to each format's rounding.
- Decode tokens/s from ``cpmjax.generate`` (greedy; ``GenerationStats.decode_seconds``:
  prefill and compilation excluded), the variants interleaved within every repeat, medians over
  repeats; the ratio to bfloat16 per batch.
- Weight bytes (``cpmjax.compress.weight_bytes``: int4 counts half a byte) and the memory
  roofline: bytes read per decode step (all weights; the tied head reads the whole embedding)
  / the measured read bandwidth (``cpmjax.timing.read_bandwidth``) = the best possible steps/s.
- Where the time goes in one quantized linear (``--probe`` shape, batch 1, the MLP up
  projection): the bfloat16 matmul, qwix's dequantize alone, the ``QuantizedLinear`` call
  (dequantize + matmul), and whether XLA materialises the dequantized weight (the compiled
  HLO's temporary buffer bytes and whether the ``dot`` reads a fusion output or the integers).

    nice -n 10 python scripts/bench_quant_decode.py [--repeats 5] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import cpmjax
import cpmjax.compress as cc
from cpmjax.models import CausalLM, ModelConfig
from cpmjax.report import machine_info, markdown_table, write_json, write_text
from cpmjax.timing import median_seconds, read_bandwidth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("float32", "bfloat16", "int8", "int4", "int8/f32", "int4/f32")


def build_models(args: argparse.Namespace) -> dict[str, Any]:
    config = ModelConfig.from_hf_dict({
        "model_type": "minicpm", "vocab_size": 32768, "hidden_size": args.hidden,
        "intermediate_size": args.inter, "num_hidden_layers": args.layers,
        "num_attention_heads": args.hidden // 64, "num_key_value_heads": args.hidden // 128,
        "max_position_embeddings": 1024, "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
        "scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 64, "initializer_range": 0.02})
    tmp = tempfile.mkdtemp(prefix="bench_quant_decode_")
    cpmjax.save_pretrained(CausalLM(config, rngs=nnx.Rngs(0)), tmp, dtype="float32")
    models = {"float32": cpmjax.from_pretrained(tmp, dtype="float32"),
              "bfloat16": cpmjax.from_pretrained(tmp, dtype="bfloat16")}
    for bits in (8, 4):
        for dtype, suffix in (("bfloat16", ""), ("float32", "/f32")):
            m = cpmjax.from_pretrained(tmp, dtype=dtype)
            cc.quantize(m, bits=bits)
            models[f"int{bits}{suffix}"] = m
    return models


def decode_rates(models: dict[str, Any], batch: int, args: argparse.Namespace
                 ) -> dict[str, list[float]]:
    prompts = np.random.RandomState(batch).randint(4, 32768, (batch, args.prompt_tokens))
    rates: dict[str, list[float]] = {v: [] for v in models}
    for m in models.values():  # compile every bucket first
        cpmjax.generate(m, prompts, args.new_tokens)
    for _ in range(args.repeats):
        for name, m in models.items():
            stats = cpmjax.generate(m, prompts, args.new_tokens).stats
            rates[name].append(stats.new_tokens / stats.decode_seconds)
    return rates


def probe(args: argparse.Namespace) -> dict[str, Any]:
    """One decoder linear [hidden, inter] at batch 1: bfloat16 matmul vs dequantize vs the
    quantized layer, and what the compiled HLO does with the dequantized weight."""
    d_in, d_out = args.hidden, args.inter
    rngs = nnx.Rngs(0)
    dense = nnx.Linear(d_in, d_out, use_bias=False, dtype=jnp.bfloat16,
                       param_dtype=jnp.bfloat16, rngs=rngs)
    x = jax.random.normal(jax.random.key(1), (1, d_in), jnp.bfloat16)
    out: dict[str, Any] = {"shape": [d_in, d_out]}
    dense32 = nnx.Linear(d_in, d_out, use_bias=False, dtype=jnp.float32, rngs=rngs)
    dense32.kernel.set_value(dense.kernel[...].astype(jnp.float32))
    for name, layer, inp in (("bf16_matmul_us", dense, x),
                             ("f32_matmul_us", dense32, x.astype(jnp.float32))):
        gd, st = nnx.split(layer)
        f_dense = jax.jit(lambda s, x, gd=gd: nnx.merge(gd, s)(x))
        out[name] = 1e6 * median_seconds(f_dense, st, inp, repeats=args.probe_repeats)
    for bits in (8, 4):
        q32 = cc.QuantizedLinear(dense32, bits, None)
        g32, s32 = nnx.split(q32)
        f32_call = jax.jit(lambda s, x, g=g32: nnx.merge(g, s)(x))
        out[f"int{bits}/f32_layer_us"] = 1e6 * median_seconds(
            f32_call, s32, x.astype(jnp.float32), repeats=args.probe_repeats)
        q = cc.QuantizedLinear(dense, bits, None)
        gq, sq = nnx.split(q)
        f_call = jax.jit(lambda s, x, gq=gq: nnx.merge(gq, s)(x))
        f_deq = jax.jit(lambda s, gq=gq: nnx.merge(gq, s).dequantized().astype(jnp.bfloat16))
        compiled = f_call.lower(sq, x).compile()
        hlo = compiled.as_text()
        mem = compiled.memory_analysis()
        temp = int(getattr(mem, "temp_size_in_bytes", 0) or 0) if mem is not None else None
        dots = re.findall(r"^\s*\S+ = \S+ (?:dot|convolution)\((.*)$", hlo, re.M)
        out[f"int{bits}"] = {
            "layer_us": 1e6 * median_seconds(f_call, sq, x, repeats=args.probe_repeats),
            "dequantize_us": 1e6 * median_seconds(f_deq, sq, repeats=args.probe_repeats),
            "temp_bytes": temp,
            "dequantized_weight_bytes_bf16": d_in * d_out * 2,
            "weight_materialised": temp is not None and temp >= d_in * d_out * 2,
            "hlo_dot_operands": [d.split(")")[0] for d in dots][:2],
            "hlo_fusions": len(re.findall(r"\bfusion\(", hlo)),
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2560)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--probe-repeats", type=int, default=50)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--json", default=os.path.join(ROOT, "docs", "benchmarks",
                                                   "quant_decode.json"))
    ap.add_argument("--md", default=os.path.join(ROOT, "docs", "benchmarks", "quant_decode.md"))
    args = ap.parse_args()

    t0 = time.time()
    load_before = os.getloadavg()[0]
    models = build_models(args)
    bandwidth = read_bandwidth()
    sizes = {v: cc.weight_bytes(m) for v, m in models.items()}
    rows, raw = [], {}
    for batch in [int(b) for b in args.batches.split(",")]:
        rates = decode_rates(models, batch, args)
        raw[str(batch)] = rates
        base = statistics.median(rates["bfloat16"])
        for v in VARIANTS:
            tok_s = statistics.median(rates[v])
            roof_steps = bandwidth / sizes[v]
            rows.append({"batch": batch, "weights": v, "weight_MB": sizes[v] / 1e6,
                         "tokens_s": tok_s, "vs_bf16": tok_s / base,
                         "roofline_steps_s": roof_steps,
                         "roofline_fraction": tok_s / batch / roof_steps})
        print(f"[bench_quant_decode] batch {batch} done ({time.time() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    where = probe(args)
    n_params = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(
        nnx.state(models["float32"], nnx.Param)))
    result = {
        "what": "greedy decode tokens/s (prefill and compilation excluded), medians over "
                "repeats, variants interleaved in every repeat; weight bytes at logical width",
        "model": {"hidden": args.hidden, "intermediate": args.inter, "layers": args.layers,
                  "vocab": 32768, "params": n_params},
        "read_bandwidth_bytes_s": bandwidth, "repeats": args.repeats,
        "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
        "rows": rows, "raw_tokens_s": raw, "probe": where, "machine": machine_info(),
        "load_average": {"start": load_before, "end": os.getloadavg()[0]},
    }
    write_json(args.json, result)
    table = markdown_table(
        ["batch", "weights", "weight MB", "tokens/s", "vs bf16", "roofline steps/s",
         "of roofline"],
        [[r["batch"], r["weights"], f"{r['weight_MB']:.1f}", f"{r['tokens_s']:.1f}",
          f"{r['vs_bf16']:.2f}x", f"{r['roofline_steps_s']:.1f}",
          f"{100 * r['roofline_fraction']:.0f}%"] for r in rows], align="llrrrrr")
    p = where
    probe_rows = [["bfloat16 matmul", f"{p['bf16_matmul_us']:.0f}", "-", "-"],
                  ["float32 matmul", f"{p['f32_matmul_us']:.0f}", "-", "-"]]
    for bits in (8, 4):
        q = p[f"int{bits}"]
        probe_rows.append([f"int{bits}: dequantize alone", f"{q['dequantize_us']:.0f}", "-",
                           "-"])
        probe_rows.append([f"int{bits}: QuantizedLinear (dequantize + matmul)",
                           f"{q['layer_us']:.0f}", f"{q['temp_bytes']}",
                           "yes" if q["weight_materialised"] else "no"])
        probe_rows.append([f"int{bits}/f32: QuantizedLinear, float32 activations",
                           f"{p[f'int{bits}/f32_layer_us']:.0f}", "-", "-"])
    probe_table = markdown_table(["what (batch 1)", "µs (median)", "XLA temp bytes",
                                  "dequantized weight materialised"], probe_rows,
                                 align="lrrl")
    write_text(args.md, f"""# Weight-only int8 / int4 decode (CPU)

Written by `scripts/bench_quant_decode.py` (numbers in [quant_decode.json](quant_decode.json)).
Model: a random MiniCPM-shaped model, hidden {args.hidden}, MLP {args.inter}, {args.layers}
layers, vocabulary 32768 (tied head), {n_params / 1e6:.0f}M parameters; float32 and bfloat16 are
loads of one checkpoint; int8 / int4 quantize the bfloat16 load per output channel (decoder
linears only; embeddings and head stay bfloat16); int8/f32 and int4/f32 quantize the float32
load instead (the layer then dequantizes to and multiplies in float32). Greedy decode of {args.new_tokens} tokens after
{args.prompt_tokens}-token prompts; medians over {args.repeats} repeats with the four variants
interleaved in each; 1-minute load average {load_before:.1f} at the start,
{os.getloadavg()[0]:.1f} at the end (a shared machine). Roofline: measured read bandwidth {bandwidth / 1e9:.1f} GB/s / weight
bytes = the most decode steps per second if every step reads every weight once.

{table}

## Where the time goes: one linear [{p['shape'][0]}, {p['shape'][1]}] at batch 1

{probe_table}
""")
    print(table)
    print(probe_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
