"""The cpmjax train half of CPET on tiny random models: hidden-state distillation (teacher frozen
bit for bit, λ=0 is plain cross-entropy, λ>0 moves the student's gradients), pruning masks kept
through full fine-tuning steps, the compress / distill config checks, and a short end-to-end
run with int4 + an inherited LoRA + recovery + distillation."""

from __future__ import annotations

import json
import os
import shutil
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import minicpm_hf_dict

import cpmjax.compress as cc
import cpmjax.delta as cd
from cpmjax.errors import ConfigError
from cpmjax.models import CausalLM, ModelConfig
from cpmjax.train.config import load_config
from cpmjax.train.distill import Distill, check_teacher, layer_outputs
from cpmjax.train.loop import train
from cpmjax.train.step import loss_fn, make_train_step

STDLIB = sysconfig.get_paths()["stdlib"]
# recovery's default targets select nnx.Linear, which a QuantizedLinear is not: name them
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = np.random.RandomState(0).randint(3, 96, (2, 12)).astype(np.int32)


def tiny(seed: int = 0, **overrides) -> CausalLM:
    return CausalLM(ModelConfig.from_hf_dict(minicpm_hf_dict(**overrides)), rngs=nnx.Rngs(seed))


def batch_of(ids=IDS) -> dict[str, jax.Array]:
    b, s = ids.shape
    return {"input_ids": jnp.asarray(ids), "targets": jnp.roll(jnp.asarray(ids), -1, 1),
            "positions": jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)),
            "segment_ids": jnp.ones((b, s), jnp.int32), "loss_mask": jnp.ones((b, s), bool)}


def flat(state) -> dict:
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


def distill_setup(weight: float, *, seed: int = 0, wrt=nnx.Param, student=None):
    teacher = tiny(seed=7)
    student = student if student is not None else tiny(seed=seed)
    opt = nnx.Optimizer(student, optax.adam(1e-2), wrt=wrt)
    graphdef, state = nnx.split((student, opt))
    tgraph, tstate = nnx.split(teacher)
    spec = Distill(tgraph, weight, (0, 1))
    return graphdef, state, tgraph, tstate, spec


def test_layer_outputs_match_the_model_forward():
    model = tiny()
    batch = batch_of()
    hidden, outs = layer_outputs(model, batch)
    ref = model(batch["input_ids"], positions=batch["positions"],
                segment_ids=batch["segment_ids"], return_hidden=True)
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(ref), rtol=1e-6, atol=1e-6)
    assert len(outs) == 2 and outs[0].shape == (2, 12, 32)


def test_teacher_bit_identical_after_steps_and_student_moves():
    graphdef, state, _, tstate, spec = distill_setup(1.0)
    teacher_before = flat(tstate)
    student_before = flat(nnx.state(nnx.merge(graphdef, state)[0], nnx.Param))
    step = jax.jit(make_train_step(graphdef, nnx.Param, chunk=12, distill=spec),
                   donate_argnums=0)
    for _ in range(3):
        state, metrics = step(state, batch_of(), tstate)
    assert float(metrics["hidden_mse"]) > 0 and np.isfinite(float(metrics["loss"]))
    after = flat(tstate)
    assert after.keys() == teacher_before.keys()
    for k, v in teacher_before.items():
        np.testing.assert_array_equal(after[k], v, err_msg=str(k))
    student_after = flat(nnx.state(nnx.merge(graphdef, state)[0], nnx.Param))
    assert any(not np.array_equal(student_after[k], v) for k, v in student_before.items())


def test_hidden_mse_counts_rows_that_continue_a_document():
    """A packed row that starts inside a document has segment id 0 everywhere (no BOS in it):
    its positions are real tokens and must be distilled (the MSE once masked them all out)."""
    from cpmjax.train.distill import distill_loss_fn

    _, _, tgraph, tstate, spec = distill_setup(1.0)
    student, teacher = tiny(), nnx.merge(tgraph, tstate)
    batch = {**batch_of(), "segment_ids": jnp.zeros(IDS.shape, jnp.int32)}
    _, aux = distill_loss_fn(student, teacher, batch, spec, chunk=12, remat=False)
    _, s_outs = layer_outputs(student, batch)
    _, t_outs = layer_outputs(teacher, batch)
    ref = np.mean([np.mean((np.asarray(s_outs[i], np.float64) - np.asarray(t_outs[i])) ** 2)
                   for i in spec.layers])
    assert ref > 0
    np.testing.assert_allclose(float(aux["hidden_mse"]), ref, rtol=1e-5)


def test_zero_weight_is_plain_cross_entropy_and_positive_weight_changes_gradients():
    from cpmjax.train.distill import distill_loss_fn

    batch = batch_of()
    grads = {}
    for weight in (0.0, 0.5):
        graphdef, state, tgraph, tstate, spec = distill_setup(weight)
        sgraph, sstate = nnx.split(nnx.merge(graphdef, state)[0])

        @jax.jit
        def both(sstate, tstate, spec=spec, sgraph=sgraph, tgraph=tgraph):
            def distilled(params):
                return distill_loss_fn(nnx.merge(sgraph, params), nnx.merge(tgraph, tstate),
                                       batch, spec, 12)

            def plain(params):
                return loss_fn(nnx.merge(sgraph, params), batch, 12)

            return (jax.value_and_grad(distilled, has_aux=True)(sstate),
                    jax.value_and_grad(plain, has_aux=True)(sstate))

        ((loss, aux), g), ((ce, _), g_ce) = both(sstate, tstate)
        if weight == 0.0:
            np.testing.assert_allclose(float(loss), float(ce), rtol=1e-6)
            np.testing.assert_allclose(float(aux["ce"]), float(ce), rtol=1e-6)
            for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ce), strict=True):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
        else:
            np.testing.assert_allclose(float(loss), float(ce) + 0.5 * float(aux["hidden_mse"]),
                                       rtol=1e-6)
        grads[weight] = jax.tree.leaves(g)
    diff = max(float(jnp.max(jnp.abs(a - b)))
               for a, b in zip(grads[0.0], grads[0.5], strict=True))
    assert diff > 1e-4


def test_two_four_masks_kept_through_full_fine_tuning_steps():
    model = tiny()
    cc.prune(model, 0.5, "2:4")
    keep = {p: np.asarray(m) for p, m in cc.masks(model).items()}
    opt = nnx.Optimizer(model, optax.adam(5e-2), wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))
    step = jax.jit(make_train_step(graphdef, nnx.Param, chunk=12), donate_argnums=0)
    for _ in range(3):
        state, _ = step(state, batch_of())
    model, _ = nnx.merge(graphdef, state)
    w = model.model.layers[0].mlp.up_proj.kernel[...]
    assert float(jnp.max(jnp.abs(w))) > 0
    for path, mask in cc.masks(model).items():
        np.testing.assert_array_equal(np.asarray(mask), keep[path])
    for layer in model.model.layers:
        for part, name in (("mlp", "up_proj"), ("mlp", "down_proj"), ("self_attn", "q_proj")):
            lin = getattr(getattr(layer, part), name)
            k = np.asarray(lin.kernel[...])
            assert np.all(k[~np.asarray(lin.prune_mask[...])] == 0)
            # exactly 2 of every 4 consecutive input weights per column survive
            assert np.all((k.reshape(-1, 4, k.shape[1]) != 0).sum(1) <= 2)


def test_config_validates_compress_and_distill():
    ok = load_config(overrides={"compress.quantize": {"bits": 4, "group_size": 16},
                                "compress.prune": {"sparsity": 0.5, "pattern": "2:4"},
                                "distill.teacher": "self-uncompressed",
                                "distill.hidden_weight": 0.5, "distill.layers": [0, 1]})
    assert ok.compress.active and ok.distill.active and ok.compress.quantize.bits == 4
    for bad, match in [({"distill.teacher": "x", "distill.hidden_weight": -1.0}, "hidden_weight"),
                       ({"distill.teacher": "x", "distill.hidden_weight": float("nan")},
                        "hidden_weight"),
                       ({"distill.teacher": "x", "distill.layers": [1, 1]}, "distill.layers"),
                       ({"distill.teacher_delta": "d"}, "teacher_delta"),
                       ({"compress.quantize": {"bits": 3}}, "bits"),
                       ({"delta.inherit": "x/lora", "delta.train_inherit": {"steps": 2}},
                        "train_inherit"),
                       ({"compress.prune": {"sparsity": 1.5}}, "sparsity"),
                       ({"compress.moefy": {"num_experts": 2, "top_k": 3}}, "top_k")]:
        with pytest.raises(ConfigError, match=match):
            load_config(overrides=bad)
    config = load_config(overrides={"distill.teacher": "teacher-dir"})
    with pytest.raises(ConfigError, match=r"vocab_size=128.*vocab_size=96"):
        check_teacher(config, tiny(), tiny(vocab_size=128))
    with pytest.raises(ConfigError, match=r"hidden_size=64.*hidden_size=32"):
        check_teacher(config, tiny(), tiny(hidden_size=64))
    with pytest.raises(ConfigError, match="out of range"):
        check_teacher(load_config(overrides={"distill.teacher": "t", "distill.layers": [5]}),
                      tiny(), tiny())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cpet"))
    os.makedirs(os.path.join(root, "corpus"))
    for name in ("textwrap.py", "bisect.py", "colorsys.py", "heapq.py", "json/decoder.py"):
        shutil.copy(os.path.join(STDLIB, name),
                    os.path.join(root, "corpus", name.replace("/", "_")))
    return root


def run_config(root: str, name: str, steps: int, **extra) -> dict:
    tree = {
        "model.config": {**minicpm_hf_dict(), "vocab_size": 0},
        "model.init_std": 0.1,
        "data.sources": [os.path.join(root, "corpus")], "data.vocab_size": 300,
        "data.seq_len": 32, "data.batch_size": 2, "data.eval_fraction": 0.2,
        "data.tokenizer": None, "data.cache_dir": os.path.join(root, "data"),
        "optim.lr": 0.01, "optim.warmup_steps": 1, "optim.decay_steps": 2,
        "run.steps": steps, "run.out_dir": os.path.join(root, name), "run.log_every": 1,
        "run.checkpoint_every": 0, "run.eval_batches": 1, "run.progress": False,
        "run.tensorboard": False, "run.loss_chunk": 32,
    }
    tree.update(extra)
    return tree


def test_cpet_end_to_end_run(corpus):
    """A short pretraining of a tiny model, then one CPET run on its int4 + 2:4 copy: a LoRA
    trained first on the uncompressed model (delta.train_inherit), inherited, + recovery +
    distillation against the uncompressed model with that LoRA."""
    base = train(load_config(overrides=run_config(corpus, "base", 3)))
    tok = os.path.join(corpus, "base", "tokenizer")
    lora_dir = os.path.join(corpus, "lora", "delta")  # trained first by delta.train_inherit
    cfg = load_config(overrides=run_config(corpus, "cpet", 4, **{
        "delta.train_inherit": {"steps": 2, "method": "lora", "hparams": {"r": 2}},
        "model.init_from": base.export_dir, "data.tokenizer": tok,
        "compress.prune": {"sparsity": 0.5, "pattern": "2:4", "criterion": "wanda"},
        "compress.quantize": {"bits": 4, "group_size": 16},
        "delta.inherit": lora_dir, "delta.method": "recovery", "delta.hparams": {"r": 2},
        "delta.targets": LINEARS,
        "distill.teacher": "self-uncompressed", "distill.teacher_delta": lora_dir,
        "distill.hidden_weight": 0.5, "distill.layers": "all"}))
    result = train(cfg)
    assert result.step == 4 and all(np.isfinite(result.losses))
    assert os.path.isdir(os.path.join(corpus, "cpet", "inherit", "checkpoints"))
    records = [json.loads(line) for line in open(os.path.join(corpus, "cpet", "metrics.jsonl"))]
    assert all(r["hidden_mse"] >= 0 for r in records if "loss" in r)
    exported = sorted(os.listdir(result.export_dir))
    assert "delta" in exported and "delta-recovery" in exported
    # full fine-tuning of a 2:4-pruned copy through the loop: the exported weights keep 2:4
    full = train(load_config(overrides=run_config(corpus, "pruned", 3, **{
        "model.init_from": base.export_dir, "data.tokenizer": tok, "run.export_dtype": "float32",
        "compress.prune": {"sparsity": 0.5, "pattern": "2:4"}})))
    from cpmjax.hf import from_pretrained

    start, tuned = from_pretrained(base.export_dir), from_pretrained(full.export_dir)
    for a, b in zip(start.model.layers, tuned.model.layers, strict=True):
        for part, name in (("mlp", "up_proj"), ("mlp", "down_proj"), ("self_attn", "o_proj")):
            k0 = np.asarray(getattr(getattr(a, part), name).kernel[...])
            k = np.asarray(getattr(getattr(b, part), name).kernel[...])
            assert (k.reshape(-1, 4, k.shape[1]) != 0).sum(1).max() <= 2
            assert not np.array_equal(k[k != 0], k0[k != 0])  # it did train
    # a teacher of another vocabulary is refused before training
    bad = load_config(overrides=run_config(corpus, "bad", 2, **{
        "model.init_from": base.export_dir, "data.tokenizer": tok,
        "delta.method": "lora", "distill.teacher": lora_dir_teacher(corpus, base.export_dir)}))
    with pytest.raises(ConfigError, match="vocab_size"):
        train(bad)
    assert not os.path.isdir(os.path.join(corpus, "bad", "checkpoints")) or \
        not os.listdir(os.path.join(corpus, "bad", "checkpoints"))


def lora_dir_teacher(root: str, base_dir: str) -> str:
    """A copy of ``base_dir`` whose config claims a larger vocabulary (a different teacher)."""
    from cpmjax.hf import from_pretrained, save_pretrained

    model = from_pretrained(base_dir)
    hf = {**minicpm_hf_dict(), "vocab_size": model.config.vocab_size + 128}
    other = CausalLM(ModelConfig.from_hf_dict(hf), rngs=nnx.Rngs(3))
    out = os.path.join(root, "other-teacher")
    save_pretrained(other, out, dtype="float32")
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["vocab_size"] == hf["vocab_size"]
    return out


def test_inherited_delta_and_recovery_both_train(corpus):
    model = tiny()
    cd.attach(model, "lora", r=2)
    d = os.path.join(corpus, "tiny-lora")
    cd.get(model).save(d)
    student = tiny()
    cc.quantize(student, bits=4, group_size=16)
    cd.inherit(d, student)
    cd.attach(student, "recovery", name="recovery", targets=LINEARS, r=2)
    assert sorted(cd.active_names(student)) == ["default", "recovery"]


def test_config_runs_nf4_and_structured_pruning():
    """``compress.quantize.bits: nf4`` and ``compress.prune_neurons`` reach cpmjax.compress
    through the recipe's config, in the documented order (pruning before quantizing)."""
    from cpmjax.train.setup import compress_model

    config = load_config(overrides={"compress.prune_neurons": {"sparsity": 0.25},
                                    "compress.quantize": {"bits": "nf4"}})
    model = tiny()
    done = compress_model(config, model)
    assert done == ["prune neurons 0.25 (magnitude)", "nf4 per channel"]
    record = cc.compression_of(model)
    assert [r["kind"] for r in record] == ["prune_neurons", "quantize"]
    assert record[0]["sparsity"] == 0.25 and record[1]["bits"] == "nf4"
    assert len(cc.quantized_modules(model)) == len(record[1]["modules"]) == 14
    with pytest.raises(ConfigError, match="prune_neurons.sparsity"):
        load_config(overrides={"compress.prune_neurons": {"sparsity": 1.0}})
    with pytest.raises(ConfigError, match="bits"):
        load_config(overrides={"compress.quantize": {"bits": "nf3"}})
