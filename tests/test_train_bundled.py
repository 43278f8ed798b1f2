"""The bundled default model ``cpmjax-tiny``: present, MiniCPM with μP scalings, within the size
limits, loadable offline with its tokenizer, better than chance on held-out standard-library
code, and writing Python-shaped text for ``def fibonacci(n):``."""

from __future__ import annotations

import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

import cpmjax
from cpmjax.train.data import collect_files, split_files


@pytest.fixture(scope="module")
def bundled():
    path = cpmjax.default_model_path()
    return path, cpmjax.from_pretrained(path, dtype="float32"), cpmjax.load_tokenizer(path)


def test_bundled_files_and_config(bundled):
    from transformers import AutoTokenizer

    path, model, tok = bundled
    assert path == cpmjax.train.bundled_model_dir()
    weights = os.path.join(path, "model.safetensors")
    assert os.path.getsize(weights) <= 40 * 1024**2
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "minicpm" and config["torch_dtype"] == "bfloat16"
    assert config["scale_emb"] != 1 and config["dim_model_base"] < config["hidden_size"]
    assert config["scale_depth"] > 0
    assert config["vocab_size"] >= 32000 and len(tok) >= 32000
    assert 10e6 <= model.num_parameters() <= 25e6
    assert os.path.isfile(os.path.join(path, "README.md"))
    hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert hf("def f(x):")["input_ids"] == tok("def f(x):")["input_ids"]


def test_bundled_model_beats_chance_on_held_out_code(bundled):
    _, model, tok = bundled
    _, held = split_files(collect_files(["stdlib"]), 0.02)
    with open(held[0].path, encoding="utf-8") as f:
        text = f.read()
    ids = tok(text)["input_ids"][:257]
    x = jnp.asarray([ids[:-1]])
    logp = _log_softmax(np.asarray(model(x)[0], np.float64))
    loss = -np.mean(logp[np.arange(len(ids) - 1), ids[1:]])
    assert loss < 0.6 * math.log(len(tok)), loss  # chance is log(vocab) ≈ 10.4


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def test_bundled_model_writes_python(bundled):
    _, model, tok = bundled
    prompt = "def fibonacci(n):"
    ids = tok(prompt)["input_ids"]
    result = cpmjax.generate(model, [ids], 40, temperature=0.0)
    text = tok.decode(result.row(0), skip_special_tokens=True)
    body = text.split("\n", 1)[1] if "\n" in text else text
    assert text.startswith("\n    "), repr(text)  # an indented function body follows
    assert any(word in body for word in ('"""', "return", "if ", "for ", "self")), repr(text)
