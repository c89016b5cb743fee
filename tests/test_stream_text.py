"""wren.infer.text: streaming detokenization and stop strings.

Tokenizers are trained here on a tiny English, Chinese and emoji corpus with a small vocabulary,
so common characters get their own tokens while rare ones are split into UTF-8 byte tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from wren.infer.text import REPLACEMENT_CHAR, IncrementalDecoder, StopMatcher
from wren.tokenizer import IM_END, THINK_END, THINK_START, Tokenizer, train_tokenizer

CORPUS = [
    "the quick brown fox jumps over the lazy dog while a small wren sings in the garden",
    "你好世界 我们学习语言模型 今天天气很好 小鸟唱歌",
    "hello world 🎉 models learn to predict the next token 👍",
    "中文和English混在一起 also works ✨ 你好",
]
# Chinese and emoji absent from the corpus (鹪鹩 is "wren"), so they are spelled in byte tokens.
STREAM_TEXT = "hello 你好世界, the wren 鹪鹩 sings 🐦🦜 今天天气很好 龘 ok 👨‍👩‍👧!"
VOCAB_SIZE = 400


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    rows = [{"text": text} for _ in range(20) for text in CORPUS]
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def wren_tokenizer(corpus_file: Path) -> Tokenizer:
    return train_tokenizer([corpus_file], vocab_size=VOCAB_SIZE)


@pytest.fixture(scope="module", params=["wren", "transformers", "auto"])
def tokenizer(request: pytest.FixtureRequest, wren_tokenizer: Tokenizer, tmp_path_factory: Any) -> Any:
    """The same trained tokenizer behind Wren's class and behind transformers' two entry points."""
    if request.param == "wren":
        return wren_tokenizer
    transformers = pytest.importorskip("transformers")
    if request.param == "transformers":
        return transformers.PreTrainedTokenizerFast(tokenizer_object=wren_tokenizer.backend)
    directory = wren_tokenizer.save(tmp_path_factory.mktemp("tokenizer"))
    return transformers.AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def sentencepiece_like() -> Backend:
    """A Llama-2 style tokenizer: Metaspace words, `<0xNN>` byte fallback, and a decoder that
    strips the text's leading space, so a suffix decoded alone loses its space."""
    backend = Backend(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    backend.train_from_iterator(CORPUS * 20, trainer=trainer)
    data = json.loads(backend.to_str())
    vocab = data["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    data["model"]["byte_fallback"] = True
    rebuilt = Backend.from_str(json.dumps(data))
    rebuilt.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return rebuilt


def encode(tokenizer: Any, text: str) -> list[int]:
    if isinstance(tokenizer, Backend):
        return tokenizer.encode(text).ids
    if isinstance(tokenizer, Tokenizer):
        return tokenizer.encode(text)
    return tokenizer.encode(text, add_special_tokens=False)


def stream(decoder: IncrementalDecoder, ids: list[int], chunk_sizes: list[int] | None = None) -> list[str]:
    """Feed `ids` (one at a time, or in chunks of the given sizes); the deltas, then finish()'s."""
    deltas = []
    index = 0
    sizes = iter(chunk_sizes or [])
    while index < len(ids):
        size = next(sizes, 1)
        chunk = ids[index : index + size]
        deltas.append(decoder.add(chunk[0] if size == 1 else chunk))
        index += size
    deltas.append(decoder.finish())
    return deltas


def has_split_character(tokenizer: Any, ids: list[int]) -> bool:
    """Whether some prefix of `ids` ends inside a character (decodes with a trailing U+FFFD)."""
    return any(tokenizer.decode(ids[:end]).endswith(REPLACEMENT_CHAR) for end in range(1, len(ids)))


# ---------------------------------------------------------------------------------------------
# IncrementalDecoder


def test_token_by_token_matches_full_decode_without_replacement_chars(tokenizer: Any) -> None:
    ids = encode(tokenizer, STREAM_TEXT)
    assert has_split_character(tokenizer, ids), "the test text should split some character over tokens"
    deltas = stream(IncrementalDecoder(tokenizer), ids)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == STREAM_TEXT
    assert not any(REPLACEMENT_CHAR in delta for delta in deltas)


def test_chunks_of_any_size_give_the_same_text(tokenizer: Any) -> None:
    ids = encode(tokenizer, STREAM_TEXT)
    rng = random.Random(7)
    for _ in range(20):
        sizes = [rng.randint(1, 4) for _ in ids]
        deltas = stream(IncrementalDecoder(tokenizer), ids, sizes)
        assert "".join(deltas) == STREAM_TEXT
        assert not any(REPLACEMENT_CHAR in delta for delta in deltas)


@pytest.mark.parametrize("character", ["龘", "鹪", "🦜"])
def test_a_character_split_over_byte_tokens_appears_once_complete(tokenizer: Any, character: str) -> None:
    ids = encode(tokenizer, character)
    assert len(ids) in (3, 4), f"{character!r} should be spelled in UTF-8 byte tokens, got {ids}"
    decoder = IncrementalDecoder(tokenizer)
    assert [decoder.add(token) for token in ids] == [""] * (len(ids) - 1) + [character]
    assert decoder.finish() == ""


def test_split_character_after_ascii_is_held_back_alone(wren_tokenizer: Tokenizer) -> None:
    ids = encode(wren_tokenizer, "ok 龘!")
    decoder = IncrementalDecoder(wren_tokenizer)
    deltas = [decoder.add(token) for token in ids]
    assert "".join(deltas) == "ok 龘!"
    assert "龘" in deltas  # emitted whole, in one delta
    assert deltas[deltas.index("龘") - 2 : deltas.index("龘")] == ["", ""]


def test_finish_flushes_an_incomplete_character_as_replacement_char(tokenizer: Any) -> None:
    ids = encode(tokenizer, "hi 龘")[:-1]  # the character's last byte never comes
    decoder = IncrementalDecoder(tokenizer)
    assert "".join(decoder.add(token) for token in ids) == "hi "
    rest = decoder.finish()
    assert rest == tokenizer.decode(ids)[len("hi ") :] and rest.endswith(REPLACEMENT_CHAR)
    assert decoder.finish() == ""
    with pytest.raises(RuntimeError):
        decoder.add(ids[0])


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_skipped_or_kept(tokenizer: Any, wren_tokenizer: Tokenizer, skip: bool) -> None:
    special = wren_tokenizer.token_to_id(IM_END)
    think = [wren_tokenizer.token_to_id(THINK_START), wren_tokenizer.token_to_id(THINK_END)]
    ids = [think[0], *encode(tokenizer, "想一想 龘"), think[1], *encode(tokenizer, "你好"), special]
    deltas = stream(IncrementalDecoder(tokenizer, skip_special_tokens=skip), ids)
    text = "".join(deltas)
    assert text == tokenizer.decode(ids, skip_special_tokens=skip)
    assert (IM_END in text) is not skip
    assert text.startswith(THINK_START)  # <think> is not special: kept either way
    assert not any(REPLACEMENT_CHAR in delta for delta in deltas)


def test_random_token_streams_concatenate_to_the_full_decode(wren_tokenizer: Tokenizer) -> None:
    """Random ids (invalid UTF-8 byte runs included) must still add up to decode(all ids)."""
    rng = random.Random(3)
    for _ in range(30):
        ids = [rng.randrange(wren_tokenizer.vocab_size) for _ in range(rng.randint(1, 60))]
        sizes = [rng.randint(1, 3) for _ in ids]
        deltas = stream(IncrementalDecoder(wren_tokenizer), ids, sizes)
        assert "".join(deltas) == wren_tokenizer.decode(ids, skip_special_tokens=True)


def test_a_run_of_invalid_bytes_streams_without_waiting_for_the_end(wren_tokenizer: Tokenizer) -> None:
    """A model stuck on a lone UTF-8 continuation byte: the text always ends in U+FFFD, yet it must
    be emitted as it comes (the window cannot grow with the run), and still add up exactly."""
    continuation = encode(wren_tokenizer, "龘")[1]
    tail = encode(wren_tokenizer, "然后 龘 ok")
    decoder = IncrementalDecoder(wren_tokenizer)
    during_run = "".join(decoder.add(continuation) for _ in range(200))
    assert during_run == REPLACEMENT_CHAR * len(during_run) and len(during_run) >= 190
    after_run = "".join(decoder.add(token) for token in tail)
    assert after_run.endswith("然后 龘 ok")
    ids = [continuation] * 200 + tail
    assert during_run + after_run + decoder.finish() == wren_tokenizer.decode(ids)


def test_sentencepiece_leading_spaces_survive(sentencepiece_like: Backend) -> None:
    ids = encode(sentencepiece_like, STREAM_TEXT)
    naive = "".join(sentencepiece_like.decode([token]) for token in ids)
    assert naive != STREAM_TEXT and " " not in naive.strip(), "decoding tokens alone should drop spaces"
    assert has_split_character(sentencepiece_like, ids), "byte fallback should split some character"
    deltas = stream(IncrementalDecoder(sentencepiece_like), ids)
    assert "".join(deltas) == sentencepiece_like.decode(ids) == STREAM_TEXT
    assert not any(REPLACEMENT_CHAR in delta for delta in deltas)


def test_prompt_ids_give_the_first_token_its_leading_space(sentencepiece_like: Backend) -> None:
    prompt, reply = encode(sentencepiece_like, "the wren"), encode(sentencepiece_like, "sings 你好")
    decoder = IncrementalDecoder(sentencepiece_like, prompt_ids=prompt)
    deltas = stream(decoder, reply)
    assert deltas[0] == " sings"
    assert "".join(deltas) == " sings 你好"
    # Without the prompt the reply is the start of the text, and its space is stripped.
    assert "".join(stream(IncrementalDecoder(sentencepiece_like), reply)) == "sings 你好"


# ---------------------------------------------------------------------------------------------
# StopMatcher


def reference_cut(text: str, stops: list[str]) -> tuple[str, str | None]:
    """Where a char-by-char stream stops: the first stop to end, the longer one on a tie."""
    found = [(text.find(stop) + len(stop), text.find(stop), stop) for stop in stops if stop in text]
    if not found:
        return text, None
    _, start, stop = min(found)
    return text[:start], stop


def run_matcher(stops: list[str], deltas: list[str]) -> tuple[str, StopMatcher]:
    matcher = StopMatcher(stops)
    out = []
    for delta in deltas:
        out.append(matcher.feed(delta))
        assert len(matcher.held) <= matcher.max_hold
    out.append(matcher.finish())
    return "".join(out), matcher


def test_stop_split_across_deltas_at_every_point() -> None:
    text = "The answer is 42.</s>ignored text</s>"
    for first in range(len(text) + 1):
        for second in range(first, len(text) + 1):
            deltas = [text[:first], text[first:second], text[second:]]
            out, matcher = run_matcher(["</s>"], deltas)
            assert out == "The answer is 42."
            assert matcher.matched == "</s>"


def test_stop_spanning_decoded_tokens_never_leaks(wren_tokenizer: Tokenizer) -> None:
    """End to end: a Chinese stop string built from byte tokens, streamed token by token."""
    ids = encode(wren_tokenizer, "小鸟唱歌 鹪鹩停下 then more")
    decoder, matcher = IncrementalDecoder(wren_tokenizer), StopMatcher(["鹪鹩"])
    shown = ""
    for token in ids:
        shown += matcher.feed(decoder.add(token))
        assert "鹪" not in shown and REPLACEMENT_CHAR not in shown
    assert shown == "小鸟唱歌 " and matcher.stopped


def test_multiple_stop_strings_first_one_to_end_wins() -> None:
    out, matcher = run_matcher(["\nUser:", "</s>"], ["Sure.\nUs", "er: hi</s>"])
    assert (out, matcher.matched) == ("Sure.", "\nUser:")
    out, matcher = run_matcher(["\nUser:", "</s>"], ["Sure.</", "s>\nUser:"])
    assert (out, matcher.matched) == ("Sure.", "</s>")


def test_overlapping_stop_prefixes() -> None:
    assert run_matcher(["ab", "bc"], ["x", "b", "c", "d"])[0] == "x"
    out, matcher = run_matcher(["ab", "bc"], ["xa", "bc"])
    assert (out, matcher.matched) == ("x", "ab")
    # "bc" completes before "abcd" could, wherever the deltas split.
    for deltas in (["abcd"], ["a", "b", "c", "d"], ["ab", "cd"]):
        out, matcher = run_matcher(["abcd", "bc"], deltas)
        assert (out, matcher.matched) == ("a", "bc")
    # Both complete on the same character: the longer one, so none of it is shown.
    out, matcher = run_matcher(["b", "ab"], ["xa", "b"])
    assert (out, matcher.matched) == ("x", "ab")


def test_no_stop_finish_returns_everything() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("all good ST") == "all good "
    assert matcher.held == "ST"
    assert matcher.feed("O") == ""
    assert matcher.finish() == "STO"
    assert not matcher.stopped
    assert run_matcher([], ["any", "thing"])[0] == "anything"


def test_stop_at_the_very_beginning() -> None:
    matcher = StopMatcher(["<|im_end|>"])
    assert matcher.feed("<|im_") == ""
    assert matcher.feed("end|>after") == ""
    assert matcher.stopped and matcher.matched == "<|im_end|>"
    assert matcher.feed("more") == "" and matcher.finish() == ""


def test_held_back_length_is_bounded() -> None:
    matcher = StopMatcher(["aaab", "xy"])
    assert matcher.max_hold == 3
    shown = ""
    for _ in range(50):  # a long run of stop prefixes: only the last 3 characters wait
        shown += matcher.feed("a")
        assert matcher.held == "aaa"[: len(matcher.held)] and len(matcher.held) <= 3
    assert shown == "a" * 47 and matcher.held == "aaa"
    assert matcher.feed("c" + "ca" * 5 + "x") == "aaac" + "ca" * 5
    assert matcher.held == "x"  # the longest suffix that could still become a stop
    assert StopMatcher(["x"]).feed("abcx") == "abc"  # one-character stops hold nothing back


def test_empty_stop_string_is_refused() -> None:
    with pytest.raises(ValueError):
        StopMatcher(["ok", ""])


def test_random_texts_and_splits_match_the_reference() -> None:
    rng = random.Random(11)
    for _ in range(400):
        stops = ["".join(rng.choices("abc", k=rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choices("abcd", k=rng.randint(0, 20)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 5))))
        deltas = [text[start:end] for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        out, matcher = run_matcher(stops, deltas)
        assert (out, matcher.matched) == reference_cut(text, stops), (stops, deltas)
