"""wren.tokenizer: BPE training, round trips, special tokens, chat templates, HF compatibility.

The corpus is generated here (English, Chinese, emoji, Python code), so no network or outside
files are needed. transformers is the reference for chat template rendering and for loading.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest

from wren.errors import WrenError
from wren.tokenizer import (
    DEFAULT_CHAT_TEMPLATE,
    RESERVED_TOKENS,
    Tokenizer,
    render_chat_template,
    train_tokenizer,
)

VOCAB_SIZE = 1000

ENGLISH_TEXT = (
    "the quick brown fox jumps over the lazy dog while a small wren sings in the garden "
    "models learn to predict the next token from the text they have read before"
)
ENGLISH = ENGLISH_TEXT.split()
SYLLABLES = ["ka", "lo", "mi", "ren", "tor", "qu", "ish", "ly", "ment", "ber", "sta", "vel", "on", "dri"]
CHINESE = ["你好", "世界", "我们", "学习", "语言", "模型", "今天", "天气", "很好", "小鸟", "唱歌", "中文"]
EMOJI = ["🎉", "👍🏽", "👨‍👩‍👧", "🇯🇵", "🇫🇷", "❤️", "🐦", "✨"]
CODE = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tprint(i)\n",
    "class Wren:\n    def __init__(self):\n        self.song = 'tweet'\n",
    'import json\n\nvalue = json.loads("{}")  # parse\n',
]


def corpus_rows(count: int = 400) -> list[dict[str, Any]]:
    """Pretraining and SFT rows mixing languages, emoji and code; fixed seed, so reproducible."""
    rng = random.Random(1234)
    rows: list[dict[str, Any]] = []
    for index in range(count):
        # Made-up words give the trainer enough distinct pairs to fill the vocabulary.
        made_up = " ".join("".join(rng.choices(SYLLABLES, k=rng.randint(2, 3))) for _ in range(4))
        english = " ".join(rng.choices(ENGLISH, k=12)) + f" {made_up} {rng.randint(0, 9999)}"
        chinese = "".join(rng.choices(CHINESE, k=6))
        emoji = "".join(rng.choices(EMOJI, k=2))
        code = rng.choice(CODE)
        if index % 4 == 3:
            conversation = [
                {"role": "user", "content": f"{english} {emoji}"},
                {"role": "assistant", "content": f"<think>\n{chinese}\n</think>\n\n{code}"},
            ]
            rows.append({"conversations": conversation})
        else:
            rows.append({"text": f"{english}。{chinese}{emoji}\n{code}"})
    return rows


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", corpus_rows())


@pytest.fixture(scope="module")
def tokenizer(corpus_file: Path) -> Tokenizer:
    return train_tokenizer([corpus_file], vocab_size=VOCAB_SIZE)


@pytest.fixture(scope="module")
def saved_dir(tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tokenizer.save(tmp_path_factory.mktemp("saved") / "tokenizer")


@pytest.fixture(scope="module")
def transformers() -> Any:
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_tokenizer(transformers: Any, saved_dir: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(saved_dir)


def hf_ids(result: Any) -> list[int]:
    """transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x a list."""
    if isinstance(result, list):
        return result
    return list(result["input_ids"])


# --- training and round trips -------------------------------------------------------------


def test_reserved_tokens_have_ids_0_to_4(tokenizer: Tokenizer) -> None:
    assert [tokenizer.token_to_id(token) for token in RESERVED_TOKENS] == [0, 1, 2, 3, 4]
    assert RESERVED_TOKENS == ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


def test_vocab_size_is_honoured(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == VOCAB_SIZE
    assert len(tokenizer) == VOCAB_SIZE


def test_settings_follow_minimind(tokenizer: Tokenizer) -> None:
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == 2
    assert tokenizer.bos_token_id == 1
    assert tokenizer.pad_token_id == 0
    assert tokenizer.stop_token_ids == [2, 0]
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE


ROUND_TRIP_TEXTS = {
    "english": "Hello, world! It's 3:45 p.m. — fine.",
    "chinese": "你好，世界！今天天气很好。我们学习语言模型。",
    "emoji": "family 👨‍👩‍👧 flags 🇯🇵🇫🇷 skin 👍🏽 heart ❤️ wren 🐦",
    "code": "def f(x):\n\tif x:\n\t\treturn [x, {'a': 1}]\n    # four spaces\n\n\nprint(f(2))\n",
    "whitespace": "  leading and trailing  \r\n\t\u00a0end ",
    "special": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\nhm</think>ok<|im_end|>"
    "<|endoftext|>",
    "unseen": "Ωμέγα ñandú Привет مرحبا 🦩 zebra-quagga",
    "combining": "e\u0301 cafe\u0301 \u200bzero width",
}


@pytest.mark.parametrize("name", list(ROUND_TRIP_TEXTS))
def test_decode_of_encode_is_the_input(tokenizer: Tokenizer, name: str) -> None:
    text = ROUND_TRIP_TEXTS[name]
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_encode_batch_matches_encode(tokenizer: Tokenizer) -> None:
    texts = list(ROUND_TRIP_TEXTS.values())
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(text) for text in texts]


@pytest.mark.parametrize("token", RESERVED_TOKENS)
def test_reserved_token_in_text_is_one_id(tokenizer: Tokenizer, token: str) -> None:
    token_id = tokenizer.token_to_id(token)
    assert tokenizer.encode(token) == [token_id]
    ids = tokenizer.encode(f"a{token}b")
    assert ids.count(token_id) == 1
    assert tokenizer.decode(ids) == f"a{token}b"


def test_skipping_special_tokens_keeps_think_markers(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("<|im_start|>assistant\n<think>\nhm\n</think>\n\nok<|im_end|>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "assistant\n<think>\nhm\n</think>\n\nok"


def test_directories_use_their_jsonl_files(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    rows = corpus_rows(200)
    write_jsonl(data / "b.jsonl", rows[:100])
    write_jsonl(data / "a.jsonl", rows[100:])
    (data / "notes.txt").write_text("{not json", encoding="utf-8")  # ignored: not *.jsonl
    tokenizer = train_tokenizer([data], vocab_size=400)
    assert tokenizer.vocab_size == 400


# --- errors -------------------------------------------------------------------------------


def test_missing_training_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.jsonl"
    with pytest.raises(WrenError, match=re.escape(f"{path}: no such file")):
        train_tokenizer([path])


def test_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "broken"\n', encoding="utf-8")
    with pytest.raises(WrenError, match=re.escape(f"{path}:3: invalid JSON")):
        train_tokenizer([path], vocab_size=300)


def test_row_without_text_names_file_and_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": "ok"}, {"question": "what?"}])
    with pytest.raises(
        WrenError, match=re.escape(f"{path}:2: ") + '.*expected a "text" field, a "conversations" list'
    ):
        train_tokenizer([path], vocab_size=300)


@pytest.mark.parametrize("vocab_size", [0, 100, 261])
def test_vocab_too_small(corpus_file: Path, vocab_size: int) -> None:
    with pytest.raises(WrenError, match=rf"vocab_size {vocab_size} is too small"):
        train_tokenizer([corpus_file], vocab_size=vocab_size)


def test_empty_directory_and_empty_corpus(tmp_path: Path) -> None:
    with pytest.raises(WrenError, match=r"directory has no \.jsonl files"):
        train_tokenizer([tmp_path])
    path = tmp_path / "blank.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(WrenError, match="no training text"):
        train_tokenizer([path])


# --- the chat template --------------------------------------------------------------------

CONVERSATIONS = {
    "single_turn": [{"role": "user", "content": "你好！Who are you? 🐦"}],
    "multi_turn_with_system": [
        {"role": "system", "content": "You are Wren, a small helpful model."},
        {"role": "user", "content": "Write add() in Python."},
        {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
        {"role": "user", "content": "谢谢"},
    ],
    "content_parts": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Part one."}, {"type": "text", "text": "Two."}],
        },
    ],
    "reasoning_reply": [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "<think>\n2 plus 3 is 5.\n</think>\n\nIt is 5."},
    ],
}


def test_default_template_is_chatml(tokenizer: Tokenizer) -> None:
    messages = CONVERSATIONS["multi_turn_with_system"][:3]
    expected = (
        "<|im_start|>system\nYou are Wren, a small helpful model.<|im_end|>\n"
        "<|im_start|>user\nWrite add() in Python.<|im_end|>\n"
        "<|im_start|>assistant\ndef add(a, b):\n    return a + b<|im_end|>\n"
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False) == expected
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == expected + "<|im_start|>assistant\n"


def test_content_parts_are_joined(tokenizer: Tokenizer) -> None:
    text = tokenizer.apply_chat_template(CONVERSATIONS["content_parts"], tokenize=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nPart one.\nTwo.<|im_end|>\n"


def test_chat_ids_are_the_ids_of_the_chat_text(tokenizer: Tokenizer) -> None:
    messages = CONVERSATIONS["reasoning_reply"]
    ids = tokenizer.apply_chat_template(messages)
    assert ids == tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False))
    assert ids[0] == tokenizer.token_to_id("<|im_start|>")
    assert ids.count(tokenizer.token_to_id("<think>")) == 1


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_template_matches_transformers(
    tokenizer: Tokenizer, hf_tokenizer: Any, name: str, generation_prompt: bool
) -> None:
    messages = CONVERSATIONS[name]
    ours = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    theirs = hf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=generation_prompt, tokenize=False
    )
    assert ours == theirs
    our_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    their_ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    assert our_ids == hf_ids(their_ids)


def test_transformers_reads_the_saved_directory(
    tokenizer: Tokenizer, hf_tokenizer: Any, saved_dir: Path
) -> None:
    assert sorted(path.name for path in saved_dir.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((saved_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["added_tokens_decoder"]["3"] == {
        "content": "<think>",
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": False,
    }
    assert hf_tokenizer.eos_token == "<|im_end|>"
    assert hf_tokenizer.eos_token_id == 2
    assert hf_tokenizer.pad_token_id == 0
    assert len(hf_tokenizer) == tokenizer.vocab_size
    text = ROUND_TRIP_TEXTS["special"] + ROUND_TRIP_TEXTS["emoji"]
    assert hf_tokenizer.encode(text, add_special_tokens=False) == tokenizer.encode(text)
    ids = tokenizer.encode(text)
    for skip in (False, True):
        assert hf_tokenizer.decode(ids, skip_special_tokens=skip) == tokenizer.decode(
            ids, skip_special_tokens=skip
        )


def test_save_then_load_gives_the_same_tokenizer(tokenizer: Tokenizer, saved_dir: Path) -> None:
    for path in (saved_dir, saved_dir / "tokenizer.json", str(saved_dir)):
        loaded = Tokenizer.load(path)
        assert loaded.vocab_size == tokenizer.vocab_size
        assert loaded.chat_template == tokenizer.chat_template
        assert loaded.special_tokens_map == tokenizer.special_tokens_map
        assert loaded.model_max_length == tokenizer.model_max_length
        text = ROUND_TRIP_TEXTS["special"] + ROUND_TRIP_TEXTS["code"]
        assert loaded.encode(text) == tokenizer.encode(text)


# A Llama-3-like template exercising what transformers adds to Jinja: raise_exception, tojson,
# strftime_now, namespace, loop controls, the {% generation %} tag, bos_token and tools=None.
FOREIGN_TEMPLATE = """{{- bos_token }}
{%- set ns = namespace(system='') %}
{%- if messages[0]['role'] == 'system' %}
    {%- set ns.system = messages[0]['content'] %}
    {%- set messages = messages[1:] %}
{%- endif %}
<|start_header_id|>system<|end_header_id|>

Today Date: {{ strftime_now("%Y") }}
{%- if tools is not none %}
Tools: {{ tools | tojson }}
{%- endif %}
{{ ns.system }}<|eot_id|>
{%- for message in messages %}
    {%- if message.role == 'skip' %}{% continue %}{% endif %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] }}
    {%- if message.name is defined %}({{ message.name }}){% endif %}
    {{- '<|end_header_id|>\n\n' }}
    {%- if message.role == 'assistant' %}
        {%- if message.reasoning_content is defined %}
            {{- '<think>' + message.reasoning_content + '</think>' }}
        {%- endif %}
        {%- generation %}{{ message['content'] | trim }}{% endgeneration %}
    {%- else %}
        {{- message['content'] | trim }}
    {%- endif %}
    {{- '<|eot_id|>' }}
    {%- if message.meta is defined %}{{ message.meta | tojson(indent=2) }}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
    {%- if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}
{%- endif %}
"""


@pytest.mark.parametrize("tools", [None, [{"name": "get_time", "parameters": {"tz": "<&>中文"}}]])
def test_foreign_template_renders_like_transformers(
    tokenizer: Tokenizer, hf_tokenizer: Any, tools: list | None
) -> None:
    messages = [
        {"role": "system", "content": "  System <&> text  "},
        {"role": "user", "content": "Hi 你好", "meta": {"lang": "中文", "html": "<b>&</b>"}},
        {"role": "assistant", "content": "Hello!", "thinking": "greet back", "name": None},
        {"role": "user", "content": "Bye", "name": "ann"},
    ]
    options = {"add_generation_prompt": True, "enable_thinking": False, "tools": tools}
    theirs = hf_tokenizer.apply_chat_template(
        messages, chat_template=FOREIGN_TEMPLATE, tokenize=False, **options
    )
    ours = tokenizer.apply_chat_template(messages, chat_template=FOREIGN_TEMPLATE, tokenize=False, **options)
    assert ours == theirs
    assert ours.startswith("<|im_start|><|start_header_id|>system")  # bos_token came through
    assert "<think>greet back</think>Hello!" in ours  # `thinking` aliased to `reasoning_content`
    assert "assistant<|end_header_id|>" in ours  # "name": None dropped, not rendered as "(None)"
    assert "user(ann)<|end_header_id|>" in ours
    # render_chat_template is the same renderer without the tokenizer's special-token variables.
    bare = render_chat_template(
        FOREIGN_TEMPLATE, messages, bos_token="<|im_start|>", eos_token="<|im_end|>", **options
    )
    assert bare == theirs


def test_template_exceptions_become_wren_errors(tokenizer: Tokenizer, hf_tokenizer: Any) -> None:
    messages = [{"role": "assistant", "content": "I speak first"}]
    with pytest.raises(Exception, match="roles must alternate"):
        hf_tokenizer.apply_chat_template(messages, chat_template=FOREIGN_TEMPLATE, tokenize=False)
    with pytest.raises(WrenError, match="roles must alternate"):
        tokenizer.apply_chat_template(messages, chat_template=FOREIGN_TEMPLATE, tokenize=False)


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{% set ns = namespace() %}{% set ns._secret = 1 %}",
        "{{ messages.append(1) }}",
    ],
)
def test_templates_run_sandboxed(template: str) -> None:
    with pytest.raises(WrenError):
        render_chat_template(template, [{"role": "user", "content": "x"}])


def test_template_syntax_error_is_a_wren_error() -> None:
    with pytest.raises(WrenError, match="chat template line 1"):
        render_chat_template("{% for %}", [{"role": "user", "content": "x"}])


# --- loading directories written by others ------------------------------------------------


def test_loads_a_directory_written_by_transformers(
    tokenizer: Tokenizer, transformers: Any, tmp_path: Path
) -> None:
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}\n{% endfor %}"
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend, eos_token="<|endoftext|>", bos_token=None, pad_token="<|im_end|>"
    )
    fast.chat_template = template
    fast.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    # transformers 5 keeps the template in its own file; 4.x inline in the config. Both must load.
    assert (tmp_path / "chat_template.jinja").is_file() or "chat_template" in config

    loaded = Tokenizer.load(tmp_path)
    assert loaded.eos_token == "<|endoftext|>"
    assert loaded.eos_token_id == 0
    assert loaded.pad_token_id == 2
    assert loaded.chat_template == template
    assert loaded.stop_token_ids == [0, 2]
    messages = CONVERSATIONS["multi_turn_with_system"]
    assert loaded.apply_chat_template(messages, tokenize=False) == fast.apply_chat_template(
        messages, tokenize=False
    )


def write_foreign_dir(directory: Path, tokenizer: Tokenizer, config: dict | None) -> Path:
    directory.mkdir()
    (directory / "tokenizer.json").write_text(tokenizer.backend.to_str(), encoding="utf-8")
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def test_loads_minimind_style_config(tokenizer: Tokenizer, tmp_path: Path) -> None:
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": {"content": "<|im_start|>", "lstrip": False, "special": True},
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>"},
        "pad_token": "<|endoftext|>",
        "model_max_length": 1000000000000000019884624838656,
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "{{ messages[0].content }}"},
        ],
    }
    loaded = Tokenizer.load(write_foreign_dir(tmp_path / "mm", tokenizer, config))
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 0)
    assert loaded.model_max_length is None  # transformers' "no limit" sentinel
    assert loaded.apply_chat_template([{"role": "user", "content": "hey"}], tokenize=False) == "hey"


def test_chat_template_jinja_file_wins_over_config(tokenizer: Tokenizer, tmp_path: Path) -> None:
    directory = write_foreign_dir(
        tmp_path / "t5", tokenizer, {"eos_token": "<|im_end|>", "chat_template": "OLD"}
    )
    (directory / "chat_template.jinja").write_text("NEW {{ messages | length }}", encoding="utf-8")
    assert (
        Tokenizer.load(directory).apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
        == "NEW 1"
    )


def test_bare_tokenizer_json_gets_defaults(tokenizer: Tokenizer, tmp_path: Path) -> None:
    loaded = Tokenizer.load(write_foreign_dir(tmp_path / "bare", tokenizer, None) / "tokenizer.json")
    assert loaded.eos_token == "<|im_end|>"
    assert loaded.bos_token_id is None
    assert loaded.pad_token_id == loaded.eos_token_id
    assert loaded.chat_template == DEFAULT_CHAT_TEMPLATE


def test_load_errors_name_the_path(tokenizer: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(WrenError, match=re.escape(f"{tmp_path / 'nowhere'}: no tokenizer.json found")):
        Tokenizer.load(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WrenError, match=re.escape(f"{empty}: no tokenizer.json found")):
        Tokenizer.load(empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(WrenError, match=re.escape(f"{broken / 'tokenizer.json'}: cannot load")):
        Tokenizer.load(broken)
    bad_config = write_foreign_dir(tmp_path / "bad_config", tokenizer, None)
    (bad_config / "tokenizer_config.json").write_text('{\n"eos_token": ,\n}', encoding="utf-8")
    with pytest.raises(WrenError, match=re.escape(f"{bad_config / 'tokenizer_config.json'}:2: invalid JSON")):
        Tokenizer.load(bad_config)
    unknown_eos = write_foreign_dir(tmp_path / "unknown_eos", tokenizer, {"eos_token": "</s>"})
    with pytest.raises(WrenError, match=r"eos_token '</s>' is not in the vocabulary"):
        Tokenizer.load(unknown_eos)
