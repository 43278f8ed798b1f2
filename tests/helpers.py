"""Shared test helpers: tiny random HF checkpoints and a small torch MiniCPM reference."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
from safetensors.torch import load_file


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_minicpm3_config(**overrides):
    from transformers import MiniCPM3Config

    kw = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=8,
              qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, max_position_embeddings=64,
              scale_emb=12, scale_depth=1.4, dim_model_base=16, tie_word_embeddings=True,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw.update(overrides)
    return MiniCPM3Config(**kw)


def save_hf_model(model_cls, config, path, seed: int = 0):
    """Random-init a transformers model (with non-trivial norm weights) and save it."""
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def minicpm_hf_dict(**overrides) -> dict:
    cfg = dict(model_type="minicpm", architectures=["MiniCPMForCausalLM"], vocab_size=96,
               hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
               rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=True, scale_emb=12,
               scale_depth=1.4, dim_model_base=8, hidden_act="silu", bos_token_id=1,
               eos_token_id=2, initializer_range=0.1)
    cfg.update(overrides)
    return cfg


def write_random_minicpm(path, seed: int = 0, **overrides):
    """A random MiniCPM checkpoint in the hub's file layout (written by cpmjax itself)."""
    from flax import nnx

    from cpmjax import save_pretrained
    from cpmjax.models import CausalLM, ModelConfig

    config = ModelConfig.from_hf_dict(minicpm_hf_dict(**overrides))
    model = CausalLM(config, rngs=nnx.Rngs(seed))
    # non-trivial norms so that a wrong norm weight mapping is caught
    rng = np.random.RandomState(seed)
    for path_tuple, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path_tuple[-1] == "scale":
            var.set_value(var[...] + 0.1 * rng.randn(*var.shape).astype(np.float32))
    save_pretrained(model, path)
    return model


class TorchMiniCPM:
    """A small, independent torch implementation of MiniCPM (dense and MoE) that reads the hub
    safetensors layout: Llama blocks + scale_emb, scale_depth/sqrt(L) residuals, and
    hidden / (hidden_size / dim_model_base) before the (tied) head."""

    def __init__(self, path):
        with open(os.path.join(path, "config.json")) as f:
            self.c = json.load(f)
        self.w = {k: v.double() for k, v in load_file(os.path.join(path, "model.safetensors")).items()}

    def _rms(self, x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.c["rms_norm_eps"]))

    def _rope(self, x, pos):
        d = x.shape[-1]
        inv = 1.0 / (self.c["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        f = pos[:, None].double() * inv[None]
        emb = torch.cat([f, f], -1)
        cos, sin = emb.cos()[None, :, None], emb.sin()[None, :, None]
        rot = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
        return x * cos + rot * sin

    def _mlp(self, p, x):
        w = self.w
        if self.c.get("num_experts"):
            logits = x @ w[f"{p}.gate.weight"].T
            probs = logits.softmax(-1)
            tw, ti = probs.topk(self.c["num_experts_per_tok"], -1)
            tw = tw / tw.sum(-1, keepdim=True)
            out = torch.zeros_like(x)
            for e in range(self.c["num_experts"]):
                q = f"{p}.experts.{e}"
                y = (torch.nn.functional.silu(x @ w[f"{q}.gate_proj.weight"].T)
                     * (x @ w[f"{q}.up_proj.weight"].T)) @ w[f"{q}.down_proj.weight"].T
                gate = (tw * (ti == e)).sum(-1, keepdim=True)
                out = out + gate * y
            return out
        return (torch.nn.functional.silu(x @ w[f"{p}.gate_proj.weight"].T)
                * (x @ w[f"{p}.up_proj.weight"].T)) @ w[f"{p}.down_proj.weight"].T

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        c, w = self.c, self.w
        ids = torch.as_tensor(ids)
        b, s = ids.shape
        h, nh, nkv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
        d = h // nh
        x = w["model.embed_tokens.weight"][ids] * c["scale_emb"]
        pos = torch.arange(s)
        res_scale = c["scale_depth"] / math.sqrt(c["num_hidden_layers"])
        mask = torch.tril(torch.ones(s, s, dtype=torch.bool))
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}"
            hn = self._rms(x, w[f"{p}.input_layernorm.weight"])
            q = (hn @ w[f"{p}.self_attn.q_proj.weight"].T).view(b, s, nh, d)
            k = (hn @ w[f"{p}.self_attn.k_proj.weight"].T).view(b, s, nkv, d)
            v = (hn @ w[f"{p}.self_attn.v_proj.weight"].T).view(b, s, nkv, d)
            q, k = self._rope(q, pos), self._rope(k, pos)
            k = k.repeat_interleave(nh // nkv, dim=2)
            v = v.repeat_interleave(nh // nkv, dim=2)
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
            scores = scores.masked_fill(~mask, float("-inf"))
            attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, s, h)
            x = x + (attn @ w[f"{p}.self_attn.o_proj.weight"].T) * res_scale
            hn = self._rms(x, w[f"{p}.post_attention_layernorm.weight"])
            x = x + self._mlp(f"{p}.mlp", hn) * res_scale
        x = self._rms(x, w["model.norm.weight"]) / (h / c["dim_model_base"])
        head = w["lm_head.weight"] if "lm_head.weight" in w else w["model.embed_tokens.weight"]
        return (x @ head.T).numpy()


def word_tokenizer(path, words: str = "def fibonacci ( n ) : return if else a b c the of and to"):
    """A word-level HF tokenizer over a tiny vocabulary (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2),
    saved to ``path``; returned too."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in words.split():
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(path)
    return fast


def run_two_processes(script_text: str, out_path, timeout: int = 300) -> None:
    """Run ``script_text`` as 2 jax.distributed processes (4 CPU devices each) on 127.0.0.1.

    Each child gets ``argv = [port, process_id, out_path, tests_dir]``; both must exit 0."""
    import socket
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.fspath(out_path)), "child.py")
    with open(script, "w") as f:
        f.write(script_text)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    procs = [
        subprocess.Popen([sys.executable, script, str(port), str(pid), os.fspath(out_path), here],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for pid in (0, 1)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]


def micro_family_config(tmp_path, **changes):
    """A two-size micro wind-tunnel family config (YAML under ``tmp_path``) on a small local
    corpus of this repository's own source; ``changes`` replace top-level sections."""
    import yaml

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = tmp_path / "text"
    text.mkdir(exist_ok=True)
    for i in range(12):  # a small local corpus: this repository's own docs and sources
        (text / f"doc{i}.txt").write_text(
            open(os.path.join(root, "cpmjax", "scaling", "tasks.py")).read()[i * 400:(i + 3) * 400])
    config = {
        "out_dir": str(tmp_path / "family"),
        "head_dim": 8,
        "sizes": [{"name": "m1", "layers": 1, "hidden": 16},
                  {"name": "m2", "layers": 2, "hidden": 32}],
        "data": {"text_sources": [str(text)], "text_bytes": 20000, "n_train": 120,
                 "n_test": 10, "vocab_size": 300, "seq_len": 32, "batch_size": 2,
                 "eval_fraction": 0.2, "documents_per_shard": 4},
        "branches": {"starts": [4], "decay_fraction": 0.5},
        "recipe": {
            "model": {"config": {"model_type": "minicpm", "tie_word_embeddings": True,
                                 "scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 16,
                                 "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3},
                      "init_std": 0.1},
            "optim": {"lr": 0.01, "warmup_steps": 2},
            "run": {"log_every": 1, "eval_batches": 1, "loss_chunk": 32, "loss_remat": False,
                    "tensorboard": False, "async_checkpointing": False},
        },
    }
    config.update(changes)
    path = tmp_path / "family.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
