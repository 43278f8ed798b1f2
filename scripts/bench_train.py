"""Training benchmarks.

1. Throughput: training tokens/s of cpmjax vs a transformers + torch loop on the same model,
   measured side by side (CPU, float32, same thread count: torch.set_num_threads(os.cpu_count())
   and XLA's default pool of the same cores). The model is the cpmjax-tiny shape (hidden 256,
   4 layers, GQA 4/2 heads, MLP 640, tied 32,768 vocabulary) built as a Llama-architecture
   checkpoint, because transformers has no MiniCPM-1/2 class (the μP multipliers do not change
   the cost); both sides start from the same weights (the first-step losses are printed as a
   check). A step is forward + backward + AdamW (β 0.9/0.95, wd 0.1) + global-norm clipping.
   Medians of per-step wall times after warmup steps. MFU = tokens/s x training FLOPs/token /
   the measured float32 matmul peak of this machine (``measure_matmul_peak``).
2. WSD vs cosine at equal tokens on a small model (hidden 128, 2 layers, a 4,096-entry BPE
   trained on the same corpus), with the real training loop (``cpmjax.train.train``): the
   training-loss and held-out-loss curves, plotted side by side to a PNG.

   Two shapes: batch 4 x 256 (matmul-bound: both sides run the same large matmuls) and
   batch 1 x 64 (step-overhead-bound: short sequences, as in small fine-tuning steps).

Usage: python scripts/bench_train.py [--repeats 5] [--shapes 4x256,1x64] [--steps 300]
       [--out docs/benchmarks]
       [--skip-throughput] [--skip-schedules]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from cpmjax.report import machine_info, markdown_table, write_json

TINY = dict(model_type="llama", vocab_size=32768, hidden_size=256, intermediate_size=640,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024, tie_word_embeddings=True, rms_norm_eps=1e-5,
            bos_token_id=1, eos_token_id=2, pad_token_id=3)


def _batch(batch: int, seq: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(4, vocab, (batch, seq + 1)).astype(np.int32)


def bench_cpmjax(path: str, tokens: np.ndarray, repeats: int, warmup: int, chunk: int,
                 remat: bool) -> tuple[list[float], float]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import cpmjax
    from cpmjax.train.optim import adamw_mup
    from cpmjax.train.step import make_train_step

    model = cpmjax.from_pretrained(path, dtype="float32")
    opt = nnx.Optimizer(model, adamw_mup(1e-3, weight_decay=0.1, clip_norm=1.0), wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))
    step = jax.jit(make_train_step(graphdef, nnx.Param, chunk=chunk, remat=remat),
                   donate_argnums=0)
    b, s1 = tokens.shape
    batch = {
        "input_ids": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
        "positions": jnp.broadcast_to(jnp.arange(s1 - 1, dtype=jnp.int32), (b, s1 - 1)),
        "segment_ids": jnp.zeros((b, s1 - 1), jnp.int32),
        "loss_mask": jnp.ones((b, s1 - 1), jnp.float32),
    }
    times, first = [], None
    for i in range(warmup + repeats):
        t = time.perf_counter()
        state, metrics = step(state, batch)
        loss = float(metrics["loss"])
        if i >= warmup:
            times.append(time.perf_counter() - t)
        if first is None:
            first = loss
    return times, first


def bench_torch(path: str, tokens: np.ndarray, repeats: int, warmup: int
                ) -> tuple[list[float], float]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.1)
    ids = torch.from_numpy(tokens[:, :-1].astype(np.int64))
    labels = torch.from_numpy(tokens[:, 1:].astype(np.int64))
    times, first = [], None
    for i in range(warmup + repeats):
        t = time.perf_counter()
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 labels.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = float(loss)
        if i >= warmup:
            times.append(time.perf_counter() - t)
        if first is None:
            first = value
    return times, first


def _layer_linears(mc) -> list[tuple[int, int]]:
    """``(in, out)`` of every linear layer in one decoder block."""
    h, hd = mc.hidden_size, mc.hidden_size // mc.num_attention_heads
    q, kv = mc.num_attention_heads * hd, mc.num_key_value_heads * hd
    return [(h, q), (h, kv), (h, kv), (q, h), (h, mc.intermediate_size),
            (h, mc.intermediate_size), (mc.intermediate_size, h)]


def step_gemms(mc, n_tokens: int) -> list[tuple[int, int, int, int]]:
    """The matrix multiplies of one training step as ``(m, k, n, count)``: for every linear
    layer ``in -> out`` over ``n_tokens`` rows, the forward ``[N,in]x[in,out]``, the input
    gradient ``[N,out]x[out,in]`` and the weight gradient ``[in,N]x[N,out]``; the tied head
    counts as one linear ``hidden -> vocab``. Attention's score matmuls (under 2% of the FLOPs
    here) are left out, so a floor built from this list is an underestimate."""
    h, layer = mc.hidden_size, _layer_linears(mc)
    shapes: dict[tuple[int, int, int], int] = {}
    for din, dout in layer * mc.num_hidden_layers + [(h, mc.vocab_size)]:
        for shape in [(n_tokens, din, dout), (n_tokens, dout, din), (din, n_tokens, dout)]:
            shapes[shape] = shapes.get(shape, 0) + 1
    return [(m, k, n, c) for (m, k, n), c in shapes.items()]


def step_floor(mc, n_tokens: int, repeats: int) -> dict:
    """A lower bound on the step time of any implementation on this machine: every matmul of
    one step timed alone (float32, same threads) in XLA and in torch, interleaved, the faster
    of the two per shape summed; plus the memory traffic no implementation avoids (the
    optimizer's passes over its state and three passes over the logits) at the measured copy
    bandwidth. It leaves out attention, norms, activations and every other pass, so the true
    floor is higher."""
    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    dot = jax.jit(jnp.dot)
    rows, floor, xla_sum, torch_sum = [], 0.0, 0.0, 0.0
    for m, k, n, count in step_gemms(mc, n_tokens):
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        jax.block_until_ready(dot(ja, jb))
        torch.mm(ta, tb)
        tj, tt = [], []
        for _ in range(repeats):  # interleaved, so both see the same machine load
            t = time.perf_counter()
            jax.block_until_ready(dot(ja, jb))
            tj.append(time.perf_counter() - t)
            t = time.perf_counter()
            torch.mm(ta, tb)
            tt.append(time.perf_counter() - t)
        mj, mt = statistics.median(tj), statistics.median(tt)
        floor += count * min(mj, mt)
        xla_sum += count * mj
        torch_sum += count * mt
        rows.append({"m": m, "k": k, "n": n, "count": count, "xla_s": mj, "torch_s": mt,
                     "gflops_best": 2 * m * k * n / min(mj, mt) / 1e9})
    # Memory floor: bytes no implementation can avoid moving, at this machine's copy bandwidth.
    # AdamW reads params, grads, m, v and writes params, m, v (7 x 4 bytes per parameter); the
    # [tokens, vocab] logits are written by the head GEMM, read by the softmax, which writes the
    # logit gradient, and read again by the two backward GEMMs (at least 3 passes, and only if
    # the softmax fuses into one). Measured as a fused read+write of a 256 MB float32 array.
    x = jnp.ones((64 * 1024 * 1024,), jnp.float32)
    scale = jax.jit(lambda a: a * 1.0001)
    jax.block_until_ready(scale(x))
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(scale(x))
        ts.append(time.perf_counter() - t)
    bandwidth = 2 * x.size * 4 / statistics.median(ts)
    n_params = (mc.hidden_size * mc.vocab_size
                + mc.num_hidden_layers * sum(din * dout for din, dout in _layer_linears(mc)))
    min_bytes = 7 * 4 * n_params + 3 * 4 * n_tokens * mc.vocab_size
    memory_s = min_bytes / bandwidth
    return {"floor_s": floor + memory_s, "gemm_floor_s": floor, "memory_floor_s": memory_s,
            "bandwidth_bytes_per_s": bandwidth, "min_bytes": min_bytes,
            "xla_gemms_s": xla_sum, "torch_gemms_s": torch_sum, "gemms": rows}


def throughput(args, batch: int, seq: int) -> dict:
    from flax import nnx

    import cpmjax
    from cpmjax.models import CausalLM, ModelConfig
    from cpmjax.train.metrics import flops_per_token, measure_matmul_peak

    mc = ModelConfig.from_hf_dict(TINY)
    tokens = _batch(batch, seq, mc.vocab_size)
    peak = measure_matmul_peak()
    flops_tok = flops_per_token(mc, seq)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = CausalLM(mc, rngs=nnx.Rngs(0))
        cpmjax.save_pretrained(model, tmp)
        n_tok = batch * seq
        results = {}
        for name, fn in [
            ("cpmjax (chunked loss, remat)",
             lambda: bench_cpmjax(tmp, tokens, args.repeats, 2, 128, True)),
            ("cpmjax (one chunk, no remat)",
             lambda: bench_cpmjax(tmp, tokens, args.repeats, 2, seq, False)),
            ("transformers+torch", lambda: bench_torch(tmp, tokens, args.repeats, 2)),
        ]:
            times, first = fn()
            med = statistics.median(times)
            results[name] = (med, first)
            rows.append({"impl": name, "median_step_s": med, "tokens_per_s": n_tok / med,
                         "mfu": n_tok / med * flops_tok / peak, "first_loss": first,
                         "step_times_s": times})
    torch_tps = rows[-1]["tokens_per_s"]
    for r in rows:
        r["ratio_vs_torch"] = r["tokens_per_s"] / torch_tps
    floor = step_floor(mc, batch * seq, max(5, args.repeats))
    torch_step = rows[-1]["median_step_s"]
    floor["step_for_target_s"] = torch_step / 1.5
    floor["max_ratio_vs_torch"] = torch_step / floor["floor_s"]
    return {"config": {**TINY, "batch": batch, "seq_len": seq, "dtype": "float32",
                       "threads": os.cpu_count(), "repeats": args.repeats},
            "matmul_peak_flops": peak, "flops_per_token": flops_tok, "rows": rows,
            "step_floor": floor}


def schedules(args, out_dir: str) -> dict:
    from cpmjax.train.config import load_config
    from cpmjax.train.loop import train
    from cpmjax.train.metrics import read_records

    work = tempfile.mkdtemp(prefix="bench-wsd-")
    steps = args.steps
    decay = max(1, steps // 8)
    base = {
        "model.config": {"model_type": "minicpm", "hidden_size": 128, "intermediate_size": 320,
                         "num_hidden_layers": 2, "num_attention_heads": 4,
                         "num_key_value_heads": 2, "dim_model_base": 32, "scale_emb": 12,
                         "scale_depth": 1.4, "tie_word_embeddings": True,
                         "max_position_embeddings": 256},
        "model.init_std": 0.1,
        "data.vocab_size": 4096, "data.seq_len": 128, "data.batch_size": 8,
        "data.cache_dir": os.path.join(work, "data"),
        "data.tokenizer": None,
        "optim.lr": 0.01, "optim.warmup_steps": max(1, steps // 20),
        "run.steps": steps, "run.log_every": 10, "run.eval_every": max(1, steps // 15),
        "run.eval_batches": 4, "run.checkpoint_every": 0, "run.progress": False,
        "run.tensorboard": False, "run.loss_chunk": 128, "run.loss_remat": False,
    }
    curves = {}
    tok_dir = os.path.join(work, "shared", "tokenizer")
    for name, extra in [
        ("wsd", {"optim.schedule": "wsd", "optim.decay_steps": decay, "optim.decay": "exp"}),
        ("cosine", {"optim.schedule": "cosine", "optim.cosine_min_ratio": 0.1}),
    ]:
        run_dir = os.path.join(work, name)
        over = {**base, **extra, "run.out_dir": run_dir, "run.export_dir": None}
        if os.path.isdir(tok_dir):
            over["data.tokenizer"] = tok_dir
        config = load_config(overrides=over)
        result = train(config, export=False)
        if not os.path.isdir(tok_dir):
            import shutil

            shutil.copytree(os.path.join(run_dir, "tokenizer"), tok_dir)
        records = read_records(run_dir)
        curves[name] = {
            "step": [r["step"] for r in records if "loss" in r],
            "loss": [r["loss"] for r in records if "loss" in r],
            "lr": [r["lr"] for r in records if "loss" in r],
            "eval_step": [r["step"] for r in records if "eval_loss" in r],
            "eval_loss": [r["eval_loss"] for r in records if "eval_loss" in r],
            "final_eval_loss": result.eval_loss,
        }
    tokens_per_step = base["data.batch_size"] * base["data.seq_len"]
    _plot(curves, tokens_per_step, steps - decay, os.path.join(out_dir, "..",
                                                               "wsd_vs_cosine.png"))
    return {"steps": steps, "tokens_per_step": tokens_per_step, "decay_start": steps - decay,
            "curves": curves}


def _smooth(x: list[float], k: int = 9) -> np.ndarray:
    x = np.asarray(x)
    if len(x) < k:
        return x
    pad = np.pad(x, (k // 2, k // 2), mode="edge")
    return np.convolve(pad, np.ones(k) / k, mode="valid")


def _plot(curves: dict, tokens_per_step: int, decay_start: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = {"wsd": "tab:red", "cosine": "tab:blue"}
    for name, c in curves.items():
        tok = np.asarray(c["step"]) * tokens_per_step / 1e3
        axes[0].plot(tok, c["lr"], color=colors[name], label=name)
        axes[1].plot(tok, _smooth(c["loss"]), color=colors[name], label=f"{name} (smoothed)")
        axes[2].plot(np.asarray(c["eval_step"]) * tokens_per_step / 1e3, c["eval_loss"], "o-",
                     color=colors[name], label=name)
    for ax, title in zip(axes, ["learning rate", "training loss", "held-out loss"],
                         strict=True):
        ax.axvline((decay_start + 1) * tokens_per_step / 1e3, color="gray", ls=":", lw=1)
        ax.set_xlabel("tokens (thousands)")
        ax.set_title(title)
        ax.legend()
    axes[1].set_ylim(top=min(8.5, axes[1].get_ylim()[1]))
    fig.suptitle("WSD vs cosine at equal tokens (dotted: WSD decay start)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--shapes", default="4x256,1x64",
                   help="comma-separated BATCHxSEQ shapes for the throughput comparison")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default="docs/benchmarks")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-schedules", action="store_true")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "train.json")
    report = {}
    if os.path.isfile(json_path):
        with open(json_path) as f:
            report = json.load(f)
    if not args.skip_throughput:
        report.setdefault("throughput", {})
        for shape in args.shapes.split(","):
            batch, seq = (int(x) for x in shape.lower().split("x"))
            t = report["throughput"][f"{batch}x{seq}"] = throughput(args, batch, seq)
            print(f"\nTraining throughput (float32, CPU, {t['config']['threads']} threads, batch "
                  f"{batch} x seq {seq}; matmul peak {t['matmul_peak_flops'] / 1e9:.1f} GFLOP/s)")
            print(markdown_table(
                ["impl", "step s", "tok/s", "MFU", "vs torch", "first loss"],
                [[r["impl"], f"{r['median_step_s']:.3f}", f"{r['tokens_per_s']:.1f}",
                  f"{100 * r['mfu']:.1f}%", f"{r['ratio_vs_torch']:.2f}x",
                  f"{r['first_loss']:.5f}"] for r in t["rows"]],
                align="lrrrrr"))
            g = t["step_floor"]
            print(f"Step floor: GEMMs alone (the faster of XLA/torch per shape) "
                  f"{g['gemm_floor_s']:.3f} s (XLA's {g['xla_gemms_s']:.3f} s, torch's "
                  f"{g['torch_gemms_s']:.3f} s) + unavoidable memory traffic "
                  f"{g['min_bytes'] / 1e6:.0f} MB at {g['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s "
                  f"= {g['memory_floor_s']:.3f} s; 1.5x torch needs a step of "
                  f"{g['step_for_target_s']:.3f} s; no implementation built on these GEMMs can "
                  f"exceed {g['max_ratio_vs_torch']:.2f}x torch")
            sys.stdout.flush()
    if not args.skip_schedules:
        report["schedules"] = schedules(args, args.out)
        s = report["schedules"]
        print(f"\nWSD vs cosine, {s['steps']} steps x {s['tokens_per_step']} tokens:")
        for name, c in s["curves"].items():
            print(f"  {name:7s} final train loss (mean of last 10) "
                  f"{np.mean(c['loss'][-10:]):.4f}; held-out loss {c['final_eval_loss']:.4f}")
        w = s["curves"]["wsd"]
        before = [loss for st, loss in zip(w["eval_step"], w["eval_loss"], strict=True)
                  if st <= s["decay_start"]]
        if before:
            print(f"  WSD held-out loss at decay start {before[-1]:.4f} -> end "
                  f"{w['final_eval_loss']:.4f}")
    report["meta"] = machine_info()
    write_json(json_path, report)
    print(f"\nwrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
