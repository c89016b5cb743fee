"""Tokenised datasets on disk: tokenise once, memory-map for every epoch after.

A dataset directory holds
    tokens.bin    every document's token ids end to end (uint16 when the vocabulary fits, else uint32)
    offsets.npy   int64, n_docs + 1 boundaries: document i is tokens[offsets[i]:offsets[i+1]]
    mask.bin      uint8, one per token, 1 where the token is trained on (SFT and preference only)
    meta.json     kind, dtype, sizes, vocab_size, cache key, sources, skipped lines, creation time

`prepare_datasets` reads JSONL, validates each row, splits off validation rows (`split.py`),
tokenises in parallel and writes `cache_dir/<key>/{train,val}` in one atomic step. The key covers
everything the tokens depend on (see `cache_key`), so a second run with the same inputs opens the
cached directory without reading the JSONL at all.

A preference pair becomes two documents side by side, chosen at 2i and rejected at 2i + 1, each
masked on its final assistant reply only and ending with that reply's closing token (see
`encode_preference`). The split hashes the pair's row, so both halves land on the same side.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from wren.atomic import atomic_directory
from wren.data.chat import encode_conversation, end_of_text_id
from wren.data.formats import KINDS, Row, SkipCounter, expand_paths, iter_rows
from wren.data.split import is_validation
from wren.errors import WrenError
from wren.tokenizer import Tokenizer

# Bump when the layout or the encoding of rows changes: old caches then stop matching.
FORMAT_VERSION = 1
# Rows are sent to workers in chunks of about this many characters: big enough to amortise the
# hand-over, small enough that a few chunks per worker in flight stay a few tens of MB.
CHUNK_CHARS = 1 << 20
MAX_WORKERS = 8
# Below this much input, starting worker processes costs more than it saves.
PARALLEL_MIN_BYTES = 8 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id (0 .. vocab_size - 1) fits in 16 bits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ---------------------------------------------------------------------------------------------
# Reading


class TokenDataset:
    """A dataset directory opened read-only with memory maps: nothing is loaded until used."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        meta_file = self.directory / "meta.json"
        if not meta_file.is_file():
            raise WrenError(f"{self.directory}: not a tokenised dataset (no meta.json)")
        self.meta: dict[str, Any] = json.loads(meta_file.read_text(encoding="utf-8"))
        self.kind: str = self.meta["kind"]
        self.vocab_size: int = self.meta["vocab_size"]
        self.n_docs: int = self.meta["n_docs"]
        self.n_tokens: int = self.meta["n_tokens"]
        dtype = np.dtype(self.meta["dtype"])
        self.tokens = self._map("tokens.bin", dtype)
        self.mask = self._map("mask.bin", np.dtype(np.uint8)) if self.meta["has_mask"] else None
        self.offsets: np.ndarray = np.load(self.directory / "offsets.npy", mmap_mode="r")
        if len(self.offsets) != self.n_docs + 1 or int(self.offsets[-1]) != self.n_tokens:
            raise WrenError(f"{self.directory}: offsets.npy does not match meta.json; delete it to rebuild")

    def _map(self, name: str, dtype: np.dtype) -> np.ndarray:
        path = self.directory / name
        expected = self.n_tokens * dtype.itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise WrenError(f"{path}: missing or not {expected} bytes; delete the dataset to rebuild it")
        if self.n_tokens == 0:
            return np.zeros(0, dtype=dtype)  # numpy cannot map an empty file
        return np.memmap(path, dtype=dtype, mode="r")

    @property
    def lengths(self) -> np.ndarray:
        """Tokens in each document."""
        return np.diff(self.offsets)

    def document(self, index: int) -> np.ndarray:
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]

    def document_mask(self, index: int) -> np.ndarray:
        if self.mask is None:
            raise ValueError(f"{self.directory}: a {self.kind} dataset has no loss mask")
        return self.mask[self.offsets[index] : self.offsets[index + 1]]

    def __len__(self) -> int:
        return self.n_docs

    def __repr__(self) -> str:
        where = str(self.directory)
        return f"TokenDataset({where!r}, kind={self.kind}, docs={self.n_docs:,}, tokens={self.n_tokens:,})"


# ---------------------------------------------------------------------------------------------
# Writing


class DatasetWriter:
    """Appends documents to a new dataset directory; `close` writes the index and meta.json.

    Tokens go straight to disk, so a corpus larger than memory can be written.
    """

    def __init__(self, directory: Path, kind: str, vocab_size: int, with_mask: bool) -> None:
        directory.mkdir(parents=True)
        self.directory = directory
        self.kind = kind
        self.vocab_size = vocab_size
        self.dtype = token_dtype(vocab_size)
        self._tokens = (directory / "tokens.bin").open("wb")
        self._mask = (directory / "mask.bin").open("wb") if with_mask else None
        self._lengths: list[np.ndarray] = []
        self.n_docs = 0
        self.n_tokens = 0

    def append(self, ids: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Add documents: `ids` all their tokens end to end, `lengths` each one's size."""
        if (mask is None) != (self._mask is None):
            raise ValueError("give a mask for every chunk of an SFT dataset and for no other")
        self._tokens.write(ids.astype(self.dtype, copy=False).tobytes())
        if self._mask is not None and mask is not None:
            self._mask.write(mask.astype(np.uint8, copy=False).tobytes())
        self._lengths.append(lengths.astype(np.int64, copy=False))
        self.n_docs += len(lengths)
        self.n_tokens += len(ids)

    def close(self, **meta: Any) -> None:
        self._tokens.close()
        if self._mask is not None:
            self._mask.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        np.save(self.directory / "offsets.npy", offsets)
        info = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "dtype": self.dtype.name,
            "has_mask": self._mask is not None,
            "n_docs": self.n_docs,
            "n_tokens": self.n_tokens,
            "vocab_size": self.vocab_size,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **meta,
        }
        (self.directory / "meta.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")

    def abort(self) -> None:
        self._tokens.close()
        if self._mask is not None:
            self._mask.close()


def write_token_dataset(
    directory: Path | str,
    documents: Iterable[Sequence[int]],
    kind: str,
    vocab_size: int,
    masks: Iterable[Sequence[int]] | None = None,
) -> TokenDataset:
    """Write already-tokenised documents (and their loss masks, for SFT) as a dataset, atomically."""
    documents = [np.asarray(document, dtype=np.int64) for document in documents]
    mask_list = None if masks is None else [np.asarray(mask, dtype=np.uint8) for mask in masks]
    if mask_list is not None and [len(m) for m in mask_list] != [len(d) for d in documents]:
        raise ValueError("each mask must be as long as its document")
    for document in documents:
        if len(document) and (document.min() < 0 or document.max() >= vocab_size):
            raise ValueError(f"token ids must lie in [0, {vocab_size})")
    with atomic_directory(directory) as staging:
        writer = DatasetWriter(staging / "data", kind, vocab_size, with_mask=mask_list is not None)
        ids = np.concatenate(documents) if documents else np.zeros(0, dtype=np.int64)
        mask = (
            None if mask_list is None else (np.concatenate(mask_list) if mask_list else np.zeros(0, np.uint8))
        )
        writer.append(ids, np.array([len(d) for d in documents], dtype=np.int64), mask)
        writer.close()
        # atomic_directory yields an empty directory; move the dataset's files up into it.
        for item in (staging / "data").iterdir():
            item.rename(staging / item.name)
        (staging / "data").rmdir()
    return TokenDataset(directory)


# ---------------------------------------------------------------------------------------------
# Encoding rows (in worker processes, or in-process with workers=1)


Encoded = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]  # ids, lengths, mask


def encode_preference(tokenizer: Tokenizer, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """(ids, mask) of one side of a preference pair: the conversation rendered as for SFT, the
    mask kept on the final assistant reply only (DPO scores that reply alone; earlier replies are
    prompt), and the ids cut just after the reply's closing token, since nothing after it is ever
    a target."""
    ids, mask = encode_conversation(tokenizer, messages)
    end = len(mask)
    while end > 0 and not mask[end - 1]:
        end -= 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    if start == end:  # every reply is non-empty, so only a broken template gets here
        raise WrenError("the chat template left the final assistant reply without tokens; expected ChatML")
    return ids[:end], [0] * start + [1] * (end - start)


def encode_rows(tokenizer: Tokenizer, kind: str, items: list[Any], dtype: np.dtype) -> Encoded:
    """Tokens for a chunk of rows: pretraining texts, each followed by the end-of-text token;
    conversations, each with its assistant-only loss mask; or (chosen, rejected) pairs, each two
    documents masked on their final reply."""
    if kind == "pretrain":
        end = end_of_text_id(tokenizer)
        ids: list[int] = []
        lengths = []
        for encoding in tokenizer.backend.encode_batch(items, add_special_tokens=False):
            ids.extend(encoding.ids)
            ids.append(end)
            lengths.append(len(encoding.ids) + 1)
        return np.array(ids, dtype=dtype), np.array(lengths, dtype=np.int64), None
    if kind == "preference":
        encode, conversations = encode_preference, [side for pair in items for side in pair]
    else:
        encode, conversations = encode_conversation, items
    ids, mask, lengths = [], [], []
    for messages in conversations:
        conversation_ids, conversation_mask = encode(tokenizer, messages)
        ids.extend(conversation_ids)
        mask.extend(conversation_mask)
        lengths.append(len(conversation_ids))
    return np.array(ids, dtype=dtype), np.array(lengths, dtype=np.int64), np.array(mask, dtype=np.uint8)


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_in_worker(kind: str, items: list[Any], dtype: np.dtype) -> Encoded:
    assert _worker_tokenizer is not None, "worker started without a tokenizer"
    return encode_rows(_worker_tokenizer, kind, items, dtype)


def _ordered_map(
    tokenizer: Tokenizer, kind: str, dtype: np.dtype, jobs: Iterable[tuple[str, list[Any]]], workers: int
) -> Iterator[tuple[str, Encoded]]:
    """Encode each (split, items) job; results come back in job order, whatever the worker count,
    so the bytes written never depend on it. At most 2 jobs per worker wait in memory."""
    if workers <= 1:
        for split, items in jobs:
            yield split, encode_rows(tokenizer, kind, items, dtype)
        return
    from concurrent.futures import Future, ProcessPoolExecutor

    # fork starts workers in milliseconds; where it is unavailable or unsafe (macOS, Windows)
    # the platform's default (spawn) pickles the tokenizer over instead.
    method = "fork" if sys.platform.startswith("linux") else None
    context = multiprocessing.get_context(method)
    pending: deque[tuple[str, Future[Encoded]]] = deque()
    with _tokenizers_threads_off():
        pool = ProcessPoolExecutor(
            workers, mp_context=context, initializer=_init_worker, initargs=(tokenizer,)
        )
        try:
            for split, items in jobs:
                pending.append((split, pool.submit(_encode_in_worker, kind, items, dtype)))
                if len(pending) >= 2 * workers:
                    done_split, future = pending.popleft()
                    yield done_split, future.result()
            while pending:
                done_split, future = pending.popleft()
                yield done_split, future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _tokenizers_threads_off() -> Iterator[None]:
    """Each worker process encodes on one thread: the processes already use every core, and
    `tokenizers` warns when forked after using its thread pool unless this is set first."""
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


# ---------------------------------------------------------------------------------------------
# Progress


class _Progress:
    """One line on stderr, rewritten in place: share of input read, rows, tokens per second."""

    def __init__(self, total_bytes: int, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.total_bytes = max(total_bytes, 1)
        self.start = self.last = time.monotonic()
        self.bytes = self.rows = self.tokens = 0

    def read(self, row: Row) -> None:
        self.bytes += row.nbytes
        self.rows += 1

    def wrote(self, tokens: int) -> None:
        self.tokens += tokens
        now = time.monotonic()
        if self.enabled and now - self.last >= 0.5:
            self.last = now
            self._show(now)

    def _show(self, now: float, end: str = "") -> None:
        rate = self.tokens / max(now - self.start, 1e-9)
        percent = 100 * min(self.bytes / self.total_bytes, 1.0)
        line = (
            f"\rtokenising: {percent:3.0f}%  {self.bytes / 1e6:,.1f} MB  {self.rows:,} rows  "
            f"{self.tokens:,} tokens  {rate / 1e6:.2f}M tokens/s"
        )
        sys.stderr.write(line + end)
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self._show(time.monotonic(), end="\n")


# ---------------------------------------------------------------------------------------------
# Preparing datasets


@dataclass
class PreparedData:
    train: TokenDataset
    val: TokenDataset | None
    skipped: int
    skipped_examples: list[str]  # the first few skipped lines, as "file:line: problem"
    directory: Path
    reused: bool  # True when the cache already held these tokens


def cache_key(
    files: Sequence[Path], tokenizer: Tokenizer, kind: str, val_fraction: float, skip_bad_lines: bool
) -> str:
    """sha256 over what the tokens depend on: FORMAT_VERSION, the kind, val_fraction,
    skip_bad_lines, the tokenizer (its serialised JSON, chat template and eos), and each input
    file's resolved path, size and modification time in nanoseconds.

    Files are recognised by size and mtime rather than by their content: hashing a many-GB corpus
    would cost about as long as tokenising it. Editing a file changes its mtime, so the cache
    follows; copying a file elsewhere (a new path) re-tokenises it.
    """
    digest = hashlib.sha256()
    header = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "val_fraction": repr(float(val_fraction)),
        "skip_bad_lines": bool(skip_bad_lines),
        "chat_template": tokenizer.chat_template,
        "eos_token": tokenizer.eos_token,
        "end_of_text_id": end_of_text_id(tokenizer),
        "files": [_file_identity(path) for path in files],
    }
    digest.update(json.dumps(header, sort_keys=True).encode("utf-8"))
    digest.update(tokenizer.backend.to_str().encode("utf-8"))
    return digest.hexdigest()


def _file_identity(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def prepare_datasets(
    paths: Iterable[Path | str],
    tokenizer: Tokenizer,
    kind: str,
    cache_dir: Path | str,
    val_fraction: float = 0.01,
    skip_bad_lines: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> PreparedData:
    """Tokenised train and validation datasets for JSONL files, built once and cached.

    Any invalid line raises WrenError("file:line: problem"), unless `skip_bad_lines`, which skips
    and counts them. `workers` None uses up to 8 processes for large inputs and encodes small ones
    in-process; the bytes written are the same for every worker count.
    """
    if kind not in KINDS:
        raise WrenError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise WrenError(f"val_fraction {val_fraction} is out of range; expected 0 <= val_fraction < 1")
    files = expand_paths(paths)
    key = cache_key(files, tokenizer, kind, val_fraction, skip_bad_lines)
    root = Path(cache_dir) / key[:16]
    reused = _is_cached(root, key)
    if not reused:
        total_bytes = sum(path.stat().st_size for path in files)
        if workers is None:
            workers = min(os.cpu_count() or 1, MAX_WORKERS) if total_bytes >= PARALLEL_MIN_BYTES else 1
        _build(
            root,
            files,
            tokenizer,
            kind,
            key,
            val_fraction,
            skip_bad_lines,
            workers,
            _Progress(total_bytes, progress),
        )
    return _open_prepared(root, reused)


def _is_cached(root: Path, key: str) -> bool:
    meta_file = root / "train" / "meta.json"
    if not meta_file.is_file():
        return False
    return json.loads(meta_file.read_text(encoding="utf-8")).get("cache_key") == key


def _open_prepared(root: Path, reused: bool) -> PreparedData:
    train = TokenDataset(root / "train")
    val = TokenDataset(root / "val") if (root / "val").is_dir() else None
    return PreparedData(
        train=train,
        val=val,
        skipped=train.meta["skipped"],
        skipped_examples=train.meta["skipped_examples"],
        directory=root,
        reused=reused,
    )


def _build(
    root: Path,
    files: list[Path],
    tokenizer: Tokenizer,
    kind: str,
    key: str,
    val_fraction: float,
    skip_bad_lines: bool,
    workers: int,
    progress: _Progress,
) -> None:
    skipped = SkipCounter()
    rows = iter_rows(files, kind, skip_bad_lines=skip_bad_lines, skipped=skipped)
    if kind == "preference":
        rows = _naming_preference_data(rows)
    with atomic_directory(root) as staging:
        writers = {
            split: DatasetWriter(staging / split, kind, tokenizer.vocab_size, with_mask=kind != "pretrain")
            for split in ("train", "val")
        }
        try:
            jobs = _chunk_rows(rows, kind, val_fraction, progress.read)
            for split, (ids, lengths, mask) in _ordered_map(
                tokenizer, kind, token_dtype(tokenizer.vocab_size), jobs, workers
            ):
                writers[split].append(ids, lengths, mask)
                progress.wrote(len(ids))
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        finally:
            progress.close()
        if writers["train"].n_docs == 0:
            for writer in writers.values():
                writer.abort()
            names = ", ".join(str(path) for path in files)
            raise WrenError(
                f"{names}: no training rows left ({skipped.count} bad lines skipped); expected {kind} rows"
            )
        meta = {
            "cache_key": key,
            "val_fraction": val_fraction,
            "skipped": skipped.count,
            "skipped_examples": [str(problem) for problem in skipped.examples],
            "sources": [_file_identity(path) for path in files],
            "tokenizer_vocab_size": tokenizer.vocab_size,
        }
        for split, writer in writers.items():
            writer.close(split=split, **meta)
        if writers["val"].n_docs == 0:
            shutil.rmtree(staging / "val")


def _naming_preference_data(rows: Iterator[Row]) -> Iterator[Row]:
    """The rows, with a bad row's message saying what a preference row is: the usual mistake is
    handing `wren train dpo` an SFT or pretraining file."""
    try:
        yield from rows
    except WrenError as error:
        raise WrenError(
            f'{error} (preference data: each row {{"chosen": [...], "rejected": [...]}}, two '
            "conversations with the same prompt)"
        ) from None


def _chunk_rows(
    rows: Iterator[Row], kind: str, val_fraction: float, on_row: Callable[[Row], None]
) -> Iterator[tuple[str, list[Any]]]:
    """Group rows into (split, items) jobs of about CHUNK_CHARS characters each, in file order.
    The split is decided per row, so a preference pair is never torn apart."""
    items: dict[str, list[Any]] = {"train": [], "val": []}
    sizes = {"train": 0, "val": 0}
    for row in rows:
        on_row(row)
        split = "val" if is_validation(row.raw, val_fraction) else "train"
        if kind == "pretrain":
            items[split].append(row.data["text"])
        elif kind == "sft":
            items[split].append(row.data["conversations"])
        else:
            items[split].append((row.data["chosen"], row.data["rejected"]))
        sizes[split] += len(row.raw)
        if sizes[split] >= CHUNK_CHARS:
            yield split, items[split]
            items[split], sizes[split] = [], 0
    for split in ("train", "val"):
        if items[split]:
            yield split, items[split]
