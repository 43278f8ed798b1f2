"""Write the UltraFuser domains' instruction/response data (text, code, math) to a directory.

    python scripts/make_fusion_data.py --out runs/fusion/data [--per-domain 3000] [--heldout 64]

See cpmjax.fusion.data for where every example comes from (only text already on the machine
and generated problems)."""

from __future__ import annotations

import argparse
import json

from cpmjax.fusion.data import write_domain_files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/fusion/data")
    parser.add_argument("--per-domain", type=int, default=3000)
    parser.add_argument("--heldout", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    summary = write_domain_files(args.out, per_domain=args.per_domain, heldout=args.heldout,
                                 seed=args.seed)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
