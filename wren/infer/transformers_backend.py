"""The transformers backend: any model `AutoModelForCausalLM` loads, under Wren's engine.

`TransformersRunner` prefills each slot into its own `DynamicCache`, then decodes the active slots
in one batched forward pass per step (`transformers_batch`: their caches left-padded side by side)
when the model allows it, which transformers' own full-attention models do. Anything else (remote
code, sliding-window or recurrent layers) decodes the slots one after another: a forward pass per
stream instead of per step, but it works for every architecture transformers knows without
reimplementing any of them. `HFTokenizer` gives a transformers tokenizer the small surface the
engine uses. transformers (extra `hf`) is imported only here and in `transformers_batch`.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from wren.errors import WrenError
from wren.infer.transformers_batch import SlotBatch, can_batch

# Context length when neither the model config nor the caller gives one.
_FALLBACK_CONTEXT = 2048


class TransformersRunner:
    """Per-slot prefill and (where possible) batched decode over a transformers causal LM (see the
    module docstring). `batch` is None when the model decodes slot by slot."""

    def __init__(self, model: Any, max_batch_size: int, max_seq_len: int | None, prefill_chunk: int) -> None:
        self.model = model.eval()
        self.device = model.get_input_embeddings().weight.device
        output = model.get_output_embeddings()
        self.vocab_size = output.weight.shape[0] if output is not None else model.config.vocab_size
        limit = getattr(model.config, "max_position_embeddings", None) or _FALLBACK_CONTEXT
        self.max_seq_len = min(max_seq_len or limit, limit)
        self.prefill_chunk = prefill_chunk
        self.caches: list[Any] = [None] * max_batch_size  # prefilled, not yet in the batch
        self.batch = SlotBatch() if can_batch(model) else None
        # Only the last position's logits are used; most transformers models can skip the rest
        # (remote code may not take the argument).
        keeps = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._last_only = {"logits_to_keep": 1} if keeps else {}

    def prefill(self, slots: list[int], prompts: list[list[int]]) -> None:
        from transformers import DynamicCache

        for slot, ids in zip(slots, prompts, strict=True):
            if self.batch is not None:
                self.batch.drop(slot)
            # The cache infers each token's position from its own length, so chunks follow on.
            self.caches[slot] = DynamicCache(config=self.model.config)
            for start in range(0, len(ids), self.prefill_chunk):
                self._forward(slot, ids[start : start + self.prefill_chunk])

    def decode(self, slots: list[int], ids: list[int], positions: list[int]) -> torch.Tensor:
        if self.batch is not None:
            if slots != self.batch.slots:
                self.batch.regroup(slots, self.caches)
            return self.batch.forward(self.model, ids, positions, self.device)
        pairs = zip(slots, ids, strict=True)
        return torch.cat([self._forward(slot, [token])[:, -1] for slot, token in pairs])

    def release(self, slot: int) -> None:
        self.caches[slot] = None
        if self.batch is not None:
            self.batch.drop(slot)

    def _forward(self, slot: int, ids: list[int]) -> torch.Tensor:
        out = self.model(
            input_ids=torch.tensor([ids], device=self.device),
            past_key_values=self.caches[slot],
            use_cache=True,
            **self._last_only,
        )
        return out.logits.float()


class HFTokenizer:
    """A transformers tokenizer with the interface of Wren's `Tokenizer` that the engine uses."""

    def __init__(self, tokenizer: Any, generation_eos: int | list[int] | None = None) -> None:
        self.hf = tokenizer
        self.chat_template = tokenizer.chat_template
        eos = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        # generation_config.json's eos ids first: chat models list their end-of-turn token there.
        self.stop_token_ids = list(dict.fromkeys(eos))

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # A raw prompt gets the model's BOS where it has one, as transformers' pipelines do.
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **kwargs: Any,
    ) -> list[int] | str:
        if not self.hf.chat_template:
            raise WrenError(
                f"{self.hf.name_or_path}: the tokenizer has no chat template; send a plain text prompt"
            )
        text = self.hf.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
        )
        # The rendered text already holds the template's BOS, if any.
        return self.hf.encode(text, add_special_tokens=False) if tokenize else text


def load_transformers_model(
    path: str | Path,
    dtype: torch.dtype | None,
    device: str | None,
    trust_remote_code: bool = False,
    adapter: str | Path | None = None,
) -> tuple[Any, HFTokenizer]:
    """Load a causal LM and its tokenizer with transformers.

    dtype None is transformers' "auto": the dtype the checkpoint declares. Without a device,
    `device_map="auto"` spreads the model over the GPUs (and the CPU) when accelerate is
    installed; otherwise it goes to the first GPU, or stays on the CPU.
    """
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    except ImportError as exc:
        raise WrenError("the transformers backend needs transformers: pip install 'wrenlm[hf]'") from exc

    placement: dict[str, Any] = {}
    if device is None and _has_accelerate():
        placement["device_map"] = "auto"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or "auto", trust_remote_code=trust_remote_code, **placement
        )
    except (OSError, ValueError) as exc:
        hint = "" if trust_remote_code else " (if it ships its own model code, add --trust-remote-code)"
        raise WrenError(f"{path}: transformers could not load it: {_first_line(exc)}{hint}") from exc
    if not placement:
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if adapter is not None:
        model = _merge_adapter(model, adapter)
    try:
        generation_eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:  # no generation_config.json
        generation_eos = None
    return model.eval(), HFTokenizer(tokenizer, generation_eos)


def _merge_adapter(model: Any, adapter: str | Path) -> Any:
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise WrenError("--adapter with the transformers backend needs peft: pip install peft") from exc
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()


def _has_accelerate() -> bool:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return False
    return True


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
