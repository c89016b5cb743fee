"""`wren eval`: perplexity and bits per byte against an independent computation, multiple choice on
a model built to prefer one letter, GSM8K answer grading, and the report card of a real tiny run."""

import json
import math
import struct
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import SHARED_DATA, TINY_MODEL_FLAGS, TINY_MODEL_SETTINGS, wren

from wren.checkpoint import load_model, save_checkpoint
from wren.cli import main
from wren.data.demo import demo_texts
from wren.errors import WrenError
from wren.eval.choice_data import read_choice_rows
from wren.eval.gsm8k import extract_answer, normalize_number, read_math_rows, reference_answer
from wren.eval.perplexity import document_windows, evaluate_perplexity
from wren.model import CausalLM
from wren.model.config import preset_config
from wren.tokenizer import Tokenizer, train_tokenizer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DOCUMENTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Naïve café owners in Zürich serve crème brûlée — 東京でも。",
    "def add(a, b):\n    return a + b\n",
    "A",
    "Numbers: 3.14159, 2.71828 and 1.41421 are famous constants of mathematics.",
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def run(capsys, *args) -> tuple[int, str, str]:
    """`wren ARGS` in this process (cheaper than a new one, which must import torch again):
    (exit status, stdout, stderr)."""
    capsys.readouterr()
    status = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_user_error(capsys, args: list, *fragments: str) -> None:
    """Exit status 2 and one line on stderr naming what went wrong."""
    status, _, err = run(capsys, *args)
    assert status == 2, err
    line = err.strip()
    assert line.startswith("wren: error: ") and "\n" not in line, line
    for fragment in fragments:
        assert fragment in line, (fragment, line)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("eval")
    write_jsonl(directory / "pretrain.jsonl", [{"text": t} for t in demo_texts(max_bytes=60_000)])
    return directory


def make_tokenizer(workdir: Path, name: str, extra_lines: list[str], vocab_size: int) -> Tokenizer:
    corpus = write_jsonl(workdir / f"{name}.jsonl", [{"text": line} for line in extra_lines])
    return train_tokenizer([workdir / "pretrain.jsonl", corpus], vocab_size=vocab_size)


@pytest.fixture(scope="module")
def tokenizer(workdir) -> Tokenizer:
    return make_tokenizer(workdir, "tok-text", [], vocab_size=400)


@pytest.fixture(scope="module")
def model_dir(workdir, tokenizer) -> Path:
    """A random tiny model: the numbers are meaningless, but every one can be recomputed."""
    torch.manual_seed(0)
    config = preset_config("micro", vocab_size=tokenizer.vocab_size, max_seq_len=128, **TINY_MODEL_SETTINGS)
    return save_checkpoint(CausalLM(config), workdir / "tiny", tokenizer=tokenizer)


# -- perplexity --------------------------------------------------------------------------------


def reference_nll(model: CausalLM, ids: list[int]) -> float:
    """Summed cross-entropy of ids[1:] given everything before, in one causal pass."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0]
    return float(F.cross_entropy(logits.float(), torch.tensor(ids[1:]), reduction="sum"))


def test_ppl_matches_an_independent_cross_entropy(workdir, tokenizer, model_dir):
    data = write_jsonl(workdir / "docs.jsonl", [{"text": t} for t in DOCUMENTS])
    result = wren("eval", "ppl", model_dir, "--data", data, "--json", "--batch-size", "2", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)

    model = load_model(model_dir)
    end_of_text = tokenizer.token_to_id("<|endoftext|>")
    total_nll, total_tokens = 0.0, 0
    for text in DOCUMENTS:
        ids = [end_of_text, *tokenizer.encode(text)]  # the document follows an end-of-text token
        assert len(ids) <= 128
        total_nll += reference_nll(model, ids)
        total_tokens += len(ids) - 1
    total_bytes = sum(len(text.encode("utf-8")) for text in DOCUMENTS)
    assert measured["documents"] == len(DOCUMENTS)
    assert measured["tokens"] == total_tokens
    assert measured["bytes"] == total_bytes > sum(len(text) for text in DOCUMENTS)  # UTF-8, not characters
    assert measured["loss"] == pytest.approx(total_nll / total_tokens, rel=1e-5)
    assert measured["bits_per_byte"] == pytest.approx(total_nll / math.log(2) / total_bytes, rel=1e-5)
    assert measured["perplexity"] == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-5)


def test_long_documents_are_scored_in_windows(workdir, tokenizer, model_dir):
    text = " ".join(DOCUMENTS) * 3
    ids = tokenizer.encode(text)
    windows = document_windows(ids, [0], seq_len=16)
    # Every token predicted exactly once, in order; no input longer than the window.
    assert [t for _, targets in windows for t in targets] == ids
    assert all(len(inputs) <= 16 and len(inputs) == len(targets) for inputs, targets in windows)
    assert windows[0][0][0] == 0  # the first window starts at the prefix

    model = load_model(model_dir)
    sequence = [0, *ids]
    expected, start = 0.0, 1
    while start < len(sequence):  # each window sees only the token before its first target
        stop = min(start + 16, len(sequence))
        expected += reference_nll(model, sequence[start - 1 : stop])
        start = stop
    result = evaluate_perplexity(
        model, tokenizer, [write_jsonl(workdir / "long.jsonl", [{"text": text}])], 16
    )
    assert result.tokens == len(ids)
    assert result.nll == pytest.approx(expected, rel=1e-5)


def test_ppl_bad_rows_name_file_and_line(workdir, model_dir, capsys):
    bad = write_jsonl(workdir / "bad-text.jsonl", [{"text": "fine"}, {"text": 5}])
    assert_user_error(capsys, ["eval", "ppl", model_dir, "--data", bad], "bad-text.jsonl:2", "text")


# -- multiple choice ---------------------------------------------------------------------------

# Answers as letters and as 0-based indexes; a model that always says B gets exactly the B rows.
CHOICE_ROWS = [
    {"subject": "algebra", "question": "1 + 1 = ?", "choices": ["1", "2", "3", "4"], "answer": "B"},
    {"subject": "algebra", "question": "2 + 2 = ?", "choices": ["4", "5", "6", "7"], "answer": "A"},
    {"subject": "algebra", "question": "3 + 3 = ?", "choices": ["5", "6", "7", "8"], "answer": 1},
    {"subject": "algebra", "question": "4 + 4 = ?", "choices": ["5", "6", "8", "9"], "answer": "C"},
    {"subject": "history", "question": "Which came first?", "choices": ["x", "y"], "answer": 1},
    {"subject": "history", "question": "Pick one.", "choices": ["a", "b", "c", "d", "e"], "answer": "E"},
    {"subject": "history", "question": "Pick another.", "choices": ["a", "b", "c"], "answer": "C"},
]


def bigram_model(tokenizer: Tokenizer, logits: dict[int, dict[int, float]], otherwise: int) -> CausalLM:
    """A model whose next token depends only on the current one: attention and MLP outputs are
    zeroed, so the last hidden state is the current token's embedding, a one-hot that lm_head maps
    to the logits given for that token (or a logit of 20 for `otherwise`)."""
    config = preset_config(
        "micro", vocab_size=tokenizer.vocab_size, max_seq_len=512, tie_embeddings=False, **TINY_MODEL_SETTINGS
    )
    model = CausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                param.zero_()
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed.zero_()
        head.zero_()
        embed[:, 0] = 1.0
        head[otherwise, 0] = 20.0
        for feature, (token, targets) in enumerate(logits.items(), start=1):
            embed[token] = 0.0
            embed[token, feature] = 1.0
            for target, logit in targets.items():
                head[target, feature] = logit
    return model


def letter_tokenizer(workdir: Path, merged: str) -> Tokenizer:
    """A vocabulary with " X" as one token for each letter X in `merged` (frequent in its corpus);
    the other letters are spelt as a space and then the letter."""
    lines = [f"Answer: {letter}" for letter in merged for _ in range(1000)]
    tokenizer = make_tokenizer(workdir, f"tok-{merged}", lines, vocab_size=400)
    cue = tokenizer.encode("Answer:")
    for letter in "ABCDE":
        spelling = tokenizer.encode(f"Answer: {letter}")[len(cue) :]
        assert len(spelling) == (1 if letter in merged else 2), (letter, spelling)
    return tokenizer


@pytest.mark.parametrize("merged", ["ABCDE", "A"], ids=["one token per letter", "space then letter"])
def test_choice_reads_the_letter_the_model_prefers(workdir, merged, capsys):
    tok = letter_tokenizer(workdir, merged)
    cue = tok.encode("Answer:")
    b_spelling = tok.encode("Answer: B")[len(cue) :]
    a_token, d_token = tok.encode(" A")[-1], tok.encode(" D")[-1]
    # After the prompt's last token ("Answer:" ends every prompt) the model says " B"; at the
    # padding it says " D", anywhere else " C": reading the wrong position picks another letter.
    logits = {cue[-1]: {b_spelling[0]: 20.0}, tok.pad_token_id: {d_token: 20.0}}
    if len(b_spelling) == 2:
        # " B" is a space then "B". The space would rather be followed by " A" (a single token
        # here), which only the letter's first token, read one position earlier, may be scored on.
        logits[b_spelling[0]] = {b_spelling[1]: 20.0, a_token: 25.0}
    model = bigram_model(tok, logits, otherwise=tok.encode(" C")[-1])
    directory = save_checkpoint(model, workdir / f"prefers-b-{merged}", tokenizer=tok)
    data = write_jsonl(workdir / "choice.jsonl", CHOICE_ROWS)

    status, out, err = run(
        capsys, "eval", "choice", directory, "--data", data, "--json", "--batch-size", 3, "--shots", 1
    )
    assert status == 0, err
    measured = json.loads(out)
    assert measured["subjects"] == {
        "algebra": {"correct": 2, "total": 4, "accuracy": 0.5},
        "history": {"correct": 1, "total": 3, "accuracy": pytest.approx(1 / 3)},
    }
    assert (measured["rows"], measured["correct"]) == (7, 3)
    assert measured["accuracy"] == pytest.approx(3 / 7)
    assert measured["subject_mean"] == pytest.approx((0.5 + 1 / 3) / 2)
    assert (measured["shots"], measured["fewer_shots"], measured["truncated"]) == (1, 0, 0)
    assert measured["answers_given"] == {"A": 0, "B": 7, "C": 0, "D": 0, "E": 0}


def test_choice_rows_are_validated_with_file_and_line(workdir, model_dir, capsys):
    good = CHOICE_ROWS[0]
    cases = [
        ({"subject": "s", "question": "q", "answer": "A"}, "missing 'choices'"),
        ({**good, "answer": "E"}, "expected a letter A-D or an index 0-3"),
        ({**good, "answer": "AB"}, "'AB'"),
        ({**good, "answer": 4}, "out of range"),
        ({**good, "answer": True}, "expected a letter"),
        ({**good, "choices": "A or B"}, "list of 2 to 26 strings"),
        ({**good, "question": ""}, "non-empty string"),
    ]
    for number, (row, message) in enumerate(cases):
        path = write_jsonl(workdir / f"bad-choice-{number}.jsonl", [good, good, row])
        with pytest.raises(WrenError, match=f"bad-choice-{number}.jsonl:3: .*{message}"):
            read_choice_rows(path)
    broken = workdir / "broken-choice.jsonl"
    broken.write_text(json.dumps(good) + "\n{not json\n")
    assert_user_error(
        capsys, ["eval", "choice", model_dir, "--data", broken], "broken-choice.jsonl:2", "JSON"
    )


@pytest.mark.skipif(not (SHARED_DATA / "eval" / "mmlu_dev.jsonl").is_file(), reason="no ../shared/data")
def test_choice_on_a_slice_of_real_mmlu(workdir, model_dir, capsys):
    lines = (SHARED_DATA / "eval" / "mmlu_dev.jsonl").read_text(encoding="utf-8").splitlines()[:20]
    data = workdir / "mmlu-slice.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    status, out, err = run(
        capsys, "eval", "choice", model_dir, "--data", data, "--json", "--shots", 2, "--limit", 3
    )
    assert status == 0, err
    measured = json.loads(out)
    subjects = {json.loads(line)["subject"] for line in lines}
    assert set(measured["subjects"]) == subjects
    assert measured["rows"] == sum(
        min(3, sum(json.loads(x)["subject"] == s for x in lines)) for s in subjects
    )
    assert 0 <= measured["accuracy"] <= 1
    # The tiny model's 128-token context cannot hold two MMLU examples: shots were dropped.
    assert measured["fewer_shots"] > 0


# -- GSM8K -------------------------------------------------------------------------------------


def test_gsm8k_answer_extraction():
    assert reference_answer("She has 16 - 3 - 4 = 9 eggs.\n#### 18") == "18"
    assert reference_answer("#### 1,234") == "1234"
    assert reference_answer("no final answer") is None
    assert extract_answer("So she makes 9 * 2 = 18 dollars.") == "18"
    assert extract_answer("The total is $1,234.50.") == "1234.5"
    assert extract_answer("#### 18\nThat is 20 less than 38.") == "18"  # the marked number wins
    assert extract_answer("<think>7 + 8 = 15? no, 16</think>The answer is 16") == "16"
    assert extract_answer("It dropped by -3 degrees.") == "-3"
    assert extract_answer("I do not know.") is None
    assert normalize_number("18.0") == normalize_number("18") == "18"
    assert normalize_number("0.50") == "0.5"
    assert normalize_number("1,000") == "1000"
    assert normalize_number("abc") is None


def test_gsm8k_rows_are_validated(workdir):
    path = write_jsonl(
        workdir / "bad-math.jsonl", [{"question": "q", "answer": "#### 2"}, {"question": "q", "answer": "4"}]
    )
    with pytest.raises(WrenError, match=r"bad-math.jsonl:2: .*####"):
        read_math_rows(path)


def test_gsm8k_runs_through_the_engine(workdir, model_dir, capsys):
    source = SHARED_DATA / "eval" / "gsm8k_test.jsonl"
    if source.is_file():
        rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines()[:4]]
    else:
        rows = [
            {"question": f"What is {a} plus {a}?", "answer": f"{a} + {a} = {2 * a}\n#### {2 * a}"}
            for a in range(4)
        ]
    data = write_jsonl(workdir / "math.jsonl", rows)
    predictions = workdir / "math-predictions.jsonl"
    status, out, err = run(
        capsys, "eval", "gsm8k", model_dir, "--data", data, "--limit", 3, "--max-new-tokens", 6, "--plain",
        "--shots", 1, "--json", "--predictions", predictions, "--device", "cpu",
    )  # fmt: skip
    assert status == 0, err
    measured = json.loads(out)
    graded = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert measured["rows"] == len(graded) == 3
    assert measured["prompt"] == "plain" and measured["shots"] == 1
    for row, prediction in zip(rows, graded, strict=False):
        assert prediction["target"] == reference_answer(row["answer"])
        assert prediction["predicted"] == extract_answer(prediction["reply"])
        assert prediction["correct"] == (prediction["predicted"] == prediction["target"])
    assert measured["correct"] == sum(p["correct"] for p in graded)


# -- report card -------------------------------------------------------------------------------


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def run_dir(workdir, tokenizer) -> Path:
    tokenizer.save(workdir / "tokenizer")
    out = workdir / "run"
    result = wren(
        "train", "pretrain", "--data", workdir / "pretrain.jsonl", "--preset", "micro",
        "--tokenizer", workdir / "tokenizer", "--out", out, "--seq-len", "32", "--batch-size", "4",
        "--max-steps", "6", "--eval-every", "2", "--eval-batches", "2", "--warmup-steps", "1",
        "--workers", "1", "--logger", "none", "--log-every", "1", "--val-fraction", "0.2",
        "--device", "cpu", *TINY_MODEL_FLAGS,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out


def test_report_card_of_a_real_run(workdir, run_dir, capsys):
    data = write_jsonl(workdir / "report-docs.jsonl", [{"text": t} for t in DOCUMENTS])
    status, _, err = run(capsys, "eval", "ppl", run_dir / "final", "--data", data, "--save", run_dir)
    assert status == 0 and "evals.jsonl" in err, err
    record = json.loads((run_dir / "evals.jsonl").read_text().splitlines()[-1])
    assert record["task"] == "ppl" and record["documents"] == len(DOCUMENTS)

    status, out, err = run(capsys, "eval", "report", run_dir, "--sample-tokens", 8, "--device", "cpu")
    assert status == 0 and "report.md" in out, err
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    for heading in ("# Report card: run", "## Run", "## Training curves", "## Validation", "## Evaluations"):
        assert heading in report
    assert "| objective | pretrain |" in report and "| max_steps | 6 |" in report
    last_bpb = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1][
        "val/bpb"
    ]
    assert f"Final validation bits per byte: **{last_bpb:.4f}** (step 6)" in report
    assert f"**{record['bits_per_byte']:.4f} bits/byte**" in report
    assert "## Sample replies" in report and report.count("**Prompt:**") == 3
    for name in ("report-loss.png", "report-bpb.png", "report-lr.png"):
        assert f"]({name})" in report
        width, height = png_size(run_dir / name)
        assert width > 100 and height > 100


def test_report_without_matplotlib_names_the_extra(workdir, run_dir, capsys, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it now fails, as if not installed
    args = ["eval", "report", run_dir, "--out", workdir / "x.md", "--no-samples"]
    assert_user_error(capsys, args, "matplotlib", "wrenlm[report]")
    assert not (workdir / "x.md").exists()


def test_report_needs_a_run_directory(workdir, capsys):
    assert_user_error(capsys, ["eval", "report", workdir], "train_config.json")
