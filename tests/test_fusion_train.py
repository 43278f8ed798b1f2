"""UltraFuser training: the balanced sampler, stage 1 (gate only), stage 2, resuming, the
response-only loss, and the data generator's exact math answers."""

from __future__ import annotations

import random

import jax
import numpy as np
import pytest
from flax import nnx

from cpmjax.delta import detach
from cpmjax.errors import ConfigError, MissingPathError
from cpmjax.fusion import FusedLM, load_fused
from cpmjax.fusion.data import (
    format_example,
    math_answer,
    math_problem,
    split_example,
)
from cpmjax.fusion.train import (
    BalancedSampler,
    encode_examples,
    load_fusion_config,
    response_loss,
    train_fusion,
)
from cpmjax.models import CausalLM, ModelConfig
from cpmjax.train.loss import cross_entropy_reference

WORDS = ("### Instruction: add take the of a b c d e f g h 1 2 3 4 5 6 7 8 9 = + . answer is "
         "def return x y z")


def make_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for word in WORDS.split():
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(path)
    return fast


def tiny(seed: int) -> CausalLM:
    config = ModelConfig(model_type="minicpm", vocab_size=64, hidden_size=32,
                         intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, scale_emb=4.0,
                         scale_depth=1.4, dim_model_base=16, tie_word_embeddings=True,
                         initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return CausalLM(config, rngs=nnx.Rngs(seed))


@nnx.jit
def forward(model, x):
    """One compiled forward (eager NNX compiles every small op separately)."""
    return model(x)


def write_domain(root, name, texts):
    d = root / name
    d.mkdir()
    for i, t in enumerate(texts):
        (d / f"{i:03d}.txt").write_text(t)
    return str(d)


@pytest.fixture()
def setup(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    rng = random.Random(0)
    letters = "a b c d e f g h".split()
    domains = {
        "text": write_domain(tmp_path, "text", [format_example(
            "take the " + " ".join(rng.choices(letters, k=3)),
            " ".join(rng.choices(letters, k=5))) for _ in range(7)]),
        "code": write_domain(tmp_path, "code", [format_example(
            "def " + " ".join(rng.choices("x y z".split(), k=2)),
            "return " + " ".join(rng.choices("x y z".split(), k=4))) for _ in range(5)]),
        "math": write_domain(tmp_path, "math", [format_example(
            f"add {rng.randint(1, 4)} + {rng.randint(1, 4)}", "answer is 5 .") for _ in range(3)]),
    }
    base = {
        "specialists": {"text": "unused", "code": "unused", "math": "unused"},
        "gate": "mlp",
        "data": {"domains": {k: [v] for k, v in domains.items()}, "tokenizer": str(tmp_path / "tok"),
                 "seq_len": 16, "per_domain": 2, "loss_after": "###"},
        "stage1": {"steps": 3, "lr": 0.01, "warmup_steps": 1},
        "stage2": {"steps": 2, "lr": 0.001, "warmup_steps": 1, "train": "all"},
        "run": {"out_dir": str(tmp_path / "run"), "checkpoint_every": 100, "log_every": 100},
    }
    return tok, base


def fresh():
    return FusedLM([tiny(1), tiny(2), tiny(3)], names=["text", "code", "math"],
                   rngs=nnx.Rngs(0))


def params(model):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in
            jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))}


def test_balanced_sampler_every_batch_exactly_n_per_domain():
    domains = {"a": np.arange(7 * 5).reshape(7, 5), "b": np.arange(3 * 5).reshape(3, 5) + 100,
               "c": np.arange(11 * 5).reshape(11, 5) + 200}
    sampler = BalancedSampler(domains, 2, seed=4)
    seen_b = []
    for _ in range(20):
        batch = next(sampler)
        assert batch["input_ids"].shape == (6, 4)
        np.testing.assert_array_equal(np.bincount(batch["domain"], minlength=3), [2, 2, 2])
        # the rows of each domain really come from that domain
        first = batch["input_ids"][:, 0]
        assert np.all((first[:2] < 100) & (first[2:4] >= 100) & (first[2:4] < 200)
                      & (first[4:] >= 200))
        seen_b.extend(first[2:4].tolist())
    # each epoch of a domain visits all its rows once: 40 draws of b's 3 rows
    counts = np.bincount((np.asarray(seen_b) - 100) // 5, minlength=3)
    assert counts.min() >= 13 and counts.sum() == 40
    # resumable: the position restores the same next batch
    state = sampler.state()
    expected = next(sampler)
    other = BalancedSampler(domains, 2, seed=4)
    other.restore(state)
    np.testing.assert_array_equal(next(other)["input_ids"], expected["input_ids"])
    # unbalanced: same rows per batch, domains in proportion to their sizes
    mixed = BalancedSampler(domains, 2, seed=4, balanced=False)
    dom = np.concatenate([next(mixed)["domain"] for _ in range(200)])
    share = np.bincount(dom, minlength=3) / dom.size
    np.testing.assert_allclose(share, [7 / 21, 3 / 21, 11 / 21], atol=0.03)


def test_empty_domain_is_a_typed_error(tmp_path, setup):
    with pytest.raises(ConfigError, match="domain 'b' has no examples"):
        BalancedSampler({"a": np.ones((2, 5)), "b": np.zeros((0, 5))}, 1)
    _, base = setup
    empty = tmp_path / "empty"
    empty.mkdir()
    base["data"]["domains"]["math"] = [str(empty)]
    with pytest.raises(ConfigError, match="math"):
        train_fusion(_config(base), fused=fresh())


def _config(base, **over):
    import copy

    data = copy.deepcopy(base)
    return load_fusion_config(None, {**_flatten(data), **over})


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("specialists", "domains"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def test_response_loss_counts_only_tokens_after_the_marker(setup):
    tok, _ = setup
    text = format_example("add 1 + 2", "answer is 3 .")
    rows = encode_examples([text], tok, 16)
    sampler = BalancedSampler({"m": rows}, 1, bos_id=1, pad_id=3,
                              loss_after_id=tok.convert_tokens_to_ids("###"))
    batch = next(sampler)
    model = tiny(5)
    loss, aux = response_loss(model, batch)
    ids = rows[0]
    marker = int(np.where(ids == tok.convert_tokens_to_ids("###"))[0][0])
    eos = int(np.where(ids == 2)[0][0])
    mask = np.zeros(16, np.float32)
    mask[marker:eos] = 1.0  # targets marker+1 .. eos (inclusive)
    np.testing.assert_array_equal(batch["loss_mask"][0], mask)
    ref = cross_entropy_reference(model(batch["input_ids"]), batch["targets"],
                                  batch["loss_mask"])
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)
    assert int(aux["tokens"]) == eos - marker


@pytest.mark.slow
def test_stage1_leaves_specialists_bit_identical_and_stage2_trains_them(setup):
    _, base = setup
    fused = fresh()
    before = params(fused)
    result = train_fusion(_config(base, **{"stage2.steps": 0}), fused=fused, export=False)
    after = params(fused)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all("['gate']" in k for k in changed), changed
    assert all(k in changed for k in before if "['gate']" in k)
    assert [r["domains"] for r in result.history] == [[2, 2, 2]] * 3
    # stage 2 ("all") then moves the specialists too, resuming from stage 1's checkpoint
    result = train_fusion(_config(base), fused=fused, export=True)
    assert result.resumed_from == 3
    final = params(fused)
    assert any(not np.array_equal(after[k], final[k]) for k in after if "['specialists']" in k)
    back = load_fused(result.export_dir)
    x = np.asarray([[1, 4, 5, 6, 7]])
    np.testing.assert_allclose(np.asarray(forward(back, x)), np.asarray(forward(fused, x)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_state(setup, tmp_path):
    _, base = setup
    short = {"stage1.steps": 2, "stage2.steps": 1}
    straight = fresh()
    train_fusion(_config(base, **short, **{"run.out_dir": str(tmp_path / "a")}), fused=straight,
                 export=False)
    # stop after the first step (max_minutes=0), then resume in a new process-like run
    resumed = fresh()
    first = train_fusion(_config(base, **short, **{"run.out_dir": str(tmp_path / "b"),
                                          "run.max_minutes": 0}), fused=resumed, export=False)
    assert first.stopped and len(first.history) == 1
    again = fresh()
    second = train_fusion(_config(base, **short, **{"run.out_dir": str(tmp_path / "b")}),
                          fused=again, export=False)
    assert second.resumed_from == 1 and len(second.history) == 2
    a, b = params(straight), params(again)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_stage2_with_delta_trains_only_gate_and_deltas(setup):
    _, base = setup
    fused = fresh()
    before = params(fused)
    train_fusion(_config(base, **{"stage1.steps": 0, "stage2.train": "delta",
                                  "stage2.delta": {"method": "lora", "r": 2,
                                                   "targets": ["self_attn.q_proj"]}}),
                 fused=fused, export=False)
    with_delta = params(fused)
    assert any("lora" in k.lower() for k in with_delta if k not in before)
    for model in fused.specialists:
        detach(model)
    after = params(fused)
    assert set(after) == set(before)
    for k, v in before.items():
        if "['gate']" not in k:
            np.testing.assert_array_equal(v, after[k], err_msg=k)
        else:
            assert not np.array_equal(v, after[k]), k


def test_config_errors(tmp_path, setup):
    _, base = setup
    with pytest.raises(MissingPathError):
        load_fusion_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="per_domain"):
        _config(base, **{"data.per_domain": 0})
    with pytest.raises(ConfigError, match="gate"):
        _config(base, **{"gate": "moe"})
    with pytest.raises(MissingPathError, match="specialist 'text'"):
        train_fusion(_config(base))
    y = tmp_path / "f.yaml"
    y.write_text("fusion:\n  specialists: {a: x}\n  data: {domains: {a: [x]}}\n")
    assert load_fusion_config(y).specialists == {"a": "x"}


def test_math_generator_answers_are_exact():
    rng = random.Random(1)
    for _ in range(200):
        question, worked, answer = math_problem(rng)
        assert math_answer(worked) == answer
        numbers = [int(t) for t in question.replace("x", " ").replace(".", " ").replace("?", " ")
                   .split() if t.lstrip("-").isdigit()]
        assert numbers, question
        if question.startswith("Solve for x"):
            a, b, c = numbers[0], numbers[1], numbers[2]
            sign = -1 if " - " in question else 1
            assert a * answer + sign * b == c
    doc = format_example("q ### q", "r")
    assert doc.count("###") == 1
    prompt, response = split_example(doc)
    assert prompt.endswith("###\n") and response == "r"


@pytest.mark.slow
def test_evaluation_matches_its_reference(setup):
    """domain_response_loss is the token-weighted mean response loss over all examples (the
    padded last batch included correctly); mean_gate_weights the mean over response tokens."""
    from cpmjax.fusion.evaluate import domain_response_loss, mean_gate_weights

    tok, _ = setup
    texts = [format_example("add 1 + 2", "answer is 3 ."),
             format_example("take the a b", "c d e f g"),
             format_example("def x", "return y z")]
    fused = fresh()
    marker = tok.convert_tokens_to_ids("###")
    rows = encode_examples(texts, tok, 16)
    sampler = BalancedSampler({"all": rows}, 3, bos_id=1, pad_id=3, loss_after_id=marker)
    sampler.indices = lambda batch: (np.zeros(3, np.int32), np.arange(3))  # in order
    batch = next(sampler)
    for model in (fused, fused.specialists[1]):
        ref = cross_entropy_reference(forward(model, batch["input_ids"]), batch["targets"],
                                      batch["loss_mask"])
        got = domain_response_loss(model, tok, texts, seq_len=16, batch_size=2)
        np.testing.assert_allclose(got, float(ref), rtol=1e-5)
    w = np.asarray(fused.gate_weights(batch["input_ids"]))
    m = batch["loss_mask"]
    expected = (w * m[..., None]).sum((0, 1)) / m.sum()
    got = mean_gate_weights(fused, tok, texts, seq_len=16, batch_size=2)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
