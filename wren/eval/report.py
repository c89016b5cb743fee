"""`wren eval report`: a Markdown report card for a training run.

Sections: the run (its settings), training curves (PNG files written beside the report), the
final validation loss and bits per byte, evaluations saved with `--save` (evals.jsonl), and the
final model's greedy replies to three fixed prompts. Every file is written atomically, the
Markdown last, so a report never points at a missing image.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from wren.atomic import atomic_write_bytes, atomic_write_text
from wren.eval.records import EVALS_FILE, read_records
from wren.eval.run_dir import Curve, final_model, is_adapter, read_curves, read_train_config

CHAT_PROMPTS = (
    "Hello! Who are you?",
    "What is 12 plus 7?",
    "Write one sentence about the sea.",
)
# A pretrained model has never seen the chat template: it is shown continuing plain text.
TEXT_PROMPTS = ("Once upon a time", "The most important thing about learning is", "1, 2, 3, 4,")

# (file suffix, title, y label, {curve label: metric name})
_PLOTS = (
    ("loss", "Loss", "nats per token", {"train": "train/loss", "validation": "val/loss"}),
    ("bpb", "Validation bits per byte", "bits per byte", {"validation": "val/bpb"}),
    ("lr", "Learning rate", "learning rate", {"lr": "train/lr"}),
)
_KEY_SETTINGS = (
    "objective", "data", "init", "preset", "tokenizer", "model_overrides", "seq_len", "batch_size",
    "grad_accum", "max_steps", "lr", "schedule", "warmup_steps", "weight_decay", "val_fraction", "seed",
)  # fmt: skip


def write_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    samples: bool = True,
    sample_tokens: int = 64,
    device: str | None = None,
) -> Path:
    """Write the report (default RUN_DIR/report.md) and its plots; returns the report's path."""
    run_dir = Path(run_dir)
    config = read_train_config(run_dir)
    out = Path(out) if out is not None else run_dir / "report.md"
    curves = read_curves(run_dir)
    model = final_model(run_dir)
    sections = [
        f"# Report card: {run_dir.name}\n\n"
        f"Run directory `{run_dir}`, reported {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.",
        _settings_section(config, model),
        _curves_section(curves, out),
        _validation_section(curves, config),
        _evals_section(run_dir),
    ]
    if samples:
        sections.append(_samples_section(config, model, sample_tokens, device))
    atomic_write_text(out, "\n\n".join(sections) + "\n")
    return out


# -- sections ----------------------------------------------------------------------------------


def _settings_section(config: dict[str, Any], model: Path | None) -> str:
    rows = [(key, _show(config[key])) for key in _KEY_SETTINGS if config.get(key) not in (None, [], {})]
    if model is not None:
        rows.append(("model", f"`{model}`" + _size(model)))
    table = _markdown_table(("setting", "value"), rows)
    full = json.dumps(config, indent=2, ensure_ascii=False)
    details = f"<details><summary>All settings</summary>\n\n{_fenced(full, 'json')}\n\n</details>"
    return f"## Run\n\n{table}\n\n{details}"


def _size(model: Path) -> str:
    if is_adapter(model):
        return " (LoRA adapter)"
    from wren.checkpoint.info import describe_checkpoint

    info = describe_checkpoint(model)
    return f" ({info['architecture']}, {info['parameters'] / 1e6:.2f}M parameters)"


def _curves_section(curves: dict[str, Curve], out: Path) -> str:
    if not curves:
        return "## Training curves\n\nNo metrics.jsonl in the run directory."
    from wren.eval.plots import curves_png

    images = []
    for suffix, title, ylabel, wanted in _PLOTS:
        shown = {label: curves[name] for label, name in wanted.items() if curves.get(name)}
        if not shown:
            continue
        name = f"{out.stem}-{suffix}.png"
        atomic_write_bytes(out.parent / name, curves_png(shown, title, ylabel))
        images.append(f"![{title}]({name})")
    last = [
        (name, f"{points[-1][1]:.4g}", points[-1][0])
        for name, points in sorted(curves.items())
        if name.startswith(("train/loss", "train/lr", "val/"))
    ]
    table = _markdown_table(("metric", "last value", "at step"), last)
    return "## Training curves\n\n" + "\n\n".join([*images, table])


def _validation_section(curves: dict[str, Curve], config: dict[str, Any]) -> str:
    bpb, loss = curves.get("val/bpb"), curves.get("val/loss")
    if not bpb and not loss:
        why = " (val_fraction is 0)" if config.get("val_fraction") == 0 else ""
        return f"## Validation\n\nNo validation metrics were logged{why}."
    parts = []
    if bpb:
        parts.append(f"Final validation bits per byte: **{bpb[-1][1]:.4f}** (step {bpb[-1][0]}).")
    if loss:
        parts.append(f"Final validation loss: {loss[-1][1]:.4f} nats per token (step {loss[-1][0]}).")
    return "## Validation\n\n" + " ".join(parts)


def _evals_section(run_dir: Path) -> str:
    records = read_records(run_dir)
    if not records:
        return (
            "## Evaluations\n\nNone saved yet: `wren eval ppl|choice|gsm8k MODEL --data FILE "
            f"--save {run_dir}` adds results here (kept in {EVALS_FILE})."
        )
    rows = [
        (
            record.get("time", ""),
            record.get("task", "?"),
            _show(record.get("data", "")),
            f"`{record.get('model', '')}`",
            _headline(record),
        )
        for record in records
    ]
    return "## Evaluations\n\n" + _markdown_table(("when", "task", "data", "model", "result"), rows)


def _headline(record: dict[str, Any]) -> str:
    task = record.get("task")
    try:
        if task == "ppl":
            return (
                f"loss {record['loss']:.4f}, **{record['bits_per_byte']:.4f} bits/byte** "
                f"({record['documents']:,} documents)"
            )
        if task in ("choice", "gsm8k"):
            return f"**{100 * record['accuracy']:.1f}%** of {record['rows']:,} ({record['shots']}-shot)"
    except (KeyError, TypeError, ValueError):
        pass
    return "(unrecognised record)"


def _samples_section(
    config: dict[str, Any], model: Path | None, max_new_tokens: int, device: str | None
) -> str:
    if model is None:
        return "## Sample replies\n\nNo checkpoint in the run directory yet."
    from wren.infer.load import load_engine
    from wren.infer.sampling import SamplingParams

    if is_adapter(model):
        engine = load_engine(config["init"], adapter=model, device=device, max_batch_size=3)
    else:
        engine = load_engine(model, device=device, max_batch_size=3)
    as_text = config.get("objective") == "pretrain"
    prompts = TEXT_PROMPTS if as_text else CHAT_PROMPTS
    requests = [p if as_text else [{"role": "user", "content": p}] for p in prompts]
    results = engine.generate(requests, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
    kind = "continuations of plain text" if as_text else "replies to a one-message chat"
    parts = [f"## Sample replies\n\nGreedy {kind}, at most {max_new_tokens} tokens, from `{model}`."]
    for prompt, result in zip(prompts, results, strict=True):
        parts.append(f"**Prompt:** {prompt}\n\n{_fenced(result.text, 'text')}")
    return "\n\n".join(parts)


# -- Markdown ----------------------------------------------------------------------------------


def _show(value: Any) -> str:
    if isinstance(value, (list, dict)):
        return _cell(json.dumps(value, ensure_ascii=False))
    return _cell(str(value))


def _cell(text: str) -> str:
    # A table cell must stay on one line and must not close the cell early.
    return text.replace("\n", " ").replace("|", "\\|")


def _markdown_table(headers: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _fenced(text: str, language: str) -> str:
    """A code block whose fence is longer than any run of backticks inside the text."""
    longest, run = 0, 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"
