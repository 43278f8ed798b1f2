"""Delta tuning: every method on a tiny cpmjax MiniCPM (identity at attach, training moves only
the delta, save/load, detach), exact references for prefix tuning and soft prompts, multi-task
switching, merge, errors, and a foreign NNX model checked against a pure-jnp reference for
values and gradients."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import minicpm_hf_dict

import cpmjax
import cpmjax.delta as delta_api
from cpmjax.delta import _adapters
from cpmjax.errors import DeltaError
from cpmjax.models import CausalLM, ModelConfig

VOCAB = 96


def _tiny(seed: int = 0, layers: int = 1, **overrides) -> CausalLM:
    config = ModelConfig.from_hf_dict(minicpm_hf_dict(num_hidden_layers=layers, **overrides))
    return CausalLM(config, rngs=nnx.Rngs(seed))


def _ids(batch: int = 2, seq: int = 8, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.RandomState(seed).randint(3, VOCAB, (batch, seq)), jnp.int32)


@nnx.jit
def _fwd(model, ids):
    """The forward pass, compiled (eager dispatch of many tiny ops is slower on CPU); one
    compilation per model structure, reused by every test with the same structure."""
    return model(ids)


@nnx.jit
def _fwd_at(model, ids, positions):
    return model(ids, positions=positions)


@nnx.jit
def _prefill(model, ids, positions, cache, slots):
    return model(ids, positions=positions, cache=cache, cache_slots=slots)


@nnx.jit
def _decode(model, ids, positions, cache, slots):
    return model(ids, positions=positions, cache=cache, cache_slots=slots, attend_cache=True)


def _assert_same(a, b):
    """Equal up to float32 rounding: a different compiled graph may fuse differently."""
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def _loss(model, ids):
    logits = model(ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def _flat(state) -> dict:
    return {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(state)}


def _backbone(model) -> dict:
    """Backbone values by logical path (a delta site's ``base`` component dropped)."""
    return {tuple(p for p in k if p != "base"): v
            for k, v in _flat(delta_api.backbone(model)).items()}


def _randomize(delta, scale: float = 0.1, seed: int = 1) -> None:
    """Give every delta parameter a random non-zero value (so comparisons can fail)."""
    key = jax.random.key(seed)
    for _, var in nnx.to_flat_state(delta.state()):
        key, sub = jax.random.split(key)
        var.set_value(scale * jax.random.normal(sub, var.shape, var.dtype))


# ----------------------------------------------------------------------------------------------
# every method on a cpmjax model
@pytest.mark.parametrize("method", sorted(delta_api.METHODS))
def test_method_lifecycle(method, tmp_path):
    model = _tiny()
    ids = _ids()
    ref = _fwd(model, ids)
    backbone_before = _backbone(model)
    originals = {e.path: e.module for e in delta_api._addressing.walk(model)}

    delta = delta_api.attach(model, method)
    assert delta.num_params() > 0
    out = _fwd(model, ids)
    assert out.shape == ref.shape
    if delta_api.METHODS[method].identity_at_init:
        _assert_same(out, ref)
    else:
        assert not np.allclose(out, ref)

    # a few steps with only the delta trainable
    filt = delta_api.trainable(model)
    opt = nnx.Optimizer(model, optax.adam(3e-2), wrt=filt)

    @nnx.jit
    def step(model, opt, ids):
        loss, grads = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, filt))(model, ids)
        opt.update(model, grads)
        return loss

    delta_before = _flat(delta.state())
    losses = [float(step(model, opt, ids)) for _ in range(4)]
    assert losses[-1] < losses[0]
    delta_after = _flat(delta.state())
    assert set(delta_after) == set(delta_before)
    assert any(not np.array_equal(delta_before[k], delta_after[k]) for k in delta_after)
    backbone_after = _backbone(model)
    assert set(backbone_after) == set(backbone_before)
    for k in backbone_before:  # bit-identical
        np.testing.assert_array_equal(backbone_after[k], backbone_before[k])
    trained = _fwd(model, ids)
    assert not np.allclose(trained, ref)

    # save (from a handle looked up by name) -> load into a fresh backbone -> same outputs
    assert delta_api.get(model).hparams == delta_api._api._json_safe(delta.hparams)
    delta_api.get(model).save(str(tmp_path / "d"))
    fresh = _tiny()
    loaded = delta_api.load(fresh, str(tmp_path / "d"))
    assert loaded.method == delta_api.METHODS[method].name and loaded.sites == delta.sites
    np.testing.assert_array_equal(np.asarray(_fwd(fresh, ids)), np.asarray(trained))

    # detach -> the original objects and outputs exactly
    delta.detach()
    for e in delta_api._addressing.walk(model):
        assert e.site is None and originals[e.path] is e.module
    np.testing.assert_array_equal(np.asarray(_fwd(model, ids)), np.asarray(ref))


def test_prefix_equals_real_prompt_tokens_and_kv_cache_decode():
    """A prefix whose keys/values are those of real prompt tokens gives the logits of the full
    sequence, in a plain forward and in cached prefill + decode."""
    model = _tiny(layers=2)
    p, s = 3, 6
    prompt, x = _ids(1, p, seed=1), _ids(1, s, seed=2)
    full = _fwd(model, jnp.concatenate([prompt, x], axis=1))[:, p:]
    arange = jnp.arange(p)[None]
    _, cache = _prefill(model, prompt, arange, model.init_cache(1, p), arange)
    delta = delta_api.attach(model, "prefix", num_tokens=p)
    for i, (path, module) in enumerate(delta.modules()):
        assert path == f"model.layers.{i}.self_attn"
        module.prefix_k.set_value(cache[i]["k"][0])
        module.prefix_v.set_value(cache[i]["v"][0])
    positions = jnp.arange(p, p + s)[None]
    np.testing.assert_allclose(_fwd_at(model, x, positions), full, rtol=1e-5, atol=1e-5)
    # prefill s-1 tokens into a fresh cache (slots 0..), then decode the last one against it
    cache = model.init_cache(1, s)
    _, cache = _prefill(model, x[:, :-1], positions[:, :-1], cache, positions[:, :-1] - p)
    last, _ = _decode(model, x[:, -1:], positions[:, -1:], cache, positions[:, -1:] - p)
    np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)


def test_soft_prompt_equals_real_prompt_tokens():
    """A soft prompt equal to the embeddings of real tokens gives the logits of the sequence
    that starts with those tokens."""
    model = _tiny()
    p = 4
    prompt, x = jnp.broadcast_to(_ids(1, p, seed=3), (2, p)), _ids(2, 7, seed=4)
    full = _fwd(model, jnp.concatenate([prompt, x], axis=1))[:, p:]
    delta = delta_api.attach(model, "soft_prompt", num_tokens=p)
    assert delta.sites == ["model.embed_tokens", "model.norm"]
    soft = delta.modules()[0][1]
    soft.prompt.set_value(model.model.embed_tokens.embedding[...][prompt[0]])
    np.testing.assert_allclose(_fwd(model, x), full, rtol=1e-5, atol=1e-5)


def test_multi_task_switching_under_jit():
    model = _tiny()
    ids = _ids()
    ref = _fwd(model, ids)
    a = delta_api.attach(model, "lora", name="task_a", seed=1)
    _randomize(a, seed=1)
    b = delta_api.attach(model, "lora", name="task_b", targets=["mlp.up_proj"], seed=2)
    _randomize(b, seed=2)
    c = delta_api.attach(model, "bitfit", name="task_c", active=False)
    _randomize(c, seed=3)
    both = _fwd(model, ids)  # a and b active, c not
    with delta_api.activate(model, "task_a"):
        only_a = _fwd(model, ids)
        assert delta_api.active_names(model) == ["task_a"]
    assert sorted(delta_api.active_names(model)) == ["task_a", "task_b"]
    with delta_api.activate(model, "task_c"):
        only_c = _fwd(model, ids)
    with delta_api.activate(model, None):
        np.testing.assert_array_equal(np.asarray(_fwd(model, ids)), np.asarray(ref))
    # independent references: the same deltas attached alone to a fresh backbone
    for handle, got in ((a, only_a), (c, only_c)):
        other = _tiny()
        d = delta_api.attach(other, handle.method, targets=handle.sites, name=handle.name)
        nnx.update(other, nnx.merge_state(nnx.state(other), handle.state()))
        np.testing.assert_allclose(_fwd(other, ids), got, rtol=1e-6, atol=1e-6)
        assert d.num_params() == handle.num_params()
    assert not np.allclose(both, only_a)
    # trainable() follows what is active; naming a delta selects it alone
    keys = set(_flat(nnx.state(model, delta_api.trainable(model, "task_b"))))
    assert keys and all("task_b" in str(k) for k in keys)
    text = delta_api.show(model, print_it=False)
    assert "lora[task_a]" in text and "bitfit[task_c]" in text and "inactive" in text


def test_show_folds_identical_layers_and_counts():
    model = _tiny(layers=2)
    delta = delta_api.attach(model, "lora", r=4)
    text = delta_api.show(model, print_it=False)
    assert "layers" in text and "0-1 ×2" in text
    assert "q_proj (Linear, 1,024 params)  <- lora[default]: 256" in text
    assert f"delta 'default' (active): {delta.num_params():,} params" in text
    # per layer: q_proj A [32, 4] + B [4, 32], v_proj A [32, 4] + B [4, 16]
    assert delta.num_params() == 2 * (128 + 128 + 128 + 64)


def test_lora_merge_and_export(tmp_path):
    model = _tiny(tie_word_embeddings=False)
    ids = _ids()
    delta = delta_api.attach(model, "lora", targets=[r".*\.(q_proj|o_proj|down_proj)"], r=4)
    _randomize(delta, scale=0.2)
    unmerged = _fwd(model, ids)
    delta_api.merge(model, delta)
    assert isinstance(model.model.layers[0].self_attn.q_proj, nnx.Linear)
    merged = _fwd(model, ids)
    np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-5)
    cpmjax.save_pretrained(model, str(tmp_path / "m"))
    again = cpmjax.from_pretrained(str(tmp_path / "m"))
    np.testing.assert_allclose(_fwd(again, ids), merged, rtol=1e-6, atol=1e-6)


def test_errors(tmp_path):
    model = _tiny()
    with pytest.raises(DeltaError, match="unknown delta method 'loraa'"):
        delta_api.attach(model, "loraa")
    with pytest.raises(DeltaError, match="target 'self_attn.qq_proj' matches no module"):
        delta_api.attach(model, "lora", targets=["self_attn.q_proj", "self_attn.qq_proj"])
    assert delta_api.names(model) == []  # nothing half-attached
    with pytest.raises(DeltaError, match="unknown hyper-parameter.*'rank_'"):
        delta_api.attach(model, "lora", rank_=3)
    with pytest.raises(DeltaError, match="needs a linear module.*model.layers.0.mlp"):
        delta_api.attach(model, "lora", targets=["mlp"])
    with pytest.raises(DeltaError, match="only matches excluded modules"):
        delta_api.attach(model, "lora", targets=["model.embed_tokens"], exclude=["embed_tokens"])
    d = delta_api.attach(model, "lora")
    with pytest.raises(DeltaError, match="already attached"):
        delta_api.attach(model, "bitfit")
    with pytest.raises(DeltaError, match="cannot activate \\['nope'\\]"):
        delta_api.activate(model, "nope")
    with pytest.raises(DeltaError, match="cannot merge the bitfit delta"):
        delta_api.attach(model, "bitfit", name="bias", targets=["mlp.up_proj"])
        delta_api.merge(model, "bias")
    d.save(str(tmp_path / "d"))
    wider = _tiny(intermediate_size=64)
    with pytest.raises(DeltaError, match="intermediate_size: delta=48 model=64"):
        delta_api.load(wider, str(tmp_path / "d"))
    with pytest.raises(cpmjax.errors.MissingPathError):
        delta_api.load(wider, str(tmp_path / "nothing"))


def test_mla_defaults():
    """MiniCPM3 (multi-head latent attention): default targets and key/value shapes."""
    from helpers import tiny_minicpm3_config

    config = ModelConfig.from_hf_dict(tiny_minicpm3_config(num_hidden_layers=1).to_dict())
    model = CausalLM(config, rngs=nnx.Rngs(0))
    ids = _ids(1, 5)
    ref = _fwd(model, ids)
    lora = delta_api.attach(model, "lora")
    assert sorted(p.rsplit(".", 1)[1] for p in lora.sites) == ["kv_b_proj", "q_b_proj"]
    _assert_same(_fwd(model, ids), ref)
    prefix = delta_api.attach(model, "prefix", name="prefix", num_tokens=2)
    k = prefix.modules()[0][1].prefix_k
    assert k.shape == (2, config.num_attention_heads, config.qk_head_dim)
    assert _fwd(model, ids).shape == ref.shape


# ----------------------------------------------------------------------------------------------
# a foreign NNX model: never seen by cpmjax, checked against a pure-jnp reference
class Block(nnx.Module):
    def __init__(self, dim: int, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.ff = nnx.Dict(up=nnx.Linear(dim, 2 * dim, rngs=rngs),
                           down=nnx.Linear(2 * dim, dim, use_bias=False, rngs=rngs))

    def __call__(self, x):
        return x + self.ff["down"](jax.nn.relu(self.ff["up"](self.norm(x))))


class Foreign(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, dim: int = 16, vocab: int = 24):
        self.tok = nnx.Embed(vocab, dim, rngs=rngs)
        self.blocks = nnx.List([Block(dim, rngs) for _ in range(2)])
        self.head = nnx.Linear(dim, vocab, rngs=rngs)

    def __call__(self, ids):
        x = self.tok(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _reference(params: dict, deltas: dict, ids: jax.Array) -> jax.Array:
    """The foreign model with LoRA on ``up``, an adapter after each block's ``ff.down`` call,
    a parallel adapter around ``norm`` and BitFit on ``head`` -- written out in jnp."""

    def layer_norm(x, scale, bias):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / jnp.sqrt(var + 1e-6) * scale + bias

    gelu = lambda z: jax.nn.gelu(z, approximate=True)
    x = params["tok.embedding"][ids]
    for i in range(2):
        p, d = f"blocks.{i}.", f"blocks.{i}."
        h = layer_norm(x, params[p + "norm.scale"], params[p + "norm.bias"])
        h = h + (gelu(x @ deltas[d + "norm:down.kernel"] + deltas[d + "norm:down.bias"])
                 @ deltas[d + "norm:up.kernel"] + deltas[d + "norm:up.bias"])  # parallel
        lora = deltas[d + "ff.up:lora_a"] @ deltas[d + "ff.up:lora_b"] * (16 / 4)
        u = h @ (params[p + "ff.up.kernel"] + lora) + params[p + "ff.up.bias"]
        y = jax.nn.relu(u) @ params[p + "ff.down.kernel"]
        y = y + (gelu(y @ deltas[d + "ff.down:down.kernel"] + deltas[d + "ff.down:down.bias"])
                 @ deltas[d + "ff.down:up.kernel"] + deltas[d + "ff.down:up.bias"])  # adapter
        x = x + y
    return x @ params["head.kernel"] + params["head.bias"] + deltas["head:bias"]


def test_foreign_model_lora_adapters_bitfit_values_and_grads():
    model = Foreign(nnx.Rngs(0))
    ids = _ids(2, 5)[:, :5] % 24
    ref = _fwd(model, ids)
    params = {".".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(nnx.state(model))}
    handles = [
        delta_api.attach(model, "lora", targets=r"blocks\.\d+\.ff\.up", name="l", r=4),
        delta_api.attach(model, "adapter", targets="ff.down", name="a", bottleneck_dim=3),
        delta_api.attach(model, "parallel_adapter", targets=[nnx.LayerNorm], name="p",
                         bottleneck_dim=5, dim=16),
        delta_api.attach(model, "bitfit", targets="head", exclude=[], name="b"),
    ]
    _assert_same(_fwd(model, ids), ref)
    for i, h in enumerate(handles):
        _randomize(h, scale=0.3, seed=10 + i)
    deltas = {}
    for h in handles:
        for path, module in h.modules():
            for k, v in nnx.to_flat_state(nnx.state(module, delta_api.DeltaParam)):
                deltas[f"{path}:{'.'.join(map(str, k))}"] = v[...]
    out = _fwd(model, ids)
    expected = jax.jit(_reference)(params, deltas, ids)
    assert not np.allclose(out, ref, atol=1e-3)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)

    # gradients w.r.t. every delta parameter match the reference's
    def loss(model):
        return jnp.sum(jnp.tanh(model(ids)))

    grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, delta_api.trainable(model))))(model)
    got = {}
    for path_tuple, g in nnx.to_flat_state(grads):
        site = ".".join(map(str, path_tuple[: path_tuple.index("deltas")]))
        rest = ".".join(map(str, path_tuple[path_tuple.index("deltas") + 2:]))
        got[f"{site.replace('.base', '')}:{rest}"] = np.asarray(g[...])
    want = jax.jit(jax.grad(lambda d: jnp.sum(jnp.tanh(_reference(params, d, ids)))))(deltas)
    assert set(got) == set(want)
    for k in want:  # sums of terms of size ~10: absolute tolerance scaled to the gradient
        scale = float(np.abs(want[k]).max())
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5 * scale, err_msg=k)


def test_compacter_phm_matches_kron_definition():
    model = Foreign(nnx.Rngs(0))
    delta = delta_api.attach(model, "compacter", targets="ff.down", reduction_factor=2,
                             hypercomplex_division=4, phm_rank=2)
    _randomize(delta, seed=5)
    mods = [m for _, m in delta.modules()]
    assert mods[0].down.rule is mods[1].down.rule is mods[1].up.rule  # one shared rule
    for m in mods:
        for proj in (m.down, m.up):
            np.testing.assert_allclose(
                proj.weight(), _adapters.phm_weight_reference(proj.rule[...], proj.s[...],
                                                              proj.t[...]), rtol=1e-6, atol=1e-6)
    # the shared rule is one parameter (counted and saved once per site, loaded consistently)
    assert delta.num_params() == sum(
        v.size for v in jax.tree.leaves(nnx.state(model, delta_api.trainable(model))))


def test_foreign_prefix_needs_shapes():
    model = Foreign(nnx.Rngs(0))
    with pytest.raises(DeltaError, match="cannot tell the key/value shape of blocks.0.ff"):
        delta_api.attach(model, "prefix", targets=r"blocks\.\d+\.ff")


def test_save_is_delta_only(tmp_path):
    model = _tiny()
    delta = delta_api.attach(model, "lora")
    path = delta.save(str(tmp_path / "d"))
    size = os.path.getsize(os.path.join(path, "delta.safetensors"))
    assert size < 4 * delta.num_params() + 4096


def test_failed_save_keeps_the_previous_delta(tmp_path, monkeypatch):
    """Delta and PEFT saves are atomic (cpmjax.safetensors_io): a write that fails midway
    leaves the previous save loadable and the directory's other files in place."""
    import cpmjax.safetensors_io as st

    model = _tiny()
    delta = delta_api.attach(model, "lora", r=4)
    _randomize(delta)
    for seed, save, weights in ((7, delta.save, "delta.safetensors"),
                                (8, delta.save_peft, "adapter_model.safetensors")):
        out = tmp_path / weights
        save(str(out))
        (out / "notes.txt").write_text("mine")
        before = (out / weights).read_bytes()
        _randomize(delta, seed=seed)

        def boom(tensors, path, metadata=None):
            raise OSError("disk full")

        monkeypatch.setattr(st, "_write_safetensors", boom)
        with pytest.raises(OSError, match="disk full"):
            save(str(out))
        monkeypatch.undo()
        assert (out / weights).read_bytes() == before
        assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-save")]
        save(str(out))
        assert (out / "notes.txt").read_text() == "mine"
        assert (out / weights).read_bytes() != before
        if weights == "delta.safetensors":
            loaded = delta_api.load(_tiny(), str(out))
            for (_, x), (_, y) in zip(nnx.to_flat_state(delta.state()),
                                      nnx.to_flat_state(loaded.state()), strict=True):
                np.testing.assert_array_equal(x[...], y[...])
