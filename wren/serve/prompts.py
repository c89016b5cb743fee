"""From a request body to engine jobs: prompt tokens, the completion budget, sampling parameters.

Everything the engine would refuse is checked here first, so that a bad request gets a 400 before
any response starts, with a message that names the field and the numbers.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from wren.errors import WrenError
from wren.infer.sampling import SamplingParams
from wren.infer.thinking import opens_thinking
from wren.serve.driver import Job
from wren.serve.errors import APIError
from wren.serve.schemas import SAMPLING_FIELDS, ChatMessage, SamplingFields


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as chat templates expect them: string content, system for developer."""
    rendered = []
    for index, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            for part in content:
                if part.type != "text" or part.text is None:
                    raise APIError(
                        400,
                        f"messages.{index}.content: only text parts are supported, got type {part.type!r}",
                        param=f"messages.{index}.content",
                    )
            # Several text parts read as one text, a line apart (as vLLM joins them).
            content = "\n".join(part.text or "" for part in content)
        entry: dict[str, Any] = {
            "role": "system" if message.role == "developer" else message.role,
            "content": content or "",
        }
        if message.reasoning_content:
            entry["reasoning_content"] = message.reasoning_content
        rendered.append(entry)
    return rendered


def encode_chat(
    tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True
) -> tuple[list[int], bool]:
    """Prompt ids of a conversation (with the assistant's generation prompt, by default), and
    whether the prompt already opened a reasoning block (the reply then starts inside `<think>`)."""
    import jinja2

    try:
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except (WrenError, jinja2.TemplateError) as exc:
        raise APIError(400, f"the chat template refused the messages: {exc}", param="messages") from exc
    # The template writes any special tokens itself, so none are added here.
    return list(tokenizer.encode(text, add_special_tokens=False)), opens_thinking(text)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text))


def sampling_params(fields: SamplingFields) -> SamplingParams:
    """The request's sampling parameters, validated (a 400 naming the field when out of range)."""
    try:
        return SamplingParams.from_dict(fields.sampling_values())
    except WrenError as exc:
        message = str(exc)
        name = message.split(" ", 1)[0]
        raise APIError(400, message, param=name if name in SAMPLING_FIELDS else None) from exc


def completion_budget(prompt_tokens: int, requested: int | None, context: int, prompt_field: str) -> int:
    """How many tokens a completion may have. An explicit max_tokens that does not fit beside the
    prompt is an error; without one, the completion may fill the rest of the context."""
    if prompt_tokens == 0:
        raise APIError(400, "the prompt is empty", param=prompt_field)
    if requested is None:
        if prompt_tokens >= context:
            raise APIError(
                400,
                f"the prompt has {prompt_tokens} tokens; this model's context holds {context}, "
                "with room for at least one generated token",
                param=prompt_field,
                code="context_length_exceeded",
            )
        return context - prompt_tokens
    if prompt_tokens + requested > context:
        raise APIError(
            400,
            f"this model's context holds {context} tokens, but the request needs "
            f"{prompt_tokens + requested}: {prompt_tokens} in the prompt and {requested} for the "
            "completion (max_tokens); shorten the prompt or lower max_tokens",
            param=prompt_field,
            code="context_length_exceeded",
        )
    return requested


def plan_jobs(
    prompts: list[list[int]], fields: SamplingFields, n: int, context: int, prompt_field: str
) -> list[Job]:
    """n jobs per prompt, in OpenAI's choice order (prompt by prompt, then choice by choice).

    With a seed, choice i draws from seed XOR i: choices differ from each other, choice 0 is what
    the same seed gives alone, and every derived seed stays in the seed's range.
    """
    base = sampling_params(fields)
    jobs = []
    for ids in prompts:
        budget = completion_budget(len(ids), fields.requested_max_tokens, context, prompt_field)
        for choice in range(n):
            seed = None if base.seed is None else base.seed ^ choice
            jobs.append(Job(ids, replace(base, max_new_tokens=budget, seed=seed)))
    return jobs
