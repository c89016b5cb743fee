"""Tokenizers: byte-level BPE training, loading any Hugging Face tokenizer, and chat templates.

A Wren tokenizer is a plain Hugging Face tokenizer directory (`tokenizer.json` plus
`tokenizer_config.json`), so `transformers.AutoTokenizer` reads it with no custom code, and
`Tokenizer.load` reads tokenizer directories written by anyone else (MiniMind, Qwen, Llama...).

Chat templates are rendered the way `transformers` renders them (same Jinja environment, same
variables), so a model's own template gives the same text and ids here as there.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from wren.atomic import atomic_write_text
from wren.errors import WrenError
from wren.jsonl import expand_paths, iter_jsonl, row_texts

# MiniMind uses the same three special tokens with the same ids, so its data and checkpoints line up.
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_START = "<think>"
THINK_END = "</think>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
# Never split, but not "special": decode(skip_special_tokens=True) keeps the reasoning markers.
THINK_TOKENS = (THINK_START, THINK_END)
RESERVED_TOKENS = SPECIAL_TOKENS + THINK_TOKENS

BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + len(RESERVED_TOKENS) + 1
DEFAULT_MODEL_MAX_LENGTH = 32768

# Tried in order when a tokenizer comes without a config naming its end-of-sequence token.
_EOS_CANDIDATES = (IM_END, ENDOFTEXT, "<|end_of_text|>", "</s>", "<eos>")
# Names a message's reasoning may come under; transformers copies it to the first two.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

# ChatML. Content may be a string or OpenAI-style parts [{"type": "text", "text": ...}].
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}\n"
    "    {%- if message.content is string %}\n"
    "        {%- set content = message.content %}\n"
    "    {%- elif message.content is defined and message.content is not none %}\n"
    "        {%- set content = message.content | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('\\n') %}\n"
    "    {%- else %}\n"
    "        {%- set content = '' %}\n"
    "    {%- endif %}\n"
    "    {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


# ---------------------------------------------------------------------------------------------
# Chat templates


def render_chat_template(
    template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = False, **kwargs: Any
) -> str:
    """Render a chat template as `transformers`' `apply_chat_template(..., tokenize=False)` does.

    Extra keyword arguments become template variables (tools, documents, bos_token, enable_thinking...).
    Bad messages or a template that fails (including its own `raise_exception`) raise WrenError.
    """
    import jinja2

    compiled = _compile_chat_template(template)
    # transformers always defines these two, and templates test `tools is not none`.
    kwargs.setdefault("tools", None)
    kwargs.setdefault("documents", None)
    try:
        return compiled.render(
            messages=_prepare_messages(messages), add_generation_prompt=add_generation_prompt, **kwargs
        )
    except jinja2.TemplateError as error:
        raise WrenError(f"chat template failed on these messages: {_one_line(error)}") from error


def _prepare_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copy the messages the way transformers does before rendering them."""
    if not messages:
        raise WrenError("chat: no messages; expected at least one message")
    prepared = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise WrenError(f"chat: message {index} is a {type(message).__name__}; expected an object")
        # OpenAI clients send `"content": null`; templates handle a missing key better than None.
        message = {key: value for key, value in message.items() if value is not None}
        prepared.append(_alias_reasoning(message))
    return prepared


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    # transformers offers reasoning under both names templates read: `reasoning_content` (Qwen,
    # MiniMind) and `thinking` (gpt-oss), whichever name the caller used.
    reasoning = next((message[key] for key in _REASONING_FIELDS if key in message), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


@lru_cache(maxsize=32)
def _compile_chat_template(template: str) -> Any:
    import jinja2

    try:
        return _chat_environment().from_string(template)
    except jinja2.TemplateSyntaxError as error:
        where = f"chat template line {error.lineno}"
        raise WrenError(f"{where}: {error.message}; expected a valid Jinja template") from None


@lru_cache(maxsize=1)
def _chat_environment() -> Any:
    """A Jinja environment with the same settings, filters and globals transformers gives chat templates."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_generation_tag_extension(), jinja2.ext.loopcontrols],
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.globals["dict"] = _TemplateDict()
    environment.globals["namespace"] = _namespace_class()
    return environment


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.TemplateError(message)


def _strftime_now(pattern: str) -> str:
    return datetime.now().strftime(pattern)


class _TemplateDict:
    """`dict(...)` for templates, without the attributes of the real type a template could abuse."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


def _namespace_class() -> type:
    """Jinja's `namespace`, refusing underscore names so a template cannot reach Python internals."""
    import jinja2.utils
    from jinja2.exceptions import SecurityError

    def check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates cannot set underscore attributes on a namespace: {name!r}")

    class TemplateNamespace(jinja2.utils.Namespace):
        # Jinja's Namespace takes `self` through *args so that `namespace(self=...)` works; so do we.
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    return TemplateNamespace


def _generation_tag_extension() -> type:
    """Accept `{% generation %}...{% endgeneration %}` (used by some templates to mark assistant
    text for training masks); transformers renders the body unchanged, and so do we."""
    import jinja2.ext
    import jinja2.nodes

    class GenerationTag(jinja2.ext.Extension):
        tags = {"generation"}  # noqa: RUF012 (Jinja reads this class attribute)

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            # A call block, as in transformers, so the body's scoping rules are the same.
            call = self.call_method("_render_body")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _render_body(self, caller: Any) -> str:
            return caller()

    return GenerationTag


# ---------------------------------------------------------------------------------------------
# The tokenizer


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the settings that live in `tokenizer_config.json`.

    `eos_token` ends a turn: for a chat model it is `<|im_end|>`. Generation stops on any of
    `stop_token_ids`. `pad_token_id` falls back to the eos id, since padded positions are masked.
    """

    def __init__(
        self,
        backend: _Backend,
        *,
        eos_token: str,
        bos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        model_max_length: int | None = DEFAULT_MODEL_MAX_LENGTH,
    ) -> None:
        self.backend = backend
        for role, token in (("eos", eos_token), ("bos", bos_token), ("pad", pad_token), ("unk", unk_token)):
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"{role}_token {token!r} is not in the vocabulary")
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.pad_token = pad_token
        self.unk_token = unk_token
        self.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
        self.model_max_length = model_max_length

    # -- sizes and ids ------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer can produce, added tokens included (the model's minimum vocab)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_token={self.eos_token!r})"

    @property
    def eos_token_id(self) -> int:
        return self._require_id(self.eos_token)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self._require_id(self.bos_token)

    @property
    def pad_token_id(self) -> int:
        return self.eos_token_id if self.pad_token is None else self._require_id(self.pad_token)

    @property
    def stop_token_ids(self) -> list[int]:
        """eos first, then `<|im_end|>` and `<|endoftext|>` where the vocabulary has them: a chat
        model ends a turn with the first and a base model a document with the second."""
        ids = [self.eos_token_id]
        for token in (IM_END, ENDOFTEXT):
            token_id = self.backend.token_to_id(token)
            if token_id is not None and token_id not in ids:
                ids.append(token_id)
        return ids

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens, as transformers passes them to chat templates."""
        named = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
        }
        return {name: token for name, token in named.items() if token is not None}

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def _require_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{token!r} is not in the vocabulary")
        return token_id

    # -- text <-> ids -------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids for `text`. Special tokens written in the text become their single ids.
        `add_special_tokens` runs the tokenizer's post-processor (e.g. Llama's leading BOS)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """`encode` for many texts at once, in parallel threads inside `tokenizers`."""
        encodings = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat ---------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        *,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> list[int] | str:
        """Render `messages` with the chat template; return the text, or its ids when `tokenize`.

        Like transformers, the template also sees bos_token, eos_token, ... and any `kwargs`
        (tools, documents, enable_thinking...), which override them.
        """
        variables = {**self.special_tokens_map, **kwargs}
        text = render_chat_template(
            chat_template or self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
        return self.encode(text) if tokenize else text

    # -- files --------------------------------------------------------------------------------

    def save(self, directory: Path | str) -> Path:
        """Write `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` into
        `directory` (created if needed), each atomically. Returns the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / "tokenizer.json", self.backend.to_str(pretty=True))
        atomic_write_text(directory / "tokenizer_config.json", _dump_json(self._config()))
        atomic_write_text(directory / "special_tokens_map.json", _dump_json(self.special_tokens_map))
        return directory

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            # transformers' generic fast tokenizer: it reads tokenizer.json as it is.
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self.special_tokens_map,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": _added_tokens_decoder(self.backend),
            "chat_template": self.chat_template,
        }
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        return config

    @classmethod
    def load(cls, path: Path | str) -> Tokenizer:
        """Load a tokenizer directory (or its `tokenizer.json`) written by Wren or by transformers.

        Reads `tokenizer_config.json` and `chat_template.jinja` beside it when present; without a
        chat template it uses DEFAULT_CHAT_TEMPLATE (ChatML).
        """
        path = Path(path)
        tokenizer_file = path / "tokenizer.json" if path.is_dir() else path
        directory = tokenizer_file.parent
        if not tokenizer_file.is_file():
            where = path if path.is_dir() or not path.exists() else tokenizer_file
            raise WrenError(
                f"{where}: no tokenizer.json found; expected a Hugging Face tokenizer directory "
                "(tokenizer.json, usually with tokenizer_config.json)"
            )
        backend = _read_backend(tokenizer_file)
        config_file = directory / "tokenizer_config.json"
        config = _read_json_object(config_file) if config_file.is_file() else {}

        def token(name: str) -> str | None:
            return _config_token(config, name, config_file, backend)

        eos_token = token("eos_token") or _guess_eos(backend, tokenizer_file)
        return cls(
            backend,
            eos_token=eos_token,
            bos_token=token("bos_token"),
            pad_token=token("pad_token"),
            unk_token=token("unk_token"),
            chat_template=_find_chat_template(directory, config, config_file),
            model_max_length=_model_max_length(config),
        )


def _added_tokens_decoder(backend: _Backend) -> dict[str, dict[str, Any]]:
    """The `added_tokens_decoder` block of tokenizer_config.json, as transformers writes it."""
    decoder = {}
    for token_id, token in sorted(backend.get_added_tokens_decoder().items()):
        decoder[str(token_id)] = {
            "content": token.content,
            "lstrip": token.lstrip,
            "normalized": token.normalized,
            "rstrip": token.rstrip,
            "single_word": token.single_word,
            "special": token.special,
        }
    return decoder


def _read_backend(tokenizer_file: Path) -> _Backend:
    try:
        return _Backend.from_file(str(tokenizer_file))
    except Exception as error:  # tokenizers raises bare Exceptions for unreadable or foreign files
        raise WrenError(
            f"{tokenizer_file}: cannot load ({_one_line(error)}); expected a tokenizer.json written by "
            "Hugging Face tokenizers"
        ) from None


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise WrenError(f"{path}: cannot read ({error.strerror})") from None
    except UnicodeDecodeError:
        raise WrenError(f"{path}: not valid UTF-8; expected a JSON object") from None
    except json.JSONDecodeError as error:
        where = f"{path}:{error.lineno}"
        raise WrenError(f"{where}: invalid JSON ({error.msg}); expected a JSON object") from None
    if not isinstance(value, dict):
        raise WrenError(f"{path}: the JSON is not an object; expected a JSON object {{...}}")
    return value


def _config_token(config: dict[str, Any], name: str, config_file: Path, backend: _Backend) -> str | None:
    """A named token from tokenizer_config.json: a string, or a dict with "content" (older transformers)."""
    value = config.get(name)
    if isinstance(value, dict):
        value = value.get("content")
    if value is None:
        return None
    if not isinstance(value, str):
        raise WrenError(f"{config_file}: {name} is a {type(value).__name__}; expected a token string")
    if backend.token_to_id(value) is None:
        raise WrenError(f"{config_file}: {name} {value!r} is not in the vocabulary; expected a token it has")
    return value


def _guess_eos(backend: _Backend, tokenizer_file: Path) -> str:
    for candidate in _EOS_CANDIDATES:
        if backend.token_to_id(candidate) is not None:
            return candidate
    raise WrenError(
        f"{tokenizer_file}: cannot tell the end-of-sequence token; expected a tokenizer_config.json "
        'beside it with an "eos_token"'
    )


def _find_chat_template(directory: Path, config: dict[str, Any], config_file: Path) -> str:
    """The chat template, looked for where transformers looks: chat_template.jinja (transformers 5
    writes it, and it wins over the config), the config's "chat_template", then chat_template.json."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return _read_text(jinja_file)
    if config.get("chat_template") is not None:
        return _pick_template(config["chat_template"], config_file)
    processor_file = directory / "chat_template.json"
    if processor_file.is_file():
        template = _read_json_object(processor_file).get("chat_template")
        if template is not None:
            return _pick_template(template, processor_file)
    return DEFAULT_CHAT_TEMPLATE


def _pick_template(value: Any, source: Path) -> str:
    """A template string, or the "default" one of a list of {"name", "template"} entries."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        template = named.get("default") or next(iter(named.values()), None)
        if isinstance(template, str):
            return template
    raise WrenError(
        f'{source}: unreadable "chat_template"; expected a string or a list of {{"name", "template"}} entries'
    )


def _model_max_length(config: dict[str, Any]) -> int | None:
    value = config.get("model_max_length")
    # transformers writes a huge sentinel (1e30) for "no limit".
    if isinstance(value, (int, float)) and 0 < value < 2**40:
        return int(value)
    return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise WrenError(f"{path}: cannot read ({error}); expected a UTF-8 text file") from None


def _one_line(error: BaseException) -> str:
    # The CLI prints a WrenError on one line; messages from other libraries may span several.
    return " ".join(str(error).split())


def _dump_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=2) + "\n"


# ---------------------------------------------------------------------------------------------
# Training


def train_tokenizer(
    files: Iterable[Path | str], vocab_size: int = 6400, min_frequency: int = 2, show_progress: bool = False
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on JSON Lines files (directories: every *.jsonl inside).

    Rows are streamed, never all held in memory. The reserved tokens get ids 0..4:
    <|endoftext|>, <|im_start|>, <|im_end|>, <think>, </think>. The result uses MiniMind's
    settings: eos <|im_end|>, bos <|im_start|>, pad and unk <|endoftext|>, a ChatML template.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise WrenError(
            f"vocab_size {vocab_size} is too small; expected at least {MIN_VOCAB_SIZE} "
            f"({BYTE_ALPHABET_SIZE} bytes + {len(RESERVED_TOKENS)} reserved tokens + 1 merge)"
        )
    paths = expand_paths(files)
    backend = _new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(RESERVED_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    counter = _Counter()
    backend.train_from_iterator(counter.count(_corpus_texts(paths)), trainer=trainer)
    if counter.total == 0:
        names = ", ".join(str(path) for path in paths)
        raise WrenError(f'{names}: no training text; expected rows with a "text" or "conversations" field')
    return Tokenizer(
        _unmark_think_tokens(backend),
        eos_token=IM_END,
        bos_token=IM_START,
        pad_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        chat_template=DEFAULT_CHAT_TEMPLATE,
    )


def _new_byte_level_bpe() -> _Backend:
    backend = _Backend(models.BPE())
    # No prefix space: the text is tokenised exactly as written, so decode(encode(x)) == x.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _corpus_texts(paths: list[Path]) -> Iterator[str]:
    for path in paths:
        for line, row in iter_jsonl(path):
            yield from row_texts(row, path, line)


class _Counter:
    """Counts the texts flowing through an iterator, to tell an empty corpus from a small one."""

    def __init__(self) -> None:
        self.total = 0

    def count(self, texts: Iterator[str]) -> Iterator[str]:
        for text in texts:
            self.total += 1
            yield text


def _unmark_think_tokens(backend: _Backend) -> _Backend:
    """Make <think> and </think> ordinary added tokens. The trainer marks every token it is given
    as special, and rebuilding from JSON is the one way to change that (add_tokens updates the
    flag but not the set decode() skips)."""
    data = json.loads(backend.to_str())
    for entry in data["added_tokens"]:
        if entry["content"] in THINK_TOKENS:
            entry["special"] = False
    rebuilt = _Backend.from_str(json.dumps(data))
    for token_id, token in enumerate(RESERVED_TOKENS):
        assert rebuilt.token_to_id(token) == token_id, f"{token} should have id {token_id}"
    return rebuilt


__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "ENDOFTEXT",
    "IM_END",
    "IM_START",
    "RESERVED_TOKENS",
    "SPECIAL_TOKENS",
    "THINK_END",
    "THINK_START",
    "THINK_TOKENS",
    "Tokenizer",
    "render_chat_template",
    "train_tokenizer",
]
