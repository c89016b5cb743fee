"""What the server tests share: a tiny chat model that reasons, and `wren serve` in a real process.

The model is trained for a few seconds on two kinds of text: sentences ("the cat sat on the mat
and the dog ran.") and conversations whose replies are `<think>the owl sat on the hill.</think>
the owl is on the hill.` ending with <|im_end|>. Greedy decoding then reasons and stops on its
own in chat, and runs on without stopping after a plain sentence.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ANIMALS = ["cat", "dog", "bird", "fox", "owl", "bee"]
PLACES = ["mat", "hill", "road", "tree", "lake"]
CONTEXT = 256


def _sentence(rng: random.Random) -> str:
    return f"the {rng.choice(ANIMALS)} sat on the {rng.choice(PLACES)} and the {rng.choice(ANIMALS)} ran."


def _conversation(rng: random.Random) -> list[dict[str, str]]:
    animal, place = rng.choice(ANIMALS), rng.choice(PLACES)
    reply = f"<think>the {animal} sat on the {place}.</think>the {animal} is on the {place}."
    return [{"role": "user", "content": f"where is the {animal}?"}, {"role": "assistant", "content": reply}]


def tiny_chat_model(directory: Path, steps: int = 150) -> Path:
    """Build (once per directory) and return a checkpoint directory of the tiny reasoning model."""
    model_dir = directory / "tiny-chat"
    if (model_dir / "config.json").is_file():
        return model_dir
    import torch
    import torch.nn.functional as F

    from wren.checkpoint import save_checkpoint
    from wren.model import CausalLM, preset_config
    from wren.tokenizer import train_tokenizer

    rng = random.Random(0)
    texts = [_sentence(rng) for _ in range(300)]
    conversations = [_conversation(rng) for _ in range(300)]
    corpus = directory / "corpus.jsonl"
    with open(corpus, "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
        for conversation in conversations:
            f.write(json.dumps({"conversations": conversation}) + "\n")
    tokenizer = train_tokenizer([corpus], vocab_size=400)
    documents = [tokenizer.encode(t + " ") for t in texts] + [
        tokenizer.apply_chat_template(c) for c in conversations
    ]
    rng.shuffle(documents)
    stream = torch.tensor([t for document in documents for t in document])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared 2-core machine trains fastest on one thread
    try:
        torch.manual_seed(0)
        config = preset_config(
            "micro", vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
            max_seq_len=CONTEXT,
        )  # fmt: skip
        model = CausalLM(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        generator = torch.Generator().manual_seed(0)
        for _ in range(steps):
            starts = torch.randint(0, len(stream) - 65, (8,), generator=generator).tolist()
            batch = torch.stack([stream[s : s + 65] for s in starts])
            logits = model(batch[:, :-1]).logits
            loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    save_checkpoint(model.eval(), model_dir, tokenizer)
    return model_dir


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """A running `wren serve` process: its base URL, and its log so far."""

    def __init__(self, process: subprocess.Popen, url: str, log: Path, model: Path) -> None:
        self.process = process
        self.model = model
        self.url = url
        self.log = log

    def log_text(self) -> str:
        return _text(self.log)


@contextmanager
def running_wren(
    args: list[str], log: Path, ready_path: str, timeout: float
) -> Iterator[tuple[subprocess.Popen, str]]:
    """`python -m wren ARGS --port P` on a free port, once GET ready_path answers 200; stopped after.
    Yields the process and its base URL; a process that exits or never answers raises with its log."""
    import httpx

    port = free_port()
    # One torch thread: the tests' clients (and browser) need the other core.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "wren", *args, "--port", str(port)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"wren {args[0]} exited with {process.returncode}:\n{_text(log)}")
            try:
                if httpx.get(url + ready_path, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"wren {args[0]} did not answer {ready_path} in {timeout} s:\n{_text(log)}"
                )
            time.sleep(0.1)
        yield process, url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _text(log: Path) -> str:
    return log.read_text(errors="replace")


@contextmanager
def running_server(model: Path, log: Path, *args: str, timeout: float = 90) -> Iterator[Server]:
    """`python -m wren serve MODEL ARGS` on a free port, once /health answers; stopped after."""
    with running_wren(["serve", str(model), *args], log, "/health", timeout) as (process, url):
        yield Server(process, url, log, model)


def metric_value(metrics_text: str, name: str) -> float:
    """The value of an unlabelled sample in Prometheus text."""
    for line in metrics_text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)
