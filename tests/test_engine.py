"""The continuous-batching engine gives each request the tokens it would get alone."""

import copy
import itertools
import json
import random

import pytest
import torch
import torch.nn.functional as F

import wren.model.quant
from wren import kernels
from wren.infer.compiled import CompiledDecode, _verified_replay
from wren.infer.engine import Engine
from wren.infer.generate import generate_ids
from wren.infer.sampling import SamplingParams
from wren.infer.text import REPLACEMENT_CHAR
from wren.model import CausalLM, KVCache, preset_config
from wren.model.quant import quantize_int8
from wren.tokenizer import train_tokenizer

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24)
ANIMALS = ["cat", "dog", "bird", "fox", "owl", "bee"]
PLACES = ["mat", "hill", "road", "tree", "lake"]
CHINESE = "猫坐在垫子上。狗跑过小山。鸟飞向大树。"


def corpus_lines(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        english = (
            f"the {rng.choice(ANIMALS)} sat on the {rng.choice(PLACES)} and the {rng.choice(ANIMALS)} ran."
        )
        lines.append(english if rng.random() < 0.6 else CHINESE)
    return lines


def train(model: CausalLM, stream: torch.Tensor, steps: int, seq: int = 48) -> CausalLM:
    """A few optimizer steps on random windows of a token stream."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - seq - 1, (8,), generator=generator)
        batch = torch.stack([stream[s : s + seq + 1] for s in starts.tolist()])
        loss = F.cross_entropy(model(batch[:, :-1]).logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    directory = tmp_path_factory.mktemp("engine")
    lines = corpus_lines(400)
    with open(directory / "text.jsonl", "w") as f:
        for line in lines:
            f.write(json.dumps({"text": line}, ensure_ascii=False) + "\n")
    tokenizer = train_tokenizer([directory / "text.jsonl"], vocab_size=400)
    torch.manual_seed(0)
    config = preset_config(
        "micro", vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256
    )
    # An end of text after every fourth line only, so that replies run for a while. A short
    # training run makes greedy text follow the corpus instead of repeating one token.
    ids = [
        tokenizer.encode(line + " ") + [tokenizer.eos_token_id] * (i % 4 == 3) for i, line in enumerate(lines)
    ]
    return train(CausalLM(config), torch.tensor([t for line in ids for t in line]), steps=60), tokenizer


PROMPTS = ["the cat sat", "the owl", "the dog sat on the hill and the", "猫坐在", "the bee sat on the road"]


def alone(model, tokenizer, prompt: str, max_new_tokens: int = 24) -> list[int]:
    ids = tokenizer.encode(prompt)
    return generate_ids(model, ids, max_new_tokens, stop_ids=tokenizer.stop_token_ids)


def test_batched_greedy_equals_one_at_a_time(setup):
    model, tokenizer = setup
    # Different lengths, so requests leave at different steps and the active slots get gaps.
    lengths = [24, 7, 15, 3, 30]
    expected = [alone(model, tokenizer, p, n) for p, n in zip(PROMPTS, lengths, strict=True)]
    assert len({tuple(e[:3]) for e in expected}) > 1  # the model is not degenerate
    params = [SamplingParams(temperature=0.0, max_new_tokens=n) for n in lengths]
    # 16 slots: every prompt is prefilled in one padded pass (in chunks of 3 positions, too);
    # 2 slots: requests wait and reuse freed slots.
    for batch_size, chunk in ((16, 512), (16, 3), (2, 512)):
        engine = Engine(model, tokenizer, max_batch_size=batch_size, prefill_chunk=chunk)
        results = engine.generate(PROMPTS, params)
        assert [r.token_ids for r in results] == expected
        for r in results:
            assert r.text == tokenizer.decode(r.token_ids, skip_special_tokens=True)


def test_request_joining_mid_batch(setup):
    model, tokenizer = setup
    engine = Engine(model, tokenizer, max_batch_size=4)
    first = [engine.submit(p, SamplingParams(temperature=0.0, max_new_tokens=40)) for p in PROMPTS[:2]]
    for _ in range(5):
        engine.step()
    late = engine.submit(PROMPTS[2], GREEDY)
    while engine.has_work:
        engine.step()
    assert late.result.token_ids == alone(model, tokenizer, PROMPTS[2])
    assert [r.result.token_ids for r in first] == [alone(model, tokenizer, p, 40) for p in PROMPTS[:2]]


def test_reused_slot_matches_fresh_engine(setup):
    model, tokenizer = setup
    engine = Engine(model, tokenizer, max_batch_size=1)
    long = engine.generate(["the dog sat on the hill and the fox ran. the cat"], GREEDY)[0]
    assert long.prompt_tokens + long.completion_tokens > len(tokenizer.encode("the owl")) + 5
    reused = engine.generate(["the owl"], GREEDY)[0]
    fresh = Engine(model, tokenizer, max_batch_size=1).generate(["the owl"], GREEDY)[0]
    assert reused.token_ids == fresh.token_ids == alone(model, tokenizer, "the owl")


def test_stop_string_across_tokens_is_not_leaked(setup):
    model, tokenizer = setup
    engine = Engine(model, tokenizer)
    full = engine.generate(["the cat sat"], GREEDY)[0]
    # A stop string that starts inside one token and ends inside the next.
    pieces = [tokenizer.decode([t]) for t in full.token_ids]
    k = next(i for i in range(1, len(pieces)) if len(pieces[i - 1]) > 1 and len(pieces[i]) > 1)
    boundary = len("".join(pieces[:k]))
    stop = full.text[boundary - 1 : boundary + 1]
    expected = full.text[: full.text.index(stop)]
    deltas = list(
        engine.stream("the cat sat", SamplingParams(temperature=0.0, max_new_tokens=24, stop=[stop]))
    )
    assert "".join(deltas) == expected
    result = engine.generate(
        ["the cat sat"], SamplingParams(temperature=0.0, max_new_tokens=24, stop=[stop])
    )[0]
    assert result.text == expected and result.finish_reason == "stop"


def test_seeded_sampling_is_reproducible_alone_and_batched(setup):
    model, tokenizer = setup
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_new_tokens=20)
    first = Engine(model, tokenizer).generate(["the fox"], seeded)[0]
    again = Engine(model, tokenizer).generate(["the fox"], seeded)[0]
    others = [SamplingParams(temperature=1.0, max_new_tokens=30), SamplingParams(temperature=0.8, seed=3)]
    batched = Engine(model, tokenizer).generate(["the cat", "the fox", "狗"], [others[0], seeded, others[1]])
    assert first.token_ids == again.token_ids == batched[1].token_ids
    assert first.text == batched[1].text


def test_cancel_frees_the_slot_at_once(setup):
    model, tokenizer = setup
    engine = Engine(model, tokenizer, max_batch_size=1)
    long = engine.submit("the cat", SamplingParams(temperature=0.0, max_new_tokens=200))
    engine.step()
    waiting = engine.submit("the owl", GREEDY)
    engine.step()
    assert waiting.slot is None and waiting.sampled == 0
    engine.cancel(long)
    assert long.result.finish_reason == "cancelled" and long.result.completion_tokens == 2
    engine.step()
    assert waiting.slot == 0 and waiting.sampled == 1
    while engine.has_work:
        engine.step()
    assert waiting.result.token_ids == alone(model, tokenizer, "the owl")
    # Closing a stream part-way cancels its request.
    deltas = engine.stream("the cat", SamplingParams(temperature=0.0, max_new_tokens=200))
    next(deltas)
    assert engine.has_work
    deltas.close()
    assert not engine.has_work


def test_finish_reasons_and_token_counts(setup):
    model, tokenizer = setup
    engine = Engine(model, tokenizer)
    prompt_ids = tokenizer.encode("the cat sat")
    full = engine.generate([prompt_ids], SamplingParams(temperature=0.0, max_new_tokens=6))[0]
    assert (full.finish_reason, full.prompt_tokens, full.completion_tokens) == ("length", len(prompt_ids), 6)
    stop_token = full.token_ids[3]
    first_stop = full.token_ids.index(stop_token)
    stopped = engine.generate(
        [prompt_ids], SamplingParams(temperature=0.0, max_new_tokens=6, stop_token_ids=[stop_token])
    )[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == full.token_ids[:first_stop]
    assert stopped.completion_tokens == first_stop + 1  # the stop token counts, but is not shown
    assert stopped.text == tokenizer.decode(full.token_ids[:first_stop])
    # The context fills first: prompt plus completion never exceed max_seq_len.
    small = Engine(model, tokenizer, max_seq_len=len(prompt_ids) + 3)
    capped = small.generate([prompt_ids], SamplingParams(temperature=0.0, max_new_tokens=50))[0]
    assert (capped.finish_reason, capped.completion_tokens) == ("length", 3)


def test_chat_messages_and_penalties(setup):
    model, tokenizer = setup
    engine = Engine(model, tokenizer, prefill_chunk=4)  # several prefill chunks per prompt
    messages = [{"role": "user", "content": "the cat sat on the mat"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    result = engine.generate([messages], GREEDY)[0]
    assert result.prompt_tokens == len(ids)
    assert result.token_ids == generate_ids(model, ids, 24, stop_ids=tokenizer.stop_token_ids)
    penalised = SamplingParams(
        temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.5, max_new_tokens=24
    )
    mixed = engine.generate(["the cat sat", "the cat sat"], [penalised, GREEDY])
    assert mixed[1].token_ids == alone(model, tokenizer, "the cat sat")
    assert mixed[0].token_ids != mixed[1].token_ids
    # Unpenalised requests skip the penalty bookkeeping: a penalised one that inherits their slot
    # (one slot here, so every request does) still counts from zero.
    single = Engine(model, tokenizer, max_batch_size=1)
    for params in (penalised, GREEDY, SamplingParams(temperature=0.8, seed=1, max_new_tokens=24), penalised):
        result = single.generate(["the dog ran"], params)[0]
    assert result.token_ids == Engine(model, tokenizer).generate(["the dog ran"], penalised)[0].token_ids


def test_chinese_stream_has_no_replacement_characters(setup):
    model, tokenizer = setup
    # Text the tokenizer never saw is split into byte tokens, three per character: memorise it.
    unseen = "我们喜欢学习中文，今天天气很好。"
    model = train(copy.deepcopy(model).train(), torch.tensor(tokenizer.encode(unseen * 30)), steps=150)
    expected = alone(model, tokenizer, unseen[:4], 30)
    assert any(REPLACEMENT_CHAR in tokenizer.decode([t]) for t in expected)  # split characters
    deltas = list(
        Engine(model, tokenizer).stream(unseen[:4], SamplingParams(temperature=0.0, max_new_tokens=30))
    )
    text = "".join(deltas)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text)
    assert all(REPLACEMENT_CHAR not in d for d in deltas)
    assert text == tokenizer.decode(expected, skip_special_tokens=True)


def test_bad_prompts_are_rejected(setup):
    model, tokenizer = setup
    engine = Engine(model, tokenizer, max_seq_len=8)
    with pytest.raises(Exception, match="empty"):
        engine.submit([], GREEDY)
    with pytest.raises(Exception, match="context"):
        engine.submit(list(range(8)), GREEDY)


class _StopsOn:
    """The test tokenizer, with a chosen token as its end-of-sequence token."""

    def __init__(self, tokenizer, stop_token_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self.stop_token_ids = stop_token_ids

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_ignore_eos_runs_past_the_tokenizer_stops_but_not_stop_token_ids(setup):
    model, tokenizer = setup
    full = alone(model, tokenizer, "the cat sat", 24)
    eos = full[5]  # a token greedy decoding produces: make it the end of sequence
    engine = Engine(model, _StopsOn(tokenizer, [eos]))
    plain, ignoring, explicit = engine.generate(
        ["the cat sat"] * 3,
        [GREEDY, SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True),
         SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True, stop_token_ids=[eos])],
    )  # fmt: skip
    assert plain.finish_reason == "stop" and plain.token_ids == full[: full.index(eos)]
    assert ignoring.finish_reason == "length" and ignoring.token_ids == full
    assert explicit.token_ids == plain.token_ids


def test_compiled_decode_gives_the_eager_tokens(setup):
    """torch.compile'd decoding (padded batch and span buckets) matches eager decoding: requests
    leave at different steps (gaps in the slots), one joins mid-batch, spans cross buckets."""
    model, tokenizer = setup
    lengths = [60, 7, 15]
    params = [SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True) for n in lengths]
    late_params = SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True)

    def run(compile: bool) -> list[list[int]]:
        engine = Engine(model, tokenizer, max_batch_size=4, compile=compile)
        requests = [engine.submit(p, q) for p, q in zip(PROMPTS[:3], params, strict=True)]
        for _ in range(10):
            engine.step()
        requests.append(engine.submit(PROMPTS[3], late_params))
        while engine.has_work:
            engine.step()
        assert engine.runner.compiled is None or not engine.runner.compiled.failed
        return [r.result.token_ids for r in requests]

    assert run(compile=True) == run(compile=False)


def test_compiled_engines_of_two_models_in_one_process_each_run_their_own_graph(setup):
    """Compiled decode skips dynamo's guards for buckets it has run before. Two engines share the
    compiled function; with a float and an int8 model stepping in turn, each must still run the
    graph compiled for its own model: the tokens are those each gives on its own."""
    model, tokenizer = setup
    int8_model = copy.deepcopy(model)
    quantize_int8(int8_model)
    params = SamplingParams(temperature=0.0, max_new_tokens=40, ignore_eos=True)

    def start(network: CausalLM) -> tuple[Engine, list]:
        engine = Engine(network, tokenizer, max_batch_size=2, compile=True)
        return engine, [engine.submit(prompt, params) for prompt in PROMPTS[:2]]

    alone = []
    for network in (model, int8_model):
        torch._dynamo.reset()
        engine, requests = start(network)
        while engine.has_work:
            engine.step()
        alone.append([r.result.token_ids for r in requests])

    torch._dynamo.reset()
    started = [start(model), start(int8_model)]
    while any(engine.has_work for engine, _ in started):
        for engine, _ in started:
            engine.step()
    for (engine, requests), expected in zip(started, alone, strict=True):
        assert not engine.runner.compiled.failed
        assert [r.result.token_ids for r in requests] == expected


def test_compiled_int8_decode_with_int8_activations_gives_the_eager_tokens(setup, monkeypatch):
    """Large enough int8 products quantise their activations as well, in the compiled step as
    eagerly; the tokens agree, and the batch's bucket replays. The test model's products are far
    below the size where that starts, so here it starts at any size."""
    monkeypatch.setattr(wren.model.quant, "INT8_ACTIVATION_MIN_MACS", 1)
    model, tokenizer = setup
    int8_model = copy.deepcopy(model)
    quantize_int8(int8_model)
    params = SamplingParams(temperature=0.0, max_new_tokens=30, ignore_eos=True)
    prompts = PROMPTS * 2

    def run(compile: bool) -> list[list[int]]:
        with kernels.disabled():  # Wren's own kernel would take these few rows (tested below)
            engine = Engine(int8_model, tokenizer, max_batch_size=16, compile=compile)
            results = engine.generate(prompts, params)
        assert engine.runner.compiled is None or engine.runner.compiled._replays
        return [r.token_ids for r in results]

    torch._dynamo.reset()
    assert run(compile=True) == run(compile=False)


def test_compiled_int8_decode_on_wrens_kernel_gives_the_eager_tokens(setup):
    """With Wren's int8 kernel built, a compiled step of a batch (three streams, a bucket of four
    rows) calls it for every product (inductor calls it as an opaque op) and still replays; the
    tokens are the eager engine's, which runs the kernel too. (One or two rows compile to
    inductor's reduction instead, as without the kernel.)"""
    if not kernels.int8_linear_ready():
        pytest.skip("Wren's int8 kernel does not build here")
    model, tokenizer = setup
    int8_model = copy.deepcopy(model)
    quantize_int8(int8_model)
    params = SamplingParams(temperature=0.0, max_new_tokens=30, ignore_eos=True)

    def run(compile: bool) -> tuple[list[list[int]], int]:
        engine = Engine(int8_model, tokenizer, max_batch_size=4, compile=compile)
        with torch.profiler.profile() as profile:
            results = engine.generate(PROMPTS[:3], params)
        assert engine.runner.compiled is None or engine.runner.compiled._replays
        ops = ("wren_cpu::int8_linear", "wren_cpu::int8_linears")
        calls = sum(event.count for event in profile.key_averages() if event.key in ops)
        return [r.token_ids for r in results], calls

    torch._dynamo.reset()
    (compiled, compiled_calls), (eager, eager_calls) = run(compile=True), run(compile=False)
    assert compiled == eager
    # Per step, in each of two layers: q, k and v together, o, gate and up together, down; then
    # the output layer.
    calls_per_step = 2 * 4 + 1
    assert compiled_calls >= 30 * calls_per_step and eager_calls >= 30 * calls_per_step


def compiled_and_eager_logits(
    model: CausalLM, compiled: CompiledDecode, eager: KVCache, slots: list[int], position: int, token: int
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One decode step of every slot at `position`, compiled and eagerly, from the same cache: the
    eager cache first takes the compiled one's contents (padding rows write into free slots)."""
    for ours, theirs in zip(
        eager.keys + eager.values, compiled.cache.keys + compiled.cache.values, strict=True
    ):
        ours.copy_(theirs)
    ids, positions = [token] * len(slots), [position] * len(slots)
    got = compiled(slots, ids, positions)
    expected = model(
        torch.tensor(ids)[:, None], positions=torch.tensor(positions)[:, None],
        cache=eager, cache_rows=torch.tensor(slots),
    ).logits[:, -1]  # fmt: skip
    return got, expected


@pytest.mark.parametrize("replay", [True, False])
def test_compiled_decode_compiles_every_bucket_past_dynamos_default_limit(setup, replay):
    """Batch buckets 1 to 16, cache rows in order and gathered, spans 64 to 256: more compiled
    variants than dynamo's default limit of 8, which would have left the rest uncompiled. Every
    call matches eager decoding: the first in a bucket (all guards), the second (recorded for
    replay, or skipping the guards) and the third (replayed, or skipping the guards)."""
    model, _ = setup
    torch._dynamo.reset()  # other tests' variants of the step count towards the limit
    compiled = CompiledDecode(model, KVCache(model.config, 16, 256), replay=replay)
    eager = KVCache(model.config, 16, 256)
    with torch.inference_mode():
        for _ in range(3):
            for n, gathered, position in itertools.product((1, 2, 3, 5, 9), (False, True), (10, 100, 200)):
                slots = list(range(16 - n, 16))[::-1] if gathered else list(range(n))
                got, expected = compiled_and_eager_logits(model, compiled, eager, slots, position, token=7)
                assert got is not None
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not compiled.failed
    # A bucket left uncompiled would have made its guard-skipping call fail, and its flag False.
    assert len(compiled._checked) == 5 * 2 * 3 and all(compiled._checked.values())
    if replay:  # every bucket recorded its one call into the compiled graph, and replayed it
        assert len(compiled._replays) == 5 * 2 * 3 and None not in compiled._replays.values()
    else:
        assert not compiled._replays


def test_a_recorded_step_that_does_not_rewrite_the_cache_is_not_replayed():
    """The check on recording a step for replay: the repeated call must give the logits again and
    write the cache entries the step wrote, not only the logits (a graph that left the cache update
    to the wrappers around it would replay without filling the cache)."""
    cache = torch.zeros(2, 3)
    logits = torch.arange(4.0)
    written = [cache[1]]
    written[0].fill_(5.0)  # what the recorded step wrote

    def forgetful_graph(inputs: list) -> tuple[torch.Tensor]:
        return (logits.clone(),)

    def graph(inputs: list) -> tuple[torch.Tensor]:
        cache[1].fill_(5.0)
        return (logits.clone(),)

    assert _verified_replay([(forgetful_graph, [], (logits,))], logits, written) is None
    assert torch.equal(cache[1], torch.full((3,), 5.0))  # put back as the step left it
    replay = _verified_replay([(graph, [], (logits,))], logits, written)
    assert replay is not None and torch.equal(replay(), logits)
    assert _verified_replay([(graph, [], (logits,))] * 2, logits, written) is None  # two graph calls
    assert _verified_replay([(graph, [], (logits.clone(),))], logits, written) is None  # not its output


def test_compiled_decode_of_a_mixture_of_experts_matches_eager():
    """MoE layers compile with graph breaks: a step makes several calls into compiled graphs, so
    it is not replayed, and skipping guards fails on the resumed frames: the step then runs again
    with every guard checked, and still matches eager decoding."""
    torch.manual_seed(0)
    config = preset_config(
        "micro", vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=4, expert_ffn_dim=64
    )
    model = CausalLM(config).eval()
    compiled = CompiledDecode(model, KVCache(config, 4, 128))
    eager = KVCache(config, 4, 128)
    with torch.inference_mode():
        for _ in range(2):
            for n, position in itertools.product((1, 2), (5, 70)):
                got, expected = compiled_and_eager_logits(
                    model, compiled, eager, list(range(n)), position, token=11
                )
                assert got is not None
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not compiled.failed
    assert compiled._replays and set(compiled._replays.values()) == {None}
