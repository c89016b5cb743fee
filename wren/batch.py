"""`wren generate`: offline batch generation from a JSONL file, the way vLLM's `LLM.generate` works.

Each input line is an object with a `"prompt"` (text) or `"messages"` (a chat, rendered with the
model's template), optionally sampling fields under their OpenAI / vLLM names (`temperature`,
`max_tokens`, `stop`, `seed`...) that override the command line's for that line. Any other field
is carried to the output unchanged, so ids and metadata survive. Every prompt goes to the engine
at once and runs in its continuous batch; the output keeps the input's order and adds `output`,
`finish_reason` and `usage` to each line. It is written atomically when all lines are done.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from wren.atomic import atomic_write_text
from wren.errors import WrenError
from wren.infer.engine import Engine
from wren.infer.request import Request
from wren.infer.sampling import ACCEPTED_KEYS, SamplingParams
from wren.jsonl import iter_jsonl
from wren.progress import ItemProgress


class Item(NamedTuple):
    line: int
    row: dict[str, Any]
    prompt: str | list[dict[str, Any]]
    params: SamplingParams


def read_prompts(path: Path, defaults: SamplingParams) -> list[Item]:
    """Every line of `path` as a prompt with its sampling parameters; errors name file:line."""
    items = []
    for line, row in iter_jsonl(path):
        where = f"{path}:{line}"
        has_prompt, has_messages = "prompt" in row, "messages" in row
        if has_prompt == has_messages:
            raise WrenError(f'{where}: expected exactly one of "prompt" (a string) or "messages" (a chat)')
        if has_prompt and (not isinstance(row["prompt"], str) or not row["prompt"]):
            raise WrenError(f'{where}: "prompt" must be a non-empty string')
        if has_messages and not _is_chat(row["messages"]):
            raise WrenError(f'{where}: "messages" must be a list of {{"role", "content"}} objects')
        try:
            params = defaults.with_overrides({k: v for k, v in row.items() if k in ACCEPTED_KEYS})
        except WrenError as exc:
            raise WrenError(f"{where}: {exc}") from None
        items.append(Item(line, row, row["prompt"] if has_prompt else row["messages"], params))
    if not items:
        raise WrenError(f'{path}: no prompts; expected JSON lines with a "prompt" or "messages"')
    return items


def generate_file(
    engine: Engine, input_path: Path, output_path: Path, defaults: SamplingParams
) -> dict[str, int]:
    """Generate a reply for every line of `input_path` into `output_path`; returns the totals."""
    items = read_prompts(input_path, defaults)
    requests: list[Request] = []
    for item in items:
        try:
            requests.append(engine.submit(item.prompt, item.params))
        except WrenError as exc:
            raise WrenError(f"{input_path}:{item.line}: {exc}") from None
    progress = ItemProgress(len(requests), unit="prompts")
    done = sampled = 0
    while engine.has_work:
        finished = engine.step()
        # Every request still in a slot, and every one that just left, sampled one token.
        sampled += len(finished) + sum(slot is not None for slot in engine.slots)
        done += len(finished)
        progress.update(done, sampled)
    progress.close()

    lines = []
    for item, request in zip(items, requests, strict=True):
        result = request.result
        usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens}
        out = {**item.row, "output": result.text, "finish_reason": result.finish_reason, "usage": usage}
        lines.append(json.dumps(out, ensure_ascii=False) + "\n")
    atomic_write_text(output_path, "".join(lines))
    return {
        "prompts": len(requests),
        "prompt_tokens": sum(r.result.prompt_tokens for r in requests),
        "completion_tokens": sum(r.result.completion_tokens for r in requests),
    }


def _is_chat(messages: Any) -> bool:
    return (
        isinstance(messages, list)
        and bool(messages)
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages)
    )
