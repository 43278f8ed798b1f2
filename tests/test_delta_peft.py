"""PEFT LoRA parity: an adapter made with ``peft`` on a tiny transformers Llama gives, loaded into
cpmjax, the logits peft gives; and an adapter saved by cpmjax loads into peft with the same
logits."""

from __future__ import annotations

import numpy as np
import peft  # a test dependency (pyproject's test extra): a missing peft fails, never skips
import pytest
import torch
from helpers import save_hf_model, tiny_llama_config

import cpmjax
import cpmjax.delta as delta_api
from cpmjax.errors import DeltaError


def _peft_model(base_dir, adapter_dir):
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(base_dir).eval()
    return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


def test_peft_lora_parity(tmp_path):
    from transformers import LlamaForCausalLM

    config = tiny_llama_config()
    base_dir, adapter_dir = str(tmp_path / "base"), str(tmp_path / "adapter")
    save_hf_model(LlamaForCausalLM, config, base_dir)
    torch.manual_seed(1)
    lora_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                  alpha_pattern={"down_proj": 16}, rank_pattern={"down_proj": 2},
                                  lora_dropout=0.0, task_type="CAUSAL_LM")
    hf = peft.get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), lora_config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: make the adapter do something
                p.copy_(0.5 * torch.randn_like(p))
    hf.save_pretrained(adapter_dir)

    ids = np.random.RandomState(0).randint(3, config.vocab_size, (2, 9))
    with torch.no_grad():
        want = hf(torch.as_tensor(ids)).logits.numpy()
        plain = hf.get_base_model()
        with hf.disable_adapter():
            bare = plain(torch.as_tensor(ids)).logits.numpy()
    assert np.abs(want - bare).max() > 1e-2  # the adapter changes the logits

    model = cpmjax.from_pretrained(base_dir)
    delta = delta_api.load_peft(model, adapter_dir)
    assert len(delta.sites) == 3 * config.num_hidden_layers
    got = np.asarray(model(ids))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    # cpmjax -> PEFT: save, load with peft, same logits
    out_dir = str(tmp_path / "ours")
    delta.save_peft(out_dir)
    again = _peft_model(base_dir, out_dir)
    with torch.no_grad():
        np.testing.assert_allclose(again(torch.as_tensor(ids)).logits.numpy(), want,
                                   rtol=1e-4, atol=1e-4)

    # merged weights export to a plain transformers checkpoint with the same logits
    delta_api.merge(model, delta)
    merged_dir = str(tmp_path / "merged")
    cpmjax.save_pretrained(model, merged_dir)
    with torch.no_grad():
        merged = LlamaForCausalLM.from_pretrained(merged_dir).eval()
        np.testing.assert_allclose(merged(torch.as_tensor(ids)).logits.numpy(), want,
                                   rtol=1e-4, atol=1e-4)


def test_peft_unsupported_options(tmp_path):
    import json

    from transformers import LlamaForCausalLM

    base_dir, adapter_dir = str(tmp_path / "base"), str(tmp_path / "adapter")
    save_hf_model(LlamaForCausalLM, tiny_llama_config(), base_dir)
    lora_config = peft.LoraConfig(r=2, target_modules=["q_proj"], bias="lora_only",
                                  task_type="CAUSAL_LM")
    peft.get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), lora_config).save_pretrained(
        adapter_dir)
    model = cpmjax.from_pretrained(base_dir)
    with pytest.raises(DeltaError, match="bias='lora_only'"):
        delta_api.load_peft(model, adapter_dir)
    with open(f"{adapter_dir}/adapter_config.json") as f:
        cfg = json.load(f)
    cfg["peft_type"] = "IA3"
    with open(f"{adapter_dir}/adapter_config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(DeltaError, match="peft_type 'IA3' is not LORA"):
        delta_api.load_peft(model, adapter_dir)
