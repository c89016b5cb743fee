"""Reasoning SFT: conversations whose replies think first, `<think>...</think>` then the answer.

The data is ordinary SFT data (MiniMind's R1-style `{"conversations"}` rows, the reasoning written
inside the assistant's content) and the batches are SFT's. The loss is SFT's cross-entropy on the
assistant's tokens with one change: target tokens that are the tag tokens `<think>` and `</think>`
weigh `think_tag_weight` (MiniMind uses 10), so the model learns early and firmly to open its
reasoning, close it, and then answer.

Normalisation follows MiniMind: sum(weight * loss) / (number of target tokens). The tags raise the
step's loss (and their gradients) rather than taking a share from the other tokens, so with
weight 1 this is SFT exactly. train/loss is that weighted mean; train/ce logs the plain mean
cross-entropy, and the validation loss is unweighted, so both compare with SFT runs. Unlike
MiniMind, which also weights tags that appear outside the replies, only trained tokens are weighted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from wren.data.batching import Batch
from wren.data.shards import TokenDataset
from wren.errors import WrenError
from wren.tokenizer import THINK_END, THINK_START, Tokenizer
from wren.train.config import TrainConfig
from wren.train.objectives import LanguageModeling, LossResult, token_losses

# Tokens counted per pass when looking for tags in the data: a few tens of MB of memory at most.
_SCAN_CHUNK = 1 << 24


def think_tag_ids(tokenizer: Tokenizer) -> list[int]:
    """The ids of <think> and </think>, each of which must be a single token of the tokenizer."""
    missing = [token for token in (THINK_START, THINK_END) if tokenizer.token_to_id(token) is None]
    if missing:
        raise WrenError(
            f"the tokenizer has no {' or '.join(missing)} token; reasoning SFT weights the thinking tags, "
            "so expected a tokenizer with <think> and </think> as single tokens (every tokenizer "
            "`wren tokenizer train` writes has them)"
        )
    return [tokenizer.token_to_id(THINK_START), tokenizer.token_to_id(THINK_END)]


def think_tag_weights(targets: torch.Tensor, tag_ids: torch.Tensor, weight: float) -> torch.Tensor:
    """Per position: `weight` where the target is a tag token, else 1 (ignored targets have a zero
    loss already, so their weight does not matter)."""
    is_tag = torch.isin(targets, tag_ids)
    return torch.where(is_tag, weight, 1.0).to(torch.float32)


def count_trained_tags(dataset: TokenDataset, tag_ids: list[int]) -> int:
    """How many tag tokens the dataset trains on (tokens under the loss mask)."""
    total = 0
    for start in range(0, dataset.n_tokens, _SCAN_CHUNK):
        tokens = np.asarray(dataset.tokens[start : start + _SCAN_CHUNK])
        trained = np.asarray(dataset.mask[start : start + _SCAN_CHUNK]).astype(bool)
        total += int((np.isin(tokens, tag_ids) & trained).sum())
    return total


class ReasoningSFT(LanguageModeling):
    """SFT on R1-style conversations, with the thinking tags weighted in the loss."""

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        super().__init__(config, device)
        self.name, self.kind = "reason", "sft"
        if not 0 <= config.think_tag_weight < float("inf"):
            raise WrenError(
                f"think_tag_weight {config.think_tag_weight:g}; expected a finite weight of 0 or more "
                "(default 10)"
            )
        self.tag_ids: torch.Tensor | None = None

    def prepare(self, tokenizer: Tokenizer, cache_dir: Path, *, is_main: bool) -> str:
        tag_ids = think_tag_ids(tokenizer)  # before tokenising: a wrong tokenizer fails at once
        self.tag_ids = torch.tensor(tag_ids, device=self.device)
        summary = super().prepare(tokenizer, cache_dir, is_main=is_main)
        n_tags = count_trained_tags(self.data.train, tag_ids)
        if n_tags == 0:
            raise WrenError(
                f"{', '.join(map(str, self.config.data))}: no assistant reply holds <think> or </think>; "
                "expected replies written as <think>reasoning</think> then the answer "
                "(for conversations without reasoning, use wren train sft)"
            )
        return f"{summary}; {n_tags:,} thinking tags, each weighted {self.config.think_tag_weight:g}"

    def loss(self, model: torch.nn.Module, batch: Batch) -> LossResult:
        losses, aux_loss = token_losses(model, batch, self.device)
        targets = batch.targets.to(self.device, non_blocking=True)
        weights = think_tag_weights(targets, self.tag_ids, self.config.think_tag_weight)
        weighted = (losses * weights).sum()
        return LossResult(weighted, batch.n_target_tokens, aux_loss, {"ce": losses.sum().detach()})
