"""`wren quickstart`: the whole path from text to a chat model, offline, in minutes on a laptop CPU.

demo corpus (or --data) -> tokenizer -> micro model pretraining -> SFT -> sample replies.
Every stage is the same library call the individual `wren` verbs make.
"""

from __future__ import annotations

import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from wren.data.formats import detect_kind, expand_paths
from wren.errors import WrenError
from wren.jsonl import iter_jsonl


@dataclass
class QuickstartPlan:
    pretrain_steps: int = 300
    sft_steps: int = 150
    seq_len: int = 256
    batch_size: int = 16
    vocab_size: int | None = None  # None: 2048 for the demo corpus, 6400 (MiniMind's) for --data
    max_demo_mb: float = 2.0


DEMO_PROMPTS = [
    "Who are you?",
    "What does the `zip` function do?",
    "Explain the `with` statement in Python.",
]
GENERAL_PROMPTS = ["Who are you?", "Hello! What can you do?", "Tell me a short story."]
# Written into the output directory so a second quickstart knows it may replace the first one's
# runs, and never deletes a directory it did not make.
MARKER = ".wren-quickstart"


def _classify(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """Split files into pretraining and SFT by the kind of their first row; others are ignored."""
    pretrain, sft = [], []
    for path in paths:
        kind = next((detect_kind(row) for _, row in iter_jsonl(path)), None)
        if kind == "pretrain":
            pretrain.append(path)
        elif kind == "sft":
            sft.append(path)
        else:
            print(f'ignoring {path}: its rows are neither {{"text"}} nor {{"conversations"}}')
    return pretrain, sft


def _claim_output(out: Path) -> None:
    """Make `out` ours: new, empty, or left by an earlier quickstart (whose runs are replaced)."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise WrenError(f"{out}: exists and was not written by wren quickstart; choose another --out")
    for stage in ("data", "tokenizer", "pretrain", "sft"):
        shutil.rmtree(out / stage, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by wren quickstart; rerunning it replaces this directory's runs\n")


def _stage(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def run_quickstart(
    out_dir: str | Path, data_dir: str | Path | None = None, plan: QuickstartPlan | None = None
) -> Path:
    """Run every stage into `out_dir`; returns the chat model's directory."""
    from wren.data.demo import write_demo_corpus
    from wren.tokenizer import train_tokenizer
    from wren.train.config import resolve_config
    from wren.train.loop import Trainer

    plan = plan or QuickstartPlan()
    out = Path(out_dir)
    started = time.perf_counter()
    _claim_output(out)

    t = _stage("1/5 data")
    if data_dir is None:
        files = write_demo_corpus(out / "data", max_mb=plan.max_demo_mb)
        pretrain_files, sft_files = [files["pretrain"]], [files["sft"]]
        print(f"demo corpus from Python's bundled documentation in {out / 'data'}")
    else:
        pretrain_files, sft_files = _classify(expand_paths([Path(data_dir)]))
        if not pretrain_files or not sft_files:
            raise WrenError(
                f'{data_dir}: expected JSONL files of both {{"text"}} rows (pretraining) and '
                f'{{"conversations"}} rows (SFT); found {len(pretrain_files)} and {len(sft_files)}'
            )
        print(f"pretraining: {', '.join(map(str, pretrain_files))}\nSFT: {', '.join(map(str, sft_files))}")
    print(f"({time.perf_counter() - t:.1f}s)")

    t = _stage("2/5 tokenizer")
    vocab_size = plan.vocab_size or (2048 if data_dir is None else 6400)
    tokenizer = train_tokenizer(pretrain_files + sft_files, vocab_size=vocab_size)
    tokenizer.save(out / "tokenizer")
    print(f"{tokenizer.vocab_size:,} tokens -> {out / 'tokenizer'} ({time.perf_counter() - t:.1f}s)")

    common = dict(
        seq_len=plan.seq_len,
        batch_size=plan.batch_size,
        eval_batches=8,
        logger="none",
        log_every=25,
        device="auto",
    )
    t = _stage("3/5 pretraining (micro preset)")
    pretrain = resolve_config(
        objective="pretrain",
        data=[str(p) for p in pretrain_files],
        preset="micro",
        tokenizer=str(out / "tokenizer"),
        out_dir=str(out / "pretrain"),
        max_steps=plan.pretrain_steps,
        lr=3e-3,
        warmup_steps=max(plan.pretrain_steps // 20, 1),
        eval_every=plan.pretrain_steps,
        save_every=plan.pretrain_steps,
        **common,
    )
    Trainer(pretrain).run()
    print(f"({time.perf_counter() - t:.1f}s)")

    t = _stage("4/5 supervised fine-tuning")
    sft = resolve_config(
        objective="sft",
        data=[str(p) for p in sft_files],
        init=str(out / "pretrain" / "final"),
        out_dir=str(out / "sft"),
        max_steps=plan.sft_steps,
        lr=1e-3,
        warmup_steps=max(plan.sft_steps // 20, 1),
        eval_every=plan.sft_steps,
        save_every=plan.sft_steps,
        **common,
    )
    model_dir = Trainer(sft).run()
    print(f"({time.perf_counter() - t:.1f}s)")

    _stage("5/5 sample replies (greedy)")
    for prompt, reply in sample_replies(model_dir, DEMO_PROMPTS if data_dir is None else GENERAL_PROMPTS):
        print(f"user: {prompt}\nwren: {reply}\n")
    print(f"quickstart finished in {time.perf_counter() - started:.0f}s. Your chat model: {model_dir}")
    return model_dir


def _double_quoted(text: str) -> str:
    """Shell-quote with double quotes when that needs no escaping: easier to read and edit."""
    return f'"{text}"' if not any(c in text for c in '"$`\\!') else shlex.quote(text)


def next_steps(model_dir: Path, wren: str = "wren") -> str:
    """The commands to use the model just trained, ready to paste."""
    where = shlex.quote(str(model_dir))
    ask = (
        "from transformers import pipeline; "
        f"chat = pipeline('text-generation', {str(model_dir)!r}); "
        "print(chat([{'role': 'user', 'content': 'Who are you?'}], max_new_tokens=40, do_sample=False)"
        "[0]['generated_text'][-1]['content'])"
    )
    return "\n".join(
        [
            "next:",
            f"  {wren} model info {where}                  # what was trained",
            f"  {wren} train sft --init {where} --data YOUR_CONVERSATIONS.jsonl --out runs/my-sft",
            "  # chat with it through transformers (pip install -e '.[hf]'): it is a stock Llama checkpoint",
            f"  python -c {_double_quoted(ask)}",
        ]
    )


def sample_replies(model_dir: Path, prompts: list[str], max_new_tokens: int = 64) -> list[tuple[str, str]]:
    from wren.checkpoint import load_model
    from wren.infer.generate import generate_ids
    from wren.tokenizer import Tokenizer

    model, tokenizer = load_model(model_dir), Tokenizer.load(model_dir)
    replies = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        new = generate_ids(model, ids, max_new_tokens, stop_ids=tokenizer.stop_token_ids)
        replies.append((prompt, tokenizer.decode(new, skip_special_tokens=True).strip()))
    return replies
