"""Direct preference optimisation (`wren train dpo`): prefer the chosen reply over the rejected one
by more than a frozen reference model does.

For a pair with prompt x, chosen reply c and rejected reply r, the implicit reward margin is

    m = beta * [(log pi(c|x) - log pi(r|x)) - (log ref(c|x) - log ref(r|x))]

where log p(y|x) sums the log-probabilities of the final reply's tokens (its closing <|im_end|>
included). The loss per pair is -log sigmoid(m), or with label smoothing eps (conservative DPO,
for labels that are wrong with probability eps) -(1 - eps) log sigmoid(m) - eps log sigmoid(-m).
The policy starts as the reference, so the first step's loss is log 2 and its margin 0.

The loss is summed over pairs and averaged by the loop over the pairs of the global batch; the
same goes for the logged margin, accuracy (share of pairs with m > 0) and the policy's chosen and
rejected log-probabilities. --batch-size counts pairs: each is two rows.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from wren.checkpoint import load_model
from wren.data.preference import PreferenceBatch, PreferenceBatches, eval_preference_batches
from wren.data.shards import PreparedData
from wren.errors import WrenError
from wren.model import CausalLM
from wren.tokenizer import Tokenizer
from wren.train.config import TrainConfig
from wren.train.objectives import LossResult, Objective, describe_data, token_losses


def sequence_logps(
    model: torch.nn.Module, batch: PreferenceBatch, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(reply | prompt) of every row (summed over its targets, in nats) and the MoE aux loss."""
    losses, aux_loss = token_losses(model, batch, device)
    return -losses.sum(dim=1), aux_loss


def dpo_terms(
    policy: torch.Tensor, reference: torch.Tensor, beta: float, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, margin) per pair from per-row log-probs laid out chosen, rejected, chosen, ..."""
    policy_ratio = policy[0::2] - policy[1::2]
    reference_ratio = reference[0::2] - reference[1::2]
    margin = beta * (policy_ratio - reference_ratio)
    loss = -(1.0 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return loss, margin


class DPO(Objective):
    """DPO on preference pairs against a frozen reference: config.reference, else config.init."""

    name = "dpo"
    unit = "pairs"

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        super().__init__(config, device)
        if config.dpo_beta <= 0:
            raise WrenError(f"training config: dpo_beta must be positive, got {config.dpo_beta}")
        if not 0.0 <= config.dpo_label_smoothing < 0.5:
            raise WrenError(
                f"training config: dpo_label_smoothing must be in [0, 0.5), got {config.dpo_label_smoothing}"
            )
        self.reference: CausalLM | None = None
        self.data: PreparedData | None = None
        self.pad_id = 0

    def setup(self, model: CausalLM) -> None:
        # Always the starting model (never the checkpoint being resumed), held whole on every rank
        # even when the policy is sharded: it only runs forward, one micro-batch at a time. It stays
        # fp32 like the policy's master weights, so at step 0 the two compute the same numbers.
        source = Path(self.config.reference or self.config.init)
        reference = load_model(source, device=self.device, dtype=torch.float32)
        if reference.config.vocab_size != model.config.vocab_size:
            raise WrenError(
                f"{source}: the reference model has a vocabulary of {reference.config.vocab_size:,} tokens, "
                f"the trained model {model.config.vocab_size:,}; expected a model with the same tokenizer"
            )
        reference.eval().requires_grad_(False)
        self.reference = reference

    def prepare(self, tokenizer: Tokenizer, cache_dir: Path, *, is_main: bool) -> str:
        self.pad_id = tokenizer.pad_token_id or 0
        self.data = self.prepare_data(tokenizer, cache_dir, "preference", is_main=is_main)
        return describe_data(self.data, "preference", "pairs", docs_per_item=2)  # two documents a pair

    def train_batches(self, rank: int, world_size: int) -> PreferenceBatches:
        config = self.config
        return PreferenceBatches(
            self.data.train,
            config.batch_size,
            config.seq_len,
            seed=config.seed,
            rank=rank,
            world_size=world_size,
            pad_id=self.pad_id,
        )

    def count(self, batch: PreferenceBatch) -> int:
        return batch.n_pairs

    def _terms(
        self, model: torch.nn.Module, batch: PreferenceBatch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss per pair, margin per pair, policy log-probs per row, aux loss)."""
        policy, aux_loss = sequence_logps(model, batch, self.device)
        with torch.no_grad():
            reference, _ = sequence_logps(self.reference, batch, self.device)
        loss, margin = dpo_terms(policy, reference, self.config.dpo_beta, self.config.dpo_label_smoothing)
        return loss, margin, policy, aux_loss

    def loss(self, model: torch.nn.Module, batch: PreferenceBatch) -> LossResult:
        loss, margin, policy, aux_loss = self._terms(model, batch)
        margin, policy = margin.detach(), policy.detach()
        metrics = {
            "margin": margin.sum(),
            "accuracy": (margin > 0).float().sum(),
            "logp_chosen": policy[0::2].sum(),
            "logp_rejected": policy[1::2].sum(),
        }
        return LossResult(loss.sum(), batch.n_pairs, aux_loss, metrics)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        if self.data is None or self.data.val is None:
            return {}
        config = self.config
        total_loss = total_margin = 0.0
        correct = pairs = 0
        for batch in eval_preference_batches(
            self.data.val, config.batch_size, config.seq_len, config.eval_batches, self.pad_id
        ):
            loss, margin, _, _ = self._terms(model, batch)
            total_loss += float(loss.sum())
            total_margin += float(margin.sum())
            correct += int((margin > 0).sum())
            pairs += batch.n_pairs
        if pairs == 0:
            return {}
        return {
            "val/loss": total_loss / pairs,
            "val/accuracy": correct / pairs,
            "val/margin": total_margin / pairs,
        }
