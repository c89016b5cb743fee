"""White-box distillation: the student learns the teacher's next-token distributions.

Student and teacher read the same batch. At every target position (every token of pretraining
text; the assistant's tokens of a conversation, as in SFT) the loss mixes the cross-entropy
against the data with the KL divergence from the teacher's softened distribution to the
student's:

    alpha * CE(student, targets) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

The T^2 keeps the KL's gradients on the cross-entropy's scale whatever the temperature (Hinton et
al., 2015). With alpha = 1 this is SFT (or pretraining) exactly.

The teacher runs on the fly under no_grad, in bfloat16 on GPUs (`teacher_dtype`); it must use the
student's tokenizer. Output layers padded past the tokenizer (Qwen's 151,936 rows for 151,665
tokens) are fine: the KL compares the first min(student rows, teacher rows) logits, as long as
every token of the tokenizer is among them.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from wren.checkpoint import load_model
from wren.data.batching import IGNORE_INDEX, Batch
from wren.data.formats import detect_kind
from wren.errors import WrenError
from wren.jsonl import expand_paths, parse_jsonl_line
from wren.model import CausalLM
from wren.tokenizer import Tokenizer
from wren.train.config import TrainConfig
from wren.train.objectives import LanguageModeling, LossResult, forward_batch, position_losses

TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def teacher_dtype(name: str, device: torch.device) -> torch.dtype:
    """The teacher's weight dtype: "auto" is bfloat16 on CUDA (half the memory, tensor cores) and
    float32 elsewhere (CPU bfloat16 matmuls are slow and gain nothing)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in TEACHER_DTYPES:
        raise WrenError(f"teacher_dtype {name!r}; expected auto, {', '.join(TEACHER_DTYPES)}")
    return TEACHER_DTYPES[name]


def data_kind(paths: list[str]) -> str:
    """ "pretrain" or "sft", from the first row of the first data file."""
    path = expand_paths(paths)[0]
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            parsed = parse_jsonl_line(raw, path, number)
            if parsed is None:
                continue
            kind = detect_kind(parsed[1])
            if kind in ("pretrain", "sft"):
                return kind
            found = "a preference pair (for wren train dpo)" if kind == "preference" else "neither"
            raise WrenError(
                f'{path}:{number}: found {found}; distillation expects {{"text"}} rows (pretraining '
                'text) or {"conversations"} rows (the teacher is matched on the assistant replies)'
            )
    raise WrenError(f"{path}: no rows; expected JSONL training data")


def compared_vocab(student_rows: int, teacher_rows: int, tokenizer: Tokenizer, teacher: str) -> int:
    """How many leading logits the KL compares: both output layers' rows up to the shorter one,
    which must still hold every token of the tokenizer (the rest is padding no text produces)."""
    shared = min(student_rows, teacher_rows)
    if shared < tokenizer.vocab_size:
        raise WrenError(
            f"{teacher}: the teacher's output layer has {teacher_rows:,} rows and the student's "
            f"{student_rows:,}, but the tokenizer has {tokenizer.vocab_size:,} tokens; expected a teacher "
            "with the student's tokenizer and at least one logit per token"
        )
    return shared


def check_same_tokenizer(teacher: str, tokenizer: Tokenizer) -> None:
    """The teacher's own tokenizer, where its directory has one, must map every token to the same
    id as the student's: the KL compares the two distributions id by id."""
    if not (Path(teacher) / "tokenizer.json").is_file():
        return  # a bare model directory: only the vocabulary sizes can be checked
    theirs = Tokenizer.load(teacher).backend.get_vocab(with_added_tokens=True)
    ours = tokenizer.backend.get_vocab(with_added_tokens=True)
    if theirs != ours:
        raise WrenError(
            f"{teacher}: the teacher's tokenizer ({len(theirs):,} tokens) differs from the student's "
            f"({len(ours):,} tokens); distillation compares next-token distributions token by token, "
            "so expected a teacher trained with the student's tokenizer"
        )


def distillation_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) per row, in float32. Both (rows, vocab)."""
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="none").sum(dim=-1)


class Distillation(LanguageModeling):
    """Distillation on pretraining text or on conversations, whichever the data holds."""

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        super().__init__(config, device)
        self.name = "distill"
        # The batches, the loss mask and evaluation follow the data: text or conversations.
        self.kind = data_kind(config.data)
        self.teacher_dtype = teacher_dtype(config.teacher_dtype, device)
        self.teacher: CausalLM | None = None
        self.student_rows = 0  # the student's output layer rows
        self.vocab = 0  # leading logits the KL compares

    def setup(self, model: CausalLM) -> None:
        self.teacher = load_model(self.config.teacher, device=self.device, dtype=self.teacher_dtype)
        self.teacher.requires_grad_(False)
        self.student_rows = model.config.vocab_size

    def prepare(self, tokenizer: Tokenizer, cache_dir: Path, *, is_main: bool) -> str:
        # Before tokenising anything: a wrong teacher should fail in seconds, not after the data.
        teacher = str(self.config.teacher)
        check_same_tokenizer(teacher, tokenizer)
        self.vocab = compared_vocab(self.student_rows, self.teacher.config.vocab_size, tokenizer, teacher)
        summary = super().prepare(tokenizer, cache_dir, is_main=is_main)
        dtype = str(self.teacher_dtype).removeprefix("torch.")
        return (
            f"{summary}\nteacher {teacher}: {self.teacher.num_parameters():,} parameters in {dtype}; "
            f"alpha {self.config.distill_alpha}, temperature {self.config.distill_temperature}"
        )

    def _kl_at_targets(
        self, student_logits: torch.Tensor, batch: Batch, targets: torch.Tensor
    ) -> torch.Tensor:
        """Per target position: the KL from the teacher to the student (teacher without gradients)."""
        selected = targets != IGNORE_INDEX
        with torch.no_grad():
            teacher_logits = forward_batch(self.teacher, batch, self.device)[0][selected][:, : self.vocab]
        return distillation_kl(
            student_logits[selected][:, : self.vocab], teacher_logits, self.config.distill_temperature
        )

    def loss(self, model: torch.nn.Module, batch: Batch) -> LossResult:
        config = self.config
        targets = batch.targets.to(self.device, non_blocking=True)
        logits, aux_loss = forward_batch(model, batch, self.device)
        # The same cross-entropy as SFT and pretraining, op for op, so alpha = 1 reproduces them bit for bit.
        ce = position_losses(logits, targets).sum()
        kl = self._kl_at_targets(logits, batch, targets).sum()
        temperature = config.distill_temperature
        loss = config.distill_alpha * ce + (1.0 - config.distill_alpha) * temperature**2 * kl
        return LossResult(loss, batch.n_target_tokens, aux_loss, {"ce": ce.detach(), "kl": kl.detach()})

    def validation_sums(
        self, logits: torch.Tensor, batch: Batch, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """val/kl: the mean KL from the teacher to the student over the validation targets, at the
        training temperature, from the forward pass that also gives val/loss."""
        return {"kl": self._kl_at_targets(logits, batch, targets).sum()}
