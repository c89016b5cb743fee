"""`wren serve` in a real process, spoken to by real clients: the openai SDK, LangChain, raw HTTP.

The served model is tests/serve_helpers.py's tiny reasoning model: in chat it answers
`<think>the bird sat on the hill.</think>the bird is on the hill.` and stops; after plain text
it continues the sentence without stopping. Greedy decoding makes every reply reproducible.
"""

import json
import re

import httpx
import openai
import pytest
from serve_helpers import CONTEXT, running_server, tiny_chat_model

KEY = "test-key"
NAME = "wren-tiny"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUESTION = [{"role": "user", "content": "where is the owl?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with running_server(model_dir, log, "--api-key", KEY, "--served-model-name", NAME) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def chat(client, **kwargs):
    """Greedy unless told otherwise."""
    return client.chat.completions.create(model=NAME, messages=QUESTION, **{"temperature": 0, **kwargs})


def complete(client, prompt="the cat sat", **kwargs):
    return client.completions.create(model=NAME, prompt=prompt, **{"temperature": 0, **kwargs})


def events(body: str) -> list[str]:
    """The data of each server-sent event, checking the framing on the way."""
    assert body.endswith("\n\n")
    blocks = body[:-2].split("\n\n")
    assert all(block.startswith("data: ") and "\n" not in block for block in blocks), blocks
    return [block.removeprefix("data: ") for block in blocks]


# -- the openai SDK ---------------------------------------------------------------------------


def test_models_lists_the_served_model(client, server, model_dir):
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    listed = httpx.get(f"{server.url}/v1/models", headers=AUTH).json()
    card = listed["data"][0]
    assert listed["object"] == "list"
    assert card["object"] == "model" and card["owned_by"] == "wren" and isinstance(card["created"], int)
    assert card["root"] == str(model_dir) and card["max_model_len"] == CONTEXT


def test_chat_completion_separates_reasoning_from_the_answer(client, server):
    response = chat(client)
    message = response.choices[0].message
    assert response.object == "chat.completion" and response.model == NAME
    assert response.id.startswith("chatcmpl-") and response.choices[0].finish_reason == "stop"
    assert message.role == "assistant" and message.refusal is None
    reasoning = message.model_extra["reasoning_content"]
    assert re.fullmatch(r"the \w+ sat on the \w+\.", reasoning), reasoning
    assert re.fullmatch(r"the \w+ is on the \w+\.", message.content), message.content
    prompt = httpx.post(f"{server.url}/tokenize", json={"messages": QUESTION}, headers=AUTH).json()
    assert response.usage.prompt_tokens == prompt["count"] > 0
    # <think>, the reasoning, </think>, the answer, <|im_end|>: more tokens than the text shows.
    assert response.usage.completion_tokens > 10
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_chat_stream_matches_the_whole_reply(client):
    whole = chat(client)
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}))
    first, *middle, usage = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    deltas = [c.choices[0].delta for c in middle]
    content = "".join(d.content or "" for d in deltas)
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    assert len(deltas) > 5  # streamed token by token, not in one piece
    assert content == whole.choices[0].message.content
    assert reasoning == whole.choices[0].message.model_extra["reasoning_content"]
    assert [c.choices[0].finish_reason for c in middle] == [None] * (len(middle) - 1) + ["stop"]
    assert usage.choices == [] and usage.usage == whole.usage


def test_stream_without_include_usage_has_no_usage_chunk(client):
    chunks = list(chat(client, stream=True))
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


def test_n_choices_are_seeded_and_distinct(client):
    kwargs = dict(n=4, temperature=1.5, seed=7, max_tokens=12, extra_body={"ignore_eos": True})
    first = complete(client, **kwargs)
    again = complete(client, **kwargs)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert texts == [c.text for c in again.choices]  # the same seed gives the same choices
    assert len(set(texts)) > 1  # each choice draws from its own seed
    # Choice 0 with a seed is what that seed gives alone.
    alone = complete(client, temperature=1.5, seed=7, max_tokens=12, extra_body={"ignore_eos": True})
    assert alone.choices[0].text == texts[0]
    assert first.usage.prompt_tokens == alone.usage.prompt_tokens  # the prompt counts once
    assert first.usage.completion_tokens == 4 * 12


def test_list_of_prompts_numbers_choices_prompt_by_prompt(client):
    prompts = ["the cat sat", "the owl"]
    response = complete(client, prompt=prompts, n=2, max_tokens=8)
    alone = [complete(client, prompt=p, max_tokens=8).choices[0].text for p in prompts]
    assert [c.text for c in response.choices] == [alone[0], alone[0], alone[1], alone[1]]
    assert response.object == "text_completion" and response.id.startswith("cmpl-")


def test_stop_strings_cut_the_text_before_them(client):
    full = complete(client, max_tokens=30).choices[0].text
    words = full.split()
    response = complete(client, max_tokens=30, stop=words[2])
    assert response.choices[0].text == full[: full.index(words[2])]
    assert response.choices[0].finish_reason == "stop"
    several = complete(client, max_tokens=30, stop=["zzz", words[4], words[3]])
    assert several.choices[0].text == full[: min(full.index(words[4]), full.index(words[3]))]
    streamed = complete(client, max_tokens=30, stop=words[2], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == response.choices[0].text


def test_extra_body_sampling_fields(client, server):
    greedy = complete(client, max_tokens=20).choices[0].text
    # top_k 1 (or min_p 1) at a high temperature keeps only the likeliest token: greedy again.
    assert complete(client, max_tokens=20, extra_body={"top_k": 1}, temperature=2.0).choices[0].text == greedy
    assert (
        complete(client, max_tokens=20, extra_body={"min_p": 1.0}, temperature=2.0).choices[0].text == greedy
    )
    penalised = complete(client, max_tokens=20, extra_body={"repetition_penalty": 2.0})
    assert penalised.choices[0].text != greedy
    assert complete(client, max_tokens=20, frequency_penalty=2.0).choices[0].text != greedy
    assert complete(client, max_tokens=20, presence_penalty=2.0).choices[0].text != greedy
    # The chat model ends its reply by itself; ignore_eos makes it use every token allowed.
    assert chat(client).usage.completion_tokens < 40
    forced = chat(client, max_tokens=40, extra_body={"ignore_eos": True})
    assert forced.usage.completion_tokens == 40 and forced.choices[0].finish_reason == "length"
    # stop_token_ids: the id of a token of the reply stops it there.
    tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": greedy}, headers=AUTH).json()["tokens"]
    stopped = complete(client, max_tokens=20, extra_body={"stop_token_ids": [tokens[3]]})
    assert stopped.choices[0].finish_reason == "stop" and len(stopped.choices[0].text) < len(greedy)


def test_max_completion_tokens_wins_over_max_tokens(client):
    response = chat(client, max_tokens=30, max_completion_tokens=3)
    assert response.usage.completion_tokens == 3 and response.choices[0].finish_reason == "length"


def test_without_max_tokens_a_completion_may_fill_the_context(client):
    response = complete(client, extra_body={"ignore_eos": True})
    usage = response.usage
    assert usage.prompt_tokens + usage.completion_tokens == CONTEXT
    assert response.choices[0].finish_reason == "length"


def test_errors_become_the_sdk_exceptions(client, server):
    with pytest.raises(openai.BadRequestError) as bad:
        chat(client, temperature=-1)
    assert bad.value.status_code == 400 and bad.value.param == "temperature"
    assert bad.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as too_long:
        chat(client, max_tokens=CONTEXT)
    prompt = httpx.post(f"{server.url}/tokenize", json={"messages": QUESTION}, headers=AUTH).json()["count"]
    assert too_long.value.code == "context_length_exceeded"
    assert f"holds {CONTEXT} tokens, but the request needs {CONTEXT + prompt}" in too_long.value.message
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert unknown.value.code == "model_not_found" and NAME in unknown.value.message
    wrong_key = openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()
    with pytest.raises(openai.BadRequestError) as too_many:
        chat(client, n=10_000)
    assert too_many.value.param == "n"


def test_a_prompt_longer_than_the_context_is_rejected_with_the_numbers(client):
    with pytest.raises(openai.BadRequestError) as error:
        complete(client, prompt="the cat sat on the mat " * 200)
    assert error.value.code == "context_length_exceeded" and f"holds {CONTEXT}" in error.value.message


# -- LangChain --------------------------------------------------------------------------------


def test_langchain_chat_openai_invoke_and_stream(client, server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=f"{server.url}/v1", api_key=KEY, model=NAME, temperature=0, max_tokens=40, max_retries=0
    )
    answer = chat(client, max_tokens=40).choices[0].message.content
    reply = llm.invoke("where is the owl?")
    assert reply.content == answer
    assert reply.response_metadata["finish_reason"] == "stop"
    assert "".join(chunk.content for chunk in llm.stream("where is the owl?")) == answer


# -- raw HTTP ---------------------------------------------------------------------------------


def test_sse_framing_is_exact(server):
    body = {"model": NAME, "messages": QUESTION, "temperature": 0, "stream": True, "n": 2,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=AUTH) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        text = response.read().decode()
    data = events(text)
    assert data[-1] == "[DONE]" and text.endswith("data: [DONE]\n\n")
    chunks = [json.loads(d) for d in data[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    finishes = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert sorted(f["index"] for f in finishes) == [0, 1]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_completion_stream_with_echo(server):
    body = {"prompt": "the owl", "max_tokens": 5, "temperature": 0, "stream": True, "echo": True}
    text = httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH).text
    chunks = [json.loads(d) for d in events(text)[:-1]]
    assert chunks[0]["choices"][0]["text"] == "the owl"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "text_completion" for c in chunks)


def test_minimind_post_root_shape(server):
    body = {"prompt": "where is the owl?", "temperature": 0}  # greedy: the same reply every run
    response = httpx.post(f"{server.url}/", json=body, headers=AUTH)
    assert response.status_code == 200
    payload = response.json()
    assert payload["status"] == 200
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", payload["time"])
    assert re.fullmatch(r"the \w+ is on the \w+\.", payload["response"])


def test_api_key_guards_every_model_route(server):
    for method, path, body in [
        ("GET", "/v1/models", None),
        ("GET", f"/v1/models/{NAME}", None),
        ("POST", "/v1/chat/completions", {"messages": QUESTION}),
        ("POST", "/v1/completions", {"prompt": "x"}),
        ("POST", "/", {"prompt": "x"}),
        ("POST", "/tokenize", {"prompt": "x"}),
    ]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = httpx.request(method, server.url + path, json=body, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/metrics").status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"messages": []},
        {"messages": "hello"},
        {"messages": [{"role": "user"}], "temperature": "hot"},
        {"messages": [{"role": "tool", "content": "x"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        {"messages": [{"role": "user", "content": "hi"}], "n": 0},
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
        {"messages": [{"role": "user", "content": "hi"}], "stop": [1, 2]},
        {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"},
        {"messages": [{"role": "user", "content": "hi"}], "top_p": 0},
        {"messages": [{"role": "user", "content": "hi"}], "seed": 2**70},
        {"messages": [{"role": "user", "content": "\ud800"}]},
        [1, 2, 3],
    ],
)
def test_invalid_bodies_are_400_never_422(server, body):
    # json.dumps escapes a lone surrogate, which httpx's own encoder would refuse to send.
    headers = {**AUTH, "Content-Type": "application/json"}
    response = httpx.post(f"{server.url}/v1/chat/completions", content=json.dumps(body), headers=headers)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"


def test_malformed_json_and_unknown_routes_keep_openai_shape(server):
    broken = httpx.post(f"{server.url}/v1/completions", content=b"{nope", headers=AUTH)
    assert broken.status_code == 400 and "JSON" in broken.json()["error"]["message"]
    missing = httpx.get(f"{server.url}/v1/nothing-here", headers=AUTH)
    assert missing.status_code == 404 and "error" in missing.json()


def test_fields_the_server_does_not_use_are_ignored(server):
    body = {"model": NAME, "messages": QUESTION, "temperature": 0, "max_tokens": 5, "user": "me",
            "logprobs": True, "top_logprobs": 2, "response_format": {"type": "text"}, "tools": [],
            "parallel_tool_calls": False, "store": False, "metadata": {"a": "b"}}  # fmt: skip
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=AUTH)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 5


def test_tokenize(server):
    text = httpx.post(f"{server.url}/tokenize", json={"prompt": "the cat"}, headers=AUTH).json()
    assert text["count"] == len(text["tokens"]) > 0 and text["max_model_len"] == CONTEXT
    both = httpx.post(f"{server.url}/tokenize", json={"prompt": "a", "messages": QUESTION}, headers=AUTH)
    assert both.status_code == 400


def test_metrics_count_requests_and_tokens(server, client):
    complete(client, max_tokens=4)
    text = httpx.get(f"{server.url}/metrics").text
    assert 'wren_requests_total{path="/v1/completions",status="200"}' in text
    assert re.search(r"^wren_generation_tokens_total [1-9]", text, re.M)
    assert re.search(r"^wren_time_to_first_token_seconds_count [1-9]", text, re.M)
    assert "wren_slots_total 16" in text


def test_each_request_logs_one_line(server, client):
    response = complete(client, max_tokens=3)
    lines = [line for line in server.log_text().splitlines() if f"id={response.id}" in line]
    assert len(lines) == 1
    assert re.search(
        r"prompt_tokens=\d+ completion_tokens=3 ttft_ms=[\d.]+ total_ms=[\d.]+ outcome=length", lines[0]
    )


# -- an error after the stream began ----------------------------------------------------------


@pytest.fixture(scope="module")
def broken_server(model_dir, tmp_path_factory):
    """A model whose embedding is smaller than its tokenizer: the engine refuses every prompt,
    but only once the request reaches it (after the stream has started)."""
    import torch

    from wren.checkpoint import save_checkpoint
    from wren.model import CausalLM, preset_config
    from wren.tokenizer import Tokenizer

    directory = tmp_path_factory.mktemp("broken")
    torch.manual_seed(0)
    config = preset_config(
        "micro", vocab_size=262, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=64
    )
    save_checkpoint(CausalLM(config), directory / "model", Tokenizer.load(model_dir))
    with running_server(directory / "model", directory / "server.log") as running:
        yield running


def test_an_error_after_the_stream_began_is_an_event_then_done(broken_server):
    body = {"prompt": "the cat sat", "max_tokens": 4, "stream": True}
    response = httpx.post(f"{broken_server.url}/v1/completions", json=body)
    assert response.status_code == 200
    data = events(response.text)
    assert data[-1] == "[DONE]" and len(data) == 2
    error = json.loads(data[0])["error"]
    assert "token ids must be in [0, 262)" in error["message"]
    client = openai.OpenAI(base_url=f"{broken_server.url}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.APIError, match="262"):
        list(client.completions.create(model=str(broken_server.model), prompt="the cat", stream=True))
    plain = httpx.post(f"{broken_server.url}/v1/completions", json={"prompt": "the cat", "max_tokens": 2})
    assert plain.status_code == 400 and "262" in plain.json()["error"]["message"]
    assert httpx.get(f"{broken_server.url}/health").status_code == 200  # and it keeps serving
