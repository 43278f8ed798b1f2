"""Benchmark: the critical path of one attention layer of APB, Star, ring and full attention.

On simulated CPU devices the wall time of a distributed method is the *sum* of its hosts' work
(they share the cores), which cannot show the parallel critical path. Here every host's work is
run **alone on one device**, with arrays of exactly the shapes that host holds and receives, and
the critical path of a method is its slowest host's time. Communication is not run; its volume
per host is counted analytically (:func:`communication`).

What one host runs (MiniCPM-1B attention shape: 24 query heads, 8 KV heads, head_dim 64,
batch 1; float32 by default):

- **APB** (the paper's defaults on 8 hosts: block ``B``, ``anchor_len = B/4``, ``passing_len =
  B/8``, a 64-token query embedded in the anchor at offset 1, query-aware compressor): the
  library's own per-host entry point ``sharding.apb.apb_host_attention``, with the host index
  as a runtime int32 argument (as ``axis_index`` is under ``shard_map``) and ``gather=`` a
  ``sharding.apb.OneHostGather`` answering the ``all_gather`` from the passing blocks the host
  received (7 blocks of ``passing_len`` keys and values):
  local causal attention, scoring + max-pool + top-k of its passing block, the attention of
  its local queries to the anchor and the passing blocks of the hosts before it, the
  log-sum-exp merge, and the anchor rows' causal attention.
- **Star** (anchor = the first block): the same kernel with Star's layout (nothing passed).
- **Ring** (``contiguous``: what ``generate(prefill="ring")`` runs, the last host sees every
  block; ``zigzag``: ``sharding.burst``'s default, balanced): one host's forward of
  ``sharding.burst``: ``burst_forward_shard`` with a ``OneHostRing`` holding the 7 blocks it
  receives, in ring order (a ``fori_loop`` over the middle steps, as the library's ring),
  without the ``ppermute``.
- **Full**: ``apb_local_attention("blockwise")`` (the blockwise flash attention, causal blocks
  skipped) on one device over the whole sequence; too slow at 128K on this CPU, so it is timed
  at ``--full-seqs`` and extrapolated as ``c * s^2``.

The one-host functions, the check and the critical-path accounting live in
:mod:`sharding.apb.critical`; this script builds inputs, times and renders.

``--check`` runs every host at a small size (8 hosts x 512 tokens) and asserts that its outputs
equal the corresponding slice of ``sharding.apb.apb_layer_attention`` / ``apb_attention`` (APB,
Star) and ``sharding.burst.burst_attention`` (ring, both layouts) on 8 simulated devices.

Also timed (``--no-tokenwise`` to skip): the token-wise part of one MiniCPM-1B layer
(projections, MLP) on the rows each method's host holds, for a per-layer critical path.

Timing: every function is compiled ahead of time, called ``--warmup`` times, then timed with
``jax.block_until_ready``, methods interleaved (round ``i`` runs every function that has more
than ``i`` repeats: ``--repeats`` for the last APB and Star hosts, ``--other-repeats`` for the
rest); medians of wall and process CPU time.

Usage: ``python scripts/bench_apb_critical.py --check``; ``python scripts/bench_apb_critical.py
[--seq 131072] [--repeats 3] [--other-repeats 1] [--warmup 0] [--full-seqs 16384,32768]``.
Writes ``docs/benchmarks/apb_critical.json`` and ``docs/benchmarks/apb_critical.md``
(``--render`` rewrites the page from the JSON).
"""

from __future__ import annotations

import os
import sys

if "--check" in sys.argv:  # the distributed library calls it compares with need 8 devices
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cpmjax.report import markdown_table, write_json, write_text  # noqa: E402
from sharding.apb import resolve_scorer  # noqa: E402
from sharding.apb.critical import (  # noqa: E402
    HEAD_DIM,
    HEADS,
    KV_HEADS,
    LABELS,
    POOL_SIZE,
    QUERY_LEN,
    QUERY_OFFSET,
    apb_host_fn,
    check_one_host,
    communication,
    critical_layout,
    full_fn,
    ring_host_fn,
    summarise,
)

# ----------------------------------------------------------------------------- inputs


def _normal(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def host_inputs(method: str, context: int, hosts: int, host: int, dtype: Any,
                key: jax.Array) -> tuple[Callable, tuple]:
    """``(jitted fn, args)`` of one host of ``method`` (``apb``, ``star``, ``ring_contiguous``,
    ``ring_zigzag``) with random inputs of exactly that host's shapes."""
    kq, kk, kv, krk, krv = jax.random.split(key, 5)
    if method in ("apb", "star"):
        lay = critical_layout(method, context, hosts)
        rows = lay.host_len
        args = [_normal(kq, (1, rows, HEADS, HEAD_DIM), dtype),
                _normal(kk, (1, rows, KV_HEADS, HEAD_DIM), dtype),
                _normal(kv, (1, rows, KV_HEADS, HEAD_DIM), dtype)]
        scorer = resolve_scorer("query" if method == "apb" else None, None, lay)
        args.append(jnp.int32(host))
        if scorer is not None:
            shape = (hosts - 1, 1, lay.passing_len, KV_HEADS, HEAD_DIM)
            args += [_normal(krk, shape, dtype), _normal(krv, shape, dtype)]
        return jax.jit(apb_host_fn(lay, scorer)), tuple(args)
    layout = method.removeprefix("ring_")
    block = context // hosts
    args = (_normal(kq, (1, block, HEADS, HEAD_DIM), dtype),
            _normal(kk, (1, block, KV_HEADS, HEAD_DIM), dtype),
            _normal(kv, (1, block, KV_HEADS, HEAD_DIM), dtype),
            _normal(krk, (hosts - 1, 1, block, KV_HEADS, HEAD_DIM), dtype),
            _normal(krv, (hosts - 1, 1, block, KV_HEADS, HEAD_DIM), dtype),
            jnp.int32(host))
    return jax.jit(ring_host_fn(layout, hosts)), args


# ----------------------------------------------------------------------------- token-wise layers


def tokenwise_fn(dtype: Any) -> tuple[Callable, Any]:
    """The token-wise part of one MiniCPM-1B decoder layer (hidden 1536, MLP 3840): RMSNorm,
    q/k/v projections, the output projection (applied to an array of the attention output's
    shape), residual, RMSNorm, SwiGLU MLP, built from ``cpmjax.models.modules``. RoPE and the
    attention itself are left out (the attention is timed separately). Returns ``(jitted
    fn(state, x [b, rows, 1536]), state)``."""
    from flax import nnx

    from cpmjax.models.config import ModelConfig
    from cpmjax.models.modules import MLP, Attention, RMSNorm

    config = ModelConfig(model_type="minicpm", hidden_size=1536, intermediate_size=3840,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         head_dim=HEAD_DIM, num_hidden_layers=52)
    rngs = nnx.Rngs(0)
    layer = nnx.Dict(
        norm1=RMSNorm(config.hidden_size, param_dtype=dtype),
        attention=Attention(config, dtype=dtype, param_dtype=dtype, rngs=rngs),
        norm2=RMSNorm(config.hidden_size, param_dtype=dtype),
        mlp=MLP(config, dtype=dtype, param_dtype=dtype, rngs=rngs),
    )
    graphdef, state = nnx.split(layer)

    def fn(state, x):
        m = nnx.merge(graphdef, state)
        h = m["norm1"](x)
        q = m["attention"].q_proj(h)
        k = m["attention"].k_proj(h)
        v = m["attention"].v_proj(h)
        x = x + m["attention"].o_proj(q)  # q has the attention output's shape [b, rows, hq * d]
        x = x + m["mlp"](m["norm2"](x))
        return x, k, v

    return jax.jit(fn), state


# ----------------------------------------------------------------------------- timing


def _timed(fn: Callable, args: tuple) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0, time.process_time() - c0


def time_methods(entries: dict[str, tuple[Callable, tuple, int]], warmup: int = 1,
                 log: Callable[[str], None] = print,
                 on_round: Callable[[dict], None] | None = None) -> dict[str, dict[str, Any]]:
    """``entries``: name -> (jitted fn, args, repeats). Compile every entry ahead of time, call
    it ``warmup`` times, then time the entries interleaved (round ``i`` runs every entry that
    has more than ``i`` repeats); medians of wall and process CPU seconds."""
    ready = {}
    out: dict[str, dict[str, Any]] = {}
    for name, (fn, args, repeats) in entries.items():
        t0 = time.perf_counter()
        compiled = fn.lower(*args).compile()
        compile_s = time.perf_counter() - t0
        warm = [_timed(compiled, args)[0] for _ in range(warmup)]
        out[name] = {"compile_s": compile_s, "warmup_s": warm, "repeats": repeats,
                     "times": [], "cpu_times": []}
        ready[name] = (compiled, args, repeats)
        log(f"  {name}: compiled in {compile_s:.1f}s, warm-up {[round(w, 2) for w in warm]}")
    for i in range(max(r for _, _, r in ready.values())):
        for name, (compiled, args, repeats) in ready.items():
            if i >= repeats:
                continue
            wall, cpu = _timed(compiled, args)
            row = out[name]
            row["times"].append(wall)
            row["cpu_times"].append(cpu)
            row["median_s"] = statistics.median(row["times"])
            row["median_cpu_s"] = statistics.median(row["cpu_times"])
            log(f"  round {i + 1} {name}: {wall:.2f}s wall, {cpu:.2f}s cpu")
        if on_round is not None:
            on_round(out)
    return out


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def render_markdown(result: dict[str, Any]) -> str:
    """docs/benchmarks/apb_critical.md from a result (numbers quoted from the JSON)."""
    seq, hosts, dtype = result["context_tokens"], result["hosts"], result["dtype"]
    cfg = result["apb"]
    crit = result.get("critical_path", {})
    ra, rl = result.get("ratios_attention", {}), result.get("ratios_layer", {})
    timings = result["timings"]
    lines = [
        f"## APB critical path at {seq // 1024}K: the slowest host's work, one host at a time",
        "",
        f"`{result['command']}` (JSON: [apb_critical.json](apb_critical.json)). "
        f"{result['device']}; {dtype}.",
        "",
        "On 8 simulated devices (the [APB page](apb.md)) the wall time is the *sum* of the 8 "
        "hosts' work. Here each host's work for one attention layer is run **alone on one "
        "device**, with arrays of exactly the shapes that host holds and receives; a method's "
        "critical path is its slowest host. Communication is not run (its volume is counted "
        "analytically below).",
        "",
        f"Setting: {seq:,} context tokens on {hosts} hosts, MiniCPM-1B attention (24 query "
        f"heads, 8 KV heads, head_dim 64, batch 1), {dtype}. APB: block B = "
        f"{cfg['block_len']:,}, anchor {cfg['anchor_len']:,} (B/4), passing {cfg['passing_len']:,}"
        f" (B/8), a {cfg['query_len']}-token query embedded in the anchor at offset "
        f"{cfg['query_offset']}, query-aware compressor (max-pool {cfg['pool_size']}, top-k). "
        f"Star: anchor = B = {result['star_anchor_len']:,}. Load average before the timed run "
        f"{_load(result['load_before'])}, after {_load(result.get('load_after'))}.",
        "",
        "### What one host runs",
        "",
        "- **APB, Star**: the library's per-host kernel `sharding.apb.apb_host_attention` (what "
        "`apb_layer_attention` runs inside `shard_map` on every host), with the host index as a "
        "runtime argument and its `all_gather` answered by the passing blocks the host received "
        f"({hosts - 1} x {cfg['passing_len']:,} keys and values): local causal attention, "
        "scoring + max-pool + top-k of the block it sends, attention of its B local queries to "
        "the anchor (hosts > 0) and the passing blocks of the hosts before it, the log-sum-exp "
        "merge, and the causal attention of the anchor rows (A + B rows in all). Star: the same "
        "kernel on Star's layout (2B rows, nothing passed; host 0 skips the anchor).",
        "- **Ring**: one host's forward of `sharding.burst` (`burst_forward_shard` with a "
        "`OneHostRing`: the library's step sequence, `lax.cond` on the block owners and the "
        f"log-sum-exp merge, for its own block and the {hosts - 1} blocks it receives, a "
        "`fori_loop` over the middle steps), without the `ppermute`. *Contiguous*: what "
        "`generate(prefill=\"ring\")` runs; "
        "the last host attends to every block. *Zigzag*: `sharding.burst`'s default, balanced "
        "(every host does the same work; the last host is timed).",
        "- **Full**: `apb_local_attention(\"blockwise\")` (blockwise flash attention, causal "
        "blocks skipped, 512-token blocks, as every host above uses) on one device over the "
        f"whole sequence; too slow at {seq // 1024}K on this CPU, so timed at "
        + ", ".join(f"{int(s):,}" for s in crit.get("full", {}).get("extrapolated_from", {}))
        + " tokens and extrapolated as `c * s^2` (c = mean of t / s^2).",
        "- **Token-wise layers** (the *layer* columns): RMSNorm, q/k/v/o projections and the "
        "SwiGLU MLP of one MiniCPM-1B layer (hidden 1536, MLP 3840; `cpmjax.models.modules`) on "
        "the rows a host holds: APB A + B, Star 2B, ring B; full = the ring's time x "
        f"{hosts} (linear in rows).",
        "",
        "`--check` runs every host alone at 8 hosts x 512 tokens and asserts its outputs equal "
        "its slice of `apb_layer_attention` and `apb_attention` / `star_attention` (APB, Star) "
        "and of `burst_attention` (ring, both layouts) on 8 simulated devices"
        + (": passed, max abs error " + ", ".join(f"{k} {v:.1e}" for k, v in
                                                  result["check"].items()) + "."
           if result.get("check") else "."),
        "",
        "Timing: every function compiled ahead of time (`lower().compile()`), "
        + (f"{result['warmup']} warm-up call(s), " if result["warmup"] else
           "no warm-up call (at 16K the first call after compiling was at most 0.06 s slower "
           "than the median, nothing against calls of 6-90 s), ")
        + "then timed in rounds, methods interleaved (round i runs every function with more "
        "than i repeats), `jax.block_until_ready`; wall and process CPU time per call.",
        "",
        "### Critical path of one attention layer (measured, seconds)",
        "",
        ("Times: the **first round** of every function (every method ran once, back to back; "
         "the note under the verdict says why not the medians)." if result.get("basis") == "first" else
         "Times: medians over each function's rounds."),
        "",
    ]
    rp = result.get("ratios_analytic_pairs", {})
    lines.append(markdown_table(
        ["method", "slowest host", "attention s", "APB faster by", "analytic", "token-wise s",
         "layer s", "APB faster by (layer)"],
        [[LABELS[m], row["host"], _fmt(row["attention_s"])
          + (" (extrapolated)" if m == "full" and not row.get("measured") else ""),
          f"**{_fmt(ra.get(m))}x**", f"{_fmt(rp.get(m))}x", _fmt(row.get("tokenwise_s")),
          _fmt(row.get("layer_s")), f"**{_fmt(rl.get(m))}x**"] for m, row in crit.items()],
        align="llrrrrrr"))
    lines += [
        "",
        "\"APB faster by\" = method time / APB time. *Analytic* = the same ratio of query-key "
        "pairs the slowest host scores (causal blocks skipped; APB's host 7: B^2/2 + B(A + 7p) "
        "+ A^2/2 = 1.66 B^2, Star 2 B^2, contiguous ring 7.5 B^2, zigzag 4 B^2, full 32 B^2). "
        "*Layer* = attention + the token-wise layers on the host's rows (both measured; not a "
        "whole-model run).",
        "",
        "### Every timed function (median seconds, wall and process CPU)",
        "",
    ]
    lines.append(markdown_table(
        ["function", "rows / tokens", "rounds", "median wall s", "median CPU s",
         "wall s by round", "CPU / wall by round"],
        [[name, result.get("rows", {}).get(name, ""), len(t["times"]), f"{t['median_s']:.2f}",
          f"{t['median_cpu_s']:.2f}", ", ".join(f"{x:.2f}" for x in t["times"]),
          ", ".join(f"{c / w:.2f}" for c, w in zip(t["cpu_times"], t["times"], strict=True))]
         for name, t in timings.items() if t.get("times")],
        align="llrrrll"))
    pairs = result.get("paired_rounds", [])
    if pairs:
        lines += ["", "APB's and Star's slowest hosts, round by round (they run next to each "
                  "other in every round):", "",
                  markdown_table(
                      ["round", "APB wall s", "Star wall s", "Star / APB wall", "APB CPU s",
                       "Star CPU s", "Star / APB CPU"],
                      [[p["round"]] + [f"{p[k]:.2f}" for k in (
                          "apb_s", "star_s", "star_over_apb", "apb_cpu_s", "star_cpu_s",
                          "star_over_apb_cpu")] for p in pairs],
                      align="r" * 7)]
    others = result.get("other_runs", [])
    if others:
        lines += ["", "### The same measurement at other lengths (ratios to APB)", "",
                  markdown_table(
                      ["context tokens", "vs Ring (contiguous)", "vs Ring (zigzag)", "vs Star",
                       "vs Full", "layer: vs Ring (contiguous)", "vs Ring (zigzag)", "vs Star",
                       "command"],
                      [[f"{run['context_tokens']:,}"]
                       + [f"{_fmt(run.get('ratios_attention', {}).get(m))}x"
                          for m in ("ring_contiguous", "ring_zigzag", "star", "full")]
                       + [f"{_fmt(run.get('ratios_layer', {}).get(m))}x"
                          for m in ("ring_contiguous", "ring_zigzag", "star")]
                       + [f"`{run['command']}`"] for run in others],
                      align="r" * 8 + "l")]
    verdict = _verdict(result)
    lines += ["", "### Verdict against the issue's target (APB >= 2x ring, >= 1.25x Star at 128K)",
              "", *verdict, ""]
    lines += _reading(result)
    if result.get("note"):
        lines += [result["note"], ""]
    com = result["communication"]
    lines += [
        "### Communication per host and layer (analytic, not measured)",
        "",
        f"Bytes in {dtype} (keys and values), {hosts} hosts; time = bytes / link bandwidth, one "
        "link per host, latency ignored, no overlap with compute. The query tail (Star's phase "
        "2, the same for APB and Star: two float32 all-reduces of the 64 query rows' partial "
        "outputs and softmax weights) is listed apart.",
        "",
        markdown_table(
            ["method", "what moves", "bytes per host", "query tail bytes", "at 900 GB/s",
             "at 100 GB/s"],
            [[LABELS[m], row["what"], f"{row['bytes'] / 1e6:.1f} MB",
              f"{row.get('query_tail_bytes', 0) / 1e6:.2f} MB",
              f"{row['seconds']['900GB/s'] * 1e3:.3f} ms",
              f"{row['seconds']['100GB/s'] * 1e3:.2f} ms"] for m, row in com["methods"].items()],
            align="llrrrr"),
    ]
    lines += [
        "",
        "Against the CPU seconds above every transfer is negligible, but that comparison "
        "means little: what the transfers cost on real hardware depends on how fast the "
        "accelerator does the attention, which this run cannot tell. Structurally, the ring "
        f"moves {hosts - 1} whole key/value blocks per layer and overlaps each with a step's "
        "attention (`sharding.burst` issues the `ppermute` of the next block before the "
        "current block's attention); APB moves one all-gather of passing blocks, "
        f"{hosts}x fewer bytes than the ring (passing = B/8), which its remote attention "
        "waits for (the local causal attention does not).",
        "",
        "### Caveats",
        "",
        "- CPU, not accelerators: one device of a 2-core machine shared with other jobs (load "
        "averages above). The ratios compare work done by the same kernels on the same device; "
        "absolute seconds say nothing about GPU time.",
        "- One host at a time: each host's work is run alone, so contention between hosts (none "
        "on real hardware) is absent, and so is everything a multi-host run adds: no "
        "communication is run and none is overlapped with compute (see the analytic table).",
        "- Attention only in the first ratio. The target is about prefill wall time; the "
        "*layer* column adds the token-wise layers of one MiniCPM-1B layer on each host's rows "
        "(measured) but not the embedding, LM head or the query tail (64 query rows against "
        "every host's keys: 64 x B per host, under 0.5% of a host's attention; the same for "
        f"APB and Star, and not part of the ring timing, which covers the {seq:,} context "
        "tokens only).",
        "- Not every host is timed (the per-function table lists those that are): APB's host "
        "h reads h passing blocks, so its work grows with h and the last host is the critical "
        "path; Star's hosts > 0 all do the same work; the zigzag ring is balanced by "
        "construction; the contiguous ring's last host has the most blocks to attend.",
        f"- Full attention at {seq // 1024}K is extrapolated, not measured.",
    ]
    return "\n".join(lines) + "\n"


def _load(load: Any) -> str:
    return "-" if not load else "/".join(f"{x:.1f}" for x in load) + " (1/5/15 min)"


def _reading(result: dict[str, Any]) -> list[str]:
    """How the measured ratios sit against the pair-count bound (numbers from ``result``)."""
    ra, rl = result.get("ratios_attention", {}), result.get("ratios_layer", {})
    rp = result.get("ratios_analytic_pairs", {})
    if not all(m in ra and m in rp for m in ("star", "ring_zigzag")):
        return []
    out = [
        f"Reading: on the slowest host APB scores {rp['star']:.2f}x fewer query-key pairs than "
        f"Star and {rp['ring_zigzag']:.2f}x fewer than the zigzag ring (the *analytic* column); "
        "the attention's time follows that count up to per-call overheads, so against Star one "
        f"attention layer cannot reach 1.25x with the paper's defaults on {result['hosts']} "
        f"hosts. The measured ratios are {ra['star'] / rp['star']:.0%} (Star) and "
        f"{ra['ring_zigzag'] / rp['ring_zigzag']:.0%} (zigzag ring) of the pair ratios"
        + (": APB's extra work (scoring its block against the query, max-pool and top-k, "
           "three partial attentions and their log-sum-exp merge) is lost in the noise here."
           if min(ra["star"] / rp["star"], ra["ring_zigzag"] / rp["ring_zigzag"]) >= 0.97 else
           "; the difference is APB's extra work (scoring its block against the query, "
           "max-pool and top-k, three partial attentions and their log-sum-exp merge, and the "
           "padding of its remote keys to whole 512-key blocks).")]
    if "star" in rl:
        out[0] += (" The token-wise layers run on A + B = 1.25B rows on an APB host against 2B "
                   f"on a Star host, which lifts a whole layer to {rl['star']:.2f}x over Star"
                   + (f"; a zigzag ring host holds only B rows, so against it a whole layer's "
                      f"ratio falls to {rl['ring_zigzag']:.2f}x." if "ring_zigzag" in rl
                      else "."))
    return [*out, ""]


def _verdict(result: dict[str, Any]) -> list[str]:
    ra, rl = result.get("ratios_attention", {}), result.get("ratios_layer", {})
    out = []
    for label, ratios in (("attention layer", ra), ("attention + token-wise layers", rl)):
        if not ratios:
            continue
        parts = []
        for m, need in (("ring_contiguous", 2.0), ("ring_zigzag", 2.0), ("star", 1.25)):
            if m in ratios:
                ok = "meets" if ratios[m] >= need else "does NOT meet"
                parts.append(f"{LABELS[m]} {ratios[m]:.2f}x ({ok} {need}x)")
        out.append(f"- Critical path, {label}: APB vs " + "; vs ".join(parts) + ".")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="per-host outputs vs the distributed library calls (8 x 512)")
    parser.add_argument("--seq", type=int, default=131072, help="context tokens")
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--apb-hosts", default="0,7", help="APB / Star hosts to time ('all')")
    parser.add_argument("--ring-hosts", default="7",
                        help="ring hosts to time, both layouts ('all'); the contiguous ring's "
                             "last host is its critical path, zigzag hosts are balanced")
    parser.add_argument("--full-seqs", default="16384,32768",
                        help="lengths at which full attention is timed ('' to skip)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="repeats of the last APB and Star hosts")
    parser.add_argument("--other-repeats", type=int, default=None,
                        help="repeats of everything else (default: --repeats)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls after compiling")
    parser.add_argument("--no-tokenwise", action="store_true",
                        help="skip the token-wise layers (projections + MLP)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--note", default="", help="a line appended to the markdown")
    parser.add_argument("--other-run", action="append", default=[],
                        help="result JSON of a run at another length, quoted in a ratio table")
    parser.add_argument("--out", default="docs/benchmarks/apb_critical.json")
    parser.add_argument("--markdown", default="docs/benchmarks/apb_critical.md",
                        help="markdown page written from the result ('' for none)")
    parser.add_argument("--basis", choices=("median", "first"), default=None,
                        help="times used for the critical path: the median of every "
                             "function's rounds (default) or its first round")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite the markdown from the JSON (with --note if given)")
    args = parser.parse_args()
    out_path = Path(args.out)
    previous = json.loads(out_path.read_text()) if out_path.exists() else {}
    if args.render:
        if args.note:
            previous["note"] = args.note
        if args.basis:
            previous["basis"] = args.basis
        summarise(previous)
        write_json(out_path, previous)
        write_text(args.markdown, render_markdown(previous))
        return
    if args.check:
        errors = check_one_host()
        print("check passed: per-host outputs equal the distributed library calls "
              "(max abs error " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()) + ")")
        previous["check"] = errors
        write_json(out_path, previous)
        if args.markdown and "timings" in previous:
            write_text(args.markdown, render_markdown(previous))
        return
    dtype = jnp.dtype(args.dtype)
    hosts = args.hosts
    other = args.repeats if args.other_repeats is None else args.other_repeats

    def host_list(spec: str) -> list[int]:
        return list(range(hosts)) if spec == "all" else [int(h) for h in spec.split(",") if h]

    key = jax.random.PRNGKey(0)
    entries: dict[str, tuple[Callable, tuple, int]] = {}
    rows: dict[str, int] = {}
    for method, spec in (("apb", args.apb_hosts), ("star", args.apb_hosts),
                         ("ring_contiguous", args.ring_hosts), ("ring_zigzag", args.ring_hosts)):
        hs = host_list(spec)
        for h in hs:
            key, sub = jax.random.split(key)
            fn, fargs = host_inputs(method, args.seq, hosts, h, dtype, sub)
            critical = method in ("apb", "star") and h == max(hs)
            entries[f"{method}/host{h}"] = (fn, fargs, args.repeats if critical else other)
            rows[f"{method}/host{h}"] = fargs[0].shape[1]
    tokenwise_rows: dict[str, dict[str, int]] = {}
    if not args.no_tokenwise:
        fn, state = tokenwise_fn(dtype)
        per_method = {"apb": critical_layout("apb", args.seq, hosts).host_len,
                      "star": critical_layout("star", args.seq, hosts).host_len,
                      "ring_contiguous": args.seq // hosts, "ring_zigzag": args.seq // hosts}
        for method, n in per_method.items():
            tokenwise_rows[method] = {"rows": n}
        for n in sorted(set(per_method.values())):
            key, sub = jax.random.split(key)
            x = _normal(sub, (1, n, 1536), dtype)
            entries[f"tokenwise/{n}"] = (fn, (state, x), other)
            rows[f"tokenwise/{n}"] = n
    full_seqs = [int(s) for s in args.full_seqs.split(",") if s]
    for s in full_seqs:
        key, *subs = jax.random.split(key, 4)
        entries[f"full/{s}"] = (jax.jit(full_fn), (
            _normal(subs[0], (1, s, HEADS, HEAD_DIM), dtype),
            _normal(subs[1], (1, s, KV_HEADS, HEAD_DIM), dtype),
            _normal(subs[2], (1, s, KV_HEADS, HEAD_DIM), dtype)), other)
        rows[f"full/{s}"] = s
    apb = critical_layout("apb", args.seq, hosts)
    result: dict[str, Any] = {
        "command": "python scripts/bench_apb_critical.py " + shlex.join(sys.argv[1:]),
        "device": f"{jax.devices()[0].platform}, one device, {os.cpu_count()} cores",
        "dtype": args.dtype, "context_tokens": args.seq, "hosts": hosts,
        "shape": {"q_heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "batch": 1},
        "apb": {"block_len": apb.block_len, "anchor_len": apb.anchor_len,
                "passing_len": apb.passing_len, "query_len": QUERY_LEN,
                "query_offset": QUERY_OFFSET, "scorer": "query", "pool_size": POOL_SIZE},
        "star_anchor_len": critical_layout("star", args.seq, hosts).anchor_len,
        "warmup": args.warmup, "rows": rows, "tokenwise_rows": tokenwise_rows,
        "load_before": os.getloadavg(), "note": args.note, "basis": args.basis or "median",
        "communication": communication(args.seq, hosts, dtype.itemsize),
    }
    if previous.get("check"):
        result["check"] = previous["check"]
    keep = ("context_tokens", "command", "ratios_attention", "ratios_layer", "critical_path",
            "load_before", "load_after", "dtype")
    result["other_runs"] = [{k: v for k, v in json.loads(Path(p).read_text()).items() if k in keep}
                            for p in args.other_run]

    def save(timings: dict) -> None:
        result["timings"] = timings
        result["load_after"] = os.getloadavg()
        summarise(result)
        write_json(out_path, result)
        if args.markdown:
            write_text(args.markdown, render_markdown(result))

    print(f"timing {len(entries)} one-device functions at {args.seq} context tokens "
          f"({args.dtype}); load average {result['load_before']}", flush=True)
    save(time_methods(entries, args.warmup, log=lambda m: print(m, flush=True), on_round=save))
    crit = result["critical_path"]
    print(f"\ncritical path of one attention layer, {args.seq} context tokens, {hosts} hosts, "
          f"{args.dtype} (one host at a time on one CPU device)")
    print(f"{'method':>16} {'slowest':>10} {'attn s':>8} {'/ APB':>6} {'layer s':>8} {'/ APB':>6}")
    for m, row in crit.items():
        print(f"{m:>16} {row['host']:>10} {row['attention_s']:>8.2f} "
              f"{result['ratios_attention'].get(m, float('nan')):>6.2f} "
              f"{row.get('layer_s', float('nan')):>8.2f} "
              f"{result.get('ratios_layer', {}).get(m, float('nan')):>6.2f}")
    print("\n".join(_verdict(result)))
    print(f"\nload average before {result['load_before']}, after {result['load_after']}")
    print(f"wrote {args.out}" + (f" and {args.markdown}" if args.markdown else ""))


if __name__ == "__main__":
    main()
