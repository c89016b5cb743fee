"""`wren train reason` on generated <think> data, run for real on tiny models: it trains, the tag
tokens weigh think_tag_weight, exact resume after SIGKILL; and `split_thinking`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import SHARED_DATA, TINY_MODEL_SETTINGS, kill_after_step, losses, metric_rows, wren
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from wren.checkpoint import init_checkpoint, load_model
from wren.data.chat import encode_conversation
from wren.data.demo import demo_texts
from wren.errors import WrenError
from wren.infer.thinking import ThinkingStream, opens_thinking, split_thinking
from wren.tokenizer import ENDOFTEXT, IM_END, IM_START, Tokenizer, train_tokenizer
from wren.train.config import resolve_config
from wren.train.objectives import token_losses
from wren.train.reason import ReasoningSFT, think_tag_ids

THINK, END_THINK = 3, 4  # the ids every Wren-trained tokenizer gives <think> and </think>


def reasoning(a: int, b: int) -> dict:
    reply = f"<think>\nI add {a} and {b}: {a} + {b} = {a + b}.\n</think>\n{a} plus {b} is {a + b}."
    return {
        "conversations": [
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": reply},
        ]
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """R1-style conversations, plain ones, a tokenizer and an untrained model to start from."""
    directory = tmp_path_factory.mktemp("reason")
    rows = [reasoning(a, b) for a in range(15) for b in range(15)]
    (directory / "reason.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    plain = [
        {"conversations": [row["conversations"][0], {"role": "assistant", "content": "4"}]} for row in rows
    ]
    (directory / "plain.jsonl").write_text("".join(json.dumps(row) + "\n" for row in plain))
    (directory / "text.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in demo_texts(max_bytes=60_000))
    )
    tokenizer = train_tokenizer([directory / "text.jsonl", directory / "reason.jsonl"], vocab_size=512)
    tokenizer.save(directory / "tokenizer")
    init_checkpoint("micro", directory / "tokenizer", directory / "base", overrides=TINY_MODEL_SETTINGS)
    return directory


def reason_args(corpus: Path, out: Path, *extra) -> list:
    return [
        "train", "reason", "--data", corpus / "reason.jsonl", "--init", corpus / "base", "--out", out,
        "--seq-len", "64", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "2", "--workers", "1",
        "--logger", "none", "--log-every", "1", *extra,
    ]  # fmt: skip


COMMON = ("--max-steps", "30", "--save-every", "4", "--eval-every", "15")


@pytest.fixture(scope="module")
def trained(corpus) -> Path:
    """An uninterrupted reasoning run."""
    run = corpus / "trained"
    result = wren(*reason_args(corpus, run, *COMMON))
    assert result.returncode == 0, result.stderr
    assert "thinking tags, each weighted 10" in result.stdout
    return run


# -- training ------------------------------------------------------------------------------------


def test_a_reasoning_run_learns_to_open_its_reply_with_think(corpus, trained):
    curve = losses(trained)
    assert sorted(curve) == list(range(1, 31))
    assert curve[30] < curve[1] * 0.5, curve
    rows = metric_rows(trained)
    ce = {row["step"]: row["train/ce"] for row in rows}
    assert ce[30] < ce[1] and all(curve[step] > ce[step] for step in curve)  # the tags weigh extra
    assert "val/loss" in rows[-1]
    # The first token the model writes after the generation prompt is <think>.
    tokenizer = Tokenizer.load(trained / "final")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 3 plus 4?"}], add_generation_prompt=True
    )
    model = load_model(trained / "final")
    with torch.no_grad():
        logits, _ = model(torch.tensor([prompt]))
    assert int(logits[0, -1].argmax()) == THINK


def test_tag_tokens_weigh_think_tag_weight_in_the_loss(corpus, tmp_path):
    def objective(weight: float) -> ReasoningSFT:
        config = resolve_config(
            objective="reason",
            data=[str(corpus / "reason.jsonl")],
            init=str(corpus / "base"),
            seq_len=64,
            batch_size=4,
            workers=1,
            think_tag_weight=weight,
        )
        reason = ReasoningSFT(config, torch.device("cpu"))
        model, tokenizer = reason.build_model(None)
        reason.prepare(tokenizer, tmp_path / "cache", is_main=True)
        return reason, model

    plain, model = objective(1.0)
    weighted, _ = objective(7.0)
    batch = next(iter(plain.train_batches(0, 1)))
    is_tag = (batch.targets == THINK) | (batch.targets == END_THINK)
    assert is_tag.sum() >= 2
    with torch.no_grad():
        per_token, _ = token_losses(model, batch, torch.device("cpu"))
        one, seven = plain.loss(model, batch), weighted.loss(model, batch)
    assert one.count == seven.count == batch.n_target_tokens  # normalised by target tokens
    assert torch.equal(one.loss_sum, per_token.sum())  # weight 1 is SFT exactly
    tags = per_token[is_tag].sum()
    assert float(seven.loss_sum) == pytest.approx(float(per_token.sum() + 6 * tags), rel=1e-6)
    assert torch.equal(seven.metric_sums["ce"], one.loss_sum)  # train/ce stays the plain cross-entropy


def test_resume_after_sigkill_gives_identical_losses(corpus, trained, tmp_path):
    killed = tmp_path / "killed"
    args = reason_args(corpus, killed, *COMMON)
    # Killed mid-run: after step 9 is logged, past the step-8 checkpoint.
    last_step = kill_after_step(args, killed, 9, timeout=120)
    assert last_step < 30, "the run finished before it could be killed"

    result = wren(*args, "--resume")
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout
    assert losses(killed) == losses(trained)  # bit-identical, every step


# -- what reasoning SFT refuses ------------------------------------------------------------------------


def test_a_tokenizer_without_think_tokens_is_refused(corpus, tmp_path):
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(["What is 3 plus 4? 3 plus 4 is 7."], trainer=trainer)
    tokenizer = Tokenizer(backend, eos_token=IM_END, pad_token=ENDOFTEXT)
    with pytest.raises(WrenError, match="no <think> or </think> token"):
        think_tag_ids(tokenizer)
    tokenizer.save(tmp_path / "tokenizer")
    init_checkpoint("micro", tmp_path / "tokenizer", tmp_path / "base", overrides=TINY_MODEL_SETTINGS)
    args = reason_args(corpus, tmp_path / "run", "--max-steps", "2")
    args[args.index("--init") + 1] = tmp_path / "base"
    result = wren(*args)
    assert result.returncode == 2
    assert "tokenizer has no <think> or </think> token" in result.stderr


def test_a_negative_tag_weight_is_refused(corpus):
    config = resolve_config(
        objective="reason",
        data=[str(corpus / "reason.jsonl")],
        init=str(corpus / "base"),
        think_tag_weight=-1,
    )
    with pytest.raises(WrenError, match=r"think_tag_weight -1; expected a finite weight of 0 or more"):
        ReasoningSFT(config, torch.device("cpu"))


def test_conversations_without_thinking_are_refused(corpus, tmp_path):
    config = resolve_config(
        objective="reason", data=[str(corpus / "plain.jsonl")], init=str(corpus / "base"), workers=1
    )
    reason = ReasoningSFT(config, torch.device("cpu"))
    _, tokenizer = reason.build_model(None)
    with pytest.raises(WrenError, match=r"plain.jsonl: no assistant reply holds <think>.*wren train sft"):
        reason.prepare(tokenizer, tmp_path / "cache", is_main=True)


def test_the_chat_template_keeps_the_thinking_and_trains_on_its_tags(corpus):
    tokenizer = Tokenizer.load(corpus / "tokenizer")
    messages = reasoning(2, 3)["conversations"]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert "<|im_start|>assistant\n<think>\nI add 2 and 3" in text
    ids, mask = encode_conversation(tokenizer, messages)
    assert [mask[i] for i, token in enumerate(ids) if token in (THINK, END_THINK)] == [1, 1]


# -- split_thinking ------------------------------------------------------------------------------


SPLIT_CASES = [
    ("<think>\nadd them\n</think>\n7", ("add them", "7")),
    ("<think>add them</think>\n<answer>\n7\n</answer>", ("add them", "7")),  # MiniMind's R1 layout
    ("add them\n</think>\n\n7", ("add them", "7")),  # the template opened <think> in the prompt
    ("<think>\nstill thinking", ("still thinking", "")),  # streaming, or cut off
    ("<think>done</think><answer>7, and", ("done", "7, and")),  # answer still streaming
    ("just an answer", ("", "just an answer")),
    ("", ("", "")),
    ("<think>a</think>b <think>c</think>", ("a", "b <think>c</think>")),  # only the first block
    ("Sure. <think>a</think>", ("a", "Sure.")),
]


@pytest.mark.parametrize(("text", "expected"), SPLIT_CASES)
def test_split_thinking(text, expected):
    assert split_thinking(text) == expected


@pytest.mark.parametrize("text", [case[0] for case in SPLIT_CASES])
@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_thinking_stream_matches_split_thinking(text, chunk):
    expected = split_thinking(text)
    # A reply that closes a reasoning block it never opened had it opened by the prompt.
    stream = ThinkingStream(opened="</think>" in text and "<think>" not in text)
    thinking, answer = "", ""
    for start in range(0, len(text), chunk):
        t, a = stream.feed(text[start : start + chunk])
        thinking, answer = thinking + t, answer + a
        # What was sent is never taken back: no tag fragment leaks into either part.
        assert expected[0].startswith(thinking) and expected[1].startswith(answer)
    t, a = stream.finish()
    assert (thinking + t, answer + a) == expected


def test_thinking_stream_holds_back_a_split_tag():
    stream = ThinkingStream()
    assert stream.feed("<th") == ("", "")
    assert stream.feed("ink>add") == ("add", "")
    assert stream.feed(" them</thi") == (" them", "")
    assert stream.feed("nk>\n7") == ("", "7")
    assert stream.feed(" <") == ("", "")  # may start a tag...
    assert stream.finish() == ("", " <")  # ...but the reply ended: it was text


def test_thinking_stream_opened_by_the_prompt():
    prompt = "<|im_start|>assistant\n<think>\n"
    assert opens_thinking(prompt) and not opens_thinking("<|im_start|>assistant\n")
    stream = ThinkingStream(opened=opens_thinking(prompt))
    assert stream.feed("add them") == ("add them", "")
    assert stream.feed("</think>7") == ("", "7")


def test_split_thinking_needs_no_torch():
    code = "import sys, wren.infer.thinking; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


GSM8K = SHARED_DATA / "sft" / "gsm8k_train.jsonl"


@pytest.mark.skipif(not GSM8K.exists(), reason="../shared/data is not beside the checkout")
def test_reasoning_sft_on_gsm8k_worked_answers(tmp_path):
    # GSM8K's worked solutions become the thinking, the number after "####" the answer.
    rows = []
    for line in GSM8K.read_text(encoding="utf-8").splitlines()[:300]:
        user, assistant = json.loads(line)["conversations"][:2]
        working, _, number = assistant["content"].rpartition("####")
        content = f"<think>\n{working.strip()}\n</think>\n{number.strip()}"
        rows.append({"conversations": [user, {"role": "assistant", "content": content}]})
    data = tmp_path / "gsm8k_r1.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = train_tokenizer([data], vocab_size=1024)
    tokenizer.save(tmp_path / "tokenizer")
    init_checkpoint("micro", tmp_path / "tokenizer", tmp_path / "base", overrides=TINY_MODEL_SETTINGS)
    result = wren(
        "train", "reason", "--data", data, "--init", tmp_path / "base", "--out", tmp_path / "run",
        "--seq-len", "256", "--batch-size", "4", "--max-steps", "8", "--lr", "3e-3", "--warmup-steps", "2",
        "--workers", "1", "--logger", "none", "--log-every", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    curve = losses(tmp_path / "run")
    assert curve[8] < curve[1]
