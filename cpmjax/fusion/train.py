"""Training a fused model as UltraFuser does: two stages over balanced batches, loss on the
response only.

- **Stage 1** trains the gate alone (the specialists are left bit-identical).
- **Stage 2** trains every parameter (``stage2.train: all``), or the gate plus a delta (LoRA,
  ...) on every specialist (``delta``), or the gate alone (``gate``).
- **Balanced sampling** (``BalancedSampler``): every batch holds exactly ``per_domain`` examples
  of every domain; ``balanced: false`` draws the same number of rows from the pooled examples
  (each domain in proportion to its size): the ablation baseline.
- Each example is one instruction/response document (``[BOS] ... [EOS]``, cut or padded to
  ``seq_len + 1`` tokens); the loss counts only the targets after the response marker
  (``cpmjax.train.data.pack_rows(loss_after_id=)``) and is ``cpmjax.train``'s chunked float32
  cross-entropy on the fused features (``FusedLM(return_hidden=True)`` with the concatenated
  head: the fused logits exactly).
- The optimizer is ``cpmjax.train``'s AdamW with μP groups and a WSD schedule per stage; one
  orbax checkpoint (``cpmjax.train.Checkpointer``) holds the whole fused state (every
  specialist, the gate, the optimizer, the sampler position) and a stopped run resumes from it.

A config (YAML, ``cpmjax fuse --config``; see ``configs/ultrafuser.yaml``)::

    specialists: {text: runs/fusion/text/hf, code: runs/fusion/code/hf, math: ...}
    gate: mlp
    data: {domains: {text: [dir], code: [dir], math: [dir]}, seq_len: 128, per_domain: 2,
           loss_after: "###"}
    stage1: {steps: 40, lr: 0.003}
    stage2: {steps: 20, lr: 0.0003, train: all}
    run: {out_dir: runs/fusion/fused, checkpoint_every: 20}
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cpmjax.errors import ConfigError, MissingPathError, NonFiniteLossError
from cpmjax.fusion.io import from_specialist_dirs, save_fused
from cpmjax.fusion.model import FusedLM
from cpmjax.tokenizer import load_tokenizer
from cpmjax.train.checkpoint import Checkpointer
from cpmjax.train.config import read_yaml_config
from cpmjax.train.data import collect_files, pack_rows
from cpmjax.train.loss import chunked_cross_entropy
from cpmjax.train.optim import adamw_mup
from cpmjax.train.schedules import wsd_schedule
from cpmjax.train.setup import marker_token_id

__all__ = [
    "BalancedSampler",
    "FusionConfig",
    "FusionResult",
    "encode_examples",
    "load_fusion_config",
    "make_fusion_step",
    "response_loss",
    "train_fusion",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class FusionData(_Section):
    domains: dict[str, list[str]]  # domain -> corpus sources (dirs / files / globs), in order
    tokenizer: str | None = None  # default: the first specialist's directory
    seq_len: int = 128
    per_domain: int = 2  # examples of each domain in every batch
    balanced: bool = True  # False: per_domain * len(domains) rows from the pooled examples
    loss_after: str | None = "###"
    max_examples: int | None = None  # per domain (smoke tests)


class StageConfig(_Section):
    steps: int = 0
    lr: float = 1e-3
    warmup_steps: int = 5
    decay_steps: int | None = None  # default: 20% of the steps
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    train: Literal["gate", "all", "delta"] = "gate"
    delta: dict[str, Any] = Field(default_factory=lambda: {"method": "lora", "r": 8})


class FusionRun(_Section):
    out_dir: str = "runs/fusion/fused"
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 50
    keep_checkpoints: int = 1
    export_dir: str | None = None  # default: <out_dir>/fused
    export_dtype: Literal["float32", "bfloat16"] = "float32"
    loss_chunk: int = 128
    max_minutes: float | None = None
    resume: bool = True


class FusionConfig(_Section):
    specialists: dict[str, str]  # name -> HF checkpoint dir, in gate order
    gate: Literal["mlp", "linear"] = "mlp"
    gate_hidden: int | None = None
    data: FusionData
    stage1: StageConfig = Field(default_factory=lambda: StageConfig(steps=40, lr=3e-3))
    stage2: StageConfig = Field(default_factory=lambda: StageConfig(steps=20, lr=3e-4,
                                                                    train="all"))
    run: FusionRun = Field(default_factory=FusionRun)

    @property
    def export_dir(self) -> str:
        return self.run.export_dir or os.path.join(self.run.out_dir, "fused")


def load_fusion_config(path: str | os.PathLike | None = None,
                       overrides: dict[str, Any] | list[str] | None = None) -> FusionConfig:
    """A ``FusionConfig`` from YAML (a top-level mapping, or its ``fusion:`` section) with
    dotted ``key.sub=value`` overrides. Errors name the file and the field."""
    data = read_yaml_config(path, "fusion config", overrides, section="fusion")
    try:
        config = FusionConfig(**data)
    except ValidationError as exc:
        raise ConfigError(f"invalid fusion config{f' in {path}' if path else ''}: {exc}") from exc
    for name in ("stage1", "stage2"):
        if getattr(config, name).steps < 0:
            raise ConfigError(f"{name}.steps must be >= 0")
    if config.stage1.steps + config.stage2.steps < 1:
        raise ConfigError("stage1.steps + stage2.steps must be >= 1")
    if config.data.per_domain < 1:
        raise ConfigError(f"data.per_domain must be >= 1, got {config.data.per_domain}")
    return config


# ----------------------------------------------------------------------------------------------
# data
def encode_examples(texts: Sequence[str], tokenizer: Any, seq_len: int) -> np.ndarray:
    """``[n, seq_len + 1]`` int32 rows, one document each: ``[BOS] ids [EOS]`` cut to
    ``seq_len + 1`` tokens or right-padded with the pad id."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = np.full((len(texts), seq_len + 1), pad, np.int32)
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for i, ids in enumerate(encoded):
        doc = (bos + list(ids) + [tokenizer.eos_token_id])[: seq_len + 1]
        rows[i, : len(doc)] = doc
    return rows


def read_domain_texts(sources: Sequence[str], limit: int | None = None) -> list[str]:
    files = collect_files(list(sources))
    if limit is not None:
        files = files[:limit]
    out = []
    for f in files:
        with open(f.path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        if text.strip():
            out.append(text)
    return out


class BalancedSampler:
    """Deterministic, resumable batches over per-domain example rows.

    ``domains``: name -> ``[n_d, seq_len + 1]`` rows. ``balanced=True``: every batch holds
    exactly ``per_domain`` rows of each domain, in domain order (each domain walks its own
    permutations, seeded by ``(seed, domain index, epoch)``); ``False``: ``per_domain *
    len(domains)`` rows drawn from the pooled rows (permutations of the pool). ``next()``
    returns ``pack_rows`` arrays plus ``domain [batch]`` (indices into ``names``). The position
    is ``state()`` / ``restore()``. An empty domain raises ``ConfigError`` naming it."""

    def __init__(self, domains: dict[str, np.ndarray], per_domain: int, *, seed: int = 0,
                 balanced: bool = True, bos_id: int | None = None, pad_id: int | None = None,
                 loss_after_id: int | None = None):
        if not domains:
            raise ConfigError("the balanced sampler needs at least one domain")
        for name, rows in domains.items():
            if rows is None or len(rows) == 0:
                raise ConfigError(f"domain {name!r} has no examples")
        if per_domain < 1:
            raise ConfigError(f"per_domain must be >= 1, got {per_domain}")
        self.names = list(domains)
        self.rows = [np.asarray(domains[n]) for n in self.names]
        self.per_domain = int(per_domain)
        self.seed = int(seed)
        self.balanced = balanced
        self.bos_id, self.pad_id, self.loss_after_id = bos_id, pad_id, loss_after_id
        self.pool_domain = np.concatenate([np.full(len(r), i, np.int32)
                                           for i, r in enumerate(self.rows)])
        self.pool_index = np.concatenate([np.arange(len(r)) for r in self.rows])
        self.batch = 0

    @property
    def batch_size(self) -> int:
        return self.per_domain * len(self.names)

    def state(self) -> dict[str, int]:
        return {"batch": self.batch, "seed": self.seed, "balanced": int(self.balanced)}

    def restore(self, state: dict[str, int]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ConfigError(f"sampler seed {self.seed} differs from the checkpoint's "
                              f"{state['seed']}")
        self.batch = int(state["batch"])

    @staticmethod
    def _take(size: int, count: int, start: int, seed: tuple[int, ...]) -> np.ndarray:
        """Items ``start .. start + count`` of the endless stream of permutations of
        ``range(size)`` (epoch ``e`` seeded by ``seed + (e,)``)."""
        out = np.empty(count, np.int64)
        for j in range(count):
            epoch, within = divmod(start + j, size)
            out[j] = np.random.default_rng([*seed, epoch]).permutation(size)[within]
        return out

    def indices(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(domain [batch_size], row index [batch_size])`` of batch number ``batch``."""
        if self.balanced:
            n = self.per_domain
            dom = np.repeat(np.arange(len(self.names), dtype=np.int32), n)
            idx = np.concatenate([self._take(len(r), n, batch * n, (self.seed, d))
                                  for d, r in enumerate(self.rows)])
            return dom, idx
        picks = self._take(len(self.pool_domain), self.batch_size, batch * self.batch_size,
                           (self.seed, 1_000_003))
        return self.pool_domain[picks], self.pool_index[picks]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        dom, idx = self.indices(self.batch)
        self.batch += 1
        windows = np.stack([self.rows[d][i] for d, i in zip(dom, idx, strict=True)])
        out = pack_rows(windows, self.bos_id, self.pad_id, self.loss_after_id)
        out["domain"] = dom
        return out


# ----------------------------------------------------------------------------------------------
# loss and step
def response_loss(model: Any, batch: dict[str, Any], *, chunk_size: int = 128
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean masked next-token loss of ``model`` (a ``CausalLM`` or a ``FusedLM``: both give
    hidden states whose product with ``head_weight()`` are the logits) on a packed batch."""
    hidden = model(jnp.asarray(batch["input_ids"]), positions=jnp.asarray(batch["positions"]),
                   return_hidden=True)
    return chunked_cross_entropy(hidden, model.head_weight(), jnp.asarray(batch["targets"]),
                                 jnp.asarray(batch["loss_mask"]), chunk_size=chunk_size,
                                 remat=False)


def gate_filter() -> Any:
    return nnx.All(nnx.Param, nnx.PathContains("gate"))


_STEPS: dict[Any, Callable[..., dict[str, Any]]] = {}


def make_fusion_step(wrt: Any, *, chunk_size: int = 128, key: Any = None
                     ) -> Callable[..., dict[str, Any]]:
    """A jitted ``step(fused, optimizer, batch) -> metrics`` that updates the parameters
    selected by the NNX filter ``wrt`` (the rest receive no gradient and no update). With a
    hashable ``key`` naming the filter, the jitted step (and its compilations) is reused by
    later calls with the same key."""
    if key is not None and (key, chunk_size) in _STEPS:
        return _STEPS[(key, chunk_size)]

    @nnx.jit
    def step(fused, optimizer, batch):
        def loss_fn(model):
            return response_loss(model, batch, chunk_size=chunk_size)

        (loss, aux), grads = nnx.value_and_grad(
            loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=True)(fused)
        optimizer.update(fused, grads)
        norm = optax_global_norm(grads)
        return {"loss": loss, "accuracy": aux["accuracy"], "tokens": aux["tokens"],
                "grad_norm": norm}

    if key is not None:
        _STEPS[(key, chunk_size)] = step
    return step


def optax_global_norm(tree: Any) -> jax.Array:
    leaves = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)]
    return jnp.sqrt(sum(leaves)) if leaves else jnp.zeros((), jnp.float32)


def stage_optimizer(fused: FusedLM, stage: StageConfig, wrt: Any) -> nnx.Optimizer:
    """AdamW with μP groups (``cpmjax.train.adamw_mup``: matrices inside the specialists'
    blocks at lr / width_scale, the gate at lr) on a WSD schedule over the stage's steps."""
    decay = stage.decay_steps if stage.decay_steps is not None else max(1, stage.steps // 5)
    warmup = min(stage.warmup_steps, max(stage.steps - 1, 0))
    schedule = wsd_schedule(stage.lr, warmup, max(warmup, stage.steps - decay), decay)
    tx = adamw_mup(schedule, width_scale=fused.config.width_scale,
                   weight_decay=stage.weight_decay, clip_norm=stage.clip_norm)
    return nnx.Optimizer(fused, tx, wrt=wrt)


def stage_filter(fused: FusedLM, stage: StageConfig) -> Any:
    """The parameters a stage trains: the gate; everything; or the gate and the deltas."""
    if stage.train == "gate":
        return gate_filter()
    if stage.train == "all":
        return nnx.Param
    from cpmjax.delta import DeltaParam, attach, names

    hparams = dict(stage.delta)
    method = hparams.pop("method", "lora")
    targets = hparams.pop("targets", None)
    for model in fused.specialists:
        if "fusion" not in names(model):
            attach(model, method, targets=targets, name="fusion", **hparams)
    return nnx.Any(gate_filter(), DeltaParam)


# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FusionResult:
    fused: FusedLM
    history: list[dict[str, Any]]
    export_dir: str | None
    resumed_from: int | None  # the checkpoint step this run started from
    stopped: bool = False  # stopped early by run.max_minutes (resume to finish)


def _log(message: str) -> None:
    print(f"[cpmjax fuse] {message}", file=sys.stderr, flush=True)


def build_sampler(config: FusionConfig, tokenizer: Any) -> BalancedSampler:
    d = config.data
    domains = {}
    for name, sources in d.domains.items():
        if not sources:
            raise ConfigError(f"data.domains.{name} lists no sources")
        try:
            texts = read_domain_texts(sources, d.max_examples)
        except ConfigError as exc:
            raise ConfigError(f"domain {name!r}: {exc}") from exc
        domains[name] = encode_examples(texts, tokenizer, d.seq_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else None
    return BalancedSampler(domains, d.per_domain, seed=config.run.seed, balanced=d.balanced,
                           bos_id=tokenizer.bos_token_id, pad_id=pad,
                           loss_after_id=marker_token_id(tokenizer, d.loss_after))


def train_fusion(config: FusionConfig, *, fused: FusedLM | None = None,
                 log: Callable[[str], None] = _log, export: bool = True) -> FusionResult:
    """Run stage 1 then stage 2 (either may have 0 steps), checkpointing the whole fused state
    to ``<out_dir>/checkpoints`` and resuming from its latest step; export the fused model
    (``save_fused``) at the end. ``fused``: start from this model instead of loading
    ``config.specialists`` (tests)."""
    for name, path in config.specialists.items():
        if fused is None and not os.path.isfile(os.path.join(path, "config.json")):
            raise MissingPathError(f"specialist {name!r}: no HF checkpoint at {path}")
    tokenizer_dir = config.data.tokenizer or next(iter(config.specialists.values()))
    tokenizer = load_tokenizer(tokenizer_dir)
    sampler = build_sampler(config, tokenizer)
    if fused is None:
        fused = from_specialist_dirs(list(config.specialists.values()),
                                     names=list(config.specialists), gate=config.gate,
                                     gate_hidden=config.gate_hidden, seed=config.run.seed)
    os.makedirs(config.run.out_dir, exist_ok=True)
    with open(os.path.join(config.run.out_dir, "fusion.yaml"), "w") as f:
        yaml.safe_dump(config.model_dump(), f, sort_keys=False)
    stages = [("stage1", config.stage1), ("stage2", config.stage2)]
    s1 = config.stage1.steps
    total = s1 + config.stage2.steps
    ckpt = Checkpointer(os.path.join(config.run.out_dir, "checkpoints"),
                        keep=config.run.keep_checkpoints)
    latest = ckpt.latest_step() if config.run.resume else None
    # a checkpoint at step k <= stage1.steps holds stage 1's optimizer, later ones stage 2's
    resume_stage = None if latest is None else (0 if latest <= s1 and s1 > 0 else 1)
    history: list[dict[str, Any]] = []
    metrics_path = os.path.join(config.run.out_dir, "metrics.jsonl")
    t_start = time.perf_counter()
    stopped = False
    try:
        for index, (stage_name, stage) in enumerate(stages):
            if stage.steps == 0 or (resume_stage is not None and index < resume_stage):
                continue
            first = 0 if index == 0 else s1
            wrt = stage_filter(fused, stage)
            optimizer = stage_optimizer(fused, stage, wrt)
            train_step = make_fusion_step(wrt, chunk_size=config.run.loss_chunk,
                                          key=stage.train)
            step = first
            if resume_stage == index:
                state, meta = ckpt.restore({"model": nnx.state(fused, nnx.Param),
                                            "optimizer": nnx.state(optimizer)}, latest)
                nnx.update(fused, state["model"])
                nnx.update(optimizer, state["optimizer"])
                sampler.restore(meta["sampler"])
                step, resume_stage = latest, None
                log(f"resumed from step {latest} ({stage_name})")
            while step < first + stage.steps:
                batch = next(sampler)
                domain = batch.pop("domain")
                metrics = train_step(fused, optimizer, {k: jnp.asarray(v)
                                                        for k, v in batch.items()})
                step += 1
                loss = float(metrics["loss"])
                if not np.isfinite(loss):
                    raise NonFiniteLossError(f"{stage_name} step {step}: loss is {loss}")
                record = {"step": step, "stage": stage_name, "loss": loss,
                          "grad_norm": float(metrics["grad_norm"]),
                          "domains": np.bincount(domain, minlength=len(sampler.names)).tolist()}
                history.append(record)
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if step % config.run.log_every == 0 or step == total:
                    log(f"{stage_name} step {step}/{total}: loss {loss:.4f}")
                out_of_time = (config.run.max_minutes is not None and
                               time.perf_counter() - t_start > 60 * config.run.max_minutes)
                if (step % config.run.checkpoint_every == 0 or step == first + stage.steps
                        or out_of_time):
                    ckpt.save(step, {"model": nnx.state(fused, nnx.Param),
                                     "optimizer": nnx.state(optimizer)},
                              {"stage": stage_name, "sampler": sampler.state()})
                if out_of_time:
                    log(f"stopping at step {step}: run.max_minutes={config.run.max_minutes}")
                    stopped = True
                    break
            if stopped:
                break
    finally:
        ckpt.close()
    export_dir = None
    if export and not stopped:
        if config.stage2.train == "delta" and config.stage2.steps:
            from cpmjax.delta import merge

            for model in fused.specialists:
                merge(model, "fusion")
        export_dir = save_fused(fused, config.export_dir, tokenizer_dir=tokenizer_dir,
                                dtype=config.run.export_dtype)
        log(f"exported the fused model to {export_dir}")
    return FusionResult(fused=fused, history=history, export_dir=export_dir,
                        resumed_from=latest, stopped=stopped)
