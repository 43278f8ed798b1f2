"""Train APB retaining heads (one small MLP per layer) for a cpmjax model.

A retaining head reads ``concat[q; k; v]`` of every token, as the APB attention seam sees them
(after RoPE), and predicts one importance score per KV head. The target is what the passing
block should keep: the log of the largest attention probability a key receives from the query
window (the last ``--window`` tokens, query heads of its KV group). Loss: smooth-L1 on the keys
before the window. The script reports, per layer, how many of the true top-``passing`` keys
the head's top-``passing`` recovers (recall), next to a random choice.

Data: ``--text FILE`` (tokenised with the model's tokenizer) or random tokens. Model:
``--model DIR`` (HF layout) or ``--random-tiny`` (a small random MiniCPM, for a smoke run).
Output: ``--out heads.npz`` (``sharding.apb.RetainingHeads.load``), used as
``scorer=RetainingHeads.load(path)`` for the ``"apb"`` backend or ``apb_prefill``.

Example: ``python scripts/train_retaining_head.py --random-tiny --steps 200 --out /tmp/h.npz``
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cpmjax import ops
from sharding.apb import RetainingHead, RetainingHeads


def _load_model(args):
    if args.random_tiny:
        from cpmjax.models import CausalLM, ModelConfig

        cfg = ModelConfig(model_type="minicpm", vocab_size=512, hidden_size=128,
                          intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
                          num_key_value_heads=2, max_position_embeddings=4096, scale_emb=12.0,
                          scale_depth=1.4, dim_model_base=64)
        return CausalLM(cfg, rngs=nnx.Rngs(args.seed)), None
    import cpmjax

    model = cpmjax.from_pretrained(args.model)
    tokenizer = None
    if args.text:
        from cpmjax.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.model)
    return model, tokenizer


def _batches(args, model, tokenizer, rng):
    vocab = model.config.vocab_size
    if args.text:
        ids = np.asarray(tokenizer.encode(open(args.text).read()), np.int32)
        if len(ids) < args.seq_len + 1:
            raise SystemExit(f"--text has {len(ids)} tokens, need more than {args.seq_len}")
    while True:
        if args.text:
            starts = rng.integers(0, len(ids) - args.seq_len, args.batch)
            yield np.stack([ids[s : s + args.seq_len] for s in starts])
        else:
            yield rng.integers(3, vocab, (args.batch, args.seq_len)).astype(np.int32)


def collect_qkv(model, tokens):
    """Per-layer ``(q, k, v)`` as the attention seam sees them (one forward)."""
    captured = []

    def transform(impl):
        def wrapped(q, k, v, **kw):
            captured.append((q, k, v))
            return impl(q, k, v, **kw)
        return wrapped

    with ops.attention_transform(transform):
        model(tokens)
    return captured


def targets(q, k, window):
    """``[b, seq - window, kv_heads]``: log max attention prob from the window's queries."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    qw = q[:, s - window :].reshape(b, window, hkv, hq // hkv, d)
    logits = jnp.einsum("bthgd,bkhd->bhgtk", qw, k) * d**-0.5
    causal = jnp.arange(s)[None, :] <= (s - window + jnp.arange(window))[:, None]
    probs = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)
    best = jnp.max(probs, axis=(2, 3))  # [b, hkv, s]
    return jnp.log(best[:, :, : s - window] + 1e-6).transpose(0, 2, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model")
    src.add_argument("--random-tiny", action="store_true")
    parser.add_argument("--text")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--passing", type=int, default=32, help="k for the recall report")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    model, tokenizer = _load_model(args)
    cfg = model.config
    rng = np.random.default_rng(args.seed)
    data = _batches(args, model, tokenizer, rng)
    graphdef, state = nnx.split(model)

    @jax.jit
    def layer_data(state, tokens):
        qkv = collect_qkv(nnx.merge(graphdef, state), tokens)
        return [(q, k, v, targets(q, k, args.window)) for q, k, v in qkv]

    probe = layer_data(state, jnp.asarray(next(data)))
    hq, hkv, d = probe[0][0].shape[2], probe[0][1].shape[2], probe[0][0].shape[3]
    keys = jax.random.split(jax.random.PRNGKey(args.seed), len(probe))
    params = [RetainingHead.init(kk, hq, hkv, d, args.hidden, probe[0][2].shape[3]).params()
              for kk in keys]
    tx = optax.adamw(args.lr, weight_decay=0.0)
    opt_state = tx.init(params)
    cut = args.seq_len - args.window

    def loss_fn(params, layers):
        total = 0.0
        for p, (q, k, v, tgt) in zip(params, layers, strict=True):
            pred = RetainingHead.apply(p, q[:, :cut], k[:, :cut], v[:, :cut])
            total = total + jnp.mean(optax.huber_loss(pred, tgt))
        return total / len(layers)

    @jax.jit
    def step(params, opt_state, state, tokens):
        layers = layer_data(state, tokens)
        loss, grads = jax.value_and_grad(loss_fn)(params, layers)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    t0 = time.time()
    for i in range(args.steps):
        params, opt_state, loss = step(params, opt_state, state, jnp.asarray(next(data)))
        if i % max(1, args.steps // 10) == 0 or i == args.steps - 1:
            print(f"step {i:5d} loss {float(loss):.4f} ({time.time() - t0:.0f}s)", flush=True)

    layers = layer_data(state, jnp.asarray(next(data)))
    kk = min(args.passing, cut)
    print(f"held-out recall of the true top-{kk} keys per KV head (random: {kk / cut:.3f})")
    for li, (p, (q, k, v, tgt)) in enumerate(zip(params, layers, strict=True)):
        pred = np.asarray(RetainingHead.apply(p, q[:, :cut], k[:, :cut], v[:, :cut]))
        tgt = np.asarray(tgt)
        hits = []
        for b in range(pred.shape[0]):
            for h in range(pred.shape[2]):
                want = set(np.argsort(-tgt[b, :, h])[:kk])
                got = set(np.argsort(-pred[b, :, h])[:kk])
                hits.append(len(want & got) / kk)
        print(f"layer {li}: recall {np.mean(hits):.3f}")
    heads = RetainingHeads([RetainingHead(p["w1"], p["w2"]) for p in params])
    heads.save(args.out)
    print(f"wrote {args.out} ({len(heads)} layers, hidden {args.hidden}, "
          f"{cfg.num_hidden_layers} model layers)")


if __name__ == "__main__":
    main()
