"""Quantised weights: int4 at load time (on the CPU kernel and on the dequantising path other
devices take), and `wren quantize` checkpoints, which every verb loads quantised with no flag and
which nothing mistakes for a Hugging Face checkpoint."""

import json
import shutil

import pytest
import torch
from helpers import build_chat_model, wren
from test_cli import assert_user_error

from wren import kernels
from wren.checkpoint import load_model
from wren.checkpoint.info import describe_checkpoint
from wren.checkpoint.weights import QUANTIZED_SAFETENSORS, SAFETENSORS
from wren.cli import main
from wren.errors import WrenError
from wren.infer.engine import Engine
from wren.infer.load import choose_backend, load_engine
from wren.infer.sampling import SamplingParams
from wren.model.quant import (
    INT8_ACTIVATION_MIN_MACS,
    Int4Linear,
    Int8Linear,
    quantize_linears,
    weight_bytes,
)

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=20)
CHATS = [[{"role": "user", "content": f"What is {a} plus {b}?"}] for a, b in [(3, 4), (9, 8), (0, 1)]]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    # Trained past the default so that it answers right ("3 plus 4 is 7."): the greedy checks
    # below need top tokens that lead by more than 4-bit rounding moves the logits.
    return build_chat_model(tmp_path_factory.mktemp("quantize"), steps=400)


@pytest.fixture(scope="module")
def saved(chat_model, tmp_path_factory):
    """bits -> the directory `wren quantize --bits BITS` wrote."""
    out = tmp_path_factory.mktemp("quantized")
    dirs = {}
    for bits in (8, 4):
        result = wren("quantize", chat_model, "--bits", bits, "--out", out / f"int{bits}")
        assert result.returncode == 0, result.stderr
        assert f"quantised to int{bits}" in result.stdout and str(out / f"int{bits}") in result.stdout
        dirs[bits] = out / f"int{bits}"
    return dirs


def texts(engine) -> list[str]:
    return [r.text for r in engine.generate(CHATS, GREEDY)]


def logits(model, engine) -> torch.Tensor:
    ids = torch.tensor([engine.tokenizer.apply_chat_template(CHATS[0], add_generation_prompt=True)])
    with torch.no_grad():
        return model(ids).logits


def test_int8_products_quantise_the_activations_of_many_rows():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 200)
    layer = Int8Linear(linear)
    weight = layer.weight_int8.double() * layer.scale.double()[:, None]  # what the layer holds
    many = -(-INT8_ACTIVATION_MIN_MACS // (256 * 200))  # rows from which activations are int8
    with torch.no_grad():
        for rows in (1, many - 1):  # smaller products, on PyTorch's kernels: bfloat16 activations
            x = torch.randn(rows, 256)
            expected = torch.ops.aten._weight_int8pack_mm(x.bfloat16(), layer.weight_int8, layer.scale)
            with kernels.disabled():  # (Wren's own: tests/test_kernels.py)
                assert torch.equal(layer(x), expected.float() + linear.bias)

        x = torch.randn(2, -(-many // 2), 256) * torch.logspace(-3, 2, 256)  # a wide range
        x[1, 3] = 0  # a row of zeros: zeros out, not NaN
        got = layer(x)
        # Independently: each row rounded to 255 levels of its largest magnitude, exact products.
        step = x.double().abs().amax(-1, keepdim=True).clamp(min=1e-300) / 127
        rows = torch.round(x.double() / step)
        assert rows.abs().max() == 127
        expected = (rows * step) @ weight.T + linear.bias.double()
        assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
        assert torch.equal(got[1, 3], linear.bias)
        # What int8 activations cost against the float product by the same int8 weight.
        exact = x.double() @ weight.T + linear.bias.double()
        assert 0 < ((got.double() - exact).abs().max() / exact.abs().max()).item() < 0.02


def test_int8_layers_of_any_input_size_give_the_float_product():
    """PyTorch's bfloat16 int8-weight kernel gets input sizes that are not multiples of 16 wrong
    (garbage, or a crash, in PyTorch 2.13); such layers take the int8-row route instead."""
    torch.manual_seed(0)
    for in_features in (200, 100, 24):
        linear = torch.nn.Linear(in_features, 48)
        layer = Int8Linear(linear)
        for rows in (1, 3, 20):
            x = torch.randn(rows, in_features)
            with torch.no_grad(), kernels.disabled():
                got, exact = layer(x), linear(x)
            assert ((got - exact).abs().max() / exact.abs().max()).item() < 0.03, (in_features, rows)


def test_int4_weights(chat_model):
    plain = load_engine(chat_model)
    quantized = load_engine(chat_model, quantize="int4")
    int4 = [m for m in quantized.model.modules() if isinstance(m, Int4Linear)]
    int8 = [m for m in quantized.model.modules() if isinstance(m, Int8Linear)]
    assert len(int4) == 2 * 7 and all(m.cpu_packed for m in int4)  # on PyTorch's CPU int4 kernel
    assert len(int8) == 1 and quantized.model.lm_head is int8[0]  # the output layer stays int8
    # Float embedding (19k values), int8 output layer, int4 + a scale and zero per 32 elsewhere.
    assert weight_bytes(quantized.model) < 0.35 * weight_bytes(plain.model)
    reference, got = logits(plain.model, plain), logits(quantized.model, quantized)
    error = (got - reference).abs().max() / reference.abs().max()
    assert 0 < error < 0.1
    assert (got.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9
    expected = texts(plain)
    assert expected[0] == "3 plus 4 is 7."
    assert texts(quantized) == expected

    # The path every other device takes: dequantise the weight for each product. Forced on the
    # CPU here; it computes what the kernel computes, up to bfloat16 activations.
    dequantizing = load_model(chat_model)
    quantize_linears(dequantizing, bits=4, cpu_kernels=False)
    layers = [m for m in dequantizing.modules() if isinstance(m, Int4Linear)]
    assert len(layers) == 2 * 7 and not any(m.cpu_packed for m in layers)
    other = logits(dequantizing, plain)
    assert (other - got).abs().max() / got.abs().max() < 0.02
    assert texts(Engine(dequantizing, plain.tokenizer)) == expected


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_writes_a_checkpoint_every_verb_loads(chat_model, saved, bits, tmp_path, capsys):
    out = saved[bits]
    hf = json.loads((out / "config.json").read_text())
    quantization = {"quant_method": "wren", "format_version": 1, "bits": bits}
    if bits == 4:
        quantization["group_size"] = 32
    assert hf.pop("quantization_config") == quantization
    assert hf == json.loads((chat_model / "config.json").read_text())
    assert not (out / SAFETENSORS).exists()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (chat_model / name).read_bytes()
    size, float_size = (out / QUANTIZED_SAFETENSORS).stat().st_size, (chat_model / SAFETENSORS).stat().st_size
    assert size < {8: 0.45, 4: 0.36}[bits] * float_size

    # No flag: the checkpoint loads quantised, exactly as load-time quantisation makes it.
    engine = load_engine(out)
    layer = {8: Int8Linear, 4: Int4Linear}[bits]
    assert isinstance(engine.model.model.layers[0].mlp.down_proj, layer)
    assert choose_backend(out) == "native"
    expected = load_engine(chat_model, quantize=f"int{bits}")
    assert torch.equal(logits(engine.model, engine), logits(expected.model, expected))
    assert texts(engine) == texts(expected) == texts(load_engine(chat_model))

    info = describe_checkpoint(out)
    assert info["quantization"] == {8: "int8", 4: "int4, groups of 32"}[bits]
    assert info["parameters"] == describe_checkpoint(chat_model)["parameters"]

    # The verbs, in process: bits per byte as load-time quantisation scores it; batch generation.
    data = tmp_path / "held_out.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"{a} plus {b} is {a + b}."}) + "\n" for a, b in [(1, 2), (4, 9)])
    )
    scores = []
    for args in (["eval", "ppl", str(out)], ["eval", "ppl", str(chat_model), "--quantize", f"int{bits}"]):
        assert main([*args, "--data", str(data), "--json"]) == 0
        scores.append(json.loads(capsys.readouterr().out)["bits_per_byte"])
    assert scores[0] == scores[1]
    prompts, replies = tmp_path / "prompts.jsonl", tmp_path / "replies.jsonl"
    prompts.write_text(json.dumps({"messages": CHATS[0]}) + "\n")
    assert (
        main(["generate", str(out), "--input", str(prompts), "--output", str(replies), "--temperature=0"])
        == 0
    )
    assert json.loads(replies.read_text())["output"] == texts(expected)[0]


def test_a_quantised_checkpoint_is_not_a_hugging_face_one(chat_model, saved, tmp_path):
    import transformers

    from wren.checkpoint.adapter import merge_adapter
    from wren.interop.gguf import export_gguf

    with pytest.raises(WrenError, match=r"not a Hugging Face one.*the transformers backend needs the float"):
        load_engine(saved[4], backend="transformers")
    with pytest.raises(OSError, match=r"no file named model\.safetensors"):
        transformers.AutoModelForCausalLM.from_pretrained(saved[4])  # no weights it could mistake
    with pytest.raises(WrenError, match="GGUF export needs the float checkpoint"):
        export_gguf(saved[8], tmp_path / "model.gguf")
    with pytest.raises(WrenError, match="training, merging and exporting need the float checkpoint"):
        load_model(saved[4])  # what training, distillation and DPO call
    with pytest.raises(WrenError, match="a quantised Wren checkpoint"):
        merge_adapter(saved[8], tmp_path / "adapter", tmp_path / "merged")
    with pytest.raises(WrenError, match="merging a LoRA adapter into it needs"):
        load_engine(saved[4], adapter=tmp_path / "adapter")
    with pytest.raises(WrenError, match=r"already quantised \(int4, groups of 32"):
        load_engine(saved[4], quantize="int8")

    # Someone else's quantisation (GPTQ, AWQ ...) is transformers' to run, not Wren's engine's.
    foreign = tmp_path / "gptq"
    shutil.copytree(chat_model, foreign)
    hf = json.loads((foreign / "config.json").read_text())
    (foreign / "config.json").write_text(json.dumps({**hf, "quantization_config": {"quant_method": "gptq"}}))
    assert choose_backend(foreign) == "transformers"
    with pytest.raises(WrenError, match="quantised with 'gptq', which Wren's engine does not run"):
        load_engine(foreign, backend="native")


def test_quantize_errors(chat_model, saved, tmp_path, capsys):
    assert_user_error(
        wren("quantize", tmp_path / "missing", "--bits", "8", "--out", tmp_path / "q"),
        "missing: not a directory; expected a model directory with config.json",
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", str(chat_model), "--bits", "3", "--out", str(tmp_path / "q")])
    assert exit_info.value.code == 2
    assert "argument --bits: invalid choice: 3 (choose from 8, 4)" in capsys.readouterr().err
    for args, message in [
        ([str(saved[4]), "--bits", "8"], "a quantised Wren checkpoint (int4, groups of 32, written by wren "),
        ([str(chat_model), "--bits", "8", "--group-size", "64"], "--group-size is for 4 bits"),
    ]:
        assert main(["quantize", *args, "--out", str(tmp_path / "q")]) == 2
        assert message in capsys.readouterr().err
    assert main(["quantize", str(chat_model), "--bits", "4", "--out", str(chat_model)]) == 2
    assert "would replace the model it is made from" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
    assert (chat_model / SAFETENSORS).is_file()


def test_a_moe_model_round_trips(tmp_path):
    from wren.checkpoint import save_checkpoint
    from wren.checkpoint.quantized import quantize_checkpoint
    from wren.model import CausalLM, preset_config

    torch.manual_seed(0)
    config = preset_config("moe", vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    source = save_checkpoint(CausalLM(config).eval(), tmp_path / "moe")  # Qwen2-MoE: q/k/v biases
    result = quantize_checkpoint(source, tmp_path / "moe-int4", bits=4)
    model = load_model(result.path, quantized=True)
    routers = [model.model.layers[0].mlp.gate, model.model.layers[0].mlp.shared_expert_gate]
    assert all(isinstance(m, Int8Linear) for m in routers)  # they pick the experts: kept at 8 bits
    assert isinstance(model.model.layers[0].mlp.shared_expert.up_proj, Int4Linear)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    expected = load_model(source)
    quantize_linears(expected, bits=4)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected(ids).logits)
