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


def _cmd_convert_minimind(args: argparse.Namespace) -> None:
    from wren.interop.minimind import convert_minimind

    result = convert_minimind(
        args.checkpoint, args.out, tokenizer=args.tokenizer, overrides=dict(args.set), dtype=args.dtype
    )
    config = result.config
    shape = f"dim {config.dim}, {config.n_layers} layers, {config.n_heads}/{config.n_kv_heads} q/kv heads"
    if config.is_moe:
        shape += f", {config.n_experts} experts top-{config.n_experts_per_token} + shared expert"
    print(f"{result.layout} checkpoint, {result.parameters:,} parameters ({shape}), written to {args.out}")
    if not result.has_tokenizer:
        print(f"note: {args.out} has no tokenizer yet; convert again with --tokenizer DIR (MiniMind's)")


def _cmd_hub_download(args: argparse.Namespace) -> None:
    from wren.interop.hub import download

    result = download(
        args.repo_id,
        args.out,
        source=args.source,
        revision=args.revision,
        include=args.include,
        exclude=args.exclude,
    )
    print(
        f"{len(result.files)} files of {result.repo_id}@{result.revision} written to {result.out_dir}; "
        f"{result.verified} checked against the hub's hashes; manifest {result.sums_file}"
    )


def _cmd_hub_verify(args: argparse.Namespace) -> int:
    from wren.interop.checksums import format_verify_report, verify_directory

    report = verify_directory(args.dir, args.sums)
    print(format_verify_report(report, strict=args.strict))
    return 0 if report.ok(strict=args.strict) else 1


def _cmd_export_gguf(args: argparse.Namespace) -> None:
    try:
        import gguf  # noqa: F401 (checked here so a missing extra is one clear line)
    except ImportError:
        raise WrenError("GGUF export needs the gguf package: pip install 'wrenlm[gguf]'") from None
    from wren.interop.gguf import export_gguf

    result = export_gguf(args.model, args.out, file_type=args.type, allow_pickle=args.allow_pickle)
    size = result.size_bytes / 1e6
    print(
        f"{result.architecture} GGUF ({result.file_type}, {result.tensors} tensors, {size:,.1f} MB) "
        f"written to {result.path}"
    )


def _cmd_quantize(args: argparse.Namespace) -> None:
    from wren.checkpoint.quantized import quantize_checkpoint

    result = quantize_checkpoint(
        args.model, args.out, bits=args.bits, group_size=args.group_size, allow_pickle=args.allow_pickle
    )
    print(
        f"{result.layers} linear layers quantised to {result.quantization.describe()}; weights "
        f"{result.bytes_before / 1e6:,.1f} MB -> {result.bytes_after / 1e6:,.1f} MB, written to {result.path}"
    )


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


def add_model_options(parser: argparse.ArgumentParser, model_required: bool = True) -> None:
    """How a generating verb opens its model: the same flags on chat, generate, serve and web."""
    parser.add_argument(
        "model",
        nargs=None if model_required else "?",
        help="model directory (a Wren or Hugging Face checkpoint), or a hub id",
    )
    parser.add_argument(
        "--backend",
        choices=["auto", "native", "transformers"],
        default="auto",
        help="auto (default): Wren's engine for Llama/Mistral/Qwen2/Qwen3 (and their MoE), "
        "transformers otherwise",
    )
    parser.add_argument(
        "--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16 or float16"
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: the GPU if there is one)")
    parser.add_argument("--adapter", help="a LoRA adapter directory (PEFT format) merged in at load")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="let transformers run the model's own code"
    )
    parser.add_argument("--max-seq-len", type=int, help="context length (default: the model's)")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="compile the native decode step with torch.compile (default: on CUDA only; on the CPU "
        "it takes a minute to start and then decodes one stream two to three times as fast)",
    )
    parser.add_argument(
        "--quantize",
        choices=["int8", "int4"],
        help="int8 or int4 weights at load (native backend): 2-3x faster single-stream CPU decoding",
    )


def open_engine(args: argparse.Namespace, max_batch_size: int = 16):  # -> wren.infer.engine.Engine
    from wren.infer.load import load_engine

    return load_engine(
        args.model,
        backend=args.backend,
        dtype=args.dtype,
        device=args.device,
        adapter=args.adapter,
        trust_remote_code=args.trust_remote_code,
        max_batch_size=max_batch_size,
        max_seq_len=args.max_seq_len,
        quantize=args.quantize,
        compile=args.compile,
    )


# Sampling flags of chat and generate: (flag, SamplingParams field, type, default, help).
_SAMPLING_OPTIONS = [
    ("--temperature", "temperature", float, 0.7, "0 is greedy (default 0.7)"),
    ("--top-p", "top_p", float, 0.9, "nucleus sampling mass (default 0.9)"),
    ("--top-k", "top_k", int, None, "sample among the k likeliest tokens (default: no limit)"),
    ("--min-p", "min_p", float, 0.0, "drop tokens below this share of the likeliest one (default 0)"),
    ("--repetition-penalty", "repetition_penalty", float, 1.0, "above 1 discourages repeats (default 1)"),
    ("--max-new-tokens", "max_new_tokens", int, 512, "longest reply in tokens (default 512)"),
    ("--seed", "seed", int, None, "sampling seed, for reproducible replies"),
]


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    for flag, name, kind, default, text in _SAMPLING_OPTIONS:
        parser.add_argument(flag, dest=name, type=kind, default=default, help=text)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _sampling_params(args: argparse.Namespace):  # -> wren.infer.sampling.SamplingParams
    from wren.infer.sampling import SamplingParams

    values = {name: getattr(args, name) for _, name, _, _, _ in _SAMPLING_OPTIONS}
    return SamplingParams.from_dict({**values, "stop": args.stop})


def _cmd_chat(args: argparse.Namespace) -> None:
    from wren.chat import ChatSession, read_terminal_line

    params = _sampling_params(args)
    engine = open_engine(args, max_batch_size=1)
    session = ChatSession(engine, params, system=args.system, show_thinking=args.show_thinking)
    session.run(read_terminal_line)


def _cmd_generate(args: argparse.Namespace) -> None:
    from wren.batch import generate_file

    params = _sampling_params(args)
    engine = open_engine(args, max_batch_size=args.batch_size)
    totals = generate_file(engine, Path(args.input), Path(args.output), params)
    print(
        f"{totals['prompts']:,} replies ({totals['completion_tokens']:,} tokens, "
        f"{totals['prompt_tokens']:,} prompt tokens) written to {args.output}"
    )


def _cmd_serve(args: argparse.Namespace) -> None:
    import os

    from wren.serve.server import require_dependencies, serve

    require_dependencies()
    serve(
        lambda: open_engine(args, max_batch_size=args.max_batch_size),
        args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("WREN_API_KEY") or None,
        served_model_name=args.served_model_name,
        max_concurrency=args.max_concurrency,
        log_level=args.log_level,
    )


def _cmd_web(args: argparse.Namespace) -> None:
    import os

    if args.api_base and args.model:
        raise WrenError("wren web takes a MODEL or --api-base, not both")
    if not (args.api_base or args.model):
        raise WrenError("wren web needs a MODEL directory or --api-base URL of an OpenAI-compatible server")
    # The page needs no phoning home; this also keeps start-up quick on machines without a network.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        from wren.web.app import launch
        from wren.web.backends import ApiBackend, Backend, LocalBackend
    except ImportError as exc:
        raise WrenError(f"wren web needs the web extra: pip install 'wrenlm[web]' ({exc})") from None
    backend: Backend
    if args.api_base:
        api_key = args.api_key or os.environ.get("WREN_API_KEY") or os.environ.get("OPENAI_API_KEY")
        backend = ApiBackend(args.api_base, api_key=api_key, model=args.served_model)
    else:
        from wren.infer.shared import EngineThread

        # Built and stepped on one thread of its own, not the page's worker threads (wren.infer.shared).
        engine = EngineThread(lambda: open_engine(args, max_batch_size=args.max_batch_size))
        backend = LocalBackend(engine, args.model)
    launch(backend, host=args.host, port=args.port)


def _at_least(minimum: int):
    """An argparse type: an integer >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


def _finish_eval(args: argparse.Namespace, task: str, data: object, summary: dict, text: str) -> None:
    """Print the result (a table, or JSON with --json) and append it to RUN_DIR/evals.jsonl with --save."""
    print(
        json.dumps({"task": task, "model": args.model, "data": data, **summary}, indent=2)
        if args.json
        else text
    )
    if args.save:
        from wren.eval.records import save_record

        path = save_record(args.save, task, args.model, data, summary)
        print(f"saved to {path}", file=sys.stderr)


def _open_for_scoring(args: argparse.Namespace):  # -> (CausalLM, Tokenizer)
    from wren.eval.loading import load_for_scoring
    from wren.infer.load import quantize_loaded

    model, tokenizer = load_for_scoring(args.model, args.device, args.dtype, args.allow_pickle, args.adapter)
    quantize_loaded(model, args.model, args.quantize)
    return model, tokenizer


def _cmd_eval_ppl(args: argparse.Namespace) -> None:
    from wren.eval.perplexity import evaluate_perplexity, format_perplexity

    model, tokenizer = _open_for_scoring(args)
    result = evaluate_perplexity(model, tokenizer, args.data, args.seq_len, args.batch_size, args.limit)
    _finish_eval(args, "ppl", args.data, result.to_dict(), format_perplexity(result))


def _cmd_eval_choice(args: argparse.Namespace) -> None:
    from wren.eval.choice import evaluate_choice, format_choice, limit_per_subject
    from wren.eval.choice_data import read_choice_rows
    from wren.progress import ItemProgress

    rows = read_choice_rows(args.data)
    pool = read_choice_rows(args.shots_data) if args.shots_data else rows
    selected = limit_per_subject(rows, args.limit)
    model, tokenizer = _open_for_scoring(args)
    progress = ItemProgress(len(selected), unit="questions")
    result = evaluate_choice(
        model,
        tokenizer,
        selected,
        shots=args.shots,
        shot_pool=pool,
        batch_size=args.batch_size,
        progress=progress.update,
    )
    progress.close()
    _finish_eval(args, "choice", args.data, result.to_dict(), format_choice(result))


def _cmd_eval_gsm8k(args: argparse.Namespace) -> None:
    from wren.eval.gsm8k import evaluate_gsm8k, format_gsm8k, read_math_rows
    from wren.progress import ItemProgress

    rows = read_math_rows(args.data)[: args.limit]
    pool = read_math_rows(args.shots_data) if args.shots_data else rows
    engine = open_engine(args, max_batch_size=args.batch_size)
    progress = ItemProgress(len(rows), unit="problems")
    result = evaluate_gsm8k(
        engine,
        rows,
        shots=args.shots,
        shot_pool=pool,
        max_new_tokens=args.max_new_tokens,
        chat=not args.plain,
        progress=progress.update,
    )
    progress.close()
    if args.predictions:
        from wren.atomic import atomic_write_text

        lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in result.predictions)
        atomic_write_text(args.predictions, lines)
    _finish_eval(args, "gsm8k", args.data, result.to_dict(), format_gsm8k(result))


def _cmd_eval_report(args: argparse.Namespace) -> None:
    from wren.eval.report import write_report

    path = write_report(
        args.run_dir, args.out, samples=args.samples, sample_tokens=args.sample_tokens, device=args.device
    )
    print(f"report written to {path}")


def _add_eval_options(parser: argparse.ArgumentParser, scoring: bool) -> None:
    """Options every `wren eval` task shares; `scoring` tasks read logits from Wren's model code."""
    if scoring:
        parser.add_argument("model", help="model directory (Llama, Mistral, Qwen2(-MoE), Qwen3(-MoE) shaped)")
        parser.add_argument(
            "--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16 or float16"
        )
        parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: the GPU if there is one)")
        parser.add_argument("--adapter", help="a LoRA adapter directory (PEFT format) merged in at load")
        parser.add_argument("--allow-pickle", action="store_true", help="read .bin/.pth pickle weights")
        parser.add_argument(
            "--quantize", choices=["int8", "int4"], help="score with int8 or int4 weights, as served"
        )
    else:
        add_model_options(parser)
    parser.add_argument(
        "--batch-size", type=_at_least(1), default=8, help="sequences per forward pass (default 8)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--save", metavar="RUN_DIR", help="append the result to RUN_DIR/evals.jsonl for the report"
    )


def _add_eval_verbs(verbs) -> None:
    evaluate = verbs.add_parser("eval", help="evaluate a model (ppl, choice, gsm8k) or report on a run")
    tasks = evaluate.add_subparsers(dest="action", metavar="TASK", required=True)

    ppl = tasks.add_parser(
        "ppl",
        help="loss and bits per byte on text",
        description='Loss (nats per token), perplexity and bits per byte on {"text"} JSONL. Each document '
        "is scored on its own after the end-of-text token (or the tokenizer's BOS); bits per byte = "
        "summed loss / ln 2 / UTF-8 bytes, comparable across tokenizers.",
    )
    _add_eval_options(ppl, scoring=True)
    ppl.add_argument("--data", nargs="+", required=True, help="JSONL files or directories of *.jsonl")
    ppl.add_argument(
        "--seq-len", type=_at_least(1), help="tokens per window (default: the context, at most 2048)"
    )
    ppl.add_argument("--limit", type=_at_least(1), help="score only the first N documents")
    ppl.set_defaults(func=_cmd_eval_ppl)

    choice = tasks.add_parser(
        "choice",
        help="multiple-choice accuracy (MMLU-style)",
        description='Multiple choice on {"subject", "question", "choices", "answer"} JSONL: the model '
        'answers with the answer letter of highest logit after an MMLU prompt ending in "Answer:". '
        "Accuracy per subject and overall.",
    )
    _add_eval_options(choice, scoring=True)
    choice.add_argument("--data", required=True, help="JSONL file of questions")
    choice.add_argument(
        "--shots", type=_at_least(0), default=0, help="solved examples before each question (default 0)"
    )
    choice.add_argument(
        "--shots-data", help="take the examples from this file (e.g. MMLU's dev split; default --data)"
    )
    choice.add_argument("--limit", type=_at_least(1), help="score only the first N questions of each subject")
    choice.set_defaults(func=_cmd_eval_choice)

    gsm8k = tasks.add_parser(
        "gsm8k",
        help="grade-school maths, generated greedily",
        description='GSM8K on {"question", "answer"} JSONL (answers end with "#### N"): greedy replies, '
        "exact match of the number after the reply's last #### (or its last number) with the reference.",
    )
    _add_eval_options(gsm8k, scoring=False)
    gsm8k.add_argument("--data", required=True, help="JSONL file of problems")
    gsm8k.add_argument("--shots", type=_at_least(0), default=0, help="solved examples before each problem")
    gsm8k.add_argument("--shots-data", help="take the examples from this file (default --data)")
    gsm8k.add_argument("--limit", type=_at_least(1), help="solve only the first N problems")
    gsm8k.add_argument(
        "--max-new-tokens", type=_at_least(1), default=256, help="longest reply in tokens (default 256)"
    )
    gsm8k.add_argument(
        "--plain", action="store_true", help='plain "Question: ... Answer:" prompts instead of chat messages'
    )
    gsm8k.add_argument("--predictions", metavar="FILE", help="write every reply and its grade to this JSONL")
    gsm8k.set_defaults(func=_cmd_eval_gsm8k)

    report = tasks.add_parser(
        "report",
        help="a Markdown report card for a training run",
        description="Write a Markdown report of a training run: its settings, loss/bpb/lr curves as PNG "
        "files beside the report (needs the report extra: matplotlib), final validation bits per byte, "
        "results saved with --save, and the final model's greedy replies to three fixed prompts.",
    )
    report.add_argument("run_dir", help="the run's directory (wren train --out)")
    report.add_argument("--out", help="Markdown file to write (default RUN_DIR/report.md)")
    report.add_argument(
        "--samples", action=argparse.BooleanOptionalAction, default=True, help="include sample replies"
    )
    report.add_argument(
        "--sample-tokens", type=_at_least(1), default=64, help="longest sample reply in tokens (default 64)"
    )
    report.add_argument("--device", help="device for the sample replies (default: the GPU if there is one)")
    report.set_defaults(func=_cmd_eval_report)


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

    convert = verbs.add_parser("convert", help="import checkpoints from other projects")
    convert_verbs = convert.add_subparsers(dest="action", metavar="FORMAT", required=True)
    minimind = convert_verbs.add_parser(
        "minimind",
        help="a MiniMind .pth state dict -> a Wren checkpoint",
        description="Convert a MiniMind checkpoint (torch.save(model.state_dict()), dense or MoE) into a "
        "Wren checkpoint (a Hugging Face directory). Shapes come from the tensors; heads, rope base and "
        "norm epsilon from MiniMind's defaults unless set with --set.",
    )
    minimind.add_argument("checkpoint", help="the .pth file (loaded with weights_only=True)")
    minimind.add_argument("--out", required=True, help="checkpoint directory to write")
    minimind.add_argument("--tokenizer", help="MiniMind's tokenizer directory, copied into the output")
    minimind.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"], help="dtype to store (default: the file's)"
    )
    minimind.add_argument(
        "--set",
        type=_parse_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model setting, e.g. --set n_heads=16 --set rope_theta=10000 (repeatable)",
    )
    minimind.set_defaults(func=_cmd_convert_minimind)

    hub = verbs.add_parser("hub", help="download models with checksums, and verify them")
    hub_verbs = hub.add_subparsers(dest="action", metavar="ACTION", required=True)
    hub_download = hub_verbs.add_parser(
        "download",
        help="download a model repository",
        description="Download a model repository from the Hugging Face Hub (or ModelScope), check every "
        "file against the hash the hub publishes, and write DIR/SHA256SUMS.",
    )
    hub_download.add_argument("repo_id", help="e.g. Qwen/Qwen2.5-0.5B-Instruct")
    hub_download.add_argument("--out", required=True, help="directory to download into")
    hub_download.add_argument("--source", choices=["hf", "modelscope"], default="hf", help="default hf")
    hub_download.add_argument("--revision", help="branch, tag or commit (default: the main branch)")
    hub_download.add_argument(
        "--include", action="append", metavar="PATTERN", help='only matching files, e.g. "*.json" (repeat)'
    )
    hub_download.add_argument(
        "--exclude", action="append", metavar="PATTERN", help='skip matching files, e.g. "*.bin" (repeatable)'
    )
    hub_download.set_defaults(func=_cmd_hub_download)
    hub_verify = hub_verbs.add_parser(
        "verify",
        help="re-check a directory against its SHA256SUMS",
        description="Re-hash every file listed in DIR/SHA256SUMS (or --sums FILE) and name each one that "
        "is missing or differs; files present but not listed are reported too. Exits 1 on any problem.",
    )
    hub_verify.add_argument("dir", help="the downloaded directory")
    hub_verify.add_argument("--sums", help="manifest to check against (default DIR/SHA256SUMS)")
    hub_verify.add_argument("--strict", action="store_true", help="unlisted files are problems too")
    hub_verify.set_defaults(func=_cmd_hub_verify)

    export = verbs.add_parser("export", help="export a model for other runtimes (gguf)")
    export_verbs = export.add_subparsers(dest="action", metavar="FORMAT", required=True)
    export_gguf = export_verbs.add_parser(
        "gguf",
        help="a checkpoint -> one GGUF file for llama.cpp / Ollama",
        description="Write a checkpoint (Llama / Qwen2 / Qwen3, Qwen2-MoE or Qwen3-MoE) and its tokenizer as "
        "one GGUF file that llama.cpp, llama-server and Ollama run. Needs the gguf extra. See docs/gguf.md.",
    )
    export_gguf.add_argument("model", help="model directory")
    export_gguf.add_argument("--out", required=True, help="the .gguf file to write")
    export_gguf.add_argument(
        "--type",
        choices=["f32", "f16", "q8_0", "q4_0"],
        default="f16",
        help="weight type: f32, f16 (default), q8_0 or q4_0; norms and biases stay f32",
    )
    export_gguf.add_argument("--allow-pickle", action="store_true", help="read .bin/.pth pickle weights")
    export_gguf.set_defaults(func=_cmd_export_gguf)

    quantize = verbs.add_parser(
        "quantize",
        help="write a checkpoint with int8 or int4 weights",
        description="Store every linear layer of a checkpoint as int8 (one scale per output row) or "
        "int4 (a scale and zero per group of input columns; the output layer int8), with its config "
        "and tokenizer. Every verb loads the result quantised, with no flag; it is not a Hugging Face "
        "checkpoint (transformers, GGUF export and training refuse it). See docs/serving.md.",
    )
    quantize.add_argument("model", help="model directory (Llama, Mistral, Qwen2(-MoE), Qwen3(-MoE) shaped)")
    quantize.add_argument("--bits", type=int, choices=[8, 4], required=True, help="8 or 4")
    quantize.add_argument("--out", required=True, help="checkpoint directory to write")
    quantize.add_argument(
        "--group-size",
        type=int,
        help="input columns per int4 scale: 32 (default), 64, 128 or 256; larger is smaller and less exact",
    )
    quantize.add_argument("--allow-pickle", action="store_true", help="read .bin/.pth pickle weights")
    quantize.set_defaults(func=_cmd_quantize)

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

    chat = verbs.add_parser(
        "chat",
        help="chat with a model in the terminal",
        description="Multi-turn chat, streamed. Commands: /clear, /undo (drop the last round), "
        "/regen (answer again), /exit.",
    )
    add_model_options(chat)
    _add_sampling_options(chat)
    chat.add_argument("--system", help="system prompt")
    chat.add_argument(
        "--show-thinking", action="store_true", help="show <think> reasoning (hidden by default)"
    )
    chat.set_defaults(func=_cmd_chat)

    generate = verbs.add_parser(
        "generate",
        help="generate replies for a JSONL file of prompts",
        description='Batch generation: each input line is {"prompt": ...} or {"messages": [...]}, with '
        "optional per-line sampling fields (temperature, max_tokens, stop, seed ...); the output keeps "
        'the input order and adds "output", "finish_reason" and "usage" to each line.',
    )
    add_model_options(generate)
    _add_sampling_options(generate)
    generate.add_argument("--input", required=True, help="JSONL file of prompts")
    generate.add_argument("--output", required=True, help="JSONL file to write")
    generate.add_argument("--batch-size", type=int, default=32, help="requests decoded together (default 32)")
    generate.set_defaults(func=_cmd_generate)

    serve = verbs.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models), "
        "MiniMind's POST /, /health, /metrics and /tokenize, over the continuous-batching engine. "
        "Needs the serve extra: pip install 'wrenlm[serve]'. See docs/serving.md.",
    )
    add_model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' (default: $WREN_API_KEY, else no key)"
    )
    serve.add_argument("--served-model-name", help="the model id clients send (default: MODEL as given)")
    serve.add_argument(
        "--max-batch-size", type=_at_least(1), default=16, help="requests decoded together (default 16)"
    )
    serve.add_argument(
        "--max-concurrency",
        type=_at_least(1),
        help="requests waiting or running before new ones get 429 (default 8 x --max-batch-size)",
    )
    serve.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], default="info", help="(default info)"
    )
    serve.set_defaults(func=_cmd_serve)

    web = verbs.add_parser(
        "web",
        help="chat with a model in the browser (Gradio)",
        description="A chat page: a local MODEL, or any OpenAI-compatible server with --api-base "
        "(e.g. http://127.0.0.1:8000/v1). Needs the web extra: pip install 'wrenlm[web]'. "
        "See docs/web.md.",
    )
    add_model_options(web, model_required=False)  # --api-base needs no MODEL
    web.add_argument("--api-base", help="an OpenAI-compatible server's base URL instead of a MODEL")
    web.add_argument("--api-key", help="its API key (default: $WREN_API_KEY, else $OPENAI_API_KEY)")
    web.add_argument("--model", dest="served_model", help="the model name to ask the server for")
    web.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    web.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    web.add_argument(
        "--max-batch-size", type=_at_least(1), default=8, help="local replies decoded together (default 8)"
    )
    web.set_defaults(func=_cmd_web)

    _add_eval_verbs(verbs)

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
