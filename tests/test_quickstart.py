"""`wren quickstart` end to end, shortened: the real stages, a few steps each, in a real process."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import SHARED_DATA, stderr_tail, wren

from wren.checkpoint import load_model

SHARED_DEMO = SHARED_DATA / "demo"


def quickstart(*args: object) -> subprocess.CompletedProcess:
    return wren("quickstart", *args, timeout=600)


def test_quickstart_trains_a_chat_model_and_says_how_to_use_it(tmp_path):
    out = tmp_path / "qs"
    result = quickstart("--out", out, "--pretrain-steps", "12", "--sft-steps", "6")
    assert result.returncode == 0, stderr_tail(result)
    text = result.stdout + result.stderr
    for stage in ("1/5 data", "2/5 tokenizer", "3/5 pretraining", "4/5 supervised fine-tuning", "5/5 sample"):
        assert stage in text
    assert "validation loss" in text and "bpb" in text
    assert text.count("user: ") == 3 and text.count("wren: ") >= 3
    assert "model info" in text and "train sft --init" in text and "pipeline('text-generation'" in text

    model_dir = out / "sft" / "final"
    assert load_model(model_dir).config.vocab_size == 2048
    assert (out / "pretrain" / "final" / "trainer_state" / "state.json").is_file()

    # The printed transformers command is the one a user would paste: it must run as printed.
    command = next(line.strip() for line in text.splitlines() if "pipeline(" in line)
    assert command.startswith("python -c ")
    pasted = subprocess.run(
        command.replace("python", sys.executable, 1), shell=True, capture_output=True, text=True, timeout=300
    )
    assert pasted.returncode == 0, stderr_tail(pasted)

    # Running it again replaces the earlier runs instead of refusing their checkpoints.
    again = quickstart("--out", out, "--pretrain-steps", "2", "--sft-steps", "2")
    assert again.returncode == 0, stderr_tail(again)
    assert "steps 0->2" in again.stdout


def test_quickstart_will_not_touch_a_directory_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    result = quickstart("--out", tmp_path, "--pretrain-steps", "1", "--sft-steps", "1")
    assert result.returncode == 2
    assert "was not written by wren quickstart" in result.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.skipif(not SHARED_DEMO.is_dir(), reason="../shared/data/demo is not beside the checkout")
def test_quickstart_on_real_data(tmp_path):
    result = quickstart(
        "--out", tmp_path / "qs", "--data", SHARED_DEMO, "--pretrain-steps", "3", "--sft-steps", "2"
    )
    assert result.returncode == 0, stderr_tail(result)
    assert "pretrain_demo.jsonl" in result.stdout and "sft_demo.jsonl" in result.stdout
    assert "ignoring" in result.stdout  # the DPO and evaluation files are not training text here
    assert load_model(tmp_path / "qs" / "sft" / "final").config.vocab_size == 6400
