"""Train the tool-calling model (and, with --baseline, the same-size model trained on the same
number of tokens without tool data) on synthetic transcripts.

    python scripts/train_tool_model.py [--config configs/tool-model.yaml] [key.sub=value ...]
        [--install]        # copy the export into cpmjax/assets/cpmjax-tools

Resumable: rerunning continues from the last checkpoint in run.out_dir. See docs/tools.md.
"""

import argparse
import json
import sys

from cpmjax.tools.training import load_tool_config, train_tool_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tool-model.yaml")
    parser.add_argument("--install", action="store_true",
                        help="copy the exported model into cpmjax/assets/cpmjax-tools")
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    args = parser.parse_args(argv)
    config = load_tool_config(args.config, args.overrides)
    result = train_tool_model(config)
    summary = {"steps": result.step, "final_loss": result.losses[-1] if result.losses else None,
               "tokens_seen": result.tokens_seen, "loss_tokens_seen": result.loss_tokens_seen,
               "minutes": result.seconds / 60, "rows": result.rows, "dropped": result.dropped,
               "export_dir": result.export_dir}
    print(json.dumps(summary, indent=1))
    if args.install and result.export_dir:
        from cpmjax.tools.training import install_tool_model

        print("installed in", install_tool_model(result.export_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
