"""The training loop, run for real on tiny models: schedules, config, pretraining and SFT runs,
exact resume after SIGKILL, two-process DDP, and the NaN stop."""

import json
from pathlib import Path

import pytest
import torch
from helpers import (
    SHARED_DATA,
    TINY_MODEL_FLAGS,
    addition_conversations,
    kill_after_step,
    losses,
    metric_rows,
    stderr_tail,
    wren,
    wren_on_two_processes,
)

from wren.checkpoint import load_model
from wren.data.demo import demo_texts
from wren.errors import WrenError
from wren.tokenizer import train_tokenizer
from wren.train.config import resolve_config
from wren.train.schedule import learning_rate


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("train-data")
    texts = demo_texts(max_bytes=150_000)
    (directory / "pretrain.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    conversations = addition_conversations(20)
    (directory / "sft.jsonl").write_text("".join(json.dumps(c) + "\n" for c in conversations))
    tokenizer = train_tokenizer([directory / "pretrain.jsonl", directory / "sft.jsonl"], vocab_size=512)
    tokenizer.save(directory / "tokenizer")
    return directory


def pretrain_args(corpus: Path, out: Path, *extra) -> list:
    return [
        "train", "pretrain", "--data", corpus / "pretrain.jsonl", "--preset", "micro",
        "--tokenizer", corpus / "tokenizer", "--out", out, "--seq-len", "64", "--batch-size", "4",
        "--lr", "3e-3", "--warmup-steps", "2", "--workers", "1", "--logger", "none", "--log-every", "1",
        "--val-fraction", "0.05", *TINY_MODEL_FLAGS, *extra,
    ]  # fmt: skip


# -- schedule and config -----------------------------------------------------------------------


def test_schedules():
    kw = dict(max_lr=1.0, total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate(0, **kw) == pytest.approx(0.1)
    assert learning_rate(9, **kw) == pytest.approx(1.0)
    assert learning_rate(10, **kw) == pytest.approx(1.0)
    assert learning_rate(55, **kw) == pytest.approx(0.55)  # cosine midpoint: halfway to min
    assert learning_rate(100, **kw) == pytest.approx(0.1)
    wsd = dict(kw, schedule="wsd", decay_fraction=0.2)
    assert learning_rate(50, **wsd) == 1.0 and learning_rate(79, **wsd) == 1.0
    assert learning_rate(90, **wsd) == pytest.approx(0.55)
    assert learning_rate(100, **wsd) == pytest.approx(0.1)
    assert learning_rate(60, **dict(kw, schedule="constant")) == 1.0


def test_config_file_then_flags(tmp_path):
    (tmp_path / "run.toml").write_text('data = "x.jsonl"\ninit = "ckpt"\nlr = 0.01\nmax_steps = 7\n')
    config = resolve_config(tmp_path / "run.toml", lr=0.02, seq_len=None)
    assert (config.lr, config.max_steps, config.data, config.seq_len) == (0.02, 7, ["x.jsonl"], 512)
    assert config.out_dir == "runs/pretrain"
    (tmp_path / "run.yaml").write_text("data: [a.jsonl]\ninit: ckpt\nbatch_size: 3\n")
    assert resolve_config(tmp_path / "run.yaml").batch_size == 3
    (tmp_path / "bad.toml").write_text('data = "x"\ninit = "c"\nlearning_rate = 1\n')
    with pytest.raises(WrenError, match=r"unknown training setting.*learning_rate"):
        resolve_config(tmp_path / "bad.toml")
    with pytest.raises(WrenError, match="cannot parse"):
        (tmp_path / "broken.toml").write_text("lr = = 1")
        resolve_config(tmp_path / "broken.toml")
    with pytest.raises(WrenError, match="say what to train"):
        resolve_config(data=["x"])
    with pytest.raises(WrenError, match="schedule"):
        resolve_config(data=["x"], init="c", schedule="linear")


# -- real runs -----------------------------------------------------------------------------------


def test_pretrain_run_learns_and_writes_a_loadable_checkpoint(corpus, tmp_path):
    run = tmp_path / "run"
    result = wren(
        *pretrain_args(corpus, run, "--max-steps", "30", "--eval-every", "15", "--save-every", "10")
    )
    assert result.returncode == 0, result.stderr
    curve = losses(run)
    assert sorted(curve) == list(range(1, 31))
    assert curve[30] < curve[1] - 1.0  # it learns
    evals = [row for row in metric_rows(run) if "val/bpb" in row]
    assert [row["step"] for row in evals] == [15, 30]
    assert 0 < evals[-1]["val/bpb"] < evals[0]["val/bpb"] + 0.5
    assert json.loads((run / "train_config.json").read_text())["max_steps"] == 30
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert steps == ["step-000020", "step-000030"]  # keep_last=2
    model = load_model(run / "final")
    assert model.config.n_layers == 2
    assert (run / "final" / "trainer_state" / "optimizer.pt").is_file()


def test_sft_run_trains_on_conversations(corpus, tmp_path):
    base = tmp_path / "base"
    assert wren(*pretrain_args(corpus, base, "--max-steps", "5")).returncode == 0
    run = tmp_path / "sft"
    result = wren(
        "train", "sft", "--data", corpus / "sft.jsonl", "--init", base / "final", "--out", run,
        "--seq-len", "64", "--batch-size", "4", "--max-steps", "25", "--lr", "3e-3", "--warmup-steps", "2",
        "--workers", "1", "--logger", "none", "--log-every", "1", "--eval-every", "25",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    curve = losses(run)
    assert curve[25] < curve[1] * 0.7
    assert load_model(run / "final").config.n_layers == 2


def test_resume_after_sigkill_gives_identical_losses(corpus, tmp_path):
    common = ("--max-steps", "16", "--save-every", "4", "--eval-every", "100")
    straight = tmp_path / "straight"
    assert wren(*pretrain_args(corpus, straight, *common)).returncode == 0

    killed = tmp_path / "killed"
    # Killed mid-run: after step 9 is logged, past the step-8 checkpoint.
    last_step = kill_after_step(pretrain_args(corpus, killed, *common), killed, 9)
    assert last_step < 16, "the run finished before it could be killed"

    result = wren(*pretrain_args(corpus, killed, *common, "--resume"))
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout
    assert losses(killed) == losses(straight)  # bit-identical, every step


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(corpus, tmp_path):
    common = ("--max-steps", "6", "--eval-every", "100", "--cache-dir", tmp_path / "cache")
    single = tmp_path / "single"
    result = wren(*pretrain_args(corpus, single, *common, "--batch-size", "8"))
    assert result.returncode == 0, result.stderr
    ddp = tmp_path / "ddp"
    result = wren_on_two_processes(*pretrain_args(corpus, ddp, *common, "--batch-size", "4"))
    assert result.returncode == 0, stderr_tail(result)
    one, two = losses(single), losses(ddp)
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-4), step


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    run = tmp_path / "run"
    # Two sane steps and a checkpoint, then an absurd learning rate blows the weights up.
    result = wren(*pretrain_args(corpus, run, "--max-steps", "2", "--save-every", "2"))
    assert result.returncode == 0
    result = wren(
        *pretrain_args(corpus, run, "--max-steps", "30", "--lr", "1e6", "--warmup-steps", "1", "--resume")
    )
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    assert "loss became" in message and "step-000002" in message
    assert load_model(run / "checkpoints" / "step-000002") is not None
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]


def test_bad_training_rows_stop_the_run_unless_skipped(corpus, tmp_path):
    data = tmp_path / "mixed.jsonl"
    rows = (corpus / "pretrain.jsonl").read_text().splitlines()[:200]
    rows.insert(3, '{"txt": "wrong field"}')
    data.write_text("\n".join(rows) + "\n")
    args = pretrain_args(corpus, tmp_path / "run", "--max-steps", "2")
    args[args.index(corpus / "pretrain.jsonl")] = data
    result = wren(*args)
    assert result.returncode == 2
    assert "mixed.jsonl:4" in result.stderr
    args[args.index("--out") + 1] = tmp_path / "run2"
    result = wren(*args, "--skip-bad-lines")
    assert result.returncode == 0, result.stderr
    assert "skipped 1 bad line" in result.stdout


SHARED_DEMO = SHARED_DATA / "demo"


@pytest.mark.skipif(not SHARED_DEMO.is_dir(), reason="../shared/data/demo is not beside the checkout")
def test_train_on_the_shared_demo_data(tmp_path):
    tokenizer = train_tokenizer(
        [SHARED_DEMO / "pretrain_demo.jsonl", SHARED_DEMO / "sft_demo.jsonl"], vocab_size=1024
    )
    tokenizer.save(tmp_path / "tok")
    common = [
        "--seq-len",
        "128",
        "--batch-size",
        "4",
        "--max-steps",
        "4",
        "--logger",
        "none",
        "--workers",
        "2",
    ]
    result = wren(
        "train", "pretrain", "--data", SHARED_DEMO / "pretrain_demo.jsonl", "--preset", "micro",
        "--tokenizer", tmp_path / "tok", "--out", tmp_path / "pre", *common,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    result = wren(
        "train", "sft", "--data", SHARED_DEMO / "sft_demo.jsonl", "--init", tmp_path / "pre" / "final",
        "--out", tmp_path / "sft", *common,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert torch.isfinite(torch.tensor(list(losses(tmp_path / "sft").values()))).all()
