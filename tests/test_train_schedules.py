"""WSD / cosine schedule values at the phase boundaries, and μP learning-rate groups."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cpmjax.errors import ConfigError
from cpmjax.models import CausalLM, ModelConfig
from cpmjax.train.optim import BASE, MATRIX, adamw_mup, mup_group, mup_labels
from cpmjax.train.schedules import cosine_schedule, wsd_schedule


def _lr(schedule, step):
    return float(schedule(step))


def test_wsd_exp_boundaries():
    lr, warm, start, half = 0.01, 10, 50, 5.0
    s = wsd_schedule(lr, warm, start, 40, decay="exp", half_life=half)
    # linear warmup: (step + 1) / warm
    assert _lr(s, 0) == pytest.approx(lr / warm)
    assert _lr(s, 4) == pytest.approx(lr * 5 / warm)
    assert _lr(s, warm - 1) == pytest.approx(lr)
    # stable
    for step in (warm, 25, start - 1):
        assert _lr(s, step) == pytest.approx(lr)
    # decay: exactly lr at its start, halves every half-life
    assert _lr(s, start) == pytest.approx(lr)
    assert _lr(s, start + 5) == pytest.approx(lr / 2)
    assert _lr(s, start + 10) == pytest.approx(lr / 4)
    assert _lr(s, start + 7) == pytest.approx(lr * 0.5 ** (7 / half), rel=1e-5)


def test_wsd_exp_min_ratio_and_default_half_life():
    s = wsd_schedule(1.0, 0, 0, 80, decay="exp", min_ratio=0.1)  # half-life 80 / 8 = 10
    assert _lr(s, 10) == pytest.approx(0.5)
    assert _lr(s, 1000) == pytest.approx(0.1)


@pytest.mark.parametrize("form", ["linear", "cosine"])
def test_wsd_linear_and_cosine_decay(form):
    lr, start, length, floor = 2.0, 20, 10, 0.05
    s = wsd_schedule(lr, 5, start, length, decay=form, min_ratio=floor)
    assert _lr(s, start) == pytest.approx(lr)
    assert _lr(s, start + length) == pytest.approx(lr * floor)
    assert _lr(s, start + 5 * length) == pytest.approx(lr * floor)
    mid = _lr(s, start + length // 2)
    expected = 1 - (1 - floor) * 0.5 if form == "linear" else floor + (1 - floor) * 0.5
    assert mid == pytest.approx(lr * expected)
    # monotone non-increasing inside the decay
    values = [_lr(s, start + t) for t in range(length + 1)]
    assert all(a >= b - 1e-9 for a, b in zip(values, values[1:], strict=False))


def test_wsd_branch_from_stable_checkpoint():
    """A decay branched at step D agrees with the never-decaying run on every step < D."""
    stable = wsd_schedule(0.01, 10, None)
    branch = wsd_schedule(0.01, 10, 60, 20, decay="linear")
    for step in range(60):
        assert _lr(stable, step) == _lr(branch, step)
    assert _lr(branch, 70) < _lr(stable, 70)


def test_wsd_is_jittable_and_vectorised():
    s = wsd_schedule(0.01, 10, 50, 40)
    steps = jnp.arange(100)
    np.testing.assert_allclose(jax.jit(jax.vmap(s))(steps), [float(s(int(i))) for i in steps],
                               rtol=1e-6)


def test_cosine_schedule():
    s = cosine_schedule(1.0, 10, 110, min_ratio=0.1)
    assert _lr(s, 9) == pytest.approx(1.0)
    assert _lr(s, 10) == pytest.approx(1.0)
    assert _lr(s, 60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert _lr(s, 110) == pytest.approx(0.1)
    assert _lr(s, 500) == pytest.approx(0.1)


def test_schedule_config_errors():
    with pytest.raises(ConfigError, match="decay form"):
        wsd_schedule(0.01, 10, 50, 10, decay="step")
    with pytest.raises(ConfigError, match="before the end of warmup"):
        wsd_schedule(0.01, 10, 5, 10)
    with pytest.raises(ConfigError, match="decay_steps > 0"):
        wsd_schedule(0.01, 10, 20, 0, decay="linear")
    with pytest.raises(ConfigError, match="total_steps"):
        cosine_schedule(0.01, 10, 10)


# ----------------------------------------------------------------------------------------------
# μP groups


class _Block(nnx.Module):
    def __init__(self, rngs):
        self.proj = nnx.Linear(4, 4, rngs=rngs)
        self.norm = nnx.RMSNorm(4, rngs=rngs)


class _Toy(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(10, 4, rngs=rngs)
        self.layers = nnx.List([_Block(rngs), _Block(rngs)])
        self.head = nnx.Linear(4, 10, rngs=rngs)


def test_mup_groups_by_path_on_toy_module():
    model = _Toy(nnx.Rngs(0))
    labels = mup_labels(nnx.state(model, nnx.Param))
    flat = {".".join(str(k) for k in path): v for path, v in nnx.to_flat_state(labels)}
    assert flat["layers.0.proj.kernel"] == MATRIX
    assert flat["layers.1.proj.kernel"] == MATRIX
    assert flat["layers.0.proj.bias"] == BASE
    assert flat["layers.0.norm.scale"] == BASE
    assert flat["embed.embedding"] == BASE
    assert flat["head.kernel"] == BASE
    assert mup_group("model.layers.3.mlp.w_gate", 3) == MATRIX


def _tiny_minicpm(tie=False):
    return ModelConfig(model_type="minicpm", vocab_size=64, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       dim_model_base=8, scale_emb=12.0, scale_depth=1.4,
                       tie_word_embeddings=tie, max_position_embeddings=64)


def test_mup_update_ratio_on_minicpm():
    """With identical gradients (and no clipping/decay), a block matrix moves exactly
    1/width_scale as far as the embedding, a norm and the untied head."""
    config = _tiny_minicpm()
    assert config.width_scale == 4.0
    model = CausalLM(config, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    grads = jax.tree.map(jnp.ones_like, params)
    tx = adamw_mup(0.01, width_scale=config.width_scale, weight_decay=0.0, clip_norm=None)
    updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, params)
    flat = {".".join(str(k) for k in p): v for p, v in nnx.to_flat_state(updates)}
    base = float(jnp.abs(flat["model.embed_tokens.embedding"]).max())
    assert base == pytest.approx(0.01, rel=1e-3)
    for name in ("model.layers.0.self_attn.q_proj.kernel", "model.layers.1.mlp.down_proj.kernel"):
        np.testing.assert_allclose(np.abs(flat[name]), base / 4.0, rtol=1e-5)
    for name in ("model.layers.0.input_layernorm.scale", "model.norm.scale", "lm_head.kernel"):
        np.testing.assert_allclose(np.abs(flat[name]), base, rtol=1e-5)


def test_adamw_mup_matches_optax_adamw_per_group():
    """Each group equals optax.adamw at its own rate (decoupled decay scaled by the rate)."""
    key = jax.random.key(1)
    params = {"layers": {"w": jax.random.normal(key, (3, 4))},
              "embed": jax.random.normal(jax.random.fold_in(key, 1), (5, 4))}
    grads = jax.tree.map(lambda p: jnp.sin(p * 3.0), params)
    width, lr, wd = 3.0, 0.02, 0.1
    tx = adamw_mup(lr, width_scale=width, weight_decay=wd, clip_norm=None)
    ours, _ = tx.update(grads, tx.init(params), params)
    for name, rate in (("embed", lr), ("layers", lr / width)):
        ref_tx = optax.adamw(rate, b1=0.9, b2=0.95, eps=1e-8, weight_decay=wd)
        ref, _ = ref_tx.update(grads[name], ref_tx.init(params[name]), params[name])
        np.testing.assert_allclose(jax.tree.leaves(ours[name])[0], jax.tree.leaves(ref)[0],
                                   rtol=1e-5, atol=1e-8)


def test_clipping_is_global_norm():
    params = {"a": jnp.zeros((3,)), "b": jnp.zeros((4,))}
    grads = {"a": jnp.full((3,), 10.0), "b": jnp.full((4,), -10.0)}
    clipped, _ = optax.clip_by_global_norm(1.0).update(grads, None)
    norm = math.sqrt(sum(float(jnp.sum(g * g)) for g in jax.tree.leaves(clipped)))
    assert norm == pytest.approx(1.0, rel=1e-5)
    # adamw_mup contains the same clip: a huge gradient gives the same first step as a tiny one
    tx = adamw_mup(0.1, weight_decay=0.0, clip_norm=1.0)
    big, _ = tx.update(grads, tx.init(params), params)
    small, _ = tx.update(jax.tree.map(lambda g: g * 1e-3, grads), tx.init(params), params)
    for x, y in zip(jax.tree.leaves(big), jax.tree.leaves(small), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-3)
