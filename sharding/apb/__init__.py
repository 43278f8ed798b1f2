"""APB: distributed long-context prefill that passes compressed context blocks between hosts.

The long input is split along the sequence axis of a mesh ("hosts" = the devices of that axis).
Following the APB paper (Huang et al., 2025, "APB: Accelerating Distributed Long-Context
Inference by Passing Compressed Context Blocks across GPUs"), every host ``h`` holds

- the **anchor block**: the first ``anchor_len`` tokens of the context with the query embedded
  (query tokens placed at ``query_offset`` and taking the positions of the tokens they
  displace); identical on every host, its outputs and KV are dropped after prefill;
- its **local block**: context tokens ``[h * block_len, (h + 1) * block_len)``.

Per layer, a **compressor** scores every local KV entry per KV head (the query-aware scorer, or
a trained retaining head), smooths the scores with a max-pool along the sequence, never selects
anchor tokens or padding, and keeps the top ``passing_len`` entries per KV head: the host's
**passing block** (keys taken after RoPE, so they keep their original positions). Passing
blocks are exchanged with one ``all_gather`` over the mesh axis. Then

- anchor queries attend causally to the anchor only;
- local queries attend to the whole anchor (hosts > 0), to the passing blocks of the hosts
  *before* them, and causally to their own local block.

The passing block is used for this attention only and never cached. The query tokens (the last
``query_len`` tokens of the input) are not part of the context split: like Star Attention's
phase 2 they attend exactly to every host's local KV (merged with log-sum-exp) and causally to
themselves.

Two entry points share one per-host kernel (:func:`apb_host_attention`, public so that one
host's work can be run alone on one device: ``host=`` and ``gather=``):

- :func:`apb_attention`: the attention core on a plain global ``[batch, seq, heads, dim]``
  input; returns the outputs of every input position in input order.
- :func:`apb_layer_attention`: the model path. The input is already in the *expanded layout*
  that :class:`APBLayout` describes (per host ``[anchor rows; local rows]``, so anchor hidden
  states are computed on every host, as in APB); returns the same layout. This is the
  ``"apb"`` backend of ``cpmjax.ops.attention`` (adapter: :func:`apb_backend`).

Baselines in the same code path: :func:`star_attention` (anchor = the first block, nothing
passed, query not embedded). Limits (tested): ``anchor_len=0`` with ``passing_len=block_len``
is exact causal attention; one host is full attention.

Modules: :mod:`sharding.apb.layout` (:class:`APBLayout`, :func:`make_apb_layout`,
:func:`make_method_layout`), :mod:`sharding.apb.compressor` (scorers, :func:`compress_block`,
:class:`RetainingHead`, :class:`RetainingHeads`), :mod:`sharding.apb.kernel` (the per-host
kernel and the distributed entry points), :mod:`sharding.apb.reference` (:func:`apb_reference`),
:mod:`sharding.apb.decode` (attention over a sequence-sharded KV cache after the prefill:
:func:`decode_attention`), :mod:`sharding.apb.critical` (one host alone against the distributed
run, and the critical-path accounting of ``scripts/bench_apb_critical.py``).
"""

from sharding.apb.compressor import (
    RetainingHead,
    RetainingHeads,
    Scorer,
    compress_block,
    query_aware_scores,
    resolve_scorer,
    scorer_for_layer,
)
from sharding.apb.decode import decode_attention, masked_attention_lse
from sharding.apb.kernel import (
    BLOCK,
    LocalAttention,
    OneHostGather,
    apb_attention,
    apb_backend,
    apb_host_attention,
    apb_layer_attention,
    apb_local_attention,
    check_qkv,
    key_mask_segments,
    merge_partials,
    star_attention,
)
from sharding.apb.layout import APBLayout, make_apb_layout, make_method_layout
from sharding.apb.reference import apb_reference

__all__ = [
    "BLOCK",
    "APBLayout",
    "LocalAttention",
    "OneHostGather",
    "RetainingHead",
    "RetainingHeads",
    "Scorer",
    "apb_attention",
    "apb_backend",
    "apb_host_attention",
    "apb_layer_attention",
    "apb_local_attention",
    "apb_reference",
    "check_qkv",
    "compress_block",
    "decode_attention",
    "key_mask_segments",
    "make_apb_layout",
    "make_method_layout",
    "masked_attention_lse",
    "merge_partials",
    "query_aware_scores",
    "resolve_scorer",
    "scorer_for_layer",
    "star_attention",
]
