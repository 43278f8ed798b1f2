"""Checkpoint errors name the culprit; the CLI streams text and reports speed."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from helpers import save_hf_model, tiny_llama_config, word_tokenizer, write_random_minicpm
from safetensors.numpy import load_file, save_file
from transformers import LlamaForCausalLM

import cpmjax
from cpmjax import errors


@pytest.fixture
def ckpt(tmp_path):
    save_hf_model(LlamaForCausalLM, tiny_llama_config(), tmp_path / "m")
    return tmp_path / "m"


def _rewrite(path, fn):
    file = path / "model.safetensors"
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_directory_names_path(tmp_path):
    with pytest.raises(errors.MissingPathError, match="nope"):
        cpmjax.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError for generic handlers
        cpmjax.from_pretrained(tmp_path / "nope")


def test_missing_weights_file(ckpt):
    os.remove(ckpt / "model.safetensors")
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(errors.MissingPathError, match="pickle-based weights are not loaded"):
        cpmjax.from_pretrained(ckpt)


def test_missing_tensor_named(ckpt):
    _rewrite(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(errors.MissingTensorError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        cpmjax.from_pretrained(ckpt)


def test_unexpected_tensor_named(ckpt):
    _rewrite(ckpt, lambda t: t.__setitem__("model.layers.0.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(errors.UnexpectedTensorError, match=r"model\.layers\.0\.extra\.weight"):
        cpmjax.from_pretrained(ckpt)


def test_misshaped_tensor_names_both_shapes(ckpt):
    _rewrite(ckpt, lambda t: t.__setitem__("model.norm.weight", np.ones(31, np.float32)))
    with pytest.raises(errors.ShapeMismatchError, match=r"model\.norm\.weight.*\(31,\).*\(32,\)"):
        cpmjax.from_pretrained(ckpt)


def test_bad_config(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(errors.ConfigError, match="gpt2"):
        cpmjax.from_pretrained(ckpt)
    (ckpt / "config.json").write_text("{ not json")
    with pytest.raises(errors.ConfigError, match="config.json"):
        cpmjax.from_pretrained(ckpt)


def test_failed_save_keeps_last_good_checkpoint(ckpt, monkeypatch):
    model = cpmjax.from_pretrained(ckpt)
    out = ckpt.parent / "out"
    cpmjax.save_pretrained(model, out)
    (out / "tokenizer.json").write_text("{}")
    before = (out / "model.safetensors").read_bytes()

    import cpmjax.hf as hf

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        cpmjax.save_pretrained(model, out)
    assert (out / "model.safetensors").read_bytes() == before
    assert not [p for p in os.listdir(ckpt.parent) if p.startswith(".tmp-save")]
    monkeypatch.undo()
    cpmjax.save_pretrained(model, out)  # overwriting keeps the user's other files
    assert (out / "tokenizer.json").exists()


def test_cli_generate_streams_and_reports(tmp_path, capsys):
    from cpmjax.cli import main

    write_random_minicpm(tmp_path / "m", max_position_embeddings=64)
    word_tokenizer(tmp_path / "m")
    code = main(["generate", "--model", str(tmp_path / "m"), "--prompt", "def fibonacci ( n ) :",
                 "--max-new-tokens", "6", "--no-stop"])
    captured = capsys.readouterr()
    assert code == 0
    assert captured.out.startswith("def fibonacci ( n ) :")
    assert len(captured.out.split()) > 5
    assert "decode" in captured.err and "tok/s" in captured.err


def test_cli_generate_distributed_prefill_from_a_file(tmp_path, capsys):
    """--prompt-file with --prefill apb / star over the 8 (simulated) devices; a Star run with
    an APB-only flag is a clean error."""
    from cpmjax.cli import main

    write_random_minicpm(tmp_path / "m", max_position_embeddings=256)
    word_tokenizer(tmp_path / "m")
    prompt = " ".join(["def fibonacci ( n ) : return a if b else c"] * 11)
    (tmp_path / "p.txt").write_text(prompt, encoding="utf-8")
    common = ["generate", "--model", str(tmp_path / "m"), "--prompt-file",
              str(tmp_path / "p.txt"), "--max-new-tokens", "4", "--no-stop", "--query-len", "4"]
    for flags in (["--prefill", "apb", "--anchor-len", "8", "--passing-len", "3"],
                  ["--prefill", "star"]):
        code = main(common + flags)
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert captured.out.startswith(prompt)
        assert len(captured.out) > len(prompt) + 1
        assert "prompt 132 tok" in captured.err and "generated 4 tok" in captured.err
    assert main(common + ["--prefill", "star", "--passing-len", "3"]) == 2
    assert "ConfigError" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt-file",
                 str(tmp_path / "none.txt")]) == 2
    assert "prompt file" in capsys.readouterr().err


def test_cli_error_is_clean(tmp_path, capsys):
    from cpmjax.cli import main

    code = main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"])
    assert code == 2
    assert "MissingPathError" in capsys.readouterr().err


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(errors.MissingPathError):
        cpmjax.load_tokenizer(tmp_path / "none")
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_chat_template_is_used_when_present(tmp_path):
    from cpmjax.tokenizer import apply_chat_template, encode

    word_tokenizer(tmp_path / "t")
    tok = cpmjax.load_tokenizer(tmp_path / "t")
    assert apply_chat_template(tok, "the fibonacci") == encode(tok, "the fibonacci")
    tok.chat_template = "{% for m in messages %}<s> {{ m['content'] }} </s>{% endfor %}a"
    tok.save_pretrained(tmp_path / "t")
    tok = cpmjax.load_tokenizer(tmp_path / "t")
    ids = apply_chat_template(tok, "the fibonacci")
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "the", "fibonacci", "</s>", "a"]
