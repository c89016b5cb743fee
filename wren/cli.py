"""The `wren` command: parses arguments and calls the library; no logic of its own.

Each verb lives in a `_cmd_*` function. User mistakes surface as `WrenError` and are printed as
one line on stderr with exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import shlex
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


def _cmd_data_check(args: argparse.Namespace) -> int:
    from wren.data.formats import check_files, format_check_report

    tokenizer = None
    if args.tokenizer:
        from wren.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(args.tokenizer)
    report = check_files([Path(p) for p in args.files], kind=args.kind, tokenizer=tokenizer)
    print(format_check_report(report))
    return 0 if report.ok else 1


def _cmd_data_demo(args: argparse.Namespace) -> None:
    from wren.data.demo import write_demo_pretrain, write_demo_sft

    rows = write_demo_pretrain(args.out, max_bytes=int(args.max_mb * 1_000_000))
    print(f"{rows:,} documents written to {args.out}")
    if args.sft:
        conversations = write_demo_sft(args.sft)
        print(f"{conversations:,} conversations written to {args.sft}")


def _parse_placeholder(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected NAME=TEXT, got {text!r}")
    return key, value


def _cmd_data_fill(args: argparse.Namespace) -> None:
    from wren.data.fill import fill_placeholders

    rows, used = fill_placeholders(args.file, dict(args.set), args.out)
    filled = ", ".join(f"{{{{{name}}}}} x{used[name]}" for name in dict(args.set)) or "nothing"
    print(f"{rows:,} rows written to {args.out}; filled {filled}")


def _cmd_lora_merge(args: argparse.Namespace) -> None:
    from wren.checkpoint.adapter import merge_adapter

    merge_adapter(args.base, args.adapter, args.out)
    print(f"{args.base} + {args.adapter} merged and written to {args.out}")


# Training options that map one-to-one onto TrainConfig fields: (field, type, help).
_TRAIN_OPTIONS = [
    ("seq_len", int, "tokens per training sequence (default 512)"),
    ("batch_size", int, "sequences per device per micro-step (default 32)"),
    ("grad_accum", int, "micro-steps per optimizer step (default 1)"),
    ("max_steps", int, "optimizer steps to train for (default 1000)"),
    ("lr", float, "peak learning rate (default 5e-4)"),
    ("min_lr_ratio", float, "final learning rate as a fraction of the peak (default 0.1)"),
    ("warmup_steps", int, "linear warmup steps (default 100)"),
    ("schedule", str, "cosine, wsd (warmup-stable-decay) or constant (default cosine)"),
    ("weight_decay", float, "AdamW weight decay (default 0.1)"),
    ("grad_clip", float, "gradient norm clip (default 1.0)"),
    ("aux_loss_coef", float, "MoE load-balancing loss weight (default: the model's)"),
    ("eval_every", int, "validate every N steps (default 200)"),
    ("eval_batches", int, "validation batches per evaluation (default 20)"),
    ("save_every", int, "checkpoint every N steps (default 500)"),
    ("keep_last", int, "checkpoints to keep (default 2)"),
    ("log_every", int, "log every N steps (default 10)"),
    ("seed", int, "random seed (default 0)"),
    ("device", str, "auto, cpu, cuda, cuda:1 ... (default auto)"),
    ("dtype", str, "auto (bf16 autocast on GPU, fp32 on CPU), float32 or bfloat16"),
    ("val_fraction", float, "share of rows held out for validation, by row hash (default 0.01)"),
    ("workers", int, "tokenisation processes (default: CPU count, at most 8)"),
    ("cache_dir", str, "where tokenised data is cached (default <out>/data-cache)"),
    ("logger", str, "tensorboard, wandb or none (default tensorboard)"),
    ("wandb_project", str, "Weights & Biases project name"),
]


def _layer_list(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


# Settings of one objective only, offered on its own verb.
_OBJECTIVE_OPTIONS = {
    "lora": [
        ("lora_rank", int, "adapter rank (default 8)"),
        ("lora_alpha", float, "adapter scale numerator: updates are scaled by alpha / rank (default 16)"),
        ("lora_dropout", float, "dropout on the adapter input (default 0)"),
        ("lora_targets", _layer_list, "comma-separated layers (default q,k,v,o,gate,up,down _proj)"),
    ],
    "dpo": [
        ("dpo_beta", float, "DPO temperature beta (default 0.1)"),
        ("dpo_label_smoothing", float, "conservative DPO label smoothing (default 0)"),
        ("reference", str, "frozen reference model (default: the --init checkpoint)"),
    ],
    "distill": [
        ("teacher", str, "teacher checkpoint, with the same tokenizer (required)"),
        ("distill_alpha", float, "weight of the cross-entropy; 1 - alpha goes to the KL (default 0.5)"),
        ("distill_temperature", float, "softmax temperature for the KL (default 1)"),
        ("teacher_dtype", str, "auto (bf16 on GPU, fp32 on CPU), float32 or bfloat16"),
    ],
    "reason": [
        ("think_tag_weight", float, "loss weight of <think> and </think> tokens (default 10)"),
    ],
}


def _cmd_train(args: argparse.Namespace) -> None:
    from wren.train.config import resolve_config
    from wren.train.loop import Trainer

    options = _TRAIN_OPTIONS + _OBJECTIVE_OPTIONS.get(args.objective, [])
    overrides = {name: getattr(args, name) for name, _, _ in options}
    overrides.update(
        objective=args.objective,
        data=args.data,
        out_dir=args.out_dir,
        init=args.init,
        preset=args.preset,
        tokenizer=args.tokenizer,
        compile=args.compile,
        fsdp=args.fsdp,
        skip_bad_lines=args.skip_bad_lines or None,
        model_overrides=dict(args.set) or None,
    )
    config = resolve_config(args.config, **overrides)
    Trainer(config, resume=args.resume).run()


def _add_train_verb(verbs, objective: str, description: str) -> None:
    parser = verbs.add_parser(objective, help=description, description=description)
    parser.add_argument("--config", help="TOML, YAML or JSON file of settings (flags override it)")
    parser.add_argument("--data", nargs="+", help="JSONL files or directories")
    parser.add_argument("--out", dest="out_dir", help=f"run directory (default runs/{objective})")
    parser.add_argument("--init", help="start from this checkpoint directory")
    parser.add_argument("--preset", help="start from a fresh preset model (micro, small, base, moe)")
    parser.add_argument("--tokenizer", help="tokenizer directory, with --preset")
    for name, kind, text in _TRAIN_OPTIONS + _OBJECTIVE_OPTIONS.get(objective, []):
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None, help=text)
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile (default: on GPU)",
    )
    parser.add_argument(
        "--fsdp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="under torchrun, shard weights, gradients and optimizer state across processes (FSDP2) "
        "instead of replicating the model in each (DDP)",
    )
    parser.add_argument("--skip-bad-lines", action="store_true", help="skip invalid rows instead of stopping")
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    parser.add_argument(
        "--set",
        type=_parse_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model setting of a fresh preset, e.g. --set n_layers=2 (repeatable)",
    )
    parser.set_defaults(func=_cmd_train, objective=objective)


def _cmd_quickstart(args: argparse.Namespace) -> None:
    from wren.quickstart import QuickstartPlan, next_steps, run_quickstart

    plan = QuickstartPlan()
    if args.pretrain_steps is not None:
        plan.pretrain_steps = args.pretrain_steps
    if args.sft_steps is not None:
        plan.sft_steps = args.sft_steps
    model_dir = run_quickstart(args.out, data_dir=args.data, plan=plan)
    wren = "wren" if Path(sys.argv[0]).name == "wren" else f"{shlex.quote(sys.executable)} -m wren"
    print(next_steps(model_dir, wren))


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
    demo.add_argument("--sft", metavar="FILE", help="also write demo conversations (SFT JSONL) to FILE")
    demo.set_defaults(func=_cmd_data_demo)
    check = data_verbs.add_parser(
        "check",
        help="validate JSONL training data",
        description="Count rows, measure lengths (and tokens, with --tokenizer), and list every problem "
        "as file:line. Exits 1 when any row is invalid.",
    )
    check.add_argument("files", nargs="+", help="JSONL files or directories of *.jsonl")
    check.add_argument(
        "--kind", choices=["pretrain", "sft", "preference"], help="expected format (default: detect)"
    )
    check.add_argument("--tokenizer", help="tokenizer directory, for token statistics")
    check.set_defaults(func=_cmd_data_check)
    fill = data_verbs.add_parser(
        "fill",
        help="fill {{name}} placeholders in JSONL",
        description="Replace {{NAME}} placeholders in every string of a JSONL file, e.g. the "
        "{{name}} and {{author}} of an identity dataset. A placeholder with no value is an error.",
    )
    fill.add_argument("file", help="JSONL file to read")
    fill.add_argument(
        "--set",
        type=_parse_placeholder,
        action="append",
        default=[],
        metavar="NAME=TEXT",
        help="the text for {{NAME}} (repeatable)",
    )
    fill.add_argument("--out", required=True, help="JSONL file to write (may be the input)")
    fill.set_defaults(func=_cmd_data_fill)

    lora = verbs.add_parser("lora", help="LoRA adapter tools")
    lora_verbs = lora.add_subparsers(dest="action", metavar="ACTION", required=True)
    merge = lora_verbs.add_parser(
        "merge",
        help="merge an adapter into its base model",
        description="Fold a PEFT LoRA adapter (from wren train lora, or PEFT) into the weights of its "
        "base model and write the result as a plain checkpoint, in the base's dtype.",
    )
    merge.add_argument("base", help="base model directory (the --init the adapter was trained on)")
    merge.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    merge.add_argument("--out", required=True, help="checkpoint directory to write")
    merge.set_defaults(func=_cmd_lora_merge)

    quickstart = verbs.add_parser(
        "quickstart",
        help="train a tiny chat model end to end, offline",
        description="Demo corpus (or --data) -> tokenizer -> micro pretraining -> SFT -> sample replies.",
    )
    quickstart.add_argument(
        "--out", default="quickstart-out", help="directory for everything (default quickstart-out)"
    )
    quickstart.add_argument("--data", help='a directory of JSONL: {"text"} files and {"conversations"} files')
    quickstart.add_argument("--pretrain-steps", type=int, help="pretraining steps (default 300)")
    quickstart.add_argument("--sft-steps", type=int, help="SFT steps (default 150)")
    quickstart.set_defaults(func=_cmd_quickstart)

    train_parser = verbs.add_parser("train", help="train a model (pretrain, sft, lora, dpo, distill, reason)")
    train_verbs = train_parser.add_subparsers(dest="action", metavar="OBJECTIVE", required=True)
    _add_train_verb(train_verbs, "pretrain", 'Pretrain on {"text"} JSONL: packed documents, next-token loss.')
    _add_train_verb(
        train_verbs,
        "sft",
        'Supervised fine-tuning on {"conversations"} JSONL: loss on assistant replies only.',
    )
    _add_train_verb(
        train_verbs,
        "lora",
        "SFT with low-rank adapters on a frozen model; saves a PEFT adapter directory.",
    )
    _add_train_verb(
        train_verbs,
        "dpo",
        'Direct preference optimisation on {"chosen", "rejected"} JSONL, against a frozen reference.',
    )
    _add_train_verb(
        train_verbs,
        "distill",
        "Distil a teacher's token distributions into the --init student (KL mixed with cross-entropy).",
    )
    _add_train_verb(
        train_verbs,
        "reason",
        "Reasoning SFT on conversations whose replies hold <think>...</think> then the answer.",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
    except WrenError as exc:
        print(f"wren: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wren: interrupted", file=sys.stderr)
        return 130
    return status or 0
