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


def _full_sort_filter(logits, sampling):
    """The top-p filter by one full sort of the vocabulary (the definition)."""
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < sampling.top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def test_bounded_top_p_keeps_the_same_set_as_a_full_sort():
    """Peaked rows (nucleus among the top candidates: no sort of the vocabulary) and flat rows
    (a wide nucleus: the full-sort fallback) keep exactly the ids a full sort keeps."""
    rs = np.random.RandomState(0)
    vocab = 5000
    peaked = rs.randn(3, 4, vocab) * 6
    flat = rs.randn(3, 4, vocab) * 0.1
    for logits in (peaked, flat, np.concatenate([peaked[:1], flat[:1]])):
        logits = jnp.asarray(logits, jnp.float32)
        for sampling in (SamplingConfig(0.8, top_p=0.9), SamplingConfig(1.0, top_p=0.5),
                         SamplingConfig(1.0, top_k=2000, top_p=0.95)):
            got = np.isfinite(np.asarray(jax.jit(
                lambda x, s=sampling: filtered_logits(x, s))(logits)))
            want = np.isfinite(np.asarray(_full_sort_filter(logits, sampling)))
            np.testing.assert_array_equal(got, want)
