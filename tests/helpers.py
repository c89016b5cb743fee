"""What the test files share: running `wren` in a real process, reading a run's metrics.jsonl,
killing a run part-way with SIGKILL, the tiny model the training tests use, and generated data.

Test files import it as `from helpers import ...`: pytest's default import mode puts the tests
directory on sys.path."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # beside the checkout, if at all

TINY_MODEL_SETTINGS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2}


def set_flags(settings: dict[str, Any]) -> list[str]:
    """Model settings as the command line takes them: --set key=value, one pair per setting."""
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


TINY_MODEL_FLAGS = set_flags(TINY_MODEL_SETTINGS)


def stderr_tail(result: subprocess.CompletedProcess, chars: int = 3000) -> str:
    """The end of a process's stderr for an assertion message, without warnings (each a
    "...Warning: ..." line and the source line after it), which can fill it and hide the error."""
    kept, skip_next = [], False
    for line in result.stderr.splitlines():
        if "Warning: " in line:
            skip_next = True
        elif skip_next and line.startswith("  "):
            skip_next = False
        else:
            kept.append(line)
            skip_next = False
    return "\n".join(kept)[-chars:]


def wren(*args, timeout=300, env=None) -> subprocess.CompletedProcess:
    """`python -m wren ARGS` in a new process, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "wren", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def wren_on_two_processes(*args, timeout=300) -> subprocess.CompletedProcess:
    """`wren ARGS` under torchrun on two local processes, one thread each."""
    # --standalone picks a free port, so concurrent test runs cannot collide.
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "wren", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def metric_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Every complete line of a run's metrics.jsonl, in order. A last line without its newline is
    one being written as we read (or cut off by SIGKILL): it is left out."""
    lines = (run_dir / "metrics.jsonl").read_text().split("\n")
    return [json.loads(line) for line in lines[:-1]]  # after the last "\n": "" or a partial line


def rows_by_step(run_dir: Path) -> dict[int, dict[str, Any]]:
    """step -> its logged metrics; a re-run step (after resume) keeps its last values."""
    return {row["step"]: row for row in metric_rows(run_dir)}


def metric(run_dir: Path, name: str) -> dict[int, float]:
    """step -> one logged metric; a re-run step (after resume) keeps its last value."""
    return {row["step"]: row[name] for row in metric_rows(run_dir)}


def losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss; a re-run step (after resume) keeps its last value."""
    return metric(run_dir, "train/loss")


def kill_after_step(args: list, run_dir: Path, step: int, timeout: float = 240) -> int:
    """Start `wren ARGS`, SIGKILL it once run_dir/metrics.jsonl has logged `step` (or after
    `timeout` seconds), and return the last step it logged. A test kills a run after a
    checkpoint and checks the returned step is below --max-steps: the run had not finished."""
    process = subprocess.Popen(
        [sys.executable, "-m", "wren", *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    metrics = run_dir / "metrics.jsonl"
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and process.poll() is None:
            if metrics.is_file() and max(rows_by_step(run_dir), default=0) >= step:
                break
            time.sleep(0.02)
    finally:
        process.kill()  # SIGKILL; nothing is sent to a process that has already exited and been reaped
        process.wait()
    return max(rows_by_step(run_dir))


def addition_conversations(count: int) -> list[dict[str, Any]]:
    """SFT rows "What is a plus b?" -> "a plus b is a + b.", for every a and b below count."""
    return [
        {
            "conversations": [
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
            ]
        }
        for a in range(count)
        for b in range(count)
    ]


def build_chat_model(
    directory: Path, steps: int = 150, thinking: bool = False, settings: dict[str, Any] | None = None
) -> Path:
    """A tiny chat model that has learnt the addition conversations, saved as a Wren checkpoint
    (with its tokenizer) in `directory`. A few seconds on a CPU; greedy replies are real text
    ("3 plus 4 is 7.") that stop at <|im_end|>, so chat, generation and serving tests see
    multi-token answers and proper stops. With `thinking`, every reply first reasons inside
    <think>...</think> ("adding the numbers"), as a reasoning model does. `settings` override
    model settings (e.g. {"qkv_bias": True} for a Qwen2-shaped model)."""
    import torch
    import torch.nn.functional as F

    from wren.checkpoint import save_checkpoint
    from wren.model import CausalLM, preset_config
    from wren.tokenizer import train_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    rows = addition_conversations(10)
    if thinking:
        for row in rows:
            reply = row["conversations"][1]
            reply["content"] = f"<think>adding the numbers</think>{reply['content']}"
    corpus = directory / "conversations.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": c["content"]}) + "\n" for r in rows for c in r["conversations"])
    )
    tokenizer = train_tokenizer([corpus], vocab_size=300)
    stream = torch.tensor(
        [
            t
            for r in rows
            for t in [*tokenizer.apply_chat_template(r["conversations"]), tokenizer.eos_token_id]
        ]
    )
    torch.manual_seed(0)
    config = preset_config(
        "micro",
        vocab_size=tokenizer.vocab_size,
        max_seq_len=256,
        **{**TINY_MODEL_SETTINGS, **(settings or {})},
    )
    model = CausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    generator = torch.Generator().manual_seed(0)
    seq = 64
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - seq - 1, (16,), generator=generator).tolist()
        batch = torch.stack([stream[s : s + seq + 1] for s in starts])
        loss = F.cross_entropy(model(batch[:, :-1]).logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_checkpoint(model.eval(), directory / "model", tokenizer)
