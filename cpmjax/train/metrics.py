"""What a training run reports: JSON lines at ``<out_dir>/metrics.jsonl`` (and TensorBoard
scalars when ``tensorboardX`` is installed), a progress bar, and throughput: tokens/s and MFU
against the measured matmul peak of the machine.

- ``MetricsLog(out_dir)``: one JSON record per step, the same scalars to TensorBoard;
  ``read_records(out_dir)`` reads them back;
- ``Throughput(flops_per_token)``: tokens/s and MFU over the window since the last report;
- ``progress_bar(total, initial)``: a tqdm bar on stderr;
- ``flops_per_token(model_config, seq_len)`` and ``measure_matmul_peak()``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from cpmjax.models import ModelConfig

METRICS_FILE = "metrics.jsonl"


def append_record(path: str, record: dict[str, Any]) -> None:
    """Append one JSON line to ``path``."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_records(out_dir: str) -> list[dict[str, Any]]:
    """The records of ``<out_dir>/metrics.jsonl``, in order (step records carry ``loss``,
    ``lr`` ...; evaluation steps add ``eval_loss``; the last line may be ``final_eval_loss``)."""
    with open(os.path.join(out_dir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]


def flops_per_token(mc: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward): ``6 * matmul parameters``
    (the LM head counted, the embedding lookup not) plus causal attention
    ``6 * layers * seq_len * heads * head_dim``."""
    embed = mc.vocab_size * mc.hidden_size
    norms = mc.hidden_size * (2 * mc.num_hidden_layers + 1)
    matmul = mc.num_parameters() - embed - norms
    if mc.tie_word_embeddings:
        matmul += embed
    attn = 6 * mc.num_hidden_layers * seq_len * mc.num_attention_heads * mc.qk_head_dim
    return 6.0 * matmul + attn


_MATMUL = jax.jit(lambda x: x @ x)


def measure_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
    """Measured float32 matmul FLOP/s of the default device (best of ``repeats``): the peak
    MFU is quoted against on CPU. On a shared machine one measurement can come out low, so the
    training loop re-measures at every log step and keeps the maximum seen."""
    a = jnp.ones((n, n), jnp.float32)
    f = _MATMUL
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


class MetricsLog:
    """JSON lines at ``<out_dir>/metrics.jsonl`` plus TensorBoard scalars when available."""

    def __init__(self, out_dir: str, tensorboard: bool = True) -> None:
        self.path = os.path.join(out_dir, METRICS_FILE)
        self.file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
            except ImportError:
                self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (it has a ``step``); its numbers also go to TensorBoard."""
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class Throughput:
    """Tokens/s and MFU over a window of steps. The matmul peak is measured on creation and
    again at every report, keeping the maximum seen (one measurement on a shared machine can
    come out low)."""

    def __init__(self, flops_per_token: float) -> None:
        self.flops_per_token = flops_per_token
        self.peak = measure_matmul_peak()
        self.start()

    def start(self) -> None:
        """Open a new window now."""
        self._t, self._tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        """Count ``tokens`` trained in the current window."""
        self._tokens += tokens

    def report(self) -> dict[str, float]:
        """``{"tokens_per_sec", "mfu", "peak_flops"}`` of the window so far; opens a new one."""
        tps = self._tokens / max(time.perf_counter() - self._t, 1e-9)
        self.peak = max(self.peak, measure_matmul_peak(repeats=3))
        self.start()
        return {"tokens_per_sec": tps, "mfu": tps * self.flops_per_token / self.peak,
                "peak_flops": self.peak}


def progress_bar(total: int, initial: int = 0, desc: str = "train") -> Any:
    """A tqdm progress bar on stderr."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr)
