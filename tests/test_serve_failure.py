"""A model that fails in the middle of a reply, served by a real `wren serve` process.

The failure is a real one: the tiny chat model served by the transformers backend with
`--trust-remote-code`, whose own modeling code (written into the model directory, as a hub model
ships it) raises once a sequence grows past `fail_after` tokens. A reply therefore streams a few
tokens and then the engine step fails, which is what a remote-code bug, a device error or running
out of memory looks like to the server. Nothing in Wren is mocked or switched into a test mode.
"""

import json
import re
import shutil

import httpx
import openai
import pytest
from serve_helpers import metric_value, running_server, tiny_chat_model

NAME = "fragile"
QUESTION = [{"role": "user", "content": "where is the owl?"}]
# Tokens of the answer (after </think>) that stream before the model fails.
ANSWER_TOKENS = 3

FRAGILE_CODE = '''
from transformers import LlamaForCausalLM


class FragileLlamaForCausalLM(LlamaForCausalLM):
    """Llama whose forward raises once the sequence is longer than config.fail_after tokens."""

    def forward(self, input_ids=None, past_key_values=None, **kwargs):
        seen = 0 if past_key_values is None else past_key_values.get_seq_length()
        if seen + input_ids.shape[-1] > self.config.fail_after:
            raise RuntimeError(f"the sequence grew past {self.config.fail_after} tokens")
        return super().forward(input_ids=input_ids, past_key_values=past_key_values, **kwargs)
'''


def fragile_copy(model_dir, directory):
    """The tiny chat model with remote code that fails `ANSWER_TOKENS` tokens into the answer of
    its greedy reply to QUESTION. Returns (model directory, fail_after)."""
    from wren.infer.load import load_engine
    from wren.infer.sampling import SamplingParams

    engine = load_engine(model_dir, backend="native")
    prompt = engine.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    reply = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=64))[0]
    end_of_thinking = engine.tokenizer.encode("</think>", add_special_tokens=False)
    assert len(end_of_thinking) == 1 and end_of_thinking[0] in reply.token_ids, reply.text
    answer_starts = reply.token_ids.index(end_of_thinking[0]) + 1
    assert len(reply.token_ids) > answer_starts + ANSWER_TOKENS, reply.text  # it fails before the end
    # Prefill holds the prompt but its last token; decode step t then makes the sequence
    # len(prompt) + t long and samples token t, so steps 0..fail_after - len(prompt) succeed.
    fail_after = len(prompt) + answer_starts + ANSWER_TOKENS - 1

    fragile = directory / "fragile"
    shutil.copytree(model_dir, fragile)
    (fragile / "fragile_llama.py").write_text(FRAGILE_CODE)
    config = json.loads((fragile / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "fragile_llama.FragileLlamaForCausalLM"}
    config["fail_after"] = fail_after
    (fragile / "config.json").write_text(json.dumps(config, indent=2))
    return fragile, fail_after


@pytest.fixture(scope="module")
def fragile_server(tmp_path_factory):
    model_dir = tiny_chat_model(tmp_path_factory.getbasetemp())
    directory = tmp_path_factory.mktemp("fragile")
    fragile, fail_after = fragile_copy(model_dir, directory)
    with pytest.MonkeyPatch.context() as env:
        # transformers copies remote code into a modules cache; keep it out of the home directory.
        env.setenv("HF_MODULES_CACHE", str(directory / "modules"))
        args = ("--backend", "transformers", "--trust-remote-code", "--served-model-name", NAME)
        with running_server(fragile, directory / "server.log", *args) as running:
            yield running, fail_after


def sse_data(body: str) -> list[str]:
    """The data of each server-sent event, checking the framing exactly on the way."""
    assert body.endswith("\n\n"), body
    blocks = body[:-2].split("\n\n")
    assert all(block.startswith("data: ") and "\n" not in block for block in blocks), blocks
    return [block.removeprefix("data: ") for block in blocks]


def assert_idle(url):
    """Nothing left waiting or running: the failed requests gave their slots back."""
    metrics = httpx.get(f"{url}/metrics").text
    assert metric_value(metrics, "wren_slots_active") == 0
    assert metric_value(metrics, "wren_requests_waiting") == 0
    assert metric_value(metrics, "wren_requests_in_flight") == 0


def test_a_stream_that_fails_midway_ends_with_an_error_event_then_done(fragile_server):
    server, fail_after = fragile_server
    body = {"messages": QUESTION, "temperature": 0, "max_tokens": 64, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
        assert response.status_code == 200  # the stream began before the model failed
        text = response.read().decode()
    data = sse_data(text)
    *chunks, error_event, done = data
    assert done == "[DONE]" and text.endswith("\n\ndata: [DONE]\n\n")

    # The role chunk, then the reply so far, split into reasoning and answer as usual.
    chunks = [json.loads(chunk) for chunk in chunks]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks[1:]]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)  # no choice finished
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content", "") for d in deltas)
    assert re.fullmatch(r"the \w+ sat on the \w+\.", reasoning), reasoning
    assert re.fullmatch(r"the \w+ is", content), content  # ANSWER_TOKENS tokens, then the failure

    # Then the error, in OpenAI's shape, as the one event before [DONE].
    error = json.loads(error_event)
    assert set(error) == {"error"}
    assert error["error"] == {
        "message": f"the engine failed: RuntimeError: the sequence grew past {fail_after} tokens",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    assert_idle(server.url)
    lines = [line for line in server.log_text().splitlines() if f"id={chunks[0]['id']} " in line]
    assert len(lines) == 1 and "outcome=error" in lines[0], lines


def test_the_sdk_raises_from_the_error_event(fragile_server):
    server, _ = fragile_server
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    stream = client.chat.completions.create(
        model=NAME, messages=QUESTION, temperature=0, max_tokens=64, stream=True
    )
    received = []
    with pytest.raises(openai.APIError, match="grew past"):
        for chunk in stream:
            received.append(chunk)
    assert len(received) > 1  # the failure came after the reply had begun
    assert_idle(server.url)


def test_a_plain_request_that_fails_is_a_500_in_openai_shape(fragile_server):
    server, fail_after = fragile_server
    body = {"messages": QUESTION, "temperature": 0, "max_tokens": 64}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "error": {
            "message": f"the engine failed: RuntimeError: the sequence grew past {fail_after} tokens",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    assert_idle(server.url)


def test_the_server_keeps_serving_after_a_failure(fragile_server):
    server, _ = fragile_server
    failed = {"messages": QUESTION, "temperature": 0, "max_tokens": 64, "stream": True}
    assert sse_data(httpx.post(f"{server.url}/v1/chat/completions", json=failed).text)[-1] == "[DONE]"
    # A reply short enough to stay under fail_after finishes normally, streamed or not.
    short = {"messages": QUESTION, "temperature": 0, "max_tokens": 4}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=short)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "length"
    assert response.json()["usage"]["completion_tokens"] == 4
    data = sse_data(httpx.post(f"{server.url}/v1/chat/completions", json={**short, "stream": True}).text)
    assert data[-1] == "[DONE]" and json.loads(data[-2])["choices"][0]["finish_reason"] == "length"
    assert all("error" not in json.loads(d) for d in data[:-1])
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'wren_requests_total{path="/v1/chat/completions",status="500"}' in metrics
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert_idle(server.url)
