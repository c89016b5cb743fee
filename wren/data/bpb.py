"""Bytes per token, for bits per byte: a loss that does not depend on the tokenizer.

bits per byte = (sum of the target tokens' losses in nats) / (ln 2 * bytes those tokens stand for).
"""

from __future__ import annotations

import json
import re

import numpy as np
import torch
from tokenizers import pre_tokenizers

from wren.tokenizer import Tokenizer

IGNORE_INDEX = -100
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SENTENCEPIECE_SPACE = "\u2581"


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """int64 array: for each token id, how many bytes of UTF-8 text it stands for.

    Byte-level BPE vocabularies (GPT-2, Wren, Qwen, Llama 3) spell each byte as one character, so
    a token's length in characters is its length in bytes, and a token holding part of a
    multi-byte character counts just its part: the table summed over a text's ids equals the
    text's UTF-8 size exactly. Special tokens (<|endoftext|>, <|im_end|>...) stand for no text and
    count 0. Other vocabularies (SentencePiece) are counted from their token strings, with
    <0xNN> byte tokens as 1 byte; that is exact except for the space some prepend to a text.
    """
    backend = tokenizer.backend
    lengths = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    byte_level = "ByteLevel" in json.dumps(json.loads(backend.to_str()).get("decoder"))
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    for token, token_id in backend.get_vocab(with_added_tokens=False).items():
        if byte_level and alphabet.issuperset(token):
            lengths[token_id] = len(token)
        elif _BYTE_FALLBACK.fullmatch(token):
            lengths[token_id] = 1
        else:
            lengths[token_id] = len(token.replace(_SENTENCEPIECE_SPACE, " ").encode("utf-8"))
    for token_id, added in backend.get_added_tokens_decoder().items():
        # Non-special added tokens (<think>) are decoded as the text they spell.
        lengths[token_id] = 0 if added.special else len(added.content.encode("utf-8"))
    return lengths


def target_bytes(byte_lengths: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Total bytes of the target tokens, skipping ignored (-100) positions; stays on the device."""
    valid = targets != IGNORE_INDEX
    return (byte_lengths[targets.clamp(min=0)] * valid).sum()
