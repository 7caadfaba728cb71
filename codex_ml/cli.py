"""The `codex` command. Each command group lives beside its domain code and registers itself here.

To add a group: write `add_parser(subparsers)` in its module (see codex_ml/tokenizer/cli.py: it sets
`func` on each command's parser) and append it to GROUPS.
"""

from __future__ import annotations

import argparse

from .modeling import cli as modeling_cli
from .stage import run
from .tokenizer import cli as tokenizer_cli

GROUPS = [tokenizer_cli.add_parser, modeling_cli.add_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codex", description="codex-pipeline command line")
    sub = parser.add_subparsers(dest="group", required=True, metavar="GROUP")
    for add in GROUPS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse `argv` and run the command: exit 2 with one line on bad input (see stage.run)."""
    args = build_parser().parse_args(argv)
    run(lambda: args.func(args))


if __name__ == "__main__":
    main()
