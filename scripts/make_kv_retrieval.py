"""Write a synthetic key-value retrieval corpus for ``cpmjax train`` and the APB quality study.

The task, its documents and its word-level tokenizer are described (and generated) by
:mod:`cpmjax.evals.kv_retrieval`; this script only parses the arguments and writes the corpus.

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
