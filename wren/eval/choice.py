"""`wren eval choice`: multiple choice scored by the logits of the answer letters.

The prompt is MMLU's, as lm-evaluation-harness and MiniMind write it:

    The following are multiple choice questions (with answers) about <subject>.

    <shot question>
    A. ...
    B. ...
    Answer: B

    <question>
    A. ...
    B. ...
    Answer:

The model's answer is the letter whose token has the highest logit after "Answer:" (only the row's
own letters compete); where the vocabulary has no single token for " A", the letter's two tokens
(a space, then the letter) are scored by their joint log-probability, as lm-evaluation-harness
does.

Shots are the first K other rows of the same subject, from the same file or from a separate one
(MMLU's dev split); when a prompt does not fit the model's context, shots are dropped from the
end, and a prompt still too long keeps its last tokens.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import islice

import torch

from wren.errors import WrenError
from wren.eval.choice_data import LETTERS, ChoiceRow
from wren.eval.loading import document_prefix
from wren.eval.tables import format_table
from wren.model import CausalLM
from wren.tokenizer import Tokenizer

_HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"
_ANSWER_CUE = "Answer:"


def format_question(row: ChoiceRow, with_answer: bool = False) -> str:
    lines = [row.question.strip(), *(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(row.choices))]
    text = "\n".join(lines) + "\n" + _ANSWER_CUE
    return text + f" {LETTERS[row.answer]}\n\n" if with_answer else text


def build_prompt(row: ChoiceRow, shots: Sequence[ChoiceRow] = ()) -> str:
    header = _HEADER.format(subject=row.subject.replace("_", " "))
    return header + "".join(format_question(shot, with_answer=True) for shot in shots) + format_question(row)


@dataclass(frozen=True)
class LetterTokens:
    """How the letters " A", " B"... are read after "Answer:". Letter i scores log p(first[i]) at
    the prompt's last position, plus, when the vocabulary spells it with two tokens (a lone space,
    then the letter), log p(second[i]) after `bridge`, that shared first token, which is then
    appended to every prompt. One forward pass per question either way."""

    first: list[int]
    second: list[int | None]
    bridge: int | None


def letter_tokens(tokenizer: Tokenizer, count: int) -> LetterTokens:
    """The tokens of the first `count` letters written " A", " B"... after "Answer:"."""
    cue = tokenizer.encode(_ANSWER_CUE)
    spellings = []
    for letter in LETTERS[:count]:
        full = tokenizer.encode(f"{_ANSWER_CUE} {letter}")
        spellings.append(full[len(cue) :] if full[: len(cue)] == cue else tokenizer.encode(f" {letter}"))
    bridges = {ids[0] for ids in spellings if len(ids) == 2}
    usable = all(1 <= len(ids) <= 2 for ids in spellings) and len(bridges) <= 1
    if not usable or len({tuple(ids) for ids in spellings}) != count:
        raise WrenError(
            f"this tokenizer spells the answer letters A-{LETTERS[count - 1]} in ways that cannot be "
            "scored in one pass (each must be one token, or one shared token then the letter)"
        )
    bridge = bridges.pop() if bridges else None
    return LetterTokens(
        first=[ids[0] for ids in spellings],
        second=[ids[1] if len(ids) == 2 else None for ids in spellings],
        bridge=bridge,
    )


def select_shots(rows: Sequence[ChoiceRow], pool: Sequence[ChoiceRow], count: int) -> list[list[ChoiceRow]]:
    """For each row, the first `count` rows of `pool` with its subject, the row itself excluded."""
    by_subject: dict[str, list[ChoiceRow]] = defaultdict(list)
    for candidate in pool:
        by_subject[candidate.subject].append(candidate)
    shots = []
    for row in rows:
        same = (r for r in by_subject[row.subject] if (r.path, r.line) != (row.path, row.line))
        shots.append(list(islice(same, count)))
    return shots


def limit_per_subject(rows: Sequence[ChoiceRow], limit: int | None) -> list[ChoiceRow]:
    """The first `limit` rows of each subject, in file order (all rows without a limit)."""
    if limit is None:
        return list(rows)
    seen: dict[str, int] = defaultdict(int)
    kept = []
    for row in rows:
        if seen[row.subject] < limit:
            seen[row.subject] += 1
            kept.append(row)
    return kept


@dataclass
class SubjectScore:
    correct: int = 0
    total: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


@dataclass
class ChoiceResult:
    shots: int
    subjects: dict[str, SubjectScore] = field(default_factory=dict)
    predictions: list[int] = field(default_factory=list)  # per scored row, the chosen index
    letters: int = 0  # the most choices any question has
    fewer_shots: int = 0  # prompts that dropped shots to fit the context
    truncated: int = 0  # prompts cut on the left even with no shots

    @property
    def rows(self) -> int:
        return sum(score.total for score in self.subjects.values())

    @property
    def correct(self) -> int:
        return sum(score.correct for score in self.subjects.values())

    @property
    def accuracy(self) -> float:
        """Over all rows (micro average)."""
        return self.correct / self.rows if self.rows else 0.0

    @property
    def answers_given(self) -> dict[str, int]:
        """How often the model chose each letter: a model stuck on one letter scores that
        letter's share of the answers, which can look like chance."""
        counts = {letter: 0 for letter in LETTERS[: self.letters]}
        for choice in self.predictions:
            counts[LETTERS[choice]] += 1
        return counts

    @property
    def subject_mean(self) -> float:
        """The mean of the subjects' accuracies (macro average)."""
        scores = [score.accuracy for score in self.subjects.values()]
        return sum(scores) / len(scores) if scores else 0.0

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "subject_mean": self.subject_mean,
            "shots": self.shots,
            "fewer_shots": self.fewer_shots,
            "truncated": self.truncated,
            "answers_given": self.answers_given,
            "subjects": {
                name: {"correct": s.correct, "total": s.total, "accuracy": s.accuracy}
                for name, s in sorted(self.subjects.items())
            },
        }


def _prompt_ids(
    row: ChoiceRow, shots: list[ChoiceRow], tokenizer: Tokenizer, start: list[int], end: list[int], room: int
) -> tuple[list[int], int, bool]:
    """(ids, shots used, cut on the left)."""
    for used in range(len(shots), -1, -1):
        ids = start + tokenizer.encode(build_prompt(row, shots[:used])) + end
        if len(ids) <= room:
            return ids, used, False
    return ids[-room:], 0, True


@torch.inference_mode()
def evaluate_choice(
    model: CausalLM,
    tokenizer: Tokenizer,
    rows: Sequence[ChoiceRow],
    shots: int = 0,
    shot_pool: Sequence[ChoiceRow] | None = None,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> ChoiceResult:
    """Score every row; shots come from `shot_pool` (default: `rows` themselves).
    `progress(questions done, prompt tokens read)` is called after each batch."""
    if batch_size < 1 or shots < 0:
        raise ValueError("batch_size must be >= 1 and shots >= 0")
    letters = letter_tokens(tokenizer, max(len(row.choices) for row in rows))
    start, room = document_prefix(tokenizer), model.config.max_seq_len
    end = [] if letters.bridge is None else [letters.bridge]
    result = ChoiceResult(shots=shots, letters=len(letters.first))
    prompts = []
    for row, row_shots in zip(rows, select_shots(rows, shot_pool or rows, shots), strict=True):
        ids, used, cut = _prompt_ids(row, row_shots, tokenizer, start, end, room)
        result.fewer_shots += used < len(row_shots)
        result.truncated += cut
        prompts.append(ids)

    device = next(model.parameters()).device
    first = torch.tensor(letters.first, device=device)
    two_tokens = torch.tensor([t is not None for t in letters.second], device=device)
    second = torch.tensor([t or 0 for t in letters.second], device=device)
    predictions = [0] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]), reverse=True)  # little padding
    tokens_read = 0
    for done in range(0, len(order), batch_size):
        batch = order[done : done + batch_size]
        lengths = torch.tensor([len(prompts[i]) for i in batch], device=device)
        inputs = torch.full((len(batch), int(lengths.max())), tokenizer.pad_token_id, dtype=torch.long)
        for b, i in enumerate(batch):
            inputs[b, : len(prompts[i])] = torch.tensor(prompts[i])
        # Padding on the right; each row's next-token logits sit at its own last position (the
        # bridge's, when there is one: the prompt's own last position is the one before).
        logits = model(inputs.to(device)).logits
        rows_index = torch.arange(len(batch), device=device)
        before_bridge = lengths - 1 - len(end)
        scores = logits[rows_index, before_bridge].float().log_softmax(-1)[:, first]
        if end:
            after = logits[rows_index, lengths - 1].float().log_softmax(-1)[:, second]
            scores = scores + torch.where(two_tokens, after, torch.zeros_like(after))
        n_choices = torch.tensor([len(rows[i].choices) for i in batch], device=device)
        scores[torch.arange(scores.shape[1], device=device)[None] >= n_choices[:, None]] = float("-inf")
        for i, choice in zip(batch, scores.argmax(dim=1).tolist(), strict=True):
            predictions[i] = choice
        tokens_read += int(lengths.sum())
        if progress is not None:
            progress(done + len(batch), tokens_read)

    for row, choice in zip(rows, predictions, strict=True):
        score = result.subjects.setdefault(row.subject, SubjectScore())
        score.total += 1
        score.correct += choice == row.answer
    result.predictions = predictions
    return result


def format_choice(result: ChoiceResult) -> str:
    rows = [
        (name, score.total, score.correct, f"{100 * score.accuracy:.1f}%")
        for name, score in sorted(result.subjects.items())
    ]
    rows.append(("overall", result.rows, result.correct, f"{100 * result.accuracy:.1f}%"))
    lines = [format_table(("subject", "rows", "correct", "accuracy"), rows)]
    if len(result.subjects) > 1:
        lines.append(f"mean of {len(result.subjects)} subjects: {100 * result.subject_mean:.1f}%")
    lines.append("answers given: " + ", ".join(f"{k} {v:,}" for k, v in result.answers_given.items()))
    lines.append(f"{result.shots}-shot")
    if result.fewer_shots or result.truncated:
        lines[-1] += (
            f"; {result.fewer_shots} prompts dropped shots to fit the context, "
            f"{result.truncated} were cut on the left"
        )
    return "\n".join(lines)
