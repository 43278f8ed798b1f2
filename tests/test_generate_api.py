"""The ``cpmjax.generate`` front door: the whole request is validated before any compute,
speculative decoding after a distributed prefill (ring: works and equals vanilla; APB / Star: a
ConfigError naming both, from the API and the CLI), the public speculative defaults (bundled
draft, the draft's own FR-Spec vocabulary), the ``head_impl`` names and their deprecated aliases,
and the bounded top-p filter."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import word_tokenizer, write_random_minicpm

import cpmjax
from cpmjax import errors
from cpmjax.generate import (
    HEAD_IMPLS,
    SamplingConfig,
    Speculative,
    default_draft_path,
    filtered_logits,
)
from cpmjax.generate.eagle import new_draft, save_draft
from cpmjax.generate.frspec import draft_topk
from cpmjax.generate.speculative import resolve
from sharding.mesh import make_mesh

SPEC = dict(depth=3, top_k=3, total_tokens=8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("m")
    write_random_minicpm(path, max_position_embeddings=256)
    word_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    return cpmjax.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def draft(model):
    return new_draft(model, seed=1)


def test_public_api_is_exported():
    assert callable(cpmjax.generate) and cpmjax.generate.__module__ == "cpmjax.generate.api"
    for name in ("GenerationResult", "GenerationStats", "SamplingConfig", "Speculative",
                 "SpeculativeStats", "default_draft_path"):
        assert hasattr(cpmjax, name), name
    from cpmjax import generate as front

    assert front is cpmjax.generate
    import importlib

    package = importlib.import_module("cpmjax.generate")
    assert set(package.__all__) >= {"generate", "GenerationResult", "GenerationStats",
                                    "SamplingConfig", "Speculative", "SpeculativeStats",
                                    "default_draft_path"}
    assert HEAD_IMPLS == ("reference", "blockwise", "pallas")


def test_speculative_after_apb_or_star_is_refused_naming_both(model, draft):
    mesh = make_mesh(sequence=4)
    for prefill in ("apb", "star"):
        for method, kw in (("eagle2", {}), ("frspec", {"vocab_subset": np.arange(96)})):
            spec = Speculative(draft=draft, method=method, **kw, **SPEC)
            with pytest.raises(errors.ConfigError,
                               match=f"speculative={method} cannot follow prefill='{prefill}'"):
                cpmjax.generate(model, [[5] * 32], 4, speculative=spec, prefill=prefill,
                                mesh=mesh)


def test_whole_request_is_validated_before_compute(model, draft):
    spec = Speculative(draft=draft, **SPEC)
    # the distributed prefill needs a mesh, also on the speculative path (it used to run a
    # local prefill without a word)
    with pytest.raises(errors.ConfigError, match="mesh"):
        cpmjax.generate(model, [[5] * 16], 4, speculative=spec, prefill="ring")
    with pytest.raises(errors.ConfigError, match="prefill='magic'"):
        cpmjax.generate(model, [[5] * 16], 4, speculative=spec, prefill="magic")
    with pytest.raises(errors.ConfigError, match="prefill_options"):
        cpmjax.generate(model, [[5] * 16], 4, prefill_options={"query_len": 2})
    with pytest.raises(errors.ConfigError, match="nonsense"):
        cpmjax.generate(model, [[5] * 16], 4, prefill="apb", mesh=make_mesh(sequence=4),
                        prefill_options={"nonsense": 1})
    with pytest.raises(errors.ConfigError, match="cpmjax.Speculative"):
        cpmjax.generate(model, [[5] * 16], 4, speculative="eagle2")
    with pytest.raises(errors.InputError, match="top_p"):
        cpmjax.generate(model, [[5] * 16], 4, top_p=1.5, speculative=spec)


@pytest.mark.slow
def test_speculative_after_ring_prefill_equals_vanilla(model, draft):
    """prefill='ring' is exact: speculative greedy output after it equals vanilla generate with
    the same prefill (and the local one), for ragged prompts."""
    mesh = make_mesh(sequence=4)
    rng = np.random.RandomState(7)
    prompts = [rng.randint(3, 96, n).tolist() for n in (30, 19)]
    ring = cpmjax.generate(model, prompts, 8, prefill="ring", mesh=mesh)
    local = cpmjax.generate(model, prompts, 8)
    np.testing.assert_array_equal(ring.tokens, local.tokens)
    spec = cpmjax.generate(model, prompts, 8, prefill="ring", mesh=mesh,
                           speculative=Speculative(draft=draft, **SPEC))
    np.testing.assert_array_equal(spec.tokens, ring.tokens)
    np.testing.assert_array_equal(spec.lengths, ring.lengths)
    assert spec.stats.cycles > 0 and spec.stats.prefill_seconds > 0


@pytest.mark.slow
def test_cli_speculative_with_distributed_prefill(model, draft, model_dir, tmp_path, capsys):
    from cpmjax.cli import main

    save_draft(draft, tmp_path / "draft")
    common = ["generate", "--model", str(model_dir), "--prompt",
              " ".join(["def fibonacci ( n ) : return a if b else c"] * 3),
              "--max-new-tokens", "4", "--no-stop", "--draft", str(tmp_path / "draft"),
              "--depth", "2", "--spec-top-k", "2", "--total-tokens", "4"]
    for prefill in ("apb", "star"):
        assert main(common + ["--spec", "eagle2", "--prefill", prefill]) == 2
        err = capsys.readouterr().err
        assert "ConfigError" in err and "eagle2" in err and f"prefill='{prefill}'" in err
    assert main(common + ["--prefill", "ring"]) == 0
    plain = capsys.readouterr().out
    assert main(common + ["--spec", "eagle2", "--prefill", "ring"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and "mean accepted length" in captured.err


def test_speculative_defaults_are_the_bundled_draft_and_its_vocabulary():
    """``Speculative()`` on the bundled model: the bundled draft; FR-Spec without a vocabulary:
    the draft directory's freq_vocab.npy, cut to vocab / 4 as the CLI does."""
    path = default_draft_path()
    assert path == cpmjax.default_draft_path()
    bundled = cpmjax.from_pretrained(cpmjax.default_model_path())
    draft, subset = resolve(Speculative(), bundled)
    assert subset is None and draft.config.hidden_size == bundled.config.hidden_size
    again, subset = resolve(Speculative(method="frspec"), bundled)
    assert again is draft  # loaded once
    ranked = np.load(f"{path}/freq_vocab.npy")
    np.testing.assert_array_equal(subset, ranked[: bundled.config.vocab_size // 4])
    _, subset = resolve(Speculative(method="frspec", subset_size=100), bundled)
    np.testing.assert_array_equal(subset, ranked[:100])


def test_default_draft_needs_a_matching_model(model):
    with pytest.raises(errors.ConfigError, match="bundled"):
        resolve(Speculative(), model)  # the bundled draft is 256 wide, this model 32


def test_frspec_without_vocabulary_needs_a_draft_directory(model, draft, tmp_path):
    with pytest.raises(errors.ConfigError, match="vocab_subset"):
        resolve(Speculative(draft=draft, method="frspec"), model)
    save_draft(draft, tmp_path / "d")  # no freq_vocab.npy in it
    with pytest.raises(errors.ConfigError, match="freq_vocab.npy"):
        resolve(Speculative(draft=str(tmp_path / "d"), method="frspec", **SPEC), model)
    np.save(tmp_path / "d" / "freq_vocab.npy", np.arange(96)[::-1].astype(np.int32))
    _, subset = resolve(Speculative(draft=str(tmp_path / "d"), method="frspec", **SPEC), model)
    np.testing.assert_array_equal(subset, np.arange(96)[::-1][:24])


def test_head_impl_names_and_deprecated_aliases():
    assert Speculative().head_impl == "reference"
    with pytest.warns(DeprecationWarning, match="head_backend"):
        assert Speculative(head_backend="xla").head_impl == "reference"
    with pytest.warns(DeprecationWarning, match="head_backend"):
        assert Speculative(head_backend="blockwise").head_impl == "blockwise"
    with pytest.warns(DeprecationWarning, match="'xla' is deprecated"):
        assert Speculative(head_impl="xla").head_impl == "reference"
    with pytest.raises(errors.ConfigError, match="cuda"):
        Speculative(head_impl="cuda")
    hidden = jnp.asarray(np.random.RandomState(0).randn(2, 8), jnp.float32)
    weight = jnp.asarray(np.random.RandomState(1).randn(40, 8), jnp.float32)
    ref = draft_topk(hidden, weight, 4, impl="reference")
    with pytest.warns(DeprecationWarning, match="impl="):
        old = draft_topk(hidden, weight, 4, backend="xla")
    np.testing.assert_array_equal(ref[0], old[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new names warn about nothing
        draft_topk(hidden, weight, 4, impl="blockwise")


def _exact_nucleus(logits: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """float64 reference of top-p: (kept [..., V] bool, mass before each id in sorted order)."""
    z = logits.astype(np.float64)
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    order = np.argsort(-z, axis=-1, kind="stable")
    before = np.cumsum(np.take_along_axis(probs, order, -1), -1) - np.take_along_axis(
        probs, order, -1)
    mass_before = np.empty_like(before)
    np.put_along_axis(mass_before, order, before, -1)
    # ties: every id of a value has the mass before that value's first id
    for idx in np.ndindex(z.shape[:-1]):
        _, inverse = np.unique(z[idx], return_inverse=True)
        first = np.full(inverse.max() + 1, np.inf)
        np.minimum.at(first, inverse, mass_before[idx])
        mass_before[idx] = first[inverse]
    return mass_before < top_p, mass_before


def test_top_p_without_sorting_keeps_the_nucleus():
    """Large vocabularies find the top-p cut-off by bisection (no sort): peaked rows (a small
    nucleus) and flat rows (thousands of ids kept) keep exactly the float64 nucleus, up to ids
    whose mass before them is within float32 rounding of top_p; ties are kept together."""
    rs = np.random.RandomState(0)
    vocab = 5000
    rows = np.concatenate([rs.randn(3, vocab) * 6, rs.randn(3, vocab) * 0.1,
                           np.round(rs.randn(2, vocab) * 4) / 2])  # the last two: many ties
    filt = jax.jit(filtered_logits, static_argnums=1)
    for temperature, top_p in ((0.8, 0.9), (1.0, 0.5), (1.0, 0.99)):
        got = np.isfinite(np.asarray(filt(jnp.asarray(rows, jnp.float32),
                                          SamplingConfig(temperature, top_p=top_p))))
        want, before = _exact_nucleus(rows.astype(np.float32) / np.float32(temperature), top_p)
        differ = got != want
        assert np.all(np.abs(before[differ] - top_p) < 1e-5), (temperature, top_p)
        assert differ.sum() <= 2 and got.any(-1).all()
    assert SamplingConfig(1.0, top_p=0.5).check().top_p == 0.5
