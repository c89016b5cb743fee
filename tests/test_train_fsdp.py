"""FSDP2 (`--fsdp`) under torchrun, for real on two CPU processes with gloo: the same losses and
weights as one process with the same global batch, checkpoints in the ordinary format, exact
resume, and mixture-of-experts models."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import TINY_MODEL_FLAGS, losses, metric, set_flags, stderr_tail, wren, wren_on_two_processes

from wren.checkpoint import load_model
from wren.data.demo import demo_texts
from wren.model import CausalLM, ModelConfig
from wren.tokenizer import train_tokenizer
from wren.train.state import optimizer_state_by_index, optimizer_state_by_name

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)

TINY_MOE = [*TINY_MODEL_FLAGS, *set_flags({"n_experts": 4, "n_experts_per_token": 2, "ffn_dim": 64})]
# A constant schedule (after warmup) does not depend on --max-steps, so a run stopped at step 4
# and resumed to step 6 must retrace an uninterrupted 6-step run.
COMMON = ["--eval-every", "100", "--schedule", "constant"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("fsdp-data")
    texts = demo_texts(max_bytes=150_000)
    (directory / "pretrain.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    train_tokenizer([directory / "pretrain.jsonl"], vocab_size=512).save(directory / "tokenizer")
    return directory


def pretrain_args(corpus: Path, out: Path, *extra) -> list:
    return [
        "train", "pretrain", "--data", corpus / "pretrain.jsonl", "--preset", "micro",
        "--tokenizer", corpus / "tokenizer", "--out", out, "--seq-len", "64", "--lr", "3e-3",
        "--warmup-steps", "2", "--workers", "1", "--logger", "none", "--log-every", "1",
        "--val-fraction", "0.05", "--cache-dir", corpus / "cache", *extra,
    ]  # fmt: skip


def one_process(*args) -> subprocess.CompletedProcess:
    result = wren(*args, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, stderr_tail(result)
    return result


def two_processes(*args) -> subprocess.CompletedProcess:
    result = wren_on_two_processes(*args, timeout=180)
    assert result.returncode == 0, stderr_tail(result)
    return result


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> dict[str, Path]:
    """Each run once, shared by the tests. Global batch 8 everywhere: one process x 8 sequences,
    or two processes x 2 sequences x 2 accumulated micro-batches (so FSDP's no-sync path runs)."""
    root = tmp_path_factory.mktemp("fsdp-runs")
    out = {name: root / name for name in ("single", "fsdp", "stopped")}
    # One process with --fsdp has nothing to shard: it trains as usual, after a note.
    result = one_process(
        *pretrain_args(
            corpus, out["single"], *COMMON, *TINY_MODEL_FLAGS, "--max-steps", "6", "--batch-size", "8"
        ),
        "--fsdp",
    )
    assert "note: --fsdp" in result.stdout
    fsdp = ("--batch-size", "2", "--grad-accum", "2", "--fsdp")
    result = two_processes(
        *pretrain_args(corpus, out["fsdp"], *COMMON, *TINY_MODEL_FLAGS, "--max-steps", "6", *fsdp)
    )
    assert "sharded (FSDP)" in result.stdout
    stopped = pretrain_args(corpus, out["stopped"], *COMMON, *TINY_MODEL_FLAGS, *fsdp)
    two_processes(*stopped, "--max-steps", "4")
    result = two_processes(*stopped, "--max-steps", "6", "--resume")
    assert "resumed from" in result.stdout and "step-000004" in result.stdout
    return out


def test_two_process_fsdp_matches_one_process_with_the_same_global_batch(runs):
    for name in ("train/loss", "train/grad_norm"):
        one, two = metric(runs["single"], name), metric(runs["fsdp"], name)
        assert sorted(one) == sorted(two) == list(range(1, 7))
        for step in one:
            assert two[step] == pytest.approx(one[step], abs=1e-4), (name, step)
    assert max(metric(runs["single"], "train/grad_norm").values()) > 1.0  # clipping was exercised


def test_fsdp_checkpoint_is_the_ordinary_format_with_the_same_weights(runs):
    single, fsdp = load_model(runs["single"] / "final"), load_model(runs["fsdp"] / "final")
    assert fsdp.config == single.config and fsdp.config.tie_embeddings
    assert fsdp.lm_head.weight is fsdp.model.embed_tokens.weight
    expected = single.state_dict()
    # Summation order differs (one batch of 8 against 2 ranks x 2 micro-batches, and the matrix
    # products block by row count): nearly every weight agrees within 1e-6, but Adam normalises
    # each gradient element, so the few elements whose gradient is ~0 (dead SwiGLU units) can end
    # up a few 1e-5 apart after six steps (one of 12,288 in a gate projection, 1.8e-5, in our runs).
    for name, tensor in fsdp.state_dict().items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, expected[name], atol=5e-5, rtol=1e-4, msg=name)
    # The optimizer state is saved as Optimizer.state_dict() numbers it, as an unsharded run saves it.
    one, two = (
        torch.load(run / "final" / "trainer_state" / "optimizer.pt", weights_only=True)
        for run in (runs["single"], runs["fsdp"])
    )
    assert [g["params"] for g in two["param_groups"]] == [g["params"] for g in one["param_groups"]]
    assert sorted(two["state"]) == sorted(one["state"])
    for index, state in one["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(two["state"][index][key], state[key], atol=1e-5, rtol=1e-3)


def test_fsdp_run_resumes_where_it_stopped(runs):
    straight, resumed = losses(runs["fsdp"]), losses(runs["stopped"])
    assert sorted(resumed) == list(range(1, 7))
    for step in straight:
        assert resumed[step] == pytest.approx(straight[step], abs=1e-5), step
    a, b = load_model(runs["fsdp"] / "final"), load_model(runs["stopped"] / "final")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0, msg=name)


def test_mixture_of_experts_under_fsdp_matches_ddp(corpus, tmp_path):
    # Both runs compute each rank's load-balancing loss on its own micro-batch, so they agree
    # with each other (one process, computing it on the whole batch, would differ slightly).
    args = ("--max-steps", "4", "--batch-size", "4", *COMMON, *TINY_MOE)
    two_processes(*pretrain_args(corpus, tmp_path / "ddp", *args))
    two_processes(*pretrain_args(corpus, tmp_path / "fsdp", *args, "--fsdp"))
    ddp, fsdp = losses(tmp_path / "ddp"), losses(tmp_path / "fsdp")
    assert sorted(ddp) == sorted(fsdp) == [1, 2, 3, 4]
    for step in ddp:
        assert fsdp[step] == pytest.approx(ddp[step], abs=1e-4), step
    assert load_model(tmp_path / "fsdp" / "final").config.n_experts == 4


def test_optimizer_state_names_round_trip():
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, n_kv_heads=1))
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0},
        ]
    )
    model(torch.randint(0, 32, (2, 5))).logits.sum().backward()
    optimizer.step()
    saved = optimizer.state_dict()
    by_name = optimizer_state_by_name(saved, model, optimizer)
    assert "model.embed_tokens.weight" in by_name["state"]  # the tied matrix, under its first name
    assert "lm_head.weight" not in by_name["state"]
    assert by_name["param_groups"][1]["params"][0] == "model.layers.0.input_layernorm.weight"
    back = optimizer_state_by_index(by_name, model, optimizer)
    assert back["param_groups"] == saved["param_groups"]
    assert back["state"].keys() == saved["state"].keys()
    for index, state in saved["state"].items():
        assert all(torch.equal(back["state"][index][key], value) for key, value in state.items())
