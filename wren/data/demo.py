"""Demo corpora generated from text that ships with Python itself.

The quickstart must run offline on a fresh machine without committing anyone's dataset, so it
builds its text from the interpreter's own documentation: the pydoc topic pages (the language
reference, shipped as `pydoc_data`) and the docstrings of the standard library's source files,
read with `ast` rather than imported so no module's import-time side effects run.

Two corpora come out of it: pretraining documents (`{"text": ...}`) and a chat corpus in
MiniMind's SFT format (`{"conversations": [{"role", "content"}, ...]}`) whose questions follow a
few fixed templates, so even a tiny model learns a visible question-and-answer pattern quickly.
"""

from __future__ import annotations

import ast
import copy
import functools
import json
import random
import re
import sysconfig
import textwrap
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from wren.atomic import atomic_write_text

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3", "__pycache__"}

# Well-known pure-Python modules: their names are what people ask about, and their docstrings are
# written for users. Modules missing from some Python version are simply skipped.
_SFT_MODULES = (
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib",
    "dis", "doctest", "enum", "filecmp", "fileinput", "fnmatch", "fractions", "functools",
    "getpass", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html",
    "html.parser", "http.client", "http.server", "inspect", "ipaddress", "json", "json.decoder",
    "json.encoder", "keyword", "linecache", "locale", "logging", "logging.handlers", "lzma",
    "mimetypes", "numbers", "operator", "os", "pathlib", "pickle", "pkgutil", "platform",
    "pprint", "queue", "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve",
    "shlex", "shutil", "socket", "socketserver", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "tomllib", "traceback", "types",
    "typing", "unittest.case", "unittest.mock", "urllib.parse", "urllib.request", "uuid",
    "warnings", "weakref", "zipfile", "zoneinfo",
)  # fmt: skip

_MAX_ANSWER = 400  # characters; keeps a two-round conversation inside a 256-512 token context
_MAX_SIGNATURE = 240
_PROPERTY_DECORATORS = {"property", "cached_property", "setter", "getter", "deleter"}
_SYSTEM_PROMPT = "You are Wren, a small assistant that answers questions about Python."

# --- reading the documentation ------------------------------------------------------------------


class _Doc(NamedTuple):
    """One docstring from a source file."""

    name: str  # "" for the module itself, else a qualified name such as "TextWrapper.wrap"
    kind: str  # "module", "class", "function" or "property"
    signature: str | None  # "(text, width=70)" without self/cls, when it could be read
    doc: str


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _decorators(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> set[str]:
    """Last name of each decorator: `@property` -> "property", `@x.setter` -> "setter"."""
    names = set()
    for decorator in node.decorator_list:
        if isinstance(decorator, ast.Call):
            decorator = decorator.func
        if isinstance(decorator, ast.Name):
            names.add(decorator.id)
        elif isinstance(decorator, ast.Attribute):
            names.add(decorator.attr)
    return names


def _kind(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> str:
    if isinstance(node, ast.ClassDef):
        return "class"
    return "property" if _decorators(node) & _PROPERTY_DECORATORS else "function"


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef, bound: bool) -> str | None:
    """The call signature from the ast; `bound` drops the self/cls a caller never passes."""
    if isinstance(node, ast.ClassDef):
        init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        return None if init is None else _signature(init, bound=True)
    decorators = _decorators(node)
    if decorators & (_PROPERTY_DECORATORS | {"overload"}) or any(d.startswith("_") for d in decorators):
        return None  # not called, a typing stub, or wrapped by a private decorator that changes the call
    args = copy.copy(node.args)
    if bound and "staticmethod" not in decorators:
        positional = [*args.posonlyargs, *args.args]
        if not positional:
            return None
        if len(args.defaults) == len(positional):
            args.defaults = args.defaults[1:]
        if args.posonlyargs:
            args.posonlyargs = args.posonlyargs[1:]
        else:
            args.args = args.args[1:]
    text = f"({ast.unparse(args)})"
    if node.returns is not None and node.name != "__init__":
        text += f" -> {ast.unparse(node.returns)}"
    return text if len(text) <= _MAX_SIGNATURE else None


def _names(tree: ast.Module) -> dict[ast.AST, tuple[str, str, str | None]]:
    """Qualified name, kind and signature of every class and function, keyed by its node."""
    found: dict[ast.AST, tuple[str, str, str | None]] = {}

    def visit(node: ast.AST, prefix: str, in_class: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                found[child] = (name, _kind(child), _signature(child, bound=in_class))
                if isinstance(child, ast.ClassDef):
                    visit(child, name + ".", in_class=True)
                else:
                    visit(child, name + ".<locals>.", in_class=False)
            else:  # defs inside if/try blocks still belong to the enclosing scope
                visit(child, prefix, in_class)

    visit(tree, "", in_class=False)
    return found


@functools.cache
def _file_docs(path: Path) -> tuple[_Doc, ...]:
    """Every docstring in one source file, in `ast.walk` order.

    Cached so the pretraining and the SFT corpus share one parse of each file: parsing the whole
    standard library is what makes the corpus slow to build.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # old escape sequences in some stdlib files
            tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
        return ()
    names = _names(tree)
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if not doc:
                continue
            docs.append(
                _Doc("", "module", None, doc) if isinstance(node, ast.Module) else _Doc(*names[node], doc)
            )
    return tuple(docs)


def _paragraph_chunks(text: str, max_chars: int) -> Iterator[str]:
    """Split on blank lines and regroup paragraphs into chunks of at most ~max_chars."""
    chunk: list[str] = []
    size = 0
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        if chunk and size + len(paragraph) > max_chars:
            yield "\n\n".join(chunk)
            chunk, size = [], 0
        chunk.append(paragraph)
        size += len(paragraph) + 2
    if chunk:
        yield "\n\n".join(chunk)


def _pydoc_topics() -> Iterator[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions package the docs separately
        return
    for name in sorted(topics):
        yield topics[name]


def _stdlib_docstrings() -> Iterator[str]:
    root = _stdlib_root()
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS.intersection(path.relative_to(root).parts):
            continue
        for doc in _file_docs(path):
            if len(doc.doc) > 200:
                yield doc.doc


def demo_texts(max_bytes: int = 4_000_000, max_chars: int = 1500) -> list[str]:
    """Documents of real English prose and code, deterministic for a given Python version."""
    texts: list[str] = []
    total = 0
    for source in (_pydoc_topics(), _stdlib_docstrings()):
        for document in source:
            for chunk in _paragraph_chunks(document, max_chars):
                if len(chunk) < 64:
                    continue
                texts.append(chunk)
                total += len(chunk.encode("utf-8"))
                if total >= max_bytes:
                    return texts
    return texts


def write_demo_pretrain(path: str | Path, max_bytes: int = 4_000_000) -> int:
    """Write the demo corpus as `{"text": ...}` JSON lines; returns the number of rows."""
    texts = demo_texts(max_bytes=max_bytes)
    lines = "".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts)
    atomic_write_text(path, lines)
    return len(texts)


# --- turning documentation into short answers ---------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`(\"'])")
_SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")
_ENDS_SENTENCE = re.compile(r"[.!?][)\"'”]?$")
_LIST_LINE = re.compile(r"[-*+•]\s|\d+[.)]\s|:\w+|\.\. |\w+\s*(--|:)\s")
_RULE_LINE = re.compile(r"^([*=\-~^+])\1+$")
_EXAMPLE_LEADS = ("For example", "Example", "E.g.", "e.g.")
_TOPIC_ASIDES = ("New in version", "Changed in version", "Added in version", "Deprecated", "**", "See also")


class _Entry(NamedTuple):
    """A documented module, class or function, with its answers already cut to size."""

    module: str
    name: str  # "" for the module itself
    kind: str
    summary: str
    more: str | None  # the docstring's next paragraph, for "tell me more"
    signature: str | None

    @property
    def full(self) -> str:
        return f"{self.module}.{self.name}" if self.name else self.module


class _Topic(NamedTuple):
    """A page of the language reference (`pydoc_data.topics`)."""

    subject: str  # "the `with` statement"
    summary: str
    more: str | None
    grammar: str | None


def _flatten(paragraph: str) -> str:
    """One line of prose: whitespace collapsed, reST ``code`` turned into Markdown `code`."""
    return re.sub(r"``([^`]+)``", r"`\1`", " ".join(paragraph.split()))


def _clip(text: str, limit: int = _MAX_ANSWER) -> str | None:
    """`text` cut after its last whole sentence within `limit`; None if even the first is longer."""
    if len(text) <= limit:
        return text
    cut = None
    for match in _SENTENCE_END.finditer(text):
        if match.start() > limit:
            break
        cut = match.start()
    return text[:cut] if cut else None


def _drop_lead_in(text: str) -> str | None:
    """Drop a closing "... as follows:" sentence whose example we leave out; None if nothing is left."""
    if not text.endswith(":"):
        return text
    sentences = _SENTENCE_END.split(text)
    return " ".join(sentences[:-1]) if len(sentences) > 1 else None


def _finish(text: str) -> str:
    # Many docstring summaries omit the full stop; answers should read as sentences.
    return text if _ENDS_SENTENCE.search(text) else text + "."


def _doc_prose(paragraph: str) -> str | None:
    """A docstring paragraph as a one-line answer, or None for code, lists, directives and lead-ins
    ending in a colon: those read badly once their line breaks are gone."""
    lines = paragraph.strip("\n").splitlines()
    if any(line[:1].isspace() for line in lines) or ">>>" in paragraph or "::" in paragraph:
        return None
    if any(_LIST_LINE.match(line) for line in lines):
        return None
    text = _drop_lead_in(_flatten(paragraph))
    if not text or len(text) < 12 or not re.search(r"[a-z]{3}", text) or text.startswith(_EXAMPLE_LEADS):
        return None
    clipped = _clip(text)
    return _finish(clipped) if clipped else None


def _doc_answers(doc: str) -> tuple[str | None, str | None]:
    """The summary and the follow-up paragraph of a docstring."""
    paragraphs = [p for p in re.split(r"\n\s*\n", doc) if p.strip()]
    if paragraphs and _SIGNATURE_LINE.match(_flatten(paragraphs[0].splitlines()[0])):
        paragraphs = paragraphs[1:]  # old-style "reduce(function, iterable) -> value" first line
    if not paragraphs:
        return None, None
    summary = _doc_prose(paragraphs[0])
    more = _doc_prose(paragraphs[1]) if summary and len(paragraphs) > 1 else None
    return summary, more


def _module_path(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


@functools.cache
def _sft_entries() -> tuple[_Entry, ...]:
    """Public, well-documented names of the modules in `_SFT_MODULES`, in a fixed order."""
    root = _stdlib_root()
    entries = []
    seen = set()
    for module in _SFT_MODULES:
        path = _module_path(root, module)
        if path is None:
            continue
        for doc in _file_docs(path):
            if any(part[:1] in ("_", "<") for part in doc.name.split(".")):
                continue  # private, or local to a function
            if (module, doc.name) in seen:
                continue  # fallback definitions under try/except repeat a name
            seen.add((module, doc.name))
            summary, more = _doc_answers(doc.doc)
            if summary:
                entries.append(_Entry(module, doc.name, doc.kind, summary, more, doc.signature))
    return tuple(entries)


def _topic_subject(title: str) -> str:
    """'The "with" statement' -> 'the `with` statement', so it reads well mid-sentence."""
    pieces = re.sub(r'"([^"]+)"', r"`\1`", title.strip()).split("`")
    for i in range(0, len(pieces), 2):  # even pieces lie outside backticks
        pieces[i] = re.sub(r"\b(?!Python\b)[A-Z][a-z]+\b", lambda m: m.group().lower(), pieces[i])
    return "`".join(pieces)


def _topic_prose(paragraph: str, opening: bool) -> str | None:
    """A reference paragraph as a one-line answer; `opening` marks the topic's first paragraph."""
    lines = paragraph.strip("\n").splitlines()
    if any(line[:1].isspace() or _RULE_LINE.match(line.strip()) for line in lines):
        return None  # grammar, code, tables, headings
    if paragraph.lstrip().startswith(_TOPIC_ASIDES) or re.match(r"\w+\.\w+\(", paragraph):
        return None  # version notes, source links, "object.__call__(self[, args...])"
    start = paragraph.lstrip()[:1]
    if not start or start == "(" or start.islower() or re.match(r"(\*|-|\d+\.)\s", paragraph.lstrip()):
        return None  # asides, list items and fragments that continue an example
    # The text renderer marks code with straight double quotes; Markdown uses backticks.
    flat = re.sub(r'"([^"\s](?:[^"\n]{0,38}[^"\s])?)"', r"`\1`", _flatten(paragraph))
    if not _ENDS_SENTENCE.search(flat) and not flat.endswith(":"):
        flat += ":"  # reference prose that stops mid-sentence leads into an example we leave out
    text = _drop_lead_in(flat)
    if text is None and opening:
        # A lone lead-in ("Assert statements are a way to ...:") still says what the topic is.
        text = flat[:-1] + "."
    clipped = _clip(text) if text else None
    return _finish(clipped) if clipped and len(clipped) >= 20 else None


@functools.cache
def _topics() -> tuple[_Topic, ...]:
    topics = []
    seen = set()
    for page in _pydoc_topics():
        title, _, body = page.partition("\n")
        subject = _topic_subject(title)
        if subject in seen:
            continue  # several topic names ("if", "else") share one page
        seen.add(subject)
        prose: list[str] = []
        grammars: list[str] = []
        for paragraph in re.split(r"\n\s*\n", body):
            if "::=" in paragraph:
                grammars.append(textwrap.dedent(paragraph.strip("\n")).rstrip())
            elif len(prose) < 2 and (text := _topic_prose(paragraph, opening=not prose)):
                prose.append(text)
        # Only the page's first rule is its own (later ones are its parts); it is fenced as code,
        # so leave room for the fence within the answer limit.
        grammar = grammars[0] if grammars and len(grammars[0]) <= _MAX_ANSWER - 10 else None
        if prose:
            topics.append(_Topic(subject, prose[0], prose[1] if len(prose) > 1 else None, grammar))
    return tuple(topics)


# --- conversations ------------------------------------------------------------------------------

# Several phrasings per question, so the model learns the format rather than one string.
_ASK = {
    "function": (
        "What does `{}` do?",
        "Explain `{}`.",
        "What is `{}` used for?",
        "Describe `{}`.",
        "Tell me what `{}` does.",
        "What is the purpose of `{}`?",
        "Can you explain `{}` in Python?",
        "what does {} do",
    ),
    "class": (
        "What is `{}`?",
        "What is the `{}` class?",
        "Explain `{}`.",
        "Describe the `{}` class.",
        "What is `{}` used for?",
        "Tell me about `{}`.",
        "what is {}",
    ),
    "property": (
        "What is `{}`?",
        "What does `{}` hold?",
        "Explain `{}`.",
        "What is the `{}` attribute?",
    ),
    "module": (
        "What is the `{}` module for?",
        "What does the `{}` module do?",
        "Tell me about the `{}` module.",
        "Describe the `{}` module.",
        "What is `{}` in the standard library?",
    ),
}
_ASK_WHERE = (
    "Which module provides `{}`?",
    "Where can I find `{}` in the standard library?",
    "What module is `{}` in?",
    "How do I import `{}`?",
    "Which standard library module has `{}`?",
)
_ASK_TOPIC = (
    "Explain {} in Python.",
    "Tell me about {}.",
    "What does the Python reference say about {}?",
    "Can you describe {}?",
    "Give me a short overview of {}.",
    "I am learning Python. What should I know about {}?",
)
_FOLLOW_SIGNATURE = ("Show me its signature.", "What is its signature?", "How do I call it?")
_FOLLOW_MODULE = ("Which module is it in?", "Where does it live?", "How do I import it?")
_FOLLOW_OWNER = ("Where is it defined?", "Which class is it on?", "Where does it live?")
_FOLLOW_MORE = ("Tell me more.", "Can you say more?", "Go on.", "Any more details?")
_FOLLOW_GRAMMAR = ("What is its syntax?", "Show me the grammar.", "How is it written?")
_IDENTITY = (
    (
        ("Who are you?", "What are you?", "Introduce yourself.", "Tell me about yourself.", "who are you"),
        (
            "I am Wren, a small language model trained on Python's documentation.",
            "I'm Wren, a small language model trained on Python's documentation. "
            "Ask me about a module, a function or a statement.",
        ),
    ),
    (
        ("What is your name?", "What's your name?", "What should I call you?"),
        ("My name is Wren. I am a small language model trained on Python's documentation.",),
    ),
    (
        ("Hi!", "Hello", "Hello, who am I talking to?", "Hey there."),
        (
            "Hello! I am Wren, a small language model trained on Python's documentation. "
            "Ask me about a Python module, function or statement.",
        ),
    ),
    (
        ("What can you do?", "How can you help me?", "What do you know about?"),
        (
            "I am Wren, a small language model. I can answer short questions about Python's "
            "standard library and its language reference.",
        ),
    ),
    (
        ("Who made you?", "Who trained you?", "How were you trained?", "What were you trained on?"),
        (
            "I am Wren, a small language model trained from scratch on Python's own documentation: "
            "the language reference and the standard library's docstrings.",
        ),
    ),
    (
        ("Are you a human?", "Are you a person?", "Are you ChatGPT?"),
        ("No. I am Wren, a small language model trained on Python's documentation.",),
    ),
)

_Turns = list[dict[str, str]]
_IdentityGroup = tuple[tuple[str, ...], tuple[str, ...]]  # (questions, answers), any pairing fits


def _turns(*pairs: tuple[str, str]) -> _Turns:
    return [
        turn
        for question, answer in pairs
        for turn in ({"role": "user", "content": question}, {"role": "assistant", "content": answer})
    ]


def _ask(entry: _Entry, rng: random.Random) -> tuple[str, str]:
    return rng.choice(_ASK[entry.kind]).format(entry.full), entry.summary


def _where_answer(entry: _Entry) -> str:
    module, name = entry.module, entry.name
    return f"`{name}` is in the `{module}` module. Import it with `from {module} import {name}`."


def _follow_ups(entry: _Entry) -> list[tuple[tuple[str, ...], str]]:
    """The second rounds that make sense after asking about `entry`."""
    options = []
    owner = entry.name.rpartition(".")[0]
    if owner:
        options.append(
            (_FOLLOW_OWNER, f"It is defined on the `{owner}` class in the `{entry.module}` module.")
        )
    elif entry.kind != "module":
        options.append((_FOLLOW_MODULE, _where_answer(entry)))
    if entry.signature:
        options.append((_FOLLOW_SIGNATURE, f"The signature is `{entry.full}{entry.signature}`."))
    if entry.more and len(entry.summary) + len(entry.more) <= 2 * _MAX_ANSWER - 100:
        options.append((_FOLLOW_MORE, entry.more))
    return options


def _doc_single(entry: _Entry, rng: random.Random) -> _Turns:
    return _turns(_ask(entry, rng))


def _doc_where(entry: _Entry, rng: random.Random) -> _Turns:
    return _turns((rng.choice(_ASK_WHERE).format(entry.name), _where_answer(entry)))


def _doc_dialogue(entry: _Entry, rng: random.Random) -> _Turns:
    questions, answer = rng.choice(_follow_ups(entry))
    return _turns(_ask(entry, rng), (rng.choice(questions), answer))


def _topic_single(topic: _Topic, rng: random.Random) -> _Turns:
    return _turns((rng.choice(_ASK_TOPIC).format(topic.subject), topic.summary))


def _topic_dialogue(topic: _Topic, rng: random.Random) -> _Turns:
    options = []
    if topic.more:
        options.append((_FOLLOW_MORE, topic.more))
    if topic.grammar:
        options.append((_FOLLOW_GRAMMAR, f"```\n{topic.grammar}\n```"))
    questions, answer = rng.choice(options)
    return _turns(
        (rng.choice(_ASK_TOPIC).format(topic.subject), topic.summary), (rng.choice(questions), answer)
    )


def _identity(group: _IdentityGroup, rng: random.Random) -> tuple[str, str]:
    questions, answers = group
    return rng.choice(questions), rng.choice(answers)


def _identity_single(group: _IdentityGroup, rng: random.Random) -> _Turns:
    return _turns(_identity(group, rng))


def _identity_dialogue(entry: _Entry, rng: random.Random) -> _Turns:
    return _turns(_identity(rng.choice(_IDENTITY), rng), _ask(entry, rng))


def demo_conversations(max_conversations: int = 4000, seed: int = 0) -> list[dict[str, Any]]:
    """Chat rows in MiniMind's SFT format, generated from Python's documentation.

    Deterministic for a given Python version and seed. Every answer is a sentence or two taken from
    a docstring or the language reference (or a fixed identity line), at most ~400 characters.
    """
    if max_conversations <= 0:
        return []
    rng = random.Random(seed)
    entries = list(_sft_entries())
    topics = list(_topics())
    counts = Counter(e.name for e in entries if e.kind != "module" and "." not in e.name)
    unique = [e for e in entries if counts.get(e.name) == 1]  # "open" lives in many modules
    with_topic_follow_up = [t for t in topics if t.more or t.grammar]
    # (share of the corpus, pool to draw from, how to turn one pool item into turns)
    plans: list[tuple[float, list[Any], Callable[[Any, random.Random], _Turns]]] = [
        (0.44, entries, _doc_single),
        (0.14, unique, _doc_where),
        (0.18, [e for e in entries if _follow_ups(e)], _doc_dialogue),
        (0.08, topics, _topic_single),
        (0.04, with_topic_follow_up, _topic_dialogue),
        (0.08, list(_IDENTITY), _identity_single),
        (0.04, entries, _identity_dialogue),
    ]
    plans = [plan for plan in plans if plan[1]]
    total_share = sum(share for share, _, _ in plans)
    quotas = [max(1, int(max_conversations * share / total_share)) for share, _, _ in plans]
    quotas[0] += max(0, max_conversations - sum(quotas))
    rows = []
    for quota, (_, pool, make) in zip(quotas, plans, strict=True):
        order = rng.sample(pool, len(pool))
        for i in range(quota):  # small pools (identity, topics) repeat, with fresh phrasings
            turns = make(order[i % len(order)], rng)
            if rng.random() < 0.1:  # a few rows carry a system prompt, as real SFT sets do
                turns.insert(0, {"role": "system", "content": _SYSTEM_PROMPT})
            rows.append({"conversations": turns})
    rng.shuffle(rows)
    return rows[:max_conversations]


def write_demo_sft(path: str | Path, max_conversations: int = 4000) -> int:
    """Write `demo_conversations` as `{"conversations": [...]}` JSON lines; returns the row count."""
    rows = demo_conversations(max_conversations)
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return len(rows)


def write_demo_corpus(
    directory: str | Path, max_mb: float = 4.0, max_conversations: int = 4000
) -> dict[str, Path]:
    """Write `pretrain.jsonl` and `sft.jsonl` into `directory`; returns {"pretrain": ..., "sft": ...}."""
    directory = Path(directory)
    paths = {"pretrain": directory / "pretrain.jsonl", "sft": directory / "sft.jsonl"}
    write_demo_pretrain(paths["pretrain"], max_bytes=int(max_mb * 1_000_000))
    write_demo_sft(paths["sft"], max_conversations=max_conversations)
    return paths
