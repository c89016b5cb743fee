"""DPO (`wren train dpo`): preference pairs tokenised as two documents masked on the final reply,
batches of pairs, the loss, and real runs of the CLI on a tiny model: the margin rises, a run
killed with SIGKILL resumes exactly, and the result is a normal model directory.

The data are generated here (chosen: the right sum, rejected: a wrong one); one more test runs on
../shared/data when it is beside the checkout.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import SHARED_DATA, TINY_MODEL_FLAGS, kill_after_step, rows_by_step, wren

from wren.checkpoint import load_model
from wren.data.chat import encode_conversation
from wren.data.preference import PreferenceBatch, PreferenceBatches, eval_preference_batches, preference_batch
from wren.data.shards import prepare_datasets
from wren.data.split import is_validation
from wren.errors import WrenError
from wren.tokenizer import IM_END, Tokenizer, train_tokenizer
from wren.train.config import resolve_config
from wren.train.dpo import DPO, dpo_terms, sequence_logps


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def arithmetic_pairs(count: int) -> list[dict[str, Any]]:
    """Pairs whose chosen reply has the right sum and whose rejected reply is off by 1 to 3; the
    first 400 all ask different questions."""
    pairs = []
    for index in range(count):
        a, b = divmod(37 * index % 400, 20)
        wrong = a + b + (index % 3) + 1
        prompt = [user(f"What is {a} plus {b}?")]
        pairs.append(
            {
                "chosen": [*prompt, assistant(f"{a} plus {b} is {a + b}.")],
                "rejected": [*prompt, assistant(f"{a} plus {b} is {wrong}.")],
            }
        )
    return pairs


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def as_conversations(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Both sides of each pair as SFT rows: what a tokenizer can be trained on."""
    return [{"conversations": pair[side]} for pair in pairs for side in ("chosen", "rejected")]


def real_rows(batch: PreferenceBatch) -> list[list[int]]:
    """Each row without its padding: a stored side ends with the last token of its reply, the
    target of the position before it."""
    rows = []
    for ids, targets in zip(batch.input_ids.tolist(), batch.targets.tolist(), strict=True):
        last_target = max(i for i, t in enumerate(targets) if t != -100)
        rows.append(ids[: last_target + 2])
    return rows


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer, a fresh tiny model made with `wren model init`, and the generated pairs."""
    directory = tmp_path_factory.mktemp("dpo")
    write_jsonl(directory / "pairs.jsonl", arithmetic_pairs(400))
    write_jsonl(directory / "conversations.jsonl", as_conversations(arithmetic_pairs(400)))
    tokenizer = train_tokenizer([directory / "conversations.jsonl"], vocab_size=512)
    tokenizer.save(directory / "tokenizer")
    result = wren(
        "model", "init", "--preset", "micro", "--tokenizer", directory / "tokenizer",
        "--out", directory / "init", *TINY_MODEL_FLAGS,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return directory


@pytest.fixture(scope="module")
def tokenizer(workspace: Path) -> Tokenizer:
    return Tokenizer.load(workspace / "tokenizer")


# -- tokenised pairs ------------------------------------------------------------------------------


def test_a_pair_becomes_two_documents_masked_on_the_final_reply(tokenizer: Tokenizer, tmp_path: Path):
    multi_turn = [
        {"role": "system", "content": "You add numbers."},
        user("What is 2 plus 2?"),
        assistant("4."),
        user("And 3 plus 4?"),
    ]
    rows = [
        {"chosen": [*multi_turn, assistant("3 plus 4 is 7.")], "rejected": [*multi_turn, assistant("8.")]},
        arithmetic_pairs(1)[0],
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    data = prepare_datasets([path], tokenizer, "preference", tmp_path / "cache", 0.0, progress=False)
    assert data.val is None and data.train.kind == "preference" and data.train.n_docs == 4
    for index, row in enumerate(rows):
        stored = {}
        for offset, side in enumerate(("chosen", "rejected")):
            ids = data.train.document(2 * index + offset).tolist()
            mask = data.train.document_mask(2 * index + offset).astype(bool)
            full_ids, _ = encode_conversation(tokenizer, row[side])
            assert ids == full_ids[: len(ids)]  # the rendering, cut after the final reply
            # Only the final reply is masked (the earlier "4." is prompt), ending with <|im_end|>.
            assert tokenizer.decode(np.asarray(ids)[mask].tolist()) == row[side][-1]["content"] + IM_END
            assert mask[-1] and ids[-1] == tokenizer.token_to_id(IM_END)
            stored[side] = (ids, int(np.argmax(mask)))
        (chosen, start), (rejected, rejected_start) = stored["chosen"], stored["rejected"]
        assert start == rejected_start and chosen[:start] == rejected[:start]  # one shared prompt


def test_the_validation_split_keeps_both_halves_of_a_pair_together(tokenizer: Tokenizer, tmp_path: Path):
    pairs = arithmetic_pairs(80)
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    lines = path.read_text(encoding="utf-8").splitlines()
    held_out = [pair for pair, line in zip(pairs, lines, strict=True) if is_validation(line, 0.3)]
    kept = [pair for pair, line in zip(pairs, lines, strict=True) if not is_validation(line, 0.3)]
    assert held_out and kept
    data = prepare_datasets([path], tokenizer, "preference", tmp_path / "cache", 0.3, progress=False)
    for dataset, expected in ((data.val, held_out), (data.train, kept)):
        assert dataset.n_docs == 2 * len(expected)
        replies = []
        for doc in range(dataset.n_docs):
            mask = dataset.document_mask(doc).astype(bool)
            replies.append(tokenizer.decode(dataset.document(doc)[mask].tolist()).removesuffix(IM_END))
        assert replies == [pair[side][-1]["content"] for pair in expected for side in ("chosen", "rejected")]


def test_a_file_of_another_kind_is_named_and_refused(tokenizer: Tokenizer, tmp_path: Path):
    path = write_jsonl(tmp_path / "sft.jsonl", as_conversations(arithmetic_pairs(3)))
    with pytest.raises(WrenError, match=rf'^{path}:1: missing "chosen" field.*preference data'):
        prepare_datasets([path], tokenizer, "preference", tmp_path / "cache", progress=False)


# -- batches ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair_data(workspace: Path, tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory):
    return prepare_datasets(
        [workspace / "pairs.jsonl"], tokenizer, "preference", tmp_path_factory.mktemp("cache"), 0.1,
        progress=False,
    )  # fmt: skip


def test_batches_hold_each_pair_side_by_side_with_targets_on_the_reply_only(pair_data):
    train = pair_data.train
    batch = next(PreferenceBatches(train, 4, 64, seed=3))
    assert batch.n_pairs == 4 and batch.input_ids.shape[0] == 8 and batch.positions is None
    rows = real_rows(batch)
    assert batch.input_ids.shape[1] == max(len(row) for row in rows)  # padded to the longest row
    documents = {tuple(train.document(d).tolist()): d for d in range(train.n_docs)}
    for j in range(4):
        chosen, rejected = documents[tuple(rows[2 * j])], documents[tuple(rows[2 * j + 1])]
        assert chosen % 2 == 0 and rejected == chosen + 1  # the two sides of one pair
    for row in range(8):
        document = documents[tuple(rows[row])]
        mask = train.document_mask(document).astype(bool)
        targets = batch.targets[row]
        assert targets[targets != -100].tolist() == train.document(document)[mask].tolist()
    assert batch.n_target_tokens == int((batch.targets != -100).sum())


def test_ranks_split_the_global_batch_and_the_position_resumes(pair_data):
    train = pair_data.train
    whole = PreferenceBatches(train, 4, 64, seed=1)
    halves = [PreferenceBatches(train, 2, 64, seed=1, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(30):  # past the end of an epoch (about 180 pairs / 4 per step)
        expected = real_rows(next(whole))
        assert real_rows(next(halves[0])) + real_rows(next(halves[1])) == expected
    state = whole.state_dict()
    upcoming = [real_rows(next(whole)) for _ in range(20)]
    resumed = PreferenceBatches(train, 4, 64, seed=1)
    resumed.load_state_dict(state)
    assert [real_rows(next(resumed)) for _ in range(20)] == upcoming
    with pytest.raises(WrenError, match="global_batch"):
        PreferenceBatches(train, 8, 64, seed=1).load_state_dict(state)


def test_long_pairs_lose_the_start_of_their_prompt_not_their_reply(tokenizer: Tokenizer, tmp_path: Path):
    question = "Please read all of this before you answer. " * 20 + "What is 3 plus 4?"
    rows = [
        {"chosen": [user(question), assistant("7.")], "rejected": [user(question), assistant("It is 8.")]},
        {
            "chosen": [user(question), assistant("Seven. " * 40)],
            "rejected": [user(question), assistant("8.")],
        },
    ]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    dataset = prepare_datasets([path], tokenizer, "preference", tmp_path / "cache", 0.0, progress=False).train
    seq_len = 32
    batch = preference_batch(dataset, [0, 1], seq_len)
    assert batch.input_ids.shape == (4, seq_len)
    lengths = [len(dataset.document(d)) for d in range(4)]
    assert min(lengths[:2]) > seq_len  # too long, even the short side

    # Pair 0: both sides lose the same prompt tokens, just enough for the longer one to fit; both
    # replies stay whole.
    cut = max(lengths[:2]) - seq_len
    for side in (0, 1):
        ids = dataset.document(side).tolist()
        assert real_rows(batch)[side] == ids[cut:]
        mask = dataset.document_mask(side).astype(bool)
        assert batch.targets[side][batch.targets[side] != -100].tolist() == np.asarray(ids)[mask].tolist()

    # Pair 1: the chosen reply alone is longer than seq_len: the row starts on the last prompt
    # token and the reply is cut at its end; the rejected side is cut at the same place.
    start = int(np.argmax(dataset.document_mask(2))) - 1
    assert batch.input_ids[2].tolist() == dataset.document(2)[start : start + seq_len].tolist()
    assert int((batch.targets[2] != -100).sum()) == seq_len - 1
    assert real_rows(batch)[3] == dataset.document(3)[start:].tolist()


def test_validation_batches_cover_the_held_out_pairs_in_order(pair_data):
    val = pair_data.val
    batches = list(eval_preference_batches(val, 3, 64))
    assert sum(b.n_pairs for b in batches) == val.n_docs // 2
    rows = [row for b in batches for row in real_rows(b)]
    assert rows == [val.document(d).tolist() for d in range(val.n_docs)]
    assert len(list(eval_preference_batches(val, 3, 64, max_batches=1))) == 1


# -- the loss -----------------------------------------------------------------------------------


def test_the_loss_is_dpo_with_conservative_label_smoothing():
    policy = torch.tensor([-1.0, -3.0, -2.0, -2.0, -5.0, -1.0])
    reference = torch.tensor([-2.0, -2.0, -2.0, -2.0, -3.0, -3.0])
    loss, margin = dpo_terms(policy, reference, beta=0.5)
    assert margin.tolist() == [1.0, 0.0, -2.0]  # 0.5 * ((-1 + 3) - 0), 0, 0.5 * ((-5 + 1) - 0)
    assert loss.tolist() == pytest.approx([math.log1p(math.exp(-m)) for m in (1.0, 0.0, -2.0)])
    smoothed, _ = dpo_terms(policy, reference, beta=0.5, label_smoothing=0.2)
    expected = [0.8 * math.log1p(math.exp(-m)) + 0.2 * math.log1p(math.exp(m)) for m in (1.0, 0.0, -2.0)]
    assert smoothed.tolist() == pytest.approx(expected)


def test_the_objective_starts_at_log_2_and_trains_the_policy_only(workspace: Path, tmp_path: Path):
    config = resolve_config(
        objective="dpo", data=[str(workspace / "pairs.jsonl")], init=str(workspace / "init"),
        seq_len=64, batch_size=4, workers=1, dpo_beta=0.3, val_fraction=0.1, out_dir=str(tmp_path / "run"),
    )  # fmt: skip
    objective = DPO(config, torch.device("cpu"))
    model, tokenizer = objective.build_model(None)
    objective.setup(model)
    assert objective.prepare(tokenizer, tmp_path / "cache", is_main=True).startswith("preference data: ")
    batch = next(objective.train_batches(0, 1))
    result = objective.loss(model, batch)
    assert result.count == objective.count(batch) == 4
    # The policy is the reference: every margin is exactly 0, the loss log 2 per pair.
    assert result.loss_sum.item() == pytest.approx(4 * math.log(2), rel=1e-6)
    assert float(result.metric_sums["margin"]) == 0.0 and float(result.metric_sums["accuracy"]) == 0.0
    logps, _ = sequence_logps(model, batch, torch.device("cpu"))
    assert float(result.metric_sums["logp_chosen"]) == pytest.approx(logps[0::2].sum().item())
    # The log-probability of a row is that of its reply's tokens, from the cross-entropy.
    logits, _ = model(batch.input_ids[:1])
    reply = batch.targets[0] != -100
    token_logps = F.log_softmax(logits[0], dim=-1).gather(1, batch.targets[0].clamp(min=0)[:, None])[:, 0]
    assert logps[0].item() == pytest.approx(token_logps[reply].sum().item(), rel=1e-5)
    result.loss_sum.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert not any(p.requires_grad or p.grad is not None for p in objective.reference.parameters())
    assert set(objective.evaluate(model)) == {"val/loss", "val/accuracy", "val/margin"}
    assert next(iter(objective.evaluate(model))) == "val/loss"

    for bad in ({"dpo_beta": 0.0}, {"dpo_label_smoothing": 0.5}):
        with pytest.raises(WrenError, match=next(iter(bad))):
            DPO(resolve_config(**{**config.to_dict(), **bad}), torch.device("cpu"))


# -- real runs ----------------------------------------------------------------------------------


def dpo_args(workspace: Path, data: Path, out: Path, *extra) -> list:
    return [
        "train", "dpo", "--data", data, "--init", workspace / "init", "--out", out, "--seq-len", "64",
        "--batch-size", "8", "--lr", "1e-2", "--warmup-steps", "2", "--workers", "1", "--logger", "none",
        "--log-every", "1", *extra,
    ]  # fmt: skip


def test_dpo_run_raises_the_margin_and_writes_a_loadable_model(workspace: Path, tmp_path: Path):
    # 19 pairs, 3 of them held out by the row hash: 16 to train on, two batches, so 24 steps are 12
    # epochs. A fresh model cannot learn to add in that time; it learns these pairs, and the
    # margin on them rises (on 400 pairs, seen once, it stays near 0 for 30 steps).
    data = write_jsonl(tmp_path / "pairs.jsonl", arithmetic_pairs(19))
    run = tmp_path / "run"
    result = wren(
        *dpo_args(workspace, data, run, "--max-steps", "24", "--eval-every", "12", "--val-fraction", "0.2")
    )
    assert result.returncode == 0, result.stderr
    assert "preference data: 16 pairs" in result.stdout
    rows = rows_by_step(run)
    assert sorted(rows) == list(range(1, 25))
    assert rows[1]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[1]["train/margin"] == 0.0
    margins = [rows[step]["train/margin"] for step in range(1, 25)]
    accuracy = [rows[step]["train/accuracy"] for step in range(1, 25)]
    # Measured: the mean margin of steps 1-6 is 0.08, of steps 19-24 1.35; accuracy 1.0 from step 11.
    assert np.mean(margins[-6:]) > 0.5 and np.mean(margins[-6:]) > np.mean(margins[:6]) + 0.4
    assert np.mean(accuracy[-6:]) > 0.8
    assert rows[24]["train/loss"] < math.log(2) - 0.1
    assert rows[24]["train/logp_chosen"] < 0 and rows[24]["train/logp_rejected"] < 0
    for step in (12, 24):
        validation = [name for name in rows[step] if name.startswith("val/")]
        assert validation == ["val/loss", "val/accuracy", "val/margin"]

    # A plain model directory, and the trained weights: they prefer the chosen replies.
    model, reference = load_model(run / "final"), load_model(workspace / "init")
    tokenizer = Tokenizer.load(run / "final")
    assert model.config.n_layers == 2 and tokenizer.vocab_size == model.config.vocab_size
    train = prepare_datasets([data], tokenizer, "preference", tmp_path / "cache", 0.2, progress=False).train
    (batch,) = eval_preference_batches(train, 16, 64)
    with torch.no_grad():
        _, margin = dpo_terms(
            sequence_logps(model, batch, torch.device("cpu"))[0],
            sequence_logps(reference, batch, torch.device("cpu"))[0],
            beta=0.1,
        )
    assert float((margin > 0).float().mean()) >= 0.9


def test_dpo_resumes_exactly_after_sigkill(workspace: Path, tmp_path: Path):
    data = write_jsonl(tmp_path / "pairs.jsonl", arithmetic_pairs(40))
    common = (
        "--max-steps", "40", "--save-every", "4", "--eval-every", "100", "--reference", workspace / "init",
        "--dpo-beta", "0.2", "--dpo-label-smoothing", "0.1", "--val-fraction", "0.1",
    )  # fmt: skip
    straight = tmp_path / "straight"
    result = wren(*dpo_args(workspace, data, straight, *common))
    assert result.returncode == 0, result.stderr

    killed = tmp_path / "killed"
    # Killed mid-run: after step 9 is logged, past the step-8 checkpoint.
    last_step = kill_after_step(dpo_args(workspace, data, killed, *common), killed, 9)
    assert last_step < 40, "the run finished before it could be killed"

    result = wren(*dpo_args(workspace, data, killed, *common, "--resume"))
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout
    names = ("train/loss", "train/margin", "train/accuracy", "train/logp_chosen", "train/logp_rejected")
    resumed, uninterrupted = rows_by_step(killed), rows_by_step(straight)
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, 41))
    for step in uninterrupted:  # bit-identical, every step
        assert [resumed[step][n] for n in names] == [uninterrupted[step][n] for n in names], step
    assert "val/margin" in resumed[40] and resumed[40]["val/margin"] == uninterrupted[40]["val/margin"]


@pytest.mark.skipif(
    not (SHARED_DATA / "dpo").is_dir(), reason="../shared/data/dpo is not beside the checkout"
)
def test_dpo_on_the_shared_english_preference_data(tmp_path: Path):
    source = SHARED_DATA / "dpo" / "dpo_en_demo.jsonl"
    pairs = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    write_jsonl(tmp_path / "conversations.jsonl", as_conversations(pairs[:100]))  # plenty for 1,024 tokens
    train_tokenizer([tmp_path / "conversations.jsonl"], vocab_size=1024).save(tmp_path / "tok")
    result = wren(
        "model", "init", "--preset", "micro", "--tokenizer", tmp_path / "tok", "--out", tmp_path / "init",
        *TINY_MODEL_FLAGS,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    result = wren(
        "train", "dpo", "--data", source, "--init", tmp_path / "init", "--out", run, "--seq-len", "256",
        "--batch-size", "2", "--max-steps", "4", "--eval-every", "4", "--eval-batches", "2",
        "--val-fraction", "0.05", "--logger", "none", "--log-every", "1", "--workers", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = rows_by_step(run)
    assert rows[1]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(math.isfinite(value) for row in rows.values() for value in row.values())
    assert {"val/loss", "val/accuracy", "val/margin"} <= set(rows[4])
    assert load_model(run / "final").config.vocab_size == 1024
