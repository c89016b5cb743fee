"""`wren train distill`, run for real on tiny models: the student moves towards the teacher,
alpha = 1 is SFT bit for bit, exact resume after SIGKILL, and teachers that cannot be compared."""

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    TINY_MODEL_FLAGS,
    TINY_MODEL_SETTINGS,
    addition_conversations,
    kill_after_step,
    losses,
    metric_rows,
    wren,
)

from wren.checkpoint import init_checkpoint, load_model
from wren.data.demo import demo_texts
from wren.errors import WrenError
from wren.tokenizer import Tokenizer, train_tokenizer
from wren.train.config import resolve_config
from wren.train.distill import Distillation, data_kind, teacher_dtype

HELD_OUT = 6  # demo texts kept out of training, to measure the student against the teacher


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Text and conversations, their tokenizer, a trained teacher and an untrained student."""
    directory = tmp_path_factory.mktemp("distill")
    texts = demo_texts(max_bytes=150_000)
    (directory / "pretrain.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in texts[:-HELD_OUT])
    )
    (directory / "held_out.json").write_text(json.dumps(texts[-HELD_OUT:]))
    conversations = addition_conversations(15)
    (directory / "sft.jsonl").write_text("".join(json.dumps(c) + "\n" for c in conversations))
    tokenizer = train_tokenizer([directory / "pretrain.jsonl", directory / "sft.jsonl"], vocab_size=512)
    tokenizer.save(directory / "tokenizer")
    result = wren(
        "train", "pretrain", "--data", directory / "pretrain.jsonl", "--preset", "micro",
        "--tokenizer", directory / "tokenizer", "--out", directory / "teacher-run", "--seq-len", "64",
        "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "2", "--max-steps", "40", "--workers", "1",
        "--logger", "none", *TINY_MODEL_FLAGS,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    init_checkpoint(
        "micro", directory / "tokenizer", directory / "student", seed=1, overrides=TINY_MODEL_SETTINGS
    )
    return directory


def distill_args(corpus: Path, out: Path, *extra, data: str = "pretrain.jsonl") -> list:
    return [
        "train", "distill", "--data", corpus / data, "--init", corpus / "student",
        "--teacher", corpus / "teacher-run" / "final", "--out", out, "--seq-len", "64",
        "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "2", "--workers", "1", "--logger", "none",
        "--log-every", "1", *extra,
    ]  # fmt: skip


def held_out_kl(student_dir: Path, corpus: Path) -> float:
    """Mean KL(teacher || student) per token over texts neither model trained on."""
    tokenizer = Tokenizer.load(corpus / "tokenizer")
    teacher = load_model(corpus / "teacher-run" / "final", dtype=torch.float32)
    student = load_model(student_dir, dtype=torch.float32)
    total, count = 0.0, 0
    with torch.no_grad():
        for text in json.loads((corpus / "held_out.json").read_text()):
            ids = torch.tensor([tokenizer.encode(text)[:64]])
            teacher_log_probs = F.log_softmax(teacher(ids)[0], dim=-1)
            student_log_probs = F.log_softmax(student(ids)[0], dim=-1)
            kl = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(-1)
            total, count = total + float(kl.sum()), count + kl.numel()
    return total / count


COMMON = ("--max-steps", "24", "--save-every", "4", "--eval-every", "12")


@pytest.fixture(scope="module")
def distilled(corpus) -> Path:
    """An uninterrupted distillation run on pretraining text (alpha 0.5, temperature 2)."""
    run = corpus / "distilled"
    result = wren(*distill_args(corpus, run, *COMMON, "--distill-temperature", "2"))
    assert result.returncode == 0, result.stderr
    return run


# -- the objective -------------------------------------------------------------------------------


def test_distillation_brings_the_student_closer_to_the_teacher(corpus, distilled):
    before = held_out_kl(corpus / "student", corpus)
    after = held_out_kl(distilled / "final", corpus)
    assert after < 0.5 * before, (before, after)
    rows = metric_rows(distilled)
    assert all("train/ce" in row and "train/kl" in row for row in rows)
    evals = [row["val/kl"] for row in rows if "val/kl" in row]
    assert len(evals) == 2 and evals[1] < evals[0]
    # The logged loss is the mix: alpha * CE + (1 - alpha) * T^2 * KL, each averaged per token.
    for row in rows:
        assert row["train/loss"] == pytest.approx(0.5 * row["train/ce"] + 0.5 * 4 * row["train/kl"], rel=1e-5)
    assert load_model(distilled / "final").config.n_layers == 2


def test_alpha_one_gives_exactly_the_sft_loss(corpus, tmp_path):
    same = ("--max-steps", "6", "--eval-every", "100")
    result = wren(
        *distill_args(corpus, tmp_path / "distill", *same, "--distill-alpha", "1", data="sft.jsonl")
    )
    assert result.returncode == 0, result.stderr
    assert "sft data:" in result.stdout  # conversations detected: trained on the assistant's tokens
    sft_args = distill_args(corpus, tmp_path / "sft", *same, data="sft.jsonl")
    sft_args[1] = "sft"
    teacher_at = sft_args.index("--teacher")
    del sft_args[teacher_at : teacher_at + 2]
    result = wren(*sft_args)
    assert result.returncode == 0, result.stderr
    distill_losses, sft_losses = losses(tmp_path / "distill"), losses(tmp_path / "sft")
    assert sorted(sft_losses) == list(range(1, 7))
    assert distill_losses == sft_losses  # bit for bit
    assert all(row["train/kl"] > 0 for row in metric_rows(tmp_path / "distill"))


def test_resume_after_sigkill_gives_identical_losses(corpus, distilled, tmp_path):
    killed = tmp_path / "killed"
    args = distill_args(corpus, killed, *COMMON, "--distill-temperature", "2")
    # Killed mid-run: after step 9 is logged, past the step-8 checkpoint.
    last_step = kill_after_step(args, killed, 9, timeout=120)
    assert last_step < 24, "the run finished before it could be killed"

    result = wren(*args, "--resume")
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout
    assert losses(killed) == losses(distilled)  # bit-identical, every step


# -- teachers that cannot be compared --------------------------------------------------------------


def test_a_teacher_with_another_tokenizer_is_refused(corpus, tmp_path):
    other = train_tokenizer([corpus / "sft.jsonl"], vocab_size=400)
    other.save(tmp_path / "other-tokenizer")
    init_checkpoint("micro", tmp_path / "other-tokenizer", tmp_path / "other", overrides=TINY_MODEL_SETTINGS)
    args = distill_args(corpus, tmp_path / "run", "--max-steps", "2")
    args[args.index("--teacher") + 1] = tmp_path / "other"
    result = wren(*args)
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    assert re.search(r"teacher's tokenizer \(\d+ tokens\) differs from the student's \(512 tokens\)", message)
    assert str(tmp_path / "other") in message
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def objective(corpus: Path, teacher: Path, **settings) -> Distillation:
    config = resolve_config(
        objective="distill",
        data=[str(corpus / "pretrain.jsonl")],
        init=str(corpus / "student"),
        teacher=str(teacher),
        seq_len=32,
        batch_size=2,
        workers=1,
        **settings,
    )
    return Distillation(config, torch.device("cpu"))


def test_padded_teacher_vocabularies_compare_the_real_tokens_and_short_ones_are_refused(corpus, tmp_path):
    # Same tokenizer, output layer padded past it (as Qwen pads 151,665 tokens to 151,936 rows).
    init_checkpoint(
        "micro",
        corpus / "tokenizer",
        tmp_path / "padded",
        overrides={**TINY_MODEL_SETTINGS, "vocab_size": 576},
    )
    distill = objective(corpus, tmp_path / "padded", teacher_dtype="bfloat16")
    student, tokenizer = distill.build_model(None)
    distill.setup(student)
    assert "teacher" in distill.prepare(tokenizer, tmp_path / "cache", is_main=True)
    assert distill.vocab == 512 and distill.teacher.lm_head.weight.dtype == torch.bfloat16
    result = distill.loss(student, next(iter(distill.train_batches(0, 1))))
    assert torch.isfinite(result.loss_sum) and result.metric_sums["kl"] > 0

    # An output layer without a row for every token of the tokenizer cannot be compared.
    init_checkpoint(
        "micro",
        corpus / "tokenizer",
        tmp_path / "short",
        overrides={**TINY_MODEL_SETTINGS, "vocab_size": 500},
    )
    distill = objective(corpus, tmp_path / "short")
    student, tokenizer = distill.build_model(None)
    distill.setup(student)
    with pytest.raises(WrenError, match=r"output layer has 500 rows .* tokenizer has 512 tokens"):
        distill.prepare(tokenizer, tmp_path / "cache", is_main=True)


def test_teacher_dtype_and_data_kind(corpus, tmp_path):
    assert teacher_dtype("auto", torch.device("cpu")) == torch.float32
    assert teacher_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(WrenError, match="teacher_dtype 'half'"):
        objective(corpus, corpus / "teacher-run" / "final", teacher_dtype="half")
    assert data_kind([str(corpus / "pretrain.jsonl")]) == "pretrain"
    assert data_kind([str(corpus / "sft.jsonl")]) == "sft"
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('\n{"chosen": [], "rejected": []}\n')
    with pytest.raises(WrenError, match=r"pairs.jsonl:2: found a preference pair"):
        data_kind([str(pairs)])
