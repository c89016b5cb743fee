"""`wren train lora`: supervised fine-tuning of low-rank adapters on a frozen model.

The data, batches and loss are SFT's (LanguageModeling with kind "sft"); what differs is the
model (the --init checkpoint, frozen, with adapters on the --lora-targets layers) and what a
checkpoint holds: a PEFT adapter directory (adapter weights and config, the tokenizer and
trainer_state/), never the base weights. So `<out>/final` loads with
`peft.PeftModel.from_pretrained(base, "<out>/final")`, `wren lora merge` or
`wren.checkpoint.load_model(base, adapter="<out>/final")`.

Resuming loads the base from --init again and the adapter weights from the checkpoint; the
optimizer state holds the adapters' moments only, since only they are given to the optimizer.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from wren.checkpoint import load_model
from wren.checkpoint.adapter import is_adapter_dir, load_adapter_weights, read_adapter, save_adapter
from wren.errors import WrenError
from wren.model import CausalLM
from wren.model.lora import inject_lora
from wren.tokenizer import Tokenizer
from wren.train.config import TrainConfig
from wren.train.objectives import LanguageModeling


class LoRATraining(LanguageModeling):
    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        super().__init__(config, device)
        self.kind = "sft"  # the data and loss of supervised fine-tuning
        self._summary = ""

    def build_model(self, resume_from: Path | None) -> tuple[CausalLM, Tokenizer]:
        config = self.config
        if config.fsdp and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # The loop gathers a sharded model into a plain CausalLM to save it, which has no
            # adapters; LoRA's trainable state is small, so replicating it (DDP) is the right tool.
            raise WrenError("LoRA training runs under DDP; drop --fsdp (the frozen base is not sharded)")
        if is_adapter_dir(config.init):
            base = read_adapter(config.init).base_model_name_or_path or "its base model"
            raise WrenError(
                f"{config.init}: is a LoRA adapter, not a model; pass the model it adapts as --init "
                f"({base}), or merge the two first with `wren lora merge`"
            )
        model = load_model(config.init, dtype=torch.float32)
        tokenizer = Tokenizer.load(config.init)
        torch.manual_seed(config.seed)  # the adapters' A matrices start from the run's seed
        try:
            adapted = inject_lora(
                model,
                config.lora_targets,
                rank=config.lora_rank,
                alpha=config.lora_alpha,
                dropout=config.lora_dropout,
            )
        except ValueError as exc:
            raise WrenError(f"{config.init}: {exc}") from None
        if resume_from is not None:
            load_adapter_weights(model, resume_from, base=config.init)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = model.num_parameters()
        self._summary = (
            f"LoRA rank {config.lora_rank}, alpha {config.lora_alpha:g} on {len(adapted)} layers: "
            f"{trainable:,} trainable parameters ({100 * trainable / total:.2f}% of {total:,})"
        )
        return model, tokenizer

    def prepare(self, tokenizer: Tokenizer, cache_dir: Path, *, is_main: bool) -> str:
        return f"{super().prepare(tokenizer, cache_dir, is_main=is_main)}; {self._summary}"

    def save(
        self,
        model: CausalLM,
        tokenizer: Tokenizer,
        target: Path,
        write_extra: Callable[[Path], None],
    ) -> None:
        save_adapter(
            model,
            target,
            base_model_name_or_path=self.config.init,
            tokenizer=tokenizer,
            write_extra=write_extra,
        )
