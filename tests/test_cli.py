"""The `wren` command, run as a real process: each verb's happy path and its bad-input paths."""

import argparse
import json
import subprocess
import sys

import pytest

from wren.cli import build_parser, main


def wren(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wren", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit status 2, one line on stderr naming what went wrong, no traceback."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("wren: error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def corpus(workdir):
    result = wren("data", "demo", "--out", workdir / "pretrain.jsonl", "--max-mb", "0.3")
    assert result.returncode == 0, result.stderr
    return workdir / "pretrain.jsonl"


@pytest.fixture(scope="module")
def tokenizer_dir(workdir, corpus):
    result = wren("tokenizer", "train", corpus, "--vocab-size", "600", "--out", workdir / "tok")
    assert result.returncode == 0, result.stderr
    assert "600" in result.stdout
    return workdir / "tok"


def _verbs(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path the parser accepts, found by walking its subparsers."""
    found = [prefix]
    for action in parser._actions:  # argparse offers no public way to list subcommands
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found += _verbs(child, (*prefix, name))
    return found


VERBS = _verbs(build_parser())


def test_the_verb_list_is_complete():
    for verb in [("train", "dpo"), ("lora", "merge"), ("data", "fill"), ("data", "check"), ("quickstart",)]:
        assert verb in VERBS


@pytest.mark.parametrize("verb", VERBS, ids=lambda verb: " ".join(verb) or "wren")
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*verb, "--help"])
    assert exit_info.value.code == 0
    assert "usage: wren" in capsys.readouterr().out


def test_help_runs_as_a_real_process():
    result = wren("train", "sft", "--help")
    assert result.returncode == 0
    assert "usage: wren train sft" in result.stdout


def test_demo_corpus_is_real_text(corpus):
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    assert len(rows) > 100
    assert all(len(row["text"]) >= 64 for row in rows)


def test_tokenizer_train_writes_a_hugging_face_tokenizer(tokenizer_dir):
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in tokenizer_dir.iterdir()}


def test_model_init_and_info(workdir, tokenizer_dir):
    out = workdir / "micro"
    result = wren("model", "init", "--preset", "micro", "--tokenizer", tokenizer_dir, "--out", out)
    assert result.returncode == 0, result.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}

    info = wren("model", "info", out)
    assert info.returncode == 0, info.stderr
    assert "LlamaForCausalLM" in info.stdout
    assert "layer 0 tensors" in info.stdout

    as_json = json.loads(wren("model", "info", out, "--json").stdout)
    assert as_json["vocab_size"] == 600  # the tokenizer's size, not the preset's 2048
    assert as_json["layers"] == 4 and as_json["dim"] == 128
    assert as_json["has_tokenizer"]


def test_model_init_overrides_and_moe(workdir, tokenizer_dir):
    out = workdir / "moe"
    result = wren(
        "model", "init", "--preset", "moe", "--tokenizer", tokenizer_dir, "--out", out,
        "--set", "dim=64", "--set", "n_layers=2", "--set", "n_heads=4", "--set", "max_seq_len=256",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    info = json.loads(wren("model", "info", out, "--json").stdout)
    assert info["architecture"] == "Qwen2MoeForCausalLM"
    assert info["experts"]["routed"] == 4 and info["context_length"] == 256


def test_missing_input_file(workdir):
    result = wren("tokenizer", "train", workdir / "nope.jsonl", "--out", workdir / "t2")
    assert_user_error(result, "nope.jsonl")


def test_malformed_json_names_file_and_line(workdir):
    bad = workdir / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    assert_user_error(wren("tokenizer", "train", bad, "--out", workdir / "t3"), "bad.jsonl:2", "JSON")


def test_rows_without_text(workdir):
    bad = workdir / "fields.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    assert_user_error(wren("tokenizer", "train", bad, "--out", workdir / "t4"), "fields.jsonl:1", "text")


def test_unknown_preset(workdir, tokenizer_dir):
    result = wren("model", "init", "--preset", "huge", "--tokenizer", tokenizer_dir, "--out", workdir / "x")
    assert_user_error(result, "unknown preset 'huge'", "micro")
    assert not (workdir / "x").exists()


def test_bad_override(workdir, tokenizer_dir):
    result = wren(
        "model", "init", "--preset", "micro", "--tokenizer", tokenizer_dir, "--out", workdir / "y",
        "--set", "wings=2",
    )  # fmt: skip
    assert_user_error(result, "wings")


def test_missing_tokenizer(workdir):
    result = wren(
        "model", "init", "--preset", "micro", "--tokenizer", workdir / "none", "--out", workdir / "z"
    )
    assert_user_error(result, "none", "tokenizer")


def test_unreadable_checkpoint(workdir, corpus):
    assert_user_error(wren("model", "info", workdir), "config.json")
    assert_user_error(wren("model", "info", corpus), "not a directory")
    broken = workdir / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{")
    assert_user_error(wren("model", "info", broken), "config.json", "invalid JSON")


def test_argument_errors_exit_non_zero_without_traceback():
    result = wren("model", "init", "--preset", "micro")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "required" in result.stderr
