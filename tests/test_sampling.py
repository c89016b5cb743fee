"""Batched sampling agrees with Hugging Face's processors, rows stay independent, seeds reproduce."""

import math

import pytest
import torch

from wren.errors import WrenError
from wren.infer import sampling
from wren.infer.sampling import (
    ACCEPTED_KEYS,
    SamplingParams,
    _inverse_cdf,
    apply_penalties,
    make_generator,
    sample,
    update_counts,
    warp_logits,
)

VOCAB = 64


def random_logits(rows: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def mixed_params() -> list[SamplingParams]:
    """One row per combination worth checking, including the no-op and extreme ends."""
    return [
        SamplingParams(),
        SamplingParams(temperature=0.7),
        SamplingParams(top_k=5),
        SamplingParams(top_k=1),
        SamplingParams(top_k=VOCAB + 10),
        SamplingParams(top_p=0.9),
        SamplingParams(top_p=0.3, temperature=1.5),
        SamplingParams(min_p=0.1),
        SamplingParams(min_p=1.0),
        SamplingParams(temperature=0.5, top_k=20, top_p=0.8, min_p=0.05),
        SamplingParams(temperature=2.0, top_k=10, top_p=0.95),
        SamplingParams(temperature=0.0, top_k=3),
    ]


@pytest.fixture
def hf():
    """Hugging Face's logits processors, the reference; only these tests need transformers."""
    return pytest.importorskip("transformers.generation.logits_process")


def hf_warp(hf, row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    scores = row[None].clone()
    ids = torch.zeros(1, 1, dtype=torch.long)
    if not p.greedy and p.temperature != 1.0:
        scores = hf.TemperatureLogitsWarper(float(p.temperature))(ids, scores)
    if p.top_k:
        scores = hf.TopKLogitsWarper(p.top_k)(ids, scores)
    if p.top_p < 1.0:
        scores = hf.TopPLogitsWarper(p.top_p)(ids, scores)
    if p.min_p > 0:
        scores = hf.MinPLogitsWarper(p.min_p)(ids, scores)
    return scores[0]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("vocab", "scale"), [(VOCAB, 3.0), (5000, 0.3), (5000, 8.0)])
def test_warping_keeps_the_tokens_transformers_keeps(hf, seed: int, vocab: int, scale: float):
    # A large vocabulary exercises the partial sort: peaked logits (scale 8) keep top-p among the
    # best candidates, flat ones (scale 0.3) spill over into a full sort.
    params = [
        *mixed_params(),
        SamplingParams(top_p=0.5),
        SamplingParams(top_k=3000, top_p=0.99),
        SamplingParams(top_k=40, top_p=0.95, temperature=0.6),
    ]
    logits = torch.randn(len(params), vocab, generator=torch.Generator().manual_seed(seed)) * scale
    ours = warp_logits(logits, params)
    for b, p in enumerate(params):
        theirs = hf_warp(hf, logits[b], p)
        assert torch.equal(torch.isinf(ours[b]), torch.isinf(theirs)), p
        kept = ~torch.isinf(theirs)
        torch.testing.assert_close(ours[b][kept], theirs[kept], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("scale", "passes"), [(8.0, 1), (0.3, 2)])
def test_top_p_sorts_everything_only_when_the_candidates_fall_short(monkeypatch, scale: float, passes: int):
    calls = []
    original = sampling._rank_cutoffs

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(sampling, "_rank_cutoffs", counting)
    logits = torch.randn(2, 5000, generator=torch.Generator().manual_seed(0)) * scale
    warp_logits(logits, [SamplingParams(top_p=0.9), SamplingParams(top_k=10)])
    assert len(calls) == passes
    if passes == 2:
        assert calls[1] == (1, 5000), "only the spilling row is redone"


def test_top_k_keeps_ties_like_transformers():
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.5]])
    ours = warp_logits(logits, [SamplingParams(top_k=2)])
    assert torch.isinf(ours).tolist() == [[True, False, False, False, True]]


def test_repetition_penalty_matches_transformers_over_prompt_and_output(hf):
    gen = torch.Generator().manual_seed(1)
    penalties = [1.0, 1.3, 0.7, 2.0]
    logits = random_logits(len(penalties), seed=1)
    prompts = [torch.randint(VOCAB, (n,), generator=gen) for n in (5, 9, 3, 12)]
    outputs = [torch.randint(VOCAB, (n,), generator=gen) for n in (0, 4, 7, 2)]
    counts = torch.zeros(len(penalties), VOCAB, dtype=torch.int32)
    prompt_mask = torch.zeros(len(penalties), VOCAB, dtype=torch.bool)
    for b, (prompt, output) in enumerate(zip(prompts, outputs, strict=True)):
        prompt_mask[b, prompt] = True
        update_counts(counts, [b] * len(output), output)
    params = [SamplingParams(repetition_penalty=r) for r in penalties]
    ours = apply_penalties(logits, params, counts, prompt_mask)
    for b, r in enumerate(penalties):
        history = torch.cat([prompts[b], outputs[b]])[None]
        theirs = hf.RepetitionPenaltyLogitsProcessor(r)(history, logits[b : b + 1].clone())[0]
        torch.testing.assert_close(ours[b], theirs, rtol=0, atol=0)


def test_frequency_and_presence_penalise_output_tokens_only():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    counts = torch.tensor([[3, 1, 0, 0]])
    prompt_mask = torch.tensor([[False, False, True, False]])
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=2.0)
    ours = apply_penalties(logits, [p], counts, prompt_mask)
    # Token 0: 2/2 - 0.5*3 - 0.25; token 1: -1*2 - 0.5 - 0.25; token 2 (prompt only): 0.5/2; token 3 unseen.
    expected = torch.tensor([[1.0 - 1.5 - 0.25, -2.0 - 0.5 - 0.25, 0.25, 1.0]])
    torch.testing.assert_close(ours, expected)


def test_penalties_without_counts_are_a_bug():
    with pytest.raises(ValueError, match="output_counts"):
        sample(random_logits(1), [SamplingParams(presence_penalty=1.0)])


def test_greedy_rows_take_the_argmax_after_penalties():
    logits = random_logits(4, seed=2)
    counts = torch.zeros(4, VOCAB, dtype=torch.long)
    counts[:, logits[0].argmax()] = 1
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, top_p=0.1, min_p=0.5),
        SamplingParams(temperature=0, frequency_penalty=2.0, presence_penalty=2.0),
        SamplingParams(temperature=1e-6, repetition_penalty=1.5),
    ]
    expected = apply_penalties(logits, params, counts).argmax(-1)
    assert torch.equal(sample(logits, params, counts), expected)
    assert torch.equal(sample(logits[:2], params[:2]), logits[:2].argmax(-1))


@pytest.mark.parametrize(("vocab", "scale"), [(VOCAB, 3.0), (5000, 0.3), (5000, 8.0)])
def test_each_row_in_a_batch_equals_the_row_alone(vocab: int, scale: float):
    params = [*mixed_params(), SamplingParams(top_p=0.5), SamplingParams(top_k=3000, top_p=0.99)]
    for i, p in enumerate(params):
        p.seed = 100 + i
        p.frequency_penalty = 0.1 * (i % 3)
    logits = torch.randn(len(params), vocab, generator=torch.Generator().manual_seed(3)) * scale
    counts = torch.randint(0, 3, (len(params), vocab), generator=torch.Generator().manual_seed(3))
    warped = warp_logits(logits, params)
    batched = sample(logits, params, counts, generators=[make_generator(p) for p in params])
    for b, p in enumerate(params):
        assert torch.equal(warp_logits(logits[b : b + 1], [p])[0], warped[b]), p
        alone = sample(logits[b : b + 1], [p], counts[b : b + 1], generators=[make_generator(p)])
        assert int(alone) == int(batched[b]), p


def draw_stream(params: SamplingParams, steps: int, neighbours: int) -> list[int]:
    """Tokens for a seeded row over several steps, sharing each batch with `neighbours` other rows."""
    gen = make_generator(params)
    noise = torch.Generator().manual_seed(neighbours)
    out = []
    for step in range(steps):
        others = [
            SamplingParams(temperature=float(torch.rand(1, generator=noise)) * 2, top_k=int(step % 4) * 5)
            for _ in range(neighbours)
        ]
        others_gens = [
            make_generator(SamplingParams(seed=step)) if i % 2 else None for i in range(neighbours)
        ]
        position = neighbours // 2
        batch = [*others[:position], params, *others[position:]]
        gens = [*others_gens[:position], gen, *others_gens[position:]]
        logits = torch.randn(len(batch), VOCAB, generator=noise)
        logits[position] = random_logits(1, seed=step)[0]
        out.append(int(sample(logits, batch, generators=gens)[position]))
    return out


def test_seeded_rows_reproduce_and_ignore_their_neighbours():
    params = SamplingParams(seed=1234, temperature=1.2, top_p=0.95)
    alone = draw_stream(params, steps=30, neighbours=0)
    assert draw_stream(params, steps=30, neighbours=0) == alone
    assert draw_stream(params, steps=30, neighbours=3) == alone
    assert draw_stream(params, steps=30, neighbours=8) == alone
    assert draw_stream(SamplingParams(seed=4321, temperature=1.2, top_p=0.95), 30, 0) != alone


def chi_square(observed: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * observed.sum()
    keep = expected > 0
    assert observed[~keep].sum() == 0, "drew a token of probability zero"
    return float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())


# The 0.999 quantile of chi-square with 7 degrees of freedom is 24.3; draws are seeded, so this is fixed.
CHI2_LIMIT = 24.3


def test_unseeded_draws_follow_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    n = 40_000
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tokens = sample(logits.expand(n, -1), [SamplingParams()] * n)
    assert chi_square(torch.bincount(tokens, minlength=8).double(), logits.softmax(-1).double()) < CHI2_LIMIT


def test_seeded_draws_follow_the_filtered_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2]])
    p = SamplingParams(temperature=0.8, top_k=5, seed=7)
    gen = make_generator(p)
    tokens = torch.cat([sample(logits, [p], generators=[gen]) for _ in range(4000)])
    probs = warp_logits(logits, [p])[0].softmax(-1).double()
    assert (probs > 0).sum() == 5
    # Four free cells: the 0.999 quantile is 18.5.
    assert chi_square(torch.bincount(tokens, minlength=8).double(), probs) < 18.5


def test_inverse_cdf_never_picks_an_impossible_token():
    logits = torch.tensor([[-math.inf, 0.0, 1.0, -math.inf, 2.0, -math.inf]] * 4)
    u = torch.tensor([0.0, 0.5, 1.0 - 2**-53, 1.0], dtype=torch.float64)
    assert _inverse_cdf(logits, u).tolist() == [1, 4, 4, 4]


def test_extreme_penalties_still_sample_a_possible_token():
    # A repetition penalty near 0 divides positive logits of seen tokens by ~0: +inf (and 0 / 0
    # is NaN). Those tokens then share the draw; nothing outside the vocabulary comes out.
    logits = random_logits(3)
    logits[:, 5] = 0.0
    counts = torch.zeros(3, VOCAB, dtype=torch.int32)
    counts[:, :8] = 1
    params = [
        SamplingParams(repetition_penalty=1e-300),
        SamplingParams(repetition_penalty=1e-300, temperature=0.5, top_p=0.9),
        SamplingParams(repetition_penalty=1e300, top_k=5),
    ]
    for seed in range(20):
        torch.manual_seed(seed)
        tokens = sample(logits, params, counts).tolist()
        for row in (0, 1):
            assert tokens[row] in {t for t in range(8) if logits[row, t] > 0}
        assert 0 <= tokens[2] < VOCAB


def test_update_counts_accumulates_repeated_rows():
    counts = torch.zeros(3, 5, dtype=torch.int32)
    update_counts(counts, [0, 2, 0], torch.tensor([4, 1, 4]))
    update_counts(counts, torch.tensor([2]), torch.tensor([1]))
    assert counts.tolist() == [[0, 0, 0, 0, 2], [0] * 5, [0, 2, 0, 0, 0]]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": "0.7"}, "temperature must be a number"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -2}, "top_k must be >= 1"),
        ({"top_k": 2.5}, "top_k must be an integer"),
        ({"min_p": 1.5}, r"min_p must be in \[0, 1\]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\]"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"max_new_tokens": True}, "max_new_tokens must be an integer"),
        ({"stop": ["a"] * 17}, "at most 16"),
        ({"stop": ["ok", ""]}, "must not be empty"),
        ({"stop": [3]}, "stop must be a string or a list"),
        ({"stop_token_ids": [-1]}, "stop_token_ids must be >= 0"),
        ({"seed": 2**64}, "seed must be in"),
    ],
)
def test_validation_names_the_bad_field(fields: dict, message: str):
    with pytest.raises(WrenError, match=message):
        SamplingParams(**fields).validate()
    with pytest.raises(WrenError, match=message):
        SamplingParams.from_dict(fields)


def test_defaults_are_valid_and_openai_like():
    p = SamplingParams()
    p.validate()
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.max_new_tokens) == (1.0, 1.0, None, 0.0, 256)
    assert not p.greedy and SamplingParams(temperature=0).greedy


def test_from_dict_accepts_openai_and_vllm_names():
    p = SamplingParams.from_dict(
        {"max_tokens": 12, "stop": "\n", "temperature": None, "top_k": -1, "seed": -5, "stop_token_ids": [2]}
    )
    assert (p.max_new_tokens, p.stop, p.temperature, p.top_k, p.seed) == (12, ["\n"], 1.0, -1, -5)
    assert SamplingParams.from_dict({"max_completion_tokens": 3}).max_new_tokens == 3
    assert SamplingParams.from_dict({"max_tokens": 3, "max_new_tokens": 3}).max_new_tokens == 3
    assert {"max_tokens", "max_new_tokens", "top_p", "stop"} <= ACCEPTED_KEYS
    stops = ["a", "b"]
    assert SamplingParams.from_dict({"stop": stops}).stop is not stops


def test_from_dict_rejects_unknown_keys_and_conflicting_aliases():
    with pytest.raises(WrenError, match=r"unknown sampling parameter\(s\) 'temprature', 'topp'"):
        SamplingParams.from_dict({"temprature": 0.5, "topp": 0.9})
    with pytest.raises(WrenError, match="given twice"):
        SamplingParams.from_dict({"max_tokens": 3, "max_new_tokens": 4})
    with pytest.raises(WrenError, match="JSON object"):
        SamplingParams.from_dict(["temperature"])  # type: ignore[arg-type]
