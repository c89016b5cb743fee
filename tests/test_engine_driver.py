"""Engines built and stepped on one thread of their own, so that PyTorch's CPU work stays on one
thread: the server's engine thread (wren.serve.driver; its HTTP side is tested with real
processes in test_serve*.py) and EngineThread (wren.infer.shared, the web page's)."""

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from wren.errors import WrenError
from wren.infer.engine import Engine
from wren.infer.request import Result
from wren.infer.sampling import SamplingParams
from wren.infer.shared import EngineThread
from wren.model import CausalLM, preset_config
from wren.serve.driver import EngineDriver, Job
from wren.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("driver") / "text.jsonl"
    lines = [f"the {animal} sat on the {place}." for animal in ("cat", "owl") for place in ("mat", "hill")]
    corpus.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines * 10))
    return train_tokenizer([corpus], vocab_size=300)


def loader(tokenizer, built_on: list):
    def load() -> Engine:
        built_on.append(threading.current_thread())
        torch.manual_seed(0)
        model = CausalLM(preset_config("micro", vocab_size=tokenizer.vocab_size, max_seq_len=64)).eval()
        return Engine(model, tokenizer, max_batch_size=2)

    return load


def test_the_engine_is_built_on_the_thread_that_steps_it(tokenizer):
    built_on = []
    driver = EngineDriver(loader(tokenizer, built_on), max_pending=4)
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


def test_an_engine_thread_serves_callers_in_other_threads(tokenizer):
    built_on = []
    shared = EngineThread(loader(tokenizer, built_on))
    assert built_on == [shared._thread] and shared._thread is not threading.current_thread()
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    prompts = [tokenizer.encode(text) for text in ("the cat", "the owl sat", "the", "the owl")]
    with ThreadPoolExecutor(4) as pool:  # more callers than slots: some wait for one
        got = list(pool.map(lambda ids: shared.complete(ids, greedy).token_ids, prompts))
    alone = [shared.engine.generate([ids], greedy)[0].token_ids for ids in prompts]
    assert got == alone and all(len(ids) == 6 for ids in got)

    # Leaving early cancels the request and frees its slot; the next one still runs.
    events = shared.run(prompts[0], SamplingParams(temperature=0.0, max_new_tokens=40))
    next(events)
    events.close()
    assert isinstance(list(shared.run(prompts[1], greedy))[-1], Result)
    assert not any(shared.engine.slots) and not shared.engine.waiting
    # A prompt the engine refuses raises in the caller's thread.
    with pytest.raises(WrenError, match="context"):
        shared.complete([5] * 100, greedy)


def test_an_engine_thread_raises_what_building_the_engine_raised():
    def load() -> Engine:
        raise WrenError("no model in /nowhere")

    with pytest.raises(WrenError, match="no model in /nowhere"):
        EngineThread(load)
