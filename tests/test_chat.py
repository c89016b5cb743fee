"""`wren chat` and `wren generate` in real processes: a piped and a pseudo-terminal conversation
with /undo, /regen and /clear, hidden and shown reasoning, and batch generation from JSONL."""

import json
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest
from helpers import build_chat_model, wren

from wren.infer.load import load_engine
from wren.infer.sampling import SamplingParams

STATS = re.compile(r"\[prompt (\d+) tokens · reply (\d+) tokens · [\d.]+ tokens/s")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return build_chat_model(tmp_path_factory.mktemp("chat"))


def chat(model, lines: list[str], *flags) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wren", "chat", str(model), "--temperature", "0", *flags],
        input="".join(line + "\n" for line in lines),
        capture_output=True,
        text=True,
        timeout=120,
    )


def prompt_sizes(stderr: str) -> list[int]:
    return [int(m.group(1)) for m in STATS.finditer(stderr)]


def replies(stdout: str) -> list[str]:
    """The replies in a piped chat's stdout: the text between one "> " prompt and the next."""
    return [part.strip() for part in stdout.split("> ") if part.strip()]


def test_piped_chat_with_undo_regen_and_clear(chat_model):
    first, second = "What is 3 plus 4?", "What is 5 plus 1?"
    run = chat(chat_model, [first, second, "/undo", second, "/regen", "/clear", first, "/exit", "never read"])
    assert run.returncode == 0, run.stderr
    sizes = prompt_sizes(run.stderr)
    # Turn 2 carries turn 1; after /undo the same question has the same history again; /regen
    # re-asks it on that history; after /clear the first question stands alone again.
    assert len(sizes) == 5
    assert sizes[1] > sizes[0] and sizes[2] == sizes[1] and sizes[3] == sizes[1] and sizes[4] == sizes[0]
    assert "(last round dropped; 1 left)" in run.stderr and "(conversation cleared)" in run.stderr
    answers = replies(run.stdout)
    assert len(answers) == 5 and all(" plus " in a for a in answers)
    assert answers[1] == answers[2] == answers[3]  # greedy: same history, same reply
    assert answers[0] == answers[4]


def test_system_prompt_and_edge_commands(chat_model):
    run = chat(chat_model, ["/undo", "/regen", "/nope", "What is 1 plus 1?"], "--system", "You add numbers.")
    assert run.returncode == 0, run.stderr  # end of input leaves like /exit
    assert "(nothing to undo)" in run.stderr and "(nothing to regenerate yet)" in run.stderr
    assert "unknown command /nope" in run.stderr
    alone = chat(chat_model, ["What is 1 plus 1?"])
    assert prompt_sizes(run.stderr)[0] > prompt_sizes(alone.stderr)[0]


def test_reasoning_is_hidden_unless_asked(tmp_path):
    model = build_chat_model(tmp_path, thinking=True)
    hidden = chat(model, ["What is 3 plus 4?", "What is 2 plus 2?"])
    assert hidden.returncode == 0, hidden.stderr
    assert " plus " in hidden.stdout and "adding" not in hidden.stdout and "think>" not in hidden.stdout
    assert "reasoning hidden" in hidden.stderr
    shown = chat(model, ["What is 3 plus 4?"], "--show-thinking")
    assert "(thinking) adding the numbers" in shown.stdout and "(answer) " in shown.stdout
    assert "think>" not in shown.stdout


def read_until(fd: int, marker: bytes, timeout: float = 60) -> bytes:
    seen = b""
    deadline = time.time() + timeout
    while marker not in seen:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.time(), 0))
        if not ready:
            raise AssertionError(f"no {marker!r} in {seen!r}")
        seen += os.read(fd, 4096)
    return seen


def test_chat_in_a_pseudo_terminal(chat_model):
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "wren", "chat", str(chat_model), "--temperature", "0"],
        stdin=terminal, stdout=terminal, stderr=terminal, close_fds=True,
    )  # fmt: skip
    os.close(terminal)
    try:
        read_until(controller, b"> ")
        os.write(controller, b"What is 3 plus 4?\r")
        first = read_until(controller, b"> ").decode()
        assert " plus " in first and STATS.search(first)
        os.write(controller, b"/undo\r")
        assert b"(last round dropped; 0 left)" in read_until(controller, b"> ")
        os.write(controller, b"What is 3 plus 4?\r")
        again = read_until(controller, b"> ").decode()
        assert STATS.search(again).group(1) == STATS.search(first).group(1)
        os.write(controller, b"\x04")  # Ctrl-D leaves
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        os.close(controller)


# -- wren generate ---------------------------------------------------------------------------------


def test_generate_keeps_order_and_per_line_settings(chat_model, tmp_path):
    questions = [f"What is {a} plus {b}?" for a, b in [(3, 4), (9, 8), (0, 1), (6, 2), (5, 5)]]
    rows = [{"id": i, "messages": [{"role": "user", "content": q}]} for i, q in enumerate(questions)]
    rows[1]["max_tokens"] = 2  # cut short: finish_reason "length"
    rows[2] = {"prompt": "What is 2 plus", "tag": ["kept"]}
    rows[3]["stop"] = " is"
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = wren("generate", chat_model, "--input", tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl",
               "--temperature", "0", "--batch-size", "3")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "5 replies" in run.stdout and "5/5 prompts" in run.stderr
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [
        {k: v for k, v in o.items() if k not in ("output", "finish_reason", "usage")} for o in out
    ] == rows

    engine = load_engine(chat_model, max_batch_size=1)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=512)
    alone = [engine.generate([r.get("messages") or r["prompt"]], greedy)[0] for r in rows]
    for i in (0, 2, 4):
        assert out[i]["output"] == alone[i].text and out[i]["finish_reason"] == "stop"
        assert out[i]["usage"] == {
            "prompt_tokens": alone[i].prompt_tokens,
            "completion_tokens": alone[i].completion_tokens,
        }
    assert out[1]["finish_reason"] == "length" and out[1]["usage"]["completion_tokens"] == 2
    assert alone[3].text.startswith(out[3]["output"] + " is") and out[3]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "hi"}', 'in.jsonl:2: expected exactly one of "prompt"'),
        ('{"prompt": "hi", "temperature": -1}', "in.jsonl:2: temperature must be >= 0"),
        ('{"messages": "hi"}', 'in.jsonl:2: "messages" must be a list'),
        ('{"prompt": "hi"', "in.jsonl:2: "),
    ],
)
def test_generate_names_the_bad_line(chat_model, tmp_path, line, message):
    (tmp_path / "in.jsonl").write_text('{"prompt": "What is"}\n' + line + "\n")
    run = wren("generate", chat_model, "--input", tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl")
    assert run.returncode == 2 and message in run.stderr
    assert not (tmp_path / "out.jsonl").exists()
