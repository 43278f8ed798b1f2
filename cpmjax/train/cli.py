"""``cpmjax train``: run the training recipe from a YAML config and/or flags.

    cpmjax train --config configs/cpmjax-tiny.yaml [--steps N] [--out-dir DIR] [--lr LR]
                 [--batch-size B] [--seq-len S] [--init-from HF_DIR] [--tokenizer DIR]
                 [--mesh DATA,FSDP,TENSOR[,SEQUENCE]] [--delta METHOD --delta-targets T1,T2]
                 [--set key.sub=value ...] [--no-resume] [--no-progress]
                 [--coordinator HOST:PORT --num-processes N --process-id I]
    cpmjax train --config CONFIG.yaml --export [--step K] [--export-dir DIR]

Flags override the config file; ``--set`` reaches any field (``--set optim.decay=linear``).

Sequence parallelism: a fourth ``--mesh`` entry cuts every sequence over that many devices
(BurstAttention ring, zigzag layout), e.g. ``--mesh 2,1,1,4`` on 8 devices; choose the ring with
``--set run.mesh.sequence_impl=ring`` (auto|burst|ring|allgather) and the layout with
``--set run.mesh.sequence_layout=contiguous``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cpmjax.distributed import add_process_flags


def register(subparsers: Any) -> None:
    """Add the ``train`` subcommand to an argparse ``subparsers`` object."""
    p = subparsers.add_parser("train", help="train or fine-tune a model (WSD, μP, orbax)",
                              description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML training config")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out-dir", default=None, help="run directory (checkpoints, metrics)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--schedule", choices=["wsd", "cosine", "constant"], default=None)
    p.add_argument("--decay-start", type=int, default=None,
                   help="WSD: step where the decay begins (branch a decay off a stable run)")
    p.add_argument("--init-from", default=None, help="HF checkpoint directory to start from")
    p.add_argument("--tokenizer", default=None, help="HF tokenizer directory (default: train)")
    p.add_argument("--data", action="append", default=None,
                   help="corpus source (repeatable): stdlib, package-metadata, a dir/file/glob")
    p.add_argument("--mesh", default=None,
                   help="DATA,FSDP,TENSOR[,SEQUENCE] device mesh, e.g. 2,4,1 or 2,1,1,4 "
                        "(SEQUENCE > 1: sequence parallelism)")
    p.add_argument("--delta", default=None, help="train only a delta of this method (lora ...)")
    p.add_argument("--delta-targets", default=None, help="comma-separated module paths")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. optim.weight_decay=0.0")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--export", action="store_true",
                   help="only export a checkpoint of the run to the HF layout")
    p.add_argument("--step", type=int, default=None, help="with --export: the step")
    p.add_argument("--export-dir", default=None)
    add_process_flags(p)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Dotted config overrides from the parsed flags."""
    from cpmjax.errors import ConfigError
    from cpmjax.train.config import parse_override

    out: dict[str, Any] = {}
    simple = {
        "steps": "run.steps", "out_dir": "run.out_dir", "lr": "optim.lr",
        "batch_size": "data.batch_size", "seq_len": "data.seq_len",
        "schedule": "optim.schedule", "decay_start": "optim.decay_start",
        "init_from": "model.init_from", "tokenizer": "data.tokenizer",
        "export_dir": "run.export_dir", "delta": "delta.method", "data": "data.sources",
    }
    for attr, key in simple.items():
        value = getattr(args, attr, None)
        if value is not None:
            out[key] = value
    if args.delta_targets:
        out["delta.targets"] = [t.strip() for t in args.delta_targets.split(",") if t.strip()]
    if args.mesh:
        try:
            sizes = [int(x) for x in args.mesh.split(",")]
        except ValueError:
            sizes = []
        if len(sizes) not in (3, 4):
            raise ConfigError(f"--mesh {args.mesh!r} is not DATA,FSDP,TENSOR[,SEQUENCE]")
        names = ("data", "fsdp", "tensor", "sequence")
        out.update({f"run.mesh.{name}": size for name, size in zip(names, sizes, strict=False)})
    if args.no_resume:
        out["run.resume"] = False
    if args.no_progress:
        out["run.progress"] = False
    for item in args.set:
        key, value = parse_override(item)
        out[key] = value
    return out


def run(args: argparse.Namespace) -> int:
    from cpmjax.distributed import initialize_from_args, is_primary

    # before any JAX computation: join the other processes of a multi-process run
    initialize_from_args(args)
    from cpmjax.train.config import load_config
    from cpmjax.train.loop import export_checkpoint, train

    config = load_config(args.config, overrides_from_args(args))
    if args.export:
        path = export_checkpoint(config, args.step, args.export_dir)
        if is_primary():
            print(f"[cpmjax train] exported to {path}", file=sys.stderr)
        return 0
    result = train(config)
    msg = f"[cpmjax train] step {result.step}, final loss {result.final_loss}"
    if result.eval_loss is not None:
        msg += f", eval loss {result.eval_loss:.4f}"
    if result.export_dir:
        msg += f"; exported to {result.export_dir}"
    if result.stopped_early:
        msg += " (stopped at run.max_minutes; rerun the same command to continue)"
    if is_primary():
        print(msg, file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``scripts/train.py`` (the same flags as ``cpmjax train``)."""
    from cpmjax.errors import CpmjaxError

    parser = argparse.ArgumentParser(prog="train", description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except CpmjaxError as exc:
        print(f"cpmjax: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
