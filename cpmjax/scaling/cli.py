"""``cpmjax scaling ...``: the wind tunnel, PassUntil, fits and the Densing Law.

    cpmjax scaling family --config configs/wind-tunnel.yaml      (train the reference family)
    cpmjax scaling passuntil --model DIR --task NAME ...          (PassUntil on one model)
    cpmjax scaling fit ...                                        (task scaling law + figure)
    cpmjax scaling density --family RUNS --model DIR --task NAME  (effective size, density)
    cpmjax scaling density-trend --csv FILE                       (density-over-time fit)

Each subcommand is defined beside its feature (``cli_family``, ``cli_eval``, ``cli_density``):
this module only gathers them under ``scaling``.
"""

from __future__ import annotations

import importlib
from typing import Any

# modules of cpmjax.scaling whose ``add_commands(subparsers)`` adds ``scaling`` subcommands
_COMMAND_MODULES = ("cli_family", "cli_eval", "cli_density")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "scaling", help="wind tunnel, PassUntil, task scaling laws, Densing Law")
    sub = p.add_subparsers(dest="scaling_command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(f"cpmjax.scaling.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"cpmjax.scaling.{name}":
                raise
            continue  # a part not written yet
        module.add_commands(sub)
