"""`wren web` in a real process, driven by a real headless Chromium through Playwright.

The page is served over the tiny addition model (which reasons in <think> first), then over
`wren serve` through the OpenAI client, then over a server that is not there.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import build_chat_model
from serve_helpers import free_port, running_server, running_wren

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
if not CHROMIUM.is_file():
    pytest.skip("needs Chromium at /usr/bin/chromium (apt-get install chromium)", allow_module_level=True)
pytest.importorskip("gradio", reason="needs the web extra (gradio)")
sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (the dev extra)")
expect = sync_api.expect

REPLY = re.compile(r"\d plus \d is \d+")
QUESTION = "What is 3 plus 4?"


@contextmanager
def running_web(log: Path, *args: str, timeout: float = 60) -> Iterator[str]:
    """`python -m wren web ARGS` on a free port, once its page answers; stopped after."""
    with running_wren(["web", *args], log, "/", timeout) as (_, url):
        yield url + "/"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_chat_model(tmp_path_factory.mktemp("web-model"), thinking=True)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser) -> Iterator:
    page = browser.new_page(viewport={"width": 1100, "height": 1000})
    page.set_default_timeout(30_000)
    yield page
    page.close()


def send(page, text: str) -> None:
    page.locator("#wren-input textarea").fill(text)
    page.locator("#wren-send").click()


def set_max_tokens(page, count: int) -> None:
    settings = page.locator("#wren-settings")
    if not settings.locator("#wren-max-tokens").is_visible():
        settings.get_by_text("Settings").click()
    limit = page.locator("#wren-max-tokens input[type=number]")
    slider = page.locator("#wren-max-tokens input[type=range]")
    # A box filled while the accordion is still opening can lose its value: retry until the
    # slider's own range input shows that the page took it.
    for _ in range(5):
        limit.fill(str(count))
        limit.press("Enter")
        limit.blur()
        try:
            expect(slider).to_have_value(str(count), timeout=2_000)
            return
        except AssertionError:
            pass
    expect(slider).to_have_value(str(count))


def test_local_model_chat_regenerate_undo_clear(model, page, tmp_path):
    with running_web(tmp_path / "web.log", str(model)) as url:
        page.goto(url)
        chat = page.locator("#wren-chat")
        send(page, QUESTION)
        expect(chat).to_contain_text(REPLY)
        expect(chat).to_contain_text(re.compile(r"\d+ tokens · [\d.]+ tokens/s"))
        expect(chat).to_contain_text("Reasoning")  # the <think> part, shown apart and collapsed
        assert "<think>" not in chat.inner_text()
        expect(page.locator("#wren-input textarea")).to_have_value("")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web-chat.png"), full_page=True)

        # Regenerate with a 2-token limit: the redone answer is cut, which proves it was redone.
        set_max_tokens(page, 2)
        page.locator("#wren-regenerate").click()
        expect(chat).to_contain_text(re.compile(r"2 tokens · [\d.]+ tokens/s · length"))
        assert chat.inner_text().count(QUESTION) == 1

        page.locator("#wren-undo").click()
        expect(chat).not_to_contain_text("tokens/s")
        expect(chat).not_to_contain_text(QUESTION)
        expect(page.locator("#wren-input textarea")).to_have_value(QUESTION)  # back to edit

        set_max_tokens(page, 64)
        page.locator("#wren-send").click()
        expect(chat).to_contain_text(REPLY)
        page.locator("#wren-clear").click()
        expect(chat).not_to_contain_text(QUESTION)
        expect(chat).not_to_contain_text("tokens/s")


def test_api_base_mode_talks_to_wren_serve(model, page, tmp_path):
    serve_args = ("--served-model-name", "tiny", "--api-key", "secret")
    with running_server(model, tmp_path / "serve.log", *serve_args) as server:
        args = ("--api-base", f"{server.url}/v1", "--model", "tiny")
        with running_web(tmp_path / "wrong-key.log", *args, "--api-key", "wrong") as url:
            page.goto(url)
            send(page, QUESTION)
            expect(page.locator("#wren-chat")).to_contain_text("refused the API key")
        with running_web(tmp_path / "web.log", *args, "--api-key", "secret") as url:
            page.goto(url)
            chat = page.locator("#wren-chat")
            # The default 512 new tokens do not fit the tiny model's 256-token context.
            send(page, QUESTION)
            expect(chat).to_contain_text("Error: the server answered 400: this model's context holds 256")
            set_max_tokens(page, 64)
            send(page, QUESTION)
            expect(chat).to_contain_text(REPLY)
            expect(chat).to_contain_text("tokens/s")
            expect(chat).to_contain_text("Reasoning")  # from the server's reasoning_content


def test_unreachable_server_shows_a_readable_error(page, tmp_path):
    base = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with running_web(tmp_path / "web.log", "--api-base", base, "--model", "tiny") as url:
        page.goto(url)
        send(page, QUESTION)
        chat = page.locator("#wren-chat")
        expect(chat).to_contain_text(f"Error: cannot reach the server at {base}")


def test_closing_a_reply_cancels_its_engine_request(model):
    """Stop makes Gradio close the page's generator; that must free the engine's slot."""
    from wren.cli import build_parser, open_engine
    from wren.infer.shared import SharedEngine
    from wren.web.app import _answer, _turn
    from wren.web.backends import LocalBackend, Settings

    engine = open_engine(build_parser().parse_args(["web", str(model)]), max_batch_size=2)
    backend = LocalBackend(SharedEngine(engine), "tiny")
    turns = [_turn(QUESTION)]
    replies = _answer(backend, "", turns, Settings(temperature=0, max_new_tokens=64))
    for _ in range(4):  # the empty turn, then the first tokens
        next(replies)
    assert engine.has_work
    replies.close()
    assert not engine.has_work
    # What was written so far stays in the chat, without a stats line.
    assert turns[-1]["reasoning"] and not turns[-1]["stats"]


def test_web_needs_a_model_or_an_api_base(capsys):
    from wren.cli import main

    assert main(["web"]) == 2
    assert "needs a MODEL directory or --api-base" in capsys.readouterr().err
    assert main(["web", "some-model", "--api-base", "http://127.0.0.1:1/v1"]) == 2
    assert "not both" in capsys.readouterr().err
