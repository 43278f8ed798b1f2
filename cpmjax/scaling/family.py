"""The model wind tunnel: a family of small MiniCPM models trained with one recipe (WSD + μP).

One YAML file (``configs/wind-tunnel.yaml``, read by :func:`load_family_config`) names the sizes
(layers and width grow together), the shared training recipe (a ``cpmjax train`` config
fragment: μP fields, one learning rate for every width), the data mix and the decay branches.
:func:`train_family` then, for every size, runs

1. one **stable** run (warmup, then the constant peak rate) to the last branch start, saving a
   checkpoint at every branch start;
2. one **decay branch** per branch start ``s``: the stable checkpoint at step ``s`` is copied
   into the branch's run directory and ``cpmjax.train.train`` resumes it under the WSD schedule
   with ``decay_start = s`` and ``decay_steps = ceil(decay_fraction * s)``, then exports the
   model (HF layout). The branch has seen ``(s + decay_steps) * batch_size * seq_len`` tokens.

Every run goes through ``cpmjax.train.train`` (same data pipeline, step, checkpoints, export);
this module only builds the configs and keeps the family index ``<out_dir>/family.json``
(each run's config, tokens, losses, wall time and export directory; :func:`family_runs` reads
it). A rerun skips what the index records as finished and resumes a run that was interrupted
from its last checkpoint.

The data: the task suite's training split (``cpmjax.scaling.tasks``, written to
``<out_dir>/tasks``; its test split is never trained on) cut into shard files, mixed with a
deterministic subset of local text (Python standard library sources by default) capped at
``data.text_bytes``; one byte-level BPE of ``data.vocab_size`` entries is trained once on the
training files of that mix and shared by every size, so compute goes to the non-embedding part.

:func:`lr_sweep` runs the μP check: short runs at a few learning rates at the smallest and the
largest width (``lr_sweep`` section), recorded in ``<out_dir>/lr_sweep.json``; with μP the best
rate should be the same at both. Both index files are updated under a file lock, re-read
before each write, so several processes (``--only`` different sizes, the sweep) can share one
``out_dir``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cpmjax.errors import ConfigError, MissingPathError, TrainingError

INDEX_FILE = "family.json"
SWEEP_FILE = "lr_sweep.json"

__all__ = [
    "INDEX_FILE",
    "FamilyBranch",
    "FamilyConfig",
    "FamilyRun",
    "SizeSpec",
    "family_heldout_loss",
    "unseen_text_files",
    "corpus_text_keys",
    "family_runs",
    "load_family_config",
    "lr_sweep",
    "lr_sweep_results",
    "sweep_summary",
    "non_embedding_params",
    "prepare_family_data",
    "run_config",
    "train_family",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class SizeSpec(_Section):
    """One member of the family: ``layers`` decoder layers of width ``hidden``; the heads are
    ``hidden / head_dim`` (as many key/value heads as query heads) and the MLP is
    ``ffn_ratio * hidden`` wide (rounded to a multiple of 8) unless given."""

    name: str
    layers: int = Field(ge=1)
    hidden: int = Field(ge=8)
    heads: int | None = None
    intermediate: int | None = None


class FamilyData(_Section):
    """The data mix: the task suite's train split plus local text, one shared tokenizer."""

    text_sources: list[str] = Field(default_factory=lambda: ["stdlib"])
    text_bytes: int = 4_000_000  # cap on the local text copied into the mix
    tasks: list[str] | None = None  # default: every task of cpmjax.scaling.TASKS
    n_train: int = 20_000  # task instances per task in the training split
    n_test: int = 200  # held-out test instances per task (never trained on)
    task_seed: int = 0
    documents_per_shard: int = 64
    vocab_size: int = 1024
    seq_len: int = 128
    batch_size: int = 16
    eval_fraction: float = 0.05


class BranchSpec(_Section):
    """Decay branches: one per stable step in ``starts``; each decays for
    ``ceil(decay_fraction * start)`` steps (MiniCPM: about 10% of the tokens)."""

    starts: list[int]
    decay_fraction: float = Field(default=0.1, gt=0.0, le=1.0)

    def decay_steps(self, start: int) -> int:
        return max(1, math.ceil(self.decay_fraction * start))


class SweepSpec(_Section):
    """The μP check: ``steps``-step runs (the last ``decay_fraction`` decaying) at each rate of
    ``lrs`` for each size of ``sizes``: names of family sizes or sizes of their own (e.g. the
    smallest and the largest width at one depth); default the family's smallest and largest."""

    lrs: list[float]
    seeds: list[int] = Field(default_factory=lambda: [0])  # each rate runs once per seed
    steps: int = Field(default=200, ge=2)
    decay_fraction: float = Field(default=0.1, gt=0.0, le=1.0)
    sizes: list[str | SizeSpec] | None = None


class SpanRequirement(_Section):
    """What the family must span (checked when the config is loaded)."""

    min_sizes: int = 1
    min_ratio: float = 1.0  # largest / smallest non-embedding parameters


class FamilyConfig(_Section):
    out_dir: str = "runs/wind-tunnel"
    head_dim: int = 16
    ffn_ratio: float = 2.5
    sizes: list[SizeSpec]
    data: FamilyData = Field(default_factory=FamilyData)
    branches: BranchSpec
    # a cpmjax train config fragment shared by every run (model.config μP fields, init_std,
    # optim, run); the family fills in the sizes, data, schedule, steps and directories
    recipe: dict[str, Any] = Field(default_factory=dict)
    lr_sweep: SweepSpec | None = None
    require: SpanRequirement = Field(default_factory=SpanRequirement)

    @model_validator(mode="after")
    def _check(self) -> FamilyConfig:
        problem = family_problem(self)
        if problem:
            raise ValueError(problem)
        return self

    # ------------------------------------------------------------------------------------
    def model_fields_for(self, size: SizeSpec) -> dict[str, Any]:
        """The HF config fields of ``size`` (the recipe's ``model.config`` plus the shape)."""
        heads = size.heads or max(1, size.hidden // self.head_dim)
        inter = size.intermediate or int(round(self.ffn_ratio * size.hidden / 8) * 8)
        fields = dict(self.recipe.get("model", {}).get("config", {}))
        fields.update(hidden_size=size.hidden, num_hidden_layers=size.layers,
                      num_attention_heads=heads, num_key_value_heads=heads,
                      intermediate_size=inter)
        fields.setdefault("model_type", "minicpm")
        fields.setdefault("vocab_size", -(-self.data.vocab_size // 128) * 128)
        fields.setdefault("max_position_embeddings", max(256, self.data.seq_len))
        return fields

    def size(self, name: str) -> SizeSpec:
        for s in self.sizes:
            if s.name == name:
                return s
        raise ConfigError(f"no size named {name!r} in the family; sizes: "
                          f"{', '.join(s.name for s in self.sizes)}")

    @property
    def stable_steps(self) -> int:
        return max(self.branches.starts)

    @property
    def tokens_per_step(self) -> int:
        return self.data.batch_size * self.data.seq_len

    def branch_tokens(self) -> list[int]:
        return [(s + self.branches.decay_steps(s)) * self.tokens_per_step
                for s in sorted(self.branches.starts)]

    def span(self) -> float:
        """Largest over smallest non-embedding parameter count."""
        counts = [non_embedding_params(self.model_fields_for(s)) for s in self.sizes]
        return max(counts) / min(counts)


def family_problem(config: FamilyConfig) -> str | None:
    """Why ``config`` does not describe a usable family (a message naming the field), or
    None."""
    if not config.sizes:
        return "sizes is empty: list at least one {name, layers, hidden}"
    names = [s.name for s in config.sizes]
    if len(set(names)) != len(names):
        return f"sizes: names must be distinct, got {names}"
    for s in config.sizes:
        if not s.name or any(c in s.name for c in "/\\ ") or s.name.startswith("."):
            return f"sizes: {s.name!r} cannot be a directory name"
        heads = s.heads or max(1, s.hidden // config.head_dim)
        if s.hidden % heads:
            return f"sizes.{s.name}: hidden={s.hidden} is not divisible by heads={heads}"
    counts = [non_embedding_params(config.model_fields_for(s)) for s in config.sizes]
    for a, b, ca, cb in zip(config.sizes, config.sizes[1:], counts, counts[1:], strict=False):
        if not (b.layers >= a.layers and b.hidden >= a.hidden and cb > ca):
            return (f"sizes must grow in layers and width together, in order: {a.name} "
                    f"({a.layers} layers, width {a.hidden}) -> {b.name} ({b.layers} layers, "
                    f"width {b.hidden})")
    need = config.require
    if len(config.sizes) < need.min_sizes:
        return f"the family has {len(config.sizes)} sizes, require.min_sizes={need.min_sizes}"
    ratio = counts[-1] / counts[0]
    if ratio < need.min_ratio:
        return (f"the family spans {ratio:.1f}x in non-embedding parameters ({counts[0]} to "
                f"{counts[-1]}), require.min_ratio={need.min_ratio:g}")
    starts = config.branches.starts
    if not starts or any(s < 1 for s in starts) or len(set(starts)) != len(starts):
        return f"branches.starts must be distinct steps >= 1, got {starts}"
    warmup = config.recipe.get("optim", {}).get("warmup_steps", 50)
    if min(starts) < warmup:
        return (f"branches.starts: {min(starts)} is before the end of warmup "
                f"(recipe.optim.warmup_steps={warmup})")
    for section in ("data", "delta", "compress", "distill"):
        if section in config.recipe:
            return (f"recipe.{section} is set by the family (data: the data section of the "
                    f"family config); remove it from the recipe")
    if config.lr_sweep is not None:
        for name in config.lr_sweep.sizes or []:
            if isinstance(name, str) and name not in names:
                return f"lr_sweep.sizes: no size named {name!r} (sizes: {', '.join(names)})"
        if not config.lr_sweep.lrs or any(lr <= 0 for lr in config.lr_sweep.lrs):
            return f"lr_sweep.lrs must be positive rates, got {config.lr_sweep.lrs}"
    return None


def load_family_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None
                       ) -> FamilyConfig:
    """Read a wind-tunnel YAML file (see ``configs/wind-tunnel.yaml``); ``overrides`` replace
    top-level keys (e.g. ``{"out_dir": ...}``). Errors name the file and the field."""
    from cpmjax.train.config import read_yaml_config

    path = os.fspath(path)
    data = read_yaml_config(path, "family config")
    data.update(overrides or {})
    try:
        return FamilyConfig(**data)
    except ValidationError as exc:
        raise ConfigError(f"invalid family config {path}: {exc}") from exc


# ----------------------------------------------------------------------------------------------
# parameter counts


def non_embedding_params(config_or_model: Any) -> int:
    """Parameters outside the token embedding and the LM head (the N of scaling laws).

    Takes a ``CausalLM`` (its ``nnx.Param`` leaves are counted), a ``cpmjax.models.ModelConfig``
    or an HF config dict (counted from the shapes), or a ``TrainConfig`` (its
    ``model.config``)."""
    from flax import nnx

    from cpmjax.models import CausalLM, ModelConfig

    if isinstance(config_or_model, CausalLM):
        total = 0
        for path, var in nnx.to_flat_state(nnx.state(config_or_model, nnx.Param)):
            names = [str(p) for p in path]
            if "embed_tokens" in names or "lm_head" in names:
                continue
            total += int(math.prod(var.shape))
        return total
    if hasattr(config_or_model, "model") and hasattr(config_or_model.model, "config"):
        config_or_model = dict(config_or_model.model.config)  # a TrainConfig
    if isinstance(config_or_model, dict):
        fields = dict(config_or_model)
        fields.setdefault("vocab_size", 128)
        fields.setdefault("model_type", "minicpm")
        config_or_model = ModelConfig.from_hf_dict(fields)
    if not isinstance(config_or_model, ModelConfig):
        raise ConfigError(f"non_embedding_params: cannot count {type(config_or_model).__name__}"
                          "; pass a CausalLM, ModelConfig, HF config dict or TrainConfig")
    mc = config_or_model
    embedding = mc.vocab_size * mc.hidden_size * (1 if mc.tie_word_embeddings else 2)
    return int(mc.num_parameters() - embedding)


# ----------------------------------------------------------------------------------------------
# data


def _text_files(sources: list[str]) -> list[Any]:
    from cpmjax.train.data import collect_files

    files = collect_files(sources)
    # a deterministic, spread-out subset: order by a hash of the file's key
    return sorted(files, key=lambda f: hashlib.sha256(f.key.encode()).hexdigest())


def prepare_family_data(config: FamilyConfig, *, log: Any = print) -> dict[str, Any]:
    """Write the task suite, the corpus of the mix and the shared tokenizer under
    ``out_dir`` (each once; a rerun reuses them). Returns paths and sizes."""
    from cpmjax.scaling.tasks import TASKS, load_instances, make_task_suite, training_documents
    from cpmjax.train.data import collect_files, split_files
    from cpmjax.train.tokenizer import train_bpe

    d = config.data
    out = os.path.abspath(config.out_dir)
    tasks_dir = os.path.join(out, "tasks")
    names = d.tasks or sorted(TASKS)
    if not all(os.path.isfile(os.path.join(tasks_dir, n, "train.txt")) for n in names):
        log(f"[wind tunnel] writing the task suite ({', '.join(names)}) to {tasks_dir}")
        make_task_suite(tasks_dir, n_train=d.n_train, n_test=d.n_test, seed=d.task_seed,
                        tasks=names)
    corpus = os.path.join(out, "corpus")
    done = os.path.join(corpus, ".complete")
    if not os.path.isfile(done):
        log(f"[wind tunnel] writing the training corpus to {corpus}")
        if os.path.isdir(corpus):
            shutil.rmtree(corpus)
        for name in names:
            task = TASKS[name]
            docs = training_documents(load_instances(os.path.join(tasks_dir, name), "train"),
                                      task, seed=d.task_seed)
            shard_dir = os.path.join(corpus, "tasks", name)
            os.makedirs(shard_dir, exist_ok=True)
            for k in range(0, len(docs), d.documents_per_shard):
                with open(os.path.join(shard_dir, f"shard-{k // d.documents_per_shard:04d}.txt"),
                          "w") as f:
                    f.write("\n".join(docs[k:k + d.documents_per_shard]))
        text_dir = os.path.join(corpus, "text")
        os.makedirs(text_dir, exist_ok=True)
        used = 0
        for i, f in enumerate(_text_files(d.text_sources)):
            if used >= d.text_bytes:
                break
            size = os.path.getsize(f.path)
            if size == 0 or size > d.text_bytes // 4:
                continue  # keep the text varied: no single file takes a quarter
            shutil.copyfile(f.path, os.path.join(text_dir, f"{i:05d}-{_corpus_name(f.key)}"))
            used += size
        with open(done, "w") as f:
            f.write("complete\n")
    tok_dir = os.path.join(out, "tokenizer")
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer_config.json")):
        files, _ = split_files(collect_files([corpus]), d.eval_fraction)
        log(f"[wind tunnel] training the shared byte-level BPE ({d.vocab_size} entries) on "
            f"{len(files)} files")
        train_bpe([f.path for f in files], tok_dir, d.vocab_size)
    return {"tasks_dir": tasks_dir, "corpus": corpus, "tokenizer": tok_dir,
            "cache_dir": os.path.join(out, "data"), "tasks": names}


def _corpus_name(key: str) -> str:
    """The name under ``corpus/text`` of the source file with ``key`` (after an index and a
    dash): ``stdlib/json/decoder.py`` -> ``stdlib__json__decoder.py.txt``."""
    return key.replace("/", "__") + ".txt"


def corpus_text_keys(config: FamilyConfig, *, training_only: bool = False) -> set[str]:
    """The keys (``CorpusFile.key``) of the family's text-source files that its corpus holds;
    with ``training_only``, only those in the corpus's training split (the held-out split,
    ``data.eval_fraction`` of the corpus files, left out). Needs the written corpus."""
    from cpmjax.train.data import collect_files, split_files

    corpus = os.path.join(os.path.abspath(config.out_dir), "corpus")
    if not os.path.isfile(os.path.join(corpus, ".complete")):
        raise MissingPathError(f"no finished family corpus at {corpus}: prepare the family's "
                               "data first")
    files = collect_files([corpus])
    if training_only:  # the split the family trained on (over tasks and text together)
        files, _ = split_files(files, config.data.eval_fraction)
    held = {os.path.basename(f.path).split("-", 1)[1] for f in files
            if f.key.startswith("text/")}
    return {f.key for f in collect_files(list(config.data.text_sources))
            if _corpus_name(f.key) in held}


def unseen_text_files(config: FamilyConfig) -> list[Any]:
    """The files of the family's text sources that its corpus does not hold (neither its
    training nor its held-out split): text no size of the family has seen, for
    evaluation-only tasks (``cpmjax.scaling.tasks.make_text_task``). Needs the written corpus."""
    from cpmjax.train.data import collect_files

    held = corpus_text_keys(config)
    return [f for f in collect_files(list(config.data.text_sources)) if f.key not in held]


# ----------------------------------------------------------------------------------------------
# run configs


def run_config(config: FamilyConfig, size: SizeSpec, *, out_dir: str, steps: int,
               decay_start: int | None, decay_steps: int | None = None,
               lr: float | None = None, checkpoint_every: int = 0, keep: int = 3,
               export: bool = True, seed: int | None = None) -> Any:
    """The ``cpmjax.train`` config of one run of the family: the recipe, the size's model
    fields, the family's data, and a constant schedule (``decay_start=None``, the stable run)
    or WSD decaying from ``decay_start`` for ``decay_steps``."""
    from cpmjax.train.config import TrainConfig

    out = os.path.abspath(config.out_dir)
    tree = json.loads(json.dumps(config.recipe))  # a deep copy
    model = tree.setdefault("model", {})
    model["config"] = config.model_fields_for(size)
    d = config.data
    tree["data"] = {"sources": [os.path.join(out, "corpus")],
                    "tokenizer": os.path.join(out, "tokenizer"),
                    "vocab_size": d.vocab_size, "eval_fraction": d.eval_fraction,
                    "seq_len": d.seq_len, "batch_size": d.batch_size,
                    "cache_dir": os.path.join(out, "data")}
    optim = tree.setdefault("optim", {})
    if lr is not None:
        optim["lr"] = lr
    if decay_start is None:
        optim.update(schedule="constant", decay_start=None, decay_steps=None)
    else:
        optim.update(schedule="wsd", decay_start=decay_start, decay_steps=decay_steps)
    run = tree.setdefault("run", {})
    if seed is not None:
        run["seed"] = seed
    run.update(steps=steps, out_dir=out_dir, checkpoint_every=checkpoint_every,
               checkpoint_minutes=None, keep_checkpoints=keep, resume=True,
               export_dir=os.path.join(out_dir, "hf") if export else None)
    try:
        return TrainConfig(**tree)
    except ValidationError as exc:
        raise ConfigError(f"family run {out_dir}: invalid training config: {exc}") from exc


# ----------------------------------------------------------------------------------------------
# the index


@dataclasses.dataclass(frozen=True)
class FamilyBranch:
    """One decay branch: decays from stable step ``start_step`` to ``steps``."""

    start_step: int
    steps: int
    tokens: int
    train_loss: float | None
    eval_loss: float | None
    wall_s: float
    export_dir: str | None


@dataclasses.dataclass(frozen=True)
class FamilyRun:
    """One size of the family as recorded in the index (its finished branches only)."""

    name: str
    non_embedding_params: int
    total_params: int
    layers: int
    width: int
    branches: list[FamilyBranch]
    stable_wall_s: float

    @property
    def branch_tokens(self) -> list[int]:
        return [b.tokens for b in self.branches]

    @property
    def final(self) -> FamilyBranch | None:
        """The branch with the most tokens (None before any branch finished)."""
        return max(self.branches, key=lambda b: b.tokens) if self.branches else None

    @property
    def train_loss(self) -> float | None:
        return self.final.train_loss if self.final else None

    @property
    def eval_loss(self) -> float | None:
        return self.final.eval_loss if self.final else None

    @property
    def export_dir(self) -> str | None:
        return self.final.export_dir if self.final else None

    @property
    def wall_s(self) -> float:
        return self.stable_wall_s + sum(b.wall_s for b in self.branches)


def _read_index(out_dir: str, name: str = INDEX_FILE) -> dict[str, Any]:
    path = os.path.join(out_dir, name)
    if not os.path.isfile(path):
        return {"runs": {}} if name == INDEX_FILE else {}
    with open(path) as f:
        return json.load(f)


def _update_index(out_dir: str, update: Any, name: str = INDEX_FILE) -> None:
    """Apply ``update(index)`` to the index file under a lock, re-reading it first, so that
    several processes (``--only`` different sizes, the lr sweep) never drop each other's
    entries. Written to a temporary name and renamed."""
    import fcntl

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        index = _read_index(out_dir, name)
        update(index)
        path = os.path.join(out_dir, name)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(index, f, indent=1, sort_keys=True)
        os.replace(tmp, path)


def _save_entry(out_dir: str, section: str, key: str, value: Any,
                name: str = INDEX_FILE) -> None:
    def update(index: dict[str, Any]) -> None:
        index.setdefault(section, {})[key] = json.loads(json.dumps(value))

    _update_index(out_dir, update, name)


def family_heldout_loss(model: Any, directory: str | os.PathLike) -> float:
    """The held-out loss of ``model`` on the family's held-out split, exactly as the family's
    branches record theirs (``eval_loss``: the recipe's ``run.eval_batches`` packed batches of
    the held-out files, same tokenizer and token cache): how any model (a recipe variant, a
    compressed model) is placed on the family's loss law."""
    directory = os.fspath(directory)
    index = _read_index(directory)
    if "config" not in index:
        raise MissingPathError(f"no family config recorded in {os.path.join(directory, INDEX_FILE)}"
                               " (run cpmjax scaling family first)")
    from cpmjax.train.evaluate import heldout_loss

    config = FamilyConfig(**{**index["config"], "out_dir": os.path.abspath(directory)})
    train_config = run_config(config, config.sizes[0], out_dir=os.path.join(directory, "eval"),
                              steps=1, decay_start=None, export=False)
    return heldout_loss(model, train_config)


def family_runs(directory: str | os.PathLike) -> list[FamilyRun]:
    """The sizes recorded in ``<directory>/family.json``, smallest first, with their finished
    decay branches (fewest tokens first)."""
    directory = os.fspath(directory)
    path = os.path.join(directory, INDEX_FILE)
    if not os.path.isfile(path):
        raise MissingPathError(f"no family index {path} (run cpmjax scaling family first)")
    index = _read_index(directory)
    runs = []
    for name, entry in index["runs"].items():
        branches = [FamilyBranch(start_step=b["start_step"], steps=b["steps"],
                                 tokens=b["tokens"], train_loss=b.get("train_loss"),
                                 eval_loss=b.get("eval_loss"), wall_s=b.get("wall_s", 0.0),
                                 export_dir=b.get("export_dir"))
                    for b in entry.get("branches", {}).values() if b.get("done")]
        runs.append(FamilyRun(name=name, non_embedding_params=entry["non_embedding_params"],
                              total_params=entry["total_params"], layers=entry["layers"],
                              width=entry["width"],
                              branches=sorted(branches, key=lambda b: b.tokens),
                              stable_wall_s=entry.get("stable", {}).get("wall_s", 0.0)))
    return sorted(runs, key=lambda r: r.non_embedding_params)


# ----------------------------------------------------------------------------------------------
# training


def _final_train_loss(out_dir: str, last: int = 20) -> float | None:
    """Mean training loss over the last ``last`` steps of a run (its metrics.jsonl)."""
    from cpmjax.train.metrics import read_records

    try:
        losses = [r["loss"] for r in read_records(out_dir) if "loss" in r]
    except FileNotFoundError:
        return None
    return float(sum(losses[-last:]) / len(losses[-last:])) if losses else None


def _checkpoint_steps(run_dir: str) -> list[int]:
    directory = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(e) for e in os.listdir(directory) if e.isdigit()
                  and os.path.isdir(os.path.join(directory, e)))


def _timed_train(train_config: Any, *, export: bool) -> tuple[Any, float]:
    from cpmjax.train import train

    t0 = time.time()
    result = train(train_config, export=export)
    return result, time.time() - t0


def _size_entry(config: FamilyConfig, size: SizeSpec) -> dict[str, Any]:
    from cpmjax.models import ModelConfig

    fields = config.model_fields_for(size)
    return {"name": size.name, "layers": size.layers, "width": size.hidden,
            "model_config": fields, "non_embedding_params": non_embedding_params(fields),
            "total_params": ModelConfig.from_hf_dict(fields).num_parameters()}


def train_family(config: FamilyConfig, *, only: Iterable[str] | None = None,
                 dry_run: bool = False, progress: bool = True, log: Any = None
                 ) -> list[dict[str, Any]]:
    """Train (or resume) the family: every size's stable run and decay branches, recording
    each in ``<out_dir>/family.json``. ``only``: names of the sizes to train (default all).
    ``dry_run``: print the plan, touch nothing. Returns the plan: one record per run with
    ``action`` ``"train"``, ``"resume"`` or ``"skip"`` (finished before)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = os.path.abspath(config.out_dir)
    names = list(only) if only else [s.name for s in config.sizes]
    sizes = [config.size(n) for n in names]  # unknown names: ConfigError before any work
    index = _read_index(out)
    plan = []
    for size in sizes:
        entry = index["runs"].get(size.name, {})
        stable_dir = os.path.join(out, size.name, "stable")
        stable_done = entry.get("stable", {}).get("done", False)
        plan.append({"size": size.name, "run": "stable", "steps": config.stable_steps,
                     "tokens": config.stable_steps * config.tokens_per_step,
                     "action": "skip" if stable_done else (
                         "resume" if _checkpoint_steps(stable_dir) else "train")})
        for start in sorted(config.branches.starts):
            b = entry.get("branches", {}).get(str(start), {})
            steps = start + config.branches.decay_steps(start)
            bdir = os.path.join(out, size.name, f"decay-{start}")
            plan.append({"size": size.name, "run": f"decay-{start}", "steps": steps,
                         "tokens": steps * config.tokens_per_step,
                         "action": "skip" if b.get("done") else (
                             "resume" if _checkpoint_steps(bdir) else "train")})
    if dry_run:
        for s in sizes:
            e = _size_entry(config, s)
            log(f"[wind tunnel] {s.name}: {s.layers} layers, width {s.hidden}, "
                f"{e['non_embedding_params']:,} non-embedding / {e['total_params']:,} params")
        for p in plan:
            log(f"[wind tunnel]   {p['size']:>10} {p['run']:>12} {p['steps']:>6} steps "
                f"{p['tokens']:>10,} tokens  {p['action']}")
        return plan

    total = sum(1 for p in plan if p["action"] != "skip")
    if total == 0:
        log(f"[wind tunnel] nothing to do: every run of {', '.join(names)} is finished "
            f"({os.path.join(out, INDEX_FILE)})")
        return plan
    prepare_family_data(config, log=log)

    def record_config(index: dict[str, Any]) -> None:
        index["config"] = json.loads(config.model_dump_json())

    _update_index(out, record_config)
    done_count = 0
    for size in sizes:
        with _size_lock(out, size.name):
            done_count = _train_size(config, size, index, total, done_count, progress, log)
            if done_count < 0:
                return plan
    return plan


@contextlib.contextmanager
def _size_lock(out: str, name: str) -> Iterator[None]:
    """Hold ``<out>/<name>/.lock`` while a size trains: a second process that would train the
    same size in the same directory (and race its checkpoints) gets a ``TrainingError``."""
    import fcntl

    os.makedirs(os.path.join(out, name), exist_ok=True)
    with open(os.path.join(out, name, ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise TrainingError(
                f"another process is training {name} in {out} (it holds {lock.name}); wait "
                "for it or stop it") from exc
        yield


def _train_size(config: FamilyConfig, size: SizeSpec, index: dict[str, Any], total: int,
                done_count: int, progress: bool, log: Any) -> int:
    """Train one size's stable run and branches; returns the runs counted so far, or -1 when
    a run stopped early (``run.max_minutes``)."""
    out = os.path.abspath(config.out_dir)
    entry = dict(index["runs"].get(size.name, {}))
    entry.update(_size_entry(config, size))
    entry.setdefault("branches", {})
    stable = entry.setdefault("stable", {"done": False, "wall_s": 0.0})
    stable_dir = os.path.join(out, size.name, "stable")
    starts = sorted(config.branches.starts)
    every = math.gcd(*starts)
    stable_config = run_config(config, size, out_dir=stable_dir, steps=config.stable_steps,
                               decay_start=None, checkpoint_every=every,
                               keep=config.stable_steps // every + 2, export=False)
    stable_config.run.progress = progress
    if not stable["done"]:
        done_count += 1
        log(f"[wind tunnel] ({done_count}/{total}) {size.name} stable run: "
            f"{config.stable_steps} steps, checkpoints at {starts}")
        result, wall = _timed_train(stable_config, export=False)
        stable["wall_s"] = stable.get("wall_s", 0.0) + wall
        stable["config"] = stable_config.model_dump(mode="json")
        stable["run_dir"] = stable_dir
        if result.stopped_early:
            _save_entry(out, "runs", size.name, entry)
            log(f"[wind tunnel] {size.name} stable run stopped early (run.max_minutes)")
            return -1
        stable.update(done=True, steps=result.step, tokens=result.tokens_seen,
                      train_loss=_final_train_loss(stable_dir), eval_loss=result.eval_loss)
        _save_entry(out, "runs", size.name, entry)
    missing = [s for s in starts if s not in _checkpoint_steps(stable_dir)]
    for start in starts:
        branch = entry["branches"].setdefault(str(start), {"done": False, "wall_s": 0.0})
        if branch["done"]:
            continue
        if start in missing:
            raise MissingPathError(
                f"{size.name}: the stable checkpoint at step {start} is missing from "
                f"{stable_dir}/checkpoints (have {_checkpoint_steps(stable_dir)}); "
                "delete the stable run's index entry to retrain it")
        decay = config.branches.decay_steps(start)
        bdir = os.path.join(out, size.name, f"decay-{start}")
        bconfig = run_config(config, size, out_dir=bdir, steps=start + decay,
                             decay_start=start, decay_steps=decay,
                             checkpoint_every=max(1, decay), keep=2, export=True)
        bconfig.run.progress = progress
        if not _checkpoint_steps(bdir):
            # the branch starts from the stable run's state at step `start` (parameters,
            # optimizer moments, data position): copy that checkpoint into the branch
            os.makedirs(os.path.join(bdir, "checkpoints"), exist_ok=True)
            shutil.copytree(os.path.join(stable_dir, "checkpoints", str(start)),
                            os.path.join(bdir, "checkpoints", str(start)))
        done_count += 1
        log(f"[wind tunnel] ({done_count}/{total}) {size.name} decay branch from step "
            f"{start}: {decay} decay steps, {(start + decay) * config.tokens_per_step:,} "
            "tokens")
        result, wall = _timed_train(bconfig, export=True)
        branch["wall_s"] = branch.get("wall_s", 0.0) + wall
        if result.stopped_early:
            _save_entry(out, "runs", size.name, entry)
            return -1
        branch.update(done=True, start_step=start, steps=result.step,
                      decay_steps=decay, tokens=result.tokens_seen,
                      train_loss=_final_train_loss(bdir, last=min(20, decay)),
                      eval_loss=result.eval_loss, export_dir=result.export_dir,
                      config=bconfig.model_dump(mode="json"))
        _save_entry(out, "runs", size.name, entry)
        log(f"[wind tunnel] {size.name} decay-{start}: train loss "
            f"{branch['train_loss']:.4f}, held-out loss {branch['eval_loss']:.4f}, "
            f"{branch['wall_s']:.0f} s")
    return done_count


# ----------------------------------------------------------------------------------------------
# the μP check


def lr_sweep(config: FamilyConfig, *, progress: bool = True, log: Any = None
             ) -> dict[str, dict[str, Any]]:
    """Short runs at each rate of ``config.lr_sweep.lrs`` for the sweep's sizes (default the
    smallest and the largest), recorded in ``<out_dir>/lr_sweep.json``; a rerun skips
    finished runs. Returns ``{size: {lr: {"train_loss", "eval_loss", "wall_s"}}}``."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    spec = config.lr_sweep
    if spec is None:
        raise ConfigError("the family config has no lr_sweep section (lrs, steps)")
    out = os.path.abspath(config.out_dir)
    prepare_family_data(config, log=log)
    sizes = [config.size(s) if isinstance(s, str) else s
             for s in (spec.sizes or [config.sizes[0].name, config.sizes[-1].name])]
    sweep = _read_index(out, SWEEP_FILE)
    decay = max(1, math.ceil(spec.decay_fraction * spec.steps))
    for size in sizes:
        name = size.name
        for lr in spec.lrs:
            for seed in spec.seeds:
                key = sweep_key(lr, seed)
                record = sweep.setdefault(name, {}).get(key)
                if record and record.get("done"):
                    continue
                rdir = os.path.join(out, "lr-sweep", f"{name}-lr{key}")
                rc = run_config(config, size, out_dir=rdir, steps=spec.steps,
                                decay_start=spec.steps - decay, decay_steps=decay, lr=lr,
                                checkpoint_every=spec.steps, keep=1, export=False,
                                seed=seed)
                rc.run.progress = progress
                log(f"[wind tunnel] lr sweep: {name} at lr {lr:g}, seed {rc.run.seed} "
                    f"({spec.steps} steps)")
                result, wall = _timed_train(rc, export=False)
                sweep[name][key] = record = {
                    "done": True, "lr": lr, "seed": rc.run.seed, "steps": result.step,
                    "train_loss": _final_train_loss(rdir, last=min(20, decay)),
                    "eval_loss": result.eval_loss, "wall_s": wall,
                    "non_embedding_params": non_embedding_params(config.model_fields_for(size)),
                    "width": size.hidden, "layers": size.layers,
                    "config": rc.model_dump(mode="json")}
                _update_index(out, lambda index, name=name, key=key, record=record:
                              index.setdefault(name, {}).__setitem__(key, record), SWEEP_FILE)
    return lr_sweep_results(out)


def sweep_key(lr: float, seed: int = 0) -> str:
    """The key of one sweep run in ``lr_sweep.json``: the rate (``"0.01"``), with ``@seedS``
    for seeds other than 0."""
    return f"{lr:g}" if not seed else f"{lr:g}@seed{seed}"


def sweep_summary(results: dict[str, dict[str, Any]], metric: str = "eval_loss"
                  ) -> dict[str, dict[float, dict[str, Any]]]:
    """Per size and rate, the mean, standard deviation and count of ``metric`` over the seeds
    of :func:`lr_sweep_results`, and per size the best rate by the mean
    (``{size: {"rates": {lr: {...}}, "best_lr": lr}}``)."""
    out: dict[str, dict[str, Any]] = {}
    for name, runs in results.items():
        by_lr: dict[float, list[float]] = {}
        for record in runs.values():
            value = record.get(metric)
            if value is not None:
                by_lr.setdefault(float(record["lr"]), []).append(float(value))
        rates = {lr: {"mean": statistics.fmean(v), "n": len(v),
                      "std": statistics.stdev(v) if len(v) > 1 else None}
                 for lr, v in sorted(by_lr.items())}
        best = min(rates, key=lambda lr: rates[lr]["mean"]) if rates else None
        out[name] = {"rates": rates, "best_lr": best}
    return out


def lr_sweep_results(directory: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The finished sweep runs recorded in ``<directory>/lr_sweep.json``:
    ``{size: {lr: record}}``."""
    index = _read_index(os.fspath(directory), SWEEP_FILE)
    return {name: {k: v for k, v in runs.items() if v.get("done")}
            for name, runs in index.items()}
