"""`wren eval ppl`: loss and bits per byte of a model on pretraining-format text.

Scoring rule (lm-evaluation-harness's rolling log-likelihood):
- each document is scored on its own, after the document prefix (`loading.document_prefix`), so
  its first token is predicted too and no document sees another; the result does not depend on
  the order of the documents or on the batch size;
- a document longer than `seq_len` is cut into consecutive windows that each predict up to
  `seq_len` new tokens; a later window sees only the token before it as context;
- every text token is scored; no end-of-text token is added after the text, so the sum of the
  losses is -log p(text), which is what makes bits per byte comparable across tokenizers:
  bits per byte = (sum of the losses in nats) / ln 2 / (UTF-8 bytes of the texts).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F

from wren.data.formats import iter_rows
from wren.eval.loading import document_prefix
from wren.eval.tables import format_table
from wren.model import CausalLM
from wren.tokenizer import Tokenizer

IGNORE_INDEX = -100
DEFAULT_MAX_SEQ_LEN = 2048
# Documents tokenised and scored together; windows within a group are sorted by length to pad little.
_DOCUMENTS_PER_GROUP = 512


@dataclass
class PerplexityResult:
    documents: int
    tokens: int  # scored tokens
    bytes: int  # UTF-8 bytes of the scored texts
    nll: float  # summed loss, nats
    seq_len: int

    @property
    def loss(self) -> float:
        """Mean loss per token, in nats."""
        return self.nll / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))  # exp overflows past ~709

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / max(self.bytes, 1)

    def to_dict(self) -> dict[str, float | int]:
        return {
            **asdict(self),
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
        }


def document_windows(
    ids: Sequence[int], prefix: Sequence[int], seq_len: int
) -> list[tuple[list[int], list[int]]]:
    """(input ids, targets) windows that predict every token of `ids` exactly once.

    The first window starts at the prefix; each later one starts at the token before its first
    target. Targets are IGNORE_INDEX where a prediction is not scored (the prefix's own tokens).
    No window's input is longer than `seq_len`.
    """
    if seq_len < 1:
        raise ValueError("seq_len must be >= 1")
    if not ids:
        return []
    sequence = [*prefix, *ids]
    n, first_scored = len(sequence), len(prefix)
    end = min(n - 1, max(seq_len, first_scored))  # the first window's input: sequence[0:end]
    targets = sequence[1 : end + 1]
    targets = [IGNORE_INDEX if i + 1 < first_scored else t for i, t in enumerate(targets)]
    windows = [(sequence[:end], targets)]
    start = end + 1  # the next token to predict
    while start < n:
        stop = min(start + seq_len, n)
        windows.append((sequence[start - 1 : stop - 1], sequence[start:stop]))
        start = stop
    return windows


def _padded(windows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Padding on the right: causal attention keeps the real positions from seeing it.
    width = max(len(ids) for ids, _ in windows)
    inputs = torch.full((len(windows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(windows), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, tgt) in enumerate(windows):
        inputs[row, : len(ids)] = torch.tensor(ids)
        targets[row, : len(tgt)] = torch.tensor(tgt)
    return inputs, targets


def _groups(texts: Iterator[str], size: int) -> Iterator[list[str]]:
    group: list[str] = []
    for text in texts:
        group.append(text)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


@torch.inference_mode()
def evaluate_perplexity(
    model: CausalLM,
    tokenizer: Tokenizer,
    paths: Sequence[str | Path],
    seq_len: int | None = None,
    batch_size: int = 8,
    limit: int | None = None,
) -> PerplexityResult:
    """Score the `{"text"}` rows of `paths` (the first `limit` documents, with a limit).
    A bad row raises WrenError naming its file and line."""
    seq_len = seq_len or min(model.config.max_seq_len, DEFAULT_MAX_SEQ_LEN)
    if seq_len < 1 or batch_size < 1:
        raise ValueError("seq_len and batch_size must be >= 1")
    device = next(model.parameters()).device
    prefix = document_prefix(tokenizer)
    texts = (row.data["text"] for row in iter_rows(paths, "pretrain"))
    if limit is not None:
        texts = islice(texts, limit)
    result = PerplexityResult(documents=0, tokens=0, bytes=0, nll=0.0, seq_len=seq_len)
    for group in _groups(texts, _DOCUMENTS_PER_GROUP):
        windows = []
        for ids in tokenizer.encode_batch(group):
            windows += document_windows(ids, prefix, seq_len)
        windows.sort(key=lambda window: len(window[0]), reverse=True)
        for start in range(0, len(windows), batch_size):
            inputs, targets = _padded(windows[start : start + batch_size], tokenizer.pad_token_id)
            logits = model(inputs.to(device)).logits
            targets = targets.to(device)
            loss = F.cross_entropy(
                logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            result.nll += float(loss)
            result.tokens += int((targets != IGNORE_INDEX).sum())
        result.documents += len(group)
        result.bytes += sum(len(text.encode("utf-8")) for text in group)
    return result


def format_perplexity(result: PerplexityResult) -> str:
    rows = [
        ("documents", f"{result.documents:,}"),
        ("tokens", f"{result.tokens:,}"),
        ("bytes", f"{result.bytes:,}"),
        ("window (tokens)", f"{result.seq_len:,}"),
        ("loss (nats/token)", f"{result.loss:.4f}"),
        ("perplexity", f"{result.perplexity:.2f}"),
        ("bits per byte", f"{result.bits_per_byte:.4f}"),
    ]
    return format_table(("measure", "value"), rows)
