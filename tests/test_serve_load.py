"""`wren serve` under load, under clients that walk away, and under fuzzed request bodies.

One server with 8 batch slots and room for 32 requests in flight (`--max-concurrency 32`).
"""

import asyncio
import json
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import metric_value, running_server, tiny_chat_model

SLOTS = 8
IN_FLIGHT = 32
LONG = {"max_tokens": 200, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = tiny_chat_model(tmp_path_factory.getbasetemp())
    log = tmp_path_factory.mktemp("serve-load") / "server.log"
    flags = ["--max-batch-size", str(SLOTS), "--max-concurrency", str(IN_FLIGHT)]
    with running_server(model, log, *flags) as running:
        yield running


def metrics(server) -> str:
    return httpx.get(f"{server.url}/metrics").text


def wait_until_idle(server, timeout: float = 5.0) -> float:
    """Seconds until no slot is busy and nothing waits (fails after `timeout`)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        text = metrics(server)
        names = ("wren_slots_active", "wren_requests_waiting", "wren_requests_in_flight")
        if all(metric_value(text, name) == 0 for name in names):
            return time.monotonic() - start
        time.sleep(0.01)
    raise AssertionError(f"the server is still busy after {timeout} s:\n{text}")


async def stream_completion(client: httpx.AsyncClient, url: str, leave_after: int | None) -> dict:
    """One streaming completion; with `leave_after`, disconnect after that many chunks."""
    body = {"prompt": "the cat sat", "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": 48, "ignore_eos": True}  # fmt: skip
    seen: list[str] = []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                seen.append(line.removeprefix("data: "))
                if leave_after is not None and len(seen) >= leave_after:
                    return {"left": True}
    chunks = [json.loads(data) for data in seen[:-1]]
    return {"left": False, "done": seen[-1] == "[DONE]", "chunks": chunks}


def test_32_streams_with_a_quarter_leaving(server):
    cancelled_before = metric_value(metrics(server), "wren_requests_cancelled_total")

    async def run() -> list[dict]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            jobs = [stream_completion(client, server.url, 3 if i % 4 == 0 else None) for i in range(32)]
            return await asyncio.gather(*jobs)

    outcomes = asyncio.run(run())
    stayed = [o for o in outcomes if not o["left"]]
    assert len(stayed) == 24
    for outcome in stayed:
        assert outcome["done"]
        chunks = outcome["chunks"]
        assert not any("error" in c for c in chunks)
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 48
        assert [c["choices"][0]["finish_reason"] for c in chunks[-2:-1]] == ["length"]
    wait_until_idle(server)
    text = metrics(server)
    assert metric_value(text, "wren_requests_cancelled_total") - cancelled_before == 8
    assert metric_value(text, "wren_slots_total") == SLOTS
    after = httpx.post(f"{server.url}/v1/completions", json={"prompt": "the owl", "max_tokens": 3})
    assert after.status_code == 200


def test_a_full_queue_answers_429_and_drains(server):
    # One request with n = --max-concurrency fills the queue at once: 8 choices run, 24 wait.
    question = [{"role": "user", "content": "where is the owl?"}]
    body = {"messages": question, "stream": True, "n": IN_FLIGHT, **LONG}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # kept: a dropped line iterator closes the stream
        assert next(lines).startswith("data: ")  # the role chunk: admitted
        text = metrics(server)
        assert metric_value(text, "wren_requests_in_flight") == IN_FLIGHT
        assert (
            metric_value(text, "wren_slots_active") + metric_value(text, "wren_requests_waiting") == IN_FLIGHT
        )
        refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            sdk.completions.create(model=str(server.model), prompt="x", max_tokens=2)
    # The client left: all 32 choices, running or waiting, are dropped.
    wait_until_idle(server)
    assert (
        httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    )
    # More choices than the server ever runs at once is a 400: retrying cannot help.
    too_many = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "n": IN_FLIGHT + 1})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"


def test_leaving_frees_the_slot_at_once(server):
    wait_until_idle(server)
    body = {"prompt": "the cat sat", **LONG}
    start = time.monotonic()
    httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).raise_for_status()
    whole = time.monotonic() - start  # 200 tokens, one at a time
    # A stream left after three chunks.
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}) as response:
        for _, _ in zip(range(3), response.iter_lines(), strict=False):
            pass
    assert wait_until_idle(server) < whole / 2
    # A plain request whose client gives up waiting.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=whole / 10))
    assert wait_until_idle(server) < whole / 2
    assert server.log_text().count("outcome=cancelled") >= 2


# -- fuzzing the OpenAPI schema ---------------------------------------------------------------


def _inline(schema, components):
    """The schema with every local $ref replaced by its definition (ours are not recursive)."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            return _inline(components[schema["$ref"].rsplit("/", 1)[-1]], components)
        return {key: _inline(value, components) for key, value in schema.items()}
    if isinstance(schema, list):
        return [_inline(item, components) for item in schema]
    return schema


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)
# Text the model knows, and the special tokens a prompt may try to smuggle in.
TEXT = st.text(max_size=30) | st.sampled_from(
    ["where is the owl?", "the cat sat", "<think>", "</think>", "<|im_end|>", "<|im_start|>assistant\n"]
)


def from_schema(schema: dict) -> st.SearchStrategy:
    """Values matching a JSON schema, for the subset pydantic writes for our request bodies."""
    if "anyOf" in schema:
        return st.one_of([from_schema(option) for option in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties", {})
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {name: from_schema(properties[name]) for name in required},
            optional={name: from_schema(value) for name, value in properties.items() if name not in required},
        )
    if kind == "array":
        least = schema.get("minItems", 0)
        return st.lists(from_schema(schema.get("items", {})), min_size=least, max_size=least + 3)
    if kind == "integer":
        least = schema.get("minimum")
        return st.integers(min_value=None if least is None else int(least))
    simple = {
        "string": TEXT,
        "number": st.floats(allow_nan=False),
        "boolean": st.booleans(),
        "null": st.none(),
    }
    return simple.get(kind, JSON)


def _cheap(body):
    """Keep generation short: at most 6 tokens per choice and 4 choices (the limits themselves are
    tested elsewhere); values of the wrong type stay as they are."""
    if isinstance(body, dict):
        tokens = [body.get(k) for k in ("max_tokens", "max_completion_tokens")]
        if not any(isinstance(t, int) and not isinstance(t, bool) and t < 1 for t in tokens):
            body["max_completion_tokens"] = 6
        if isinstance(body.get("n"), int) and body["n"] > 4:
            body["n"] = 4
    return body


@pytest.fixture(scope="module")
def body_strategies(server):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    components = spec["components"]["schemas"]
    routes = {}
    for path, operations in spec["paths"].items():
        request_body = operations.get("post", {}).get("requestBody")
        if request_body:
            schema = _inline(request_body["content"]["application/json"]["schema"], components)
            valid = from_schema(schema)
            # Valid bodies, bodies with one field spoiled, and any JSON at all.
            spoiled = st.tuples(valid, st.text(max_size=12), JSON).map(lambda b: {**b[0], b[1]: b[2]})
            routes[path] = st.one_of(valid, valid, spoiled, JSON).map(_cheap)
    assert set(routes) == {"/v1/chat/completions", "/v1/completions", "/", "/tokenize"}
    return routes


def test_fuzzed_bodies_never_crash_the_server(server, body_strategies):
    paths = sorted(body_strategies)
    http = httpx.Client(base_url=server.url, timeout=30)

    @settings(
        max_examples=400,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.sampled_from(paths).flatmap(lambda path: st.tuples(st.just(path), body_strategies[path])))
    def check(case):
        path, body = case
        content = json.dumps(body, allow_nan=True)  # NaN too: clients do send it
        response = http.post(path, content=content, headers={"Content-Type": "application/json"})
        assert response.status_code in (200, 400, 404), (path, body, response.status_code, response.text)
        if response.status_code != 200:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        elif response.headers["content-type"].startswith("text/event-stream"):
            assert response.text.endswith("data: [DONE]\n\n")
            assert '"server_error"' not in response.text, response.text

    try:
        check()
    finally:
        http.close()
    wait_until_idle(server)
    assert "Traceback" not in server.log_text()
