"""`codex tokenizer train|encode|decode|validate|stats`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..stage import UserError

DEFAULT_DIR = "models/tokenizer"


def _text(args) -> str:
    """The input text: --file, the TEXT argument, or stdin; bytes are decoded as UTF-8 exactly."""
    if args.file:
        data = _read(args.file)
    elif args.text is not None:
        return args.text
    else:
        data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{args.file or 'stdin'} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory; give a text file") from None


def _docs(args):
    """(name, iterator of texts) for validate/stats: a file (one document) or a split."""
    from .. import io

    if args.file:
        return args.file, [_text(args)]
    return f"{args.splits}/{args.split}", (r["text"] for r in io.iter_rows(args.splits, args.split, ["text"]))


def cmd_train(args) -> None:
    from .. import params
    from ..io import write_json
    from . import train_dir

    m = train_dir(args.splits, args.output, params.load(args.params))
    if args.metrics:
        write_json(args.metrics, m)
    print(json.dumps(m, indent=2, sort_keys=True))


def cmd_encode(args) -> None:
    from . import load_sp

    sp = load_sp(args.model)
    ids = sp.encode(_text(args))
    if args.bos:
        ids = [sp.bos_id()] + ids
    if args.eos:
        ids = ids + [sp.eos_id()]
    out = [sp.id_to_piece(i) for i in ids] if args.pieces else ids
    print(json.dumps(out, ensure_ascii=False) if args.json else " ".join(map(str, out)))


def cmd_decode(args) -> None:
    from . import load_sp

    sp = load_sp(args.model)
    raw = " ".join(args.ids) if args.ids else sys.stdin.read()
    try:
        ids = json.loads(raw) if raw.lstrip().startswith("[") else [int(x) for x in raw.split()]
    except ValueError:
        raise UserError("ids must be integers separated by spaces, or a JSON list") from None
    bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < sp.get_piece_size()]
    if bad:
        raise UserError(f"id {bad[0]!r} is out of range: ids run from 0 to {sp.get_piece_size() - 1}")
    if args.skip_special:
        ids = [i for i in ids if not sp.is_control(i)]
    sys.stdout.buffer.write(sp.decode(ids).encode("utf-8"))  # exactly the text, no added newline
    sys.stdout.flush()


def cmd_validate(args) -> None:
    from . import check, load, load_sp

    sp, hf = load_sp(args.model), load(args.model)
    name, texts = _docs(args)
    failures: list = []
    c = check(sp, hf, texts, failures=failures)
    for i, why in failures[:10]:
        print(f"document {i}: {why}", file=sys.stderr)
    print(f"{name}: {c['docs']} docs, round-trip {c['roundtrip_ok']}/{c['docs']}, "
          f"HF = SentencePiece {c['hf_agree']}/{c['docs']}, {c['bytes_per_token']} bytes/token")
    if failures:
        sys.exit(1)


def cmd_stats(args) -> None:
    from . import BOS_ID, EOS_ID, PAD_ID, UNK_ID, check, load_sp

    sp = load_sp(args.model)
    out = {"vocab_size": sp.get_piece_size(), "unk_id": UNK_ID, "bos_id": BOS_ID, "eos_id": EOS_ID,
           "pad_id": PAD_ID, "byte_pieces": sum(map(sp.is_byte, range(sp.get_piece_size())))}
    if args.file or args.split:
        name, texts = _docs(args)
        c = check(sp, None, texts)
        out.update(input=name, docs=c["docs"], bytes=c["bytes"], tokens=c["tokens"],
                   bytes_per_token=c["bytes_per_token"],
                   byte_fallback_share=round(c["byte_fallback_tokens"] / c["tokens"], 6) if c["tokens"] else None)
    print(json.dumps(out, indent=2))


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the `tokenizer` command group on the top-level parser's subparsers."""
    grp = sub.add_parser("tokenizer", help="train, use and check the SentencePiece tokenizer")
    cmds = grp.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_arg(p):
        p.add_argument("--model", default=DEFAULT_DIR,
                       help=f"tokenizer directory or .model file ({DEFAULT_DIR})")

    def input_args(p, split_default=None):
        p.add_argument("--file", "-f", help="a UTF-8 text file (one document)")
        p.add_argument("--split", default=split_default, help="a split name: train, val or test")
        p.add_argument("--splits", default="data/splits", help="the splits directory (data/splits)")

    p = cmds.add_parser("train", help="train on the train split (as the train_tokenizer stage does)")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--splits", default="data/splits")
    p.add_argument("--output", default=DEFAULT_DIR)
    p.add_argument("--metrics", default=None, help="also write the metrics JSON here")
    p.set_defaults(func=cmd_train)

    p = cmds.add_parser("encode", help="text (argument, --file or stdin) to ids")
    model_arg(p)
    p.add_argument("text", nargs="?", help="the text; omit to read --file or stdin")
    p.add_argument("--file", "-f")
    p.add_argument("--pieces", action="store_true", help="print pieces instead of ids")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--bos", action="store_true", help="prepend BOS")
    p.add_argument("--eos", action="store_true", help="append EOS")
    p.set_defaults(func=cmd_encode)

    p = cmds.add_parser("decode", help="ids (arguments or stdin, spaces or a JSON list) to text")
    model_arg(p)
    p.add_argument("ids", nargs="*")
    p.add_argument("--skip-special", action="store_true", help="drop BOS/EOS/PAD ids")
    p.set_defaults(func=cmd_decode)

    p = cmds.add_parser("validate", help="round-trip and HF-agreement check; exit 1 on any mismatch")
    model_arg(p)
    input_args(p, split_default="test")
    p.set_defaults(func=cmd_validate)

    p = cmds.add_parser("stats", help="vocabulary facts, and bytes/token over a file or split")
    model_arg(p)
    input_args(p)
    p.set_defaults(func=cmd_stats)
