"""The transformers backend's batched decode: one forward over every slot's left-padded cache gives
each slot the logits it gets alone, through joins, leaves and reused slots; models it cannot
batch safely decode slot by slot."""

import pytest
import torch
import transformers
from serve_helpers import tiny_chat_model

from wren.infer.engine import Engine
from wren.infer.load import load_engine
from wren.infer.sampling import SamplingParams
from wren.infer.transformers_backend import TransformersRunner
from wren.infer.transformers_batch import can_batch


@pytest.fixture(scope="module")
def hf_engine(tmp_path_factory):
    return load_engine(tiny_chat_model(tmp_path_factory.getbasetemp()), backend="transformers")


@pytest.fixture(scope="module")
def hf_model(hf_engine):
    return hf_engine.model


def runners(model, slots: int) -> tuple[TransformersRunner, TransformersRunner]:
    batched = TransformersRunner(model, slots, None, prefill_chunk=4)
    alone = TransformersRunner(model, slots, None, prefill_chunk=4)
    alone.batch = None
    assert batched.batch is not None
    return batched, alone


class Slots:
    """Drives two runners through the same slot history and compares every decode step."""

    def __init__(self, model, slots: int) -> None:
        self.runners = runners(model, slots)
        self.sequences: dict[int, list[int]] = {}

    def admit(self, slot: int, prompt: list[int]) -> None:
        for runner in self.runners:
            runner.prefill([slot], [prompt[:-1]])
        self.sequences[slot] = list(prompt)

    def leave(self, slot: int) -> None:
        for runner in self.runners:
            runner.release(slot)
        del self.sequences[slot]

    def step(self) -> None:
        slots = sorted(self.sequences)
        ids = [self.sequences[slot][-1] for slot in slots]
        positions = [len(self.sequences[slot]) - 1 for slot in slots]
        batched, alone = (runner.decode(slots, ids, positions) for runner in self.runners)
        torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)
        assert batched.argmax(-1).tolist() == alone.argmax(-1).tolist()
        for slot, token in zip(slots, batched.argmax(-1).tolist(), strict=True):
            self.sequences[slot].append(token)


def test_batched_logits_equal_each_slot_alone(hf_model):
    slots = Slots(hf_model, 4)
    slots.admit(0, [5, 6, 7, 8, 9, 10, 11, 12, 13])  # longer than a prefill chunk
    slots.admit(1, [20, 21])
    slots.admit(2, [30])  # a one-token prompt: nothing prefilled, an all-padding row
    for _ in range(3):
        slots.step()
    slots.admit(3, [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54])  # joins, longest
    slots.step()
    slots.leave(0)  # the longest-but-one leaves: the padding shrinks
    slots.step()
    # Same slot numbers as before, a new occupant in slot 1: its old row must not be reused.
    slots.leave(1)
    slots.admit(1, [60, 61, 62])
    slots.admit(0, [70, 71])
    for _ in range(3):
        slots.step()
    for slot in (1, 2, 3):
        slots.leave(slot)
    slots.step()  # a batch of one


def test_the_engine_gives_the_same_tokens_batched_or_slot_by_slot(hf_engine):
    prompts = [[5 + i] * (1 + 3 * i) for i in range(7)]
    # Different lengths, so requests finish apart: three slots for seven prompts means requests
    # wait, join a running batch and take over slots that others left.
    params = [
        SamplingParams(temperature=0.0, max_new_tokens=4 + 3 * (i % 3), ignore_eos=True) for i in range(7)
    ]
    got = []
    for batched in (True, False):
        engine = Engine(hf_engine.model, hf_engine.tokenizer, max_batch_size=3)
        if not batched:
            engine.runner.batch = None
        got.append([r.token_ids for r in engine.generate(prompts, params)])
    assert got[0] == got[1]
    assert [len(ids) for ids in got[0]] == [p.max_new_tokens for p in params]


class RemoteLlama(transformers.LlamaForCausalLM):
    """Stands for remote code: a model class defined outside transformers."""


def test_only_models_that_batch_safely_are_batched(hf_model):
    assert can_batch(hf_model)
    config = hf_model.config
    assert not can_batch(RemoteLlama(config))
    tiny = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1}  # fmt: skip
    assert can_batch(transformers.MistralForCausalLM(transformers.MistralConfig(**tiny, sliding_window=None)))
    # Sliding-window layers drop old keys: a left pad would shift what they keep.
    sliding = transformers.MistralConfig(**tiny, sliding_window=8)
    assert not can_batch(transformers.MistralForCausalLM(sliding))
    # Dynamic NTK rescales every row by the batch's longest position.
    dynamic = transformers.LlamaConfig(**tiny, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert not can_batch(transformers.LlamaForCausalLM(dynamic))
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2)
    )
    assert can_batch(gpt2)
