"""``cpmjax fuse``: train a fused model (UltraFuser) from a YAML config, and ``cpmjax generate
--model DIR`` on a fused directory.

    cpmjax fuse --config configs/ultrafuser.yaml [--set key.sub=value ...] [--no-resume]
    cpmjax generate --model runs/fusion/fused/fused --prompt "..."

``register`` adds ``fuse`` and, when the ``generate`` subparser exists, makes it recognise a
directory written by ``cpmjax.fusion.save_fused`` (it holds ``fusion_config.json``): such a
model decodes with every specialist (one KV cache each) on one device; other directories go to
the ordinary ``generate`` unchanged.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from cpmjax.errors import ConfigError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("fuse", help="train an UltraFuser fused model (two stages, "
                                           "balanced batches)")
    p.add_argument("--config", required=True, help="YAML fusion config (or a 'fusion:' section)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. stage1.steps=100")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    p.set_defaults(func=_run_fuse)

    generate = getattr(subparsers, "choices", {}).get("generate")
    if generate is not None:
        plain = generate.get_default("func")
        generate.set_defaults(func=lambda args: _run_generate(args, plain))


def _run_fuse(args) -> int:
    from cpmjax.fusion.train import load_fusion_config, train_fusion

    overrides = list(args.set) + (["run.resume=false"] if args.no_resume else [])
    config = load_fusion_config(args.config, overrides)
    result = train_fusion(config)
    last = result.history[-1] if result.history else {}
    print(f"[cpmjax fuse] {len(result.history)} steps this run (last loss "
          f"{last.get('loss', float('nan')):.4f}); fused model: {result.export_dir}",
          file=sys.stderr)
    return 0


def _run_generate(args, plain) -> int:
    """``cpmjax generate`` on a fused directory; anything else goes to ``plain``."""
    from cpmjax.fusion.io import is_fused_dir

    if not args.model or not is_fused_dir(args.model):
        return plain(args)
    if getattr(args, "spec", "none") != "none":
        raise ConfigError(f"--spec {args.spec}: speculative decoding of a fused model is not "
                          "supported (decode without --spec)")
    if args.prefill != "local":
        raise ConfigError(f"--prefill {args.prefill}: a fused model prefills on one device "
                          "(--prefill local)")
    import cpmjax
    from cpmjax.fusion.io import load_fused
    from cpmjax.tokenizer import apply_chat_template, encode

    prompt = args.prompt
    if args.prompt_file is not None:
        if not os.path.isfile(args.prompt_file):
            raise cpmjax.errors.MissingPathError(f"prompt file {args.prompt_file} does not exist")
        with open(args.prompt_file, encoding="utf-8") as f:
            prompt = f.read()
    model = load_fused(args.model, dtype=args.dtype)
    tokenizer = cpmjax.load_tokenizer(args.model)
    ids = apply_chat_template(tokenizer, prompt) if args.chat else encode(tokenizer, prompt)
    stop = () if args.no_stop else tuple(
        t for t in (tokenizer.eos_token_id, model.config.eos_token_id) if isinstance(t, int))
    result = cpmjax.generate(model, [ids], args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                             stop_token_ids=stop)
    text = tokenizer.decode(result.row(0), skip_special_tokens=True)
    sys.stdout.write(("" if args.chat else prompt) + text + "\n")
    s = result.stats
    print(f"[cpmjax] fused ({model.num_specialists} specialists: {', '.join(model.names)}): "
          f"prompt {s.prompt_tokens} tok; generated {s.new_tokens} tok, decode "
          f"{s.decode_tokens_per_second:.1f} tok/s; compile {s.compile_seconds:.1f} s",
          file=sys.stderr)
    return 0
