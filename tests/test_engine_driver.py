"""The server's engine thread builds the engine it then steps (wren.serve.driver): PyTorch's CPU
work stays on one thread. The HTTP side is tested with real processes in test_serve*.py."""

import asyncio
import json
import threading

import pytest
import torch

from wren.errors import WrenError
from wren.infer.engine import Engine
from wren.infer.sampling import SamplingParams
from wren.model import CausalLM, preset_config
from wren.serve.driver import EngineDriver, Job
from wren.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("driver") / "text.jsonl"
    lines = [f"the {animal} sat on the {place}." for animal in ("cat", "owl") for place in ("mat", "hill")]
    corpus.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines * 10))
    return train_tokenizer([corpus], vocab_size=300)


def test_the_engine_is_built_on_the_thread_that_steps_it(tokenizer):
    built_on = []

    def load() -> Engine:
        built_on.append(threading.current_thread())
        torch.manual_seed(0)
        model = CausalLM(preset_config("micro", vocab_size=tokenizer.vocab_size, max_seq_len=64)).eval()
        return Engine(model, tokenizer, max_batch_size=2)

    driver = EngineDriver(load, max_pending=4)
    engine = driver.launch()
    assert driver.engine is engine
    assert built_on == [driver._thread] and driver._thread is not threading.current_thread()
    assert driver.alive  # and now waiting for work

    async def generate() -> list[int]:
        driver.start()
        generation = driver.submit(
            [Job(tokenizer.encode("the cat"), SamplingParams(temperature=0.0, max_new_tokens=5))]
        )
        try:
            (result,) = await generation.wait()
        finally:
            generation.close()
        return result.token_ids

    try:
        got = asyncio.run(generate())
    finally:
        driver.stop()
    expected = engine.generate(
        [tokenizer.encode("the cat")], SamplingParams(temperature=0.0, max_new_tokens=5)
    )
    assert got == expected[0].token_ids and len(got) == 5
    assert not driver.alive


def test_a_failure_to_build_the_engine_is_raised_by_launch():
    def load() -> Engine:
        raise WrenError("no model in /nowhere")

    driver = EngineDriver(load)
    with pytest.raises(WrenError, match="no model in /nowhere"):
        driver.launch()
    driver._thread.join(5)
    assert not driver.alive
