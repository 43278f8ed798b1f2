"""The ``cpmjax`` console command.

    cpmjax generate [--model DIR] (--prompt TEXT | --prompt-file FILE) [--max-new-tokens N]
                    [--temperature T] [--top-k K] [--top-p P] [--seed S] [--chat]
                    [--dtype float32|bfloat16] [--prefill local|apb|star|ring [--query-len N]
                    [--anchor-len N] [--passing-len N] [--retaining-heads FILE]]
                    [--coordinator HOST:PORT --num-processes N --process-id I]
    cpmjax train --config CONFIG.yaml [flags]          (training recipe)
    cpmjax info [--model DIR]                          (config and parameter count)

``generate`` streams text to stdout and prints prefill / decode tokens per second to stderr;
without ``--model`` it uses the bundled default model. Its speculative flags (``--spec
eagle2|frspec`` ...) come from ``cpmjax.generate.cli``; speculative decoding follows ``--prefill
local`` or ``ring``, and ``cpmjax.generate`` rejects it after ``apb`` / ``star`` (exit code 2).
As one of several processes (the flags, or ``cpmjax launch``; docs/multihost.md) a distributed
prefill spans every process's devices and only process 0 prints.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from cpmjax.distributed import add_process_flags
from cpmjax.errors import ConfigError, CpmjaxError, MissingPathError

# Subcommands that live with their feature: (module, function that adds the subparser).
_PLUGINS = [
    ("cpmjax.train.cli", "register"),
    ("cpmjax.generate.cli", "register"),
    ("cpmjax.launch", "register"),
    ("cpmjax.tools.cli", "register"),
    ("cpmjax.scaling.cli", "register"),
    ("cpmjax.fusion.cli", "register"),
]


def _add_generate(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a prompt")
    p.add_argument("--model", default=None, help="local HF checkpoint dir (default: bundled)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="read the prompt from a UTF-8 text file")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--no-stop", action="store_true", help="do not stop at the EOS token")
    p.add_argument("--prefill", default="local", choices=["local", "apb", "star", "ring"],
                   help="long-context prefill over every visible device (a 'sequence' mesh "
                        "axis): APB, Star Attention or the exact ring; default: one device")
    p.add_argument("--query-len", type=int, default=16,
                   help="apb/star: the last N prompt tokens are the query (APB embeds it in "
                        "its anchor after the first token)")
    p.add_argument("--anchor-len", type=int, default=None,
                   help="apb/star anchor tokens (default: block/4 for apb, a block for star)")
    p.add_argument("--passing-len", type=int, default=None,
                   help="apb: tokens each host passes on (default: block/8)")
    p.add_argument("--retaining-heads", default=None,
                   help="apb: retaining heads (.npz, scripts/train_retaining_head.py) as the "
                        "compressor instead of the query-aware scorer")
    add_process_flags(p)
    p.set_defaults(func=_run_generate)


def _distributed_prefill(args) -> tuple[Any, dict[str, Any] | None]:
    """``(mesh, prefill_options)`` for ``--prefill``: a ``sequence`` mesh over every visible
    device (``None`` for a local prefill)."""
    if args.prefill == "local":
        return None, None
    import jax

    from sharding.mesh import make_mesh

    hosts = len(jax.devices())
    if hosts < 2:
        raise ConfigError(
            f"--prefill {args.prefill} splits the prompt over several devices, but jax sees "
            f"{hosts}; on a CPU, simulate 8 with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8"
        )
    if args.prefill == "ring":
        return make_mesh(sequence=hosts), None
    options: dict[str, Any] = {"query_len": args.query_len,
                               "query_offset": 1 if args.query_len else 0,
                               "anchor_len": args.anchor_len}
    if args.prefill == "apb":
        options["passing_len"] = args.passing_len
        if args.retaining_heads:
            from sharding.apb import RetainingHeads

            options["scorer"] = RetainingHeads.load(args.retaining_heads)
    elif args.passing_len:
        raise ConfigError("--passing-len is an APB setting; Star Attention passes nothing")
    return make_mesh(sequence=hosts), options


def _stop_ids(model, tokenizer) -> list[int]:
    ids = []
    for candidate in (getattr(tokenizer, "eos_token_id", None), model.config.eos_token_id):
        if isinstance(candidate, int):
            ids.append(candidate)
        elif isinstance(candidate, list):
            ids.extend(candidate)
    return sorted(set(ids))


def _run_generate(args) -> int:
    from cpmjax.distributed import initialize_from_args, is_primary

    # before any JAX computation: join the other processes of a multi-process run
    initialize_from_args(args)
    import cpmjax
    from cpmjax.tokenizer import apply_chat_template, encode

    prompt = args.prompt
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompt = f.read()
        except FileNotFoundError:
            raise MissingPathError(f"prompt file {args.prompt_file} does not exist") from None
    path = args.model or cpmjax.default_model_path()
    model = cpmjax.from_pretrained(path, dtype=args.dtype)
    tokenizer = cpmjax.load_tokenizer(path)
    ids = apply_chat_template(tokenizer, prompt) if args.chat else encode(tokenizer, prompt)
    mesh, prefill_options = _distributed_prefill(args)
    # every process of a multi-process run makes the same calls (streaming included: the
    # chunks are collective programs), but only process 0 writes the text and the stats
    primary = is_primary()
    out = sys.stdout if primary else None
    printed = ""
    # the prompt is echoed with the first generated text, so a rejected request prints nothing
    echo = "" if args.chat else prompt

    def stream(tokens):
        nonlocal printed, echo
        text = tokenizer.decode(tokens[0].tolist(), skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return
        if out is not None:
            out.write(echo + text[len(printed):])
            out.flush()
        printed, echo = text, ""

    speculative = None
    if getattr(args, "spec", "none") != "none":  # flags added by cpmjax.generate.cli
        from cpmjax.generate.cli import build_speculative

        speculative = build_speculative(args, model)
    result = cpmjax.generate(
        model, [ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed,
        stop_token_ids=() if args.no_stop else _stop_ids(model, tokenizer), stream=stream,
        speculative=speculative, prefill=args.prefill, mesh=mesh,
        prefill_options=prefill_options,
    )
    if not primary:
        return 0
    final = tokenizer.decode(result.row(0), skip_special_tokens=True)
    sys.stdout.write(echo + final[len(printed):] + "\n")
    sys.stdout.flush()
    s = result.stats
    spec_stats = ""
    if speculative is not None:
        spec_stats = (
            f"mean accepted length {s.mean_accepted_length:.2f} over {s.cycles} cycles; draft "
            f"{s.draft_share:.0%} / verify {s.verify_share:.0%} of a cycle; "
        )
    print(
        f"[cpmjax] {'' if speculative is None else args.spec + ': '}prompt {s.prompt_tokens} "
        f"tok, prefill {s.prefill_tokens_per_second:.1f} tok/s; generated {s.new_tokens} tok, "
        f"decode {s.decode_tokens_per_second:.1f} tok/s; {spec_stats}"
        f"compile {s.compile_seconds:.1f} s",
        file=sys.stderr,
    )
    return 0


def _add_info(subparsers) -> None:
    p = subparsers.add_parser("info", help="print a checkpoint's config and parameter count")
    p.add_argument("--model", default=None)
    p.set_defaults(func=_run_info)


def _run_info(args) -> int:
    import json

    import cpmjax
    from cpmjax.models import ModelConfig

    path = args.model or cpmjax.default_model_path()
    config = ModelConfig.from_pretrained(path)
    print(json.dumps(config.to_hf_dict(), indent=2, sort_keys=True))
    print(f"parameters: {config.num_parameters():,}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpmjax", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_generate(subparsers)
    _add_info(subparsers)
    for module_name, function in _PLUGINS:  # every plugin must import: no silent gaps
        getattr(importlib.import_module(module_name), function)(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CpmjaxError as exc:
        print(f"cpmjax: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
