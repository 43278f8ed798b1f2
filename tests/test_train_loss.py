"""Chunked cross-entropy == plain cross-entropy (values and gradients), loss masking, and packed
documents: segment ids keep each document's loss what it is when run alone."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cpmjax.models import CausalLM, ModelConfig
from cpmjax.train.data import pack_rows
from cpmjax.train.loss import chunked_cross_entropy, cross_entropy_reference


def _inputs(b=2, s=13, d=8, v=40, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(k[0], (b, s, d), jnp.float32)
    weight = jax.random.normal(k[1], (v, d), jnp.float32) * 0.5
    targets = jax.random.randint(k[2], (b, s), 0, v)
    mask = (jax.random.uniform(k[3], (b, s)) > 0.3).astype(jnp.float32)
    return hidden, weight, targets, mask


@pytest.mark.parametrize(("chunk", "remat"), [(1, True), (5, True), (13, False), (64, True)])
def test_chunked_equals_plain_value_and_grad(chunk, remat):
    hidden, weight, targets, mask = _inputs()

    def ours(h, w):
        return chunked_cross_entropy(h, w, targets, mask, chunk_size=chunk, remat=remat)[0]

    def ref(h, w):
        return cross_entropy_reference(jnp.einsum("bsd,vd->bsv", h, w), targets, mask)

    v1, g1 = jax.value_and_grad(ours, argnums=(0, 1))(hidden, weight)
    v2, g2 = jax.value_and_grad(ref, argnums=(0, 1))(hidden, weight)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_mask_and_metrics():
    hidden, weight, targets, mask = _inputs()
    loss, aux = chunked_cross_entropy(hidden, weight, targets, mask, chunk_size=4)
    assert float(aux["tokens"]) == float(mask.sum())
    logits = jnp.einsum("bsd,vd->bsv", hidden, weight)
    acc = float(jnp.sum((logits.argmax(-1) == targets) * mask) / mask.sum())
    assert float(aux["accuracy"]) == pytest.approx(acc)
    # changing a masked target does not change the loss
    masked = np.argwhere(np.asarray(mask) == 0)[0]
    t2 = targets.at[tuple(masked)].set((targets[tuple(masked)] + 1) % weight.shape[0])
    loss2, _ = chunked_cross_entropy(hidden, weight, t2, mask, chunk_size=4)
    assert float(loss2) == float(loss)
    # an all-zero mask gives 0, not NaN
    zero, _ = chunked_cross_entropy(hidden, weight, targets, jnp.zeros_like(mask))
    assert float(zero) == 0.0


def test_chunked_loss_never_builds_full_logits():
    """No intermediate of the forward+backward jaxpr has the [b, s, vocab] shape."""
    hidden, weight, targets, mask = _inputs(b=2, s=32, v=50)

    def f(h, w):
        return chunked_cross_entropy(h, w, targets, mask, chunk_size=8)[0]

    jaxpr = jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(hidden, weight)
    shapes = set()

    def walk(jp):
        for eqn in jp.eqns:
            for var in eqn.outvars:
                shapes.add(tuple(getattr(var.aval, "shape", ())))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    assert (2, 32, 50) not in shapes
    assert (2, 8, 50) in shapes  # one chunk's logits


def test_pack_rows_segments_positions_mask():
    bos, eos = 1, 2
    # a row starting mid-document, then two documents
    window = np.array([[7, 8, eos, bos, 5, 6, eos, bos, 9, 4]])
    batch = pack_rows(window, bos_id=bos)
    np.testing.assert_array_equal(batch["input_ids"], window[:, :-1])
    np.testing.assert_array_equal(batch["targets"], window[:, 1:])
    np.testing.assert_array_equal(batch["segment_ids"], [[0, 0, 0, 1, 1, 1, 1, 2, 2]])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 0, 1, 2, 3, 0, 1]])
    # the target after an EOS is the next document's BOS: not predictable, masked
    np.testing.assert_array_equal(batch["loss_mask"], [[1, 1, 0, 1, 1, 1, 0, 1, 1]])


def test_pack_rows_loss_after_marker():
    """``loss_after_id``: per document, only targets after its first marker count; a row that
    starts inside a document counts from its first marker in the row."""
    bos, eos, q = 1, 2, 3
    window = np.array([[7, q, 8, eos, bos, 5, 6, q, 9, q, 4, eos, bos, 6, 6]])
    batch = pack_rows(window, bos_id=bos, loss_after_id=q)
    #   inputs:  7  q  8 eos bos 5  6  q  9  q  4 eos bos 6
    #   targets: q  8 eos bos 5  6  q  9  q  4 eos bos 6  6
    np.testing.assert_array_equal(batch["loss_mask"],
                                  [[0, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0]])
    # without a marker the mask is the plain one
    plain = pack_rows(window, bos_id=bos)["loss_mask"]
    assert plain.sum() == 12


def test_marker_token_id_must_be_one_token():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from cpmjax.errors import ConfigError
    from cpmjax.train.loop import marker_token_id

    raw = Tokenizer(models.WordLevel({"<unk>": 0, "?": 1, "a": 2, "b": 3}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    assert marker_token_id(tok, None) is None
    assert marker_token_id(tok, "?") == 1
    with pytest.raises(ConfigError, match="'a b'"):
        marker_token_id(tok, "a b")


def test_packed_documents_do_not_attend_across():
    """Per-token losses of two packed documents equal those of each document run alone."""
    config = ModelConfig(model_type="minicpm", vocab_size=32, hidden_size=32,
                         intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, dim_model_base=8, scale_emb=4.0,
                         scale_depth=1.4, tie_word_embeddings=True, max_position_embeddings=64)
    model = CausalLM(config, rngs=nnx.Rngs(3))
    doc_a = [1, 5, 9, 11, 4, 2]
    doc_b = [1, 7, 3, 8, 2]
    packed = pack_rows(np.array([doc_a + doc_b + [1]]), bos_id=1)

    def per_token(batch):
        logits = model(jnp.asarray(batch["input_ids"]), positions=jnp.asarray(batch["positions"]),
                       segment_ids=jnp.asarray(batch["segment_ids"]))
        logp = jax.nn.log_softmax(logits, -1)
        return -np.take_along_axis(np.asarray(logp), batch["targets"][..., None], -1)[0, :, 0]

    together = per_token(packed)
    alone_a = per_token(pack_rows(np.array([doc_a]), bos_id=1))
    alone_b = per_token(pack_rows(np.array([doc_b]), bos_id=1))
    np.testing.assert_allclose(together[: len(doc_a) - 1], alone_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(together[len(doc_a): len(doc_a) + len(doc_b) - 1], alone_b,
                               rtol=1e-5, atol=1e-6)
    # and without segment ids the second document's losses change (attention leaks)
    leaky = dict(packed, segment_ids=np.zeros_like(packed["segment_ids"]),
                 positions=np.arange(packed["positions"].shape[1])[None])
    assert not np.allclose(per_token(leaky)[len(doc_a):len(doc_a) + 4], alone_b[:4], atol=1e-4)
