"""Write the wind tunnel's task suite (generated locally, deterministic for a seed).

    python scripts/make_scaling_tasks.py --out runs/scaling-tasks [--n-train 20000]
        [--n-test 200] [--seed 0]

Writes ``OUT/<task>/{train,test}.jsonl`` and ``OUT/<task>/train.txt`` for every task of
``cpmjax.scaling.TASKS`` (see cpmjax/scaling/tasks.py).
"""

from __future__ import annotations

import argparse
import json

from cpmjax.scaling import make_task_suite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write the suite into")
    parser.add_argument("--n-train", type=int, default=20000)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    summary = make_task_suite(args.out, n_train=args.n_train, n_test=args.n_test,
                              seed=args.seed)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
