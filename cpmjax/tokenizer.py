"""Tokenizers: transformers' AutoTokenizer on local files only (never the hub)."""

from __future__ import annotations

import os
from typing import Any

from cpmjax.errors import CheckpointError, MissingPathError


def load_tokenizer(path: str | os.PathLike) -> Any:
    """Load the tokenizer stored in a local checkpoint directory (offline).

    The returned tokenizer carries the checkpoint's chat template, when it has one
    (``tokenizer.chat_template``); ``apply_chat_template`` below uses it."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise MissingPathError(f"tokenizer directory does not exist: {path}")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # it warns about model types it has no class for (minicpm)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises OSError / ValueError variants
        raise CheckpointError(f"cannot load a tokenizer from {path}: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)


def apply_chat_template(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a single-turn chat prompt (with the generation prompt appended); falls back
    to plain encoding when the tokenizer has no chat template."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return encode(tokenizer, prompt)


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])
