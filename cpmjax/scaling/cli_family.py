"""``cpmjax scaling family``: train (or resume) the wind tunnel's model family.

    cpmjax scaling family --config configs/wind-tunnel.yaml [--only NAME ...] [--dry-run]
                          [--lr-sweep] [--out-dir DIR] [--no-progress]
    cpmjax scaling family --config configs/wind-tunnel.yaml --variant cosine|no-mup|no-task-split
                          --only NAME [--drop-task TASK ...]

``--only`` trains the named sizes (repeatable, or comma-separated); ``--dry-run`` prints each
size and each run (stable, decay branches) with its tokens and whether it would be trained,
resumed or skipped; ``--lr-sweep`` runs the μP learning-rate sweep instead of the family.
The index of finished runs is ``<out_dir>/family.json``. ``--variant`` trains one size (``--only``)
with one ingredient of the recipe changed at the same step count (``cpmjax.scaling.recipes``:
a cosine schedule, no μP, or a mix without the training split of ``--drop-task`` tasks,
default all), under ``<out_dir>/variants`` (index ``variants.json``), for the Densing-Law
comparisons.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("family", help="train the wind tunnel's model family (WSD, μP)",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="family YAML (configs/wind-tunnel.yaml)")
    p.add_argument("--only", action="append", default=None, metavar="NAME",
                   help="train only these sizes (repeatable or comma-separated)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, train nothing")
    p.add_argument("--lr-sweep", action="store_true",
                   help="run the μP learning-rate sweep (lr_sweep section) instead")
    p.add_argument("--variant", default=None,
                   choices=["cosine", "no-mup", "no-task-split"],
                   help="train a recipe variant of the --only size instead of the family")
    p.add_argument("--drop-task", action="append", default=None, metavar="TASK",
                   help="--variant no-task-split: the tasks whose training split is left out "
                        "(repeatable; default every task)")
    p.add_argument("--out-dir", default=None, help="override the config's out_dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cpmjax.scaling.family import family_runs, load_family_config, lr_sweep, train_family

    overrides = {"out_dir": args.out_dir} if args.out_dir else None
    config = load_family_config(args.config, overrides)
    if args.lr_sweep:
        results = lr_sweep(config, progress=not args.no_progress)
        print(json.dumps(results, indent=1))
        return 0
    only = [n for item in args.only or [] for n in item.split(",") if n]
    if args.variant:
        from cpmjax.errors import InputError
        from cpmjax.scaling.recipes import train_variant

        if len(only) != 1:
            raise InputError(f"--variant {args.variant} needs exactly one size (--only NAME), "
                             f"got {only or 'none'}")
        record = train_variant(config, only[0], args.variant, drop_tasks=args.drop_task,
                               progress=not args.no_progress)
        print(json.dumps({k: v for k, v in record.items() if k != "config"}, indent=1))
        return 0
    train_family(config, only=only or None, dry_run=args.dry_run,
                 progress=not args.no_progress)
    if not args.dry_run:
        for r in family_runs(config.out_dir):
            print(f"{r.name}: {r.non_embedding_params:,} non-embedding params, branches "
                  f"{r.branch_tokens} tokens, train loss {r.train_loss}, held-out loss "
                  f"{r.eval_loss}, {r.wall_s:.0f} s, export {r.export_dir}")
    return 0
