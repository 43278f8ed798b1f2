"""Training a small model to call tools: a byte-level BPE tokenizer with the tool-call special
tokens and a ChatML chat template, the synthetic transcripts of ``cpmjax.tools.synth``
encoded with a loss mask over the assistant turns only, packed rows, and a training loop over
``cpmjax.train``'s model builder, μP/WSD optimizer, train step, checkpointer and exporter.

    config = load_tool_config("configs/tool-model.yaml", ["run.steps=100"])
    result = train_tool_model(config)          # resumable; writes <run.out_dir>/hf

The config is a ``cpmjax train`` config (``model``, ``data.seq_len``, ``data.batch_size``,
``optim``, ``run``) plus a ``tools`` section (``ToolDataConfig``: how many transcripts, their
mix, the tokenizer's size and local text). ``data.sources`` is not read: the data are the
transcripts."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import sysconfig
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cpmjax.errors import ConfigError, MissingPathError
from cpmjax.tools.formats import CALL_END, CALL_START, IM_END, THOUGHT_END, THOUGHT_START
from cpmjax.tools.synth import Transcript, make_transcripts

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "ToolDataConfig",
    "ToolModelConfig",
    "encode_transcript",
    "load_tool_config",
    "pack_transcripts",
    "train_tool_model",
    "train_tool_tokenizer",
]

IM_START = "<|im_start|>"
# <unk> <s> </s> <pad> keep the ids MiniCPM configs use (0-3); then the chat and tool markers
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", IM_START, IM_END, THOUGHT_START,
                  THOUGHT_END, CALL_START, CALL_END)
PAD_ID = 3
# ChatML, the same text as cpmjax.tools.formats.chat_text's fallback: every role (system,
# user, assistant, tool) as <|im_start|>role\ncontent<|im_end|>\n
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                 "{{ message['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ToolDataConfig(_Section):
    """The ``tools`` section: the synthetic data and the tokenizer."""

    transcripts: int = 20000  # how many transcripts to generate (the training set)
    seed: int = 0
    variants: dict[str, float] = Field(
        default_factory=lambda: {"react": 0.6, "dfsdt": 0.3, "direct": 0.1})
    kinds: dict[str, float] = Field(default_factory=lambda: {
        "arithmetic": 0.3, "lookup": 0.2, "convert": 0.2, "lookup_arith": 0.2, "direct": 0.1})
    tokenizer: str | None = None  # an existing tokenizer directory; None: train one
    vocab_size: int = 2048
    tokenizer_transcripts: int = 4000  # transcripts the BPE is trained on
    local_text_bytes: int = 400_000  # plus this much of the stdlib's pydoc topics (English)
    format: str = "minicpm3"  # the call format and tool description the prompts use
    probe_every: int = 0  # steps between first-call probes (0: none)
    probe_tasks: int = 48  # held-out tasks the probe scores


class ToolModelConfig(BaseModel):
    """A ``cpmjax.train.TrainConfig`` (``train``) and the ``tools`` data section."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    train: Any
    tools: ToolDataConfig


def load_tool_config(path: str | os.PathLike | None = None,
                     overrides: Sequence[str] = ()) -> ToolModelConfig:
    """Read a tool-model YAML config and apply ``key.sub=value`` overrides (``tools.*`` for
    the data section, anything else for the training config)."""
    from cpmjax.train import TrainConfig
    from cpmjax.train.config import read_yaml_config

    data = read_yaml_config(path, "tool-model config", list(overrides))
    tools = data.pop("tools", {}) or {}
    try:
        return ToolModelConfig(train=TrainConfig(**data), tools=ToolDataConfig(**tools))
    except ValidationError as exc:
        raise ConfigError(f"invalid tool-model config {path}: {exc}") from exc


# -- tokenizer ------------------------------------------------------------------------------

def _local_text(max_bytes: int) -> list[str]:
    """English prose from this Python's standard library: ``pydoc_data/topics.py`` (the
    language reference), cut at ``max_bytes``."""
    path = os.path.join(sysconfig.get_paths()["stdlib"], "pydoc_data", "topics.py")
    if max_bytes <= 0 or not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read(max_bytes)
    return [text[i: i + 4000] for i in range(0, len(text), 4000)]


def train_tool_tokenizer(texts: Sequence[str], out_dir: str | os.PathLike,
                         vocab_size: int = 2048) -> Any:
    """A byte-level BPE of ``vocab_size`` entries trained on ``texts`` with ``SPECIAL_TOKENS``
    as single special ids (0-9), digits split one per token (numbers are read and copied
    digit by digit), the ChatML ``CHAT_TEMPLATE``, ``</s>`` as EOS and no BOS added. Saved as
    an HF tokenizer directory; returns the ``transformers`` fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from cpmjax.train.tokenizer import save_tokenizer

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ConfigError(f"vocab_size={vocab_size} is below the byte-level minimum "
                          f"{256 + len(SPECIAL_TOKENS)}")
    if not texts:
        raise ConfigError("train_tool_tokenizer needs some text")
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=list(SPECIAL_TOKENS[4:]),
                                   model_max_length=1_000_000_000,
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    save_tokenizer(fast, out_dir)
    from cpmjax.tokenizer import load_tokenizer

    return load_tokenizer(out_dir)


# -- encoding and packing -------------------------------------------------------------------

def encode_transcript(tokenizer: Any, transcript: Transcript) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [n], assistant [n])``: the transcript's tokens (no BOS, as the agents encode a
    templated prompt) and whether each token lies in a trained assistant span (the turn's text
    and its closing ``<|im_end|>``)."""
    encoded = tokenizer(transcript.text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(encoded["input_ids"], np.int32)
    starts = np.asarray([start for start, _ in encoded["offset_mapping"]], np.int64)
    assistant = np.zeros(len(ids), bool)
    for start, end in transcript.spans:
        assistant |= (starts >= start) & (starts < end)
    return ids, assistant


@dataclasses.dataclass
class PackedRows:
    """Training rows: ``input_ids, targets, segment_ids, positions [rows, seq]`` (int32),
    ``loss_mask [rows, seq]`` (float32: 1 where the target is an assistant token), and how
    many transcripts were dropped for being longer than a row."""

    arrays: dict[str, np.ndarray]
    dropped: int
    questions: set[str] = dataclasses.field(default_factory=set)  # the transcripts' questions

    @property
    def rows(self) -> int:
        return len(self.arrays["input_ids"])


def pack_transcripts(encoded: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int,
                     pad_id: int = PAD_ID) -> PackedRows:
    """Pack encoded transcripts greedily (in order) into rows of ``seq_len + 1`` tokens, one
    segment per transcript (attention never crosses one: ``segment_ids``, ``positions`` from
    0); the rest of a row is padding (its own segment, masked). A transcript longer than a row
    is dropped."""
    rows_tokens, rows_mask, rows_segment = [], [], []
    tokens, mask, segment = [], [], []
    dropped = 0

    def flush() -> None:
        if not tokens:
            return
        fill = seq_len + 1 - sum(len(t) for t in tokens)
        rows_tokens.append(np.concatenate(tokens + [np.full(fill, pad_id, np.int32)]))
        rows_mask.append(np.concatenate(mask + [np.zeros(fill, bool)]))
        rows_segment.append(np.concatenate(segment + [np.zeros(fill, np.int32)]))
        tokens.clear(), mask.clear(), segment.clear()

    used = 0
    for ids, assistant in encoded:
        if len(ids) > seq_len + 1:
            dropped += 1
            continue
        if used + len(ids) > seq_len + 1:
            flush()
            used = 0
        tokens.append(ids)
        mask.append(assistant)
        segment.append(np.full(len(ids), len(segment) + 1, np.int32))
        used += len(ids)
    flush()
    if not rows_tokens:
        raise ConfigError(f"no transcript fits in a row of seq_len={seq_len}")
    full = np.stack(rows_tokens)
    seg = np.stack(rows_segment)
    assistant = np.stack(rows_mask)
    idx = np.arange(seq_len + 1)
    starts = np.concatenate([np.ones((len(seg), 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    seg_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    positions = (idx - seg_start).astype(np.int32)
    same = seg[:, 1:] == seg[:, :-1]  # a target in the input's own transcript
    arrays = {"input_ids": full[:, :-1], "targets": full[:, 1:],
              "segment_ids": seg[:, :-1], "positions": positions[:, :-1],
              "loss_mask": (assistant[:, 1:] & same & (seg[:, 1:] > 0)).astype(np.float32)}
    return PackedRows(arrays, dropped)


# -- the first-call probe -------------------------------------------------------------------

def probe_rows(tokenizer: Any, tools: ToolDataConfig, seq_len: int, *, seed: int = 4242,
               exclude: set[str] | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
    """Rows for ``first_call_probe``: ``tools.probe_tasks`` held-out tasks (arithmetic,
    convert, lookup, lookup_arith in turn; no question of ``exclude``) rendered as the
    expert's ReAct transcript with no mistake, one per row, and ``call_mask`` marking the
    targets that are the first call's line (``name(arguments)``)."""
    import random

    from cpmjax.tools.synth import make_tasks, make_transcript

    tasks = make_tasks(seed, tools.probe_tasks,
                       ("arithmetic", "convert", "lookup", "lookup_arith"), exclude)
    rng = random.Random(seed)
    ids_rows, mask_rows, kinds = [], [], []
    for task in tasks:
        transcript = make_transcript(task, rng, "react", tokenizer, format=tools.format,
                                     mistake_rate=0.0)
        start = transcript.spans[0][0]
        line = transcript.text.index("```python\n", start) + len("```python\n")
        end = transcript.text.index("\n```", line)
        encoded = tokenizer(transcript.text, add_special_tokens=False,
                            return_offsets_mapping=True)
        ids = np.asarray(encoded["input_ids"], np.int32)[: seq_len + 1]
        starts = np.asarray([a for a, _ in encoded["offset_mapping"]])[: seq_len + 1]
        call = (starts >= line) & (starts < end)
        pad = seq_len + 1 - len(ids)
        ids_rows.append(np.concatenate([ids, np.full(pad, PAD_ID, np.int32)]))
        mask_rows.append(np.concatenate([call, np.zeros(pad, bool)]))
        kinds.append(task.kind)
    ids = np.stack(ids_rows)
    mask = np.stack(mask_rows)
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (len(ids), seq_len))
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "positions": positions,
            "call_mask": mask[:, 1:]}, kinds


def first_call_probe(model: Any, rows: dict[str, np.ndarray], kinds: Sequence[str],
                     batch: int = 16) -> dict[str, float]:
    """Teacher-forced first-call exact match: the share of probe rows whose every token of
    the first call's line is the model's argmax given the expert's text before it (what
    greedy decoding writes when the thought before the call is the expert's), overall and per
    kind."""
    hits = []
    for i in range(0, len(rows["input_ids"]), batch):
        logits = model(rows["input_ids"][i: i + batch], positions=rows["positions"][i: i + batch])
        predicted = np.asarray(logits.argmax(-1))
        mask = rows["call_mask"][i: i + batch]
        right = (predicted == rows["targets"][i: i + batch]) | ~mask
        hits += list(right.all(axis=1) & mask.any(axis=1))
    out = {"first_call_exact": float(np.mean(hits))}
    for kind in sorted(set(kinds)):
        out[kind] = float(np.mean([h for h, k in zip(hits, kinds, strict=True) if k == kind]))
    return out


# -- training -------------------------------------------------------------------------------

@dataclasses.dataclass
class ToolTrainResult:
    step: int
    losses: list[float]
    tokens_seen: int
    loss_tokens_seen: int
    export_dir: str | None
    seconds: float
    rows: int
    dropped: int


def prepare_tool_data(config: ToolModelConfig) -> tuple[Any, PackedRows, dict[str, Any]]:
    """The tokenizer (trained on first use, cached in ``<out_dir>/tokenizer``) and the packed
    rows of the configured transcripts; stats of the data."""
    from cpmjax.tokenizer import load_tokenizer

    tools, run = config.tools, config.train.run
    tok_dir = tools.tokenizer or os.path.join(run.out_dir, "tokenizer")
    if os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        tokenizer = load_tokenizer(tok_dir)
    elif tools.tokenizer is not None:
        raise MissingPathError(f"tools.tokenizer {tok_dir} has no tokenizer.json")
    else:
        # the BPE sees every variant of the tool data (whatever this model trains on) and the
        # local prose
        sample = make_transcripts(tools.seed + 1_000_003, tools.tokenizer_transcripts)
        tokenizer = train_tool_tokenizer([t.text for t in sample]
                                         + _local_text(tools.local_text_bytes),
                                         tok_dir, tools.vocab_size)
    transcripts = make_transcripts(tools.seed, tools.transcripts, tokenizer,
                                   variants=tools.variants, kinds=tools.kinds,
                                   format=tools.format)
    encoded = [encode_transcript(tokenizer, t) for t in transcripts]
    packed = pack_transcripts(encoded, config.train.data.seq_len)
    packed.questions = {t.task.question for t in transcripts}
    lengths = [len(ids) for ids, _ in encoded]
    stats = {"transcripts": len(transcripts), "rows": packed.rows, "dropped": packed.dropped,
             "tokens_per_transcript_median": float(np.median(lengths)),
             "tokens_per_transcript_max": int(max(lengths)),
             "loss_fraction": float(packed.arrays["loss_mask"].mean()),
             "fill": float((packed.arrays["segment_ids"] > 0).mean())}
    return tokenizer, packed, stats


def record_data_phase(out_dir: str, tools: ToolDataConfig) -> list[dict[str, Any]]:
    """Append the data this run trains on (seed, transcripts, variants, kinds) to
    ``<out_dir>/data_phases.json`` unless it is already the last entry (a resumed run with a
    changed mix trains on several): held-out sets exclude every phase's questions."""
    path = os.path.join(out_dir, "data_phases.json")
    phases = []
    if os.path.isfile(path):
        with open(path) as f:
            phases = json.load(f)
    phase = {"seed": tools.seed, "transcripts": tools.transcripts, "variants": tools.variants,
             "kinds": tools.kinds}
    if not phases or phases[-1] != phase:
        phases.append(phase)
        with open(path, "w") as f:
            json.dump(phases, f, indent=1)
    return phases


def train_tool_model(config: ToolModelConfig, *, export: bool = True,
                     log: Any = None) -> ToolTrainResult:
    """Train (or resume) the model of ``config`` on its transcripts: rows drawn in a seeded
    permutation per epoch, loss on assistant tokens only, checkpoints every
    ``run.checkpoint_minutes``, a metrics line per ``run.log_every`` steps to
    ``<out_dir>/metrics.jsonl``; exports the HF checkpoint with the tokenizer at the end (also
    when ``run.max_minutes`` cut the run short)."""
    import jax
    from flax import nnx

    from cpmjax.train import Checkpointer, make_optimizer, make_train_step
    from cpmjax.train.loop import export_model
    from cpmjax.train.setup import build_model, make_schedule

    tc, run = config.train, config.train.run
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    os.makedirs(run.out_dir, exist_ok=True)
    with open(os.path.join(run.out_dir, "config.json"), "w") as f:
        json.dump({"train": tc.model_dump(mode="json"), "tools": config.tools.model_dump()}, f,
                  indent=1)
    tokenizer, packed, stats = prepare_tool_data(config)
    log(f"[tools train] data: {json.dumps(stats)}")
    record_data_phase(run.out_dir, config.tools)
    model = build_model(tc, len(tokenizer))
    optimizer = nnx.Optimizer(model, make_optimizer(tc, model), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    schedule = make_schedule(tc)
    step_fn = jax.jit(make_train_step(graphdef, nnx.Param, run.loss_chunk, run.loss_remat),
                      donate_argnums=0)
    ckpt = Checkpointer(os.path.join(run.out_dir, "checkpoints"), keep=run.keep_checkpoints)
    step, epoch, cursor, tokens_seen, loss_tokens = 0, 0, 0, 0, 0
    if run.resume and ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state)
        step, epoch, cursor = int(meta["step"]), int(meta["epoch"]), int(meta["cursor"])
        tokens_seen, loss_tokens = int(meta["tokens_seen"]), int(meta["loss_tokens"])
        log(f"[tools train] resumed at step {step}")
    batch_size = tc.data.batch_size
    if packed.rows < batch_size:
        raise ConfigError(f"{packed.rows} packed rows are fewer than data.batch_size="
                          f"{batch_size}; generate more transcripts")

    def order(e: int) -> np.ndarray:
        return np.random.default_rng((run.seed, e)).permutation(packed.rows)

    perm = order(epoch)
    probe = None
    if config.tools.probe_every > 0:
        probe = probe_rows(tokenizer, config.tools, tc.data.seq_len, exclude=packed.questions)
        probe_path = os.path.join(run.out_dir, "probe.jsonl")
    losses: list[float] = []
    start = time.time()
    last_save = start
    metrics_path = os.path.join(run.out_dir, "metrics.jsonl")
    try:
        while step < run.steps:
            if cursor + batch_size > packed.rows:
                epoch, cursor = epoch + 1, 0
                perm = order(epoch)
            rows = perm[cursor: cursor + batch_size]
            cursor += batch_size
            batch = {k: v[rows] for k, v in packed.arrays.items()}
            state, metrics = step_fn(state, batch)
            step += 1
            loss = float(metrics["loss"])
            if not np.isfinite(loss):
                raise ConfigError(f"loss became {loss} at step {step}; lower optim.lr")
            losses.append(loss)
            tokens_seen += batch["input_ids"].size
            loss_tokens += int(batch["loss_mask"].sum())
            elapsed = time.time() - start
            if step % run.log_every == 0 or step == run.steps:
                record = {"step": step, "loss": loss, "lr": float(schedule(step - 1)),
                          "accuracy": float(metrics["accuracy"]), "epoch": epoch,
                          "tokens_seen": tokens_seen, "loss_tokens": loss_tokens,
                          "minutes": elapsed / 60}
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                log(f"[tools train] {json.dumps(record)}")
            if probe is not None and step % config.tools.probe_every == 0:
                nnx.update((model, optimizer), state)
                scores = {"step": step, **first_call_probe(model, *probe)}
                with open(probe_path, "a") as f:
                    f.write(json.dumps(scores) + "\n")
                log(f"[tools probe] {json.dumps(scores)}")
            out_of_time = run.max_minutes is not None and elapsed > run.max_minutes * 60
            if (run.checkpoint_minutes is not None
                    and time.time() - last_save > run.checkpoint_minutes * 60) or out_of_time:
                ckpt.save(step, state, {"epoch": epoch, "cursor": cursor,
                                        "tokens_seen": tokens_seen, "loss_tokens": loss_tokens})
                last_save = time.time()
            if out_of_time:
                log(f"[tools train] run.max_minutes reached at step {step}")
                break
    finally:
        ckpt.close()
    nnx.update((model, optimizer), state)
    export_dir = None
    if export:
        export_dir = export_model(tc, model, tokenizer)
        with open(os.path.join(export_dir, TOOL_FORMAT_FILE), "w") as f:
            json.dump({"format": config.tools.format}, f)
    return ToolTrainResult(step, losses, tokens_seen, loss_tokens, export_dir,
                           time.time() - start, packed.rows, packed.dropped)


TOOL_MODEL_NAME = "cpmjax-tools"
TOOL_FORMAT_FILE = "tool_format.json"  # {"format": name}: the call format a model trained on


def tool_format(model_dir: str) -> str:
    """The call format (``cpmjax.tools.formats.FORMATS``) the model in ``model_dir`` was
    trained with, from its ``tool_format.json``; ``"minicpm3"`` when it has none."""
    path = os.path.join(model_dir, TOOL_FORMAT_FILE)
    if not os.path.isfile(path):
        return "minicpm3"
    with open(path) as f:
        return str(json.load(f)["format"])


def tool_model_dir() -> str:
    """Where the bundled tool model lives: ``cpmjax/assets/cpmjax-tools``."""
    from cpmjax.train import bundled_model_dir

    return bundled_model_dir(TOOL_MODEL_NAME)


def install_tool_model(export_dir: str) -> str:
    """Copy an exported tool model (config, safetensors, tokenizer files with the chat
    template) into the package's assets as ``cpmjax-tools``, replacing the previous copy
    (its README.md stays)."""
    import shutil

    keep = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "chat_template.jinja", "generation_config.json",
            TOOL_FORMAT_FILE)
    if not os.path.isfile(os.path.join(export_dir, "model.safetensors")):
        raise MissingPathError(f"{export_dir} has no model.safetensors to install")
    target = tool_model_dir()
    os.makedirs(target, exist_ok=True)
    for entry in os.listdir(target):
        if entry in keep:
            os.remove(os.path.join(target, entry))
    for entry in keep:
        if os.path.isfile(os.path.join(export_dir, entry)):
            shutil.copy2(os.path.join(export_dir, entry), os.path.join(target, entry))
    return target
