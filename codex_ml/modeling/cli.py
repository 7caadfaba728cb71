"""`codex generate`: sample a completion from a trained model."""

from __future__ import annotations

import argparse
import sys


def _run(args) -> None:
    from .generate import generate, load

    model, tok = load(args.model)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    for i in range(args.num):
        text = generate(model, tok, prompt, args.max_new_tokens, args.temperature, args.top_p,
                        args.seed + i, suffix=args.suffix)
        if args.num > 1:
            print(f"--- sample {i + 1}")
        print(prompt + text + (args.suffix or ""))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample code completions from a trained model",
                       description="Continue a prompt with a model written by train_model, or "
                       "with --suffix fill in the middle between --prefix and --suffix.")
    p.add_argument("--prompt", "--prefix", "-p", help="text to continue, or with --suffix the "
                   "text before the gap (default: stdin)")
    p.add_argument("--suffix", "-s", default=None,
                   help="infill: the text after the gap; the model writes what goes between "
                   "(needs a model trained with train.fim.rate > 0)")
    p.add_argument("--model", "-m", default="models/model", help="model directory (default: %(default)s)")
    p.add_argument("--max-new-tokens", "-n", type=int, default=64)
    p.add_argument("--temperature", "-t", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num", type=int, default=1, help="number of samples")
    p.set_defaults(func=_run)
