"""Single-device APB with one explicit mask per host (numpy selection, materialised scores),
written independently of the sharded path: the ground truth in tests."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sharding.apb.compressor import (
    Scorer,
    query_aware_scores,
    resolve_scorer,
    scorer_for_layer,
)
from sharding.apb.kernel import check_qkv
from sharding.apb.layout import make_apb_layout

__all__ = ["apb_reference"]


def apb_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    hosts: int,
    anchor_len: int | None = None,
    passing_len: int | None = None,
    scorer: str | Scorer = "query",
    query_len: int = 0,
    query_offset: int = 0,
    retaining_head: Any = None,
    embed_query: bool = True,
    sm_scale: float | None = None,
    pool_size: int = 5,
    layer: int | None = None,
) -> jax.Array:
    """Single-device APB with one explicit mask per host, written independently of the sharded
    path (numpy selection, materialised scores): the ground truth in tests. Same arguments and
    result as :func:`apb_attention` (``hosts`` replaces the mesh)."""
    check_qkv(q, k, v)
    lay = make_apb_layout(q.shape[1], hosts=hosts, anchor_len=anchor_len,
                          passing_len=passing_len, query_len=query_len,
                          query_offset=query_offset, embed_query=embed_query)
    resolved = resolve_scorer(scorer_for_layer(scorer, layer),
                              scorer_for_layer(retaining_head, layer), lay)
    a, blk, c, pl = lay.anchor_len, lay.block_len, lay.context_len, lay.passing_len
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    groups = q.shape[2] // k.shape[2]
    anchor = lay.anchor_source()
    qf, kf, vf = (np.asarray(x, np.float64) for x in (q, k, v))

    def attend(qr, kr, vr, mask):  # qr [b, n, hq, d], kr [b, m, hkv, d], mask [n, m]
        kr = np.repeat(kr, groups, axis=2)
        vr = np.repeat(vr, groups, axis=2)
        s = np.einsum("bqhd,bkhd->bhqk", qr, kr) * scale
        s = np.where(mask, s, -np.inf)
        mx = np.max(s, axis=-1, keepdims=True)
        mx = np.where(np.isfinite(mx), mx, 0.0)
        w = np.exp(s - mx)
        den = w.sum(-1, keepdims=True)
        p = w / np.where(den > 0, den, 1.0)
        return np.einsum("bhqk,bkhd->bqhd", p, vr)

    passing: list[tuple[np.ndarray, np.ndarray]] = []  # per host: selected (k, v) [b, n, hkv, d]
    out = np.zeros(q.shape[:3] + (v.shape[3],))
    for h in range(hosts):
        rows = np.arange(h * blk, min((h + 1) * blk, c))
        ql, kl, vl = qf[:, rows], kf[:, rows], vf[:, rows]
        n = len(rows)
        keys = [kl]
        vals = [vl]
        mask = [np.tril(np.ones((n, n), bool))]
        if a > 0 and h > 0:
            keys.append(kf[:, anchor])
            vals.append(vf[:, anchor])
            mask.append(np.ones((n, a), bool))
        for kp, vp in passing:
            keys.append(kp)
            vals.append(vp)
            mask.append(np.ones((n, kp.shape[1]), bool))
        if pl > 0 and hosts > 1 and h < hosts - 1:
            cand = rows >= a
            if resolved == "query":
                qq = q[:, anchor[query_offset : query_offset + query_len]]
                sc = np.asarray(query_aware_scores(None, k[:, rows], None, query=qq,
                                                   sm_scale=scale))
            else:
                emb = (q[:, anchor[query_offset : query_offset + query_len]]
                       if lay.query_embedded else None)
                sc = np.asarray(resolved(q[:, rows], k[:, rows], v[:, rows], query=emb))
            sc = np.where(cand[None, :, None], sc, -np.inf)
            pooled = np.full_like(sc, -np.inf)
            left, right = (pool_size - 1) // 2, pool_size // 2
            for i in range(n):
                pooled[:, i] = sc[:, max(0, i - left) : i + right + 1].max(axis=1)
            pooled = np.where(cand[None, :, None], pooled, -np.inf)
            take = min(pl, int(cand.sum()))
            sel_k = np.zeros((q.shape[0], take) + k.shape[2:])
            sel_v = np.zeros((q.shape[0], take) + v.shape[2:])
            for bi in range(q.shape[0]):
                for hi in range(k.shape[2]):
                    order = np.argsort(-pooled[bi, :, hi], kind="stable")[:take]
                    sel_k[bi, :, hi] = kl[bi, order, hi]
                    sel_v[bi, :, hi] = vl[bi, order, hi]
            passing.append((sel_k, sel_v))
        out[:, rows] = attend(ql, np.concatenate(keys, 1), np.concatenate(vals, 1),
                              np.concatenate(mask, 1))
    if query_len:
        out[:, c:] = attend(qf[:, c:], kf, vf, np.tril(np.ones((query_len, q.shape[1]), bool),
                                                       k=c))
    return jnp.asarray(out, q.dtype)
