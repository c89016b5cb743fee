"""Conversations to token ids, with a loss mask over what the assistant says.

The mask is found without knowing the template: assistant message i's reply is the text that
rendering `messages[:i+1]` adds to rendering `messages[:i]` with the generation prompt. That
holds for any template in which a conversation's rendering begins with the rendering of each of
its prefixes (ChatML, Llama 3, Mistral, Qwen 2.5...). Templates that rewrite earlier turns (Qwen 3
drops old <think> blocks) are refused rather than masked wrongly.
"""

from __future__ import annotations

from typing import Any

from wren.errors import WrenError
from wren.tokenizer import ENDOFTEXT, Tokenizer


def encode_conversation(tokenizer: Tokenizer, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """(ids, mask) of the conversation rendered with the tokenizer's chat template.

    mask is 1 on the tokens of every assistant reply including the token that closes it
    (`<|im_end|>` in ChatML), so the model learns to stop; 0 on system and user text and on the
    role headers. The whitespace a template writes after a reply's end token (ChatML's newline) is
    left out: generation stops at the end token, so the model never produces it. A token belongs
    to a reply when it starts inside the reply's text. An assistant message that opens the
    conversation answers nothing and stays 0.
    """
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for index, message in enumerate(messages):
        # A conversation that opens with an assistant message (some datasets put the system
        # prompt there) gives it nothing to answer: it is context, not trained on.
        if message.get("role") != "assistant" or index == 0:
            continue
        before = tokenizer.apply_chat_template(messages[:index], add_generation_prompt=True, tokenize=False)
        through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise WrenError(
                "the chat template is not prefix-stable (rendering the first messages of a conversation "
                "is not the start of rendering all of it), so assistant replies cannot be located for "
                "the loss mask; expected a template such as ChatML"
            )
        spans.append((len(before), len(before) + len(through[len(before) :].rstrip())))
    encoding = tokenizer.backend.encode(full, add_special_tokens=False)
    mask = [0] * len(encoding.ids)
    span = 0
    for position, (start, _) in enumerate(encoding.offsets):
        # Offsets rise through the text, so one pass over tokens and spans together suffices.
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        if span < len(spans) and start >= spans[span][0]:
            mask[position] = 1
    return encoding.ids, mask


def end_of_text_id(tokenizer: Tokenizer) -> int:
    """The token that ends each pretraining document: <|endoftext|>, or the tokenizer's eos."""
    token_id = tokenizer.token_to_id(ENDOFTEXT)
    return tokenizer.eos_token_id if token_id is None else token_id
