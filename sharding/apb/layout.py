"""APB's static layout: how a sequence is laid out across hosts (anchor + local block per host,
the query embedded in the anchor), validated from a setting (:func:`make_apb_layout`,
:func:`make_method_layout` for ``"apb"`` / ``"star"``)."""

from __future__ import annotations

import dataclasses

import numpy as np

from sharding.errors import ConfigError, ShardingError

__all__ = ["APBLayout", "make_apb_layout", "make_method_layout"]


@dataclasses.dataclass(frozen=True)
class APBLayout:
    """Static description of how a sequence of ``seq_len`` tokens is laid out across hosts.

    ``context_len = seq_len - query_len`` tokens are split into ``hosts`` blocks of
    ``block_len`` (the last ones padded). The *expanded layout* has ``hosts * (anchor_len +
    block_len)`` rows: per host, ``anchor_len`` anchor rows then ``block_len`` local rows.
    With ``embed_query`` the query tokens (the last ``query_len`` of the input) sit in the
    anchor at ``[query_offset, query_offset + query_len)``."""

    seq_len: int
    hosts: int
    block_len: int
    anchor_len: int
    passing_len: int
    query_len: int = 0
    query_offset: int = 0
    embed_query: bool = True

    @property
    def context_len(self) -> int:
        return self.seq_len - self.query_len

    @property
    def host_len(self) -> int:
        """Rows per host in the expanded layout."""
        return self.anchor_len + self.block_len

    @property
    def expanded_len(self) -> int:
        return self.hosts * self.host_len

    @property
    def query_embedded(self) -> bool:
        return self.embed_query and self.query_len > 0 and self.anchor_len > 0

    def anchor_source(self) -> np.ndarray:
        """``[anchor_len]`` input index of every anchor row (query tokens embedded)."""
        a, q, off = self.anchor_len, self.query_len, self.query_offset
        if not self.query_embedded:
            return np.arange(a)
        return np.concatenate([
            np.arange(off), self.context_len + np.arange(q), np.arange(off, a - q),
        ]).astype(np.int64)

    def source_index(self) -> np.ndarray:
        """``[expanded_len]`` input index of every expanded row; ``-1`` marks padding."""
        rows = []
        anchor = self.anchor_source()
        for h in range(self.hosts):
            local = h * self.block_len + np.arange(self.block_len)
            rows += [anchor, np.where(local < self.context_len, local, -1)]
        return np.concatenate(rows).astype(np.int32)

    def positions(self) -> np.ndarray:
        """``[expanded_len]`` RoPE position of every expanded row: anchor rows ``0..anchor_len-1``
        (embedded query tokens take the positions of the tokens they displace), local rows
        their input position (padding continues the count; it is masked everywhere)."""
        rows = []
        for h in range(self.hosts):
            rows += [np.arange(self.anchor_len), h * self.block_len + np.arange(self.block_len)]
        return np.concatenate(rows).astype(np.int32)

    def local_rows(self) -> np.ndarray:
        """``[context_len]`` expanded row of every context token, in input order."""
        t = np.arange(self.context_len)
        return ((t // self.block_len) * self.host_len + self.anchor_len
                + t % self.block_len).astype(np.int32)

    def cache_slots(self, cache_len: int) -> np.ndarray:
        """``[expanded_len]`` KV-cache slot for every expanded row: local rows go to their input
        position, anchor and padding rows to ``cache_len`` (dropped by an out-of-range write)."""
        src = self.source_index()
        slots = np.full(self.expanded_len, cache_len, np.int32)
        local = np.zeros(self.expanded_len, bool)
        for h in range(self.hosts):
            start = h * self.host_len + self.anchor_len
            local[start : start + self.block_len] = True
        keep = local & (src >= 0)
        slots[keep] = src[keep]
        return slots


def make_apb_layout(
    seq_len: int,
    *,
    hosts: int,
    anchor_len: int | None = None,
    passing_len: int | None = None,
    query_len: int = 0,
    query_offset: int = 0,
    embed_query: bool = True,
    block_multiple: int = 1,
) -> APBLayout:
    """Validate an APB setting and return its :class:`APBLayout`.

    ``block_len = ceil(context_len / hosts)`` rounded up to ``block_multiple``; the last blocks
    are padded. Defaults (the paper's on 8 hosts): ``anchor_len = block_len // 4``,
    ``passing_len = block_len // 8``. Raises ``ShardingError`` / ``ConfigError`` naming the
    offending value."""
    for name, value in (("seq_len", seq_len), ("hosts", hosts), ("query_len", query_len),
                        ("query_offset", query_offset), ("block_multiple", block_multiple)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ConfigError(f"{name} must be an int, got {value!r}")
    if hosts < 1:
        raise ShardingError(f"hosts (the size of the sequence mesh axis) must be >= 1, got {hosts}")
    if block_multiple < 1:
        raise ConfigError(f"block_multiple must be >= 1, got {block_multiple}")
    if query_len < 0 or query_len >= seq_len:
        raise ConfigError(
            f"query_len={query_len} must be in [0, seq_len) with seq_len={seq_len}: the context "
            "(input minus query) must not be empty"
        )
    context_len = seq_len - query_len
    if context_len < hosts:
        raise ShardingError(
            f"the context of {context_len} tokens (seq_len={seq_len} - query_len={query_len}) "
            f"cannot be split across hosts={hosts}: every host needs at least one token"
        )
    block_len = -(-context_len // hosts)
    block_len = -(-block_len // block_multiple) * block_multiple
    anchor_len = block_len // 4 if anchor_len is None else anchor_len
    passing_len = block_len // 8 if passing_len is None else passing_len
    for name, value in (("anchor_len", anchor_len), ("passing_len", passing_len)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ConfigError(f"{name} must be an int, got {value!r}")
        if value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}")
        if value > block_len:
            raise ShardingError(
                f"{name}={value} is longer than a block: {context_len} context tokens over "
                f"{hosts} hosts give block_len={block_len}"
            )
    if query_offset < 0:
        raise ConfigError(f"query_offset must be >= 0, got {query_offset}")
    if embed_query and query_len > 0 and anchor_len > 0 and query_offset + query_len > anchor_len:
        raise ConfigError(
            f"query_len={query_len} at query_offset={query_offset} does not fit in the anchor "
            f"(anchor_len={anchor_len}); raise anchor_len or shorten the query"
        )
    return APBLayout(
        seq_len=int(seq_len), hosts=int(hosts), block_len=int(block_len),
        anchor_len=int(anchor_len), passing_len=int(passing_len), query_len=int(query_len),
        query_offset=int(query_offset), embed_query=bool(embed_query),
    )


def make_method_layout(
    method: str,
    seq_len: int,
    *,
    hosts: int,
    anchor_len: int | None = None,
    passing_len: int | None = None,
    query_len: int = 0,
    query_offset: int = 0,
) -> APBLayout:
    """The validated layout of a distributed prefill ``method``: ``"apb"`` (defaults as
    :func:`make_apb_layout`, query embedded in the anchor) or ``"star"`` (Star Attention: anchor
    = the first block unless ``anchor_len`` is given, nothing passed, query not embedded;
    ``passing_len`` must be None or 0). Raises ``ConfigError`` for another method."""
    if method == "apb":
        return make_apb_layout(seq_len, hosts=hosts, anchor_len=anchor_len,
                               passing_len=passing_len, query_len=query_len,
                               query_offset=query_offset)
    if method == "star":
        if passing_len:
            raise ConfigError(f"Star Attention passes nothing; got passing_len={passing_len}")
        if anchor_len is None:
            anchor_len = make_apb_layout(seq_len, hosts=hosts, anchor_len=0, passing_len=0,
                                         query_len=query_len, embed_query=False).block_len
        return make_apb_layout(seq_len, hosts=hosts, anchor_len=anchor_len, passing_len=0,
                               query_len=query_len, embed_query=False)
    raise ConfigError(f"method={method!r} is not 'apb' or 'star'")
