"""Structured pruning of whole MLP neurons (``cpmjax.compress.prune_neurons``): the pruned model's
MLP equals a reference MLP sliced to the kept neurons, the lowest-scoring neurons go (magnitude
and Wanda scores checked against numpy), masks on all three projections, bad input."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import minicpm_hf_dict

import cpmjax.compress as cc
from cpmjax.errors import CompressionError
from cpmjax.models import CausalLM, ModelConfig

IDS = np.random.RandomState(0).randint(3, 96, (2, 12)).astype(np.int32)


def tiny(seed: int = 0) -> CausalLM:
    return CausalLM(ModelConfig.from_hf_dict(minicpm_hf_dict()), rngs=nnx.Rngs(seed))


def _np(w):
    return np.asarray(w, np.float64)


def test_magnitude_removes_the_lowest_neurons_and_equals_the_sliced_mlp():
    model, ref = tiny(), tiny()
    removed = cc.prune_neurons(model, 0.25)
    assert removed == {f"model.layers.{i}.mlp": 12 for i in range(2)}  # 25% of 48
    x = np.random.RandomState(1).randn(5, 32)
    for i in range(2):
        mlp, orig = model.model.layers[i].mlp, ref.model.layers[i].mlp
        g, u, d = (_np(getattr(orig, n).kernel[...]) for n in ("gate_proj", "up_proj",
                                                               "down_proj"))
        score = np.linalg.norm(g, axis=0) * np.linalg.norm(u, axis=0) * np.linalg.norm(d, axis=1)
        kept = np.sort(np.argsort(score, kind="stable")[12:])
        assert np.array_equal(np.flatnonzero(np.asarray(mlp.up_proj.prune_mask[...])[0]), kept)
        h = (g[:, kept].T @ x.T).T
        sliced = ((h / (1 + np.exp(-h))) * (x @ u[:, kept])) @ d[kept]
        np.testing.assert_allclose(_np(mlp(jnp.asarray(x, jnp.float32))), sliced, rtol=1e-4,
                                   atol=1e-5)


def test_wanda_scores_use_the_neuron_activations():
    model, ref = tiny(), tiny()
    cc.prune_neurons(model, 0.5, "wanda", calibration=IDS)
    mlp, orig = model.model.layers[1].mlp, ref.model.layers[1].mlp
    # the activations reaching down_proj of layer 1 on the calibration tokens, by hand
    inputs = []
    cls = type(orig)
    orig.__class__ = type("Rec", (cls,), {"__call__": lambda self, x: (inputs.append(
        np.asarray(x)), cls.__call__(self, x))[1]})
    ref(jnp.asarray(IDS))
    orig.__class__ = cls
    x = inputs[0].reshape(-1, 32).astype(np.float64)
    g, u, d = (_np(getattr(orig, n).kernel[...]) for n in ("gate_proj", "up_proj", "down_proj"))
    hg = x @ g
    act = (hg / (1 + np.exp(-hg))) * (x @ u)
    score = np.linalg.norm(act, axis=0) * np.linalg.norm(d, axis=1)
    kept = np.sort(np.argsort(score, kind="stable")[24:])
    assert np.array_equal(np.flatnonzero(np.asarray(mlp.down_proj.prune_mask[...])[:, 0]), kept)


def test_masks_cover_all_three_projections_and_apply_masks_rezeroes():
    """A pruned neuron gets no gradient (its gate and up columns are zero, so are its
    activations), so plain training never revives it; ``apply_masks`` still re-zeroes a
    kernel written to by other means (e.g. a merged delta)."""
    model = tiny()
    cc.prune_neurons(model, 0.5)
    assert len(cc.masks(model)) == 6  # gate, up, down of 2 layers
    mlp = model.model.layers[0].mlp
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(mlp, name).kernel.set_value(jnp.ones_like(getattr(mlp, name).kernel[...]))
    assert cc.apply_masks(model) == 6
    keep = np.asarray(mlp.up_proj.prune_mask[...])[0]
    assert keep.sum() == 24
    assert np.all(np.asarray(mlp.gate_proj.kernel[...])[:, ~keep] == 0)
    assert np.all(np.asarray(mlp.down_proj.kernel[...])[~keep] == 0)
    assert np.all(np.asarray(mlp.down_proj.kernel[...])[keep] == 1)


def test_bad_input():
    with pytest.raises(CompressionError, match="sparsity"):
        cc.prune_neurons(tiny(), 1.0)
    with pytest.raises(CompressionError, match="criterion"):
        cc.prune_neurons(tiny(), 0.5, "random")
    with pytest.raises(CompressionError, match="calibration"):
        cc.prune_neurons(tiny(), 0.5, "wanda")
    quantized = tiny()
    cc.quantize(quantized, bits=8)
    with pytest.raises(CompressionError, match="prune before quantizing"):
        cc.prune_neurons(quantized, 0.5)
