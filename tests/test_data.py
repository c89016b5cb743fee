"""wren.data: validating JSONL, tokenised shards and their cache, the validation split, batching
for pretraining and packed SFT, and the bits-per-byte table.

Everything runs on real files in tmp_path with a real byte-level BPE tokenizer trained once on a
small demo corpus; nothing is mocked.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from wren.data import shards
from wren.data.batching import IGNORE_INDEX, PackedSFTBatches, PretrainBatches, eval_batches, pack_documents
from wren.data.bpb import target_bytes, token_byte_lengths
from wren.data.chat import encode_conversation, end_of_text_id
from wren.data.demo import write_demo_corpus
from wren.data.formats import (
    SkipCounter,
    check_files,
    detect_kind,
    expand_paths,
    format_check_report,
    iter_rows,
    row_problem,
)
from wren.data.shards import TokenDataset, prepare_datasets, token_dtype, write_token_dataset
from wren.data.split import is_validation
from wren.errors import WrenError
from wren.model import CausalLM, preset_config
from wren.tokenizer import ENDOFTEXT, IM_END, Tokenizer, train_tokenizer

VOCAB_SIZE = 768
SEQ_LEN = 256


# ---------------------------------------------------------------------------------------------
# Helpers and shared data


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def write_lines(path: Path, lines: list[Any]) -> Path:
    """One line per item: dicts as JSON, strings as written, bytes as raw bytes."""
    encoded = []
    for line in lines:
        if isinstance(line, dict):
            line = json.dumps(line, ensure_ascii=False)
        encoded.append(line if isinstance(line, bytes) else line.encode("utf-8"))
    path.write_bytes(b"\n".join(encoded) + b"\n")
    return path


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def documents(dataset: TokenDataset) -> list[list[int]]:
    return [dataset.document(i).tolist() for i in range(len(dataset))]


def trained_replies(messages: list[dict[str, str]]) -> list[str]:
    """What the loss mask should cover, as text: every answering assistant reply and its end token."""
    return [m["content"] + IM_END for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0]


def runs_of_ones(ids: list[int], mask: list[int]) -> list[list[int]]:
    """The ids under each maximal run of 1s in mask."""
    groups = itertools.groupby(zip(ids, mask, strict=True), key=lambda pair: pair[1])
    return [[token for token, _ in group] for flag, group in groups if flag]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_demo_corpus(tmp_path_factory.mktemp("corpus"), max_mb=0.1, max_conversations=300)


@pytest.fixture(scope="module")
def tokenizer(corpus: dict[str, Path]) -> Tokenizer:
    return train_tokenizer([corpus["pretrain"], corpus["sft"]], vocab_size=VOCAB_SIZE)


@pytest.fixture(scope="module")
def tokenizer_dir(tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tokenizer.save(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def pretrain_data(corpus: dict[str, Path], tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory):
    return prepare_datasets(
        [corpus["pretrain"]], tokenizer, "pretrain", tmp_path_factory.mktemp("cache"), 0.1, progress=False
    )


# Replies here start with a non-space character: a reply that opens with whitespace shares its
# first token with the newline after "<|im_start|>assistant", and a token counts as the reply's
# only when it starts inside the reply (see encode_conversation).
HANDMADE_CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a terse assistant."},
        user("Say hello in Chinese."),
        assistant("你好！🎉 That is hello."),
        user("And with an emoji family?"),
        assistant("👨‍👩‍👧 你好, 世界"),
    ],
    # Opening with an assistant message: it answers nothing, so it is context, not a target.
    [assistant("Welcome back."), user("thanks"), assistant("Any time.\n\nBye.")],
    [
        user("Think first."),
        assistant("<think>\nshort thought\n</think>\n\nThe answer, after thinking."),
    ],
    [user("one"), assistant("1"), user("two"), assistant("2"), user("three"), assistant("3")],
]


@pytest.fixture(scope="module")
def sft_rows(corpus: dict[str, Path], tokenizer: Tokenizer) -> list[list[dict[str, str]]]:
    """Demo conversations short enough to fit one row of SEQ_LEN, plus the handmade ones above."""
    rows = [row["conversations"] for row in read_rows(corpus["sft"])]
    fitting = [m for m in rows if len(encode_conversation(tokenizer, m)[0]) <= SEQ_LEN]
    assert len(fitting) > 200
    return fitting + HANDMADE_CONVERSATIONS


@pytest.fixture(scope="module")
def sft_data(sft_rows, tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("sft")
    path = write_lines(directory / "sft.jsonl", [{"conversations": m} for m in sft_rows])
    return prepare_datasets([path], tokenizer, "sft", directory / "cache", val_fraction=0.0, progress=False)


# ---------------------------------------------------------------------------------------------
# Validation: every problem named with file:line


GOOD_ROWS = {
    "pretrain": {"text": "A perfectly good document."},
    "sft": {"conversations": [user("hi"), assistant("hello")]},
    "preference": {
        "chosen": [user("2+2?"), assistant("4")],
        "rejected": [user("2+2?"), assistant("5")],
    },
}

BAD_ROWS = [
    # (kind, the bad line, what its problem says)
    ("pretrain", '{"text": "no closing quote}', "invalid JSON"),
    ("pretrain", '["a", "list"]', "found a JSON array; expected a JSON object"),
    ("pretrain", b'{"text": "caf\xe9"}', "not valid UTF-8"),
    ("pretrain", {"txt": "typo"}, 'missing "text" field (keys found: txt)'),
    ("pretrain", {"text": 42}, '"text" is a JSON number; expected a string'),
    ("pretrain", {"text": ["a"]}, '"text" is a JSON array; expected a string'),
    ("pretrain", {"text": " \n\t "}, "empty text"),
    ("sft", {"messages": []}, 'missing "conversations" field (keys found: messages)'),
    ("sft", {"conversations": "hi"}, '"conversations" is a JSON string; expected a list'),
    ("sft", {"conversations": []}, '"conversations" is empty'),
    ("sft", {"conversations": ["hi", assistant("a")]}, "conversations[0] is a JSON string"),
    ("sft", {"conversations": [{"content": "hi"}, assistant("a")]}, 'conversations[0] has no "role"'),
    (
        "sft",
        {"conversations": [{"role": "bot", "content": "hi"}, assistant("a")]},
        'conversations[0] has unknown role "bot"; expected system, user or assistant',
    ),
    ("sft", {"conversations": [user("hi"), {"role": "assistant"}]}, 'conversations[1] has no "content"'),
    (
        "sft",
        {"conversations": [user("hi"), {"role": "assistant", "content": None}]},
        '"content" of conversations[1] is a JSON null; expected a string',
    ),
    (
        "sft",
        {"conversations": [user("hi"), assistant("a"), user("and?")]},
        '"conversations" does not end with an assistant turn (the last message is user)',
    ),
    (
        "sft",
        {"conversations": [user("hi"), assistant("  \n")]},
        "conversations[1] is an empty assistant reply",
    ),
    (
        "preference",
        {"chosen": [user("q"), assistant("a")]},
        'missing "rejected" field (keys found: chosen)',
    ),
    (
        "preference",
        {"chosen": [user("q")], "rejected": [user("q"), assistant("b")]},
        '"chosen" does not end with an assistant turn',
    ),
    (
        "preference",
        {
            "chosen": [user("q"), assistant("a")],
            "rejected": [{"role": "human", "content": "q"}, assistant("b")],
        },
        'rejected[0] has unknown role "human"',
    ),
    (
        "preference",
        {"chosen": [user("q"), assistant("a")], "rejected": [user("other q"), assistant("b")]},
        "chosen and rejected differ before their last message",
    ),
    (
        "preference",
        {"chosen": [user("q"), assistant("same")], "rejected": [user("q"), assistant("same")]},
        "chosen and rejected end with the same reply",
    ),
]


@pytest.mark.parametrize(("kind", "bad", "expected"), BAD_ROWS, ids=[case[2][:40] for case in BAD_ROWS])
def test_each_problem_is_reported_with_file_and_line(tmp_path: Path, kind: str, bad: Any, expected: str):
    good = GOOD_ROWS[kind]
    # A blank line is skipped but still counted, so the bad row is on line 3 as an editor shows it.
    path = write_lines(tmp_path / "data.jsonl", [good, "", bad, good])
    if isinstance(bad, dict):
        assert expected in row_problem(kind, bad)

    with pytest.raises(WrenError) as raised:
        list(iter_rows([path], kind))
    message = str(raised.value)
    assert message.startswith(f"{path}:3: "), message
    assert expected in message

    skipped = SkipCounter()
    rows = list(iter_rows([path], kind, skip_bad_lines=True, skipped=skipped))
    assert [row.line for row in rows] == [1, 4]
    assert all(row.data == good for row in rows)
    assert skipped.count == 1
    assert [str(problem) for problem in skipped.examples] == [message]

    for given_kind in (kind, None):  # named, or detected from the first row
        report = check_files([path], kind=given_kind)
        assert not report.ok
        assert report.files[0].kind == kind
        assert (report.rows, report.valid_rows) == (3, 2)
        assert [str(problem) for problem in report.problems] == [message]
        text = format_check_report(report)
        assert "1 problem:" in text
        assert f"  {message}" in text


def test_valid_rows_of_every_kind_pass(tmp_path: Path):
    for kind, row in GOOD_ROWS.items():
        assert row_problem(kind, row) is None
        assert detect_kind(row) == kind
        extra = {**row, "id": 7}  # extra keys are allowed and ignored
        assert row_problem(kind, extra) is None
        path = write_lines(tmp_path / f"{kind}.jsonl", [row, extra])
        assert [r.data for r in iter_rows([path], kind)] == [row, extra]
        assert check_files([path]).ok
    # A system prompt may open a conversation.
    system = {"conversations": [{"role": "system", "content": "be kind"}, user("hi"), assistant("hey")]}
    assert row_problem("sft", system) is None
    assert detect_kind({"foo": 1}) is None
    with pytest.raises(WrenError, match="unknown data kind"):
        list(iter_rows([tmp_path / "sft.jsonl"], "chat"))


def test_skip_bad_lines_counts_all_and_keeps_the_first_examples(tmp_path: Path):
    lines: list[Any] = []
    for index in range(30):
        lines.append({"text": f"good {index}"} if index % 2 else {"text": ""})
    path = write_lines(tmp_path / "mixed.jsonl", lines)
    skipped = SkipCounter()
    rows = list(iter_rows([path], "pretrain", skip_bad_lines=True, skipped=skipped))
    assert [row.data["text"] for row in rows] == [f"good {i}" for i in range(1, 30, 2)]
    assert [row.line for row in rows] == list(range(2, 31, 2))
    assert skipped.count == 15
    assert [str(p) for p in skipped.examples] == [f"{path}:{line}: empty text" for line in range(1, 20, 2)]


def test_check_files_lists_every_problem_over_several_files(tmp_path: Path):
    sft = write_lines(
        tmp_path / "b_sft.jsonl",
        [
            GOOD_ROWS["sft"],
            {"conversations": []},
            "{broken",
            {"conversations": [user("hi")]},
            {"text": "a pretraining row in an SFT file"},
        ],
    )
    pretrain = write_lines(tmp_path / "a_pretrain.jsonl", [{"text": 1}, GOOD_ROWS["pretrain"]])
    other = write_lines(tmp_path / "c_unknown.jsonl", [{"foo": 1}])
    (tmp_path / "notes.txt").write_text("not data\n")

    report = check_files([tmp_path])  # a directory: its *.jsonl files in name order
    assert [file.path for file in report.files] == [pretrain, sft, other]
    assert [file.kind for file in report.files] == ["pretrain", "sft", None]
    assert [(p.path, p.line) for p in report.problems] == [
        (pretrain, 1),
        (sft, 2),
        (sft, 3),
        (sft, 4),
        (sft, 5),
        (other, 1),
    ]
    assert (report.rows, report.valid_rows) == (8, 2)
    text = format_check_report(report)
    assert "total (3 files)" in text
    assert "6 problems:" in text
    for problem in report.problems:
        assert f"  {problem.path}:{problem.line}: " in text
    assert 'no "text", "conversations" or "chosen"/"rejected" field' in text

    # A long list is cut short, with a count of the rest.
    many = write_lines(tmp_path / "many.jsonl", ["nope"] * 60)
    text = format_check_report(check_files([many], kind="pretrain"))
    assert text.count(f"{many}:") == 50
    assert "... and 10 more" in text


def test_check_files_counts_tokens_as_preparation_does(corpus, tokenizer: Tokenizer):
    report = check_files([corpus["pretrain"], corpus["sft"]], tokenizer=tokenizer)
    assert report.ok and report.tokenized
    pretrain, sft = report.files
    texts = [row["text"] for row in read_rows(corpus["pretrain"])]
    assert list(pretrain.tokens) == [len(tokenizer.encode(text)) + 1 for text in texts]
    assert pretrain.trained_tokens == sum(pretrain.tokens)
    encoded = [encode_conversation(tokenizer, row["conversations"]) for row in read_rows(corpus["sft"])]
    assert list(sft.tokens) == [len(ids) for ids, _ in encoded]
    assert sft.trained_tokens == sum(sum(mask) for _, mask in encoded)
    assert 0 < sft.trained_tokens < sum(sft.tokens)
    text = format_check_report(report)
    assert "tokens per row" in text and "no problems" in text
    assert f"tokens {report.total_tokens:,}, of which trained" in text


def test_check_files_counts_both_sides_of_a_preference_pair(tokenizer: Tokenizer, tmp_path: Path):
    pair = GOOD_ROWS["preference"]
    path = write_lines(tmp_path / "pairs.jsonl", [pair, pair])
    report = check_files([path], tokenizer=tokenizer)
    assert report.ok and report.files[0].kind == "preference"
    chosen, rejected = (encode_conversation(tokenizer, pair[side]) for side in ("chosen", "rejected"))
    assert list(report.files[0].tokens) == [len(chosen[0]) + len(rejected[0])] * 2
    assert report.files[0].trained_tokens == 2 * (sum(chosen[1]) + sum(rejected[1]))
    assert list(report.files[0].turns) == [2, 2]


def test_byte_order_mark_and_crlf_lines_read_like_plain_ones(tmp_path: Path):
    rows = [{"text": f"line {i}"} for i in range(20)]
    plain = write_lines(tmp_path / "plain.jsonl", rows)
    lines = [json.dumps(row) for row in rows]
    windows = tmp_path / "windows.jsonl"
    windows.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))
    read = [list(iter_rows([path], "pretrain")) for path in (plain, windows)]
    assert [row.data for row in read[0]] == [row.data for row in read[1]] == rows
    # The split hashes the stripped line, so it does not change with the line endings either.
    assert [row.raw for row in read[0]] == [row.raw for row in read[1]] == lines
    assert check_files([windows]).ok


def test_expand_paths(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    b = write_lines(tmp_path / "b.jsonl", [GOOD_ROWS["pretrain"]])
    a = write_lines(tmp_path / "a.jsonl", [GOOD_ROWS["pretrain"]])
    (tmp_path / "a.json").write_text("{}\n")
    assert expand_paths([tmp_path]) == [a, b]
    assert expand_paths([b, str(a)]) == [b, a]
    with pytest.raises(WrenError, match="no such file or directory"):
        expand_paths([tmp_path / "missing.jsonl"])
    with pytest.raises(WrenError, match=r"directory has no \.jsonl files"):
        expand_paths([tmp_path / "empty"])
    with pytest.raises(WrenError, match="no data files given"):
        expand_paths([])


def wren_cli(*args: Any) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wren", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def test_cli_data_check_passes_clean_data(corpus, tokenizer_dir: Path):
    result = wren_cli("data", "check", corpus["pretrain"], corpus["sft"], "--tokenizer", tokenizer_dir)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    n_pretrain, n_sft = len(read_rows(corpus["pretrain"])), len(read_rows(corpus["sft"]))
    assert f"{corpus['pretrain']} (pretrain)" in out
    assert f"{corpus['sft']} (sft)" in out
    assert f"rows {n_pretrain:,}, valid {n_pretrain:,}, problems 0" in out
    assert f"rows {n_sft:,}, valid {n_sft:,}, problems 0" in out
    assert "total (2 files)" in out
    for label in ("characters per row", "turns per conversation", "tokens per row", "of which trained"):
        assert label in out
    assert out.rstrip().endswith("no problems")


def test_cli_data_check_exits_1_listing_every_problem(tmp_path: Path):
    cases = [(bad, message) for kind, bad, message in BAD_ROWS if kind == "sft"]
    path = write_lines(tmp_path / "sft.jsonl", [GOOD_ROWS["sft"], *(bad for bad, _ in cases)])
    expected = [(line, message) for line, (_, message) in enumerate(cases, start=2)]
    result = wren_cli("data", "check", path, "--kind", "sft")
    assert result.returncode == 1, result.stderr
    assert f"{len(expected)} problems:" in result.stdout
    for line, message in expected:
        assert f"  {path}:{line}: " in result.stdout
        assert message in result.stdout
    assert f"{path}:1:" not in result.stdout


def test_cli_data_check_missing_file_is_a_user_error(tmp_path: Path):
    result = wren_cli("data", "check", tmp_path / "nothing.jsonl")
    assert result.returncode == 2
    assert result.stderr.startswith("wren: error: ")
    assert "nothing.jsonl: no such file or directory" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# Shards: what goes in comes out


def test_pretrain_shards_round_trip(corpus, tokenizer: Tokenizer, pretrain_data):
    texts = [row["text"] for row in read_rows(corpus["pretrain"])]
    raws = [
        line.strip() for line in corpus["pretrain"].read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    end = end_of_text_id(tokenizer)
    assert end == tokenizer.token_to_id(ENDOFTEXT)
    train, val = pretrain_data.train, pretrain_data.val
    assert val is not None and len(val) > 0
    for dataset in (train, val):
        assert dataset.kind == "pretrain" and dataset.mask is None
        assert dataset.tokens.dtype == np.uint16 and dataset.meta["dtype"] == "uint16"
        assert (dataset.directory / "tokens.bin").stat().st_size == 2 * dataset.n_tokens
        assert dataset.offsets[0] == 0 and dataset.offsets[-1] == dataset.n_tokens
        assert dataset.vocab_size == tokenizer.vocab_size

    # Interleaving train and val back by the split rule gives every row, in file order, encoded
    # exactly as the tokenizer encodes it and closed by one end-of-text token.
    parts = {False: iter(documents(train)), True: iter(documents(val))}
    rebuilt = [next(parts[is_validation(raw, 0.1)]) for raw in raws]
    assert all(next(part, None) is None for part in parts.values())
    assert rebuilt == [[*tokenizer.encode(text), end] for text in texts]
    assert [tokenizer.decode(doc[:-1]) for doc in rebuilt] == texts
    assert sum(doc.count(end) for doc in rebuilt) == len(texts)
    assert train.n_docs + val.n_docs == len(texts)
    assert pretrain_data.skipped == 0 and pretrain_data.skipped_examples == []


def test_sft_shards_hold_the_conversation_masks(sft_rows, tokenizer: Tokenizer, sft_data):
    dataset = sft_data.train
    assert sft_data.val is None  # val_fraction 0
    assert dataset.kind == "sft" and dataset.mask is not None
    assert len(dataset) == len(sft_rows)
    for index, messages in enumerate(sft_rows):
        ids, mask = encode_conversation(tokenizer, messages)
        assert dataset.document(index).tolist() == ids
        assert dataset.document_mask(index).tolist() == mask
    assert (dataset.directory / "mask.bin").stat().st_size == dataset.n_tokens


def test_encode_conversation_masks_exactly_the_replies(sft_rows, tokenizer: Tokenizer):
    for messages in sft_rows:
        ids, mask = encode_conversation(tokenizer, messages)
        assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)
        assert [tokenizer.decode(run) for run in runs_of_ones(ids, mask)] == trained_replies(messages)
        # Each reply's span ends on <|im_end|>; the newline ChatML writes after it is not trained,
        # since generation stops at the end token.
        ends = [i for i in range(len(ids)) if mask[i] and (i + 1 == len(ids) or not mask[i + 1])]
        assert all(ids[i] == tokenizer.token_to_id(IM_END) for i in ends)
        assert all(tokenizer.decode(ids[i + 1 : i + 2]) == "\n" for i in ends)


def test_uint32_tokens_round_trip(tmp_path: Path):
    assert token_dtype(256) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 still fit
    assert token_dtype(65537) == np.uint32
    assert token_dtype(70000) == np.uint32
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 70000, size=n).tolist() for n in (1, 17, 300)]
    docs[1][3] = 69999
    docs[2][0] = 65536
    masks = [rng.integers(0, 2, size=len(d)).tolist() for d in docs]
    dataset = write_token_dataset(tmp_path / "big", docs, "sft", 70000, masks=masks)
    reopened = TokenDataset(tmp_path / "big")
    for ds in (dataset, reopened):
        assert ds.tokens.dtype == np.uint32 and ds.meta["dtype"] == "uint32"
        assert documents(ds) == docs
        assert [ds.document_mask(i).tolist() for i in range(len(ds))] == masks
    assert (tmp_path / "big" / "tokens.bin").stat().st_size == 4 * sum(map(len, docs))
    assert reopened.lengths.tolist() == [1, 17, 300]

    with pytest.raises(ValueError, match="token ids must lie in"):
        write_token_dataset(tmp_path / "bad", [[1, 70000]], "pretrain", 70000)
    with pytest.raises(ValueError, match="as long as its document"):
        write_token_dataset(tmp_path / "bad", [[1, 2]], "sft", 10, masks=[[1]])
    assert not (tmp_path / "bad").exists()
    pretrain = write_token_dataset(tmp_path / "small", [[5, 6], [7]], "pretrain", 10)
    assert pretrain.tokens.dtype == np.uint16 and pretrain.mask is None
    with pytest.raises(ValueError, match="no loss mask"):
        pretrain.document_mask(0)


# ---------------------------------------------------------------------------------------------
# The cache


def test_cache_is_reused_until_the_input_changes(corpus, tokenizer: Tokenizer, tmp_path: Path):
    path = tmp_path / "data.jsonl"
    shutil.copyfile(corpus["pretrain"], path)
    cache = tmp_path / "cache"

    def prepare(**settings: Any):
        settings = {"val_fraction": 0.1, **settings}
        return prepare_datasets([path], tokenizer, "pretrain", cache, progress=False, **settings)

    first = prepare()
    assert not first.reused
    tokens = documents(first.train)
    again = prepare()
    assert again.reused and again.directory == first.directory
    assert documents(again.train) == tokens

    # Same size and mtime but unreadable content: a cache hit must not open the file at all.
    original, stat = path.read_bytes(), path.stat()
    path.write_bytes(b"x" * (len(original) - 1) + b"\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    blind = prepare()
    assert blind.reused and documents(blind.train) == tokens
    path.write_bytes(original)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert prepare().reused

    # Touching the file (a new mtime) rebuilds, into a new directory, the same tokens.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    touched = prepare()
    assert not touched.reused and touched.directory != first.directory
    assert documents(touched.train) == tokens
    assert prepare().reused

    # Editing it rebuilds with the new row.
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"text": "one more document at the end"}) + "\n")
    edited = prepare()
    assert not edited.reused and edited.directory not in (first.directory, touched.directory)
    assert edited.train.n_docs + edited.val.n_docs == first.train.n_docs + first.val.n_docs + 1

    # Every setting the tokens depend on has its own directory.
    other_fraction = prepare(val_fraction=0.2)
    assert not other_fraction.reused and other_fraction.directory != edited.directory
    assert other_fraction.val.n_docs > edited.val.n_docs
    skipping = prepare(skip_bad_lines=True)
    assert not skipping.reused and skipping.directory != edited.directory
    other_tokenizer = train_tokenizer([corpus["pretrain"]], vocab_size=600)
    retokenised = prepare_datasets([path], other_tokenizer, "pretrain", cache, 0.1, progress=False)
    assert not retokenised.reused and retokenised.directory != edited.directory
    assert prepare().reused and prepare().directory == edited.directory


def test_parallel_tokenisation_writes_the_same_bytes(corpus, tokenizer, tmp_path, monkeypatch):
    # Small chunks, so each split is many jobs and the workers really interleave.
    monkeypatch.setattr(shards, "CHUNK_CHARS", 2048)
    for kind in ("pretrain", "sft"):
        built = [
            prepare_datasets(
                [corpus[kind]],
                tokenizer,
                kind,
                tmp_path / f"w{workers}",
                0.1,
                workers=workers,
                progress=False,
            )
            for workers in (1, 2)
        ]
        assert built[0].directory.name == built[1].directory.name  # workers are not part of the key
        for split in ("train", "val"):
            names = ["tokens.bin", "offsets.npy"] + (["mask.bin"] if kind == "sft" else [])
            for name in names:
                one, two = (b.directory / split / name for b in built)
                assert one.read_bytes() == two.read_bytes(), f"{kind} {split} {name}"
        assert built[0].train.n_docs > 20


def test_prepare_rejects_bad_lines_or_skips_them(tokenizer: Tokenizer, tmp_path: Path):
    path = write_lines(
        tmp_path / "data.jsonl",
        [{"text": "first good row"}, {"text": ""}, "not json", {"text": "last good row"}],
    )
    with pytest.raises(WrenError, match=rf"^{path}:2: empty text$"):
        prepare_datasets([path], tokenizer, "pretrain", tmp_path / "cache", 0.0, progress=False)
    assert not any((tmp_path / "cache").glob("*/train"))  # nothing half-written is left behind
    data = prepare_datasets(
        [path], tokenizer, "pretrain", tmp_path / "cache", 0.0, skip_bad_lines=True, progress=False
    )
    assert data.skipped == 2
    assert data.skipped_examples[0] == f"{path}:2: empty text"
    assert data.skipped_examples[1].startswith(f"{path}:3: invalid JSON")
    end = end_of_text_id(tokenizer)
    assert documents(data.train) == [[*tokenizer.encode(t), end] for t in ("first good row", "last good row")]
    with pytest.raises(WrenError, match="no training rows left"):
        prepare_datasets(
            [path], tokenizer, "sft", tmp_path / "cache", 0.0, skip_bad_lines=True, progress=False
        )
    with pytest.raises(WrenError, match="preference data"):
        prepare_datasets([path], tokenizer, "preference", tmp_path / "cache", progress=False)
    with pytest.raises(WrenError, match="val_fraction"):
        prepare_datasets([path], tokenizer, "pretrain", tmp_path / "cache", 1.0, progress=False)


# ---------------------------------------------------------------------------------------------
# The validation split


def test_validation_split_is_deterministic_and_about_the_right_size():
    lines = [json.dumps({"text": f"row number {i} of the corpus"}) for i in range(1000)]
    held = [line for line in lines if is_validation(line, 0.1)]
    assert 60 <= len(held) <= 140  # about 4 standard deviations of Binomial(1000, 0.1)
    assert held == [line for line in lines if is_validation(line, 0.1)]
    assert not any(is_validation(line, 0.0) for line in lines)
    # A threshold on one hash: a smaller fraction holds out a subset of the same rows.
    smaller = {line for line in lines if is_validation(line, 0.05)}
    assert smaller < set(held) and 20 <= len(smaller) <= 80


def test_split_does_not_depend_on_file_order(tokenizer: Tokenizer, tmp_path: Path):
    texts = [f"row {i}: the wren sings {'again ' * (i % 5)}today" for i in range(1000)]
    rows = [{"text": text} for text in texts]
    a = write_lines(tmp_path / "a.jsonl", rows[:500])
    b = write_lines(tmp_path / "b.jsonl", rows[500:])
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    c = write_lines(tmp_path / "c.jsonl", shuffled)
    expected_val = {row["text"] for row in rows if is_validation(json.dumps(row), 0.1)}
    assert 60 <= len(expected_val) <= 140

    splits = []
    for files in ([a, b], [b, a], [c]):
        data = prepare_datasets(files, tokenizer, "pretrain", tmp_path / "cache", 0.1, progress=False)
        train = {tokenizer.decode(doc[:-1]) for doc in documents(data.train)}
        val = {tokenizer.decode(doc[:-1]) for doc in documents(data.val)}
        assert train.isdisjoint(val)
        assert train | val == set(texts)
        assert len(train) == data.train.n_docs and len(val) == data.val.n_docs
        splits.append(val)
    assert splits[0] == splits[1] == splits[2] == expected_val


# ---------------------------------------------------------------------------------------------
# Pretraining batches


def arange_dataset(directory: Path, n_tokens: int) -> TokenDataset:
    """Token i is i: each window is recognisable from its first token."""
    tokens = list(range(n_tokens))
    return write_token_dataset(
        directory, [tokens[: n_tokens // 3], tokens[n_tokens // 3 :]], "pretrain", 70000
    )


def test_pretrain_batches_are_shifted_windows_of_real_tokens(pretrain_data):
    dataset = pretrain_data.train
    seq_len = 64
    stream = np.asarray(dataset.tokens, dtype=np.int64)
    n_windows = (dataset.n_tokens - 1) // seq_len
    windows = {stream[w * seq_len : w * seq_len + seq_len + 1].tobytes() for w in range(n_windows)}
    batches = PretrainBatches(dataset, 8, seq_len, seed=3)
    for _ in range(10):
        batch = next(batches)
        assert batch.input_ids.shape == batch.targets.shape == (8, seq_len)
        assert batch.input_ids.dtype == batch.targets.dtype == torch.int64
        assert batch.positions is None and batch.document_ids is None
        assert batch.n_target_tokens == batch.n_tokens == 8 * seq_len
        assert torch.equal(batch.targets[:, :-1], batch.input_ids[:, 1:])
        full = torch.cat([batch.input_ids, batch.targets[:, -1:]], dim=1).numpy()
        assert all(row.tobytes() in windows for row in full)  # every position a real token


def test_pretrain_epoch_covers_every_window_once(tmp_path: Path):
    seq_len = 16
    dataset = arange_dataset(tmp_path / "ds", 1001)
    batches = PretrainBatches(dataset, 3, seq_len, seed=1)
    assert batches.n_windows == 62
    seen: list[int] = []
    for _ in range(42):  # 126 windows: two epochs and two more
        batch = next(batches)
        starts = batch.input_ids[:, 0]
        assert torch.all(starts % seq_len == 0)
        assert torch.equal(batch.input_ids, starts[:, None] + torch.arange(seq_len))
        seen += (starts // seq_len).tolist()
    first, second = seen[:62], seen[62:124]
    assert sorted(first) == sorted(second) == list(range(62))
    assert first != second  # shuffled anew each epoch
    assert batches.state_dict()["epoch"] == 2


def test_pretrain_ranks_slice_the_global_batch(tmp_path: Path):
    dataset = arange_dataset(tmp_path / "ds", 2000)
    single = PretrainBatches(dataset, 4, 32, seed=7)
    pair = [PretrainBatches(dataset, 2, 32, seed=7, rank=r, world_size=2) for r in range(2)]
    quad = [PretrainBatches(dataset, 1, 32, seed=7, rank=r, world_size=4) for r in range(4)]
    for _ in range(40):  # past the end of the first epoch (62 windows)
        whole = next(single)
        for group in (pair, quad):
            parts = [next(stream) for stream in group]
            assert torch.equal(torch.cat([p.input_ids for p in parts]), whole.input_ids)
            assert torch.equal(torch.cat([p.targets for p in parts]), whole.targets)
    with pytest.raises(ValueError, match="outside world size"):
        PretrainBatches(dataset, 2, 32, rank=2, world_size=2)


def test_pretrain_resumes_from_state_dict(pretrain_data):
    dataset = pretrain_data.train
    batches = PretrainBatches(dataset, 4, 128, seed=11)
    for _ in range(batches.n_windows // 4 + 3):  # into the second epoch
        next(batches)
    state = batches.state_dict()
    expected = [next(batches) for _ in range(6)]
    resumed = PretrainBatches(dataset, 4, 128, seed=0)  # the seed comes back from the state too
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint would store it
    for want in expected:
        got = next(resumed)
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.targets, want.targets)
    with pytest.raises(WrenError, match="seq_len"):
        PretrainBatches(dataset, 4, 64).load_state_dict(state)
    with pytest.raises(WrenError, match="global_batch"):
        PretrainBatches(dataset, 2, 128).load_state_dict(state)


def test_pretrain_needs_one_window(tmp_path: Path):
    dataset = write_token_dataset(tmp_path / "tiny", [[1, 2, 3]], "pretrain", 10)
    with pytest.raises(WrenError, match="too little"):
        PretrainBatches(dataset, 1, 8)
    assert next(PretrainBatches(dataset, 1, 2)).input_ids.tolist() == [[1, 2]]


# ---------------------------------------------------------------------------------------------
# Packed SFT batches


def row_segments(batch, row: int) -> list[tuple[int, int]]:
    """(start, end) of each conversation in a packed row, checking ids run 0, 1, ... then -1."""
    ids = batch.document_ids[row].tolist()
    spans: list[tuple[int, int]] = []
    start = 0
    for doc, group in itertools.groupby(ids):
        size = len(list(group))
        if doc == -1:
            assert start + size == len(ids), "padding only at the end of a row"
        else:
            assert doc == len(spans), "document ids distinct and in order"
            spans.append((start, start + size))
        start += size
    return spans


def test_packed_sft_targets_cover_exactly_the_assistant_replies(sft_rows, tokenizer: Tokenizer, sft_data):
    dataset = sft_data.train
    by_ids = {tuple(encode_conversation(tokenizer, m)[0]): m for m in sft_rows}
    pad_id = tokenizer.pad_token_id
    batches = PackedSFTBatches(dataset, 1, SEQ_LEN, seed=5, pad_id=pad_id)
    assert batches.n_truncated == 0
    packed: Counter[tuple[int, ...]] = Counter()
    while sum(packed.values()) < len(dataset):  # one row per batch: the epoch ends between rows
        batch = next(batches)
        inputs, targets, positions = batch.input_ids[0], batch.targets[0], batch.positions[0]
        assert batch.n_target_tokens == int((targets != IGNORE_INDEX).sum())
        spans = row_segments(batch, 0)
        end = spans[-1][1]
        # Padding: pad ids, no targets, a document of its own.
        assert torch.all(inputs[end:] == pad_id) and torch.all(targets[end:] == IGNORE_INDEX)
        for start, stop in spans:
            ids = inputs[start:stop].tolist()
            messages = by_ids[tuple(ids)]
            packed[tuple(ids)] += 1
            assert positions[start:stop].tolist() == list(range(stop - start))
            segment_targets = targets[start:stop].tolist()
            assert segment_targets[-1] == IGNORE_INDEX  # never predicts into the next conversation
            trained = [0] * len(ids)
            for i, target in enumerate(segment_targets):
                if target != IGNORE_INDEX:
                    assert target == ids[i + 1]
                    trained[i + 1] = 1
            assert [tokenizer.decode(run) for run in runs_of_ones(ids, trained)] == trained_replies(messages)
    assert packed == Counter(tuple(doc) for doc in documents(dataset))


def test_packed_sft_padding_is_small(corpus, tokenizer: Tokenizer, tmp_path: Path):
    data = prepare_datasets([corpus["sft"]], tokenizer, "sft", tmp_path, 0.0, progress=False)
    batches = PackedSFTBatches(data.train, 8, SEQ_LEN, seed=0, pad_id=tokenizer.pad_token_id)
    padding = total = 0
    for _ in range(8):
        batch = next(batches)
        pad = batch.document_ids == -1
        assert torch.all(batch.targets[pad] == IGNORE_INDEX)
        padding += int(pad.sum())
        total += pad.numel()
    fraction = padding / total
    print(f"SFT padding fraction at seq_len {SEQ_LEN}: {fraction:.2%}")
    assert fraction < 0.10


def test_packed_sft_ranks_and_resume(sft_data):
    dataset = sft_data.train
    single = PackedSFTBatches(dataset, 4, SEQ_LEN, seed=2)
    pair = [PackedSFTBatches(dataset, 2, SEQ_LEN, seed=2, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        whole, parts = next(single), [next(stream) for stream in pair]
        for name in ("input_ids", "targets", "positions", "document_ids"):
            assert torch.equal(torch.cat([getattr(p, name) for p in parts]), getattr(whole, name))
    state = single.state_dict()
    expected = [next(single) for _ in range(30)]  # into the next epoch
    resumed = PackedSFTBatches(dataset, 4, SEQ_LEN, seed=9)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.targets, want.targets)
    with pytest.raises(WrenError, match="kind"):
        PretrainBatches(dataset, 4, SEQ_LEN).load_state_dict(state)


def test_packed_sft_truncates_long_conversations_and_refuses_empty_data(tmp_path: Path):
    docs = [list(range(1, 41)), [7, 8, 9], [5, 6]]
    masks = [[0] * 20 + [1] * 20, [0, 1, 1], [0, 1]]
    dataset = write_token_dataset(tmp_path / "long", docs, "sft", 100, masks=masks)
    batches = PackedSFTBatches(dataset, 2, 16, seed=0)
    assert batches.n_truncated == 1
    batch = next(batches)
    long_row = next(r for r in range(2) if batch.input_ids[r, 0] == 1)
    assert batch.input_ids[long_row].tolist() == list(range(1, 17))  # the first 16 tokens, alone
    assert torch.all(batch.document_ids[long_row] == 0)
    assert torch.all(batch.targets[long_row] == IGNORE_INDEX)  # its replies start past token 16
    other = 1 - long_row
    assert batch.input_ids[other, :5].tolist() in ([7, 8, 9, 5, 6], [5, 6, 7, 8, 9])

    empty = write_token_dataset(tmp_path / "empty", [], "sft", 100, masks=[])
    with pytest.raises(WrenError, match="no conversations"):
        PackedSFTBatches(empty, 2, 16)
    no_mask = write_token_dataset(tmp_path / "plain", docs, "sft", 100)
    with pytest.raises(WrenError, match="loss mask"):
        PackedSFTBatches(no_mask, 2, 16)


def test_pack_documents_respects_capacity_and_keeps_every_document():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(1, 200, 3000), rng.integers(257, 600, 20), [256, 1, 1]])
    capacity = 256
    for group in (7, 100, 1024):
        order = rng.permutation(len(lengths))
        rows = pack_documents(lengths, order, capacity, group=group)
        packed = [index for row in rows for index in row]
        assert sorted(packed) == list(range(len(lengths)))
        for row in rows:
            assert sum(min(int(lengths[i]), capacity) for i in row) <= capacity
            if any(lengths[i] >= capacity for i in row):
                assert len(row) == 1
        lower_bound = np.minimum(lengths, capacity).sum() / capacity
        assert len(rows) <= 1.03 * lower_bound + len(lengths) / group + 1
    assert pack_documents(np.array([3, 5]), np.array([], dtype=np.int64), 8) == []


def test_eval_batches_read_the_validation_set_once(tmp_path: Path, sft_data):
    dataset = arange_dataset(tmp_path / "ds", 1001)
    batches = list(eval_batches(dataset, "pretrain", 4, 16))
    starts = torch.cat([b.input_ids[:, 0] for b in batches]).tolist()
    assert starts == [16 * w for w in range(62)]  # in order, each window once
    assert len(list(eval_batches(dataset, "pretrain", 4, 16, max_batches=3))) == 3
    # A validation set shorter than one window is still evaluated, as one shorter sequence.
    (short,) = eval_batches(arange_dataset(tmp_path / "short", 10), "pretrain", 4, 16)
    assert short.input_ids.tolist() == [list(range(9))] and short.targets.tolist() == [list(range(1, 10))]

    sft = sft_data.train
    seen: Counter[tuple[int, ...]] = Counter()
    for batch in eval_batches(sft, "sft", 4, SEQ_LEN):
        for row in range(batch.input_ids.shape[0]):
            for start, stop in row_segments(batch, row):
                seen[tuple(batch.input_ids[row, start:stop].tolist())] += 1
    assert seen == Counter(tuple(doc) for doc in documents(sft))


# ---------------------------------------------------------------------------------------------
# Packing is exact: a packed row computes what each conversation computes alone


def test_packed_row_logits_equal_each_conversation_alone(tokenizer: Tokenizer, sft_data):
    torch.manual_seed(0)
    config = preset_config(
        "micro",
        vocab_size=tokenizer.vocab_size,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=SEQ_LEN,
    )
    model = CausalLM(config).eval()
    # Best fit opens an epoch with the longest conversations; further in, rows hold several.
    batches = PackedSFTBatches(sft_data.train, 4, SEQ_LEN, seed=1, pad_id=tokenizer.pad_token_id)
    batch = [next(batches) for _ in range(4)][-1]
    checked = shared = 0
    with torch.no_grad():
        packed, _ = model(batch.input_ids, positions=batch.positions, document_ids=batch.document_ids)
        unmasked, _ = model(batch.input_ids)
        for row in range(batch.input_ids.shape[0]):
            spans = row_segments(batch, row)
            for start, stop in spans:
                alone, _ = model(batch.input_ids[row : row + 1, start:stop])
                torch.testing.assert_close(packed[row, start:stop], alone[0], atol=1e-5, rtol=0)
                checked += 1
            if len(spans) > 1:
                # Without document ids a later conversation would see the earlier ones.
                start, stop = spans[-1]
                assert (unmasked[row, start:stop] - packed[row, start:stop]).abs().max() > 1e-3
                shared += 1
    assert shared >= 2 and checked >= 6


# ---------------------------------------------------------------------------------------------
# Bits per byte


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog.",
        "def add(a, b):\n\treturn a + b  # tabs, newlines\n\n",
        "你好，世界！今天天气很好。",
        "emoji 🎉👍🏽 family 👨‍👩‍👧 flag 🇯🇵 heart ❤️",
        "café naïve Ærø — “quotes” and ½",
        "mixed 中文 and English with <think>thoughts</think> inline",
    ],
    ids=["ascii", "code", "chinese", "emoji", "latin", "think"],
)
def test_byte_lengths_sum_to_the_utf8_size(tokenizer: Tokenizer, text: str):
    lengths = token_byte_lengths(tokenizer)
    assert lengths.shape == (tokenizer.vocab_size,)
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))


def test_special_tokens_stand_for_no_bytes(tokenizer: Tokenizer):
    lengths = token_byte_lengths(tokenizer)
    for token in (ENDOFTEXT, IM_END, "<|im_start|>"):
        assert lengths[tokenizer.token_to_id(token)] == 0
    text = "hello there"
    ids = tokenizer.encode(text)
    targets = torch.tensor([[*ids, tokenizer.token_to_id(IM_END), IGNORE_INDEX, IGNORE_INDEX]])
    table = torch.as_tensor(lengths)
    assert int(target_bytes(table, targets)) == len(text)
