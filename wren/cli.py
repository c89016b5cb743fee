"""The `wren` command: parses arguments and calls the library; no logic of its own.

Each verb lives in a `_cmd_*` function. User mistakes surface as `WrenError` and are printed as
one line on stderr with exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from wren import __version__
from wren.errors import WrenError


def _parse_setting(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.replace("-", "_"), value


def _cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from wren.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(
        [Path(f) for f in args.files],
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        show_progress=sys.stderr.isatty(),
    )
    tokenizer.save(args.out)
    print(f"tokenizer with {tokenizer.vocab_size:,} tokens written to {args.out}")


def _cmd_model_init(args: argparse.Namespace) -> None:
    from wren.checkpoint import init_checkpoint

    model = init_checkpoint(args.preset, args.tokenizer, args.out, seed=args.seed, overrides=dict(args.set))
    print(f"{args.preset} model, {model.num_parameters():,} parameters, written to {args.out}")


def _cmd_model_info(args: argparse.Namespace) -> None:
    from wren.checkpoint.info import describe_checkpoint, format_info

    info = describe_checkpoint(args.model, allow_pickle=args.allow_pickle)
    print(json.dumps(info, indent=2) if args.json else format_info(info))


def _cmd_data_demo(args: argparse.Namespace) -> None:
    from wren.data.demo import write_demo_pretrain

    rows = write_demo_pretrain(args.out, max_bytes=int(args.max_mb * 1_000_000))
    print(f"{rows:,} documents written to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wren",
        description="Train small chat language models from scratch, and run them or any Hugging Face model.",
    )
    parser.add_argument("--version", action="version", version=f"wren {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND", required=True)

    tokenizer = verbs.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tokenizer_verbs = tokenizer.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = tokenizer_verbs.add_parser(
        "train",
        help="train from JSONL files",
        description='Train a byte-level BPE tokenizer from JSONL rows of {"text"} or {"conversations"}.',
    )
    train.add_argument("files", nargs="+", help="JSONL files or directories of *.jsonl")
    train.add_argument("--out", required=True, help="directory to write the tokenizer to")
    train.add_argument("--vocab-size", type=int, default=6400, help="vocabulary size (default 6400)")
    train.add_argument("--min-frequency", type=int, default=2, help="least count for a merge (default 2)")
    train.set_defaults(func=_cmd_tokenizer_train)

    model = verbs.add_parser("model", help="create and inspect model checkpoints")
    model_verbs = model.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = model_verbs.add_parser(
        "init",
        help="randomly initialise a preset model",
        description="Create a randomly initialised model from a preset and save it, with its tokenizer, "
        "as a Hugging Face model directory.",
    )
    init.add_argument("--preset", required=True, help="micro, small, base or moe")
    init.add_argument("--tokenizer", required=True, help="tokenizer directory (or tokenizer.json)")
    init.add_argument("--out", required=True, help="checkpoint directory to write")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument(
        "--set",
        type=_parse_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model setting, e.g. --set max_seq_len=1024 (repeatable)",
    )
    init.set_defaults(func=_cmd_model_init)

    info = model_verbs.add_parser("info", help="describe a checkpoint", description="Describe a checkpoint.")
    info.add_argument("model", help="model directory")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--allow-pickle", action="store_true", help="read .bin/.pth pickle weights")
    info.set_defaults(func=_cmd_model_info)

    data = verbs.add_parser("data", help="training data tools")
    data_verbs = data.add_subparsers(dest="action", metavar="ACTION", required=True)
    demo = data_verbs.add_parser(
        "demo",
        help="write the built-in demo corpus",
        description="Write a pretraining corpus built from Python's own bundled documentation.",
    )
    demo.add_argument("--out", required=True, help="JSONL file to write")
    demo.add_argument("--max-mb", type=float, default=4.0, help="approximate size cap in MB (default 4)")
    demo.set_defaults(func=_cmd_data_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except WrenError as exc:
        print(f"wren: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wren: interrupted", file=sys.stderr)
        return 130
    return 0
