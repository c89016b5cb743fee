"""Sampling parameters and batched next-token selection for the continuous-batching engine.

Every row of a batch may carry different parameters, so each knob becomes a per-row tensor and the
whole batch is processed at once. Processing follows vLLM, in this order:

1. penalties: repetition (prompt and output tokens), then frequency and presence (output tokens);
2. greedy rows (temperature 0) take the argmax here;
3. temperature, then top-k, top-p and min-p filtering (the order Hugging Face applies them);
4. one uniform draw per sampled row, from that row's own generator, turned into a token by
   inverse CDF, so a seeded row's tokens do not depend on the rows that share its batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from wren.errors import WrenError

# vLLM's cut-off: below it, dividing by the temperature can overflow float32, and the result is
# indistinguishable from greedy anyway.
GREEDY_TEMPERATURE = 1e-5
MAX_STOP_STRINGS = 16
# Top-p first looks among this many best logits: sorting all of a large vocabulary dominates the
# cost of sampling on a CPU.
TOP_P_CANDIDATES = 1024
# The seeds torch.Generator.manual_seed accepts.
_SEED_RANGE = (-(2**63), 2**64 - 1)

# OpenAI / vLLM spellings of our field names.
_ALIASES = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens"}


@dataclass
class SamplingParams:
    """How one request picks its tokens. Defaults match OpenAI's: plain sampling at temperature 1.

    A temperature below GREEDY_TEMPERATURE (0 included) means greedy decoding. top_k of None, 0
    or -1 (vLLM's spelling) means no top-k limit. The stop fields and max_new_tokens are read by
    the engine, not by `sample`.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    # Keep sampling past the tokenizer's end-of-sequence tokens (benchmarks, vLLM's name);
    # stop_token_ids and stop strings still apply.
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SamplingParams:
        """Parameters from a JSON-like mapping that may use OpenAI / vLLM names.

        `max_tokens` and `max_completion_tokens` are aliases of `max_new_tokens`; `stop` may be
        one string; a value of None means "use the default", as OpenAI clients send it. Unknown
        keys are an error, so a misspelt knob is never silently ignored. The result is validated.
        """
        if not isinstance(values, Mapping):
            raise WrenError(f"sampling parameters must be a JSON object, got {type(values).__name__}")
        unknown = sorted(str(k) for k in values if k not in ACCEPTED_KEYS)
        if unknown:
            raise WrenError(
                f"unknown sampling parameter(s) {', '.join(map(repr, unknown))}; "
                f"accepted: {', '.join(sorted(ACCEPTED_KEYS))}"
            )
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if value is None:
                continue
            name = _ALIASES.get(key, key)
            if name in kwargs and kwargs[name] != value:
                raise WrenError(f"sampling parameter {name!r} is given twice with different values")
            kwargs[name] = value
        if isinstance(kwargs.get("stop"), str):
            kwargs["stop"] = [kwargs["stop"]]
        for name in ("stop", "stop_token_ids"):
            # Copy so later edits to the caller's list cannot change these parameters.
            if isinstance(kwargs.get(name), (list, tuple)):
                kwargs[name] = list(kwargs[name])
        params = cls(**kwargs)
        params.validate()
        return params

    def with_overrides(self, values: Mapping[str, Any]) -> SamplingParams:
        """These parameters with `values` (a mapping as `from_dict` takes it) put over them."""
        given = {_ALIASES.get(key, key) for key, value in values.items() if value is not None}
        kept = {name: value for name, value in asdict(self).items() if name not in given}
        return SamplingParams.from_dict({**kept, **values})

    def validate(self) -> None:
        """Raise WrenError naming the first field that is out of range (ranges as in OpenAI / vLLM)."""
        _check_number("temperature", self.temperature, 0.0, math.inf, "must be >= 0")
        _check_number("top_p", self.top_p, 0.0, 1.0, "must be in (0, 1]", low_open=True)
        if self.top_k is not None:
            _check_int("top_k", self.top_k)
            if self.top_k < -1:
                raise WrenError(f"top_k must be >= 1, or 0 / -1 / null for no limit, got {self.top_k}")
        _check_number("min_p", self.min_p, 0.0, 1.0, "must be in [0, 1]")
        _check_number(
            "repetition_penalty", self.repetition_penalty, 0.0, math.inf, "must be > 0", low_open=True
        )
        _check_number("presence_penalty", self.presence_penalty, -2.0, 2.0, "must be in [-2, 2]")
        _check_number("frequency_penalty", self.frequency_penalty, -2.0, 2.0, "must be in [-2, 2]")
        _check_int("max_new_tokens", self.max_new_tokens)
        if self.max_new_tokens < 1:
            raise WrenError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise WrenError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise WrenError(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        if any(s == "" for s in self.stop):
            raise WrenError("stop strings must not be empty")
        if not isinstance(self.stop_token_ids, list):
            raise WrenError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        for token in self.stop_token_ids:
            _check_int("stop_token_ids entry", token)
            if token < 0:
                raise WrenError(f"stop_token_ids must be >= 0, got {token}")
        if self.seed is not None:
            _check_int("seed", self.seed)
            if not _SEED_RANGE[0] <= self.seed <= _SEED_RANGE[1]:
                raise WrenError(f"seed must be in [{_SEED_RANGE[0]}, {_SEED_RANGE[1]}], got {self.seed}")
        if not isinstance(self.ignore_eos, bool):
            raise WrenError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")


ACCEPTED_KEYS: frozenset[str] = frozenset({f.name for f in fields(SamplingParams)} | set(_ALIASES))


def _check_number(
    name: str, value: object, low: float, high: float, rule: str, low_open: bool = False
) -> None:
    # bool is an int subclass, but `"temperature": true` in JSON is a mistake, not 1.0.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WrenError(f"{name} must be a number, got {value!r}")
    # Written so that NaN fails every comparison and is rejected.
    inside_low = low < value if low_open else low <= value
    if not (inside_low and value <= high and math.isfinite(value)):
        raise WrenError(f"{name} {rule}, got {value}")


def _check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise WrenError(f"{name} must be an integer, got {value!r}")


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A CPU generator seeded from params.seed, or None for an unseeded request.

    CPU generators keep a seeded request's draws the same whichever device runs the model.
    """
    if params.seed is None:
        return None
    return torch.Generator(device="cpu").manual_seed(params.seed)


def update_counts(
    counts: torch.Tensor, rows: torch.Tensor | Sequence[int], tokens: torch.Tensor
) -> torch.Tensor:
    """Add one to counts[rows[i], tokens[i]] for each i, in place; returns counts.

    counts is the (batch, vocab) integer tensor of output-token counts that `sample` reads.
    """
    rows = torch.as_tensor(rows, dtype=torch.long, device=counts.device)
    tokens = tokens.to(device=counts.device, dtype=torch.long)
    # accumulate=True keeps the count right even if a row appears twice.
    counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=counts.dtype), accumulate=True)
    return counts


def _row_tensor(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)


def apply_penalties(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    output_counts: torch.Tensor | None,
    prompt_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Penalised copy of (batch, vocab) logits, as vLLM computes them.

    output_counts[b, v] is how often token v occurs in row b's generated tokens; prompt_mask[b, v]
    is True when v occurs in row b's prompt (None: prompts are not penalised). A token seen in
    the prompt or the output has a positive logit divided, or a negative one multiplied, by
    repetition_penalty (Hugging Face and vLLM agree on this). Then, from output tokens only,
    frequency_penalty * count + presence_penalty * (count > 0) is subtracted.
    """
    rows = [i for i, p in enumerate(params) if p.penalised]
    if not rows:
        return logits
    if output_counts is None:
        raise ValueError("penalties need output_counts")
    # Only the rows that ask for a penalty pay for it; most requests ask for none.
    index = torch.tensor(rows, device=logits.device)
    chosen = [params[i] for i in rows]
    penalised, counts = logits[index], output_counts[index]
    seen = counts > 0
    repetition = [p.repetition_penalty for p in chosen]
    if any(r != 1.0 for r in repetition):
        in_history = seen if prompt_mask is None else seen | prompt_mask[index]
        factor = _row_tensor(repetition, penalised)[:, None]
        scaled = torch.where(penalised > 0, penalised / factor, penalised * factor)
        penalised = torch.where(in_history, scaled, penalised)
    frequency = [p.frequency_penalty for p in chosen]
    if any(frequency):
        penalised = penalised - _row_tensor(frequency, penalised)[:, None] * counts.to(penalised.dtype)
    presence = [p.presence_penalty for p in chosen]
    if any(presence):
        penalised = penalised - _row_tensor(presence, penalised)[:, None] * seen.to(penalised.dtype)
    if len(rows) == len(params):
        return penalised
    return logits.index_copy(0, index, penalised)


def warp_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p: a copy of logits with filtered tokens at -inf.

    The filters keep the tokens Hugging Face's warpers keep: top-k the k highest logits, top-p
    the smallest top set whose probability reaches top_p, min-p those at least min_p times as
    likely as the top token. Each filter keeps every token tied with its last survivor. Greedy
    rows are left unscaled.
    """
    temperature = [1.0 if p.greedy else float(p.temperature) for p in params]
    if any(t != 1.0 for t in temperature):
        logits = logits / _row_tensor(temperature, logits)[:, None]
    floor = _cutoffs(logits, params)
    if floor is None:
        return logits
    return logits.masked_fill(logits < floor[:, None], -math.inf)


def _cutoffs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor | None:
    """Per row, the lowest logit that survives top-k, top-p and min-p; None when no row filters.

    All three filters keep a top set of the logits, so one threshold per row describes them, and
    the final mask costs a single pass over the vocabulary.
    """
    vocab = logits.shape[-1]
    top_k = [min(p.top_k, vocab) if p.top_k and p.top_k > 0 else vocab for p in params]
    top_p = [float(p.top_p) for p in params]
    min_p = [float(p.min_p) for p in params]
    ranked = [k < vocab or p < 1.0 for k, p in zip(top_k, top_p, strict=True)]
    if not (any(ranked) or any(min_p)):
        return None
    floor = torch.full((len(params),), -math.inf, device=logits.device)
    if any(ranked):
        floor = torch.where(
            torch.tensor(ranked, device=logits.device), _rank_cutoffs(logits, top_k, top_p), floor
        )
    if any(min_p):
        # probability < min_p * top probability  <=>  logit < top logit + log(min_p); log(0) = -inf.
        min_floor = logits.amax(-1) + _row_tensor(min_p, logits).log()
        floor = torch.maximum(floor, min_floor)
    return floor


def _rank_cutoffs(
    logits: torch.Tensor, top_k: list[int], top_p: list[float], width: int | None = None
) -> torch.Tensor:
    """Per row, the lowest logit kept by top-k then top-p (k == vocab, p == 1: no limit).

    Only the `width` best logits are sorted. That is enough for top-k, and for top-p whenever
    they hold top_p of the probability; other rows (flat distributions, top-k past the
    candidates) are redone over the whole sorted vocabulary, as Hugging Face always does. The
    width depends on the vocabulary and on whether any row uses top-p, never on other rows'
    values, so a row's cut-off is computed the same way whatever shares its batch.
    """
    vocab = logits.shape[-1]
    device = logits.device
    sampling_p = any(p < 1.0 for p in top_p)
    if width is None:
        # Without top-p, picking the k-th logit is exact whatever the width.
        width = min(vocab, TOP_P_CANDIDATES) if sampling_p else max(k for k in top_k if k < vocab)
    best = logits.topk(width, dim=-1).values  # sorted, highest first
    unlimited = torch.tensor([k == vocab for k in top_k], device=device)[:, None]
    last = torch.tensor([min(k, width) - 1 for k in top_k], device=device)[:, None]
    kth = torch.where(unlimited, -math.inf, best.gather(1, last))
    cut = kth.squeeze(1)
    spilled = torch.zeros_like(cut, dtype=torch.bool)
    if sampling_p:
        # As Hugging Face does: add probabilities from the least likely survivor up and drop the
        # tokens whose running total stays within 1 - top_p (taken in double precision).
        ascending = best.masked_fill(best < kth, -math.inf).flip(-1)
        probs = ascending.softmax(-1)
        outside = torch.zeros_like(kth)
        if width < vocab:
            # Without top-k, part of a row's probability lies beyond the candidates.
            spread = (ascending - logits.logsumexp(-1, keepdim=True)).exp()
            probs = torch.where(unlimited, spread, probs)
            outside = torch.where(unlimited, (1 - spread.sum(-1, keepdim=True)).clamp(min=0), outside)
        tail_mass = _row_tensor([1.0 - p for p in top_p], logits)[:, None]
        in_tail = outside + probs.cumsum(-1) <= tail_mass
        in_tail[:, -1] = False
        # The running total never decreases, so the dropped tokens are a prefix.
        first_kept = ascending.gather(1, in_tail.sum(-1, keepdim=True))
        limited = torch.tensor([p < 1.0 for p in top_p], device=device)[:, None]
        cut = torch.where(limited, torch.maximum(kth, first_kept), kth).squeeze(1)
        spilled = (limited & (outside > tail_mass)).squeeze(1)
    if width == vocab:
        return cut
    # Redo rows whose top-k reaches past the candidates, or whose top-p set spills beyond them.
    past = torch.tensor([width < k < vocab for k in top_k], device=device)
    redo = (past | spilled).nonzero().squeeze(1)
    if redo.numel():
        rows = redo.tolist()
        cut[redo] = _rank_cutoffs(logits[redo], [top_k[i] for i in rows], [top_p[i] for i in rows], vocab)
    return cut


def _uniforms(generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    # Exactly one draw per row from its own generator: a seeded row's stream then advances the
    # same way whatever else is in the batch. Unseeded rows share one call to the global RNG.
    draws = torch.empty(len(generators), dtype=torch.float64)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        draws[unseeded] = torch.rand(len(unseeded), dtype=torch.float64)
    for i, g in enumerate(generators):
        if g is not None:
            draws[i] = torch.rand(1, generator=g, dtype=torch.float64, device=g.device).item()
    return draws


def _inverse_cdf(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the token whose CDF interval holds uniforms[row] in [0, 1]; never a zero-probability one."""
    # Double precision keeps small intervals from vanishing in a long running sum (MPS has none).
    wide = torch.float32 if logits.device.type == "mps" else torch.float64
    # An extreme penalty or temperature can overflow logits to +inf (and inf - inf to NaN): the
    # infinite tokens then share the draw, instead of the softmax turning to NaN.
    logits = logits.nan_to_num(nan=-math.inf, posinf=torch.finfo(logits.dtype).max)
    cdf = logits.softmax(-1).cumsum(-1, dtype=wide)
    total = cdf[:, -1:]
    # Kept strictly below the total so the search cannot run off the end: the first entry above
    # the target then always ends a non-empty interval.
    target = torch.minimum(
        uniforms.to(device=cdf.device, dtype=wide)[:, None] * total, total.nextafter(total * 0)
    )
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    output_counts: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Next token (int64, shape (batch,)) for each row of (batch, vocab) logits.

    Row b follows params[b]; output_counts and prompt_mask are as in `apply_penalties` (needed
    only when some row uses a penalty). generators[b] (see `make_generator`) drives row b's single
    uniform draw per call; None rows draw from torch's global RNG. Greedy rows draw nothing and
    take the argmax of the penalised logits, which every filter keeps.
    """
    if logits.dim() != 2 or logits.shape[0] != len(params):
        raise ValueError(f"expected logits of shape ({len(params)}, vocab), got {tuple(logits.shape)}")
    if generators is None:
        generators = [None] * len(params)
    elif len(generators) != len(params):
        raise ValueError(f"expected {len(params)} generators, got {len(generators)}")
    if all(p.greedy and not p.penalised for p in params):
        # Nothing to penalise, warp or draw. The common case, and on a CPU, where the decode step
        # has just streamed every weight through the caches, each Python operation saved shows.
        return logits.argmax(-1)
    logits = apply_penalties(logits.float(), params, output_counts, prompt_mask)
    tokens = torch.empty(len(params), dtype=torch.long, device=logits.device)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        index = torch.tensor(greedy, device=logits.device)
        tokens[index] = logits[index].argmax(-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        rows = logits if len(sampled) == len(params) else logits[index]
        warped = warp_logits(rows, [params[i] for i in sampled])
        tokens[index] = _inverse_cdf(warped, _uniforms([generators[i] for i in sampled]))
    return tokens
