"""Tokenizers for training: train a byte-level BPE with HF ``tokenizers``, or load any local HF
tokenizer.

A trained tokenizer is saved as an HF tokenizer directory (``tokenizer.json`` +
``tokenizer_config.json`` + ``special_tokens_map.json``) that ``transformers.AutoTokenizer`` (and
so ``cpmjax.load_tokenizer``) loads offline. Special tokens: ``<unk>`` = 0, ``<s>`` = 1 (BOS,
prepended by the tokenizer's post-processor), ``</s>`` = 2 (EOS, ends every training document),
``<pad>`` = 3 — the ids MiniCPM configs use.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

from cpmjax.errors import ConfigError, MissingPathError

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


def _read_texts(files: Iterable[str], max_bytes_per_file: int | None = None) -> Iterator[str]:
    for file in files:
        with open(file, encoding="utf-8", errors="replace") as f:
            text = f.read() if max_bytes_per_file is None else f.read(max_bytes_per_file)
        if text.strip():
            yield text


def train_bpe(
    files: list[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 32768,
    *,
    min_frequency: int = 2,
    model_max_length: int = 1_000_000_000,
) -> Any:
    """Train a byte-level BPE of ``vocab_size`` entries (special tokens included) on ``files``
    and save it as an HF tokenizer directory. Returns the ``transformers`` fast tokenizer.

    Byte-level means every byte sequence is encodable (no ``<unk>`` in practice), so arbitrary
    source code round-trips exactly through ``encode``/``decode``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ConfigError(f"vocab_size={vocab_size} is below the 260 byte-level minimum")
    if not files:
        raise ConfigError("train_bpe needs at least one text file")
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_read_texts(files), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    save_tokenizer(fast, out_dir)
    return fast


def save_tokenizer(tokenizer: Any, out_dir: str | os.PathLike) -> None:
    """``tokenizer.save_pretrained(out_dir)``, then make ``tokenizer_config.json`` portable:
    the class is written as ``PreTrainedTokenizerFast`` (read by transformers 4 and 5) and the
    loading-time keys (``is_local``, ``local_files_only``) are dropped."""
    out_dir = os.fspath(out_dir)
    tokenizer.save_pretrained(out_dir)
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only", "name_or_path"):
        config.pop(key, None)
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def load_training_tokenizer(path: str | os.PathLike) -> Any:
    """Load a local HF tokenizer directory for training (offline) and check it has the special
    tokens the packer needs (an EOS token; BOS is optional)."""
    from cpmjax.tokenizer import load_tokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise MissingPathError(f"tokenizer directory does not exist: {path}")
    tokenizer = load_tokenizer(path)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer at {path} has no EOS token; packing needs one")
    return tokenizer


def encode_document(tokenizer: Any, text: str) -> list[int]:
    """``[BOS] + tokens + [EOS]`` for one training document (BOS only if the tokenizer has
    one)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + list(ids) + [tokenizer.eos_token_id]
