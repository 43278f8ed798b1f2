"""Typed training configuration: pydantic models loaded from YAML, with ``key.sub=value``
overrides from the command line.

Example (``configs/cpmjax-tiny.yaml``)::

    model:
      config: {model_type: minicpm, hidden_size: 256, num_hidden_layers: 4, ...}
    data:   {sources: [stdlib, package-metadata], vocab_size: 32768, seq_len: 256, batch_size: 8}
    optim:  {lr: 0.01, schedule: wsd, warmup_steps: 50, decay_steps: 100}
    run:    {steps: 1000, out_dir: runs/tiny, checkpoint_every: 100}
"""

from __future__ import annotations

import os
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cpmjax.errors import ConfigError, MissingPathError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSection(_Section):
    """What to train: a fresh model from ``config`` (HF config.json field names; a
    ``vocab_size`` of 0 or absent takes the tokenizer's size rounded up to a multiple of 128)
    or the checkpoint at ``init_from`` (an HF-layout directory)."""

    config: dict[str, Any] = Field(default_factory=dict)
    init_from: str | None = None
    init_std: float | None = None  # μP init: blocks' matrices get init_std / sqrt(width_scale)
    dtype: Literal["float32", "bfloat16"] = "float32"


class DataConfig(_Section):
    sources: list[str] = Field(default_factory=lambda: ["stdlib", "package-metadata"])
    tokenizer: str | None = None  # an HF tokenizer directory; None: train a byte-level BPE
    vocab_size: int = 32768  # for a newly trained tokenizer
    eval_fraction: float = 0.02
    max_files: int | None = None  # keep the first N files of each split (smoke tests)
    seq_len: int = 256
    batch_size: int = 8
    shuffle: bool = True
    cache_dir: str | None = None  # default: <out_dir>/data
    # a token (one tokenizer token): the loss counts only the targets after its first
    # occurrence in each document (prompt/answer data); None: every target counts
    loss_after: str | None = None


class OptimConfig(_Section):
    lr: float = 0.01
    schedule: Literal["wsd", "cosine", "constant"] = "wsd"
    warmup_steps: int = 50
    decay_start: int | None = None  # default: steps - decay_steps
    decay_steps: int | None = None  # default: 10% of the steps
    decay: Literal["exp", "linear", "cosine"] = "exp"
    half_life: float | None = None
    min_ratio: float = 0.0
    cosine_min_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    mup: bool = True  # μP learning-rate groups (minicpm models)


class MeshConfig(_Section):
    """Device mesh of the train step. ``sequence > 1`` turns on sequence parallelism: every
    sequence is cut over ``sequence`` devices (in ``sequence_layout`` order) and attention runs
    as a distributed ring (``sharding.burst``, ``sequence_impl``)."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1
    sequence_impl: Literal["auto", "burst", "ring", "allgather"] = "auto"
    sequence_layout: Literal["zigzag", "contiguous"] = "zigzag"

    @property
    def num_devices(self) -> int:
        return self.data * self.fsdp * self.tensor * self.sequence


class InheritRun(_Section):
    """CPET's first stage: a delta trained for ``steps`` on the uncompressed backbone (same
    model, data and optimizer settings; no compress, no distill) in ``<out_dir>/inherit``,
    exported to ``delta.inherit`` (whose last component must be ``delta``)."""

    steps: int = 50
    method: str = "lora"
    targets: list[str] | None = None
    hparams: dict[str, Any] = Field(default_factory=dict)


class DeltaConfig(_Section):
    method: str | None = None  # e.g. "lora": only the delta's parameters train
    targets: list[str] | None = None
    hparams: dict[str, Any] = Field(default_factory=dict)
    # a delta saved from the uncompressed backbone, loaded onto the (compressed) model with
    # cpmjax.delta.inherit and trained too (CPET knowledge inheritance)
    inherit: str | None = None
    # when delta.inherit does not exist yet: train it first on the uncompressed backbone
    train_inherit: InheritRun | None = None


class QuantizeConfig(_Section):
    bits: Literal[4, 8, "nf4"] = 8  # "nf4": 4-bit NormalFloat levels
    group_size: int | None = None  # None: one scale per output channel


class PruneConfig(_Section):
    sparsity: float = 0.5
    pattern: str = "unstructured"  # or "N:M", e.g. "2:4"
    criterion: Literal["magnitude", "wanda"] = "magnitude"


class PruneNeuronsConfig(_Section):
    """Structured pruning: remove this fraction of every dense MLP's intermediate neurons."""

    sparsity: float = 0.5
    criterion: Literal["magnitude", "wanda"] = "magnitude"


class MoefyConfig(_Section):
    num_experts: int
    top_k: int


class CompressConfig(_Section):
    """Compressions applied to the loaded backbone before any delta is attached, in the order
    prune, prune_neurons, moefy, quantize (``cpmjax.compress``). Wanda pruning and MoEfication calibrate on
    the first ``calibration_batches`` packed batches of the training tokens."""

    prune: PruneConfig | None = None
    prune_neurons: PruneNeuronsConfig | None = None
    moefy: MoefyConfig | None = None
    quantize: QuantizeConfig | None = None
    calibration_batches: int = 2

    @property
    def active(self) -> bool:
        return any(x is not None
                   for x in (self.prune, self.prune_neurons, self.moefy, self.quantize))


class DistillConfig(_Section):
    """Hidden-state distillation against a frozen teacher: loss = cross-entropy +
    ``hidden_weight`` * mean over ``layers`` of the MSE between the student's and the teacher's
    decoder-layer outputs. ``teacher``: an HF checkpoint dir, or ``"self-uncompressed"`` (the
    loaded backbone before ``compress``); ``teacher_delta``: a saved delta loaded onto it (the
    LoRA trained on the uncompressed model)."""

    teacher: str | None = None
    teacher_delta: str | None = None
    hidden_weight: float = 1.0
    layers: list[int] | Literal["all"] = "all"

    @property
    def active(self) -> bool:
        return self.teacher is not None


class RunConfig(_Section):
    steps: int = 1000
    out_dir: str = "runs/train"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 4
    checkpoint_every: int = 100  # steps; 0 disables step-based saves
    checkpoint_minutes: float | None = None  # also save when this much time passed
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    resume: bool = True
    export_dir: str | None = None  # default: <out_dir>/hf
    export_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    loss_chunk: int = 128
    loss_remat: bool = True  # recompute each chunk's logits in the backward pass
    mesh: MeshConfig = Field(default_factory=MeshConfig)
    progress: bool = True
    tensorboard: bool = True
    max_minutes: float | None = None  # stop (after a checkpoint) when exceeded
    throttle_seconds: float = 0.0  # sleep after each step (tests of interrupted runs)


class TrainConfig(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    delta: DeltaConfig = Field(default_factory=DeltaConfig)
    compress: CompressConfig = Field(default_factory=CompressConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.run.steps < 1:
            raise ValueError(f"run.steps must be >= 1, got {self.run.steps}")
        problem = compress_distill_problem(self)
        if problem:
            raise ValueError(problem)
        problem = sequence_parallel_problem(self)
        if problem:
            raise ValueError(problem)
        mesh = self.run.mesh
        rows = mesh.data * mesh.fsdp
        if self.data.batch_size % rows:
            raise ValueError(
                f"data.batch_size={self.data.batch_size} is not divisible by the batch mesh axes "
                f"data*fsdp={rows}"
            )
        return self

    # ------------------------------------------------------------------------------------
    @property
    def decay_steps(self) -> int:
        o = self.optim
        return o.decay_steps if o.decay_steps is not None else max(1, self.run.steps // 10)

    @property
    def decay_start(self) -> int:
        o = self.optim
        return o.decay_start if o.decay_start is not None else self.run.steps - self.decay_steps

    @property
    def export_dir(self) -> str:
        return self.run.export_dir or os.path.join(self.run.out_dir, "hf")

    @property
    def cache_dir(self) -> str:
        return self.data.cache_dir or os.path.join(self.run.out_dir, "data")


def sequence_parallel_problem(config: TrainConfig) -> str | None:
    """Why ``config``'s sequence parallelism cannot run (a message naming the settings), or
    None. The zigzag layout cuts each sequence into ``2 * run.mesh.sequence`` equal chunks, the
    contiguous one into ``run.mesh.sequence``."""
    mesh, seq_len = config.run.mesh, config.data.seq_len
    for name in ("data", "fsdp", "tensor", "sequence"):
        if getattr(mesh, name) < 1:
            return f"run.mesh.{name} must be >= 1, got {getattr(mesh, name)}"
    if mesh.sequence == 1:
        return None
    chunks = 2 * mesh.sequence if mesh.sequence_layout == "zigzag" else mesh.sequence
    if seq_len % chunks:
        how = "2*run.mesh.sequence" if mesh.sequence_layout == "zigzag" else "run.mesh.sequence"
        return (
            f"data.seq_len={seq_len} is not divisible by {how}={chunks} "
            f"(run.mesh.sequence_layout={mesh.sequence_layout!r} cuts every sequence into "
            f"{chunks} equal chunks)"
        )
    return None


def compress_distill_problem(config: TrainConfig) -> str | None:
    """Why the ``compress`` / ``distill`` / ``delta.inherit`` settings cannot work (a message
    naming the setting), or None. Shapes against the model are checked later, in setup, before
    any compute."""
    c, d = config.compress, config.distill
    if c.prune is not None and not 0.0 < c.prune.sparsity < 1.0:
        return f"compress.prune.sparsity must be in (0, 1), got {c.prune.sparsity}"
    if c.prune_neurons is not None and not 0.0 < c.prune_neurons.sparsity < 1.0:
        return ("compress.prune_neurons.sparsity must be in (0, 1), got "
                f"{c.prune_neurons.sparsity}")
    if c.quantize is not None and c.quantize.group_size is not None and c.quantize.group_size < 1:
        return f"compress.quantize.group_size must be >= 1, got {c.quantize.group_size}"
    if c.moefy is not None and not 1 <= c.moefy.top_k <= c.moefy.num_experts:
        return (f"compress.moefy: need 1 <= top_k <= num_experts, got top_k={c.moefy.top_k}, "
                f"num_experts={c.moefy.num_experts}")
    if c.calibration_batches < 1:
        return f"compress.calibration_batches must be >= 1, got {c.calibration_batches}"
    if not (d.hidden_weight >= 0.0 and d.hidden_weight < float("inf")):
        return f"distill.hidden_weight must be a finite number >= 0, got {d.hidden_weight}"
    if isinstance(d.layers, list):
        if not d.layers:
            return "distill.layers is empty: list layer indices or write 'all'"
        if any(i < 0 for i in d.layers) or len(set(d.layers)) != len(d.layers):
            return f"distill.layers must be distinct indices >= 0, got {d.layers}"
    t = config.delta.train_inherit
    if t is not None:
        if not config.delta.inherit or os.path.basename(
                os.path.normpath(config.delta.inherit)) != "delta":
            return ("delta.train_inherit exports to delta.inherit, which must be set and end in "
                    f"'/delta' (export_dir/delta), got {config.delta.inherit!r}")
        if t.steps < 1:
            return f"delta.train_inherit.steps must be >= 1, got {t.steps}"
    if d.teacher_delta is not None and d.teacher is None:
        return "distill.teacher_delta is set but distill.teacher is not"
    if d.teacher == "self-uncompressed" and not (c.active or config.delta.method
                                                 or config.delta.inherit):
        return ("distill.teacher='self-uncompressed' needs something to distil into: a compress "
                "section or a delta")
    return None


def check_sequence_parallel(config: TrainConfig) -> None:
    """Raise ``ConfigError`` naming the setting unless the sequence parallelism can run."""
    problem = sequence_parallel_problem(config)
    if problem:
        raise ConfigError(problem)


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """``tree["a"]["b"] = value`` for ``dotted`` ``"a.b"``, creating sections on the way."""
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``"optim.lr=0.02"`` -> ``("optim.lr", 0.02)`` (the value is parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: cannot parse the value: {exc}") from exc


def read_yaml_config(path: str | os.PathLike | None, what: str,
                     overrides: dict[str, Any] | list[str] | None = None, *,
                     section: str | None = None) -> dict[str, Any]:
    """The mapping at the top of YAML file ``path`` (``{}`` for None; with ``section``, that
    key's mapping when the file has it) with dotted ``key.sub=value`` overrides (a dict, or
    ``"key.sub=value"`` strings) applied. ``what`` names the file in errors ("training
    config", "fusion config", ...)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise MissingPathError(f"{what} {path} does not exist")
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping at the top level")
        if section is not None and section in data:
            data = data[section]
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: {section!r} must hold a mapping")
    items = overrides or {}
    if isinstance(items, list):
        items = dict(parse_override(x) for x in items)
    for key, value in items.items():
        set_dotted(data, key, value)
    return data


def load_config(path: str | os.PathLike | None = None,
                overrides: dict[str, Any] | list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or start from defaults) and apply dotted-key overrides."""
    data = read_yaml_config(path, "training config", overrides)
    try:
        return TrainConfig(**data)
    except ValidationError as exc:
        where = f" in {os.fspath(path)}" if path else ""
        raise ConfigError(f"invalid training config{where}: {exc}") from exc


def dump_config(config: TrainConfig, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(config.model_dump(), f, sort_keys=False)
