"""Opening models for inference: the transformers backend gives the native engine's tokens, runs
architectures Wren's model code does not, and --dtype / --adapter mean the same on both."""

import json
import shutil

import pytest
import torch
import transformers
from helpers import build_chat_model
from test_lora import randomise_b

from wren.checkpoint import load_model, save_checkpoint
from wren.checkpoint.adapter import save_adapter
from wren.errors import WrenError
from wren.infer.load import choose_backend, load_engine, parse_dtype
from wren.infer.sampling import SamplingParams
from wren.infer.transformers_backend import TransformersRunner
from wren.model.lora import inject_lora
from wren.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=20)
CHATS = [[{"role": "user", "content": f"What is {a} plus {b}?"}] for a, b in [(3, 4), (9, 8), (0, 1)]]
TEXTS = ["What is 2 plus", "7 plus 7 is"]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return build_chat_model(tmp_path_factory.mktemp("backends"))


def greedy_ids(engine, prompts) -> list[list[int]]:
    return [r.token_ids for r in engine.generate(prompts, GREEDY)]


def test_transformers_backend_gives_the_native_tokens(chat_model):
    native = load_engine(chat_model, backend="native")
    hf = load_engine(chat_model, backend="transformers", max_batch_size=2)
    assert isinstance(hf.runner, TransformersRunner)
    expected = greedy_ids(native, CHATS + TEXTS)
    assert all(len(ids) > 3 for ids in expected[: len(CHATS)]) and all(expected)
    assert "plus" in native.tokenizer.decode(expected[0])  # a real reply, not noise
    # Two slots for five prompts: requests wait for slots and reuse them.
    assert greedy_ids(hf, CHATS + TEXTS) == expected


def test_auto_backend(chat_model, tmp_path):
    assert choose_backend(chat_model) == "native"
    # GPT-2 is not an architecture Wren's model code runs, so auto hands it to transformers.
    config = transformers.GPT2Config(vocab_size=300, n_positions=128, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(config).eval()
    gpt2.save_pretrained(tmp_path / "gpt2")
    Tokenizer.load(chat_model).save(tmp_path / "gpt2")
    assert choose_backend(tmp_path / "gpt2") == "transformers"
    assert choose_backend(tmp_path / "no-such-model") == "transformers"  # a hub id, for transformers
    with pytest.raises(WrenError, match="unknown backend"):
        choose_backend(chat_model, "vllm")

    # A Llama-shaped checkpoint that ships its own modeling code: only --trust-remote-code, which
    # asks for that code, sends it to transformers.
    custom = tmp_path / "custom-code"
    shutil.copytree(chat_model, custom)
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling.Config", "AutoModelForCausalLM": "modeling.Model"}
    (custom / "config.json").write_text(json.dumps(config))
    assert choose_backend(custom) == "native"
    assert choose_backend(custom, trust_remote_code=True) == "transformers"
    assert choose_backend(custom, "native", trust_remote_code=True) == "native"
    assert choose_backend(chat_model, trust_remote_code=True) == "native"  # no code of its own

    engine = load_engine(tmp_path / "gpt2", max_batch_size=3)
    assert engine.max_seq_len == 128
    prompts = [engine.tokenizer.encode(text) for text in ["What is 2 plus", "9 plus", "What is 1 plus 1?"]]
    got = greedy_ids(engine, prompts)
    for prompt, ids in zip(prompts, got, strict=True):
        reference = gpt2.generate(
            torch.tensor([prompt]), max_new_tokens=GREEDY.max_new_tokens, do_sample=False, eos_token_id=None
        )[0, len(prompt) :].tolist()
        stop = next((i for i, t in enumerate(reference) if t in engine.tokenizer.stop_token_ids), None)
        assert ids == reference[:stop]


def test_dtypes(chat_model, tmp_path):
    assert parse_dtype("auto") is None
    assert parse_dtype("bf16") == parse_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(WrenError, match="unknown dtype 'int3'"):
        parse_dtype("int3")
    assert load_engine(chat_model, dtype="bf16").model.lm_head.weight.dtype == torch.bfloat16
    assert load_engine(chat_model, backend="transformers", dtype="bf16").model.dtype == torch.bfloat16
    # The checkpoint is float32: auto keeps it on both backends.
    assert load_engine(chat_model).model.lm_head.weight.dtype == torch.float32
    assert load_engine(chat_model, backend="transformers").model.dtype == torch.float32
    # A float16 checkpoint runs as float32 on the CPU, whose float16 kernels are slow.
    half = save_checkpoint(
        load_model(chat_model), tmp_path / "half", Tokenizer.load(chat_model), torch.float16
    )
    assert json.loads((half / "config.json").read_text()).get("dtype", "float16") == "float16"
    assert load_engine(half).model.lm_head.weight.dtype == torch.float32
    assert load_engine(half, backend="transformers").model.dtype == torch.float32
    assert load_engine(half, dtype="fp16").model.lm_head.weight.dtype == torch.float16


def test_adapter_on_both_backends(chat_model, tmp_path):
    model = load_model(chat_model)
    inject_lora(model, rank=4, alpha=8)
    randomise_b(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(chat_model))
    plain = greedy_ids(load_engine(chat_model), CHATS)
    native = greedy_ids(load_engine(chat_model, adapter=tmp_path / "adapter"), CHATS)
    assert native != plain  # the adapter changes what the model says
    assert (
        greedy_ids(load_engine(chat_model, backend="transformers", adapter=tmp_path / "adapter"), CHATS)
        == native
    )


def test_int8_weights(chat_model):
    from wren.model.quant import Int8Linear, weight_bytes

    plain = load_engine(chat_model)
    quantized = load_engine(chat_model, quantize="int8")
    linears = [m for m in quantized.model.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 2 * 7 + 1  # every projection of both layers, and the output layer
    # The embedding stays float32 (the tied output layer gets an int8 copy); the rest is 4x smaller.
    assert weight_bytes(quantized.model) < 0.6 * weight_bytes(plain.model)
    ids = torch.tensor([plain.tokenizer.apply_chat_template(CHATS[0], add_generation_prompt=True)])
    with torch.no_grad():
        reference, got = plain.model(ids).logits, quantized.model(ids).logits
    error = (got - reference).abs().max() / reference.abs().max()
    assert 0 < error < 0.05
    assert (got.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9
    assert [r.text for r in quantized.generate(CHATS, GREEDY)] == [
        r.text for r in plain.generate(CHATS, GREEDY)
    ]
    with pytest.raises(WrenError, match="needs the native backend"):
        load_engine(chat_model, backend="transformers", quantize="int8")
    with pytest.raises(WrenError, match="unknown quantisation"):
        load_engine(chat_model, quantize="int3")
