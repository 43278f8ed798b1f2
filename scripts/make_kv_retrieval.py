"""Synthetic long-context key-value retrieval data for ``cpmjax train`` and the APB quality study.

The generator lives in :mod:`cpmjax.evals.kv_retrieval`; this script writes a corpus with it.

A document is a list of ``key value...`` pairs followed by questions ``? key`` whose answer is the
value of that key::

    <s> k17 v3 v41 k902 v0 v9 ... k230 v12 v5 ? k902 v0 v9 ? k17 v3 v41 ... </s>

- keys are single tokens ``k0 .. k{num_keys-1}``, all distinct within a document;
- a value is ``value_len`` tokens from ``v0 .. v{num_values-1}`` (chance of a right guess:
  ``num_values ** -value_len``);
- a training document has ``num_queries`` questions about pairs drawn uniformly at random, and
  exactly ``seq_len`` tokens (``<s>`` and ``</s>`` included; ``.`` tokens fill the rest), so that
  ``cpmjax train``'s packer cuts one document per row;
- an evaluation prompt ends with one question (``? key``), so the query is the last two tokens,
  which APB embeds in its anchor; the answer is the value that follows.

The tokenizer is word level (``tokenizers.models.WordLevel`` on whitespace): the special tokens
``<unk> <s> </s> <pad>`` (ids 0-3, the MiniCPM ids), then ``? .``, the keys, the values. It is
saved as an HF tokenizer directory that ``cpmjax.load_tokenizer`` loads offline.

- with ``--query-first F`` a fraction ``F`` of the training documents state their first question
  before the context (``<s> ? k902 k17 v3 ...``), as long-context prompts often do: APB embeds the
  query in its anchor, right after ``<s>``, so every host's context sees it there.

Usage (what ``configs/kv-retrieval.yaml`` and ``configs/kv-retrieval-qfirst.yaml`` read)::

    python scripts/make_kv_retrieval.py --out runs/apb_quality/kv_data_v1 --docs 20000 \
        --value-len 1 --num-values 64 --max-pairs 120
    python scripts/make_kv_retrieval.py --out runs/apb_quality/kv_data_qfirst --docs 8000 \
        --value-len 1 --num-values 64 --max-pairs 120 --query-first 0.5 --seed 1
"""

from __future__ import annotations

import argparse

from cpmjax.evals.kv_retrieval import KVSpec, write_corpus


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/apb_quality/kv_data")
    p.add_argument("--docs", type=int, default=8000)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--queries", type=int, default=None,
                   help="questions per document (default: --min-pairs/--max-pairs)")
    p.add_argument("--min-pairs", type=int, default=8)
    p.add_argument("--max-pairs", type=int, default=80)
    p.add_argument("--num-keys", type=int, default=128)
    p.add_argument("--num-values", type=int, default=32)
    p.add_argument("--value-len", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--query-first", type=float, default=0.0,
                   help="fraction of documents that state their first question before the pairs")
    a = p.parse_args()
    spec = KVSpec(a.num_keys, a.num_values, a.value_len)
    write_corpus(a.out, docs=a.docs, seq_len=a.seq_len, spec=spec, num_queries=a.queries,
                 min_pairs=a.min_pairs, max_pairs=a.max_pairs, seed=a.seed,
                 query_first=a.query_first)
    print(f"wrote {a.docs} documents of {a.seq_len} tokens and a {len(spec.vocab)}-token "
          f"tokenizer to {a.out}")


if __name__ == "__main__":
    main()
